"""fastdistil.sparse_triple_loss and fastdistil.fused_linear_sparse_triple_loss (the triple loss against a cached
top-k teacher) through their Python API and ops: against the float64 reference, k = V against the online loss,
the op contract (opcheck, torch.compile) and bad input. The kernels' own parity, ISA by ISA and dtype by dtype,
is in test_sparse_triple_loss_cpu.py and test_triton_sparse_triple_loss.py."""

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdistil
from fastdistil import fused_linear_sparse_triple_loss, sparse_triple_loss
from fastdistil.ops import extension
from fastdistil.ops.reference import sparse_triple_loss_reference, teacher_topk
from helpers import FP32_GRAD_RTOL, FP32_LOSS_RTOL, TERMS, assert_close, make_inputs

GRAD_OUTPUT = 1.7
DIFFERENTIABLE = ("student_input", "student_weight", "student_bias", "student_hidden")
needs_ext = pytest.mark.skipif(not extension.AVAILABLE, reason="fastdistil._C is not built")


def sparse_inputs(k, lead=(41,), vocab=1001, dtype=torch.float32, temperature=2.0, **kwargs):
    """make_inputs' dense inputs with the teacher replaced by what a cache keeps of it: a dict of the sparse
    op's tensors."""
    dense = make_inputs(lead=lead, vocab=vocab, dtype=dtype, **kwargs)
    values, indices, logsumexp = teacher_topk(dense.teacher_logits.double(), k, temperature)
    return dict(student_logits=dense.student_logits, teacher_topk_logits=values.to(dtype),
                teacher_topk_indices=indices, teacher_logsumexp=logsumexp.float(), labels=dense.labels,
                student_hidden=dense.student_hidden, teacher_hidden=dense.teacher_hidden,
                attention_mask=dense.attention_mask), dense


def as64(inputs):
    out = {name: (x.detach().double() if x.is_floating_point() else x) for name, x in inputs.items()}
    out["student_logits"].requires_grad_()
    out["student_hidden"].requires_grad_()
    return out


def terms_and_grads(fn, inputs, grad_output=GRAD_OUTPUT, **kwargs):
    out = fn(**inputs, **kwargs)
    grads = torch.autograd.grad(out.loss, (inputs["student_logits"], inputs["student_hidden"]),
                                grad_outputs=torch.tensor(grad_output, dtype=out.loss.dtype))
    return tuple(t.detach() for t in out), grads


def assert_matches(actual, expected, terms=TERMS):
    """The named terms and both gradients."""
    (values, grads), (values64, grads64) = actual, expected
    for name, a, e in zip(TERMS, values, values64):
        if name in terms:
            assert_close(a, e, FP32_LOSS_RTOL, name)
    for name, a, e in zip(("grad_student_logits", "grad_student_hidden"), grads, grads64):
        assert_close(a, e, FP32_GRAD_RTOL, name)


@needs_ext
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("k", [1, 8, 1001])
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_api_matches_the_float64_reference(k, tail, restrict):
    inputs, _ = sparse_inputs(k, lead=(3, 17))
    kwargs = dict(temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=restrict,
                  tail=tail)
    actual = terms_and_grads(sparse_triple_loss, inputs, **kwargs)
    assert actual[0][TERMS.index("loss_mse")] == 0
    reference = {key: value for key, value in kwargs.items()}
    assert_matches(actual, terms_and_grads(sparse_triple_loss_reference, as64(inputs), **reference))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), vocab=st.integers(2, 90), temperature=st.sampled_from([0.5, 1.0, 2.0, 3.7]),
       tail=st.sampled_from(["bucket", "renormalize"]), seed=st.integers(0, 2**16), restrict=st.booleans())
def test_k_equal_to_v_is_the_online_loss(rows, vocab, temperature, tail, seed, restrict):
    """With every entry cached there is no tail and nothing truncated: the online triple loss, both tails."""
    inputs, dense = sparse_inputs(vocab, lead=(rows,), vocab=vocab, temperature=temperature, seed=seed)
    kwargs = dict(temperature=temperature, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=restrict)
    online = terms_and_grads(fastdistil.triple_loss, dict(zip(dense._fields[:6], dense[:6])), **kwargs)
    sparse = terms_and_grads(sparse_triple_loss, inputs, tail=tail, **kwargs)
    assert_matches(sparse, online, terms=[t for t in TERMS if t != "loss_mse"])  # the online one logs its MSE


