"""torchrun with 2 CPU processes (gloo) computes the same steps as 1 process accumulating 2 micro-batches."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fastdistil import train
from helpers import TINY_POSITIONS
from training_runs import args, launch, metrics_of

TIMEOUT_S = 300


@pytest.mark.parametrize("family, weighting", [("bert", []), ("bert", ["--token-weighted"]), ("gpt2", [])],
                         ids=["mean", "token-weighted", "gpt2"])
def test_two_processes_equal_one_process_with_grad_accum_2(request, corpus, tmp_path, family, weighting):
    teacher_dir = request.getfixturevalue("teacher_dir" if family == "bert" else "gpt2_dir")
    # The tiny GPT-2 teacher's positions end at TINY_POSITIONS.
    weighting = [*weighting, "--max-seq-len", str(TINY_POSITIONS)] if family == "gpt2" else weighting
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(train.parse_args(args(teacher_dir, corpus, one, "--max-steps", "3", "--grad-accum", "2", *weighting)))
    proc = launch(args(teacher_dir, corpus, two, "--max-steps", "3", "--grad-accum", "1", *weighting),
                  torchrun=["--standalone", "--nproc-per-node", "2"])
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["world_size"], summary["effective_batch"]) == (2, 8)
    for a, b in zip(metrics_of(two), metrics_of(one), strict=True):
        for key in ("loss", "loss_ce", "loss_clm" if family == "gpt2" else "loss_mlm", "loss_cos", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    weights_two = load_file(two / "student" / "model.safetensors")
    for name, tensor in load_file(one / "student" / "model.safetensors").items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_token_weighting_changes_the_loss_when_batches_differ_in_length(teacher_dir, corpus, tmp_path):
    losses = {}
    for name, extra in (("mean", []), ("weighted", ["--token-weighted"])):
        train.main(train.parse_args(args(teacher_dir, corpus, tmp_path / name, "--max-steps", "3",
                                         "--grad-accum", "2", *extra)))
        losses[name] = [m["loss"] for m in metrics_of(tmp_path / name)]
    assert losses["mean"] != pytest.approx(losses["weighted"], rel=1e-7)


def test_on_cuda_the_cpu_statistics_get_a_backend_of_their_own(monkeypatch):
    """Each step all-reduces its statistics as a CPU tensor, which NCCL alone cannot do: under torchrun on GPUs
    the process group must give CPU tensors gloo (the run would otherwise fail at its first step's reduction)."""
    from fastdistil.train import distributed

    joined = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: joined.setdefault("device", index))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: joined.setdefault("backend", backend))
    procs = distributed.init("cuda")
    assert (procs.rank, procs.world_size, procs.local_rank, joined["device"]) == (1, 2, 1, 1)
    assert set(joined["backend"].split(",")) == {"cuda:nccl", "cpu:gloo"}
