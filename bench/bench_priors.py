"""Time one SDS step of a Stable-Diffusion-2.1-base-shaped prior (random weights) on the GPU.

One step = bilinear upsample of a 64x64 render to 512, VAE encode with gradient to 4x64x64
latents, one UNet call on a batch of 2 (unconditional + conditional) without gradient, the
guidance arithmetic, and the backward pass through the VAE encoder to the render. fp16.
Variants: plain eager; channels_last; torch.compile of the UNet (and of the VAE encoder).
SDPA (torch's fused attention) is diffusers' default attention in every variant.

    python bench/bench_priors.py [--batch 1] [--iters 30]
Prints a markdown table: ms per step (median over iters) and peak GPU memory.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def time_step(prior, batch: int, iters: int, warmup: int):
    """Median ms of one SDS step (forward + backward to the render) and the peak memory in GiB."""
    render = torch.rand(batch, 3, 64, 64, device=prior.device, requires_grad=True)
    gen = torch.Generator(prior.device).manual_seed(0)

    def step():
        loss, _ = prior.sds_loss(render, "a hamburger", elevation=10.0, azimuth=0.0, generator=gen)
        loss.backward()
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
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
