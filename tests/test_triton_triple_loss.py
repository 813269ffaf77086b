"""The Triton triple loss (kernels/triple_loss.py) against the unfused reference.

The small cases run on the GPU when there is one, and otherwise on CPU tensors in Triton's interpreter, which
is slow: shapes stay small, and the multi-block paths (online softmax across blocks, tails) are reached by
shrinking the block size instead of growing the vocabulary. The full-size comparison runs only on CUDA.
"""

import functools
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Read when @triton.jit runs, i.e. when fastdistil.kernels.triple_loss is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import fastdistil  # noqa: E402
from fastdistil import extension  # noqa: E402
from fastdistil.kernels import triple_loss as kernel_module  # noqa: E402
from fastdistil.ops.triple_loss import triton_forward as triple_loss_forward  # noqa: E402
from helpers import (TERMS, check_against_reference, check_fp16_under_loss_scale, make_inputs, map_tensors,  # noqa: E402
                     on_device, tensors)
from test_triple_loss import fp16_scale, wide_gap_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = not isinstance(kernel_module._triple_loss_logits_kernel, triton.runtime.JITFunction)
triton_loss = functools.partial(fastdistil.triple_loss, backend="triton")


def inputs_on_device(**make_kwargs):
    return on_device(make_inputs(**make_kwargs), DEVICE)


def check(inputs, **loss_kwargs):
    """check_against_reference, backpropagating 1.7 * loss in fp32. In fp16/bf16 the backward scales a
    gradient the forward already rounded to the student's dtype, a second rounding (up to ~1.5 ulp in all)
    that the reference's single rounding does not make, so there the kernel's own error is measured, at
    grad_output 1."""
    grad_output = 1.7 if inputs.student_logits.dtype == torch.float32 else 1.0
    return check_against_reference(triton_loss, inputs, grad_output=grad_output, **loss_kwargs)


