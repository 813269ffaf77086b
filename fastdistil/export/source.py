"""The model directory an export starts from: a sequence classifier (say, fine-tuned by python -m
fastdistil.evaluate's code) or a masked LM (a fastdistil.train student), saved with save_pretrained and its tokenizer
beside it; loaded in fp32, in eval mode, behind a module that returns the logits alone."""

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from fastdistil.evaluate.finetune import load_tokenizer

# The tasks, by optimum's and transformers' pipeline names: what the architecture's name ends with, and its class.
TASKS = {"text-classification": ("ForSequenceClassification", AutoModelForSequenceClassification),
         "fill-mask": ("ForMaskedLM", AutoModelForMaskedLM)}
# The inputs an exported model can take, in the order of optimum's ONNX exports.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXAMPLE_LEN = 16


def task_of(model_dir: Path, task: str = "auto") -> tuple[str, str]:
    """(task, architecture) of the model saved in model_dir, read from its config.json alone: a FileNotFoundError
    without one, a ValueError when the architecture has neither head or not the head `task` asks for."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {model_dir}: no such directory")
    config = model_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"MODEL_DIR {model_dir} has no config.json: not a model saved with save_pretrained")
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{config}: not a transformers config ({exc})") from exc
    found = [(name, a) for name, (suffix, _) in TASKS.items() for a in architectures if a.endswith(suffix)]
    if not found:
        raise ValueError(f"MODEL_DIR {model_dir}: its architecture ({', '.join(architectures) or 'none named'}) is "
                         "neither a sequence classifier (*ForSequenceClassification) nor a masked LM (*ForMaskedLM)")
    if task not in ("auto", found[0][0]):
        raise ValueError(f"--task {task}: MODEL_DIR {model_dir} holds a {found[0][0]} model ({found[0][1]})")
    return found[0]


class LogitsOnly(torch.nn.Module):
    """The model with its inputs by position and its logits as the one output: an exported graph without
    transformers' output classes, which ONNX Runtime and torch.export.load run without transformers."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs))).logits


def module_runner(module: torch.nn.Module, input_names: tuple[str, ...]):
    """A function of {input name: int64 array [batch, sequence]} giving module's logits (inputs by position)."""
    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(np.asarray(inputs[n], dtype=np.int64)) for n in input_names)).numpy()

    return run


@dataclass
class Source:
    model_dir: Path
    task: str
    architecture: str
    model: torch.nn.Module  # the transformers model, fp32, eval mode
    tokenizer: object
    input_names: tuple[str, ...]

    def logits_module(self) -> LogitsOnly:
        return LogitsOnly(self.model, self.input_names).eval()

    def runner(self):
        """The fp32 PyTorch model, run as the exports are (their runners'): the reference of every comparison."""
        return module_runner(self.logits_module(), self.input_names)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """What the export traces: 2 x 16 tokens, the second row padded. Sizes above 1 (torch.export fixes
        dimensions of size 0 and 1), and padding so that the traced graph applies the attention mask."""
        ids = torch.full((2, EXAMPLE_LEN), self.tokenizer.unk_token_id or 0)  # any id: values do not shape the graph
        mask = torch.ones_like(ids)
        mask[1, EXAMPLE_LEN // 2:] = 0
        example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return tuple(example[name] for name in self.input_names)

    def dynamic_shapes(self) -> dict:
        """Every input [batch, sequence], both dynamic; the sequence up to the model's positions."""
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=self.max_positions)
        return {"inputs": tuple({0: batch, 1: sequence} for _ in self.input_names)}  # LogitsOnly.forward(*inputs)


def load(model_dir: Path, task: str = "auto") -> Source:
    """The model (its head checked against `task` first) and its tokenizer."""
    task, architecture = task_of(model_dir, task)
    tokenizer = load_tokenizer(model_dir)
    try:
        # fp32 whatever the checkpoint's dtype (the built-in teacher is stored in fp16). SDPA, transformers'
        # default, pinned: the reference and the export run the same attention, which exports as plain ops.
        model = TASKS[task][1].from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise ValueError(f"MODEL_DIR {model_dir}: cannot load it as {architecture} ({' '.join(str(exc).split())})"
                         ) from exc
    # The tokenizer's inputs that the model takes: DistilBERT has no segment embeddings, so a BERT tokenizer's
    # token_type_ids are not among its inputs.
    accepted = inspect.signature(model.forward).parameters
    input_names = tuple(n for n in MODEL_INPUTS if n in tokenizer.model_input_names and n in accepted)
    return Source(model_dir, task, architecture, model.eval(), tokenizer, input_names)
