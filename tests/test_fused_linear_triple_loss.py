"""fastdistil.fused_linear_triple_loss against projecting in float64 and calling the reference loss."""

import functools
import sys

import pytest
import torch

import fastdistil
from fastdistil import fused_linear_triple_loss
from helpers import (FP32_GRAD_RTOL, FP32_LOSS_RTOL, LOSS_SCALE, TERMS, assert_close,
                     assert_within_pytorch_error)

OPS = torch.ops.fastdistil
V, D, H = 301, 16, 8  # V odd: no chunk or vector width divides it
GRAD_OUTPUT = 1.7
DIFFERENTIABLE = ("student_input", "student_weight", "student_bias", "student_hidden")
ALPHA_MSE = 0.05  # the logit MSE of these 301-entry rows is ~3e3: this keeps it beside the other terms


def make_inputs(lead=(3, 23), dtype=torch.float32, bias=True, pad_from=17, seed=0, vocab=V, dim=D):
    """Inputs as a model produces them: [B, L, D] projection inputs, [V, D] weights, the last 6 positions of
    every sequence padding (one of them labelled, which MLM still counts), ~30 % of real positions labelled."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    attention_mask = (torch.arange(lead[-1]) < pad_from).expand(*lead).to(torch.int64)
    labels = torch.where(torch.rand(*lead, generator=gen) < 0.3, torch.randint(0, vocab, lead, generator=gen), -100)
    labels = torch.where(attention_mask.bool(), labels, -100)
    labels[..., -1] = 7
    return dict(
        student_input=randn(*lead, dim).requires_grad_(),
        student_weight=randn(vocab, dim, scale=0.5 * (D / dim) ** 0.5).requires_grad_(),
        student_bias=randn(vocab, scale=0.1).requires_grad_() if bias else None,
        teacher_input=randn(*lead, dim), teacher_weight=randn(vocab, dim, scale=0.5 * (D / dim) ** 0.5),
        teacher_bias=randn(vocab, scale=0.1) if bias else None,
        labels=labels, student_hidden=randn(*lead, H).requires_grad_(), teacher_hidden=randn(*lead, H),
        attention_mask=attention_mask)


def cast(inputs, dtype):
    return {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if v is not None and v.is_floating_point()
                else v) for k, v in inputs.items()}


def project_then_loss(inputs, loss=None, **kwargs):
    """The materialized path: both models' logits, then the loss (by default the reference in float64, else
    the op)."""
    x = inputs
    s_logits = x["student_input"] @ x["student_weight"].t()
    t_logits = x["teacher_input"] @ x["teacher_weight"].t()
    if x["student_bias"] is not None:
        s_logits, t_logits = s_logits + x["student_bias"], t_logits + x["teacher_bias"]
    if loss is None:
        loss = fastdistil.triple_loss_reference if s_logits.dtype == torch.float64 else fastdistil.triple_loss
    return loss(s_logits, t_logits, x["labels"], x["student_hidden"], x["teacher_hidden"], x["attention_mask"],
                **kwargs)


def terms_and_grads(fn, inputs, grad_output=GRAD_OUTPUT, **kwargs):
    out = fn(inputs, **kwargs)
    (out.loss * grad_output).backward()
    grads = tuple(inputs[k].grad for k in DIFFERENTIABLE if inputs[k] is not None)
    return tuple(t.detach() for t in out), grads


def fused(inputs, **kwargs):
    return fused_linear_triple_loss(**inputs, **kwargs)


@pytest.mark.parametrize("alpha_mse", [0.0, ALPHA_MSE])
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
@pytest.mark.parametrize("chunk_size", [0, 7, 32, 1000], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_matches_the_materialized_float64_reference(restrict, chunk_size, bias, alpha_mse):
    inputs = make_inputs(bias=bias)
    kwargs = dict(temperature=1.5, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=restrict,
                  alpha_mse=alpha_mse)
    terms, grads = terms_and_grads(fused, cast(inputs, torch.float32), chunk_size=chunk_size, **kwargs)
    terms64, grads64 = terms_and_grads(project_then_loss, cast(inputs, torch.float64), **kwargs)
    for name, a, e in zip(TERMS, terms, terms64):
        assert a.dtype == torch.float32
        assert_close(a, e, FP32_LOSS_RTOL, name)
    for name, a, e in zip(DIFFERENTIABLE, grads, grads64):
        assert a.dtype == torch.float32
        assert_close(a, e, FP32_GRAD_RTOL, name)


@pytest.mark.parametrize("alpha_mse", [0.0, ALPHA_MSE])
def test_bf16_error_is_within_twice_pytorchs(alpha_mse):
    inputs = make_inputs()
    terms, grads = terms_and_grads(fused, cast(inputs, torch.bfloat16), alpha_mse=alpha_mse)
    truth = terms_and_grads(project_then_loss, cast(inputs, torch.float64), alpha_mse=alpha_mse)
    pytorch = terms_and_grads(project_then_loss, cast(inputs, torch.bfloat16), alpha_mse=alpha_mse)
    for name, a, p, e in zip(TERMS + DIFFERENTIABLE, terms + grads, pytorch[0] + pytorch[1], truth[0] + truth[1]):
        assert_within_pytorch_error(a.float(), p.float(), e, name, floor=1e-2)


@pytest.fixture
def triton_chunks(monkeypatch):
    """The chunk loop feeding the Triton loss kernel, as it runs on CUDA; without a GPU, on CPU tensors under
    Triton's interpreter (conftest.py asks for it before anything imports Triton)."""
    pytest.importorskip("triton")
    module = sys.modules["fastdistil.ops.fused_linear_triple_loss"]
    monkeypatch.setattr(module, "chunk_loss_for", lambda device: module._triton_chunk_loss)