@pytest.fixture(autouse=True)
def _kernels_runnable():
    if not torch.cuda.is_available() and not INTERPRETED:
        pytest.fail("fastdistil.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels were "
                    "compiled for a GPU this machine lacks; set TRITON_INTERPRET=1 in the environment")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 128 elements, so that V = 1001 spans eight (online rescaling, a partial last block) and
    D = 200 two."""
    monkeypatch.setattr(kernel_module, "_MAX_BLOCK", 128)


CASES = [
    # id, make_inputs kwargs, triple_loss kwargs
    ("BLV-default", dict(lead=(3, 7)), dict()),
    ("BLV-restrict", dict(lead=(3, 7)), dict(restrict_ce_to_mask=True)),
    ("NV-T1", dict(vocab=257), dict(temperature=1.0)),
    ("NV-T4-restrict", dict(vocab=257), dict(temperature=4.0, restrict_ce_to_mask=True)),
    ("T1.5-alphas", dict(lead=(2, 9)), dict(temperature=1.5, alpha_ce=2.5, alpha_mlm=0.5, alpha_cos=3.0)),
    ("ce-only", dict(vocab=257), dict(alpha_ce=1.0, alpha_mlm=0.0, alpha_cos=0.0)),
    ("mlm-only", dict(vocab=257), dict(temperature=1.5, alpha_ce=0.0, alpha_mlm=1.0, alpha_cos=0.0)),
    ("cos-only", dict(vocab=257), dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=1.0)),
    ("labels-on-padding", dict(vocab=257, pad_frac=0.5, labels_on_padding=True), dict()),
    ("int64-mask", dict(lead=(3, 7), mask_dtype=torch.int64), dict(temperature=1.0)),
    ("V1", dict(vocab=1, dim=3), dict()),
    ("V5", dict(vocab=5, dim=3), dict(temperature=1.5, restrict_ce_to_mask=True)),
    ("no-rows", dict(lead=(2, 0), vocab=7, dim=3), dict()),
    ("fp16-BLV", dict(lead=(3, 7), dtype=torch.float16), dict()),
    ("fp16-T1", dict(dtype=torch.float16), dict(temperature=1.0)),
    ("fp16-T1.5-restrict", dict(vocab=257, dtype=torch.float16),
     dict(temperature=1.5, restrict_ce_to_mask=True)),
    ("fp16-student-fp32-teacher", dict(vocab=257, dtype=torch.float16, teacher_dtype=torch.float32),
     dict(temperature=4.0)),
    # the original distiller's --alpha_mse term (a 257-entry row's logit MSE is ~2e3)
    ("mse", dict(lead=(3, 7)), dict(alpha_mse=0.2)),
    ("mse-T1.5-restrict", dict(vocab=257), dict(temperature=1.5, alpha_mse=0.2, restrict_ce_to_mask=True)),
    ("mse-only", dict(vocab=257), dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_mse=1.0)),
    ("fp16-mse", dict(lead=(3, 7), dtype=torch.float16), dict(alpha_mse=0.2)),
    ("fp16-student-fp32-teacher-mse-restrict", dict(vocab=257, dtype=torch.float16, teacher_dtype=torch.float32),
     dict(temperature=1.0, alpha_mse=0.2, restrict_ce_to_mask=True)),
]


@pytest.mark.parametrize("make_kwargs, loss_kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_reference(make_kwargs, loss_kwargs):
    check(inputs_on_device(**make_kwargs), **loss_kwargs)


@pytest.mark.parametrize("dtype, loss_kwargs", [
    (torch.float32, dict()),
    (torch.float32, dict(temperature=1.5, restrict_ce_to_mask=True)),
    (torch.float16, dict(temperature=1.0)),
    (torch.float32, dict(temperature=1.5, alpha_mse=0.2)),
    (torch.float16, dict(alpha_mse=0.2, restrict_ce_to_mask=True)),
], ids=["fp32-T2", "fp32-T1.5-restrict", "fp16-T1", "fp32-T1.5-mse", "fp16-mse-restrict"])
def test_matches_reference_across_blocks(small_blocks, dtype, loss_kwargs):
    check(inputs_on_device(lead=(2, 11), dim=200, dtype=dtype), **loss_kwargs)


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits(dtype, restrict):
    """Logits of +-1e4 (the softmaxes are one-hot, the KL is ~1e4 T^2) stay finite and exact."""
    inputs = inputs_on_device(lead=(3, 5), vocab=257, dtype=dtype)
    g = torch.Generator().manual_seed(1)

    def spiked(x):
        return x.detach() + (torch.randint(-1, 2, x.shape, generator=g) * 1e4).to(DEVICE, dtype)

    inputs = inputs._replace(student_logits=spiked(inputs.student_logits).requires_grad_(),
                             teacher_logits=spiked(inputs.teacher_logits))
    terms, _ = check(inputs, restrict_ce_to_mask=restrict)
    assert terms.loss_ce > 1e3


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_fp16_gradients_under_a_grad_scaler(restrict):
    """Backpropagated at the GradScaler's 65,536, the fp16 gradient keeps the tail entries fp16 holds only
    after the scale (see kernels/gradient_scale.py)."""
    # Enough labelled rows that no entry of the scaled gradient overflows fp16 (the GradScaler's condition).
    inputs = inputs_on_device(lead=(96,), vocab=1001, dim=48, dtype=torch.float16, seed=3, logit_std=4.0,
                              label_frac=0.5)
    check_fp16_under_loss_scale(triton_loss, inputs, restrict_ce_to_mask=restrict)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_fp16_gradients_under_a_grad_scaler_at_full_size_on_cuda(restrict):
    """The issue's case on the GPU: fp16 logits [64, 30522] (and DistilBERT's 16 x 128 rows), backpropagated
    at the GradScaler's 65,536."""
    for lead in ((64,), (16, 128)):
        check_fp16_under_loss_scale(triton_loss, inputs_on_device(lead=lead, vocab=30522, dim=768,
                                                                  dtype=torch.float16, seed=3, logit_std=4.0),
                                    restrict_ce_to_mask=restrict)


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("case", ["all-padding", "no-labels"])
def test_empty_selections_give_zero(case, restrict):
    """A term without rows is 0 with a zero gradient, never NaN; a batch of padding is 0 altogether."""
    if case == "all-padding":
        inputs = inputs_on_device(lead=(2, 6), vocab=257, pad_frac=1.0, label_frac=0.0)
        inputs = inputs._replace(attention_mask=torch.zeros_like(inputs.attention_mask))
    else:
        inputs = inputs_on_device(lead=(2, 6), vocab=257, label_frac=0.0)
    assert (inputs.labels == -100).all()
    terms, grads = check(inputs, restrict_ce_to_mask=restrict, alpha_mse=0.2)
    assert terms.loss_mlm == 0
    if case == "all-padding" or restrict:
        assert terms.loss_ce == 0 and terms.loss_mse == 0
    if case == "all-padding":
        assert all(term == 0 for term in terms)
        assert all((grad == 0).all() for grad in grads)


