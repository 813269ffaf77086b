"""Bad input: an error naming the argument from the Python API and the raw ops, and no half-written output; a
teacher cache that does not fit its run, or is damaged, refused in one line before anything is written."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastdistil
from fastdistil import _C, cache_teacher, train
from fastdistil.train import teacher_cache
from helpers import TENSORS, TINY_POSITIONS, make_inputs, map_tensors
from training_runs import cache_args, cached_args, make_cache

VOCAB = 11


def with_label(value):
    def mutate(labels):
        labels = labels.clone()
        labels[0, 1] = value
        return labels
    return mutate


# (id, argument, how to break it, exception from the Python API and the public op's composite). The private
# ops raise RuntimeError (the C++ kernel's TORCH_CHECK), and so does the public op for label values, which only
# the kernel reads (a branch on values cannot be traced).
TENSOR_CASES = [
    ("teacher-rows", "teacher_logits", lambda x: x[:1], ValueError),
    ("teacher-vocab", "teacher_logits", lambda x: x[..., :-1], ValueError),
    ("student-vocab", "teacher_logits", None, ValueError),  # student one wider than the teacher
    ("empty-vocab", "student_logits", lambda x: x[..., :0], ValueError),
    ("0-dim-logits", "student_logits", lambda x: x[0, 0, 0], ValueError),
    ("int-logits", "student_logits", lambda x: x.long(), TypeError),
    ("float64-logits", "student_logits", lambda x: x.double(), TypeError),
    ("int-teacher", "teacher_logits", lambda x: x.int(), TypeError),
    ("labels-shape", "labels", lambda x: x[:, :-1], ValueError),
    ("labels-flat", "labels", lambda x: x.reshape(-1), ValueError),
    ("labels-int32", "labels", lambda x: x.int(), TypeError),
    ("labels-float", "labels", lambda x: x.float(), TypeError),
    ("label-V", "labels", with_label(VOCAB), ValueError),
    ("label-minus-1", "labels", with_label(-1), ValueError),
    ("label-minus-5", "labels", with_label(-5), ValueError),
    ("label-2^40", "labels", with_label(2**40), ValueError),
    ("mask-shape", "attention_mask", lambda x: x[:, :-1], ValueError),
    ("mask-float", "attention_mask", lambda x: x.float(), TypeError),
    ("hidden-rows", "student_hidden", lambda x: x[:1], ValueError),
    ("empty-hidden", "student_hidden", lambda x: x[..., :0], ValueError),
    ("teacher-hidden-dim", "teacher_hidden", lambda x: torch.cat([x, x[..., :1]], -1), ValueError),
    ("float64-hidden", "student_hidden", lambda x: x.double(), TypeError),
    ("int-teacher-hidden", "teacher_hidden", lambda x: x.long(), TypeError),
] + [(f"{name}-on-meta", name, lambda x: x.to("meta"), ValueError) for name in TENSORS]

SCALAR_CASES = [
    ("temperature", 0.0), ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")),
    ("alpha_ce", -1.0), ("alpha_mlm", -1e-3), ("alpha_cos", float("nan")), ("alpha_ce", float("inf")),
    ("alpha_mse", -1.0), ("alpha_mse", float("nan")), ("alpha_mse", float("inf")),
]


def valid_inputs():
    return map_tensors(torch.Tensor.detach, make_inputs((2, 5), VOCAB, dim=4, pad_frac=0.3, label_frac=0.3))


def broken(case):
    _, name, mutate, _ = case
    args = valid_inputs()
    if mutate is None:
        return args._replace(student_logits=torch.cat([args.student_logits] * 2, -1)[..., :VOCAB + 1])
    return args._replace(**{name: mutate(getattr(args, name))})


def call_raw(api, args, buffers):
    if api == "op":
        return torch.ops.fastdistil.triple_loss(*args)
    if api == "forward-op":
        return torch.ops.fastdistil._triple_loss_forward(*args)
    return torch.ops.fastdistil.triple_loss_out(*args, **buffers)


def sentinel_buffers():
    valid = valid_inputs()
    return {"grad_student_logits": torch.full_like(valid.student_logits, 7.0),
            "grad_student_hidden": torch.full_like(valid.student_hidden, 7.0)}


def check_rejected(api, args, match, py_exception, values=False):
    if api.startswith("python"):
        with pytest.raises(py_exception, match=match):
            fastdistil.triple_loss(**args._asdict(), backend=api.removeprefix("python-"))
        return
    buffers = sentinel_buffers()
    # The public op's composite (Python) checks with fastdistil.ops.checks; the private ops reach the C++ kernel,
    # whose TORCH_CHECKs say the same words as a RuntimeError.
    with pytest.raises(py_exception if api == "op" and not values else RuntimeError, match=match):
        call_raw(api, args, buffers)
    for name, buffer in buffers.items():
        assert (buffer == 7.0).all(), f"{name} was written by a call that failed"


APIS = ["python-cpp", "python-reference", "op", "forward-op", "out-op"]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_bad_tensor(case, api):
    check_rejected(api, broken(case), case[1], case[3], values=case[0].startswith("label-"))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name, value", SCALAR_CASES)
def test_bad_scalar(name, value, api):
    check_rejected(api, valid_inputs()._replace(**{name: value}), name, ValueError)


def test_valid_inputs_are_accepted_by_every_api():
    # Guards the cases above: each must fail because of its one change, not because the base is invalid.
    for api in APIS:
        if api.startswith("python"):
            fastdistil.triple_loss(**valid_inputs()._asdict(), backend=api.removeprefix("python-"))
        else:
            buffers = sentinel_buffers()
            call_raw(api, valid_inputs(), buffers)
            if api == "out-op":
                assert not (buffers["grad_student_logits"] == 7.0).any()


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        fastdistil.triple_loss(**valid_inputs()._asdict(), backend="cuda")


def test_non_tensor_argument():
    args = valid_inputs()
    with pytest.raises(TypeError, match="labels"):
        fastdistil.triple_loss(**args._replace(labels=args.labels.tolist())._asdict(), backend="cpp")


def test_cpp_backend_rejects_non_cpu_tensors():
    args = map_tensors(lambda x: x.to("meta"), valid_inputs())
    with pytest.raises(ValueError, match="cpp"):
        fastdistil.triple_loss(**args._asdict(), backend="cpp")


@pytest.mark.parametrize("isa", sorted({"avx512", "avx2", "vec128", "sse9"} - set(_C.supported_cpu_isas())))
def test_unsupported_cpu_isa(isa):
    before = _C.cpu_isa()
    with pytest.raises(RuntimeError, match=isa):
        _C.set_cpu_isa(isa)
    assert _C.cpu_isa() == before


def test_the_old_name_of_the_16_byte_isa_still_works_with_a_deprecation_warning():
    """FASTDISTIL_CPU_ISA=scalar, the name of the 16-byte vector code until it was renamed vec128 (it was never
    scalar code), still selects it, and says that the name is going away."""
    proc = subprocess.run([sys.executable, "-c", "import fastdistil; print(fastdistil.extension.cpu_isa())"],
                          env=dict(os.environ, FASTDISTIL_CPU_ISA="scalar"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "vec128"
    assert "'scalar' is now called 'vec128'" in proc.stderr


# --- a teacher cache and the runs from it: one line from the command, before anything is written ---------------

CACHE_DATA = ["--max-seq-len", str(TINY_POSITIONS), "--max-documents", "8"]


@pytest.fixture(scope="module")
def tiny_cache(roberta_dir, corpus, tmp_path_factory):
    """A k = 8 cache of the tiny RoBERTa teacher, made without the cosine term: what each case breaks."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    make_cache(roberta_dir, corpus, out, *CACHE_DATA, "--top-k", "8", "--shard-batches", "4", "--alpha-cos", "0")
    return out


