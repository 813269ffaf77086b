"""python -m fastdistil.evaluate: fine-tune a distillation run's teacher, its student and a random student of the
student's shape on a downstream task, and score all three.

    python -m fastdistil.evaluate RUN_DIR [--task wiki-topic | glue/<task> | imdb | squad | squad_v2]
                                                                                      -> RUN_DIR/eval_<task>.json
    python -m fastdistil.evaluate RUN_DIR --task T --distill    (also student_distilled: distill.py)
    python -m fastdistil.evaluate --model DIR [--task ...]                            -> DIR/eval_<task>.json
    python -m fastdistil.evaluate RUN_DIR --task perplexity (a GPT-2 run's default)    -> perplexity.py

Each model gets the task's head (sequence classification; question answering for SQuAD: qa.py) and the same
fine-tuning: hyperparameters, seed, batch order. wiki-topic (the bundled sample's 12 topics, a fixed held-out
split) works offline and without `datasets`; GLUE, IMDb and SQuAD come through `datasets` and need a network or
its cache, or, for SQuAD, its official JSON files (--train-file, --eval-file). Read top to bottom: the config, the
data, the models, fine-tuning, prediction, the report.
"""

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers import (MODEL_FOR_QUESTION_ANSWERING_MAPPING, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
                          AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoTokenizer)

from fastdistil.commands import (atomic_write_text, check_choices, config_from, device_of, flag, parser_for,
                                 run_command)
from fastdistil.evaluate import distill, metrics, perplexity, qa, tasks
from fastdistil.train import data
from fastdistil.train.config import BUILT_IN_TEACHERS
from fastdistil.train.step import make_optimizer

HELDOUT_BUCKETS = 5  # wiki-topic: a document is held out when the hash of its title is 0 mod 5, ~20 %
SUBSET_SEED = 0  # --max-*-examples draw the same examples whatever --seed is, so seeds compare on one subset
MAX_GRAD_NORM = 1.0  # BERT's fine-tuning clipping


@dataclass
class EvalConfig:
    run_dir: str | None = flag(None, "a fastdistil.train --output-dir", positional=True, metavar="RUN_DIR")
    model: str | None = flag(None, "evaluate this one checkpoint (and tokenizer) instead", metavar="DIR")
    task: str | None = flag(None, f"one of: {', '.join(tasks.TASKS)}, or {perplexity.TASK} (a causal run's held-out "
                                  "perplexity) (default: wiki-topic, perplexity for a GPT-2 run)")
    # The defaults suit the built-in teacher (4 x 128) and its students: the whole wiki-topic evaluation of the
    # default run takes minutes on 2 CPU cores. BERT-base-sized models want --lr 2e-5 to 5e-5, --max-seq-len 128.
    epochs: int = flag(2, "fine-tuning epochs")
    lr: float = flag(1e-3, "peak learning rate (for the built-in teacher; BERT-base-sized models want 2e-5 to "
                           "5e-5)")
    batch_size: int = flag(32, "examples per batch")
    max_seq_len: int = flag(64, "tokens per example, longer text truncated")
    warmup: float = flag(0.1, "linear warm-up, as a fraction of the steps")
    weight_decay: float = flag(0.01, "AdamW weight decay (not on biases and LayerNorms)")
    adam_eps: float = flag(1e-6, "AdamW epsilon")
    seed: int = flag(0, "seeds the heads, dropout and batch order")
    max_train_examples: int | None = flag(None, "fine-tune on a fixed random subset of this size")
    max_eval_examples: int | None = flag(None, "score a fixed random subset of each eval split")
    device: str = flag("auto", "cuda when there is a GPU, else cpu", choices=("auto", "cpu", "cuda"))
    output: str | None = flag(None, "the JSON report's path (default: DIR/eval_<task>.json)")
    # Task-specific distillation (distill.py), with run_squad_w_distillation.py's defaults.
    distill: bool = flag(False, "also fine-tune the student against the task logits of the fine-tuned teacher "
                                "(the paper's DistilBERT (D)): student_distilled in the report")
    alpha_ce: float = flag(0.5, "--distill: weight of the KL to the teacher's task logits at --temperature")
    alpha_task: float = flag(0.5, "--distill: weight of the task's own loss (cross-entropy against the gold labels "
                                  "or answer positions)")
    alpha_cos: float = flag(0.0, "--distill: weight of the cosine loss between the [CLS] last hidden states")
    temperature: float = flag(2.0, "--distill: the softmax temperature of the KL term")
    # Extractive QA (qa.py), scaled from run_squad.py's 128 and 64 of 384 tokens, and its defaults.
    doc_stride: int | None = flag(None, "QA: context tokens between the starts of a long context's windows "
                                        "(default: max-seq-len / 3)")
    max_query_length: int | None = flag(None, "QA: question tokens kept (default: max-seq-len / 4, at most 64)")
    max_answer_length: int | None = flag(None, "QA: the longest answer decoded, in tokens (default: 30)")
    n_best_size: int | None = flag(None, "QA: start and end positions considered per window (default: 20)")
    train_file: str | None = flag(None, "QA: train on this SQuAD-format JSON file (train-v1.1.json) instead of the "
                                        "hub's train split", metavar="JSON")
    eval_file: str | None = flag(None, "QA: score this SQuAD-format JSON file (dev-v1.1.json) instead of the hub's "
                                       "validation split", metavar="JSON")