def test_inputs_untouched_and_strided_inputs_accepted():
    """Non-contiguous inputs give the results of their contiguous copies, and no input is written."""
    inputs = inputs_on_device(lead=(2, 6), vocab=257)
    wide = torch.randn(2, 6, 300, device=DEVICE)
    wide[..., :257] = inputs.student_logits.detach()
    strided = inputs._replace(
        student_logits=wide[..., :257].requires_grad_(),
        teacher_logits=inputs.teacher_logits.transpose(0, 1).contiguous().transpose(0, 1),
        student_hidden=inputs.student_hidden.detach().clone().requires_grad_())
    before = [x.detach().clone() for x in tensors(strided)]
    contiguous = triple_loss_forward(*map_tensors(lambda x: x.detach().contiguous(), strided))
    out = triple_loss_forward(*map_tensors(torch.Tensor.detach, strided))
    for a, b in zip(out, contiguous):
        assert torch.equal(a, b)
    grad_logits = out[len(TERMS)]
    assert grad_logits.is_contiguous() and grad_logits.shape == inputs.student_logits.shape
    for x, x0 in zip(tensors(strided), before):
        assert torch.equal(x.detach(), x0)


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_float64_matches_reference_and_passes_gradcheck(restrict):
    """float64 inputs (for gradient checks) are computed in float64 and give float64 loss terms."""
    inputs = inputs_on_device(lead=(2, 3), vocab=7, dim=5, dtype=torch.float64, label_frac=0.5)
    inputs = inputs._replace(temperature=1.5, restrict_ce_to_mask=restrict, alpha_mse=0.3)
    reference = fastdistil.triple_loss_reference(*inputs)
    for name, a, b in zip(TERMS, triton_loss(*inputs), reference):
        assert a.dtype == torch.float64, name
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12, msg=name)

    def loss(student_logits, student_hidden):
        return triton_loss(*inputs._replace(student_logits=student_logits, student_hidden=student_hidden)).loss

    # fast_mode: a few random directions instead of one interpreted launch per input element
    assert torch.autograd.gradcheck(loss, (inputs.student_logits, inputs.student_hidden), fast_mode=True)


@pytest.mark.skipif(not extension.AVAILABLE, reason="needs fastdistil._C")
@pytest.mark.parametrize("alpha_mse", [0.0, 0.2])
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_agrees_with_cpp_kernel(restrict, alpha_mse):
    """Both kernels implement fastdistil::_triple_loss_forward; at T = 1.5 neither takes the es^T shortcut."""
    inputs = map_tensors(torch.Tensor.detach, make_inputs(lead=(3, 7), vocab=257, labels_on_padding=True))
    inputs = inputs._replace(temperature=1.5, restrict_ce_to_mask=restrict, alpha_mse=alpha_mse)
    for name, a, b in zip(TERMS + ("grad_logits", "grad_hidden", "logits_grad_scale"),
                          triple_loss_forward(*map_tensors(lambda x: x.to(DEVICE), inputs)),
                          torch.ops.fastdistil._triple_loss_forward(*inputs)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.float32], ids=str)
