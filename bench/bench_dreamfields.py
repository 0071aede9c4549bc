"""Time one Dream Fields iteration at the paper's medium quality on the GPU.

One iteration = dreamfields.train_step: a random pose, a 168x168 render with 192 jittered samples per
ray through the official-size MLP (Dense 128, 4 residual blocks of width 256, positional encoding of
8 frequencies), 8 random 154-px crops over random backgrounds resized to 224, a ViT-B/16-shaped CLIP
image tower (open_clip "ViT-B-16", random weights: nothing is downloaded), the CLIP + transmittance
loss, the backward pass, Adam, the origin update. Variants (cumulative where marked +): eager fp32
(TF32 matmuls), bf16 autocast, torch.compile of the field and of CLIP's image tower, and
--checkpoint (recompute each ray chunk in the backward pass, for memory).

    python bench/bench_dreamfields.py [--iters 10] [--variants fp32,bf16,...]
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
# name -> (bf16 autocast, torch.compile, activation checkpointing)
VARIANTS = {"fp32": (False, False, False), "fp32+checkpoint": (False, False, True),
            "bf16": (True, False, False), "bf16+checkpoint": (True, False, True),
            "bf16+compile": (True, True, False), "bf16+compile+checkpoint": (True, True, True)}


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


def profile_variant(amp, compile_, ckpt, args, device, rows: int = 25):
    """torch.profiler table of 3 iterations (after 3 warm-up ones): where the GPU time goes."""
    cfg, fast, opt, prior, txt = setup(amp, compile_, ckpt, args, device)
    origin = torch.zeros(3)
    for step in range(3):
        _, origin = D.train_step(fast, opt, cfg, prior, txt, origin, step, device)
    sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for step in range(3):
            _, origin = D.train_step(fast, opt, cfg, prior, txt, origin, step + 3, device)
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def setup(amp, compile_, ckpt, args, device):
    """The config, the (compiled) field, Adam, the random CLIP and the prompt's embedding of one variant."""
    cfg = D.parse_args(["--preset", "paper", "--size", str(args.size), "--crop-frac", str(args.crop / args.size),
                        "--n-samples", str(args.n_samples), "--n-crops", "8", "--device", str(device), "--threads", "0",
                        "--prompt", "a bouquet of flowers"]
                       + (["--amp"] if amp else []) + (["--compile"] if compile_ else [])
                       + (["--checkpoint"] if ckpt else []))
    torch.manual_seed(0)
    prior = random_clip("ViT-B-16", device)
    if compile_:
        prior.model.visual = torch.compile(prior.model.visual)
    field = D.DreamField(cfg).to(device)
    fast = torch.compile(field) if compile_ else field
    opt = torch.optim.Adam(field.parameters(), lr=1e-4, eps=1e-5)
    return cfg, fast, opt, prior, prior.encode_text([cfg.prompt])


def time_variant(amp, compile_, ckpt, args, device):
    """Median ms per iteration, peak GPU memory (GiB) and warm-up seconds of one variant (a string when it
    runs out of memory)."""
    cfg, fast, opt, prior, txt = setup(amp, compile_, ckpt, args, device)
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
    except torch.OutOfMemoryError:
        return "out of memory"
    finally:
        del fast, opt, prior
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], mem, warm


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per variant (after 3 warm-up)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--size", type=int, default=168, help="render size (the paper's medium quality: 168)")
    p.add_argument("--crop", type=int, default=154, help="crop size (medium quality: 154)")
    p.add_argument("--n-samples", type=int, default=192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", default="", help="instead of timing: a torch.profiler table of this variant")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.profile:
        return profile_variant(*VARIANTS[args.profile], args, device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    head = (f"Dream Fields iteration, {args.size} px, {args.n_samples} samples, 8 crops of {args.crop} px -> ViT-B/16 "
            f"(random weights), official-size MLP, {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    lines = [head, "", "| variant | ms / iteration (median) | 10k iterations | peak memory (GiB) | warm-up s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    for name in args.variants.split(","):
        r = time_variant(*VARIANTS[name], args, device)
        if isinstance(r, str):
            line = f"| {name} | {r} | | | |"
        else:
            ms, mem, warm = r
            line = f"| {name} | {ms:.1f} | {ms * 10_000 / 60_000:.1f} min | {mem:.1f} | {warm:.0f} |"
        lines.append(line)
        print(line, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
