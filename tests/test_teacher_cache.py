"""python -m fastdistil.cache_teacher and python -m fastdistil.train --teacher-cache, on tiny teachers (V = 320).

A cache made with k = V in fp32 holds the teacher's outputs exactly, so a run from it must be the online run: the
same batches, the teacher's own logits and hidden states for them, and the same losses step by step.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from fastdistil import train
from fastdistil.train import data, loop, teacher_cache
from helpers import FP32_LOSS_RTOL, TINY_POSITIONS, TINY_VOCAB
from training_runs import args, cache_args, cached_args, launch, make_cache, metrics_of

TIMEOUT_S = 300
TINY = ["--max-seq-len", str(TINY_POSITIONS), "--max-documents", "8"]
EXACT = ["--top-k", str(TINY_VOCAB), "--logits-dtype", "fp32", "--hidden-dtype", "fp32", "--shard-batches", "4"]
SMALL = ["--top-k", "8", "--shard-batches", "4"]
RUN = ["--max-steps", "3", "--grad-accum", "2", *TINY]
TERMS = ("loss", "loss_ce", "loss_cos", "grad_norm")


@pytest.fixture(scope="module")
def exact_caches(roberta_dir, gpt2_dir, corpus, tmp_path_factory):
    """A k = V, fp32 cache of each tiny teacher, made on first use."""
    made = {}

    def get(family):
        if family not in made:
            teacher = {"roberta": roberta_dir, "gpt2": gpt2_dir}[family]
            made[family] = tmp_path_factory.mktemp("cache") / family
            make_cache(teacher, corpus, made[family], *TINY, *EXACT)
        return made[family]

    return get


@pytest.fixture(scope="module")
def small_cache(roberta_dir, corpus, tmp_path_factory):
    """(the directory, the summary) of a k = 8 cache with the default dtypes."""
    out = tmp_path_factory.mktemp("cache") / "small"
    return out, make_cache(roberta_dir, corpus, out, *TINY, *SMALL)


def recorded_steps(monkeypatch) -> list:
    """(the micro-batch, the TeacherRows or None) of every train_step call of the runs that follow."""
    seen = []
    step = loop.train_step

    def record(student, teacher, batch, cfg, amp_dtype):
        seen.append(([t.clone() for t in batch], teacher if isinstance(teacher, teacher_cache.TeacherRows) else None))
        return step(student, teacher, batch, cfg, amp_dtype)

    monkeypatch.setattr(loop, "train_step", record)
    return seen


def test_a_run_from_the_cache_gets_the_online_batches_and_the_teacher_outputs_for_them(
        roberta_dir, corpus, exact_caches, tmp_path, monkeypatch):
    seen = recorded_steps(monkeypatch)
    train.main(train.parse_args(args(roberta_dir, corpus, tmp_path / "online", *RUN)))
    online = list(seen)
    seen.clear()
    train.main(train.parse_args(cached_args(exact_caches("roberta"), corpus, tmp_path / "cached", *RUN)))
    assert len(seen) == len(online) == 6
    teacher = AutoModelForMaskedLM.from_pretrained(roberta_dir).eval()
    for (batch, _), (cached_batch, rows) in zip(online, seen, strict=True):
        for a, b in zip(batch, cached_batch):
            assert torch.equal(a, b)
        ids, mask, labels = batch
        with torch.no_grad():
            out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        real = mask.bool()
        logits = out.logits[real]
        assert rows.topk_indices.dtype == torch.int16
        assert (rows.topk_logits[:, :-1] >= rows.topk_logits[:, 1:]).all()
        # k = V: the indices are a permutation of the vocabulary, and put back they give every logit.
        dense = torch.full_like(logits, float("nan")).scatter_(1, rows.topk_indices.long(), rows.topk_logits)
        torch.testing.assert_close(dense, logits)
        torch.testing.assert_close(rows.logsumexp, torch.stack([logits.logsumexp(-1), (logits / 2).logsumexp(-1)], -1))
        torch.testing.assert_close(rows.hidden, out.hidden_states[-1][real])


@pytest.fixture(scope="module")
def online_runs(roberta_dir, gpt2_dir, corpus, tmp_path_factory):
    """(the metrics, the summary) of an online run of each tiny teacher with the unfused reference loss."""
    made = {}

    def get(family):
        if family not in made:
            out = tmp_path_factory.mktemp("online") / family
            teacher = {"roberta": roberta_dir, "gpt2": gpt2_dir}[family]
            summary = train.main(train.parse_args(args(teacher, corpus, out, *RUN, "--loss", "reference")))
            made[family] = metrics_of(out), summary
        return made[family]

    return get


@pytest.mark.parametrize("family, loss, tail", [("roberta", "reference", "bucket"), ("roberta", "fused", "bucket"),
                                                ("roberta", "fused-logits", "renormalize"),
                                                ("gpt2", "fused", "bucket")])
def test_a_k_equal_v_cache_trains_exactly_as_the_online_run(request, corpus, exact_caches, online_runs, tmp_path,
                                                            family, loss, tail):
    """Each loss path from the cache against the online run with the recipe's unfused loss."""
    online_metrics, online = online_runs(family)
    cached = train.main(train.parse_args(cached_args(exact_caches(family), corpus, tmp_path, *RUN, "--loss", loss,
                                                     "--tail", tail)))
    lm = "loss_clm" if family == "gpt2" else "loss_mlm"
    for a, b in zip(metrics_of(tmp_path), online_metrics, strict=True):
        assert a["loss_mse"] == 0
        for key in (*TERMS, lm):
            assert a[key] == pytest.approx(b[key], rel=FP32_LOSS_RTOL, abs=FP32_LOSS_RTOL), (a["step"], key)
    lm = "clm" if family == "gpt2" else "mlm"
    for key in (f"teacher_heldout_{lm}_loss", f"student_heldout_{lm}_loss"):
        assert cached[key] == pytest.approx(online[key], rel=1e-5), key
    rows = cached["heldout_predicted_rows" if family == "gpt2" else "heldout_masked_rows"]
    assert abs(cached["student_teacher_top1_agreement"] - online["student_teacher_top1_agreement"]) <= 1 / rows
    assert (cached["teacher_params"], cached["top_k"]) == (online["teacher_params"], TINY_VOCAB)
    # evaluate finds the teacher the cache was made with in the run's config.json
    teacher = request.getfixturevalue(f"{family}_dir")
    assert json.loads((tmp_path / "config.json").read_text())["teacher"] == str(teacher)


