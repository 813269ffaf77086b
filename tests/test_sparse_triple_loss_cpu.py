"""The CPU kernel of the sparse (top-k teacher) triple loss, torch.ops.fastdistil._sparse_triple_loss_forward,
called directly, against fastdistil/ops/reference.py's sparse_triple_loss_reference in float64: the five terms
and both gradients (the logits one divided by the logits_grad_scale it was stored with)."""

import math
import types

import pytest
import torch

from fastdistil import _C
from fastdistil.kernels.gradient_scale import hidden_grad_dtype
from fastdistil.ops.reference import TAIL_FLOOR, sparse_triple_loss_reference, teacher_topk
from fastdistil.ops.values import SparseTripleLossArgs
from helpers import (FP32_GRAD_RTOL, FP32_LOSS_RTOL, GRADS, LOW_PRECISION_FLOOR, TERMS, _cosine_cancellation,
                     assert_close, assert_within_pytorch_error, make_inputs)
from test_triple_loss import extreme_logits

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
INT16, INT32, INT64 = torch.int16, torch.int32, torch.int64
TAILS = ("bucket", "renormalize")
FORWARD = torch.ops.fastdistil._sparse_triple_loss_forward


def make_sparse(lead=(3, 14), vocab=1001, k=7, dtype=FP32, teacher_dtype=None, index_dtype=INT32, temperature=2.0,
                tail="bucket", dim=40, **kwargs):
    """SparseTripleLossArgs of helpers.make_inputs' tensors, the teacher cut to its top k by teacher_topk (its
    log-sum-exps from the teacher logits as rounded to teacher_dtype)."""
    base = make_inputs(lead, vocab, dim=dim, dtype=dtype, teacher_dtype=teacher_dtype, **kwargs)
    topk_logits, topk_indices, logsumexp = teacher_topk(base.teacher_logits, k, temperature)
    return SparseTripleLossArgs(base.student_logits.detach(), topk_logits, topk_indices.to(index_dtype), logsumexp,
                                base.labels, base.student_hidden.detach(), base.teacher_hidden.detach(),
                                base.attention_mask, temperature=temperature, tail=tail)


def run_op(args):
    """(the five terms, (d loss / d student_logits with the stored scale undone, d loss / d student_hidden), the
    raw outputs)."""
    out = FORWARD(*args)
    assert len(out) == len(TERMS) + len(GRADS) + 1
    grad_logits, grad_hidden, scale = out[len(TERMS):]
    return tuple(out[:len(TERMS)]), (grad_logits.double() / scale.double(), grad_hidden), out


def upcast(args, dtype=FP64):
    return args._replace(**{name: getattr(args, name).to(dtype) for name in
                            ("student_logits", "teacher_topk_logits", "teacher_logsumexp", "student_hidden",
                             "teacher_hidden")})


def run_reference(args):
    """The reference's five terms and its autograd gradients of loss, at args' dtypes."""
    s = args.student_logits.detach().clone().requires_grad_()
    hs = args.student_hidden.detach().clone().requires_grad_()
    out = sparse_triple_loss_reference(*args._replace(student_logits=s, student_hidden=hs))
    return tuple(x.detach() for x in out), torch.autograd.grad(out.loss, (s, hs))


def check(args):
    """Every term and both gradients within FP32_*_RTOL of the float64 reference (fp32 student logits), or else
    within twice the reference's own error at the inputs' dtypes plus a floor (helpers.check_against_reference's
    rule)."""
    terms, grads, out = run_op(args)
    terms64, grads64 = run_reference(upcast(args))
    for name, term in zip(TERMS, terms):
        assert term.dtype == FP32 and term.dim() == 0, f"{name}: {term.dtype}, shape {tuple(term.shape)}"
    assert out[5].dtype == args.student_logits.dtype and out[5].shape == args.student_logits.shape
    assert out[5].is_contiguous()
    assert out[6].dtype == hidden_grad_dtype(args.student_hidden.dtype) and out[6].shape == args.student_hidden.shape
    assert terms[TERMS.index("loss_mse")].item() == 0.0
    pytorch = None
    for i, (name, a, e) in enumerate(zip(TERMS + GRADS, terms + grads, terms64 + grads64)):
        if args.student_logits.dtype == FP32:
            try:
                assert_close(a, e, FP32_LOSS_RTOL if a.dim() == 0 else FP32_GRAD_RTOL, name)
                continue
            except AssertionError:
                floor = 0.0
        else:
            floor = LOW_PRECISION_FLOOR
        if pytorch is None:
            pytorch = sum(run_reference(args), ())
        slack = 0.0
        if name == "grad_student_hidden":
            slack = _cosine_cancellation(types.SimpleNamespace(attention_mask=args.attention_mask,
                                                               student_hidden=args.student_hidden), 1.0,
                                         alpha_cos=args.alpha_cos)
        assert_within_pytorch_error(a, pytorch[i], e, name, floor, slack)
    return terms, grads


