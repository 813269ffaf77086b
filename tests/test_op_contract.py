"""One op contract. Every op, called through its Python API or its public torch.ops entry, rejects the same bad
input with the same words (fastdistil/ops/checks.py); and the fused projection + loss takes its cosine term
from the triple loss's own kernels, which stay exact near fp32's range where a product of squared norms would
not."""

import math
import re

import pytest
import torch

import fastdistil
from helpers import FP32_GRAD_RTOL, assert_close

OPS = torch.ops.fastdistil
N, V, D, H = 6, 13, 4, 5  # rows, vocabulary, projection width, hidden width


def loss_inputs(op: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    common = dict(labels=torch.tensor([1, -100, 7, -100, 12, 3]), student_hidden=torch.randn(N, H, generator=gen),
                  teacher_hidden=torch.randn(N, H, generator=gen), attention_mask=torch.tensor([1, 1, 1, 1, 0, 1]))
    if op == "triple_loss":
        return dict(student_logits=torch.randn(N, V, generator=gen), teacher_logits=torch.randn(N, V, generator=gen),
                    **common)
    return dict(student_input=torch.randn(N, D, generator=gen), student_weight=torch.randn(V, D, generator=gen),
                student_bias=torch.randn(V, generator=gen), teacher_input=torch.randn(N, D, generator=gen),
                teacher_weight=torch.randn(V, D, generator=gen), teacher_bias=torch.randn(V, generator=gen), **common)


SCALARS = dict(temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_mse=0.5)
FIRST = {"triple_loss": "student_logits", "fused_linear_triple_loss": "student_input"}


def call(op: str, via: str, tensors: dict, scalars: dict):
    if via == "python":
        return getattr(fastdistil, op)(**tensors, **scalars)
    # by name: alpha_mse comes after options that differ between the ops' schemas
    return getattr(OPS, op)(*tensors.values(), **scalars)


# (id, what breaks, the exception, the words after "<op>: "; {first} is the op's first tensor argument).
LOSS_CASES = [
    ("int-hidden", dict(student_hidden=lambda x: x.long()), TypeError,
     "student_hidden must be float32, bfloat16 or float16, got torch.int64"),
    ("hidden-on-meta", dict(teacher_hidden=lambda x: x.to("meta")), ValueError,
     "teacher_hidden is on meta but {first} is on cpu; expected all inputs on one device"),
    ("float-mask", dict(attention_mask=lambda x: x.float()), TypeError,
     "attention_mask must be bool or integer (0 = padding), got torch.float32"),
    ("int32-labels", dict(labels=lambda x: x.int()), TypeError, "labels must be int64, got torch.int32"),
    ("hidden-shape", dict(teacher_hidden=lambda x: x[:, :-1]), ValueError,
     "teacher_hidden must have the shape of student_hidden (6, 5), got (6, 4)"),
    ("infinite-temperature", dict(temperature=math.inf), ValueError, "temperature must be > 0 and finite, got inf"),
    ("zero-temperature", dict(temperature=0.0), ValueError, "temperature must be > 0 and finite, got 0.0"),
    ("nan-alpha", dict(alpha_ce=math.nan), ValueError, "alpha_ce must be >= 0 and finite, got nan"),
    ("infinite-alpha", dict(alpha_mlm=math.inf), ValueError, "alpha_mlm must be >= 0 and finite, got inf"),
    ("negative-alpha", dict(alpha_cos=-1.0), ValueError, "alpha_cos must be >= 0 and finite, got -1.0"),
    ("negative-alpha-mse", dict(alpha_mse=-1.0), ValueError, "alpha_mse must be >= 0 and finite, got -1.0"),
    ("nan-alpha-mse", dict(alpha_mse=math.nan), ValueError, "alpha_mse must be >= 0 and finite, got nan"),
]


@pytest.mark.parametrize("via", ["python", "op"])
@pytest.mark.parametrize("op", ["triple_loss", "fused_linear_triple_loss"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_the_losses_reject_bad_inputs_with_the_same_words(case, op, via):
    _, change, exception, words = case
    tensors, scalars = loss_inputs(op), dict(SCALARS)
    for name, value in change.items():
        if name in scalars:
            scalars[name] = value
        else:
            tensors[name] = value(tensors[name])
    with pytest.raises(exception, match=re.escape(f"{op}: " + words.format(first=FIRST[op]))):
        call(op, via, tensors, scalars)


@pytest.mark.parametrize("op", ["triple_loss", "fused_linear_triple_loss"])
def test_the_python_apis_reject_a_non_tensor_by_name(op):
    """(torch.ops' own argument parsing rejects it before any check of fastdistil's.)"""
    tensors = loss_inputs(op)
    tensors["labels"] = tensors["labels"].tolist()
    with pytest.raises(TypeError, match=re.escape(f"{op}: labels must be a torch.Tensor, got list")):
        call(op, "python", tensors, SCALARS)


@pytest.mark.parametrize("via", ["python", "op"])
@pytest.mark.parametrize("op", ["triple_loss", "fused_linear_triple_loss"])
def test_the_valid_inputs_are_accepted(op, via):
    """Guards the cases above: each fails because of its one change."""
    assert torch.isfinite(call(op, via, loss_inputs(op), SCALARS)[0])


def attention_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(2, 2, 7, 32, generator=gen), k=torch.randn(2, 2, 7, 32, generator=gen),
                v=torch.randn(2, 2, 7, 32, generator=gen), key_padding_mask=torch.ones(2, 7, dtype=torch.bool))


ATTENTION_CASES = [
    ("int-k", dict(k=lambda x: x.long()), TypeError, "k must be float32, bfloat16 or float16, got torch.int64"),
    ("v-on-meta", dict(v=lambda x: x.to("meta")), ValueError,
     "v is on meta but q is on cpu; expected all inputs on one device"),
    ("float-mask", dict(key_padding_mask=lambda x: x.float()), TypeError,
     "key_padding_mask must be bool or integer (0 = padding), got torch.float32"),
    ("dropout-1", dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1), got 1.0"),
    ("infinite-scale", dict(scale=math.inf), ValueError,
     "scale must be > 0 and finite, or None (1 / sqrt(Dh)), got inf"),
]


@pytest.mark.parametrize("via", ["python", "op"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_rejects_bad_inputs_with_the_same_words(case, via):
    _, change, exception, words = case
    tensors, scalars = attention_inputs(), dict(dropout_p=0.0, scale=None)
    for name, value in change.items():
        if name in scalars:
            scalars[name] = value
        else:
            tensors[name] = value(tensors[name])
    fn = fastdistil.attention if via == "python" else OPS.attention
    with pytest.raises(exception, match=re.escape("attention: " + words)):
        fn(*tensors.values(), *scalars.values())


# --- the cosine term -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [1.0, 1e12], ids=["unit", "near-fp32-limits"])
def test_the_fused_linear_cosine_term_is_the_triple_losss_and_exact_at_large_norms(magnitude):
    """Hidden states with norms of 1e12 (squared 1e24, so that a product of the two squared norms, 1e48, is past
    fp32's 3.4e38): the fused projection + loss gives the cosine term and its gradient of the float64
    reference, and the same as the triple loss on the projected logits."""
    tensors = loss_inputs("fused_linear_triple_loss")
    for name in ("student_hidden", "teacher_hidden"):
        tensors[name] = tensors[name] * magnitude
    tensors["student_hidden"].requires_grad_()
    out = fastdistil.fused_linear_triple_loss(**tensors, **SCALARS)
    (grad,) = torch.autograd.grad(out.loss, tensors["student_hidden"])

    hs64 = tensors["student_hidden"].detach().double().requires_grad_()
    ht64, real = tensors["teacher_hidden"].double(), tensors["attention_mask"].bool()
    loss64 = torch.nn.CosineEmbeddingLoss()(hs64[real], ht64[real], torch.ones(int(real.sum()), dtype=torch.float64))
    (grad64,) = torch.autograd.grad(loss64 * SCALARS["alpha_cos"], hs64)
    assert_close(out.loss_cos, loss64.detach(), 1e-6, "loss_cos")
    assert_close(grad, grad64, FP32_GRAD_RTOL, "d loss / d student_hidden")

    logits = {f"{role}_logits": tensors[f"{role}_input"] @ tensors[f"{role}_weight"].t() + tensors[f"{role}_bias"]
              for role in ("student", "teacher")}
    on_logits = fastdistil.triple_loss(**logits, **{k: tensors[k] for k in ("labels", "attention_mask")},
                                       student_hidden=tensors["student_hidden"].detach(),
                                       teacher_hidden=tensors["teacher_hidden"], **SCALARS)
    assert torch.equal(out.loss_cos, on_logits.loss_cos)


# --- the public names ----------------------------------------------------------------------------------------


def test_the_module_forms_compute_what_the_functions_do():
    inputs = loss_inputs("fused_linear_triple_loss")
    module = fastdistil.FusedLinearTripleLoss(temperature=1.5, alpha_cos=0.5, chunk_size=4, alpha_mse=0.25)
    expected = fastdistil.fused_linear_triple_loss(**inputs, temperature=1.5, alpha_cos=0.5, chunk_size=4,
                                                   alpha_mse=0.25)
    out = module(*inputs.values())
    assert len(out) == len(expected) == 5
    for a, b in zip(out, expected):
        assert torch.equal(a, b)
    assert "chunk_size=4" in repr(module) and "temperature=1.5" in repr(module) and "alpha_mse=0.25" in repr(module)


def project(tensors: dict) -> dict:
    """The triple loss's inputs from the fused loss's: both models' logits projected."""
    logits = {f"{role}_logits": tensors[f"{role}_input"] @ tensors[f"{role}_weight"].t() + tensors[f"{role}_bias"]
              for role in ("student", "teacher")}
    return {**logits, **{k: tensors[k] for k in ("labels", "student_hidden", "teacher_hidden", "attention_mask")}}


@pytest.mark.parametrize("op", ["triple_loss", "triple_loss_out", "fused_linear_triple_loss"])
def test_the_public_ops_keep_four_outputs_and_their_loss_includes_the_mse(op):
    """Callers that unpack (loss, loss_ce, loss_mlm, loss_cos), with the positional arguments they passed before
    alpha_mse existed, keep working; with alpha_mse, loss is the Python API's five-term loss."""
    fused = op == "fused_linear_triple_loss"
    tensors = loss_inputs("fused_linear_triple_loss")
    args = tuple(tensors.values()) if fused else tuple(project(tensors).values())
    old_style = (2.0, 5.0, 2.0, 1.0, False) + ((0,) if fused else ())  # ..., restrict_ce_to_mask[, chunk_size]
    api = fastdistil.fused_linear_triple_loss(**tensors) if fused else fastdistil.triple_loss(**project(tensors))
    api_mse = (fastdistil.fused_linear_triple_loss(**tensors, alpha_mse=0.5) if fused
               else fastdistil.triple_loss(**project(tensors), alpha_mse=0.5))
    assert api_mse.loss_mse > 0 and torch.equal(api_mse.loss_mse, api.loss_mse)
    for with_mse, expected in ((False, api), (True, api_mse)):
        scalars = old_style + ((0.5,) if with_mse else ())
        if op == "triple_loss_out":
            buffers = dict(grad_student_logits=torch.empty_like(args[0]), grad_student_hidden=torch.empty_like(args[3]))
            out = OPS.triple_loss_out(*args, *scalars, **buffers)
        else:
            out = getattr(OPS, op)(*args, *scalars)
        loss, loss_ce, loss_mlm, loss_cos = out
        for name, a in zip(("loss", "loss_ce", "loss_mlm", "loss_cos"), out):
            torch.testing.assert_close(a, getattr(expected, name).detach(), rtol=1e-6, atol=0, msg=name)
        weighted = 5.0 * loss_ce + 2.0 * loss_mlm + loss_cos + (0.5 * api.loss_mse if with_mse else 0.0)
        torch.testing.assert_close(loss, weighted.detach(), rtol=1e-6, atol=0)


def test_projection_inputs_is_public():
    from fastdistil.train.heads import ProjectionInputs

    assert fastdistil.ProjectionInputs is ProjectionInputs
    with pytest.raises(AttributeError, match="no attribute 'projection_inputs'"):
        fastdistil.projection_inputs  # noqa: B018
