"""What a result must say about the machine that produced it: CPU, revision, and how busy the CPU was.

Two cores shared with compilers and test runs make timings drift by multiples, not percents; at::parallel_for
waits for its slowest thread, so one busy core slows a two-thread kernel down to less than one core. So every
benchmark records the share of the machine's CPU time that other processes took while it ran, and the report
flags results taken on a busy machine instead of presenting them as the op's speed.
"""

import os
import platform
import subprocess
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector-ISA flags that decide which kernel runs (avx2, avx512*, amx*, fma, f16c)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    except OSError:
        pass
    return []


def git_revision() -> str:
    """HEAD of the fastdistil checkout, with "+dirty" when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine_busy_and_total() -> tuple[int, int]:
    """Busy and total jiffies of all CPUs since boot (/proc/stat's aggregate line)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def _own_jiffies() -> int:
    """user + system jiffies of this process, all its threads (/proc/self/stat fields 14 and 15)."""
    stat = Path("/proc/self/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


class CpuContention:
    """Context manager: `.other_fraction` is the share of all CPUs' time that other processes used inside the
    block (0 on a quiet machine; 0.5 on two cores means one core was someone else's). None off Linux."""

    def __init__(self):
        self.other_fraction = None

    def __enter__(self):
        try:
            self._start = (*_machine_busy_and_total(), _own_jiffies())
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return False
        (busy, total), own = _machine_busy_and_total(), _own_jiffies()
        d_busy, d_total, d_own = busy - self._start[0], total - self._start[1], own - self._start[2]
        if d_total > 0:
            self.other_fraction = max(0.0, min(1.0, (d_busy - d_own) / d_total))
        return False


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
