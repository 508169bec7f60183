"""Helpers shared by the benchmark scripts: memory bandwidth, RSS, timing, tables, 6B shapes."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Make `python bench/xyz.py` work from a checkout without installing the package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@dataclass(frozen=True)
class Shape6B:
    """The Linear shapes of one 6B model (per block: qkv, attention out, MLP in, MLP out) and its LM head."""

    name: str
    num_layers: int
    hidden: int
    qkv_out: int
    mlp_in_out: int  # output features of dense_h_to_4h
    mlp_hidden: int  # input features of dense_4h_to_h
    vocab: int

    def block_linears(self) -> list[tuple[str, int, int]]:
        """(name, out_features, in_features) of the four quantized Linear layers of a block."""
        return [
            ("query_key_value", self.qkv_out, self.hidden),
            ("dense", self.hidden, self.hidden),
            ("dense_h_to_4h", self.mlp_in_out, self.hidden),
            ("dense_4h_to_h", self.hidden, self.mlp_hidden),
        ]

    def quantized_params(self) -> int:
        return self.num_layers * sum(o * i for _, o, i in self.block_linears())


# ChatGLM2-6B: QKV = 32 query heads + 2 K/V groups of 128; SwiGLU MLP packs gate and up (2 x 13696).
GLM2_6B = Shape6B("ChatGLM2-6B", 28, 4096, 4096 + 2 * 2 * 128, 2 * 13696, 13696, 65024)
# ChatGLM-6B: full multi-head QKV, GELU MLP 4096 -> 16384 -> 4096, untied-in-file but shared LM head.
GLM_6B = Shape6B("ChatGLM-6B", 28, 4096, 3 * 4096, 16384, 16384, 130528)
SHAPES = {"v2": GLM2_6B, "v1": GLM_6B}


def measure_bandwidth(gib: float = 1.0, repeats: int = 5, statistic: str = "best") -> float:
    """Read bandwidth in GB/s from full passes summing a buffer far larger than the caches: the best pass
    (what the memory can do) or the median one (what it sustained; this VM's bandwidth drifts)."""
    n = int(gib * (1 << 30)) // 4
    buf = torch.ones(n, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    del buf
    seconds = min(times) if statistic == "best" else sorted(times)[len(times) // 2]
    return n * 4 / seconds / 1e9


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls after ``warmup`` calls; the best is the least disturbed run."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(v) for v in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts), idle


def wait_idle(max_wait: float = 600.0, busy_fraction: float = 0.15, sample: float = 1.0) -> bool:
    """Wait (up to ``max_wait`` s) until other processes use less than ``busy_fraction`` of the CPUs.

    On a shared 2-core machine a single busy process halves what the kernels get and makes multi-threaded
    joins wait for a descheduled thread, so timings are only meaningful on an idle machine.
    """
    deadline = time.monotonic() + max_wait
    while True:
        total0, idle0 = _cpu_times()
        time.sleep(sample)
        total1, idle1 = _cpu_times()
        busy = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
        if busy < busy_fraction:
            return True
        if time.monotonic() > deadline:
            print(f"note: machine still {100 * busy:.0f}% busy after waiting {max_wait:.0f} s; timing anyway")
            return False


def busy_warning() -> str | None:
    """A note when other processes load the machine (numbers then understate what the kernels can do)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load1 > 0.5:
        return f"note: 1-minute load average was {load1:.2f} on {cores} cores before the run; timings may be low"
    return None


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def machine_line() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{model or 'CPU'}, {os.cpu_count()} cores, torch {torch.__version__} (ATen CPU capability {isa}), " \
           f"{torch.get_num_threads()} threads"
