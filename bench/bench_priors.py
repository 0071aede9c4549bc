"""Time the priors at real size with random weights on the GPU: one SDS step of a
Stable-Diffusion-2.1-base-shaped model, and the CLIP ViT-B/16 image embedding of 8 crops.

SDS: one step = bilinear upsample of a 64x64 render to 512, VAE encode with gradient to 4x64x64
latents, one UNet call on a batch of 2 (unconditional + conditional) without gradient, the
guidance arithmetic, and the backward pass through the VAE encoder to the render. fp16.
Variants: plain eager; channels_last; torch.compile of the UNet (and of the VAE encoder).
SDPA (torch's fused attention) is diffusers' default attention in every variant.

CLIP: 8 crops (224 px, as Dream Fields feeds its 154-px crops resized) through open_clip's ViT-B-16
image tower via common.CLIPPrior.encode_image (preprocessing included): the embedding alone
(no gradient) and the embedding with the backward pass to the crops (Dream Fields' use).
Variants: fp32 (TF32 matmuls), bf16 autocast, bf16 autocast + torch.compile of the tower.

    python bench/bench_priors.py [--part sds|clip|all] [--batch 1] [--iters 30]
Prints markdown tables: ms (median over iters) and peak GPU memory.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DiffusionPrior  # noqa: E402

# Stable Diffusion 2.1 base (stabilityai/stable-diffusion-2-1-base), unet/config.json and vae/config.json
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)


def build_prior(device):
    """A DiffusionPrior with SD 2.1 base's UNet + VAE shapes and random weights, fp16; the text
    encoder is replaced by random (1, 77, 1024) embeddings."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    prior = DiffusionPrior.__new__(DiffusionPrior)
    prior.device, prior.dtype = device, torch.float16
    prior.unet = UNet2DConditionModel(**SD21_UNET).to(device, torch.float16).eval().requires_grad_(False)
    prior.vae = AutoencoderKL(**SD_VAE).to(device, torch.float16).eval().requires_grad_(False)
    prior.scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    prior.vae_scale, prior.resolution = 8, 512
    prior.num_train_timesteps = 1000
    prior.alphas_cumprod = prior.scheduler.alphas_cumprod.to(device)
    prior.toy_vocab = None
    emb = {t: torch.randn(1, 77, 1024, device=device, dtype=torch.float16) for t in ("", "a hamburger, front view")}
    prior._embeddings = emb
    return prior


def median_ms(step, iters: int, warmup: int):
    """Median wall ms of step() over iters calls after warmup ones (CUDA-synchronised), and the
    peak GPU memory of those calls in GiB."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2 ** 30


def time_step(prior, batch: int, iters: int, warmup: int):
    """Median ms of one SDS step (forward + backward to the render) and the peak memory in GiB."""
    render = torch.rand(batch, 3, 64, 64, device=prior.device, requires_grad=True)
    gen = torch.Generator(prior.device).manual_seed(0)

    def step():
        loss, _ = prior.sds_loss(render, "a hamburger", elevation=10.0, azimuth=0.0, generator=gen)
        loss.backward()
    return median_ms(step, iters, warmup)


def time_clip(prior, crops: int, iters: int, warmup: int, amp: bool, backward: bool):
    """Median ms of one embedding of `crops` random 224-px images (with the backward pass to them
    if `backward`) and the peak memory in GiB."""
    images = torch.rand(crops, 3, 224, 224, device=prior.mean.device, requires_grad=backward)

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=amp), torch.set_grad_enabled(backward):
            emb = prior.encode_image(images)                                     # (crops, 512)
        if backward:
            emb.sum().backward()
    return median_ms(step, iters, warmup)


def bench_clip(iters: int, crops: int = 8):
    """The CLIP table: ViT-B-16 (random weights), `crops` crops, three precisions x with/without backward."""
    from bench_dreamfields import random_clip
    prior = random_clip("ViT-B-16", torch.device("cuda"))
    rows = []
    for name, amp, compiled in (("fp32 (TF32)", False, False), ("bf16 autocast", True, False),
                                ("bf16 autocast + torch.compile", True, True)):
        if compiled:                                 # the last variant: the tower stays compiled
            prior.model.visual = torch.compile(prior.model.visual)
        for backward in (False, True):
            rows.append((name, "embedding + backward" if backward else "embedding") +
                        time_clip(prior, crops, iters, 5 if compiled else 3, amp, backward))
    print(f"\nCLIP ViT-B/16 image tower (open_clip ViT-B-16, random weights), {crops} crops of 224 px, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| precision | pass | ms (median) | peak memory (GiB) |")
    print("| --- | --- | ---: | ---: |")
    for name, kind, ms, mem in rows:
        print(f"| {name} | {kind} | {ms:.1f} | {mem:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["sds", "clip", "all"], default="all")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    if args.part in ("clip", "all"):
        bench_clip(args.iters)
    if args.part == "clip":
        return
    prior = build_prior(dev)
    rows = []
    rows.append(("eager (SDPA)",) + time_step(prior, args.batch, args.iters, 3))
    prior.unet.to(memory_format=torch.channels_last)
    prior.vae.to(memory_format=torch.channels_last)
    rows.append(("+ channels_last",) + time_step(prior, args.batch, args.iters, 3))
    unet = prior.unet
    prior.unet = torch.compile(unet, fullgraph=True)
    rows.append(("+ torch.compile(unet)",) + time_step(prior, args.batch, args.iters, 3))
    prior.vae.encoder = torch.compile(prior.vae.encoder)
    rows.append(("+ torch.compile(vae encoder)",) + time_step(prior, args.batch, args.iters, 3))
    prior.unet = torch.compile(unet, fullgraph=True, mode="reduce-overhead")      # + CUDA graphs
    rows.append(("+ CUDA graphs for the unet (reduce-overhead)",) + time_step(prior, args.batch, args.iters, 5))
    print(f"\nSDS step, SD-2.1-base-shaped UNet + VAE, random weights, fp16, render 64 -> 512 -> 4x64x64, "
          f"batch {args.batch}, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| variant | ms / step (median) | peak memory (GiB) |")
    print("| --- | ---: | ---: |")
    for name, ms, mem in rows:
        print(f"| {name} | {ms:.1f} | {mem:.2f} |")


if __name__ == "__main__":
    main()