@pytest.mark.parametrize("alpha_mse", [0.0, ALPHA_MSE])
@pytest.mark.parametrize("restrict", [False, True], ids=["all-rows", "restrict"])
def test_the_chunk_loop_with_the_triton_loss_kernel(triton_chunks, restrict, alpha_mse):
    inputs = make_inputs(lead=(4, 20), pad_from=14)
    inputs["attention_mask"][1] = 0  # a whole chunk of padding
    inputs["labels"][1] = -100
    kwargs = dict(temperature=2.0, restrict_ce_to_mask=restrict, alpha_mse=alpha_mse)
    terms, grads = terms_and_grads(fused, cast(inputs, torch.float32), chunk_size=16, **kwargs)
    terms64, grads64 = terms_and_grads(project_then_loss, cast(inputs, torch.float64), **kwargs)
    for name, a, e in zip(TERMS + DIFFERENTIABLE, terms + grads, terms64 + grads64):
        assert_close(a, e, FP32_GRAD_RTOL, name)


@pytest.mark.parametrize("alpha_mse", [0.0, ALPHA_MSE])
def test_the_chunk_loop_with_the_triton_loss_kernel_in_fp16(triton_chunks, alpha_mse):
    inputs = make_inputs()
    terms, grads = terms_and_grads(fused, cast(inputs, torch.float16), chunk_size=32, alpha_mse=alpha_mse)
    truth = terms_and_grads(project_then_loss, cast(inputs, torch.float64), alpha_mse=alpha_mse)
    pytorch = terms_and_grads(project_then_loss, cast(inputs, torch.float16), alpha_mse=alpha_mse)
    for name, a, p, e in zip(TERMS + DIFFERENTIABLE, terms + grads, pytorch[0] + pytorch[1], truth[0] + truth[1]):
        assert_within_pytorch_error(a.float(), p.float(), e, name, floor=1e-3)


