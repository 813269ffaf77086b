"""The CPU op's cached [N, V] gradient buffer: reused only once autograd has let go of it."""

import torch

import fastdistil
from fastdistil import _C
from helpers import make_inputs

# Large enough for the cache (8 MB and up): 96 x 30522 fp32.
LEAD, VOCAB = (96,), 30522


def gradient_of(inputs):
    return torch.autograd.grad(fastdistil.triple_loss(*inputs, backend="cpp").loss, inputs.student_logits)[0]


def test_freed_gradient_buffer_is_reused_and_rewritten():
    expected_second = gradient_of(make_inputs(LEAD, VOCAB, seed=2)).clone()
    _C.release_gradient_cache()
    first = gradient_of(make_inputs(LEAD, VOCAB, seed=1))
    first_ptr = first.data_ptr()
    del first
    assert _C.gradient_cache_bytes() >= 96 * VOCAB * 4
    second = gradient_of(make_inputs(LEAD, VOCAB, seed=2))
    assert second.data_ptr() == first_ptr
    torch.testing.assert_close(second, expected_second, rtol=0, atol=0)


def test_live_gradients_never_share_a_buffer():
    # Accumulating over micro-batches keeps several gradients alive: each must keep its own values.
    inputs = [make_inputs(LEAD, VOCAB, seed=seed) for seed in (3, 4, 5)]
    live = [gradient_of(x) for x in inputs]
    assert len({g.data_ptr() for g in live}) == 3
    for x, g in zip(inputs, live):
        torch.testing.assert_close(g, gradient_of(x), rtol=0, atol=0)


def test_release_frees_the_idle_buffer():
    del_me = gradient_of(make_inputs(LEAD, VOCAB, seed=6))
    del del_me
    assert _C.gradient_cache_bytes() > 0
    assert fastdistil.release_gradient_cache() > 0
    assert _C.gradient_cache_bytes() == 0