def test_top_k_below_v_trains_against_the_bucket_or_the_renormalized_top_k(small_cache, corpus, tmp_path):
    cache, summary = small_cache
    # fp16 logits and hidden states, int16 indices, two fp32 log-sum-exps: 8 * 4 + 64 + 8 bytes, and the
    # shards' offsets, digests and headers
    assert 104 <= summary["bytes_per_token"] < 110
    losses = {}
    for tail in ("bucket", "renormalize"):
        train.main(train.parse_args(cached_args(cache, corpus, tmp_path / tail, *TINY, "--max-steps", "2",
                                                "--tail", tail)))
        losses[tail] = [m["loss_ce"] for m in metrics_of(tmp_path / tail)]
    # The renormalized KL also pulls the student's mass into the teacher's top-k: here a few % of it.
    assert all(0 < loss < 1e-3 for loss in losses["bucket"]) and all(5 < loss for loss in losses["renormalize"])


def test_a_batch_other_than_the_cached_one_stops_the_run(small_cache, corpus, tmp_path, monkeypatch, capsys):
    """Batches and masks drawn otherwise under the same flags (as another torch might draw them): each batch's
    digest tells."""
    rng = data.rng
    monkeypatch.setattr(data, "rng", lambda seed, *position: rng(seed + 1, *position))
    assert train.cli(cached_args(small_cache[0], corpus, tmp_path / "run", *TINY, "--max-steps", "1")) == 2
    assert "batch 0 of epoch 0 is not the batch the cache's teacher outputs were made for" in capsys.readouterr().err


def test_a_run_from_a_cache_resumes_bit_exactly(corpus, exact_caches, tmp_path):
    out = tmp_path / "run"
    flags = cached_args(exact_caches("roberta"), corpus, out, *TINY, "--max-steps", "4", "--save-every", "2",
                        "--grad-accum", "2")
    train.main(train.parse_args(flags))
    straight_metrics = metrics_of(out)
    straight = load_file(out / "student" / "model.safetensors")
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed after step 3
    shutil.rmtree(out / "student")
    train.main(train.parse_args([*flags, "--resume"]))
    for a, b in zip(metrics_of(out), straight_metrics, strict=True):
        assert {k: v for k, v in a.items() if k not in ("tokens_per_s", "memory_mb")} == {
            k: v for k, v in b.items() if k not in ("tokens_per_s", "memory_mb")}
    for name, tensor in load_file(out / "student" / "model.safetensors").items():
        assert torch.equal(tensor, straight[name]), name


