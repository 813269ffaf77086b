"""python -m fastdistil.evaluate end to end on a tiny run: tiny models, tiny splits, one epoch."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdistil import train
from fastdistil.evaluate import finetune as evaluate
from fastdistil.evaluate import tasks
from training_runs import args

TINY = ["--max-train-examples", "64", "--max-eval-examples", "32", "--epochs", "1", "--batch-size", "16",
        "--max-seq-len", "32"]


@pytest.fixture(scope="module")
def run_dir(teacher_dir, corpus, tmp_path_factory):
    """A finished fastdistil.train run of one step: config.json and student/."""
    out = tmp_path_factory.mktemp("eval") / "run"
    train.main(train.parse_args(args(teacher_dir, corpus, out, "--max-steps", "1")))
    return out


def evaluate_(*argv):
    return evaluate.main(evaluate.parse_args([str(a) for a in argv]))


def test_a_run_is_scored_for_teacher_student_and_random_student(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert evaluate.cli([str(run), *TINY]) == 0
    output = run / "eval_wiki-topic.json"
    assert not list(run.glob("*.tmp"))  # written whole, then renamed into place
    written = json.loads(output.read_text())
    for name in ("teacher", "student", "random_student"):
        assert 0 <= written[name] <= 1
        assert written[name] == written["models"][name]["score"] == written["models"][name]["metrics"]["accuracy"]
    assert written["retention"] == pytest.approx(written["student"] / written["teacher"])
    models = written["models"]
    assert models["student"]["params"] == models["random_student"]["params"] < models["teacher"]["params"]
    assert models["teacher"]["source"] == json.loads((run / "config.json").read_text())["teacher"]
    assert written["train_examples"] == 64 and written["eval_examples"] == {"test": 32}
    assert written["labels"] == sorted(written["labels"]) and len(written["labels"]) == 12
    assert written["hyperparameters"]["epochs"] == 1 and written["hyperparameters"]["lr"] == evaluate.EvalConfig.lr
    assert written["task"] == "wiki-topic" and written["wall_s"] > 0
    table = capsys.readouterr().out
    for name in ("teacher", "student", "random_student"):
        assert f"{written[name]:.4f}" in table
    assert f"retention (student / teacher): {100 * written['retention']:.1f} %" in table


def test_an_evaluation_is_a_function_of_its_seed(run_dir, tmp_path):
    first = evaluate_(run_dir, *TINY, "--output", tmp_path / "a.json")
    second = evaluate_(run_dir, *TINY, "--output", tmp_path / "b.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {k: v for k, v in first.items() if k != "path"}
    for name in ("teacher", "student", "random_student"):
        assert first["models"][name]["metrics"] == second["models"][name]["metrics"]


def test_one_checkpoint_with_model(run_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(run_dir / "student", model_dir)
    evaluate_("--model", model_dir, *TINY)
    report = json.loads((model_dir / "eval_wiki-topic.json").read_text())
    assert set(report["models"]) == {"model"} and "retention" not in report
    assert report["model"] == report["models"]["model"]["score"]
    # The same checkpoint, hyperparameters and seed as the run's student: the same score.
    run_report = evaluate_(run_dir, *TINY, "--output", tmp_path / "run.json")
    assert report["models"]["model"]["metrics"] == run_report["models"]["student"]["metrics"]


def test_the_wiki_topic_split_is_fixed_and_covers_every_topic():
    task = tasks.get_task("wiki-topic")
    splits, label_names = evaluate.load_splits(task)
    assert label_names is None  # the topics are strings: task_data numbers them
    train_titles, test_titles = set(splits["train"]["title"]), set(splits["test"]["title"])
    assert not train_titles & test_titles
    assert len(train_titles) + len(test_titles) == 10_033
    assert 0.18 < len(test_titles) / 10_033 < 0.22
    assert set(splits["train"]["topic"]) == set(splits["test"]["topic"])
    assert len(set(splits["test"]["topic"])) == 12
    assert evaluate.load_splits(task)[0]["test"]["title"] == splits["test"]["title"]


def test_the_wiki_topic_data_is_what_datasets_gave(tmp_path):
    # Earlier versions read the corpus and drew the --max-*-examples subsets through datasets: the same rows,
    # labels and subsets keep scores comparable.
    datasets = pytest.importorskip("datasets")
    task = tasks.get_task("wiki-topic")
    cfg = evaluate.EvalConfig(run_dir="unused", max_train_examples=64, max_eval_examples=32)
    train_set, eval_sets, label_names, num_labels = evaluate.task_data(task, cfg)
    corpus = datasets.load_dataset("json", data_files=str(evaluate.data.BUNDLED_CORPUS), split="train",
                                   cache_dir=str(tmp_path))
    heldout = np.array([evaluate._is_heldout(title) for title in corpus["title"]])
    expected = {"train": corpus.select(np.flatnonzero(~heldout)).shuffle(seed=evaluate.SUBSET_SEED).select(range(64)),
                "test": corpus.select(np.flatnonzero(heldout)).shuffle(seed=evaluate.SUBSET_SEED).select(range(32))}
    assert label_names == sorted(set(corpus["topic"])) and num_labels == 12
    for got, want in ((train_set, expected["train"]), (eval_sets["test"], expected["test"])):
        assert got["text"] == list(want["text"])
        assert got["label"] == [label_names.index(topic) for topic in want["topic"]]


def fake_glue(task: tasks.Task, n: int = 24, drop: str | None = None):
    """A tiny in-memory stand-in for a GLUE task's DatasetDict: its columns, splits and label type."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran across green fields under grey skies".split()
    if task.is_regression:
        label = datasets.Value("float32")
    else:
        label = datasets.ClassLabel(num_classes=task.num_labels)

    def split():
        rows = {c: [" ".join(rng.choice(words, 8)) for _ in range(n)] for c in task.text_columns}
        rows["label"] = (rng.integers(0, 26, n) / 5).tolist() if task.is_regression else \
            rng.integers(0, task.num_labels, n).tolist()
        rows["idx"] = list(range(n))
        features = datasets.Features({**{c: datasets.Value("string") for c in task.text_columns}, "label": label,
                                      "idx": datasets.Value("int32")})
        return datasets.Dataset.from_dict({k: v for k, v in rows.items() if k != drop},
                                          features=datasets.Features({k: v for k, v in features.items()
                                                                      if k != drop}))

    return datasets.DatasetDict({name: split() for name in ("train", "test", *task.eval_splits)})


