"""scripts/gpu_check.sh --dry-run: every step of the GPU check, run on this CPU machine, so that a renamed test,
benchmark or flag breaks here rather than in the few minutes a GPU machine is lent."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("machine", "install", "imports", "env", "cuda-tests", "benchmarks", "train-step-benchmark", "train",
         "report")
# What the real run hands back: at most 8 files, no folders (what the GPU machine's tool returns).
OUTPUTS = ("log.txt", "steps.tsv", "cuda-tests.xml", "gpu.json", "train_step_gpu.json", "train-summary.json",
           "REPORT.md")


def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script must set what it needs itself
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    with open(out / "steps.tsv") as f:
        steps = {row["step"]: row["status"] for row in csv.DictReader(f, delimiter="\t")}
    assert tuple(steps) == STEPS, log[-3000:]
    failed = {name: status for name, status in steps.items() if status != "ok"}
    assert not failed and proc.returncode == 0, f"{failed}\n{log[-6000:]}"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert all(p.is_file() for p in out.iterdir())

    tests = (out / "cuda-tests.xml").read_text()
    assert 'tests="0"' not in tests  # the cuda marker still selects tests (they skip without a GPU)
    assert "cpu:" in (out / "log.txt").read_text()  # python -m fastdistil.env's report
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["summary"]["steps"] == 2 and summary["config"]["attention"] == "fastdistil"
    assert summary["config"]["precision"] == "bf16"
    for name in ("gpu.json", "train_step_gpu.json"):
        benchmarks = json.loads((out / name).read_text())["benchmarks"]
        assert benchmarks, f"{name} holds no benchmark"
    assert "dry run" in (out / "REPORT.md").read_text().lower()
