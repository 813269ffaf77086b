"""The CPU kernel (backend "cpp" / "auto") against the unfused reference: loss terms and both gradients."""

import functools
import math

import pytest
import torch

import fastdistil
from fastdistil import TripleLossArgs, _C
from helpers import (FP32_GRAD_RTOL, FP32_LOSS_RTOL, GRADS, LOSS_SCALE, TERMS, assert_close,
                     assert_within_pytorch_error, check_against_reference, check_fp16_under_loss_scale, loss_and_grads,
                     make_inputs, map_tensors, reference64, tensors)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
cpp = functools.partial(fastdistil.triple_loss, backend="cpp")
ALPHA_MSE = 0.05  # the logit MSE of a 1001-entry row is ~7e3: this keeps it beside the other terms


# 41 rows is odd and not a multiple of the kernel's 4-row grain; (3, 14) is the [B, L] layout with padding
# at the end of sequences; V = 30522 and 1001 leave a partial 16-lane vector at the end of every row.
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
# 1 and 2 take the kernel's exp-free path for the T = 1 softmax, 1.5 and 4 the general one.
@pytest.mark.parametrize("temperature", [1.0, 1.5, 2.0, 4.0])
@pytest.mark.parametrize("vocab", [30522, 1001])
@pytest.mark.parametrize("lead", [(1,), (41,), (3, 14)], ids=str)
def test_fp32_matches_reference(lead, vocab, temperature, restrict):
    inputs = make_inputs(lead, vocab, dim=40)
    check_against_reference(cpp, inputs, temperature=temperature, restrict_ce_to_mask=restrict)


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("alphas", [(5.0, 2.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0),
                                    (0.0, 0.0, 1.0), (0.3, 1.7, 2.5)], ids=str)
def test_alphas(alphas, restrict):
    alpha_ce, alpha_mlm, alpha_cos = alphas
    terms, _ = check_against_reference(cpp, make_inputs((41,), 1001), alpha_ce=alpha_ce, alpha_mlm=alpha_mlm,
                                       alpha_cos=alpha_cos, restrict_ce_to_mask=restrict)
    if alphas == (0.0, 0.0, 0.0):
        assert terms.loss.item() == 0.0


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("alphas", [(5.0, 2.0, 1.0, ALPHA_MSE), (0.0, 0.0, 0.0, 1.0), (0.3, 1.7, 2.5, 1e-4)], ids=str)
@pytest.mark.parametrize("temperature", [2.0, 1.5])
@pytest.mark.parametrize("lead, vocab", [((41,), 30522), ((3, 14), 1001), ((1,), 1001)], ids=str)
def test_logit_mse(lead, vocab, temperature, alphas, restrict):
    """The original distiller's --alpha_mse term: every term, the loss and both gradients of the reference."""
    alpha_ce, alpha_mlm, alpha_cos, alpha_mse = alphas
    terms, _ = check_against_reference(cpp, make_inputs(lead, vocab, dim=40), temperature=temperature,
                                       alpha_ce=alpha_ce, alpha_mlm=alpha_mlm, alpha_cos=alpha_cos,
                                       alpha_mse=alpha_mse, restrict_ce_to_mask=restrict)
    assert terms.loss_mse > 0


@pytest.mark.parametrize("alpha_mse", [0.0, ALPHA_MSE])
def test_loss_mse_is_computed_whatever_its_weight(alpha_mse):
    """For logging, as the reference: loss_mse never depends on alpha_mse, only loss and the gradient do."""
    inputs = make_inputs((3, 14), 1001)
    terms, _ = check_against_reference(cpp, inputs, alpha_mse=alpha_mse)
    assert torch.equal(terms.loss_mse, loss_and_grads(cpp, inputs, alpha_mse=0.5)[0].loss_mse)