# --- parity --------------------------------------------------------------------------------------------------

DTYPES = [(FP32, None), (BF16, None), (FP16, None), (BF16, FP32), (FP16, BF16), (FP32, FP16)]


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("k", [1, 7, 1001])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype, teacher_dtype", DTYPES, ids=lambda v: str(v).removeprefix("torch."))
def test_matches_reference(dtype, teacher_dtype, tail, k, restrict):
    # (3, 14): right padding, 15 % of the rows labelled; V = 1001 leaves a partial vector at every row's end.
    args = make_sparse(k=k, dtype=dtype, teacher_dtype=teacher_dtype, tail=tail)
    check(args._replace(restrict_ce_to_mask=restrict))


@pytest.mark.parametrize("k", [7, 32, 30522])
@pytest.mark.parametrize("tail", TAILS)
def test_full_vocabulary(tail, k):
    check(make_sparse((41,), 30522, k=k, tail=tail))


# 1 and 2 take the exp-free path for the T = 1 softmax, 1.5 the general one.
@pytest.mark.parametrize("temperature, tail", [(1.0, "bucket"), (2.0, "renormalize"), (1.5, "bucket")], ids=str)
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
# V = 13 is only a partial vector, V = 16 exactly one vector (k = V: no tail) and V = 37 a tail of 1 entry.
@pytest.mark.parametrize("vocab, k", [(13, 3), (16, 16), (37, 36), (1001, 7)], ids=str)
@pytest.mark.parametrize("cpu_isa", _C.supported_cpu_isas(), indirect=True)
def test_every_cpu_isa(cpu_isa, vocab, k, dtype, temperature, tail):
    assert _C.cpu_isa() == cpu_isa
    args = make_sparse((3, 7), vocab, k=k, dtype=dtype, dim=37, label_frac=0.5, temperature=temperature, tail=tail)
    check(args)


@pytest.mark.parametrize("index_dtype", [INT16, INT64], ids=str)
def test_index_dtypes_agree(index_dtype):
    args = make_sparse(k=7)
    expected = FORWARD(*args)
    actual = FORWARD(*args._replace(teacher_topk_indices=args.teacher_topk_indices.to(index_dtype)))
    for a, b in zip(actual, expected):
        assert torch.equal(a, b)
    # int16 holds V up to 32767: bert-base's 30522 is the case the cache stores.
    check(make_sparse((5,), 30522, k=7, index_dtype=index_dtype))


def test_topk_order_does_not_matter():
    args = make_sparse(k=7)
    perm = torch.randperm(7)
    shuffled = args._replace(teacher_topk_logits=args.teacher_topk_logits[..., perm],
                             teacher_topk_indices=args.teacher_topk_indices[..., perm])
    # Only the order of the double sums over k changes.
    for a, b in zip(sum(run_op(shuffled)[:2], ()), sum(run_op(args)[:2], ())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5])
def test_labels_inside_and_outside_the_topk(tail, temperature):
    # Labels on the teacher's top entries (the top-k fix-up writes the one-hot term too), and on both sides of
    # the vector/tail boundary (1001 = 62 * 16 + 9).
    args = make_sparse((8,), 1001, k=7, tail=tail, temperature=temperature, label_frac=0, pad_frac=0)
    labels = torch.tensor([0, 991, 992, 1000, -100, 0, 0, 0])
    labels[5:] = args.teacher_topk_indices[5:, torch.tensor([0, 3, 6])].diagonal().long()
    check(args._replace(labels=labels))


# --- the online loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [2.0, 1.5])
@pytest.mark.parametrize("lead, vocab", [((3, 14), 1001), ((3, 7), 13), ((4,), 30522)], ids=str)
def test_full_topk_is_the_online_loss(lead, vocab, temperature, tail):
    """k = V: both tails are the online op with alpha_mse = 0 (whose loss_mse, for logging, is not 0)."""
    base = make_inputs(lead, vocab, dim=40)
    args = make_sparse(lead, vocab, k=vocab, temperature=temperature, tail=tail)
    online = torch.ops.fastdistil._triple_loss_forward(
        base.student_logits.detach(), base.teacher_logits, base.labels, base.student_hidden.detach(),
        base.teacher_hidden, base.attention_mask, temperature, 5.0, 2.0, 1.0, False, 0.0)
    sparse = FORWARD(*args)
    for name, a, b in zip(TERMS + GRADS, sparse[:5] + sparse[5:7], online[:5] + online[5:7]):
        if name != "loss_mse":
            assert_close(a, b, 2 * FP32_GRAD_RTOL, name)
    assert sparse[7].item() == online[7].item() == 1.0


