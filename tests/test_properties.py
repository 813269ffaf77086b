"""Hypothesis: small random problems (V and D down to 1, empty batches, every mask and label pattern)."""

import functools

import torch
from hypothesis import given
from hypothesis import strategies as st

import fastdistil
from helpers import GRADS, assert_close, check_against_reference, loss_and_grads, make_inputs

cpp = functools.partial(fastdistil.triple_loss, backend="cpp")

leads = st.one_of(st.tuples(st.integers(0, 12)), st.tuples(st.integers(1, 3), st.integers(1, 6)))
temperatures = st.one_of(st.sampled_from([1.0, 2.0]), st.floats(0.25, 8.0))
alphas = st.one_of(st.just(0.0), st.floats(0.0, 5.0))


@st.composite
def problems(draw):
    inputs = make_inputs(
        draw(leads), draw(st.integers(1, 70)), dim=draw(st.integers(1, 40)), seed=draw(st.integers(0, 2**31)),
        pad_frac=draw(st.sampled_from([0.0, 0.3, 1.0])), label_frac=draw(st.sampled_from([0.0, 0.15, 1.0])),
        labels_on_padding=draw(st.booleans()))
    kwargs = dict(temperature=draw(temperatures), alpha_ce=draw(alphas), alpha_mlm=draw(alphas),
                  alpha_cos=draw(alphas), restrict_ce_to_mask=draw(st.booleans()), alpha_mse=draw(alphas) / 100)
    return inputs, kwargs


@given(problems(), st.floats(0.25, 4.0))
def test_matches_reference(problem, grad_output):
    inputs, kwargs = problem
    check_against_reference(cpp, inputs, grad_output=grad_output, **kwargs)


@given(problems())
def test_term_ranges(problem):
    inputs, kwargs = problem
    out = cpp(*inputs._replace(**kwargs))
    assert out.loss_ce.item() >= -1e-5  # a KL divergence, up to rounding
    assert out.loss_mlm.item() >= 0.0
    assert -1e-6 <= out.loss_cos.item() <= 2.0 + 1e-6
    assert out.loss_mse.item() >= 0.0


@given(problems())
def test_identical_student_and_teacher_give_zero_kl(problem):
    inputs, kwargs = problem
    inputs = inputs._replace(teacher_logits=inputs.student_logits.detach().clone(),
                             teacher_hidden=inputs.student_hidden.detach() * 3.0)  # same direction, so 1 - cos = 0 too
    out = cpp(*inputs._replace(**kwargs))
    assert abs(out.loss_ce.item()) <= 1e-5 and abs(out.loss_cos.item()) <= 1e-5 and out.loss_mse.item() == 0.0


def exactly_shiftable(x):
    """Multiples of 2^-10 in [-16, 16]: adding an integer up to 2^12 is exact in fp32, so a shifted input is
    the same problem, not a rounded neighbour of it."""
    return (x.detach().clamp(-16, 16) * 1024).round() / 1024


@given(problems(), st.integers(0, 2**31), st.sampled_from(["student_logits", "teacher_logits"]))
def test_invariant_to_per_row_shifts(problem, seed, which):
    inputs, kwargs = problem
    kwargs = dict(kwargs, alpha_mse=0.0)  # the logit MSE, unlike the softmaxes, sees a shift of one model's row
    inputs = inputs._replace(student_logits=exactly_shiftable(inputs.student_logits).requires_grad_(),
                             teacher_logits=exactly_shiftable(inputs.teacher_logits))
    # up to +-4096: without subtracting the row maximum, exp would overflow
    shift = torch.randint(-4096, 4097, inputs.labels.shape + (1,), generator=torch.Generator().manual_seed(seed))
    shifted = inputs._replace(
        **{which: (getattr(inputs, which).detach() + shift.float()).requires_grad_(which == "student_logits")})
    terms, (grad, _) = loss_and_grads(cpp, inputs, **kwargs)
    terms_s, (grad_s, _) = loss_and_grads(cpp, shifted, **kwargs)
    assert_close(terms_s.loss_ce, terms.loss_ce, 1e-5, "loss_ce")
    assert_close(terms_s.loss_mlm, terms.loss_mlm, 1e-5, "loss_mlm")
    assert_close(grad_s, grad, 1e-5, "grad_student_logits")


@given(problems(), st.floats(0.0, 10.0))
def test_loss_is_linear_in_the_alphas(problem, k):
    inputs, kwargs = problem
    scaled = dict(kwargs, **{a: k * kwargs[a] for a in ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_mse")})
    terms, grads = loss_and_grads(cpp, inputs, **kwargs)
    terms_k, grads_k = loss_and_grads(cpp, inputs, **scaled)
    assert_close(terms_k.loss, k * terms.loss, 1e-5, "loss")
    for name in ("loss_ce", "loss_mlm", "loss_cos", "loss_mse"):
        assert_close(getattr(terms_k, name), getattr(terms, name), 1e-6, name)
    for name, a, b in zip(GRADS, grads_k, grads):
        assert_close(a, k * b, 1e-5, name)
