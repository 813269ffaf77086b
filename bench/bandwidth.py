"""The machine's memory copy bandwidth, the yardstick of a bandwidth-bound kernel.

The fused triple loss must at least read both [N, V] logit tensors and write the [N, V] gradient,
3*N*V*itemsize bytes, so its time floor is that traffic over what this machine can stream. `dst.copy_(src)` on
tensors far larger than the caches, with torch's intra-op threads (all cores, like the kernel), measures
exactly that kind of traffic: bytes/s = (bytes read + bytes written) / time.

    python bench/bandwidth.py [--mb 512] [--repeats 11]
"""

import argparse
import statistics
import time

import torch


def copy_bandwidth(mb: int = 512, repeats: int = 11) -> dict:
    """Median read+write bytes/s of dst.copy_(src) on two `mb`-MB fp32 tensors, with the run's details."""
    numel = mb * (1 << 20) // 4
    src = torch.ones(numel)  # values do not matter to a copy
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    moved = 2 * src.numel() * src.element_size()
    median = statistics.median(times)
    return {
        "bytes_per_s": moved / median,
        "best_bytes_per_s": moved / min(times),
        "tensor_mb": mb,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="size of each of the two tensors (default: 512)")
    parser.add_argument("--repeats", type=int, default=11, help="timed copies; the median is reported")
    args = parser.parse_args()
    result = copy_bandwidth(args.mb, args.repeats)
    print(f"copy bandwidth (read + write), {result['threads']} threads, {args.mb} MB fp32 tensors: "
          f"median {result['bytes_per_s'] / 1e9:.1f} GB/s, best {result['best_bytes_per_s'] / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