QA_FLAGS = ("doc_stride", "max_query_length", "max_answer_length", "n_best_size", "train_file", "eval_file")


def parse_args(argv=None) -> EvalConfig:
    parser = parser_for(EvalConfig, "python -m fastdistil.evaluate", __doc__.split("\n\n")[0])
    return config_from(EvalConfig, vars(parser.parse_args(argv)))


def check_config(cfg: EvalConfig) -> None:
    """A ValueError naming the first bad setting."""
    if (cfg.run_dir is None) == (cfg.model is None):
        raise ValueError("give either RUN_DIR (a fastdistil.train run) or --model DIR (one checkpoint)")
    if cfg.task == perplexity.TASK and cfg.run_dir is None:
        raise ValueError(f"--task {perplexity.TASK} scores a run (RUN_DIR): its teacher, student and held-out split")
    task = None if cfg.task == perplexity.TASK else tasks.get_task(cfg.task)
    for name in ("epochs", "batch_size", "max_seq_len", "max_train_examples", "max_eval_examples", "doc_stride",
                 "max_query_length", "max_answer_length", "n_best_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if task is None or not task.is_qa:
        for name in QA_FLAGS:
            if getattr(cfg, name) is not None:
                qa_tasks = ", ".join(t.name for t in tasks.TASKS.values() if t.is_qa)
                raise ValueError(f"--{name.replace('_', '-')} is for the question-answering tasks ({qa_tasks}), "
                                 f"not --task {cfg.task}")
    if (cfg.train_file is None) != (cfg.eval_file is None):
        raise ValueError("give both --train-file and --eval-file (SQuAD-format JSON), or neither (the hub's SQuAD)")
    if cfg.distill:
        _check_distillation(cfg, task)
    if not 0 <= cfg.warmup < 1:
        raise ValueError(f"--warmup must be in [0, 1), got {cfg.warmup}")
    check_choices(cfg)
    device_of(cfg.device)


def _check_distillation(cfg: EvalConfig, task: tasks.Task | None) -> None:
    if cfg.run_dir is None:
        raise ValueError("--distill needs RUN_DIR: the run's teacher, fine-tuned on the task, teaches the student "
                         "(--model DIR has no teacher)")
    if task is None:
        raise ValueError(f"--distill fine-tunes on a downstream task; --task {perplexity.TASK} fine-tunes nothing")
    if task.is_regression:
        raise ValueError(f"--distill: --task {task.name} is a regression (one output): a softmax over one logit "
                         "carries nothing to distill")
    for name in ("alpha_ce", "alpha_task", "alpha_cos"):
        if not (getattr(cfg, name) >= 0 and math.isfinite(getattr(cfg, name))):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 and finite, got {getattr(cfg, name)}")
    if cfg.alpha_ce + cfg.alpha_task + cfg.alpha_cos == 0:
        raise ValueError("--distill: --alpha-ce, --alpha-task and --alpha-cos are all 0: nothing to train on")
    if not (cfg.temperature > 0 and math.isfinite(cfg.temperature)):
        raise ValueError(f"--temperature must be > 0 and finite, got {cfg.temperature}")


def _with_qa_defaults(cfg: EvalConfig) -> EvalConfig:
    """The QA settings left unset, from --max-seq-len as run_squad.py's from its 384 tokens (doc_stride 128,
    max_query_length 64), and its max_answer_length 30 and n_best_size 20."""
    defaults = {"doc_stride": cfg.max_seq_len // 3, "max_query_length": min(64, cfg.max_seq_len // 4),
                "max_answer_length": 30, "n_best_size": 20}
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


# --- the data ---------------------------------------------------------------------------------------------

def _is_heldout(title: str) -> bool:
    # A hash of the title, not a seeded shuffle: the split is the same for every seed, corpus order and machine.
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


def load_splits(task: tasks.Task, files: dict[str, str] | None = None
                ) -> tuple[dict[str, data.Table], list[str] | None]:
    """The task's splits as they come (wiki-topic: the bundled corpus, split by title; QA with files, {split:
    SQuAD-format JSON file}: those files), and the label names the dataset declares (a ClassLabel label column),
    if it does."""
    if files is not None:
        return {split: qa.read_squad(path, f"--{flag}") for split, (flag, path) in files.items()}, None
    if task.dataset == data.DEFAULT_DATASET:
        corpus = data.Table.from_rows(data.read_rows([data.BUNDLED_CORPUS]))
        heldout = [_is_heldout(title) for title in corpus["title"]]
        return {"train": corpus[[i for i, h in enumerate(heldout) if not h]],
                "test": corpus[[i for i, h in enumerate(heldout) if h]]}, None
    datasets = data.require_datasets(f"--task {task.name}: loading {task.dataset} from the Hugging Face hub")
    try:
        splits = datasets.load_dataset(task.dataset, task.config)
    except (OSError, ValueError) as exc:  # offline, not in the cache, or no such dataset
        raise ValueError(f"--task {task.name}: cannot load the dataset {task.dataset} "
                         f"({' '.join(str(exc).split())}); it needs a network or the datasets cache") from exc
    feature = splits[task.train_split].features.get(task.label_column) if task.train_split in splits else None
    label_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return {name: data.Table(split.to_dict()) for name, split in splits.items()}, label_names


def _subset(split: data.Table, n: int | None) -> data.Table:
    # Corpora come sorted (wiki-topic by topic, IMDb by label): the first n would be one class. The permutation
    # is datasets' shuffle(seed=SUBSET_SEED), which earlier versions used: the same subsets, the same scores.
    if n is None or n >= len(split):
        return split
    return split[np.random.default_rng(SUBSET_SEED).permutation(len(split))[:n].tolist()]


def task_data(task: tasks.Task, cfg: EvalConfig) -> tuple[data.Table, dict[str, data.Table], list[str] | None,
                                                            int | None]:
    """(train, {eval split: table}, label names or None, number of labels): each table with the text columns
    and an integer (for regression, float) `label`; for QA with question, context and answers, and no labels."""
    files = None if cfg.train_file is None else {task.train_split: ("train-file", cfg.train_file),
                                                 task.eval_splits[0]: ("eval-file", cfg.eval_file)}
    splits, label_names = load_splits(task, files)
    names = [task.train_split, *task.eval_splits]
    for name in names:
        if name not in splits:
            raise ValueError(f"--task {task.name}: the dataset has no split {name!r} (splits: {list(splits)})")
        present = splits[name].column_names
        for column in (*task.text_columns, task.label_column):
            if column not in present:
                raise ValueError(f"--task {task.name}: split {name!r} has no column {column!r} "
                                 f"(columns: {present})")
    if task.is_qa:
        def prepared(split: data.Table, n: int | None) -> data.Table:
            split = _subset(split, n)
            for row, answers in enumerate(split[task.label_column]):
                if not (isinstance(answers, dict) and len(answers.get("text", ())) == len(
                        answers.get("answer_start", [None]))):
                    raise ValueError(f"--task {task.name}: row {row}'s {task.label_column!r} must be {{'text': "
                                     f"[...], 'answer_start': [...]}} of one length, got {answers!r}")
            return data.Table({**{c: split[c] for c in task.text_columns}, "answers": split[task.label_column]})

        return (prepared(splits[task.train_split], cfg.max_train_examples),
                {name: prepared(splits[name], cfg.max_eval_examples) for name in task.eval_splits}, None, None)
    to_label = float if task.is_regression else int
    if label_names is None and all(isinstance(v, str) for v in splits[task.train_split][task.label_column]):
        # wiki-topic's topics: ids in sorted order
        label_names = sorted({v for name in names for v in splits[name][task.label_column]})
        to_label = {name: i for i, name in enumerate(label_names)}.__getitem__
    num_labels = task.num_labels or len(label_names)

    def prepared(split: data.Table, n: int | None) -> data.Table:
        split = _subset(split, n)
        labels = [to_label(v) for v in split[task.label_column]]
        if not task.is_regression and labels and not 0 <= min(labels) <= max(labels) < num_labels:
            raise ValueError(f"--task {task.name}: labels must be in [0, {num_labels}), got {min(labels)} to "
                             f"{max(labels)} in column {task.label_column!r}")
        return data.Table({**{c: split[c] for c in task.text_columns}, "label": labels})

    train_set = prepared(splits[task.train_split], cfg.max_train_examples)
    eval_sets = {name: prepared(splits[name], cfg.max_eval_examples) for name in task.eval_splits}
    return train_set, eval_sets, label_names, num_labels


@dataclass
class Encoded:
    """The model inputs of the rows (examples; QA: windows), and their training targets."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None  # each token's segment (pairs); None when the tokenizer gives none
    targets: dict[str, torch.Tensor]  # the model's keyword arguments: labels, or start_positions and end_positions
    windows: qa.Windows | None = None  # QA: each window's example and context offsets, for decoding

    def batch(self, indices: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
        """The model inputs of these examples, padded to the longest of them."""
        ids, mask = data.collate([self.input_ids[i] for i in indices], pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask.long()}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = data.collate([self.token_type_ids[i] for i in indices], 0)[0]
        return {k: v.to(device) for k, v in inputs.items()}


def encode(split: data.Table, task: tasks.Task, tokenizer, cfg: EvalConfig, training: bool) -> Encoded:
    if task.is_qa:
        found = qa.windows(split["question"], split["context"], tokenizer, cfg.max_seq_len, cfg.doc_stride,
                           cfg.max_query_length, split["answers"] if training else None)
        targets = {} if not training else {"start_positions": torch.tensor(found.start_positions),
                                           "end_positions": torch.tensor(found.end_positions)}
        return Encoded(found.input_ids, found.token_type_ids, targets, found)
    texts = [split[c] for c in task.text_columns]
    encoded = tokenizer(*texts, truncation=True, max_length=cfg.max_seq_len)
    labels = torch.tensor(split["label"], dtype=torch.float32 if task.is_regression else torch.long)
    return Encoded(encoded["input_ids"], encoded.get("token_type_ids"), {"labels": labels})


def references_of(split: data.Table, task: tasks.Task):
    """What an eval split's predictions are scored against: its labels, or (QA) each question's gold answers."""
    return [answers["text"] for answers in split["answers"]] if task.is_qa else np.asarray(split["label"])


# --- the models -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_loading():
    """Loading a masked LM as a classifier reports its MLM head as unused and the new head as untrained:
    expected here, so the report and the loading bar are hidden."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


# Each kind of task's head: the auto class that puts it on a checkpoint, the architectures that have one, its name.
HEADS = {tasks.CLASSIFICATION: (AutoModelForSequenceClassification, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
                                "sequence-classification"),
         tasks.EXTRACTIVE_QA: (AutoModelForQuestionAnswering, MODEL_FOR_QUESTION_ANSWERING_MAPPING,
                               "question-answering")}


def _head_kwargs(task: tasks.Task, num_labels: int | None) -> dict:
    if task.is_qa:
        return {}  # the QA head's two outputs, start and end, are its own
    problem = "regression" if task.is_regression else "single_label_classification"
    return {"num_labels": num_labels, "problem_type": problem}


def check_head(path: str, what: str, task: tasks.Task) -> None:
    """A ValueError, before anything is fine-tuned, when the checkpoint's architecture has no head for the task."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {path}: cannot load its config ({' '.join(str(exc).split())})") from exc
    _, architectures, head = HEADS[task.kind]
    if type(config) not in architectures:
        raise ValueError(f"{what} {path}: transformers has no {head} head for the model type "
                         f"{config.model_type!r}, which --task {task.name} needs")


def pretrained_model(path: str, what: str, task: tasks.Task, num_labels: int | None) -> torch.nn.Module:
    """The checkpoint at `path` with a fresh head for the task, in fp32 (the built-in teacher is stored in fp16)."""
    auto_class, _, head = HEADS[task.kind]
    with _quiet_loading():
        try:
            return auto_class.from_pretrained(path, dtype=torch.float32, **_head_kwargs(task, num_labels))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{what} {path}: cannot load it as a {head} model "
                             f"({' '.join(str(exc).split())})") from exc


def random_model(config_dir: Path, task: tasks.Task, num_labels: int | None) -> torch.nn.Module:
    """A fresh fp32 model of the architecture and shape saved in config_dir: the distilled student without its
    distillation."""
    config = AutoConfig.from_pretrained(config_dir, **_head_kwargs(task, num_labels))
    return HEADS[task.kind][0].from_config(config).float()


def models_to_evaluate(cfg: EvalConfig, task: tasks.Task) -> tuple[dict, Path]:
    """({name: (where it comes from, a function of (task, num_labels) building it)}, the tokenizer's directory).
    The models are built one at a time, each right after seeding, so that every head starts alike; with
    --distill, student_distilled is the student built again (the same head as the student's)."""
    if cfg.model is not None:
        model_dir = Path(cfg.model)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"--model {model_dir}: no such directory")
        check_head(cfg.model, "--model", task)
        return {"model": (str(model_dir), lambda *head: pretrained_model(cfg.model, "--model", *head))
                }, model_dir
    run = Path(cfg.run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} has no config.json: not a fastdistil.train run directory (to evaluate "
                                "one checkpoint, pass --model DIR)")
    student_dir = run / "student"
    if not (student_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run} has no student/ model: the run has not finished (its student is exported "
                                "at the end)")
    teacher = json.loads((run / "config.json").read_text()).get("teacher")
    if teacher is None:
        raise ValueError(f"{run / 'config.json'} names no teacher: not a fastdistil.train config")
    teacher = str(BUILT_IN_TEACHERS.get(teacher, teacher))
    check_head(teacher, "the run's teacher", task)
    check_head(str(student_dir), "the run's student", task)
    if cfg.distill and cfg.alpha_cos > 0:
        sizes = [AutoConfig.from_pretrained(path).hidden_size for path in (teacher, student_dir)]
        if sizes[0] != sizes[1]:
            raise ValueError(f"--alpha-cos needs the teacher's and the student's hidden sizes equal, got {sizes[0]} "
                             f"and {sizes[1]}")

    def student(*head):
        return pretrained_model(str(student_dir), "the run's student", *head)

    models = {"teacher": (teacher, lambda *head: pretrained_model(teacher, "the run's teacher", *head)),
              "student": (str(student_dir), student),
              "random_student": (f"random init of {student_dir / 'config.json'}",
                                 lambda *head: random_model(student_dir, *head))}
    if cfg.distill:
        models["student_distilled"] = (f"{student_dir}, fine-tuned against the fine-tuned teacher", student)
    return models, student_dir


def load_tokenizer(tokenizer_dir: Path):
    # Without tokenizer files, transformers builds an empty tokenizer that maps every word to [UNK].
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer (tokenizer_config.json); save the model's "
                                "tokenizer beside it (tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{tokenizer_dir}: no loadable tokenizer ({' '.join(str(exc).split())})") from exc


def _amp(device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """fp32 on CPU; on CUDA autocast to bf16 where the GPU has it, else fp16 with loss scaling."""
    if device.type != "cuda":
        return None, torch.amp.GradScaler("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


# --- fine-tuning and prediction ---------------------------------------------------------------------------

def _inputs_of(model, batch: dict) -> dict:
    # DistilBERT has no segment embeddings: its forward takes no token_type_ids.
    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k in accepted}


def distillation_loss(model: torch.nn.Module, teacher: torch.nn.Module, batch: dict, targets: dict,
                      task: tasks.Task, cfg: EvalConfig) -> torch.Tensor:
    """The loss of a --distill step: both models on the batch (the teacher frozen), then distill.loss."""
    hidden = cfg.alpha_cos > 0
    with torch.no_grad():
        teacher_output = teacher(**_inputs_of(teacher, batch), output_hidden_states=hidden)
    student_output = model(**_inputs_of(model, batch), output_hidden_states=hidden)
    return distill.loss(student_output, teacher_output, targets, task.outputs, cfg.temperature, cfg.alpha_ce,
                        cfg.alpha_task, cfg.alpha_cos).loss


def fine_tune(model: torch.nn.Module, train_set: Encoded, task: tasks.Task, cfg: EvalConfig, pad_id: int, device,
              name: str, teacher: torch.nn.Module | None = None) -> None:
    """AdamW with linear warm-up and decay over cfg.epochs passes; batches grouped by length (less padding),
    their order a function of the seed and the epoch only. The loss is the model's own task loss or, given a
    teacher (fine-tuned, in eval mode), the distillation loss against it."""
    lengths = [len(ids) for ids in train_set.input_ids]
    plans = [data.length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch) for epoch in range(cfg.epochs)]
    total_steps = sum(len(plan) for plan in plans)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.adam_eps)  # no decay on biases, LayerNorms
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup * total_steps),
                                                             total_steps)
    amp_dtype, scaler = _amp(device)
    model.train()
    progress = tqdm(total=total_steps, desc=f"fine-tuning {name}", leave=False)
    for plan in plans:
        for indices in plan:
            batch = train_set.batch(indices, pad_id, device)
            targets = {k: v[indices].to(device) for k, v in train_set.targets.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if teacher is None:
                    loss = model(**_inputs_of(model, batch), **targets).loss
                else:
                    loss = distillation_loss(model, teacher, batch, targets, task, cfg)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()


@torch.no_grad()
def logit_rows(model: torch.nn.Module, examples: Encoded, task: tasks.Task, cfg: EvalConfig, pad_id: int, device
               ) -> list[np.ndarray]:
    """Every row's logits, in order, fp32 [outputs, width]: an example's class logits [1, classes], or a QA
    window's start and end logits [2, its tokens] (padding cut off: decoding and the KL see the window alone)."""
    model.eval()
    amp_dtype, _ = _amp(device)
    # Rows of similar length share a batch: less padding; the logits go back to their places.
    order = sorted(range(len(examples.input_ids)), key=lambda i: len(examples.input_ids[i]))
    rows = [None] * len(order)
    for start in range(0, len(order), cfg.batch_size):
        indices = order[start:start + cfg.batch_size]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(**_inputs_of(model, examples.batch(indices, pad_id, device)))
        stacked = torch.stack([output[name].float() for name, _ in task.outputs], 1).cpu().numpy()
        for i, row in zip(indices, stacked):
            rows[i] = row[:, :len(examples.input_ids[i])] if task.is_qa else row
    return rows


def predictions_of(rows: list[np.ndarray], examples: Encoded, split: data.Table, task: tasks.Task,
                   cfg: EvalConfig):
    """The predicted class (for regression, value; for QA, answer) of every example, in order."""
    if task.is_qa:
        return qa.decode(rows, examples.windows, split["context"], cfg.n_best_size, cfg.max_answer_length,
                         task.no_answer)
    logits = np.stack([row[0] for row in rows]) if rows else np.empty((0, 1), dtype=np.float32)
    return logits[:, 0].astype(np.float64) if task.is_regression else logits.argmax(-1)


# --- the whole evaluation ---------------------------------------------------------------------------------

def main(cfg: EvalConfig) -> dict:
    """Fine-tunes and scores each model; writes and returns the report."""
    start = time.time()
    if cfg.task is None:
        cfg = dataclasses.replace(cfg, task=_default_task(cfg))
    check_config(cfg)
    device = device_of(cfg.device)
    if cfg.task == perplexity.TASK:
        out_path = Path(cfg.output) if cfg.output else Path(cfg.run_dir) / f"eval_{perplexity.TASK}.json"
        report = perplexity.evaluate(Path(cfg.run_dir), device, out_path)
        return {**report, "wall_s": time.time() - start, "path": str(out_path)}
    task = tasks.get_task(cfg.task)
    if task.is_qa:
        cfg = _with_qa_defaults(cfg)
    models, tokenizer_dir = models_to_evaluate(cfg, task)
    tokenizer = load_tokenizer(tokenizer_dir)
    train_set, eval_sets, label_names, num_labels = task_data(task, cfg)
    out_path = Path(cfg.output) if cfg.output else (
        Path(cfg.model or cfg.run_dir) / f"eval_{task.name.replace('/', '-')}.json")

    train_encoded = encode(train_set, task, tokenizer, cfg, training=True)
    eval_encoded = {name: encode(split, task, tokenizer, cfg, training=False) for name, split in eval_sets.items()}
    references = {name: references_of(split, task) for name, split in eval_sets.items()}

    results, teacher, teacher_rows = {}, None, None
    for name, (source, build) in models.items():
        began = time.time()
        torch.manual_seed(cfg.seed)  # each model's new weights and dropout: a function of the seed
        model = build(task, num_labels).to(device)
        fine_tune(model, train_encoded, task, cfg, tokenizer.pad_token_id, device, name,
                  teacher=teacher if name == "student_distilled" else None)
        rows = {split: logit_rows(model, examples, task, cfg, tokenizer.pad_token_id, device)
                for split, examples in eval_encoded.items()}
        predictions = {split: predictions_of(rows[split], eval_encoded[split], eval_sets[split], task, cfg)
                       for split in eval_sets}
        results[name] = {"source": source, "params": sum(p.numel() for p in model.parameters()),
                         **metrics.compute(task, predictions, references)}
        if name == "teacher":
            teacher_rows = rows
            if cfg.distill:
                teacher = model  # kept, in eval mode, for student_distilled
        elif teacher_rows is not None and not task.is_regression:
            # How far each student's held-out task logits are from the fine-tuned teacher's: what --distill lowers.
            results[name]["kl_to_teacher"] = distill.kl_to_teacher(
                [r for split in eval_sets for r in rows[split]],
                [r for split in eval_sets for r in teacher_rows[split]], cfg.temperature)
        results[name]["wall_s"] = time.time() - began

    report = {name: result["score"] for name, result in results.items()}
    if "teacher" in results:
        report["retention"] = report["student"] / report["teacher"] if report["teacher"] else None
        if "student_distilled" in results:
            report["retention_distilled"] = (report["student_distilled"] / report["teacher"] if report["teacher"]
                                             else None)
    hyperparameters = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("run_dir", "model", "output")}
    report.update(task=task.name, models=results, hyperparameters={**hyperparameters, "device": str(device)},
                  train_examples=len(train_set), eval_examples={name: len(s) for name, s in eval_sets.items()},
                  labels=label_names, wall_s=time.time() - start)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(report, indent=2))
    report["path"] = str(out_path)
    return report


