"""Peak extra memory of a callable: on CPU from the PyTorch profiler's allocation events, on CUDA from the
caching allocator's peak counter.

This torch has no CPU allocator statistics (no torch.cpu.memory_stats, no peak counter; CUDA's
max_memory_allocated has no CPU twin), but the profiler with profile_memory=True records every allocation and
free of the c10 CPU allocator as a "[memory]" event carrying a signed byte count. Their running sum, in time
order, is the bytes held by tensors created inside the window; its maximum is the peak extra memory over
whatever was allocated before the call. It counts tensors only: a kernel's std::vector scratch and allocator
slack are not tensors (both O(N) here, against O(N*V) tensors).

Frees of blocks allocated before the window are not reported (the allocator does not know their size then),
so freeing an old tensor does not offset a new one: the result is the peak of what the call itself allocated.
Drop what the call would replace (a previous .grad) before measuring, as a training loop's zero_grad does.

On CUDA, torch.cuda.max_memory_allocated after reset_peak_memory_stats, less memory_allocated before the call,
is the same quantity except there: the counter is a running total of all tensors, so freeing an older tensor
inside the call does offset a new one. Both count tensor bytes, not the allocators' cached blocks.

Run this file to check the helper on known allocations (on CUDA too when there is a GPU).
"""

import torch
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def peak_extra_bytes(fn, /, *args, device: torch.device | str = "cpu", **kwargs) -> int:
    """Runs fn(*args, **kwargs) once and returns the peak bytes of `device` tensors allocated during the call
    that were alive at the same time (0 if it allocated nothing)."""
    device = torch.device(device)
    if device.type == "cuda":
        # The caching allocator counts as the host allocates and frees, in program order: no need to wait for
        # the kernels.
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(*args, **kwargs)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn(*args, **kwargs)
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    return _peak(events)


def _peak(events: list[tuple[int, int]]) -> int:
    # Intra-op threads report their own events; order them all by time. On a tie an allocation goes first,
    # which can only overstate the peak by the smaller of the two.
    events.sort(key=lambda e: (e[0], -e[1]))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _self_check(device: torch.device) -> None:
    mb = 1 << 20

    def one_tensor():
        x = torch.empty(100 * mb, dtype=torch.uint8, device=device)
        x.fill_(1)  # touched, as a real tensor would be
        del x

    def two_alive_then_one():
        a = torch.ones(25 * mb, device=device)  # 100 MB fp32
        b = a * 2  # 100 MB more, both alive: peak 200 MB
        del a, b
        c = torch.ones(25 * mb, device=device)  # 100 MB after both were freed: does not raise the peak
        del c

    held = torch.ones(25 * mb, device=device)

    def frees_old_100_mb_then_allocates_150():
        nonlocal held
        # Allocated before the window: on CPU its free is invisible and does not offset d; CUDA's running
        # total sees it.
        held = None
        d = torch.ones(int(37.5 * mb), device=device)
        del d

    def kept_after_return():
        nonlocal held
        held = torch.ones(25 * mb, device=device)  # still alive when the call returns: counts, like a .grad

    cases = ((one_tensor, 100), (two_alive_then_one, 200),
             (frees_old_100_mb_then_allocates_150, 50 if device.type == "cuda" else 150), (kept_after_return, 100))
    for fn, expected in cases:
        got = peak_extra_bytes(fn, device=device) / mb
        status = "ok" if abs(got - expected) < 1 else "WRONG"
        print(f"{device.type} {fn.__name__}: {got:.2f} MB (expected {expected} MB) {status}")
        assert status == "ok"


if __name__ == "__main__":
    _self_check(torch.device("cpu"))
    if torch.cuda.is_available():
        _self_check(torch.device("cuda"))
