"""Time one Dream Fields iteration at the paper's medium quality on the GPU.

One iteration = dreamfields.train_step: a random pose, a 168x168 render with 192 jittered samples per
ray through the official-size MLP (Dense 128, 4 residual blocks of width 256, positional encoding of
8 frequencies), 8 random 154-px crops over random backgrounds resized to 224, a ViT-B/16-shaped CLIP
image tower (open_clip "ViT-B-16", random weights: nothing is downloaded), the CLIP + transmittance
loss, the backward pass, Adam, the origin update. Variants (cumulative where marked +): eager fp32
(TF32 matmuls), bf16 autocast, torch.compile of the field and of CLIP's image tower,
--checkpoint (recompute each ray chunk in the backward pass, for memory) and --occupancy (skip the
samples in empty cells of an occupancy grid).

The occupancy grid only pays once the field is sparse, and a field trained by a random CLIP never
is. So `--trajectory SECONDS` times whole training runs instead: the loss is the bundled toy CLIP's
(on "a blue torus", so the field learns an object and empties the space around it) plus 0 x the
ViT-B/16's (so its forward and backward still run every step), with the paper preset's schedule; it
prints ms / iteration and the grid's occupied fraction every 500 iterations, and stops at 10k
iterations or after SECONDS.

    python bench/bench_dreamfields.py [--iters 32] [--variants fp32,bf16,...]
    python bench/bench_dreamfields.py --trajectory 480 --variants bf16+compile+occupancy [--profile-at 3000]
Prints a markdown table: ms per iteration (median), the time 10k iterations would take, peak memory.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import dreamfields as D  # noqa: E402

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# name -> (bf16 autocast, torch.compile, activation checkpointing, occupancy grid)
VARIANTS = {"fp32": (False, False, False, False), "fp32+checkpoint": (False, False, True, False),
            "bf16": (True, False, False, False), "bf16+checkpoint": (True, False, True, False),
            "bf16+compile": (True, True, False, False), "bf16+compile+checkpoint": (True, True, True, False),
            "bf16+compile+occupancy": (True, True, False, True)}


def random_clip(name: str, device) -> common.CLIPPrior:
    """A CLIPPrior around open_clip's architecture `name` with random weights (no download)."""
    import open_clip
    prior = common.CLIPPrior.__new__(common.CLIPPrior)
    nn.Module.__init__(prior)
    prior.model = open_clip.create_model(name, device=device).eval().requires_grad_(False)
    prior.tokenizer = open_clip.get_tokenizer(name)
    prior.image_size, prior.interpolation, prior.vocab, prior.flag, prior._text_cache = 224, "bicubic", None, "", {}
    prior.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1))
    prior.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1))
    return prior.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def print_profile(steps, device, rows: int = 25):
    """Run steps() under torch.profiler and print where the GPU time goes (on a GPU) and where the
    host's own time goes (self CPU time: Python-side op dispatch and kernel launches)."""
    sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        steps()
        sync(device)
    table = prof.key_averages()
    if device.type == "cuda":
        print(table.table(sort_by="cuda_time_total", row_limit=rows), flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


def profile_variant(amp, compile_, ckpt, occ, args, device):
    """torch.profiler tables of 3 iterations (after 3 warm-up ones): where the GPU and the host time go."""
    cfg, fast, opt, prior, txt = setup(amp, compile_, ckpt, occ, args, device)
    origin, step = torch.zeros(3), 0

    def advance(n):
        nonlocal origin, step
        for _ in range(n):
            _, origin = D.train_step(fast, opt, cfg, prior, txt, origin, step, device)
            step += 1
    advance(3)
    print_profile(lambda: advance(3), device)


class CostedToyCLIP:
    """The toy CLIP's loss with the ViT-B/16's cost: similarity() adds 0 x the ViT-B/16's similarity,
    so its forward and backward run every step while only the toy CLIP steers the field."""

    def __init__(self, vit, device, compile_):
        self.toy, self.vit = common.CLIPPrior("toy", device=device), vit
        if compile_:                                 # as dreamfields.load_priors does with --compile
            D.compile_image_tower(self.toy)
        self.vit_txt = vit.encode_text(["a blue torus"])

    def encode_image(self, crops):
        return self.toy.encode_image(crops), self.vit.encode_image(crops)

    def similarity(self, embs, txt):
        return self.toy.similarity(embs[0], txt) + 0 * self.vit.similarity(embs[1], self.vit_txt)


def trajectory(amp, compile_, ckpt, occ, args, device, iters: int = 10_000, window: int = 500):
    """A whole training run with CostedToyCLIP, at most --trajectory seconds: prints ms / iteration and
    the occupied fraction every `window`. Returns (iterations, seconds, peak GiB)."""
    cfg, fast, opt, vit, _ = setup(amp, compile_, ckpt, occ, args, device)
    prior, origin = CostedToyCLIP(vit, device, compile_), torch.zeros(3)
    txt = prior.toy.encode_text(["a blue torus"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, log = 0, {}

    def advance(n):
        nonlocal origin, step, log
        for _ in range(n):
            log, origin = D.train_step(fast, opt, cfg, prior, txt, origin, step, device)
            step += 1
    t_start = t0 = time.perf_counter()
    while step < iters and time.perf_counter() - t_start < args.trajectory:
        if step == args.profile_at > 0:            # its time is left out of the window and the total
            t_prof = time.perf_counter()
            print_profile(lambda: advance(3), device)
            t_prof = time.perf_counter() - t_prof
            t_start, t0 = t_start + t_prof, t0 + t_prof
        advance(1)
        if step % window == 0:
            sync(device)
            ms, t0 = (time.perf_counter() - t0) * 1e3 / window, time.perf_counter()
            occupied = f"{fast.occupancy.mask.float().mean():.1%}" if occ else "-"
            print(f"| {step - window + 1}-{step} | {ms:.1f} | {occupied} | {log['clip']:.3f} | "
                  f"{log['transmittance']:.2f} |", flush=True)
    sync(device)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return step, time.perf_counter() - t_start, mem


def setup(amp, compile_, ckpt, occ, args, device):
    """The config, the (compiled) field, Adam, the random CLIP and the prompt's embedding of one variant."""
    cfg = D.parse_args(["--preset", "paper", "--size", str(args.size), "--crop-frac", str(args.crop / args.size),
                        "--n-samples", str(args.n_samples), "--n-crops", "8", "--device", str(device), "--threads", "0",
                        "--prompt", "a bouquet of flowers"]
                       + (["--amp"] if amp else []) + (["--compile"] if compile_ else [])
                       + (["--checkpoint"] if ckpt else []) + (["--occupancy"] if occ else []) + args.extra.split())
    torch.manual_seed(0)
    field = D.DreamField(cfg).to(device)
    fast = torch.compile(field) if compile_ else field
    opt = torch.optim.Adam(field.parameters(), lr=1e-4, eps=1e-5, fused=device.type == "cuda")   # as dreamfields.train
    prior = random_clip("ViT-B-16", device)
    if compile_:
        D.compile_image_tower(prior)
    return cfg, fast, opt, prior, prior.encode_text([cfg.prompt])


def time_variant(amp, compile_, ckpt, occ, args, device):
    """Median and mean ms per iteration, peak GPU memory (GiB) and warm-up seconds of one variant (a string
    when it runs out of memory)."""
    cfg, fast, opt, prior, txt = setup(amp, compile_, ckpt, occ, args, device)
    origin = torch.zeros(3)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        t_first = time.perf_counter()
        for step in range(3):                                                   # warm-up (and compilation)
            _, origin = D.train_step(fast, opt, cfg, prior, txt, origin, step, device)
        warm = time.perf_counter() - t_first
        times = []
        for step in range(args.iters):
            sync(device)
            t0 = time.perf_counter()
            _, origin = D.train_step(fast, opt, cfg, prior, txt, origin, step + 3, device)
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        if occ:
            with torch.no_grad():
                kept = D.render_view(fast, cfg, D.sample_pose(cfg, origin)[0].to(device))[2].numel()
            print(f"  occupied cells {fast.occupancy.mask.float().mean():.1%}, samples through the field "
                  f"{kept / (cfg.size ** 2 * cfg.n_samples):.1%}", flush=True)
    except torch.OutOfMemoryError:
        return "out of memory"
    finally:
        del fast, opt, prior
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], sum(times) / len(times), mem, warm


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=32, help="timed iterations per variant (after 3 warm-up; the grid "
                   "is refreshed every 16)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--size", type=int, default=168, help="render size (the paper's medium quality: 168)")
    p.add_argument("--crop", type=int, default=154, help="crop size (medium quality: 154)")
    p.add_argument("--n-samples", type=int, default=192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", default="", help="instead of timing: a torch.profiler table of this variant")
    p.add_argument("--trajectory", type=float, default=0.0,
                   help="time whole runs (toy-CLIP loss + ViT-B/16 cost) for at most this many seconds each")
    p.add_argument("--profile-at", type=int, default=0,
                   help="with --trajectory: a torch.profiler table of 3 iterations after this many")
    p.add_argument("--extra", default="", help="more dreamfields.py flags for every variant, e.g. \"--grid-thickness 0.1\"")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.profile:
        return profile_variant(*VARIANTS[args.profile], args, device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    if args.trajectory:
        for name in args.variants.split(","):
            print(f"\n{name}, {args.size} px, {args.n_samples} samples, {gpu}, torch {torch.__version__}\n\n"
                  "| iterations | ms / iteration | occupied cells | toy-CLIP score | transmittance |\n"
                  "| --- | ---: | ---: | ---: | ---: |", flush=True)
            n, sec, mem = trajectory(*VARIANTS[name], args, device)
            print(f"\n{name}: {n} iterations in {sec:.0f} s (compilation included), {sec / n * 1e3:.1f} ms each, "
                  f"peak {mem:.1f} GiB", flush=True)
        return
    head = (f"Dream Fields iteration, {args.size} px, {args.n_samples} samples, 8 crops of {args.crop} px -> ViT-B/16 "
            f"(random weights), official-size MLP, {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    lines = [head, "", "| variant | ms / iteration (median) | mean | 10k iterations (mean) | peak memory (GiB) "
             "| warm-up s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    for name in args.variants.split(","):
        r = time_variant(*VARIANTS[name], args, device)
        if isinstance(r, str):
            line = f"| {name} | {r} | | | | |"
        else:
            med, mean, mem, warm = r
            line = f"| {name} | {med:.1f} | {mean:.1f} | {mean * 10_000 / 60_000:.1f} min | {mem:.1f} | {warm:.0f} |"
        lines.append(line)
        print(line, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