@pytest.mark.parametrize("chunks", ["cpp", "triton"])
def test_fp16_gradients_under_a_grad_scaler(request, chunks):
    """Backpropagated at the GradScaler's 65,536 as fp16 training does, at BERT's vocabulary, the gradients
    match projecting in fp16 and running the unfused reference by the 2x rule, and so do the rows of the weight
    gradient, one per vocabulary entry, in the worst case and the median: most are sums of the KL gradient's
    tail, which a chunk gradient rounded before the scale loses (its median error was then 5x PyTorch's)."""
    if chunks == "triton":
        request.getfixturevalue("triton_chunks")
    inputs = make_inputs(lead=(8, 40), pad_from=34, vocab=30522)  # enough rows that the scaled gradient fits fp16
    _, grads = terms_and_grads(fused, cast(inputs, torch.float16), LOSS_SCALE, chunk_size=64)
    _, pytorch = terms_and_grads(functools.partial(project_then_loss, loss=fastdistil.triple_loss_reference),
                                 cast(inputs, torch.float16), LOSS_SCALE)
    _, truth = terms_and_grads(project_then_loss, cast(inputs, torch.float64), LOSS_SCALE)
    for name, a, p, e in zip(DIFFERENTIABLE, grads, pytorch, truth):
        assert a.dtype == torch.float16, f"{name}: {a.dtype}"
        assert_within_pytorch_error(a, p, e, name, floor=0.0)
    row_errors = [(x.double() - truth[1]).norm(dim=1) / truth[1].norm(dim=1) for x in (grads[1], pytorch[1])]
    for statistic in (torch.max, torch.median):
        ours, theirs = (statistic(errors).item() for errors in row_errors)
        assert ours <= 2 * theirs, (f"student_weight: {statistic.__name__} relative error of a row {ours:.2e}, "
                                    f"PyTorch's {theirs:.2e}")