DTYPE_PAIRS = [(BF16, BF16), (BF16, FP32), (BF16, FP16), (FP16, FP16), (FP16, FP32), (FP16, BF16),
               (FP32, BF16), (FP32, FP16)]


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("dtype, teacher_dtype", DTYPE_PAIRS, ids=lambda v: str(v).removeprefix("torch."))
def test_logit_mse_in_low_precision(dtype, teacher_dtype, restrict):
    inputs = make_inputs((3, 14), 1001, dtype=dtype, teacher_dtype=teacher_dtype)
    check_against_reference(cpp, inputs, grad_output=2.0, alpha_mse=ALPHA_MSE, restrict_ce_to_mask=restrict)


@pytest.mark.parametrize("temperature, restrict", [(2.0, False), (1.5, True)])
# Every student/teacher pair on the small [B, L] layout, the same-dtype pairs at the full vocabulary too.
@pytest.mark.parametrize("dtype, teacher_dtype, lead, vocab",
                         [pair + ((3, 14), 1001) for pair in DTYPE_PAIRS]
                         + [(d, d, (41,), 30522) for d in (BF16, FP16)],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_dtypes(dtype, teacher_dtype, lead, vocab, temperature, restrict):
    # grad_output 2 is exact in every dtype, so this grid measures the kernel alone; rounding a
    # non-power-of-two grad_output is test_low_precision_grad_output_scaling's subject.
    inputs = make_inputs(lead, vocab, dtype=dtype, teacher_dtype=teacher_dtype)
    check_against_reference(cpp, inputs, grad_output=2.0, temperature=temperature,
                            restrict_ce_to_mask=restrict)


@pytest.mark.parametrize("grad_output", [1.7, 1 / 3])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
def test_low_precision_grad_output_scaling(dtype, grad_output):
    # A gradient accumulated over k micro-batches backprops loss / k, so this is the common case in training.
    # The op keeps only the 16-bit gradient of the forward (an fp32 copy would double its memory) and scales
    # it in fp32 in backward: two roundings, so each element is within 2 unit roundoffs of the exact value,
    # twice the single rounding of the unfused reference (which holds fp32 logits and gradients).
    inputs = make_inputs((41,), 30522, dtype=dtype, seed=1)
    _, grads = loss_and_grads(cpp, inputs, grad_output)
    _, grads64 = reference64(inputs, grad_output)
    unit_roundoff = torch.finfo(dtype).eps / 2
    for name, grad, exact in zip(GRADS, grads, grads64):
        err = (grad.double() - exact).abs()
        # the floor covers fp32 arithmetic on entries that are ~0 and 16-bit subnormals
        bound = 2 * unit_roundoff * exact.abs() + 1e-6 * exact.abs().max() + torch.finfo(dtype).tiny
        worst = (err / bound).max().item()
        assert worst <= 1.0, f"{name}: error reaches {worst:.2f}x the two-rounding bound"


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_fp16_gradients_under_a_grad_scaler(restrict):
    """The issue's case: fp16 logits [64, 30522] backpropagated at the GradScaler's 65,536. Rounded before the
    scale, the KL gradient's tail (alpha_ce * T / n * p ~ 1e-9) was 0 in almost half the entries fp16 holds
    once scaled."""
    inputs = make_inputs((64,), 30522, dim=768, dtype=FP16, seed=3, logit_std=4.0)
    check_fp16_under_loss_scale(cpp, inputs, restrict_ce_to_mask=restrict)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("lead, vocab", [
    ((1024,), 1001),
    pytest.param((4, 256), 30522, marks=pytest.mark.slow),
    pytest.param((2048,), 30522, marks=pytest.mark.slow),
], ids=str)
def test_many_rows(lead, vocab, dtype):
    check_against_reference(cpp, make_inputs(lead, vocab, dim=768, dtype=dtype), grad_output=2.0)


@pytest.mark.parametrize("alpha_mse", [0.0, ALPHA_MSE])
@pytest.mark.parametrize("temperature, vocab", [(1.0, 1001), (2.0, 13), (1.5, 1001), (4.0, 16)])
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
@pytest.mark.parametrize("cpu_isa", _C.supported_cpu_isas(), indirect=True)
def test_every_cpu_isa(cpu_isa, dtype, temperature, vocab, alpha_mse):
    # V = 13 is only a tail, V = 16 exactly one vector; D = 37 leaves a tail in the cosine rows too.
    assert _C.cpu_isa() == cpu_isa
    inputs = make_inputs((3, 7), vocab, dim=37, dtype=dtype, label_frac=0.5)
    check_against_reference(cpp, inputs, grad_output=2.0, temperature=temperature, alpha_mse=alpha_mse)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5])
