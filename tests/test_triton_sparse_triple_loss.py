"""The Triton sparse (top-k teacher) triple loss (kernels/sparse_triple_loss.py) against the float64 reference.

The oracle is fastdistil/ops/reference.py: sparse_triple_loss_reference, run in float64 on the same (already
rounded) inputs, and autograd of it for both gradients; teacher_topk makes the cached teacher from dense logits.
The launcher is called directly and its stored logits gradient divided by logits_grad_scale. As in
tests/test_triton_triple_loss.py, without a GPU the kernels run on CPU tensors in Triton's interpreter (no bf16
there), at small shapes, with the block size shrunk to reach the multi-block paths; the full-size comparison
runs only on CUDA.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when @triton.jit runs, i.e. when fastdistil.kernels.sparse_triple_loss is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdistil  # noqa: E402
from fastdistil import SparseTripleLossArgs, TripleLossOutput  # noqa: E402
from fastdistil.ops.reference import TAIL_FLOOR, sparse_triple_loss_reference, teacher_topk  # noqa: E402
from helpers import (FP32_GRAD_RTOL, FP32_LOSS_RTOL, LOW_PRECISION_FLOOR, TERMS, assert_close,  # noqa: E402
                     assert_within_pytorch_error, make_inputs)
# Skips the module without Triton, so first; _kernels_runnable (autouse) fails a run whose kernels were compiled
# for a GPU this machine lacks.
from test_triton_triple_loss import (DEVICE, INTERPRETED, _kernels_runnable,  # noqa: E402, F401
                                     kernel_module as online_module)
from fastdistil.kernels import sparse_triple_loss as kernel_module  # noqa: E402
from fastdistil.kernels.sparse_triple_loss import sparse_triple_loss_forward  # noqa: E402

NAMES = TERMS + ("grad_student_logits", "grad_student_hidden")
VOCAB = 203  # odd: a partial last block, and no 32-bit bitmask word boundary at the end of the row


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 elements: V = 203 spans four, k = 100 two, D = 80 two."""
    monkeypatch.setattr(online_module, "_MAX_BLOCK", 64)


def sparse_inputs(k, lead=(3, 7), vocab=VOCAB, dim=24, dtype=torch.float32, index_dtype=None, temperature=2.0,
                  teacher=None, student=None, **make_kwargs):
    """A SparseTripleLossArgs on DEVICE: make_inputs' dense tensors (teacher/student: functions replacing the
    dense logits first), the teacher cached by teacher_topk at the given temperature, indices cast to
    index_dtype (teacher_topk's int16 if None)."""
    dense = make_inputs(lead=lead, vocab=vocab, dim=dim, dtype=dtype, **make_kwargs)
    s = dense.student_logits.detach()
    t = dense.teacher_logits
    if student is not None:
        s = student(s)
    if teacher is not None:
        t = teacher(t)
    topk, idx, lse = teacher_topk(t, k, temperature)
    args = SparseTripleLossArgs(s, topk, idx if index_dtype is None else idx.to(index_dtype), lse, dense.labels,
                                dense.student_hidden.detach(), dense.teacher_hidden, dense.attention_mask,
                                temperature=temperature)
    return args._replace(**{name: x.to(DEVICE) for name, x in args._asdict().items() if isinstance(x, torch.Tensor)})


def launch(args, **kwargs):
    """The launcher's terms and gradients of loss (the logits one divided by logits_grad_scale, in float64)."""
    out = sparse_triple_loss_forward(*args._replace(**kwargs))
    grad_scale = out[7]
    assert grad_scale.dim() == 0 and grad_scale.dtype == out[0].dtype
    return out[:5], (out[5].double() / grad_scale.double(), out[6]), out


def reference(args, dtype=torch.float64, **kwargs):
    """The reference's terms and autograd gradients of loss, on args' floating tensors cast to dtype (None: as
    given, what PyTorch computes at the inputs' dtype)."""
    def cast(x):
        return x.detach().to(dtype) if dtype is not None and x.is_floating_point() else x

    args = args._replace(**{name: cast(x) for name, x in args._asdict().items() if isinstance(x, torch.Tensor)})
    s, h = args.student_logits.requires_grad_(), args.student_hidden.requires_grad_()
    out = sparse_triple_loss_reference(*args._replace(**kwargs))
    grads = torch.autograd.grad(out.loss, (s, h), allow_unused=True)
    grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (s, h)))
    return tuple(x.detach() for x in out), grads