@pytest.mark.parametrize("chunks", ["cpp", "triton"])
def test_fp16_chunks_whose_mse_gradient_needs_a_smaller_power_of_two(request, chunks):
    """fp16 with alpha_mse: each chunk's gradient is stored with the power of two its own logits allow
    (kernels/gradient_scale.py), here the two chunks holding a sequence whose teacher logits reach ~3000 beside
    two whose stay below ~10, and the folds of every chunk are brought to one scale: the gradients match
    projecting in fp16 and running the reference by the 2x rule (a fold left at its chunk's scale is off by a
    power of two, up to 2^8 here, and a power of two blind to the MSE term stores the first chunks' entries as
    inf)."""
    if chunks == "triton":
        request.getfixturevalue("triton_chunks")
    inputs = make_inputs(lead=(4, 23))
    inputs["teacher_input"][1] *= 300.0  # rows 18-35 of the 72 kept: chunks 0 and 1 of 23
    kwargs = dict(alpha_mse=0.5, chunk_size=23)
    _, grads = terms_and_grads(fused, cast(inputs, torch.float16), 1.0, **kwargs)
    kwargs.pop("chunk_size")
    _, pytorch = terms_and_grads(functools.partial(project_then_loss, loss=fastdistil.triple_loss_reference),
                                 cast(inputs, torch.float16), 1.0, **kwargs)
    _, truth = terms_and_grads(project_then_loss, cast(inputs, torch.float64), 1.0, **kwargs)
    for name, a, p, e in zip(DIFFERENTIABLE, grads, pytorch, truth):
        assert_within_pytorch_error(a.float(), p.float(), e, name, floor=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bert_shapes_on_cuda(dtype):
    """What the trainer runs on a GPU: 16 x 128 rows of BERT's vocabulary and width in the default chunks, the
    Triton loss kernel per chunk, against projecting and running the reference (float64 truth, the 2x rule in
    16 bits, under the GradScaler's scale in fp16)."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no bf16 on this GPU")
    inputs = {k: v.cuda() if v is not None else None
              for k, v in make_inputs(lead=(16, 128), pad_from=110, vocab=30522, dim=768).items()}
    grad_output = LOSS_SCALE if dtype == torch.float16 else GRAD_OUTPUT
    terms, grads = terms_and_grads(fused, cast(inputs, dtype), grad_output)
    truth = terms_and_grads(project_then_loss, cast(inputs, torch.float64), grad_output)
    if dtype == torch.float32:
        for name, a, e in zip(TERMS + DIFFERENTIABLE, terms + grads, truth[0] + truth[1]):
            assert_close(a, e, FP32_GRAD_RTOL, name)
        return
    pytorch = terms_and_grads(functools.partial(project_then_loss, loss=fastdistil.triple_loss_reference),
                              cast(inputs, dtype), grad_output)
    for name, a, p, e in zip(TERMS + DIFFERENTIABLE, terms + grads, pytorch[0] + pytorch[1], truth[0] + truth[1]):
        assert a.dtype == (torch.float32 if a.dim() == 0 else dtype), f"{name}: {a.dtype}"
        assert_within_pytorch_error(a.float(), p.float(), e, name, floor=1e-3 if a.dim() == 0 else 0.0)


def test_a_projector_tied_to_the_embeddings_accumulates_both_gradients():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(V, D)
    ids = torch.randint(0, V, (2, 11))
    inputs = make_inputs(lead=(2, 11), pad_from=9)
    grads = []
    for loss_fn in (fused, project_then_loss):
        embedding.zero_grad()
        x = embedding(ids)
        tied = {**inputs, "student_input": torch.tanh(x), "student_weight": embedding.weight,
                "student_hidden": x[..., :H]}
        (loss_fn(tied).loss * GRAD_OUTPUT).backward()
        grads.append(embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_padding_only_chunks_and_an_all_padding_batch():
    inputs = make_inputs(lead=(4, 20), pad_from=20)
    inputs["attention_mask"][1:3] = 0  # 40 padding rows in a row: whole chunks of 16 are empty
    inputs["labels"][1:3] = -100
    terms, grads = terms_and_grads(fused, cast(inputs, torch.float32), chunk_size=16)
    terms64, grads64 = terms_and_grads(project_then_loss, cast(inputs, torch.float64))
    for name, a, e in zip(TERMS + DIFFERENTIABLE, terms + grads, terms64 + grads64):
        assert_close(a, e, FP32_GRAD_RTOL, name)

    empty = make_inputs(lead=(2, 5), pad_from=0)
    empty["labels"][:] = -100
    terms, grads = terms_and_grads(fused, cast(empty, torch.float32))
    assert all(t.item() == 0 for t in terms) and all(torch.count_nonzero(g) == 0 for g in grads)


def test_grad_output_of_zero_and_no_grad():
    inputs = cast(make_inputs(), torch.float32)
    out = fused(inputs)
    (out.loss * 0).backward()
    assert all(torch.count_nonzero(inputs[k].grad) == 0 for k in DIFFERENTIABLE)
    with torch.no_grad():
        assert torch.equal(fused(cast(make_inputs(), torch.float32)).loss, out.loss.detach())


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    inputs = make_inputs(lead=(2, 9), pad_from=6)
    args = tuple(v.detach().requires_grad_(requires_grad and k in DIFFERENTIABLE) if v is not None and
                 v.is_floating_point() else v for k, v in inputs.items())
    torch.library.opcheck(OPS.fused_linear_triple_loss.default, args + (2.0, 5.0, 2.0, 1.0, False, 5))
    torch.library.opcheck(OPS.fused_linear_triple_loss.default, args + (2.0, 5.0, 2.0, 1.0, True, 5, ALPHA_MSE))
    if not requires_grad:  # the forward's autograd scales its gradient outputs in place: public op only
        torch.library.opcheck(OPS._fused_linear_triple_loss_forward.default, args + (2.0, 5.0, 2.0, 1.0, True, 0))
        torch.library.opcheck(OPS._fused_linear_triple_loss_forward.default,
                              args + (2.0, 5.0, 2.0, 1.0, False, 4, ALPHA_MSE))


@pytest.mark.parametrize("change, match", [
    (dict(student_weight=torch.zeros(V, D + 1)), "student_weight must be"),
    (dict(teacher_weight=torch.zeros(V + 1, D)), "teacher_weight must be"),
    (dict(student_bias=torch.zeros(V + 1)), "student_bias must be"),
    (dict(labels=torch.zeros(3, 22, dtype=torch.int64)), "labels must have shape"),
    (dict(labels=torch.zeros(3, 23, dtype=torch.int32)), "labels must be int64"),
    (dict(teacher_hidden=torch.zeros(3, 23, H + 1)), "teacher_hidden must have the shape"),
    (dict(student_input=torch.zeros(3, 23, D, dtype=torch.float64)), "student_input must be float32"),
    (dict(attention_mask=torch.ones(3, 23)), "attention_mask must be bool or integer"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(alpha_mlm=-1.0), "alpha_mlm must be >= 0"),
    (dict(alpha_mse=-1.0), "alpha_mse must be >= 0"),
    (dict(alpha_mse=float("nan")), "alpha_mse must be >= 0"),
    (dict(chunk_size=-1), "chunk_size must be >= 0"),
])
def test_bad_input_names_the_argument(change, match):
    inputs = {**cast(make_inputs(), torch.float32), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_triple_loss(**inputs)