def test_labels_at_row_ends(temperature):
    # 1001 = 62 * 16 + 9: labels 991/992 sit on both sides of the vector/tail boundary.
    inputs = make_inputs((6,), 1001, label_frac=0)
    inputs.labels.copy_(torch.tensor([0, 991, 992, 1000, -100, 500]))
    check_against_reference(cpp, inputs, temperature=temperature)


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_labels_on_padding_rows(restrict):
    # The reference counts every label != -100 in the MLM term, padding or not.
    inputs = make_inputs((41,), 1001, pad_frac=0.5, label_frac=0.4, labels_on_padding=True)
    assert ((inputs.labels != -100) & ~inputs.attention_mask).any()
    check_against_reference(cpp, inputs, restrict_ce_to_mask=restrict)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.uint8], ids=str)
def test_integer_attention_mask(mask_dtype):
    # Hugging Face tokenizers return int64 masks; any non-zero value means a real token.
    inputs = make_inputs((3, 14), 1001, mask_dtype=mask_dtype)
    inputs = inputs._replace(attention_mask=inputs.attention_mask * (3 if mask_dtype != torch.bool else 1))
    check_against_reference(cpp, inputs)


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_backends(backend):
    fn = functools.partial(fastdistil.triple_loss, backend=backend)
    check_against_reference(fn, make_inputs((41,), 1001))


def test_module_matches_functional():
    inputs = make_inputs((3, 14), 1001)
    kwargs = dict(temperature=1.5, alpha_ce=0.5, alpha_mlm=3.0, alpha_cos=0.25, restrict_ce_to_mask=True,
                  alpha_mse=ALPHA_MSE)
    module = fastdistil.TripleLoss(**kwargs, backend="cpp")
    # The module holds the parameters: it gets only the tensors, so the keyword arguments set the reference's alone.
    terms, grads = check_against_reference(lambda *args: module(*tensors(TripleLossArgs(*args))), inputs, **kwargs)
    terms_f, grads_f = loss_and_grads(cpp, inputs, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(terms + grads, terms_f + grads_f))
    assert "temperature=1.5" in repr(module) and f"alpha_mse={ALPHA_MSE}" in repr(module)


# --- rows that contribute nothing ---


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("lead", [(2, 5), (7,), (0,), (2, 0)], ids=str)
def test_all_padding_gives_zero_loss_and_gradient(lead, restrict):
    inputs = make_inputs(lead, 1001, pad_frac=1.0, label_frac=0)
    inputs.attention_mask.zero_()
    terms, grads = loss_and_grads(cpp, inputs, restrict_ce_to_mask=restrict, alpha_mse=ALPHA_MSE)
    assert [t.item() for t in terms] == [0.0] * len(TERMS)
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_no_labels_gives_zero_mlm():
    inputs = make_inputs((3, 14), 1001, label_frac=0)
    terms, _ = check_against_reference(cpp, inputs)
    assert terms.loss_mlm.item() == 0.0 and terms.loss_ce.item() > 0


def test_restrict_without_labels_gives_zero_ce():
    inputs = make_inputs((3, 14), 1001, label_frac=0)
    terms, grads = check_against_reference(cpp, inputs, restrict_ce_to_mask=True, alpha_mse=ALPHA_MSE)
    assert terms.loss_ce.item() == 0.0 and terms.loss_mlm.item() == 0.0 and terms.loss_cos.item() > 0
    assert terms.loss_mse.item() == 0.0  # no row selected: the MSE term covers the KL's rows
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))


# --- numerics ---