def one_line_error(command, argv, capsys) -> str:
    """The error of a command that must fail: exit status 2 and one line (progress bars aside)."""
    assert command(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return line


def train_from(cache, corpus, out, *extra):
    """A run from the cache with its flags, 2 steps unless extra says how long."""
    length = [] if {"--epochs", "--max-steps"} & set(extra) else ["--max-steps", "2"]
    return cached_args(cache, corpus, out, *CACHE_DATA, "--alpha-cos", "0", *length, *extra)


@pytest.mark.parametrize("extra, words", [
    (["--batch-size", "2"], ["made with --batch-size 4", "this run has --batch-size 2"]),
    (["--seed", "7"], ["--seed 56", "--seed 7"]),
    (["--temperature", "3"], ["--temperature 2.0", "--temperature 3.0"]),
    (["--mlm-prob", "0.2"], ["--mlm-prob 0.15", "--mlm-prob 0.2"]),
    (["--teacher", "tiny-bert"], ["--teacher-cache", "--teacher tiny-bert", "give one"]),
    (["--alpha-mse", "1"], ["--alpha-mse", "top-k"]),
    (["--alpha-cos", "1"], ["--alpha-cos 1.0", "no teacher hidden states"]),
    (["--epochs", "2"], ["holds 1 epoch(s)", "needs 2"]),
    (["--max-steps", "1000"], ["holds 1 epoch(s)", "needs 48"]),
    (["--student-layers", "1,3"], ["no initial student teacher-layers-1-3"]),
], ids=["batch-size", "seed", "temperature", "mlm-prob", "with-teacher", "alpha-mse", "no-hidden", "epochs",
        "steps-past-the-cache", "student"])
def test_a_run_that_does_not_match_its_cache(tiny_cache, corpus, tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    error = one_line_error(train.cli, train_from(tiny_cache, corpus, out, *extra), capsys)
    assert all(w in error for w in words), error
    assert not out.exists()


def damaged_copy(cache, tmp_path, damage):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    damage(copy)
    return copy


def _shard(cache):
    return cache / teacher_cache.SHARDS_DIR / teacher_cache.shard_name(0, 4)


def _edit_manifest(cache, edit):
    path = cache / teacher_cache.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, words", [
    (lambda c: _shard(c).write_bytes(_shard(c).read_bytes()[:-100]), ["e0000-b00000004", "damaged", "bytes"]),
    (lambda c: _shard(c).write_bytes(_shard(c).read_bytes()[:-1] + b"?"), ["e0000-b00000004", "SHA-256"]),
    (lambda c: _shard(c).unlink(), ["e0000-b00000004", "missing"]),
    (lambda c: (c / teacher_cache.SHARDS_DIR / teacher_cache.HELDOUT).unlink(), ["heldout", "missing"]),
    (lambda c: _edit_manifest(c, lambda m: m.update(complete=False)), ["incomplete"]),
    (lambda c: (c / teacher_cache.MANIFEST).unlink(), ["no manifest.json"]),
], ids=["truncated-shard", "changed-shard", "missing-shard", "missing-heldout", "incomplete", "no-manifest"])
def test_a_damaged_cache_is_refused_before_any_step(tiny_cache, corpus, tmp_path, capsys, damage, words):
    out = tmp_path / "run"
    cache = damaged_copy(tiny_cache, tmp_path, damage)
    error = one_line_error(train.cli, train_from(cache, corpus, out), capsys)
    assert all(w in error for w in words), error
    assert not out.exists()


