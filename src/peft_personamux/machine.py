"""What a number was measured on: the one ``hardware()`` that reports and benchmarks record, and how fast this
machine multiplies matrices in float32 and bf16 (`matmul_rate`, `bf16_matmul_speedup`)."""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch


def _cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo (None where there is no such file or line)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what `platform` knows), for hardware lines in reports."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides float32 vs bf16 speed


def cpu_features() -> list[str]:
    """Which of `MATRIX_FLAGS` /proc/cpuinfo lists (two CPUs both named "AMD EPYC" can differ 100x in bf16 matmul)."""
    present = set((_cpuinfo("flags") or "").split())
    return [flag for flag in MATRIX_FLAGS if flag in present]


def features_label(hw: dict[str, Any]) -> str:
    """``hardware()``'s CPU flags for a report line, e.g. "avx2" or "avx512f, avx512_bf16"."""
    return ", ".join(hw.get("cpu_features") or ["no avx2/avx512/amx"])


def hardware(
    device: torch.device | str | None = None, dtype: str | None = None, load_average: float | None = None
) -> dict[str, Any]:
    """CPU, GPU, thread count and library versions. ``device`` None: the first GPU when there is one, else the CPU.
    ``load_average``: the 1-min load average that says whether other work shared the CPU (read before a timed run,
    whose own threads load the cores); None reads it now."""
    import peft
    import transformers

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cpu_features": cpu_features(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if dtype is not None:
        info["dtype"] = dtype
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    load = os.getloadavg()[0] if load_average is None else load_average
    if load > 0.5 * (os.cpu_count() or 1):
        info["load_average_1min"] = round(load, 2)  # other jobs were running: CPU timings are noisy
    return info


def matmul_rate(
    dtype: torch.dtype,
    shapes: Sequence[tuple[int, int, int]],
    device: torch.device | str = "cpu",
    repeats: int = 5,
    rounds: int = 3,
) -> float:
    """Matrix-multiply throughput in FLOP/s of ``(m, k) @ (k, n)`` products in ``dtype``: their FLOPs over the fastest
    of ``rounds`` timed rounds (each ``repeats`` products per shape, after one warm-up product per shape)."""
    device = torch.device(device)
    pairs = [
        (torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)) for m, k, n in shapes
    ]
    flops = repeats * sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for a, b in pairs:  # warm-up: first-call allocation and kernel selection
        a @ b
    best = float("inf")
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for a, b in pairs:
            for _ in range(repeats):
                a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return flops / max(best, 1e-9)


@functools.cache
def bf16_matmul_speedup(rows: int = 1024, inner: int = 576, cols: int = 1536, repeats: int = 5) -> float:
    """How many times faster a (rows, inner) @ (inner, cols) matmul runs in bf16 than in float32 on the CPU
    (`matmul_rate` of each, best of three rounds).

    Measured once per process and shape: a timing near `choose_autocast`'s threshold could otherwise pick bf16 for
    one trainer and float32 for the next (a run and its resume, say) in the same process.
    """
    shapes = [(rows, inner, cols)]
    return matmul_rate(torch.bfloat16, shapes, repeats=repeats) / matmul_rate(torch.float32, shapes, repeats=repeats)
