"""Bad input: an error naming the argument from the Python API and the raw ops, and no half-written output."""

import os
import subprocess
import sys

import pytest
import torch

import fastdistil
from fastdistil import _C
from helpers import TENSORS, make_inputs, map_tensors

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
