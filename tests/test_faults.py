"""A run survives what happens to long jobs: SIGTERM, SIGKILL mid-checkpoint, NaN losses, a crash under torchrun.

Each test compares weights or losses with an uninterrupted run of the same flags, not only exit codes.
"""

import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdistil import train
from fastdistil.train import checkpoint
from training_runs import args, launch, metrics_of

STEPS = 30
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def straight(teacher_dir, corpus, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce: its losses and its exported weights."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train.main(train.parse_args(args(teacher_dir, corpus, out, "--max-steps", str(STEPS))))
    return metrics_of(out), load_file(out / "student" / "model.safetensors")


def wait_for(condition, proc, what):
    deadline = time.time() + TIMEOUT_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_same_run(out, straight):
    """Losses and final weights equal the uninterrupted run's (same machine, same threads: bit-identical
    up to the summation order a different thread count may bring)."""
    losses, weights = straight
    got = metrics_of(out)
    assert [m["step"] for m in got] == [m["step"] for m in losses]
    for a, b in zip(got, losses):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
    resumed = load_file(out / "student" / "model.safetensors")
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def test_sigterm_finishes_the_step_checkpoints_and_the_run_resumes_exactly(teacher_dir, corpus, tmp_path,
                                                                          straight):
    out = tmp_path / "run"
    flags = args(teacher_dir, corpus, out, "--max-steps", str(STEPS))
    proc = launch(flags)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics_of(out)) >= 3, proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT_S) == 0
    saved = checkpoint.checkpoints(out / "checkpoints")
    assert len(saved) == 1 and not (out / "student").exists()
    stopped_at = checkpoint.load(saved[0])["progress"]["step"]
    assert 3 <= stopped_at < STEPS and metrics_of(out)[-1]["step"] == stopped_at
    train.main(train.parse_args([*flags, "--resume"]))
    assert_same_run(out, straight)


def test_sigkill_at_any_moment_leaves_a_whole_checkpoint_to_resume_from(teacher_dir, corpus, tmp_path, straight):
    out = tmp_path / "run"
    flags = args(teacher_dir, corpus, out, "--max-steps", str(STEPS), "--save-every", "1", "--keep-last", "2")
    proc = launch(flags)
    wait_for(lambda: len(checkpoint.checkpoints(out / "checkpoints")) >= 2, proc, "two checkpoints")
    time.sleep(0.3)  # saving every step: the kill lands inside a save as often as not
    proc.send_signal(signal.SIGKILL)
    proc.wait(TIMEOUT_S)
    latest = checkpoint.checkpoints(out / "checkpoints")[-1]
    assert checkpoint.verify(latest) is None
    train.main(train.parse_args([*flags, "--resume"]))
    assert_same_run(out, straight)


def test_a_half_written_checkpoint_is_ignored(teacher_dir, corpus, tmp_path):
    out = tmp_path / "run"
    flags = args(teacher_dir, corpus, out, "--max-steps", "4", "--save-every", "2")
    train.main(train.parse_args(flags))
    shutil_state = out / "checkpoints" / "step-00000004" / "state.pt"
    shutil_state.write_bytes(b"\0" * 100)  # as if the disk lost the tail of the newest checkpoint
    leftover = out / "checkpoints" / ".step-00000006.tmp"
    leftover.mkdir()
    (leftover / "state.pt").write_bytes(b"partial")  # what a kill during a write leaves
    with pytest.warns(UserWarning, match="damaged"):
        path, state = checkpoint.load_latest(out / "checkpoints")
    assert path.name == "step-00000002" and state["progress"]["step"] == 2


def untied_teacher_with_nan_embedding(teacher_dir, tmp_path, token_id):
    """The teacher with a NaN input embedding for `token_id` and an untied, clean output projection: the loss
    is NaN exactly for batches that hold that token."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    teacher = AutoModelForMaskedLM.from_pretrained(teacher_dir)
    teacher.config.tie_word_embeddings = False
    decoder = teacher.cls.predictions.decoder
    decoder.weight = torch.nn.Parameter(decoder.weight.detach().clone())
    decoder.bias = torch.nn.Parameter(decoder.bias.detach().clone())
    with torch.no_grad():
        teacher.bert.embeddings.word_embeddings.weight[token_id] = float("nan")
    path = tmp_path / "poisoned"
    teacher.save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(path)
    return path


def test_a_nan_loss_skips_the_step_and_the_run_goes_on(teacher_dir, corpus, tmp_path):
    from transformers import AutoTokenizer

    documents = Path(corpus).read_text().splitlines()
    documents[39] = "xylophone " * 20 + documents[39]  # more xylophones than masking could hide
    poisoned_corpus = tmp_path / "docs.txt"
    poisoned_corpus.write_text("\n".join(documents))
    xylophone = AutoTokenizer.from_pretrained(teacher_dir).convert_tokens_to_ids("xylophone")
    teacher = untied_teacher_with_nan_embedding(teacher_dir, tmp_path, xylophone)
    out = tmp_path / "run"
    # A random student: the teacher's embeddings, NaN row included, stay out of it.
    summary = train.main(train.parse_args(args(teacher, poisoned_corpus, out, "--max-steps", "80",
                                               "--student-init", "random", "--heldout-fraction", "0.01")))
    nan_steps = [m["step"] for m in metrics_of(out) if not math.isfinite(m["loss"])]
    assert summary["skipped_steps"] == len(nan_steps) == 1
    weights = load_file(out / "student" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_consecutive_bad_steps_stop_the_run_and_keep_the_last_good_state(teacher_dir, corpus, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from fastdistil.train.student import make_student

    teacher = AutoModelForMaskedLM.from_pretrained(teacher_dir)
    with torch.no_grad():  # layer 3 is not copied into the student: only the teacher's outputs turn NaN
        teacher.bert.encoder.layer[3].output.dense.weight.fill_(float("nan"))
    poisoned = tmp_path / "poisoned"
    teacher.save_pretrained(poisoned)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(poisoned)
    out = tmp_path / "run"
    assert train.cli(args(poisoned, corpus, out, "--max-steps", "20", "--max-bad-steps", "2")) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "3 consecutive steps had a NaN or inf loss" in err and "--max-bad-steps 2" in err
    (kept,) = checkpoint.checkpoints(out / "checkpoints")
    state = checkpoint.load(kept)
    assert state["progress"]["step"] == 3 and state["progress"]["skipped_steps"] == 3
    initial = make_student(teacher).state_dict()
    for name, tensor in state["student"].items():  # never updated: every step was skipped
        assert torch.equal(tensor, initial[name]), name


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker through /proc")
def test_torchrun_restarts_a_crashed_job_from_its_last_checkpoint(teacher_dir, corpus, tmp_path, straight):
    out = tmp_path / "run"
    flags = args(teacher_dir, corpus, out, "--max-steps", str(STEPS), "--save-every", "2")
    proc = launch(flags, torchrun=["--standalone", "--nproc-per-node", "1", "--max-restarts", "1"])
    wait_for(lambda: len(checkpoint.checkpoints(out / "checkpoints")) >= 2, proc, "two checkpoints")
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(workers[0]), signal.SIGKILL)  # a crash: no cleanup, no final checkpoint
    assert proc.wait(TIMEOUT_S) == 0, proc.stderr.read()[-3000:]
    assert_same_run(out, straight)