@pytest.mark.parametrize("name", ["glue/mrpc", "glue/stsb", "glue/mnli"])
def test_glue_tasks_through_datasets(run_dir, tmp_path, monkeypatch, name):
    datasets = pytest.importorskip("datasets")
    task = tasks.get_task(name)
    calls = []

    def load_dataset(*a, **kw):
        calls.append(a)
        return fake_glue(task)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    report = evaluate_(run, "--task", name, *TINY)
    assert calls == [("nyu-mll/glue", name.split("/")[1])]
    written = json.loads((run / f"eval_{name.replace('/', '-')}.json").read_text())
    expected_keys = {"glue/mrpc": {"accuracy", "f1"}, "glue/stsb": {"pearson", "spearman"},
                     "glue/mnli": {"accuracy/validation_matched", "accuracy/validation_mismatched"}}[name]
    for model in ("teacher", "student", "random_student"):
        values = written["models"][model]["metrics"]
        assert set(values) == expected_keys
        assert written[model] == pytest.approx(np.mean(list(values.values())))
        assert all(-1 <= v <= 1 for v in values.values())
    assert written["eval_examples"] == {split: 24 for split in task.eval_splits}
    assert report["labels"] == (None if task.is_regression else [str(i) for i in range(task.num_labels)])


@pytest.mark.parametrize("drop", ["label", "sentence2"])
def test_a_missing_column_is_named_with_those_present(run_dir, monkeypatch, drop):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: fake_glue(tasks.get_task("glue/rte"),
                                                                             drop=drop))
    with pytest.raises(ValueError, match=rf"glue/rte: split 'train' has no column '{drop}' \(columns: \[.*'idx'"):
        evaluate_(run_dir, "--task", "glue/rte", *TINY)