def check(args, **kwargs):
    """The launcher against the float64 reference: fp32 within FP32_*_RTOL of the largest magnitude (or, for
    the cosine gradient's cancellation, the 2x rule against PyTorch in fp32), fp16 within 2x the error of the
    reference computed at fp16 (the flash-attention rule). Returns the launcher's (terms, grads)."""
    terms, grads, out = launch(args, **kwargs)
    terms64, grads64 = reference(args, **kwargs)
    for name, term in zip(TERMS, terms):
        assert term.dtype == torch.float32 and term.dim() == 0, f"{name}: {term.dtype}, shape {term.shape}"
    assert out[5].dtype == args.student_logits.dtype and out[5].shape == args.student_logits.shape
    assert out[5].is_contiguous() and out[6].shape == args.student_hidden.shape
    assert terms[4] == 0, "loss_mse"
    pytorch = None
    for i, (name, a, e) in enumerate(zip(NAMES, terms + grads, terms64 + grads64)):
        e = e.to(a.device)
        if args.student_logits.dtype == torch.float32:
            try:
                assert_close(a, e, FP32_LOSS_RTOL if a.dim() == 0 else FP32_GRAD_RTOL, name)
                continue
            except AssertionError:
                if name != "grad_student_hidden":
                    raise
        if pytorch is None:
            pytorch_terms, pytorch_grads = reference(args, dtype=None, **kwargs)
            pytorch = pytorch_terms + pytorch_grads
        floor = 0.0 if args.student_logits.dtype == torch.float32 else LOW_PRECISION_FLOOR
        assert_within_pytorch_error(a, pytorch[i].to(a.device), e, name, floor)
    return TripleLossOutput(*terms), grads


TAILS = ["bucket", "renormalize"]


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [1, 5, VOCAB], ids=["k1", "k5", "kV"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(dtype, k, tail):
    """[B, L] rows with right padding, an odd V; k = 1, a few, and all of V."""
    check(sparse_inputs(k, dtype=dtype), tail=tail)


@pytest.mark.parametrize("dtype, k, tail, kwargs", [
    (torch.float32, 5, "bucket", dict(restrict_ce_to_mask=True)),
    (torch.float32, 5, "renormalize", dict(restrict_ce_to_mask=True, temperature=1.5)),
    (torch.float16, 17, "bucket", dict(restrict_ce_to_mask=True, temperature=1.0)),
    (torch.float32, 17, "bucket", dict(temperature=4.0, alpha_ce=2.5, alpha_mlm=0.5, alpha_cos=3.0)),
    (torch.float32, 5, "bucket", dict(alpha_ce=1.0, alpha_mlm=0.0, alpha_cos=0.0)),
    (torch.float32, 1, "bucket", dict(vocab=1, dim=3)),
    (torch.float32, 2, "bucket", dict(vocab=3, dim=3, temperature=1.5, restrict_ce_to_mask=True)),
    (torch.float32, 4, "renormalize", dict(lead=(2, 0), vocab=7, dim=3)),
], ids=["restrict", "restrict-renormalize-T1.5", "fp16-restrict-T1", "T4-alphas", "ce-only", "V1", "V3-k2",
        "no-rows"])
def test_matches_reference_options(dtype, k, tail, kwargs):
    """restrict_ce_to_mask with labels on padding rows (rows in the MLM term only), temperatures with and
    without the T in {1, 2} shortcut, other weights, tiny vocabularies, no rows at all."""
    kwargs = dict(kwargs)
    shape = {name: kwargs.pop(name) for name in ("lead", "vocab", "dim", "temperature") if name in kwargs}
    args = sparse_inputs(k, dtype=dtype, labels_on_padding=True, pad_frac=0.5, **shape)
    check(args, tail=tail, **kwargs)


@pytest.mark.parametrize("dtype, tail", [(torch.float32, "bucket"), (torch.float32, "renormalize"),
                                         (torch.float16, "bucket")], ids=["fp32-bucket", "fp32-renormalize",
                                                                          "fp16-bucket"])
def test_matches_reference_across_blocks(small_blocks, dtype, tail):
    """Online softmax and the tail sum across blocks of V, and the top-k loops across blocks of k."""
    check(sparse_inputs(100, lead=(2, 5), dim=80, dtype=dtype, temperature=1.5), tail=tail)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_index_dtypes_give_identical_results(index_dtype):
    """int32 and int64 indices give bit for bit the int16 results; the top-k order does not matter either."""
    args = sparse_inputs(9)
    expected = sparse_triple_loss_forward(*args)
    perm = torch.randperm(9, device=DEVICE)
    shuffled = args._replace(teacher_topk_logits=args.teacher_topk_logits[..., perm],
                             teacher_topk_indices=args.teacher_topk_indices[..., perm].to(index_dtype))
    out = sparse_triple_loss_forward(*shuffled)
    for name, a, b in zip(NAMES + ("logits_grad_scale",), out, expected):
        # the top-k entries are summed in another order
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(sparse_triple_loss_forward(*args._replace(
        teacher_topk_indices=args.teacher_topk_indices.to(index_dtype)))[5], expected[5])


@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_no_labels(restrict):
    """No MLM targets: loss_mlm is 0 (restricted: so is the KL, with no rows), never NaN."""
    args = sparse_inputs(5, label_frac=0.0)
    assert (args.labels == -100).all()
    terms, grads = check(args, restrict_ce_to_mask=restrict)
    assert terms.loss_mlm == 0
    if restrict:
        assert terms.loss_ce == 0 and (grads[0] == 0).all()


def test_all_padding_gives_zero():
    args = sparse_inputs(5, label_frac=0.0)
    args = args._replace(attention_mask=torch.zeros_like(args.attention_mask))
    terms, grads = check(args)
    assert all(term == 0 for term in terms) and all((g == 0).all() for g in grads)


def _spread(x, k, low=-1e4):
    """x with all but each row's k largest entries set to low (far below: their mass is exp(-5000))."""
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(k, dim=-1).indices, True)
    return torch.where(keep, x, torch.full_like(x, low))


