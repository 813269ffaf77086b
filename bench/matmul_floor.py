"""The matrix products of a training step, recorded and replayed alone: the time no exact implementation of the
same step can go below on this machine.

Fusing the loss removes work around the matrix products (logit copies, softmax passes, their gradients); it
cannot remove the products themselves, which a step of the same models at the same batch must compute. Timing
them alone, at their recorded shapes and strides and in their recorded order, gives a floor for the step's time
and so a ceiling for any speed-up over a baseline that computes them too: baseline time / floor time.

Recorded: aten mm, addmm, bmm and baddbmm calls, forward and backward. Products inside fused kernels (the
attention of SDPA) are left out, which can only lower the floor.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default)


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    return ("value", value)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            self.calls.append((func, tuple(_signature(a) for a in args), tuple(sorted(
                (k, _signature(v)) for k, v in kwargs.items()))))
        return func(*args, **kwargs)


def record(fn, *args) -> list:
    """The matrix-product calls `fn(*args)` makes (autograd's backward included), as replayable signatures."""
    with _Recorder() as recorder:
        fn(*args)
    return recorder.calls


def flops(calls: list) -> int:
    """Multiply-adds x 2 of the recorded calls."""
    total = 0
    for func, args, _ in calls:
        shapes = [a[1] for a in args if a[0] == "tensor"]
        a, b = shapes[-2], shapes[-1]  # addmm/baddbmm: (input, mat1, mat2)
        batch = a[0] if len(a) == 3 else 1
        total += 2 * batch * a[-2] * a[-1] * b[-1]
    return total


def _materialize(signature, generator):
    kind, *rest = signature
    if kind == "value":
        return rest[0]
    shape, stride, dtype, device = rest
    # Over a buffer of random values: some operands are views whose strides overlap (an expanded bias).
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    buffer = torch.randn(extent, generator=generator).to(dtype=dtype, device=device)
    return buffer.as_strided(shape, stride)


class Replay:
    """The recorded calls, run in order on random operands. Calls with one signature share their operands
    (allocated once, here), so a replay allocates only the products' outputs, as the step does."""

    def __init__(self, calls: list):
        generator = torch.Generator().manual_seed(0)
        operands = {(func, args, kwargs): (tuple(_materialize(a, generator) for a in args),
                                           {k: _materialize(v, generator) for k, v in kwargs})
                    for func, args, kwargs in dict.fromkeys(calls)}
        self.calls = calls
        self._plan = [(func, *operands[(func, args, kwargs)]) for func, args, kwargs in calls]

    def __call__(self, *_step_args) -> None:
        """Runs the products. Arguments (a step's batch) are ignored, so that a replay stands in for a step."""
        for func, args, kwargs in self._plan:
            func(*args, **kwargs)