def test_a_killed_cache_teacher_run_keeps_its_whole_shards_and_makes_the_same_cache(roberta_dir, corpus, small_cache,
                                                                                    tmp_path, monkeypatch):
    straight_dir, straight = small_cache
    write = teacher_cache.CacheWriter.write

    def killed_after_3(self, name, tensors, **details):
        if self.written == 3:
            (self.dir / teacher_cache.SHARDS_DIR / f".{name}.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        write(self, name, tensors, **details)

    monkeypatch.setattr(teacher_cache.CacheWriter, "write", killed_after_3)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        make_cache(roberta_dir, corpus, out, *TINY, *SMALL)
    monkeypatch.setattr(teacher_cache.CacheWriter, "write", write)
    assert not json.loads((out / teacher_cache.MANIFEST).read_text())["complete"]
    first = out / teacher_cache.SHARDS_DIR / teacher_cache.shard_name(0, 0)
    first.write_bytes(first.read_bytes()[:-10] + b"0123456789")  # and the disk damaged a finished one
    with pytest.warns(UserWarning, match=first.name):
        resumed = make_cache(roberta_dir, corpus, out, *TINY, *SMALL)
    assert resumed["shards_written"] == straight["shards_written"] - 2  # the 2 whole shards were kept
    manifests = [json.loads((d / teacher_cache.MANIFEST).read_text()) for d in (out, straight_dir)]
    assert manifests[0]["shards"] == manifests[1]["shards"] and manifests[0]["heldout"] == manifests[1]["heldout"]
    assert not (out / teacher_cache.PROGRESS_DIR).exists()


def test_a_cache_takes_another_student_and_more_epochs_without_running_the_teacher_again(roberta_dir, corpus,
                                                                                      small_cache, tmp_path):
    shutil.copytree(small_cache[0], tmp_path / "cache")
    first, flags = small_cache[1], (*TINY, *SMALL)
    again = make_cache(roberta_dir, corpus, tmp_path / "cache", *flags, "--student-layers", "1,3")
    assert again["shards_written"] == 0 and again["student"].endswith("teacher-layers-1-3")
    train.main(train.parse_args(cached_args(tmp_path / "cache", corpus, tmp_path / "run", *TINY, "--max-steps", "0",
                                            "--student-layers", "1,3")))
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "student")
    teacher = AutoModelForMaskedLM.from_pretrained(roberta_dir)
    assert torch.equal(student.roberta.encoder.layer[1].attention.self.query.weight,
                       teacher.roberta.encoder.layer[3].attention.self.query.weight)
    longer = make_cache(roberta_dir, corpus, tmp_path / "cache", *flags, "--epochs", "2")
    assert longer["shards_written"] == longer["shards"] - first["shards"] > 0  # epoch 1's; the others are kept


def test_torchrun_caches_and_trains_as_one_process_with_grad_accum_2(gpt2_dir, corpus, tmp_path):
    """2 CPU processes (gloo) write the cache, each its share of the shards, and train from it: the steps of 1
    process with --grad-accum 2 from a cache it made alone."""
    flags = (*TINY, "--top-k", "16", "--shard-batches", "4")
    make_cache(gpt2_dir, corpus, tmp_path / "cache-one", *flags)
    torchrun = ["--standalone", "--nproc-per-node", "2"]
    proc = launch(cache_args(gpt2_dir, corpus, tmp_path / "cache-two", *flags), torchrun=torchrun,
                  module="fastdistil.cache_teacher")
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    shards = [json.loads((tmp_path / d / teacher_cache.MANIFEST).read_text())["shards"] for d in ("cache-one",
                                                                                                 "cache-two")]
    assert [(s["name"], s["rows"]) for s in shards[0]] == [(s["name"], s["rows"]) for s in shards[1]]
    train.main(train.parse_args(cached_args(tmp_path / "cache-one", corpus, tmp_path / "one", *TINY, "--max-steps",
                                            "3", "--grad-accum", "2")))
    proc = launch(cached_args(tmp_path / "cache-two", corpus, tmp_path / "two", *TINY, "--max-steps", "3"),
                  torchrun=torchrun)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    for a, b in zip(metrics_of(tmp_path / "two"), metrics_of(tmp_path / "one"), strict=True):
        for key in (*TERMS, "loss_clm"):
            assert a[key] == pytest.approx(b[key], rel=FP32_LOSS_RTOL, abs=FP32_LOSS_RTOL), (a["step"], key)
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "student").state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "student").state_dict().items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
