"""Timers and device facts for the benchmark suite.

On a GPU: ``triton.testing.do_bench`` (warm-up, L2 flush between runs, quantiles p20/p50/p80),
the inputs rotated between calls so caches do not flatter. On a CPU: the same quantiles over
repeated wall-clock runs of ``time.perf_counter`` (CPU numbers only compare providers within one
run; they say nothing about GPU speed).
"""
import statistics
import time
from typing import Callable, List

import torch

QUANTILES = (0.2, 0.5, 0.8)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[int], object], device: torch.device, *, reps_cpu: int = 7, warmup_cpu: int = 2,
          min_s_cpu: float = 0.5) -> List[float]:
    """Milliseconds at p20/p50/p80 of ``fn(i)``, ``i`` counting calls (to rotate inputs)."""
    counter = [0]

    def step():
        counter[0] += 1
        return fn(counter[0])

    if device.type == "cuda":
        from triton.testing import do_bench

        return list(do_bench(step, warmup=25, rep=100, quantiles=list(QUANTILES)))
    for _ in range(warmup_cpu):
        step()
    times = []
    # At least reps_cpu runs and min_s_cpu seconds (at most 100 runs): short ops need many
    # samples before the quantiles settle on a shared 2-core machine.
    while len(times) < reps_cpu or (sum(times) < min_s_cpu * 1e3 and len(times) < 100):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return [qs[1], statistics.median(times), qs[7]]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak extra memory of one call of ``fn`` (CUDA only; NaN on CPU, where torch keeps no count)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Achieved device-to-device copy bandwidth (read + write bytes / time), the ceiling a
    memory-bound kernel is compared to."""
    n = (256 if device.type == "cuda" else 32) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda i: dst.copy_(src), device)[1]
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