def _student_tail_below(args, gap):
    """args with the student's logits off the teacher's top-k set to gap below the row's largest: with a gap of
    1e4 its tail sum S underflows to 0."""
    s = args.student_logits
    on_topk = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, args.teacher_topk_indices.long(), True)
    return args._replace(student_logits=torch.where(on_topk, s, s.amax(-1, keepdim=True) - gap))


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("student_tail", ["student-tail", "no-student-tail"])
def test_teacher_tail_mass_zero(tail, student_tail):
    """The teacher's whole mass in its top-k (r = 0 up to rounding), with and without student mass off it."""
    k = 7
    args = sparse_inputs(k, teacher=lambda t: _spread(t, k))
    check(_student_tail_below(args, 1e4) if student_tail == "no-student-tail" else args, tail=tail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_student_tail_below_the_floor_with_teacher_mass_there(dtype):
    """r > 0 but the student's tail underflows: S is floored at TAIL_FLOOR, so the tail term is
    r (log r - log TAIL_FLOOR), and the tail gets no gradient through S (the clamp's)."""
    args = _student_tail_below(sparse_inputs(5, dtype=dtype), 1e4)
    terms, _ = check(args)
    log_q = args.teacher_topk_logits.double() / args.temperature - args.teacher_logsumexp[..., 1:].double()
    assert (log_q.exp().sum(-1)[args.attention_mask.bool()] < 0.99).all()  # r > 0.01: the floor is reached
    assert terms.loss_ce > 0.01 * (math.log(0.01) - math.log(TAIL_FLOOR))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_student_mass_in_the_top_k(dtype):
    """A student tail of ~1e-11, which 1 - sum_k p_k cannot resolve in fp32 (it cancels to 0 or 6e-8): S is
    summed over the tail entries, and the tail term and the tail gradient r p_j / S are exact."""
    args = _student_tail_below(sparse_inputs(5, dtype=dtype), 60.0)
    check(args)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_extreme_logits(dtype, tail):
    """Logits of +-1e4: the softmaxes are one-hot, the student's tail underflows in many rows (the TAIL_FLOOR
    clamp), and everything stays finite and exact."""
    g = torch.Generator().manual_seed(1)

    def spiked(x):
        return x + (torch.randint(-1, 2, x.shape, generator=g) * 1e4).to(x.dtype)

    terms, _ = check(sparse_inputs(5, lead=(3, 5), dtype=dtype, student=spiked, teacher=spiked), tail=tail)
    assert terms.loss_ce > 1e3


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_k_equal_to_vocab_is_the_online_loss(tail, restrict):
    """With k = V (indices in any order) both tails are the online loss: the Triton online kernel and the
    online reference, alpha_mse = 0."""
    dense = make_inputs(lead=(3, 7), vocab=VOCAB, dim=24, labels_on_padding=True)
    dense = dense._replace(**{name: x.detach().to(DEVICE) for name, x in dense._asdict().items()
                              if isinstance(x, torch.Tensor)})
    topk, idx, lse = teacher_topk(dense.teacher_logits, VOCAB, 2.0)
    perm = torch.randperm(VOCAB, device=DEVICE)
    sparse = SparseTripleLossArgs(dense.student_logits, topk[..., perm], idx[..., perm].to(torch.int32), lse,
                                  dense.labels, dense.student_hidden, dense.teacher_hidden, dense.attention_mask,
                                  restrict_ce_to_mask=restrict, tail=tail)
    terms, grads, _ = launch(sparse)
    online = online_module.triple_loss_forward(*dense._replace(restrict_ce_to_mask=restrict))
    online_grads = (online[5].double() / online[7].double(), online[6])
    reference_terms, _ = reference(sparse._replace(tail="bucket"))
    online_reference = fastdistil.triple_loss_reference(*dense._replace(restrict_ce_to_mask=restrict))
    assert terms[4] == 0  # the online op logs its MSE term, which the sparse one cannot compute
    for name, a, b, c in zip(TERMS[:4], terms, online[:4], online_reference):
        assert_close(a, b, FP32_LOSS_RTOL, name + " (online Triton)")
        assert_close(a, c.to(a.device), FP32_LOSS_RTOL, name + " (online reference)")
    for name, a, b in zip(NAMES[5:], grads, online_grads):
        assert_close(a, b, FP32_GRAD_RTOL, name + " (online Triton)")
    for name, a, b in zip(TERMS, terms, reference_terms):
        assert_close(a, b.to(a.device), FP32_LOSS_RTOL, name)


def test_fp16_gradient_keeps_entries_below_fp16_unscaled():
    """fp16 logits: the gradient is stored times logits_grad_scale (> 1 here), so tail entries below fp16's
    smallest subnormal unscaled come back, each within fp16's rounding of the scaled value."""
    args = sparse_inputs(5, lead=(64,), dtype=torch.float16, logit_std=4.0, label_frac=0.5)
    _, grads, out = launch(args)
    _, grads64 = reference(args)
    scale = out[7].item()
    assert scale > 1
    exact = grads64[0].to(DEVICE)
    kept = exact.abs() * scale >= 2**-14  # normal fp16 values once scaled
    assert (kept & (exact.abs() < 2**-25)).any(), "no entry that fp16 would lose unscaled"
    assert not ((grads[0] == 0) & kept).any()
    rel = ((grads[0] - exact).abs() / exact.abs())[kept]
    assert rel.max().item() < 2**-8


def test_float64_matches_reference():
    """float64 inputs (gradient checks) are computed in float64 and give float64 terms, exact to ~1e-12."""
    args = sparse_inputs(5, lead=(2, 3), vocab=11, dim=5, dtype=torch.float64, label_frac=0.5, temperature=1.5)
    for tail in TAILS:
        terms, grads, out = launch(args, tail=tail)
        terms64, grads64 = reference(args, tail=tail)
        assert out[5].dtype == torch.float64 and out[7] == 1
        for name, a, b in zip(NAMES, terms + grads, terms64 + grads64):
            assert a.dtype == torch.float64, name
            torch.testing.assert_close(a, b.to(a.device), rtol=1e-10, atol=1e-12, msg=name)


def test_gradcheck_through_the_op():
    """fastdistil.sparse_triple_loss(backend="triton"): the launcher behind the op's autograd."""
    args = sparse_inputs(4, lead=(2, 3), vocab=9, dim=5, dtype=torch.float64, label_frac=0.5, temperature=1.5)

    def loss(student_logits, student_hidden):
        return fastdistil.sparse_triple_loss(*args._replace(student_logits=student_logits,
                                                            student_hidden=student_hidden), backend="triton").loss

    inputs = (args.student_logits.requires_grad_(), args.student_hidden.requires_grad_())
    # fast_mode: a few random directions instead of one interpreted launch per input element
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)