def extreme_logits(vocab, dtype):
    """Rows spanning 2e4: alternating +-1e4, a linear ramp, one spike, a constant row, two tied maxima."""
    s = torch.zeros(6, vocab)
    s[0] = torch.where(torch.arange(vocab) % 2 == 0, 1e4, -1e4)
    s[1] = torch.linspace(-1e4, 1e4, vocab)
    s[2, vocab // 3] = 1e4
    s[3] = -1e4
    s[4, [3, vocab - 1]] = 1e4
    s[5] = torch.randn(vocab) * 3
    t = s.flip(-1).clone()
    t[5] = 1e4 * torch.randn(vocab).sign()
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
def test_extreme_logits(dtype, temperature):
    inputs = make_inputs((6,), 1001, dtype=dtype, pad_frac=0)
    s, t = extreme_logits(1001, dtype)
    # labels on the minimum of a +-1e4 row (CE = 2e4), the maximum of the ramp, the spike's neighbour
    inputs = inputs._replace(student_logits=s.requires_grad_(), teacher_logits=t,
                             labels=torch.tensor([1, 1000, 1001 // 3 + 1, 7, 1000, -100]))
    terms, _ = check_against_reference(cpp, inputs, grad_output=2.0, temperature=temperature)
    assert terms.loss_mlm.item() > 1e3


def test_hidden_states_with_a_dtype_of_their_own():
    # check_against_reference asserts that each gradient has its input's dtype and shape.
    inputs = make_inputs((3, 14), 1001, dtype=BF16, teacher_dtype=FP32)
    inputs = inputs._replace(student_hidden=inputs.student_hidden.detach().float().requires_grad_(),
                             teacher_hidden=inputs.teacher_hidden.to(FP16))
    check_against_reference(cpp, inputs, grad_output=2.0)


def test_only_loss_carries_gradient_and_teacher_gets_none():
    inputs = make_inputs((41,), 1001)
    inputs.teacher_logits.requires_grad_()
    inputs.teacher_hidden.requires_grad_()
    out = cpp(*inputs._replace(alpha_mse=ALPHA_MSE))
    assert out.loss.requires_grad
    assert not any(t.requires_grad for t in out[1:])
    out.loss.backward()
    assert inputs.teacher_logits.grad is None and inputs.teacher_hidden.grad is None
    assert inputs.student_logits.grad is not None and inputs.student_hidden.grad is not None


def test_non_contiguous_inputs():
    base = map_tensors(torch.Tensor.detach, make_inputs((41,), 1001))
    inputs = base._replace(
        student_logits=base.student_logits.t().contiguous().t().requires_grad_(),           # column-major
        teacher_logits=torch.cat([base.teacher_logits, base.teacher_logits], dim=1)[:, ::2],  # strided columns
        labels=torch.stack([base.labels, base.labels], dim=1)[:, 0],                         # stride 2
        student_hidden=base.student_hidden.t().contiguous().t().requires_grad_(),
        teacher_hidden=torch.cat([base.teacher_hidden, base.teacher_hidden], dim=0)[41:],    # offset view
        attention_mask=torch.stack([base.attention_mask, base.attention_mask], dim=1)[:, 1],
    )
    assert not any(x.is_contiguous() for x in tensors(inputs) if x is not inputs.teacher_hidden)
    check_against_reference(cpp, inputs)
    # stride 0: every row reads the same memory
    inputs = inputs._replace(student_logits=base.student_logits[:1].expand(41, 1001).detach().requires_grad_())
    check_against_reference(cpp, inputs)


def test_result_independent_of_thread_count():
    inputs = make_inputs((3, 14), 30522, dtype=BF16)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(loss_and_grads(cpp, inputs))
    finally:
        torch.set_num_threads(threads)
    (terms1, grads1), (terms2, grads2) = results
    for a, b in zip(terms1 + grads1, terms2 + grads2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad_output", [1.0, 1.7])
def test_second_backward_through_the_graph(grad_output):
    inputs = make_inputs((41,), 1001)
    _, (expected, _) = reference64(inputs, grad_output=grad_output)
    loss = cpp(*inputs).loss * grad_output
    loss.backward(retain_graph=True)
    assert_close(inputs.student_logits.grad, expected, FP32_GRAD_RTOL, "first backward")
    # The saved gradient is scaled in place; reusing it must fail loudly, never yield grad_output^2 scaling.
    try:
        loss.backward()
    except RuntimeError:
        return
    assert_close(inputs.student_logits.grad, 2 * expected, FP32_GRAD_RTOL, "accumulated gradient of two backwards")


# --- the raw ops ---


@pytest.mark.parametrize("alpha_mse", [0.0, ALPHA_MSE])
def test_forward_op_returns_reference_gradients(alpha_mse):
    inputs = make_inputs((3, 14), 1001)._replace(alpha_mse=alpha_mse)
    out = torch.ops.fastdistil._triple_loss_forward(*map_tensors(torch.Tensor.detach, inputs))
    assert len(out) == len(TERMS) + len(GRADS) + 1  # and logits_grad_scale
    terms64, grads64 = reference64(inputs, grad_output=1.0)
    for name, a, e in zip(TERMS + GRADS, out, terms64 + grads64):
        assert_close(a, e, FP32_LOSS_RTOL if a.dim() == 0 else FP32_GRAD_RTOL, name)


@pytest.mark.parametrize("alpha_mse", [0.0, ALPHA_MSE])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_triple_loss_out_writes_forward_gradients(dtype, alpha_mse):
    inputs = make_inputs((3, 14), 1001, dtype=dtype)._replace(alpha_mse=alpha_mse)
    args = map_tensors(torch.Tensor.detach, inputs)
    # NaN first: every element, padding rows included, must be written.
    grad_logits = torch.full_like(args.student_logits, float("nan"))
    grad_hidden = torch.full_like(args.student_hidden, float("nan"))
    terms = torch.ops.fastdistil.triple_loss_out(*args, grad_student_logits=grad_logits,
                                                 grad_student_hidden=grad_hidden)
    expected = torch.ops.fastdistil._triple_loss_forward(*args)
    assert len(terms) == 4  # the public schema's: loss_mse is inside loss
    for a, b in zip(tuple(terms) + (grad_logits, grad_hidden), expected[:4] + expected[len(TERMS):]):
        assert torch.equal(a, b)
    terms64, grads64 = reference64(inputs, grad_output=1.0)
    for name, a, e in zip(TERMS, terms, terms64):
        assert_close(a, e, FP32_LOSS_RTOL, name)
    for name, a, e in zip(GRADS, (grad_logits, grad_hidden), grads64):
        # Rounding the exact gradient once is what PyTorch's autograd delivers in a 16-bit dtype.
        assert_within_pytorch_error(a, e.to(dtype), e, name)


@pytest.mark.parametrize("which, bad", [
    ("grad_student_logits", lambda x: x[:, :-1].clone()),
    ("grad_student_logits", lambda x: x.to(torch.bfloat16)),
    ("grad_student_logits", lambda x: x.t().contiguous().t()),
    ("grad_student_logits", "alias"),
    ("grad_student_hidden", lambda x: x[:-1].clone()),
    ("grad_student_hidden", lambda x: x.double()),
], ids=["logits-shape", "logits-dtype", "logits-strided", "logits-alias", "hidden-shape", "hidden-dtype"])
def test_triple_loss_out_rejects_bad_buffers_without_writing(which, bad):
    args = map_tensors(torch.Tensor.detach, make_inputs((41,), 1001))
    buffers = {"grad_student_logits": torch.full_like(args.student_logits, 7.0),
               "grad_student_hidden": torch.full_like(args.student_hidden, 7.0)}
    source = getattr(args, which.removeprefix("grad_"))
    buffers[which] = args.student_logits if bad == "alias" else bad(torch.full_like(source, 7.0))
    before = {k: v.clone() for k, v in buffers.items()}
    with pytest.raises(RuntimeError, match=which):
        torch.ops.fastdistil.triple_loss_out(*args, **buffers)
    for k in buffers:
        assert torch.equal(buffers[k], before[k]), f"{k} was written"


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_float64_gradcheck_with_alpha_mse(restrict):
    inputs = make_inputs((2, 3), 7, dim=5, dtype=torch.float64, label_frac=0.5)
    inputs = inputs._replace(temperature=1.5, restrict_ce_to_mask=restrict, alpha_mse=0.3)
    terms = cpp(*inputs)
    for name, a, b in zip(TERMS, terms, fastdistil.triple_loss_reference(*inputs)):
        assert a.dtype == torch.float64, name
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12, msg=name)

    def loss(student_logits, student_hidden):
        return cpp(*inputs._replace(student_logits=student_logits, student_hidden=student_hidden)).loss

    assert torch.autograd.gradcheck(loss, (inputs.student_logits, inputs.student_hidden))


# --- fp16: the power of two the logits gradient is stored with must bound the MSE gradient too ---


def wide_gap_inputs(teacher_dtype):
    """fp16 student logits and teacher logits up to ~1000 apart: the MSE gradient's entries (~2 * 1000 / n) then
    exceed the KL and MLM bound by far, so a P that left them out would store them as inf."""
    inputs = make_inputs((64,), 1001, dim=48, dtype=FP16, teacher_dtype=teacher_dtype, seed=5, label_frac=0.5)
    far = torch.zeros(inputs.teacher_logits.shape)
    far[::7, ::50] = 1000.0
    return inputs._replace(teacher_logits=(inputs.teacher_logits.float() - far).to(teacher_dtype),
                           alpha_mse=1.0)


def fp16_scale(args, with_mse=True):
    """kernels/gradient_scale.py's closed form: 2^floor(log2(2^15 / bound)), the bound from the counts and (the
    MSE term's) the extremes of both logit tensors."""
    labelled = args.labels != -100
    n_sel = int((labelled if args.restrict_ce_to_mask else args.attention_mask.bool()).sum())
    n_lab = int(labelled.sum())
    s, t = args.student_logits.double(), args.teacher_logits.double()
    gap = max(s.max() - t.min(), t.max() - s.min()).item() if with_mse else 0.0
    bound = (args.alpha_ce * args.temperature + 2 * args.alpha_mse * gap) / n_sel + args.alpha_mlm / n_lab
    return 2.0 ** math.floor(math.log2(2.0**15 / bound))


@pytest.mark.parametrize("teacher_dtype", [FP16, FP32], ids=str)
def test_fp16_gradient_scale_bounds_the_mse_gradient(teacher_dtype):
    inputs = wide_gap_inputs(teacher_dtype)
    args = map_tensors(torch.Tensor.detach, inputs)
    out = torch.ops.fastdistil._triple_loss_forward(*args)
    grad, scale = out[len(TERMS)], out[-1].item()
    assert scale == fp16_scale(args)
    assert torch.isfinite(grad).all() and grad.abs().max().item() <= 2.0**15
    largest = grad.abs().max().item() / scale
    assert largest * fp16_scale(args, with_mse=False) > torch.finfo(FP16).max, \
        "the KL and MLM bound alone would not overflow here: the case tests nothing"
    check_against_reference(cpp, inputs, grad_output=1.0)


def test_fp16_gradients_with_the_mse_term_under_a_grad_scaler():
    """A GradScaler's 65,536 on a weight small enough that the scaled reference gradient fits fp16."""
    inputs = make_inputs((64,), 30522, dim=768, dtype=FP16, seed=3, logit_std=4.0)
    _, grads = loss_and_grads(cpp, inputs, LOSS_SCALE, alpha_mse=1e-3)
    _, pytorch = loss_and_grads(fastdistil.triple_loss_reference, inputs, LOSS_SCALE, alpha_mse=1e-3)
    _, truth = reference64(inputs, LOSS_SCALE, alpha_mse=1e-3)
    for name, a, p, e in zip(GRADS, grads, pytorch, truth):
        assert_within_pytorch_error(a, p, e, name, floor=0.0)