def test_fp16_gradient_scale_bounds_the_mse_gradient(teacher_dtype):
    """The P of kernels/gradient_scale.py covers the MSE gradient, computed on the device as the C++ kernel does
    on the host: logits ~1000 apart, whose MSE gradient a P of the KL and MLM terms alone would store as inf."""
    inputs = on_device(wide_gap_inputs(teacher_dtype), DEVICE)
    args = map_tensors(torch.Tensor.detach, inputs)
    out = triple_loss_forward(*args)
    grad, scale = out[len(TERMS)], out[-1].item()
    assert scale == fp16_scale(map_tensors(torch.Tensor.cpu, args))
    assert torch.isfinite(grad).all() and grad.abs().max().item() <= 2.0**15
    check(inputs)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's kernels are what torch's analysis cannot read")
def test_compile_probe_detects_an_analysis_that_finds_every_input_written():
    """torch's analysis of user kernels needs them compiled to Triton IR; when it cannot (here: interpreted
    kernels; on a GPU, Triton 3.6's runtime scalars, pytorch#170049), it reports every input as written, which
    traced_compile_unsupported must catch."""
    why = kernel_module.traced_compile_unsupported.__wrapped__()
    assert why is not None and "writing" in why and "s_ptr" in why, why


class _RecordingMode:
    """Stands in for AOTAutograd's FunctionalTensorMode: records whether the rule handed the op to the mode
    (the fake kernel: an opaque op) or traced the launcher under it."""

    def __init__(self):
        self.opaque = self.traced = False

    def __torch_dispatch__(self, op, types, args, kwargs):
        self.opaque = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("analysis_ok", [True, False], ids=["analysis-ok", "analysis-broken"])
def test_compile_rule_keeps_the_op_opaque_when_the_analysis_is_broken(monkeypatch, analysis_ok):
    monkeypatch.setattr(kernel_module, "traced_compile_unsupported",
                        lambda: None if analysis_ok else "torch's kernel analysis failed")
    mode = _RecordingMode()

    def launcher(*args, traceable):
        assert traceable
        mode.traced = True

    cuda_tensor = type("CudaTensor", (), {"device": torch.device("cuda")})()
    sys.modules["fastdistil.ops.triple_loss"].traced_on_cuda(launcher)(mode, None, (), (cuda_tensor,), {})
    assert (mode.traced, mode.opaque) == ((True, False) if analysis_ok else (False, True))


@pytest.mark.skipif(not extension.AVAILABLE, reason="needs fastdistil._C (it defines the op's schema)")
def test_the_triton_kernels_become_the_ops_cuda_implementations():
    assert sys.modules["fastdistil.ops.triple_loss"].triton_kernels_error() is None
    for op in ("fastdistil::_triple_loss_forward", "fastdistil::_scale_gradient_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_size_on_cuda(dtype, restrict):
    """DistilBERT's shape: 2048 tokens (16 x 128), V = 30522, D = 768; deterministic, and the same through the
    dispatcher (torch.ops.fastdistil.triple_loss) as through the launcher."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no bf16 on this GPU")
    inputs = inputs_on_device(lead=(16, 128), vocab=30522, dim=768, dtype=dtype)
    check(inputs, restrict_ce_to_mask=restrict)

    args = map_tensors(torch.Tensor.detach, inputs._replace(restrict_ce_to_mask=restrict))
    first = triple_loss_forward(*args)
    for a, b in zip(first, triple_loss_forward(*args)):
        assert torch.equal(a, b)
    if extension.AVAILABLE:
        for a, b in zip(first, torch.ops.fastdistil._triple_loss_forward(*args)):
            assert torch.equal(a, b)