# --- rows and teachers that are special -----------------------------------------------------------------------


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("lead", [(2, 5), (7,), (0,), (2, 0)], ids=str)
def test_all_padding_gives_zero_loss_and_gradient(lead, restrict):
    args = make_sparse(lead, 1001, k=7, pad_frac=1.0, label_frac=0)
    args.attention_mask.zero_()
    out = FORWARD(*args._replace(restrict_ce_to_mask=restrict))
    assert [t.item() for t in out[:5]] == [0.0] * 5
    for grad in out[5:7]:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_rows_outside_the_term_are_not_read(restrict):
    """A cache may pad the rows the KL term skips with anything: NaN logits, repeated indices."""
    args = make_sparse((3, 14), 1001, k=7, pad_frac=0.5, label_frac=0.3, labels_on_padding=True)
    skipped = (args.labels == -100) if restrict else ~args.attention_mask
    assert skipped.any()
    garbage = args._replace(teacher_topk_logits=args.teacher_topk_logits.masked_fill(skipped[..., None], math.nan),
                            teacher_topk_indices=args.teacher_topk_indices.masked_fill(skipped[..., None], 0),
                            teacher_logsumexp=args.teacher_logsumexp.masked_fill(skipped[..., None], math.nan),
                            restrict_ce_to_mask=restrict)
    for a, b in zip(FORWARD(*garbage), FORWARD(*args._replace(restrict_ce_to_mask=restrict))):
        assert torch.equal(a, b)
    check(garbage)


def test_no_labels_gives_zero_mlm():
    args = make_sparse(k=7, label_frac=0)
    terms, _ = check(args)
    assert terms[TERMS.index("loss_mlm")].item() == 0.0 and terms[TERMS.index("loss_ce")].item() > 0


def test_restrict_without_labels_gives_zero_ce():
    args = make_sparse(k=7, label_frac=0)._replace(restrict_ce_to_mask=True)
    terms, grads = check(args)
    assert terms[TERMS.index("loss_ce")].item() == 0.0 and terms[TERMS.index("loss_cos")].item() > 0
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))