def test_a_cache_of_other_data_under_the_same_flags_is_refused(tiny_cache, corpus, tmp_path, capsys):
    """The corpus file changed after the cache was made: the flags agree, the tokenized data do not (one word
    of the first document, the number of sequences unchanged)."""
    changed = tmp_path / "docs.txt"
    changed.write_text(corpus.read_text().replace(" the ", " a ", 1))
    cache = damaged_copy(tiny_cache, tmp_path, lambda c: _edit_manifest(
        c, lambda m: m["params"]["run"].update({"--dataset": str(changed)})))
    out = tmp_path / "run"
    error = one_line_error(train.cli, train_from(cache, changed, out), capsys)
    assert "the run's data differ from the cache's" in error and "_sha256" in error, error
    assert not out.exists()


@pytest.mark.parametrize("extra, words", [
    (["--top-k", "0"], ["--top-k must be > 0"]),
    (["--top-k", "-3"], ["--top-k must be > 0"]),
    (["--top-k", "321"], ["--top-k 321 exceeds", "V = 320"]),
    (["--epochs", "0"], ["--epochs must be > 0"]),
    (["--hidden-dtype", "int8"], ["invalid choice"]),
], ids=["k-0", "k-negative", "k-above-V", "epochs-0", "hidden-dtype"])
def test_bad_cache_teacher_settings(roberta_dir, corpus, tmp_path, capsys, extra, words):
    out = tmp_path / "cache"
    if extra[0] == "--hidden-dtype":  # argparse's own check of choices: its usage line and exit status 2
        with pytest.raises(SystemExit):
            cache_teacher.cli(cache_args(roberta_dir, corpus, out, *CACHE_DATA, *extra))
        error = capsys.readouterr().err
    else:
        error = one_line_error(cache_teacher.cli, cache_args(roberta_dir, corpus, out, *CACHE_DATA, *extra), capsys)
    assert all(w in error for w in words), error
    assert not out.exists()


def test_cache_teacher_leaves_another_cache_or_other_files_alone(tiny_cache, roberta_dir, corpus, tmp_path, capsys):
    cache = damaged_copy(tiny_cache, tmp_path, lambda c: None)
    manifest = (cache / teacher_cache.MANIFEST).read_bytes()
    error = one_line_error(cache_teacher.cli, cache_args(roberta_dir, corpus, cache, *CACHE_DATA, "--top-k", "16",
                                                         "--shard-batches", "4", "--alpha-cos", "0"), capsys)
    assert "made with top_k 8, this run has 16" in error and "--overwrite" in error, error
    assert (cache / teacher_cache.MANIFEST).read_bytes() == manifest
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    error = one_line_error(cache_teacher.cli, cache_args(roberta_dir, corpus, other, *CACHE_DATA), capsys)
    assert "is not empty and holds no teacher cache" in error
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
