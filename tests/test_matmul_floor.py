"""bench/matmul_floor.py: the matrix products of a step, recorded and replayed."""

import torch

from bench import matmul_floor


def linear_step(x, layer):
    layer(x).square().sum().backward()


def test_records_forward_and_backward_products_with_their_flops():
    layer = torch.nn.Linear(3, 5)
    calls = matmul_floor.record(linear_step, torch.randn(4, 3), layer)
    # addmm forward (bias, x, W^T), then mm for the weight's gradient; x needs no gradient.
    assert [func.__name__ for func, _, _ in calls] == ["addmm.default", "mm.default"]
    assert matmul_floor.flops(calls) == 2 * (2 * 4 * 3 * 5)

    calls = matmul_floor.record(linear_step, torch.randn(4, 3, requires_grad=True), layer)
    assert matmul_floor.flops(calls) == 3 * (2 * 4 * 3 * 5)  # and x's gradient


def test_batched_products_count_every_batch():
    def attention_scores(q, k):
        torch.bmm(q, k.transpose(1, 2))

    calls = matmul_floor.record(attention_scores, torch.randn(6, 8, 4), torch.randn(6, 8, 4))
    assert matmul_floor.flops(calls) == 2 * 6 * 8 * 4 * 8


def test_replay_runs_the_same_products_in_the_same_order():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    calls = matmul_floor.record(linear_step, torch.randn(5, 8, requires_grad=True), model)
    assert len(calls) == 6
    assert matmul_floor.record(matmul_floor.Replay(calls)) == calls