@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_teacher_without_tail_mass(dtype, k):
    """A teacher whose top entry is 1e4 above the rest: q_1 = 1 and r = 0 (or rounds to 1 - Q < 0, clamped), so
    the bucket term vanishes and both tails give the same loss."""
    base = make_inputs((6,), 1001, dim=40, dtype=dtype, pad_frac=0)
    t = base.teacher_logits.float()
    t[torch.arange(6), torch.arange(6) * 100] = 1e4
    topk_logits, topk_indices, logsumexp = teacher_topk(t.to(dtype), k, 2.0)
    args = make_sparse((6,), 1001, k=k, dtype=dtype, pad_frac=0)._replace(
        teacher_topk_logits=topk_logits, teacher_topk_indices=topk_indices, teacher_logsumexp=logsumexp)
    # 1e4 / T is exact, and so is the log-sum-exp it dominates: Q is 1 to the last bit, r exactly 0.
    mass = (topk_logits.double() / 2.0 - logsumexp[:, 1:].double()).exp().sum(-1)
    assert (mass >= 1.0).all()
    terms, _ = check(args)
    renormalized, _ = check(args._replace(tail="renormalize"))
    torch.testing.assert_close(terms[1], renormalized[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_student_mass_in_the_topk(temperature):
    """The student's own top entries at the teacher's top-k, 40 above the rest: its tail mass (4e-15 at T = 1,
    2e-6 at T = 2) is what 1 - sum_k p_k loses in fp32; the bucket term r log(r / S) needs it to 1e-5."""
    args = make_sparse((3, 14), 1001, k=7, temperature=temperature)
    s = args.student_logits.clone().scatter_(-1, args.teacher_topk_indices.long(), 40.0)
    check(args._replace(student_logits=s))


def extreme_student(vocab, topk_indices):
    """test_triple_loss's extreme_logits rows (alternating +-1e4, a ramp, a spike, a constant row, two tied
    maxima, a normal row) and two rows at +1e4 on the teacher's top-k and -1e4 elsewhere, whose fp32 tail mass
    underflows to 0 (TAIL_FLOOR's case)."""
    s = torch.full((8, vocab), -1e4)
    s[:6] = extreme_logits(vocab, FP32)[0]
    s[6:].scatter_(1, topk_indices[6:].long(), 1e4)
    return s


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
def test_extreme_logits(dtype, temperature, tail):
    args = make_sparse((8,), 1001, k=7, dtype=dtype, temperature=temperature, tail=tail, pad_frac=0)
    s = extreme_student(1001, args.teacher_topk_indices).to(dtype)
    labels = torch.tensor([1, 1000, 1001 // 3 + 1, 7, 1000, -100, 5, -100])
    args = args._replace(student_logits=s, labels=labels)
    if tail == "bucket":
        p = torch.log_softmax(s[6:].double() / temperature, -1)
        tail_mass = p.scatter(1, args.teacher_topk_indices[6:].long(), -math.inf).logsumexp(-1).exp()
        assert (tail_mass < TAIL_FLOOR).all(), "the tail does not underflow: the case tests nothing"
    terms, _ = check(args)
    assert terms[TERMS.index("loss_mlm")].item() > 1e3


# --- float64 ----------------------------------------------------------------------------------------------------


class _Forward(torch.autograd.Function):
    """The loss of the raw op, whose backward is the gradient the op returned (times grad_output)."""

    @staticmethod
    def forward(ctx, student_logits, student_hidden, args):
        out = FORWARD(*args._replace(student_logits=student_logits, student_hidden=student_hidden))
        ctx.save_for_backward(out[5] / out[7], out[6])
        return out[0]

    @staticmethod
    def backward(ctx, grad_output):
        grad_logits, grad_hidden = ctx.saved_tensors
        return grad_output * grad_logits, grad_output * grad_hidden, None


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_float64_gradcheck(k, tail, restrict):
    args = make_sparse((2, 3), 7, k=k, dtype=FP64, dim=5, label_frac=0.5, temperature=1.5, tail=tail)
    args = args._replace(restrict_ce_to_mask=restrict)
    assert args.teacher_logsumexp.dtype == FP64
    terms, grads, _ = run_op(args)
    terms64, grads64 = run_reference(args)
    for name, a, b in zip(TERMS + GRADS, terms + grads, terms64 + grads64):
        assert a.dtype == FP64, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    s = args.student_logits.clone().requires_grad_()
    hs = args.student_hidden.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s, hs: _Forward.apply(s, hs, args), (s, hs))


def test_float64_tail_floor():
    """The clamped tail: no gradient through S below TAIL_FLOOR, as autograd of the reference's clamp."""
    args = make_sparse((4,), 11, k=2, dtype=FP64, dim=5, pad_frac=0, label_frac=0)
    s = torch.full((4, 11), -300.0, dtype=FP64)
    s.scatter_(1, args.teacher_topk_indices.long(), 300.0)
    args = args._replace(student_logits=s)
    terms, grads, _ = run_op(args)
    terms64, grads64 = run_reference(args)
    for name, a, b in zip(TERMS + GRADS, terms + grads, terms64 + grads64):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


# --- fp16: the stored gradient and its scale ----------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
def test_logits_grad_scale(dtype, tail):
    """P = 2^floor(log2(2^15 / (kl_coef + ce_coef))) for fp16 (kernels/gradient_scale.py with alpha_mse = 0), 1
    otherwise; the stored fp16 gradient then keeps the KL tail entries that round to 0 unscaled."""
    args = make_sparse((64,), 30522, k=32, dtype=dtype, dim=48, tail=tail, pad_frac=0, seed=3, logit_std=4.0)
    out = FORWARD(*args)
    n_sel, n_lab = args.attention_mask.sum().item(), (args.labels != -100).sum().item()
    bound = args.alpha_ce * args.temperature / n_sel + args.alpha_mlm / n_lab
    expected = 2.0 ** math.floor(math.log2(2.0**15 / bound)) if dtype == FP16 else 1.0
    assert out[7].item() == expected and out[7].dtype == FP32
    if dtype == FP16:
        grad = out[5]
        assert torch.isfinite(grad).all() and grad.abs().max().item() <= 2.0**15
        _, grads64 = run_reference(upcast(args))
        small = (grads64[0].abs() < 2.0**-25) & (grads64[0].abs() * expected >= 2.0**-14)
        assert small.any() and (grad[small] != 0).all()


# --- the parallel loop ----------------------------------------------------------------------------------------


def test_result_independent_of_thread_count():
    args = make_sparse((3, 14), 30522, k=32, dtype=BF16)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(FORWARD(*args))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    args = make_sparse((41,), 1001, k=7)
    strided = args._replace(
        student_logits=args.student_logits.t().contiguous().t(),
        teacher_topk_logits=torch.stack([args.teacher_topk_logits] * 2, dim=-1).flatten(1)[:, ::2],
        teacher_topk_indices=torch.cat([args.teacher_topk_indices] * 2, dim=0)[41:],
        teacher_logsumexp=args.teacher_logsumexp.t().contiguous().t(),
        labels=torch.stack([args.labels] * 2, dim=1)[:, 0],
    )
    assert not strided.student_logits.is_contiguous() and not strided.teacher_topk_logits.is_contiguous()
    for a, b in zip(FORWARD(*strided), FORWARD(*args)):
        assert torch.equal(a, b)


# --- bad input --------------------------------------------------------------------------------------------------


def _set(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


BAD = [
    ("topk-rows", "teacher_topk_logits", lambda a: a.teacher_topk_logits[:1]),
    ("k-zero", "teacher_topk_logits", lambda a: a.teacher_topk_logits[..., :0]),
    ("k-above-V", "teacher_topk_logits", lambda a: torch.cat([a.teacher_topk_logits] * 200, -1)),
    ("topk-int", "teacher_topk_logits", lambda a: a.teacher_topk_logits.long()),
    ("topk-float64", "teacher_topk_logits", lambda a: a.teacher_topk_logits.double()),
    ("indices-float", "teacher_topk_indices", lambda a: a.teacher_topk_indices.float()),
    ("indices-uint8", "teacher_topk_indices", lambda a: a.teacher_topk_indices.to(torch.uint8)),
    ("indices-shape", "teacher_topk_indices", lambda a: a.teacher_topk_indices[..., :-1]),
    ("indices-above-V", "teacher_topk_indices", lambda a: _set(a.teacher_topk_indices, (0, 0, 1), 1001)),
    ("indices-negative", "teacher_topk_indices", lambda a: _set(a.teacher_topk_indices, (0, 0, 1), -1)),
    ("indices-repeated", "teacher_topk_indices",
     lambda a: _set(a.teacher_topk_indices, (0, 0, 1), a.teacher_topk_indices[0, 0, 0].item())),
    ("lse-float64", "teacher_logsumexp", lambda a: a.teacher_logsumexp.double()),
    ("lse-bf16", "teacher_logsumexp", lambda a: a.teacher_logsumexp.bfloat16()),
    ("lse-shape", "teacher_logsumexp", lambda a: a.teacher_logsumexp[..., :1]),
    ("labels-value", "labels", lambda a: _set(a.labels, (0, 1), 1001)),
    ("hidden-shape", "teacher_hidden", lambda a: a.teacher_hidden[..., :-1]),
    ("mask-float", "attention_mask", lambda a: a.attention_mask.float()),
]


@pytest.mark.parametrize("case, name, bad", BAD, ids=[case[0] for case in BAD])
def test_bad_tensor(case, name, bad):
    args = make_sparse((3, 14), 1001, k=7, pad_frac=0)
    with pytest.raises(RuntimeError, match=f"^sparse_triple_loss: {name} "):
        FORWARD(*args._replace(**{name: bad(args)}))


@pytest.mark.parametrize("name, value", [("tail", "clip"), ("tail", "Bucket"), ("temperature", 0.0),
                                         ("temperature", math.inf), ("alpha_ce", -1.0), ("alpha_cos", math.nan)])
def test_bad_scalar(name, value):
    args = make_sparse((3, 14), 1001, k=7)
    with pytest.raises(RuntimeError, match=f"^sparse_triple_loss: {name} "):
        FORWARD(*args._replace(**{name: value}))


def test_float64_needs_float64_everywhere():
    args = upcast(make_sparse(k=7))._replace(teacher_logsumexp=make_sparse(k=7).teacher_logsumexp)
    with pytest.raises(RuntimeError, match="^sparse_triple_loss: teacher_logsumexp must be float64"):
        FORWARD(*args)
    args = upcast(make_sparse(k=7))
    with pytest.raises(RuntimeError, match="^sparse_triple_loss: teacher_hidden must be float64"):
        FORWARD(*args._replace(teacher_hidden=args.teacher_hidden.float()))