def test_a_larger_k_moves_the_loss_toward_the_online_one():
    """The truncation is the one approximation, and it shrinks with k: |bucket - online| falls as k grows."""
    inputs, dense = sparse_inputs(1, vocab=501)
    online = fastdistil.triple_loss_reference(*dense).loss_ce.item()
    gaps = []
    for k in (2, 16, 128, 501):
        values, indices, logsumexp = teacher_topk(dense.teacher_logits.double(), k, 2.0)
        inputs.update(teacher_topk_logits=values.float(), teacher_topk_indices=indices,
                      teacher_logsumexp=logsumexp.float())
        gaps.append(abs(sparse_triple_loss_reference(**inputs).loss_ce.item() - online))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-4 * online, gaps


def test_the_reference_bucket_is_the_kl_of_the_lumped_distributions():
    """bucket's KL is, by definition, the KL between the teacher and student distributions over k + 1 classes
    (the top-k entries and everything else lumped), computed here from dense logits in float64."""
    inputs, dense = sparse_inputs(5, vocab=64, label_frac=0.0)
    t = dense.teacher_logits.double() / 2.0
    s = dense.student_logits.detach().double() / 2.0
    idx = inputs["teacher_topk_indices"].long()
    rows = dense.attention_mask.bool()

    def lumped(logits):
        p = logits.softmax(-1)
        top = p.gather(-1, idx)
        return torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)

    q, p = lumped(t)[rows], lumped(s)[rows]
    expected = (q * (q / p).log()).sum(-1).mean() * 4.0
    exact = as64(inputs) | dict(teacher_logsumexp=teacher_topk(dense.teacher_logits.double(), 5, 2.0)[2],
                                teacher_topk_logits=dense.teacher_logits.double().gather(-1, idx))
    got = sparse_triple_loss_reference(**exact, alpha_cos=0.0).loss_ce
    assert torch.allclose(got, expected, rtol=1e-10)


def detached(inputs: dict, requires_grad: bool) -> tuple:
    return tuple(x.detach().requires_grad_(requires_grad and x.requires_grad) if x is not None else x
                 for x in inputs.values())


# The private forwards' autograd scales their gradient outputs in place, so with requires_grad they are checked
# through the public ops only, which never expose them (as test_op_registration.py does for the online ones).
@needs_ext
@pytest.mark.parametrize("op, requires_grad", [("_sparse_triple_loss_forward", False), ("sparse_triple_loss", False),
                                               ("sparse_triple_loss", True)])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_opcheck(op, requires_grad, tail):
    inputs, _ = sparse_inputs(8, lead=(2, 9), vocab=67)
    args = (*detached(inputs, requires_grad), 2.0, 5.0, 2.0, 1.0, False, tail)
    torch.library.opcheck(getattr(torch.ops.fastdistil, op), args)


@needs_ext
def test_compile_fullgraph_matches_eager():
    inputs, _ = sparse_inputs(8, lead=(2, 9), vocab=67)
    eager = sparse_triple_loss(**inputs)
    compiled = torch.compile(sparse_triple_loss, fullgraph=True, backend="aot_eager")(**inputs)
    for name, a, b in zip(TERMS, compiled, eager):
        assert torch.equal(a.detach(), b.detach()), name


# --- the fused projection -------------------------------------------------------------------------------------

