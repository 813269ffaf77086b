"""The evaluation metrics: GLUE's official ones, and a task's score from them.

The metric functions take predictions and references as numpy arrays, lists or CPU tensors and return a float.
A task's score is the mean of its metric values over its evaluation splits: accuracy and F1 for MRPC and QQP,
Pearson and Spearman for STS-B, matched and mismatched accuracy for MNLI, as the GLUE leaderboard averages them.
"""

import numpy as np

from fastdistil.evaluate.tasks import Task


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


def compute(task: Task, predictions: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> dict:
    """{"metrics": {name: value}, "score": their mean} from each eval split's predictions and references.
    With several eval splits (MNLI), a metric's name gets the split's: "accuracy/validation_matched"."""
    values = {}
    for split in task.eval_splits:
        for metric in task.metrics:
            key = metric if len(task.eval_splits) == 1 else f"{metric}/{split}"
            values[key] = METRICS[metric](predictions[split], references[split])
    return {"metrics": values, "score": float(np.mean(list(values.values())))}
