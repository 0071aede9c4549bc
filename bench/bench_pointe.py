"""Time per sample of Point-E's two diffusion stages at the official sizes (random weights).

base40M (image grid, 1024 points) + upsample (3072 more), 64 + 64 Karras/Heun steps, guidance 3.0
on both stages (batch doubled), as in the official image-to-3D notebook. Random weights give the
same work as the released ones. Prints a markdown table.

  python bench/bench_pointe.py [--batch 1 4] [--repeats 2]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pointe  # noqa: E402


def stage_times(base, up, batch, precision, device, steps=pointe.SAMPLER["steps"]):
    """Seconds for the base stage and the upsampler stage, for `batch` samples."""
    grid = torch.randn(batch, 1024, 256, device=device)
    S = pointe.SAMPLER
    times, low = [], None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for model, cond, n, i in [(base, {"clip": grid}, 1024, 0), (up, None, 3072, 1)]:
            if cond is None:
                cond = {"clip": grid, "low_res": low}
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = pointe.sample_stage(model, pointe.GaussianDiffusion(model.cfg["schedule"]), batch, n, cond,
                                      S["guidance"], S["sigma_max"][i], S["s_churn"][i], steps,
                                      device=device)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            low = out
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--precision", nargs="+", default=["fp32", "tf32", "bf16"])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base, up = pointe.build_model("base40M", device=dev).eval(), pointe.build_model("upsample", device=dev).eval()
    for m in (base, up):                             # zero-initialised output: give it some signal
        torch.nn.init.normal_(m.output_proj.weight, std=0.02)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| precision | batch | base40M s/sample | upsample s/sample | total s/sample |")
    print("|---|---|---|---|---|")
    for prec in args.precision:
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        torch.backends.cudnn.allow_tf32 = prec == "tf32"
        for b in args.batch:
            stage_times(base, up, b, prec, dev, steps=2)             # warm-up (kernels, allocator)
            runs = [stage_times(base, up, b, prec, dev) for _ in range(args.repeats)]
            tb, tu = (min(r[i] for r in runs) / b for i in (0, 1))
            print(f"| {prec} | {b} | {tb:.3f} | {tu:.3f} | {tb + tu:.3f} |", flush=True)
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
