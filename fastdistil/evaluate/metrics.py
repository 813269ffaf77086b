"""The evaluation metrics: GLUE's official ones, SQuAD's, and a task's score from them.

The metric functions take predictions and references as numpy arrays, lists or CPU tensors and return a float;
SQuAD's take answer strings and, for each question, the list of its gold answers. A task's score is the mean of
its metric values over its evaluation splits: accuracy and F1 for MRPC and QQP, Pearson and Spearman for STS-B,
matched and mismatched accuracy for MNLI, as the GLUE leaderboard averages them; exact match and F1 for SQuAD.
"""

import collections
import re
import string

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


# --- SQuAD: the official evaluation scripts' definitions (v1.1's normalization and token F1, v2.0's no-answer
# handling), as transformers' squad_metrics computes them for run_squad.py. Values are fractions, not percents.

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a, an and the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_exact(gold: str, prediction: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(prediction))


def answer_f1(gold: str, prediction: str) -> float:
    """F1 of the normalized answers' tokens (a bag: repeats count); an empty answer (v2's no-answer) scores 1
    against an empty one and 0 against anything else."""
    gold_tokens, predicted_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not predicted_tokens:
        return float(gold_tokens == predicted_tokens)
    same = sum((collections.Counter(gold_tokens) & collections.Counter(predicted_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold(answers: list[str]) -> list[str]:
    # Gold answers that normalize to nothing do not count; a question without any has the empty answer (v2).
    return [a for a in answers if normalize_answer(a)] or [""]


def _best_over_gold(score, predictions, references) -> float:
    """The mean over questions of the prediction's best score against any of the question's gold answers."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references must be as many, got {len(predictions)} and "
                         f"{len(references)}")
    best = [max(score(gold, prediction) for gold in _gold(answers))
            for prediction, answers in zip(predictions, references)]
    return float(np.mean(best)) if best else 0.0


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """SQuAD's exact match: the fraction of questions whose predicted answer equals a gold one, normalized."""
    return _best_over_gold(answer_exact, predictions, references)


def squad_f1(predictions: list[str], references: list[list[str]]) -> float:
    """SQuAD's F1: the mean over questions of the best token F1 against the question's gold answers."""
    return _best_over_gold(answer_f1, predictions, references)


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_corrcoef": matthews_corrcoef, "pearson": pearson,
           "spearman": spearman, "exact_match": exact_match, "squad_f1": squad_f1}


def compute(task: Task, predictions: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> dict:
    """{"metrics": {name: value}, "score": their mean} from each eval split's predictions and references.
    With several eval splits (MNLI), a metric's name gets the split's: "accuracy/validation_matched"."""
    values = {}
    for split in task.eval_splits:
        for metric in task.metrics:
            key = metric if len(task.eval_splits) == 1 else f"{metric}/{split}"
            values[key] = METRICS[metric](predictions[split], references[split])
    return {"metrics": values, "score": float(np.mean(list(values.values())))}
