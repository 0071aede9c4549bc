"""Micro-benchmark of common.HashGrid: 2^18 points, forward + backward, eager and torch.compile.

    python bench/bench_hashgrid.py            # prints a table (GPU: CUDA events, median of 50)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from timing import median_ms  # noqa: E402


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 2 ** 18 if dev == "cuda" else 2 ** 14
    grid = common.HashGrid(16, 2, 19, 16, 2048).to(dev)
    xs = [torch.rand(n, 3, device=dev) for _ in range(4)]      # rotate inputs: no cache-resident reuse
    g = torch.randn(n, grid.out_dim, device=dev)
    rows = []
    for name, f in [("eager", grid), ("torch.compile", torch.compile(grid))]:
        k = [0]

        def step():
            k[0] = (k[0] + 1) % len(xs)
            grid.table.grad = None
            (f(xs[k[0]]) * g).sum().backward()
        ms, mem = median_ms(step, reps=50, warmup=10)
        rows.append((name, ms, mem))
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"\nHashGrid L=16 F=2 T=2^19 N_min=16 N_max=2048, {n} points, forward+backward, {name}, torch {torch.__version__}")
    print("| version | median ms | peak MiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.0f} |")


if __name__ == "__main__":
    main()
