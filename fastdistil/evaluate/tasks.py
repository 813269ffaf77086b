"""The downstream tasks python -m fastdistil.evaluate knows: the bundled wiki-topic task, IMDb, GLUE and SQuAD,
each with its dataset, columns, splits, metrics (named as in fastdistil.evaluate.metrics) and kind of head."""

from dataclasses import dataclass

CLASSIFICATION = "classification"  # a sequence-classification head: one row of logits per example
EXTRACTIVE_QA = "extractive_qa"  # a question-answering head: start and end logits over the tokens of a window

# Each kind's model outputs beside the targets they are trained on, in the order the distillation loss stacks them
# as rows: a QA window's start logits and its end logits are two rows, as the original's two KL terms.
OUTPUTS = {CLASSIFICATION: (("logits", "labels"),),
           EXTRACTIVE_QA: (("start_logits", "start_positions"), ("end_logits", "end_positions"))}


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str  # a Hugging Face dataset name, or "wiki-vital" for the bundled corpus
    config: str | None
    text_columns: tuple[str, ...]  # one text, or a pair the tokenizer joins with [SEP] (QA: question, context)
    label_column: str
    num_labels: int | None  # 1: regression; None: the distinct labels in the data (wiki-topic's topics; QA)
    train_split: str
    eval_splits: tuple[str, ...]
    metrics: tuple[str, ...]
    kind: str = CLASSIFICATION
    no_answer: bool = False  # QA: some questions have no answer in their context (SQuAD v2)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_qa(self) -> bool:
        return self.kind == EXTRACTIVE_QA

    @property
    def outputs(self) -> tuple[tuple[str, str], ...]:
        return OUTPUTS[self.kind]


def _glue(name, text_columns, num_labels, metrics, eval_splits=("validation",)) -> Task:
    # GLUE's test labels are hidden (-1), so its validation splits are the evaluation sets.
    return Task(f"glue/{name}", "nyu-mll/glue", name, text_columns, "label", num_labels, "train", eval_splits,
                metrics)


def _squad(name, dataset, no_answer) -> Task:
    # SQuAD's test set is hidden: its dev set (the hub's validation split) is the evaluation set, as in the paper.
    return Task(name, dataset, None, ("question", "context"), "answers", None, "train", ("validation",),
                ("exact_match", "squad_f1"), EXTRACTIVE_QA, no_answer)


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
    _squad("squad", "rajpurkar/squad", no_answer=False),
    _squad("squad_v2", "rajpurkar/squad_v2", no_answer=True),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(TASKS)}")
    return TASKS[name]
