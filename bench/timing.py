"""Timing helper shared by the benchmark scripts: median milliseconds and peak extra memory."""
import time

import torch


def median_ms(fn, reps: int = 20, warmup: int = 3):
    """Median milliseconds of fn() over `reps` runs after `warmup` runs (CUDA events on a GPU, a
    host clock otherwise), and the peak extra CUDA memory in MiB (nan on the CPU)."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else float("nan")
    return sorted(times)[len(times) // 2], peak