def projection_inputs(k, lead=(3, 23), vocab=301, dim=16, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1 if bias else None
    t_logits = (x + 0.5 * torch.randn(x.shape, generator=gen, dtype=torch.float64)) @ weight.t()
    values, indices, logsumexp = teacher_topk(t_logits, k, 2.0)
    dense = make_inputs(lead=lead, vocab=vocab, dim=8, seed=seed)
    return dict(student_input=x.float().requires_grad_(), student_weight=weight.float().requires_grad_(),
                student_bias=b.float().requires_grad_() if bias else None, teacher_topk_logits=values.float(),
                teacher_topk_indices=indices, teacher_logsumexp=logsumexp.float(), labels=dense.labels,
                student_hidden=dense.student_hidden, teacher_hidden=dense.teacher_hidden,
                attention_mask=dense.attention_mask)


def project_then_reference(inputs, **kwargs):
    x = {key: (v.detach().double().requires_grad_(v.requires_grad) if v is not None and v.is_floating_point()
               else v) for key, v in inputs.items()}
    logits = x["student_input"] @ x["student_weight"].t()
    if x["student_bias"] is not None:
        logits = logits + x["student_bias"]
    out = sparse_triple_loss_reference(logits, *(x[key] for key in list(x)[3:]), **kwargs)
    return out, x


def fused_terms_and_grads(inputs, **kwargs):
    out = fused_linear_sparse_triple_loss(**inputs, **kwargs)
    wrt = [inputs[key] for key in DIFFERENTIABLE if inputs[key] is not None]
    return tuple(t.detach() for t in out), torch.autograd.grad(out.loss * GRAD_OUTPUT, wrt)


@needs_ext
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("chunk_size", [0, 7, 1000], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fused_projection_matches_projecting_then_the_reference(tail, restrict, chunk_size, bias):
    inputs = projection_inputs(9, bias=bias)
    kwargs = dict(temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=restrict,
                  tail=tail)
    terms, grads = fused_terms_and_grads(inputs, chunk_size=chunk_size, **kwargs)
    out, x = project_then_reference(inputs, **kwargs)
    wrt = [x[key] for key in DIFFERENTIABLE if x[key] is not None]
    grads64 = torch.autograd.grad(out.loss * GRAD_OUTPUT, wrt)
    for name, a, e in zip(TERMS, terms, out):
        assert_close(a, e.detach(), FP32_LOSS_RTOL, name)
    for a, e in zip(grads, grads64):
        assert_close(a, e, FP32_GRAD_RTOL, "gradient")


@needs_ext
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_the_chunk_loop_with_the_triton_loss_kernel(monkeypatch, tail, restrict):
    """The chunks fed to the Triton kernel, normalized by the batch's counts on the device, as on CUDA; here on
    CPU tensors under Triton's interpreter (conftest.py asks for it before anything imports Triton)."""
    pytest.importorskip("triton")
    module = sys.modules["fastdistil.ops.fused_linear_sparse_triple_loss"]
    monkeypatch.setattr(module, "chunk_loss_for", lambda device: module._triton_chunk_loss)
    inputs = projection_inputs(9, lead=(4, 20))
    inputs["attention_mask"][1] = 0  # a whole chunk of padding
    inputs["labels"][1] = -100
    kwargs = dict(temperature=2.0, restrict_ce_to_mask=restrict, tail=tail)
    terms, grads = fused_terms_and_grads(inputs, chunk_size=16, **kwargs)
    out, x = project_then_reference(inputs, **kwargs)
    grads64 = torch.autograd.grad(out.loss * GRAD_OUTPUT, [x[key] for key in DIFFERENTIABLE])
    for name, a, e in zip(TERMS + DIFFERENTIABLE, terms + grads, tuple(t.detach() for t in out) + grads64):
        assert_close(a, e, FP32_GRAD_RTOL, name)


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_fused_projection_opcheck(requires_grad):
    inputs = projection_inputs(5, lead=(2, 7), vocab=67)
    args = (*detached(inputs, requires_grad), 2.0, 5.0, 2.0, 1.0, False, "bucket", 4)
    torch.library.opcheck(torch.ops.fastdistil.fused_linear_sparse_triple_loss, args)
    if not requires_grad:
        torch.library.opcheck(torch.ops.fastdistil._fused_linear_sparse_triple_loss_forward, args)


# --- bad input ------------------------------------------------------------------------------------------------

BAD = [
    (dict(teacher_topk_logits=torch.zeros(41, 0)), ValueError, "teacher_topk_logits must have shape"),
    (dict(teacher_topk_logits=torch.zeros(41, 1002), teacher_topk_indices=torch.zeros(41, 1002, dtype=torch.int32)),
     ValueError, "1 <= k <= 1001"),
    (dict(teacher_topk_indices=torch.zeros(41, 8)), TypeError, "teacher_topk_indices must be int16, int32 or int64"),
    (dict(teacher_topk_indices=torch.zeros(41, 7, dtype=torch.int16)), ValueError,
     "teacher_topk_indices must have the shape"),
    (dict(teacher_topk_indices=torch.full((41, 8), 1001, dtype=torch.int16)), ValueError,
     r"teacher_topk_indices must be in \[0, 1001\), got 1001"),
    (dict(teacher_logsumexp=torch.zeros(41)), ValueError, r"teacher_logsumexp must have shape \(41, 2\)"),
    (dict(teacher_logsumexp=torch.zeros(41, 2, dtype=torch.float16)), TypeError,
     "teacher_logsumexp must be torch.float32"),
    (dict(tail="drop"), ValueError, "tail must be one of"),
]


@pytest.mark.parametrize("bad,error,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_is_named(bad, error, message):
    inputs, _ = sparse_inputs(8)
    kwargs = {key: bad.pop(key) for key in list(bad) if key == "tail"}
    inputs.update(bad)
    with pytest.raises(error, match=message):
        sparse_triple_loss(**inputs, **kwargs)


@needs_ext
def test_fused_projection_bad_input_is_named():
    inputs = projection_inputs(5)
    inputs["teacher_topk_indices"] = inputs["teacher_topk_indices"].float()
    with pytest.raises(TypeError, match="fused_linear_sparse_triple_loss: teacher_topk_indices must be int16"):
        fused_linear_sparse_triple_loss(**inputs)
    inputs = projection_inputs(5)
    with pytest.raises(ValueError, match="fused_linear_sparse_triple_loss: tail must be one of"):
        fused_linear_sparse_triple_loss(**inputs, tail="none")