def test_traceable_launch_and_inputs_untouched():
    """traceable=True (torch.library.wrap_triton on a GPU) gives the eager results, and no input is written;
    strided inputs give the results of their contiguous copies."""
    args = sparse_inputs(5, lead=(2, 6))
    before = [x.clone() for x in args if isinstance(x, torch.Tensor)]
    eager = sparse_triple_loss_forward(*args)
    traced = sparse_triple_loss_forward(*args, traceable=True)
    wide = torch.randn(2, 6, VOCAB + 13, device=DEVICE)
    wide[..., :VOCAB] = args.student_logits
    strided = sparse_triple_loss_forward(*args._replace(
        student_logits=wide[..., :VOCAB],
        teacher_topk_indices=args.teacher_topk_indices.transpose(0, 1).contiguous().transpose(0, 1)))
    for name, a, b, c in zip(NAMES + ("logits_grad_scale",), eager, traced, strided):
        assert torch.equal(a, b) and torch.equal(a, c), name
    for x, x0 in zip((x for x in args if isinstance(x, torch.Tensor)), before):
        assert torch.equal(x, x0)


def test_topk_bitmask():
    """Bit v % 32 of word v // 32 for each index, bit 31 included, V not a multiple of 32."""
    vocab = 70
    indices = torch.tensor([[0, 31, 32, 63, 69], [5, 6, 64, 1, 31]], device=DEVICE)
    words = kernel_module._topk_bitmask(indices.to(torch.int16), vocab)
    assert words.dtype == torch.int32 and words.shape == (2, 3)
    for row, word in zip(indices.tolist(), words.tolist()):
        bits = [(w >> b) & 1 for w in word for b in range(32)]
        assert [v for v, bit in enumerate(bits) if bit] == sorted(row)


