"""The built-in default run trained online and from teacher caches of k = 8, 32 and 128 (issue 18): what the cache
costs (bytes per token, the time to make it) and what its top-k truncation costs the student (held-out top-1
agreement with the teacher, the student's held-out MLM loss, wiki-topic retention after fine-tuning).

Each case runs the commands a user runs, with their defaults:
  online   python -m fastdistil.train --output-dir WORK/online
  kK       python -m fastdistil.cache_teacher --top-k K --output-dir WORK/cacheK   (its printed summary kept in
           WORK/cacheK.json), then python -m fastdistil.train --teacher-cache WORK/cacheK --output-dir WORK/runK
and then python -m fastdistil.evaluate RUN --task wiki-topic. The held-out metrics are the runs' summary.json:
the same held-out split and teacher for all, a cache's from its stored teacher log-probabilities and top-1s.

    python -m pytest bench/test_bench_teacher_cache.py --benchmark-json bench/results/teacher_cache.json
    python -m bench.report     # its section, after the training step's, in bench/results/REPORT.md

The timed round of a case is its training run (the cache's own time is recorded beside it). It took about 40
minutes on two cores, most of it the four wiki-topic evaluations (~5 min each: each fine-tunes the teacher, the
student and a random-init student) and the three caches (a full epoch of the default data, 1,510 batches, ~4 min
each). FASTDISTIL_BENCH_WORK=DIR keeps the runs in DIR and reuses what an earlier run left there (a command's
output is reused once it is complete: summary.json, the cache's summary, eval_wiki-topic.json).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.machine import CpuContention, load_average
from fastdistil.cache_teacher.command import DEFAULT_TOP_K

CASES = {"online": None, "k8": 8, "k32": 32, "k128": 128}
TASK = "wiki-topic"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    if "FASTDISTIL_BENCH_WORK" in os.environ:
        path = Path(os.environ["FASTDISTIL_BENCH_WORK"])
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("teacher-cache-bench")


def command(*args: str) -> str:
    """Runs `python -m ARGS`, failing the case with its error output; returns its standard output."""
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"python -m {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def made_cache(work: Path, k: int) -> dict:
    """cache_teacher's summary of the cache of top-k (made unless an earlier run left it)."""
    summary = work / f"cache{k}.json"
    if not summary.is_file():
        out = command("fastdistil.cache_teacher", "--top-k", str(k), "--output-dir", str(work / f"cache{k}"))
        summary.write_text(out)  # its standard output is the summary's JSON alone (progress goes to stderr)
    return json.loads(summary.read_text())


def trained(work: Path, case: str) -> Path:
    run = work / ("online" if CASES[case] is None else f"run{CASES[case]}")
    if not (run / "summary.json").is_file():
        cache = [] if CASES[case] is None else ["--teacher-cache", str(work / f"cache{CASES[case]}")]
        command("fastdistil.train", *cache, "--output-dir", str(run), "--overwrite")
    return run


def evaluated(run: Path) -> dict:
    out = run / f"eval_{TASK}.json"
    if not out.is_file():
        command("fastdistil.evaluate", str(run), "--task", TASK)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_teacher_cache(benchmark, work, case):
    cache = made_cache(work, CASES[case]) if CASES[case] else None
    benchmark.group = "teacher cache: default run"
    with CpuContention() as contention:
        run = benchmark.pedantic(trained, args=(work, case), rounds=1, iterations=1)
    summary = json.loads((run / "summary.json").read_text())
    scores = evaluated(run)
    benchmark.extra_info.update(
        case=case, top_k=CASES[case], default_top_k=DEFAULT_TOP_K, tail=None if cache is None else "bucket",
        cache_bytes_per_token=cache and cache["bytes_per_token"], cache_bytes=cache and cache["bytes"],
        cache_tokens=cache and cache["tokens"], cache_wall_s=cache and cache["wall_s"],
        train_wall_s=summary["wall_s"], train_tokens_per_s=summary["train_tokens_per_s"], steps=summary["steps"],
        teacher_heldout_mlm_loss=summary["teacher_heldout_mlm_loss"],
        student_heldout_mlm_loss=summary["student_heldout_mlm_loss"],
        agreement=summary["student_teacher_top1_agreement"], heldout_masked_rows=summary["heldout_masked_rows"],
        task=TASK, task_teacher=scores["teacher"], task_student=scores["student"],
        task_random_student=scores["random_student"], retention=scores["retention"],
        other_cpu_fraction=contention.other_fraction, load_average=load_average())