def _default_task(cfg: EvalConfig) -> str:
    """wiki-topic, except for a causal (GPT-2) run: perplexity, the measure DistilGPT2 was scored by."""
    student_config = Path(cfg.run_dir or "") / "student" / "config.json"
    if cfg.run_dir is not None and student_config.is_file():
        if json.loads(student_config.read_text()).get("model_type") == "gpt2":
            return perplexity.TASK
    return "wiki-topic"


def format_table(report: dict) -> str:
    """The models' metric values and scores, one row each (with their held-out KL to the fine-tuned teacher where
    there is one), and the students' retention of the teacher's score."""
    models = report["models"]
    metric_names = list(next(iter(models.values()))["metrics"])
    kl = any("kl_to_teacher" in result for result in models.values())
    columns = ["params", *metric_names, "score", *(["kl_to_teacher"] if kl else [])]
    widths = [max(len(c), 8) for c in columns]
    first = max(len(report["task"]), *(len(name) for name in models))
    lines = ["  ".join([report["task"].ljust(first), *(c.rjust(w) for c, w in zip(columns, widths))])]
    for name, result in models.items():
        cells = [f"{result['params'] / 1e6:.2f}M", *(f"{result['metrics'][m]:.4f}" for m in metric_names),
                 f"{result['score']:.4f}"]
        if kl:
            cells.append(f"{result['kl_to_teacher']:.4f}" if "kl_to_teacher" in result else "-")
        lines.append("  ".join([name.ljust(first), *(c.rjust(w) for c, w in zip(cells, widths))]))
    for key, name in (("retention", "student"), ("retention_distilled", "student_distilled")):
        if report.get(key) is not None:
            lines.append(f"retention ({name} / teacher): {100 * report[key]:.1f} %")
    return "\n".join(lines)


def show(report: dict) -> None:
    print(format_table(report))
    print(f"written to {report['path']} ({report['wall_s']:.0f} s)")


def cli(argv=None) -> int:
    return run_command(lambda: main(parse_args(argv)), show)

