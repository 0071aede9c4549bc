"""Speed of dreamfusion.py's training loop with a Stable-Diffusion-2.1-base-shaped prior (random
weights) on the GPU: ms per iteration and peak memory, projected to 10,000 iterations.

The loop is dreamfusion.train itself with `--preset paper` (64x64 renders, 128 samples per ray,
a 16-level hash grid, shading, orientation loss, occupancy grid); only the prior is swapped for
bench_priors.build_prior (SD 2.1 base's UNet + VAE shapes, random fp16 weights, random text
embeddings). Random weights give meaningless gradients but the same amount of work per step.

    python bench/bench_dreamfusion.py [--iters 300] [--warmup 40]
    python bench/bench_dreamfusion.py --iters 10000 --warmup 20 --compiled-only    # one whole 10k run
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import dreamfusion  # noqa: E402
from bench_priors import build_prior  # noqa: E402


RUNS = iter(range(1000))                  # a fresh run folder per training run


def timed_run(prior, flags, iters, warmup, out):
    """Train `warmup` steps (compilation, caches), then `iters` more in a fresh run: returns
    ms per iteration of the second run (its whole wall time, CUDA-synchronised: logging and the
    final checkpoint included) and the peak GPU memory in GiB over both."""
    torch.cuda.reset_peak_memory_stats()
    ms = None
    for n in (warmup, iters):
        cfg = dreamfusion.parse_args(["--preset", "paper", "--prompt", "a hamburger", "--iters", str(n),
                                      "--eval-clip", "", "--preview-every", "1000000", "--ckpt-every",
                                      "1000000", "--out", out, "--name", f"run{next(RUNS)}",
                                      *flags])
        run = common.RunDir(cfg.out, "dreamfusion", cfg.name)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, _, _, step, _, _ = dreamfusion.train(cfg, run, prior, torch.device("cuda"))
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0) / step
    return ms, torch.cuda.max_memory_allocated() / 2 ** 30


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--compiled-only", action="store_true", help="time only the compiled prior (the paper preset)")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    prior = build_prior(torch.device("cuda"))
    for v in ("front view", "side view", "back view", "overhead view"):
        prior._embeddings[f"a hamburger, {v}"] = torch.randn(1, 77, 1024, device="cuda", dtype=torch.float16)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        if not a.compiled_only:
            rows.append(("eager prior, no occupancy grid", *timed_run(prior, ["--no-occupancy"], a.iters, a.warmup, out)))
            rows.append(("eager prior", *timed_run(prior, [], a.iters, a.warmup, out)))
        prior.compile()
        rows.append(("+ prior.compile() (CUDA-graph UNet, compiled VAE encoder)",
                     *timed_run(prior, [], a.iters, a.warmup, out)))
    print(f"\ndreamfusion.py --preset paper, SD-2.1-base-shaped prior (random weights, fp16), 64x64 renders, "
          f"{a.iters} timed iterations after {a.warmup}, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| variant | ms / iteration | 10,000 iterations (min) | peak memory (GiB) |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms, mem in rows:
        print(f"| {name} | {ms:.1f} | {ms * 1e4 / 6e4:.1f} | {mem:.2f} |")


if __name__ == "__main__":
    main()
