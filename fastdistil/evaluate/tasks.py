"""The downstream tasks python -m fastdistil.evaluate knows: the bundled wiki-topic task, IMDb and GLUE, each
with its dataset, columns, splits and metrics (named as in fastdistil.evaluate.metrics)."""

from dataclasses import dataclass


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