def test_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys):
    no_config = tmp_path / "no_config"
    shutil.copytree(run_dir / "student", no_config / "student")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run_dir / "student" / name, no_tokenizer)
    no_student = tmp_path / "no_student"
    no_student.mkdir()
    shutil.copy(run_dir / "config.json", no_student)
    cases = {
        (str(run_dir), "--task", "glue/nope"): r"unknown task 'glue/nope'; the tasks are: wiki-topic, imdb, glue/cola",
        (str(tmp_path / "missing"),): r"run directory .*missing does not exist",
        (str(no_config),): r"no_config has no config.json: not a fastdistil.train run directory",
        (str(no_student),): r"no_student has no student/ model",
        ("--model", str(tmp_path / "missing")): r"--model .*missing: no such directory",
        ("--model", str(no_tokenizer), *TINY): r"no_tokenizer: no tokenizer \(tokenizer_config.json\)",
        (): r"give either RUN_DIR .* or --model DIR",
        (str(run_dir), "--model", str(run_dir / "student")): r"give either RUN_DIR .* or --model DIR",
        (str(run_dir), "--epochs", "0"): r"--epochs must be > 0, got 0",
    }
    assert_one_line_errors(cases, capsys)
    assert not list(run_dir.glob("eval_*.json.tmp"))


def assert_one_line_errors(cases: dict, capsys) -> None:
    """Each command line of cases exits 2 after one line, "error: ..." matching its pattern."""
    for argv, message in cases.items():
        assert evaluate.cli(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert re.search(message, err), (argv, err)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
@pytest.mark.parametrize("native", [False, True])
def test_bf16_only_where_the_gpu_computes_in_it(monkeypatch, native):
    # A V100 (sm70) has no bf16 arithmetic; torch.cuda.is_bf16_supported() counts emulation and says yes.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or including_emulation)
    dtype, _ = evaluate._amp(torch.device("cuda"))
    assert dtype == (torch.bfloat16 if native else torch.float16)


WITHOUT_DATASETS = """
import json, runpy, sys
sys.modules["datasets"] = None  # what `import datasets` sees where it is not installed
argvs = json.loads(sys.argv[1])
sys.argv = ["fastdistil.evaluate", "--help"]
try:
    runpy.run_module("fastdistil.evaluate", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    help_status = exit.code
from fastdistil.evaluate import finetune as evaluate
statuses = [evaluate.cli(argv) for argv in argvs]
print(json.dumps([help_status, *statuses]))
"""


def test_evaluate_runs_wiki_topic_without_the_datasets_package(run_dir, tmp_path):
    model = [f"--model={run_dir / 'student'}", *TINY]
    argvs = [[*model, "--task", "glue/rte"], [*model, "--output", str(tmp_path / "no_datasets.json")]]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_DATASETS, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert json.loads(lines[-1]) == [0, 2, 0]
    assert "usage: python -m fastdistil.evaluate" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [("error: --task glue/rte: loading nyu-mll/glue from the Hugging Face hub needs the "
                       "`datasets` package (pip install datasets)")]
    # The same checkpoint, hyperparameters and seed as in this process: the same score.
    here = evaluate_(*model, "--output", tmp_path / "here.json")
    there = json.loads((tmp_path / "no_datasets.json").read_text())
    assert there["models"]["model"]["metrics"] == here["models"]["model"]["metrics"]
    assert there["train_examples"] == here["train_examples"] and there["labels"] == here["labels"]