def test_launcher_rejects_an_unknown_tail():
    with pytest.raises(ValueError, match="tail"):
        sparse_triple_loss_forward(*sparse_inputs(5, lead=(2,))._replace(tail="drop"))


@pytest.mark.parametrize("change, error, name", [
    (lambda a: a._replace(tail="drop"), ValueError, "tail"),
    (lambda a: a._replace(teacher_topk_indices=a.teacher_topk_indices.float()), TypeError,
     "teacher_topk_indices"),
    (lambda a: a._replace(teacher_topk_indices=a.teacher_topk_indices[..., :3]), ValueError,
     "teacher_topk_indices"),
    (lambda a: a._replace(teacher_logsumexp=a.teacher_logsumexp[..., :1]), ValueError, "teacher_logsumexp"),
    (lambda a: a._replace(teacher_logsumexp=a.teacher_logsumexp.half()), TypeError, "teacher_logsumexp"),
    (lambda a: a._replace(student_logits=a.student_logits[..., :4]), ValueError, "teacher_topk_logits"),
    (lambda a: a._replace(labels=a.labels.int()), TypeError, "labels"),
], ids=["tail", "index-dtype", "index-shape", "logsumexp-shape", "logsumexp-dtype", "k-above-V", "labels"])
def test_the_triton_forward_rejects_bad_input_by_name(change, error, name):
    """The op's Triton implementation (fastdistil/ops/sparse_triple_loss.py) checks before launching."""
    from fastdistil.ops.sparse_triple_loss import triton_forward

    with pytest.raises(error, match=name):
        triton_forward(*change(sparse_inputs(5, lead=(2, 3))))


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's kernels are what torch's analysis cannot read")
def test_compile_probe_detects_an_analysis_that_finds_every_input_written():
    why = kernel_module.traced_compile_unsupported.__wrapped__()
    assert why is not None and "writing" in why, why


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_full_size_on_cuda(dtype, tail):
    """DistilBERT's shape: 2048 tokens (16 x 128), V = 30522, D = 768, k = 128 (int16 indices); deterministic,
    and the same through wrap_triton (traceable=True)."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no bf16 on this GPU")
    args = sparse_inputs(128, lead=(16, 128), vocab=30522, dim=768, dtype=dtype)
    check(args, tail=tail)
    first = sparse_triple_loss_forward(*args._replace(tail=tail))
    for name, a, b, c in zip(NAMES + ("logits_grad_scale",), first, sparse_triple_loss_forward(*args._replace(
            tail=tail)), sparse_triple_loss_forward(*args._replace(tail=tail), traceable=True)):
        assert torch.equal(a, b) and torch.equal(a, c), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiles_with_the_kernel_in_the_graph_on_cuda():
    """torch.compile(fullgraph=True) of the launcher with traceable=True, when torch's analysis of the kernels
    can be trusted on this torch and Triton."""
    why = kernel_module.traced_compile_unsupported()
    if why:
        pytest.skip(why)
    args = sparse_inputs(32, lead=(4, 16), vocab=30522, dim=64)
    eager = sparse_triple_loss_forward(*args)
    compiled = torch.compile(lambda *a: sparse_triple_loss_forward(*a, traceable=True), fullgraph=True)(*args)
    for name, a, b in zip(NAMES + ("logits_grad_scale",), eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=name)
