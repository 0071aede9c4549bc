"""Time Magic3D's two stages at the paper's sizes with a Stable-Diffusion-2.1-base-shaped prior (random
weights, fp16; bench/bench_priors.py builds it) and project the paper's step counts.

Coarse stage: magic3d.py --preset paper (64 x 64 renders, 128 samples per ray, a 16-level hash grid with
2^19 entries, occupancy grid), SDS with the 64 px render upsampled to 512 and VAE-encoded. Fine stage:
a tet grid of resolution 128, marching tets, the rasteriser at 512 x 512, SDS on the 512 px render. The
coarse field starts as a wide blob (--blob-density 10 --blob-radius 0.5), so that the fine stage's mesh
is a sphere of radius ~0.7 (about 100k triangles), the size of a real object.

Each stage runs through magic3d.py's own train_coarse / train_fine: `--warmup` steps, then a resumed
run of `--steps` more; ms / step = (wall of the resumed run - wall of a resumed run of zero steps,
i.e. loading and saving the checkpoint) / steps, CUDA-synchronised.

    python bench/bench_magic3d.py [--steps 40] [--warmup 8] [--out out/bench_magic3d]
Prints a markdown table (and writes it to <out>/bench_magic3d.md).

    python bench/bench_magic3d.py --whole coarse    # then --whole fine, in a second command
A whole stage at the paper's step count, timed by the wall clock as magic3d.py's main() runs it:
compilation, checkpoints, previews, conversion (fine) and the export of videos and mesh included
(no toy-CLIP evaluation: the prior has random weights), through magic3d.run_stages with --stage
coarse or fine. The fine stage starts from a coarse field trained for --warmup steps (the wide blob),
untimed; that warm-up also compiles the prior, whose compilation the coarse figure already holds.
The two figures add up to one whole run (the fine one also holds reading coarse.pt back).
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import magic3d  # noqa: E402
from bench_priors import build_prior  # noqa: E402

PAPER_STEPS = {"coarse": 10_000, "fine": 5000}        # methods.md section 4
PROMPT = "a hamburger"


def timed(fn):
    """(wall seconds of fn(), its result), CUDA-synchronised before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps per stage first")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench_magic3d"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true", help="eager prior (the paper preset compiles it)")
    p.add_argument("--whole", choices=["coarse", "fine"], help="time this whole stage instead (see above)")
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True     # the backend flags magic3d.py's main() sets with --compile
    torch.backends.cudnn.benchmark = True
    prior = build_prior(dev)
    if not args.no_compile:
        prior.compile()          # as magic3d.py's paper preset does (--compile)
    prior._embeddings.setdefault(PROMPT, torch.randn(1, 77, 1024, device=dev, dtype=torch.float16))
    name = f"bench_{int(time.time())}"
    base = ["--preset", "paper", "--prompt", PROMPT, "--no-view-prompts", "--device", args.device, "--eval-clip", "",
            "--blob-density", "10", "--blob-radius", "0.5", "--out", args.out, "--name", name]
    if args.whole:
        return whole(args.whole, base, prior, dev, args.warmup)
    run = common.RunDir(args.out, "magic3d", name)
    quiet = ["--preview-every", "100000", "--ckpt-every", "100000"]       # the step times alone

    def cfg(stage, n, resume):
        return magic3d.parse_args(base + quiet + [f"--{stage}-iters", str(n)] + (["--resume"] if resume else []))

    rows = {}
    # --- coarse stage ---
    w = args.warmup
    timed(lambda: magic3d.train_coarse(cfg("coarse", w, False), run, prior, dev))
    idle, _ = timed(lambda: magic3d.train_coarse(cfg("coarse", w, True), run, prior, dev))
    busy, (field, bg_net, *_) = timed(lambda: magic3d.train_coarse(cfg("coarse", w + args.steps, True), run, prior, dev))
    c = cfg("coarse", 0, False)
    rows["coarse"] = ((busy - idle) / args.steps * 1e3, f"{c.size} x {c.size} volume render, {c.n_samples} samples/ray")
    # --- fine stage (from the coarse field just trained) ---
    timed(lambda: magic3d.train_fine(cfg("fine", w, False), run, prior, dev, field, bg_net))
    idle, _ = timed(lambda: magic3d.train_fine(cfg("fine", w, True), run, prior, dev, field, bg_net))
    busy, (dmtet, *_) = timed(lambda: magic3d.train_fine(cfg("fine", w + args.steps, True), run, prior, dev, field, bg_net))
    with torch.no_grad():
        faces = len(dmtet()[1])
    rows["fine"] = ((busy - idle) / args.steps * 1e3, f"tet grid {c.tet_res}, {c.fine_size} x {c.fine_size} raster, {faces} triangles")
    peak = torch.cuda.max_memory_allocated() / 2 ** 30

    total = sum(ms * PAPER_STEPS[s] / 1e3 for s, (ms, _) in rows.items())
    lines = [f"Magic3D at the paper's sizes, SD-2.1-base-shaped UNet + VAE (random weights, fp16, "
             f"{'eager' if args.no_compile else 'compiled prior'}), "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.steps} timed steps per stage "
             f"after {w}; peak memory {peak:.1f} GiB", "",
             "| stage | ms / step | paper steps | projected minutes | notes |", "| --- | ---: | ---: | ---: | --- |"]
    for s, (ms, note) in rows.items():
        lines.append(f"| {s} | {ms:.1f} | {PAPER_STEPS[s]} | {ms * PAPER_STEPS[s] / 6e4:.1f} | {note} |")
    lines.append(f"| **both** | | {sum(PAPER_STEPS.values())} | **{total / 60:.1f}** | target <= 15 minutes |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_magic3d.md"), "w") as f:
        f.write(text + "\n")


def whole(stage: str, base: list, prior, dev, warmup: int):
    """Time one whole stage at the paper's step count, as magic3d.py's main() runs it, and print the figure."""
    cfg = magic3d.parse_args(base + ["--stage", stage])
    if stage == "fine":                                    # untimed: the blob's coarse.pt, the prior compiled
        magic3d.run_stages(magic3d.parse_args(base + ["--stage", "coarse", "--coarse-iters", str(warmup)]), prior, dev)
    seconds, _ = timed(lambda: magic3d.run_stages(cfg, prior, dev))
    n = cfg.coarse_iters if stage == "coarse" else cfg.fine_iters
    gpu = f", peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB, {torch.cuda.get_device_name()}" \
        if torch.cuda.is_available() else ""
    print(f"whole {stage} stage: {n} steps in {seconds:.0f} s = {seconds / 60:.2f} min by the wall clock "
          f"(export included){gpu}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
