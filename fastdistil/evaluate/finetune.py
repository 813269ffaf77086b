"""python -m fastdistil.evaluate: fine-tune a distillation run's teacher, its student and a random student of the
student's shape on a downstream task, and score all three.

    python -m fastdistil.evaluate RUN_DIR [--task wiki-topic | glue/<task> | imdb]   -> RUN_DIR/eval_<task>.json
    python -m fastdistil.evaluate --model DIR [--task ...]                            -> DIR/eval_<task>.json
    python -m fastdistil.evaluate RUN_DIR --task perplexity (a GPT-2 run's default)    -> perplexity.py

Each model gets a sequence-classification head and the same fine-tuning: hyperparameters, seed, batch order.
wiki-topic (the bundled sample's 12 topics, a fixed held-out split) works offline and without `datasets`; GLUE
and IMDb come through `datasets` and need a network or its cache. Read top to bottom: the config, the data, the
models, fine-tuning, prediction, the report.
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
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from fastdistil.commands import (atomic_write_text, check_choices, config_from, device_of, flag, parser_for,
                                 run_command)
from fastdistil.evaluate import metrics, perplexity, tasks
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


def parse_args(argv=None) -> EvalConfig:
    parser = parser_for(EvalConfig, "python -m fastdistil.evaluate", __doc__.split("\n\n")[0])
    return config_from(EvalConfig, vars(parser.parse_args(argv)))


def check_config(cfg: EvalConfig) -> None:
    """A ValueError naming the first bad setting."""
    if (cfg.run_dir is None) == (cfg.model is None):
        raise ValueError("give either RUN_DIR (a fastdistil.train run) or --model DIR (one checkpoint)")
    if cfg.task == perplexity.TASK and cfg.run_dir is None:
        raise ValueError(f"--task {perplexity.TASK} scores a run (RUN_DIR): its teacher, student and held-out split")
    if cfg.task != perplexity.TASK:
        tasks.get_task(cfg.task)
    for name in ("epochs", "batch_size", "max_seq_len", "max_train_examples", "max_eval_examples"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.warmup < 1:
        raise ValueError(f"--warmup must be in [0, 1), got {cfg.warmup}")
    check_choices(cfg)
    device_of(cfg.device)


# --- the data ---------------------------------------------------------------------------------------------

def _is_heldout(title: str) -> bool:
    # A hash of the title, not a seeded shuffle: the split is the same for every seed, corpus order and machine.
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


def load_splits(task: tasks.Task) -> tuple[dict[str, data.Table], list[str] | None]:
    """The task's splits as they come (wiki-topic: the bundled corpus, split by title), and the label names the
    dataset declares (a ClassLabel label column), if it does."""
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
                                                            int]:
    """(train, {eval split: table}, label names or None, number of labels): each table with the text columns
    and an integer (for regression, float) `label`."""
    splits, label_names = load_splits(task)
    names = [task.train_split, *task.eval_splits]
    for name in names:
        if name not in splits:
            raise ValueError(f"--task {task.name}: the dataset has no split {name!r} (splits: {list(splits)})")
        present = splits[name].column_names
        for column in (*task.text_columns, task.label_column):
            if column not in present:
                raise ValueError(f"--task {task.name}: split {name!r} has no column {column!r} "
                                 f"(columns: {present})")
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
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None  # each token's segment (pairs); None when the tokenizer gives none
    labels: torch.Tensor

    def batch(self, indices: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
        """The model inputs of these examples, padded to the longest of them."""
        ids, mask = data.collate([self.input_ids[i] for i in indices], pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask.long()}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = data.collate([self.token_type_ids[i] for i in indices], 0)[0]
        return {k: v.to(device) for k, v in inputs.items()}


def encode(split: data.Table, task: tasks.Task, tokenizer, max_seq_len: int) -> Encoded:
    texts = [split[c] for c in task.text_columns]
    encoded = tokenizer(*texts, truncation=True, max_length=max_seq_len)
    labels = torch.tensor(split["label"], dtype=torch.float32 if task.is_regression else torch.long)
    return Encoded(encoded["input_ids"], encoded.get("token_type_ids"), labels)


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


def _head_kwargs(task: tasks.Task, num_labels: int) -> dict:
    problem = "regression" if task.is_regression else "single_label_classification"
    return {"num_labels": num_labels, "problem_type": problem}


def pretrained_classifier(path: str, what: str, task: tasks.Task, num_labels: int) -> torch.nn.Module:
    """The checkpoint at `path` with a fresh sequence-classification head, in fp32 (the built-in teacher is
    stored in fp16)."""
    with _quiet_loading():
        try:
            return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                                      **_head_kwargs(task, num_labels))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{what} {path}: cannot load it as a sequence classifier "
                             f"({' '.join(str(exc).split())})") from exc


def random_classifier(config_dir: Path, task: tasks.Task, num_labels: int) -> torch.nn.Module:
    """A fresh fp32 model of the architecture and shape saved in config_dir: the distilled student without its
    distillation."""
    config = AutoConfig.from_pretrained(config_dir, **_head_kwargs(task, num_labels))
    return AutoModelForSequenceClassification.from_config(config).float()


def models_to_evaluate(cfg: EvalConfig) -> tuple[dict, Path]:
    """({name: (where it comes from, a function of (task, num_labels) building it)}, the tokenizer's directory).
    The models are built one at a time, each right after seeding, so that every head starts alike."""
    if cfg.model is not None:
        model_dir = Path(cfg.model)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"--model {model_dir}: no such directory")
        return {"model": (str(model_dir), lambda *head: pretrained_classifier(cfg.model, "--model", *head))
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
    return {
        "teacher": (teacher, lambda *head: pretrained_classifier(teacher, "the run's teacher", *head)),
        "student": (str(student_dir), lambda *head: pretrained_classifier(str(student_dir), "the run's student",
                                                                          *head)),
        "random_student": (f"random init of {student_dir / 'config.json'}",
                           lambda *head: random_classifier(student_dir, *head)),
    }, student_dir


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


def fine_tune(model: torch.nn.Module, train_set: Encoded, cfg: EvalConfig, pad_id: int, device, name: str) -> None:
    """AdamW with linear warm-up and decay over cfg.epochs passes; batches grouped by length (less padding),
    their order a function of the seed and the epoch only."""
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
            batch = _inputs_of(model, train_set.batch(indices, pad_id, device))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = model(**batch, labels=train_set.labels[indices].to(device)).loss
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
def predict(model: torch.nn.Module, examples: Encoded, cfg: EvalConfig, pad_id: int, device,
            regression: bool) -> np.ndarray:
    """The predicted class (or, for regression, value) of every example, in order."""
    model.eval()
    amp_dtype, _ = _amp(device)
    # Examples of similar length share a batch: less padding; the predictions go back to their places.
    order = sorted(range(len(examples.input_ids)), key=lambda i: len(examples.input_ids[i]))
    predictions = np.empty(len(order), dtype=np.float64 if regression else np.int64)
    for start in range(0, len(order), cfg.batch_size):
        indices = order[start:start + cfg.batch_size]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(**_inputs_of(model, examples.batch(indices, pad_id, device))).logits.float()
        predictions[indices] = (logits.squeeze(-1) if regression else logits.argmax(-1)).cpu().numpy()
    return predictions


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
    models, tokenizer_dir = models_to_evaluate(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    train_set, eval_sets, label_names, num_labels = task_data(task, cfg)
    out_path = Path(cfg.output) if cfg.output else (
        Path(cfg.model or cfg.run_dir) / f"eval_{task.name.replace('/', '-')}.json")

    train_encoded = encode(train_set, task, tokenizer, cfg.max_seq_len)
    eval_encoded = {name: encode(split, task, tokenizer, cfg.max_seq_len) for name, split in eval_sets.items()}
    references = {name: examples.labels.numpy() for name, examples in eval_encoded.items()}

    results = {}
    for name, (source, build) in models.items():
        began = time.time()
        torch.manual_seed(cfg.seed)  # each model's new weights and dropout: a function of the seed
        model = build(task, num_labels).to(device)
        fine_tune(model, train_encoded, cfg, tokenizer.pad_token_id, device, name)
        predictions = {split: predict(model, examples, cfg, tokenizer.pad_token_id, device, task.is_regression)
                       for split, examples in eval_encoded.items()}
        results[name] = {"source": source, "params": sum(p.numel() for p in model.parameters()),
                         **metrics.compute(task, predictions, references), "wall_s": time.time() - began}

    report = {name: result["score"] for name, result in results.items()}
    if "teacher" in results:
        report["retention"] = report["student"] / report["teacher"] if report["teacher"] else None
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
    """The models' metric values and scores, one row each, and the student's retention of the teacher's score."""
    models = report["models"]
    metric_names = list(next(iter(models.values()))["metrics"])
    columns = ["params", *metric_names, "score"]
    widths = [max(len(c), 8) for c in columns]
    first = max(len(report["task"]), *(len(name) for name in models))
    lines = ["  ".join([report["task"].ljust(first), *(c.rjust(w) for c, w in zip(columns, widths))])]
    for name, result in models.items():
        cells = [f"{result['params'] / 1e6:.2f}M", *(f"{result['metrics'][m]:.4f}" for m in metric_names),
                 f"{result['score']:.4f}"]
        lines.append("  ".join([name.ljust(first), *(c.rjust(w) for c, w in zip(cells, widths))]))
    if report.get("retention") is not None:
        lines.append(f"retention (student / teacher): {100 * report['retention']:.1f} %")
    return "\n".join(lines)


def show(report: dict) -> None:
    print(format_table(report))
    print(f"written to {report['path']} ({report['wall_s']:.0f} s)")


def cli(argv=None) -> int:
    return run_command(lambda: main(parse_args(argv)), show)

