"""The evaluation tasks and their metrics: GLUE's official ones, IMDb's and the bundled wiki-topic task's.

The metric functions take predictions and references as numpy arrays, lists or CPU tensors and return a float.
A task's score is the mean of its metric values over its evaluation splits: accuracy and F1 for MRPC and QQP,
Pearson and Spearman for STS-B, matched and mismatched accuracy for MNLI, as the GLUE leaderboard averages them.
"""

from dataclasses import dataclass

import numpy as np


def accuracy(predictions, references) -> float:
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float((predictions == references).mean())


def f1(predictions, references) -> float:
    """Binary F1 of the positive class (label 1); 0 when there is no positive prediction or reference."""
    predictions, references = np.asarray(predictions) == 1, np.asarray(references) == 1
    true_pos = int((predictions & references).sum())
    wrong = int((predictions != references).sum())
    return 2 * true_pos / (2 * true_pos + wrong) if true_pos else 0.0


def matthews_corrcoef(predictions, references) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K, as scikit-learn computes it);
    0 when either side is constant."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    classes, encoded = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    truth, predicted = encoded[:len(references)], encoded[len(references):]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (truth, predicted), 1)
    true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
    correct, total = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((total**2 - predicted_counts @ predicted_counts) * (total**2 - true_counts @ true_counts))
    if denominator == 0:
        return 0.0
    return float((correct * total - true_counts @ predicted_counts) / denominator)


def pearson(predictions, references) -> float:
    """Pearson's r; 0 when either side is constant (a constant prediction carries no correlation, and the
    score stays a number)."""
    x = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(references, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else 0.0


def _ranks(values) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (scipy.stats.rankdata's "average")."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    run_of = np.cumsum(starts_run) - 1
    starts = np.flatnonzero(starts_run)
    ends = np.append(starts[1:], len(values))
    ranks = np.empty(len(values))
    ranks[order] = ((starts + ends - 1) / 2 + 1)[run_of]
    return ranks


def spearman(predictions, references) -> float:
    """Spearman's rho: Pearson's r of the ranks."""
    return pearson(_ranks(predictions), _ranks(references))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_corrcoef": matthews_corrcoef, "pearson": pearson,
           "spearman": spearman}


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str  # a Hugging Face dataset name, or "wiki-vital" for the bundled corpus
    config: str | None
    text_columns: tuple[str, ...]  # one text, or a pair the tokenizer joins with [SEP]
    label_column: str
    num_labels: int | None  # 1: regression; None: the distinct labels in the data (wiki-topic's topics)
    train_split: str
    eval_splits: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


def _glue(name, text_columns, num_labels, metrics, eval_splits=("validation",)) -> Task:
    # GLUE's test labels are hidden (-1), so its validation splits are the evaluation sets.
    return Task(f"glue/{name}", "nyu-mll/glue", name, text_columns, "label", num_labels, "train", eval_splits,
                metrics)


TASKS = {task.name: task for task in (
    Task("wiki-topic", "wiki-vital", None, ("text",), "topic", None, "train", ("test",), ("accuracy",)),
    Task("imdb", "stanfordnlp/imdb", None, ("text",), "label", 2, "train", ("test",), ("accuracy",)),
    _glue("cola", ("sentence",), 2, ("matthews_corrcoef",)),
    _glue("sst2", ("sentence",), 2, ("accuracy",)),
    _glue("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    _glue("qqp", ("question1", "question2"), 2, ("accuracy", "f1")),
    _glue("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    _glue("mnli", ("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched")),
    _glue("qnli", ("question", "sentence"), 2, ("accuracy",)),
    _glue("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
    _glue("wnli", ("sentence1", "sentence2"), 2, ("accuracy",)),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(TASKS)}")
    return TASKS[name]


def compute(task: Task, predictions: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> dict:
    """{"metrics": {name: value}, "score": their mean} from each eval split's predictions and references.
    With several eval splits (MNLI), a metric's name gets the split's: "accuracy/validation_matched"."""
    values = {}
    for split in task.eval_splits:
        for metric in task.metrics:
            key = metric if len(task.eval_splits) == 1 else f"{metric}/{split}"
            values[key] = METRICS[metric](predictions[split], references[split])
    return {"metrics": values, "score": float(np.mean(list(values.values())))}
