"""Micro-benchmark of common.HashGrid: 2^18 points, forward + backward, eager and torch.compile,
at L=16 x F=2 and L=8 x F=4.

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
    xs = [torch.rand(n, 3, device=dev) for _ in range(4)]      # rotate inputs: no cache-resident reuse
    rows = []
    # the paper's L=16 x F=2, and the same 32 features from half the levels (later instant-ngp configs: 8 x 4)
    for levels, feats in [(16, 2), (8, 4)]:
        grid = common.HashGrid(levels, feats, 19, 16, 2048).to(dev)
        g = torch.randn(n, grid.out_dim, device=dev)
        for name, f in [("eager", grid), ("torch.compile", torch.compile(grid))]:
            k = [0]

            def step():
                k[0] = (k[0] + 1) % len(xs)
                grid.table.grad = None
                (f(xs[k[0]]) * g).sum().backward()
            ms, mem = median_ms(step, reps=50, warmup=10)
            rows.append((f"L={levels} F={feats}", name, ms, mem))
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"\nHashGrid T=2^19 N_min=16 N_max=2048, {n} points, forward+backward, {name}, torch {torch.__version__}")
    print("| grid | version | median ms | peak MiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.0f} |")


if __name__ == "__main__":
    main()
