"""pointe.py -- Point-E (Nichol et al., 2022): text -> image -> coloured point cloud -> mesh.

Pipeline, in the paper's order:
  1. a text-to-image model draws one synthetic view of the prompt (the paper: fine-tuned GLIDE);
  2. a transformer diffusion model turns CLIP features of that view into 1024 coloured points;
  3. an upsampler diffusion model, conditioned on those points, adds 3072 more (4096 in all);
  4. an SDF regression model turns the cloud into a signed distance field; marching cubes gives
     the mesh, each vertex coloured by its nearest point.
Both diffusion models are Gaussian diffusions (1024 steps, epsilon prediction, learned-range
variance) sampled with the Karras/Heun sampler and classifier-free guidance on the denoised x0.

Run:
  python pointe.py --prompt "a yellow sphere"               # the toy models from data/pointe/
  python pointe.py --prompt "a red chair" --base base40M-textvec --weights point_e_model_cache
  python pointe.py train --stage all --export data/pointe   # train the toy models on the toy world
  python pointe.py eval --per-caption 10                    # shape/colour/Chamfer over the 30 captions
Outputs go to out/pointe/<name>/: image.png (the synthetic view), points.ply (4096 coloured points;
toy 1024), preview.png (the cloud), mesh.ply, mesh.obj (vertex colours), metrics.json (timings).

The model classes load the official checkpoints (openai/point-e: base_40m_textvec.pt, base_40m.pt,
base_300m.pt, base_1b.pt, upsample_40m.pt, sdf.pt) with load_state_dict(strict=True). CLIP is not
part of them: its features come from common.py's CLIP prior.

The toy models in data/pointe/ (7.8 MB) were trained on one H100, each stage stopped by --time-limit:
toy-base 6566 steps (200 s, batch 128), toy-upsample 6517 steps (165 s, batch 64), toy-sdf 2306
steps (100 s, batch 32), lr 3e-4, seed 0: `train --device cuda --export data/pointe --steps 30000
--stage S --batch B --time-limit T` (sdf: --steps 20000).
RESULT (`pointe.py eval --per-caption 10`, H100, 300 clouds, 64 + 64 Karras steps, guidance 3):
  through the toy SD image (the pipeline): right shape 94%, right colour 95%, both 89% (target
  >= 80%); mean Chamfer distance 0.073 toy units (cube 0.088, sphere 0.084, cylinder 0.067, cone
  0.067, torus 0.060); 32 steps per stage: 90%, 0.078. From held-out toy renders instead: 87%,
  0.079. The toy CLIP recognises only 81% of those toy-SD images, the cloud is right more often.
  With the toy SD of session 4 (CPU, 4 clouds per caption): both right 88%, Chamfer 0.077.
RESULT: `python pointe.py --prompt "a yellow sphere"` on the 2-core CPU: 39 s wall end to end
  (image 7 s, points 15 s, SDF + mesh at 64^3 10 s; the rest is loading), on a lightly shared machine.

DEVIATION: attention uses torch's scaled_dot_product_attention (same maths as the official
  q.k / sqrt(d) softmax; it differs only in rounding).
DEVIATION: classifier-free dropout of the CLIP input happens in the training loop, not inside
  forward() as in the official code (same effect: the whole input zeroed with p = 0.1).
DEVIATION: on CUDA the two diffusion models run under bf16 autocast by default (--precision fp32
  for the official float32); 1.4 s instead of 7.8 s per sample on an H100 (bench/RESULTS_pointe.md).
DEVIATION: the SDF is taken as positive inside: the official code flips scikit-image's triangles,
  which gives outward normals only for that sign (the released code has no SDF training recipe;
  the toy SDF model is trained by mean squared error).
DEVIATION: the toy models are much smaller (256 + 768 points; widths 192 / 128 / 128; 4 / 4 / 3+2
  layers; 2.1M, 0.9M, 1.0M parameters), their parameters are stored in float16 (7.8 MB in all;
  loading casts them back), and the saved weights are an exponential moving average (0.999). The
  toy image prior is the project's tiny diffusion prior and the toy CLIP stands in for ViT-L/14.
DEVIATION: the toy base model trains on toy-world renders (as the paper on renders of its 3D
  models) and also on 256 toy-SD samples per caption labelled by their prompt: the paper instead
  fine-tunes GLIDE on renders; we close the same image gap from the other side.
NOTE: on the CPU torch runs on one thread (--threads 1): with these small tensors, two threads on
  the busy 2-core machine made each model call 7x slower (0.29 s instead of 0.04 s).
"""
import argparse
import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ================================================================================================
# Config: the official model configurations (names as in openai/point-e) and our toy ones
# ================================================================================================

_B40 = dict(kind="points", width=512, layers=12, heads=8, n_ctx=1024, schedule="cosine")
MODEL_CONFIGS = {
    "base40M-imagevec": dict(_B40, cond="vec", clip_dim=768),
    "base40M-textvec": dict(_B40, cond="vec", clip_dim=768),
    "base40M-uncond": dict(_B40, cond=None),
    "base40M": dict(_B40, cond="grid", clip_dim=1024),
    "base300M": dict(_B40, cond="grid", clip_dim=1024, width=1024, layers=24, heads=16),
    "base1B": dict(_B40, cond="grid", clip_dim=1024, width=2048, layers=24, heads=32),
    "upsample": dict(_B40, cond="grid", clip_dim=1024, n_ctx=3072, cond_ctx=1024, schedule="linear"),
    "sdf": dict(kind="sdf", width=256, n_ctx=4096, encoder_layers=8, encoder_heads=4,
                decoder_layers=4, decoder_heads=4),
    # toy: clip_dim of toy-base is filled in from the CLIP prior at build time
    "toy-base": dict(kind="points", width=192, layers=4, heads=4, n_ctx=256, schedule="cosine",
                     cond="vec", clip_dim=None),
    "toy-upsample": dict(kind="points", width=128, layers=4, heads=4, n_ctx=768, cond_ctx=256,
                         schedule="linear", cond=None),
    "toy-sdf": dict(kind="sdf", width=128, n_ctx=1024, encoder_layers=3, encoder_heads=4,
                    decoder_layers=2, decoder_heads=4),
}
CHECKPOINT_FILES = {"base40M-imagevec": "base_40m_imagevec.pt", "base40M-textvec": "base_40m_textvec.pt",
                    "base40M-uncond": "base_40m_uncond.pt", "base40M": "base_40m.pt",
                    "base300M": "base_300m.pt", "base1B": "base_1b.pt", "upsample": "upsample_40m.pt",
                    "sdf": "sdf.pt"}
INIT_SCALE = 0.25
TIMESTEPS = 1024
# data space (xyz, RGB 0..255) -> model space: x * scale + bias  (xyz x2, colour -> [-1, 1])
CHANNEL_SCALES = [2.0, 2.0, 2.0, 2.0 / 255.0, 2.0 / 255.0, 2.0 / 255.0]
CHANNEL_BIASES = [0.0, 0.0, 0.0, -1.0, -1.0, -1.0]
# Karras sampler per stage (PointCloudSampler's defaults): (base, upsampler)
SAMPLER = dict(steps=64, sigma_min=1e-3, sigma_max=(120.0, 160.0), rho=7.0, s_churn=(3.0, 0.0),
               guidance=3.0)
MESH_GRID, MESH_SIDE, MESH_BATCH = 128, 1.02, 4096
COND_DROP = 0.1
EMA_DECAY = 0.999          # toy training: the saved weights are this moving average

# ================================================================================================
# Models: a transformer over point tokens (base / upsampler) and the SDF model
# ================================================================================================


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim): [cos(t f_i), sin(t f_i)],
    f_i = max_period^(-i / (dim/2)). Cos first, as in the official code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                                      # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def init_linear(layer: nn.Linear, std: float):
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)


class MLP(nn.Module):
    """width -> 4 width -> width with exact (erf) GELU."""

    def __init__(self, width: int, std: float):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        init_linear(self.c_fc, std), init_linear(self.c_proj, std)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


def attention(q, k, v) -> torch.Tensor:
    """Per-head attention softmax(q k^T / sqrt(d)) v. q (B, T, H, d), k and v (B, S, H, d) -> (B, T, H*d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """c_qkv gives, per head, a contiguous [q | k | v] of head_dim each (the official layout)."""

    def __init__(self, width: int, heads: int, std: float):
        super().__init__()
        self.heads = heads
        self.c_qkv, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        init_linear(self.c_qkv, std), init_linear(self.c_proj, std)

    def forward(self, x):
        q, k, v = self.c_qkv(x).view(*x.shape[:2], self.heads, -1).chunk(3, dim=-1)   # (B, T, H, d) each
        return self.c_proj(attention(q, k, v))


class CrossAttention(nn.Module):
    """Queries from x (c_q), keys and values from data (c_kv: per head a contiguous [k | v])."""

    def __init__(self, width: int, heads: int, std: float):
        super().__init__()
        self.heads = heads
        self.c_q, self.c_kv = nn.Linear(width, width), nn.Linear(width, 2 * width)
        self.c_proj = nn.Linear(width, width)
        init_linear(self.c_q, std), init_linear(self.c_kv, std), init_linear(self.c_proj, std)

    def forward(self, x, data):
        q = self.c_q(x).view(*x.shape[:2], self.heads, -1)                           # (B, T, H, d)
        k, v = self.c_kv(data).view(*data.shape[:2], self.heads, -1).chunk(2, dim=-1)  # (B, S, H, d)
        return self.c_proj(attention(q, k, v))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int, std: float):
        super().__init__()
        self.attn, self.ln_1 = SelfAttention(width, heads, std), nn.LayerNorm(width)
        self.mlp, self.ln_2 = MLP(width, std), nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ResidualCrossAttentionBlock(nn.Module):
    """x + cross_attn(ln_1 x, ln_2 data), then x + mlp(ln_3 x)."""

    def __init__(self, width: int, heads: int, std: float):
        super().__init__()
        self.ln_1, self.ln_2, self.ln_3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn, self.mlp = CrossAttention(width, heads, std), MLP(width, std)

    def forward(self, x, data):
        x = x + self.attn(self.ln_1(x), self.ln_2(data))
        return x + self.mlp(self.ln_3(x))


class Stack(nn.Module):
    """`layers` residual blocks (module name `resblocks`, as in the official Transformer)."""

    def __init__(self, block, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        std = INIT_SCALE / math.sqrt(width)
        self.resblocks = nn.ModuleList([block(width, heads, std) for _ in range(layers)])

    def forward(self, x, *data):
        for blk in self.resblocks:
            x = blk(x, *data)
        return x


class PointDiffusionTransformer(nn.Module):
    """The base model and the upsampler. Input points (B, 6, N) in model space and integer
    timesteps t (B,) -> (B, 12, N): 6 epsilon channels then 6 variance interpolation values.
    The sequence is [time token, conditioning tokens..., point tokens]; no positional embedding.
    Conditioning: `clip` (B, 768) for cond="vec" (one token), (B, 1024, 256) for cond="grid"
    (256 patch tokens of ViT-L/14); `low_res` (B, 6, cond_ctx) in data units for the upsampler."""

    def __init__(self, cfg: dict):
        super().__init__()
        w, self.cfg = cfg["width"], cfg
        self.time_embed = MLP(w, INIT_SCALE / math.sqrt(w))
        self.ln_pre = nn.LayerNorm(w)
        self.backbone = Stack(ResidualAttentionBlock, w, cfg["layers"], cfg["heads"])
        self.ln_post = nn.LayerNorm(w)
        self.input_proj, self.output_proj = nn.Linear(6, w), nn.Linear(w, 12)
        nn.init.zeros_(self.output_proj.weight), nn.init.zeros_(self.output_proj.bias)
        if cfg.get("cond_ctx"):                                       # the upsampler
            self.cond_point_proj = nn.Linear(6, w)
            self.register_buffer("channel_scales", torch.tensor(CHANNEL_SCALES))
            self.register_buffer("channel_biases", torch.tensor(CHANNEL_BIASES))
        if cfg["cond"] == "vec":
            self.clip_embed = nn.Linear(cfg["clip_dim"], w)
        elif cfg["cond"] == "grid":
            self.clip_embed = nn.Sequential(nn.LayerNorm(cfg["clip_dim"]), nn.Linear(cfg["clip_dim"], w))

    def forward(self, x, t, clip=None, low_res=None):
        B = x.shape[0]
        tokens = [self.time_embed(timestep_embedding(t, self.backbone.width))[:, None]]   # (B, 1, W)
        if self.cfg["cond"] == "vec":       # unit CLIP vector rescaled to unit variance per entry
            tokens.append(self.clip_embed(clip * math.sqrt(clip.shape[1]))[:, None])
        elif self.cfg["cond"] == "grid":
            if clip is None:                # e.g. the upsampler in the text pipeline
                clip = x.new_zeros(B, self.cfg["clip_dim"], 256)
            tokens.append(self.clip_embed(clip.permute(0, 2, 1)))                 # (B, 256, W)
        if self.cfg.get("cond_ctx"):
            lr = low_res * self.channel_scales[:, None] + self.channel_biases[:, None]
            tokens.append(self.cond_point_proj(lr.permute(0, 2, 1)))            # (B, cond_ctx, W)
        n_cond = sum(tok.shape[1] for tok in tokens)
        h = torch.cat(tokens + [self.input_proj(x.permute(0, 2, 1))], dim=1)   # (B, n_cond + N, W)
        h = self.ln_post(self.backbone(self.ln_pre(h)))
        return self.output_proj(h[:, n_cond:]).permute(0, 2, 1)                # (B, 12, N)


class PointCloudSDFModel(nn.Module):
    """Signed distance (positive inside) at query points given a point cloud: a transformer
    encoder over the cloud's points, then query points cross-attend to those latents."""

    def __init__(self, cfg: dict):
        super().__init__()
        w, self.cfg = cfg["width"], cfg
        self.encoder_input_proj = nn.Linear(3, w)
        self.encoder = Stack(ResidualAttentionBlock, w, cfg["encoder_layers"], cfg["encoder_heads"])
        self.decoder_input_proj = nn.Linear(3, w)
        self.decoder = Stack(ResidualCrossAttentionBlock, w, cfg["decoder_layers"], cfg["decoder_heads"])
        self.ln_post, self.output_proj = nn.LayerNorm(w), nn.Linear(w, 1)

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        """points (B, 3, N) -> latents (B, N, W)."""
        return self.encoder(self.encoder_input_proj(points.permute(0, 2, 1)))

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """queries (B, 3, Q), latents from encode() -> SDF (B, Q)."""
        h = self.decoder(self.decoder_input_proj(queries.permute(0, 2, 1)), latents)
        return self.output_proj(self.ln_post(h))[..., 0]


def build_model(name: str, clip_dim: int = None, device="cpu") -> nn.Module:
    """A model of a named configuration (random init); clip_dim fills a toy config's CLIP width."""
    cfg = dict(MODEL_CONFIGS[name], name=name)
    if cfg.get("clip_dim", 0) is None:
        cfg["clip_dim"] = clip_dim
    cls = PointCloudSDFModel if cfg["kind"] == "sdf" else PointDiffusionTransformer
    with torch.device(device):
        return cls(cfg)


def load_model(name: str, path: str, device="cpu") -> nn.Module:
    """Build `name` and load a plain state dict (official or ours) with strict=True."""
    if not os.path.exists(path):
        raise common.UserError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    clip_dim = state["clip_embed.weight"].shape[1] if "clip_embed.weight" in state else None
    model = build_model(name, clip_dim, device="meta")      # no random init: the weights are assigned
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise common.UserError(f"{path} does not fit config {name}: {str(e).splitlines()[0]}")
    return model.float().to(device).eval()

# ================================================================================================
# Gaussian diffusion: schedules, q(x_t | x_0), learned-range variance, training loss
# ================================================================================================


def beta_schedule(name: str, steps: int = TIMESTEPS) -> torch.Tensor:
    """(steps,) float64 betas. cosine (Nichol & Dhariwal 2021): a(s) = cos^2((s + 0.008) / 1.008
    * pi / 2), beta_i = min(1 - a((i+1)/T) / a(i/T), 0.999); linear (Ho et al.) rescaled to T steps."""
    if name == "cosine":
        a = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - a((i + 1) / steps) / a(i / steps), 0.999) for i in range(steps)],
                            dtype=torch.float64)
    scale = 1000.0 / steps
    return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


class GaussianDiffusion:
    """Discrete DDPM with T = 1024 steps (t = 0..T-1) in float64, read out as float32.
    Model space is data space scaled by CHANNEL_SCALES / CHANNEL_BIASES."""

    def __init__(self, schedule: str, steps: int = TIMESTEPS):
        b = self.betas = beta_schedule(schedule, steps)
        self.T = steps
        ab = self.alphas_cumprod = torch.cumprod(1.0 - b, 0)                        # alpha_bar_t
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        # posterior q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta~_t), beta~_t = beta_t (1-ab_prev) / (1-ab)
        self.posterior_variance = b * (1 - ab_prev) / (1 - ab)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))  # beta~_0 = 0
        self.coef1 = b * ab_prev.sqrt() / (1 - ab)
        self.coef2 = (1 - ab_prev) * (1 - b).sqrt() / (1 - ab)
        self.scales = torch.tensor(CHANNEL_SCALES)[:, None]
        self.biases = torch.tensor(CHANNEL_BIASES)[:, None]

    def scale(self, x):
        """data (B, 6, N): xyz, RGB 0..255 -> model space (xyz x2, RGB in [-1, 1])."""
        return x * self.scales.to(x) + self.biases.to(x)

    def unscale(self, x):
        return (x - self.biases.to(x)) / self.scales.to(x)

    @staticmethod
    def at(arr: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """arr[t] as float32 (B, 1, 1) to broadcast over (B, C, N)."""
        return arr.to(t.device)[t].float()[:, None, None]

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps."""
        ab = self.at(self.alphas_cumprod, t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0_from_eps(self, x_t, t, eps):
        """x_0 = sqrt(1 / ab_t) x_t - sqrt(1 / ab_t - 1) eps."""
        ab = self.alphas_cumprod
        return self.at((1 / ab).sqrt(), t) * x_t - self.at((1 / ab - 1).sqrt(), t) * eps

    def posterior_mean(self, x0, x_t, t):
        return self.at(self.coef1, t) * x0 + self.at(self.coef2, t) * x_t

    def learned_log_variance(self, v, t):
        """learned range (Nichol & Dhariwal 2021, Eq. 15): v in [-1, 1] interpolates, in log space,
        between the clipped posterior variance beta~_t (v = -1) and beta_t (v = 1)."""
        frac = (v + 1) / 2
        return frac * self.at(torch.log(self.betas), t) + (1 - frac) * self.at(
            self.posterior_log_variance_clipped, t)

    def training_losses(self, model, x0_data, t, **cond) -> dict:
        """Improved DDPM's hybrid loss (Eq. 16): L_simple on epsilon + the t-th variational-bound
        term, which trains only the variance (the mean is detached in it); the official weight is
        1 per term, i.e. lambda = 1/T on the whole bound. x0_data (B, 6, N) in data units; t (B,).
        Returns per-sample (B,) tensors: loss, mse, vb (bits per dimension)."""
        x0 = self.scale(x0_data)
        noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        eps, v = model(x_t, t, **cond).chunk(2, dim=1)                               # (B, 6, N) each
        mse = ((eps - noise) ** 2).flatten(1).mean(1)
        true_mean = self.posterior_mean(x0, x_t, t)
        true_logvar = self.at(self.posterior_log_variance_clipped, t)
        model_mean = self.posterior_mean(self.x0_from_eps(x_t, t, eps.detach()), x_t, t)
        kl = normal_kl(true_mean, true_logvar, model_mean, self.learned_log_variance(v, t))
        vb = kl.flatten(1).mean(1) / math.log(2.0)
        vb = torch.where(t == 0, torch.zeros_like(vb), vb)      # continuous data: no decoder NLL at t=0
        return {"loss": mse + vb, "mse": mse, "vb": vb}

# ================================================================================================
# Karras sampler (Karras et al. 2022, Algorithm 2) driving the discrete epsilon model
# ================================================================================================


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then a final 0.
    Returns (n + 1,)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def sigma_to_t(diffusion: GaussianDiffusion, sigma: float) -> int:
    """The integer timestep whose alpha_bar matches 1 / (sigma^2 + 1): linear interpolation of
    t over alpha_bar, truncated (as the official GaussianToKarrasDenoiser), clamped to 0..T-1."""
    ab = diffusion.alphas_cumprod.numpy()
    a = 1.0 / (sigma ** 2 + 1)
    if a > ab[0]:
        return 0
    if a <= ab[-1]:
        return diffusion.T - 1
    return int(np.interp(a, ab[::-1], np.arange(diffusion.T)[::-1]))


def eps_denoiser(model, diffusion: GaussianDiffusion, cond: dict, clip_denoised: bool = True):
    """Wrap the epsilon model as a Karras denoiser D(x, sigma) -> x0, with x = x0 + sigma n.
    In DDPM terms x_t = x / sqrt(sigma^2 + 1) at the t of sigma."""
    def denoise(x, sigma: float):
        t = torch.full((x.shape[0],), sigma_to_t(diffusion, sigma), device=x.device, dtype=torch.long)
        x_t = x / math.sqrt(sigma ** 2 + 1)
        eps = model(x_t, t, **cond)[:, :x.shape[1]].float()
        x0 = diffusion.x0_from_eps(x_t, t, eps)
        return x0.clamp(-1, 1) if clip_denoised else x0
    return denoise


def guided(denoise, scale: float):
    """Classifier-free guidance on x0: the batch is doubled (conditional half first, the caller
    zeroes the conditioning of the second half); x0 = x0_u + s (x0_c - x0_u)."""
    def denoise_guided(x, sigma: float):
        x0_c, x0_u = denoise(torch.cat([x, x]), sigma).chunk(2)
        return x0_u + scale * (x0_c - x0_u)
    return denoise_guided


@torch.no_grad()
def heun_sample(denoise, x, sigmas: torch.Tensor, s_churn: float = 0.0) -> torch.Tensor:
    """Karras et al. Algorithm 2 with s_tmin = 0, s_tmax = inf, s_noise = 1. x starts at
    sigmas[0] noise. gamma = min(s_churn / n, sqrt(2) - 1); x at sigma_hat = sigma (1 + gamma)
    gets sqrt(sigma_hat^2 - sigma^2) fresh noise; a Heun (2nd order) step follows, Euler on the
    last step to sigma = 0."""
    n = len(sigmas) - 1
    gamma = min(s_churn / n, 2 ** 0.5 - 1)
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        noise = torch.randn_like(x)                       # drawn every step, as the official code
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + noise * math.sqrt(s_hat ** 2 - s ** 2)
        d = (x - denoise(x, s_hat)) / s_hat                    # dx/dsigma (Algorithm 2, line 7)
        x_next = x + d * (s_next - s_hat)
        if s_next > 0:                                         # Heun correction (lines 9-11)
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (d + d_next) / 2 * (s_next - s_hat)
        x = x_next
    return x


def sample_stage(model, diffusion, batch: int, n_points: int, cond: dict, guidance: float,
                 sigma_max: float, s_churn: float, steps: int = SAMPLER["steps"],
                 sigma_min: float = SAMPLER["sigma_min"], device="cpu") -> torch.Tensor:
    """One diffusion stage: (batch, 6, n_points) points in data units (xyz, RGB 0..255)."""
    use_guidance = guidance not in (0.0, 1.0)
    if use_guidance:
        cond = {k: torch.cat([v, torch.zeros_like(v)]) for k, v in cond.items()}
    denoise = eps_denoiser(model, diffusion, cond)
    if use_guidance:
        denoise = guided(denoise, guidance)
    x = torch.randn(batch, 6, n_points, device=device) * sigma_max
    return diffusion.unscale(heun_sample(denoise, x, karras_sigmas(steps, sigma_min, sigma_max),
                                         s_churn))

# ================================================================================================
# Pipeline: CLIP features -> 1024 points -> 4096 points -> SDF -> coloured mesh
# ================================================================================================


def generate_points(base, upsampler, clip, batch: int = 1, guidance=(3.0, 3.0), up_clip=None,
                    steps: int = SAMPLER["steps"], device="cpu") -> torch.Tensor:
    """Base stage then upsampler stage -> (batch, 6, N_base + N_up) in data units, colours
    clamped to 0..255 and rounded. `clip` conditions the base model; `up_clip` the upsampler
    (None: a zero grid, as the official text pipeline)."""
    low = sample_stage(base, GaussianDiffusion(base.cfg["schedule"]), batch, base.cfg["n_ctx"],
                       {} if clip is None else {"clip": clip}, guidance[0], SAMPLER["sigma_max"][0],
                       SAMPLER["s_churn"][0], steps, device=device)
    cond = {"low_res": low} if up_clip is None else {"low_res": low, "clip": up_clip}
    high = sample_stage(upsampler, GaussianDiffusion(upsampler.cfg["schedule"]), batch,
                        upsampler.cfg["n_ctx"], cond, guidance[1], SAMPLER["sigma_max"][1],
                        SAMPLER["s_churn"][1], steps, device=device)
    pts = torch.cat([low, high], dim=-1)
    return torch.cat([pts[:, :3], pts[:, 3:].clamp(0, 255).round()], dim=1)


def clip_image_grid(clip, images: torch.Tensor) -> torch.Tensor:
    """The base40M/300M/1B conditioning: ViT-L/14's last-block output for the 16x16 patch tokens
    (class token dropped, before ln_post and the projection). images (B, 3, H, W) in [0, 1] ->
    (B, 1024, 256)."""
    out = clip.model.visual.forward_intermediates(clip.preprocess(images.float()), indices=1,
                                                  intermediates_only=True, output_fmt="NLC")
    return out["image_intermediates"][0].float().permute(0, 2, 1)


@torch.no_grad()
def sdf_model_fn(model: PointCloudSDFModel, points: torch.Tensor):
    """SDF of a cloud (N, 3) as a function of queries (Q, 3) -> (Q,); encodes the cloud once."""
    latents = model.encode(points.T[None])                                      # (1, N, W)
    return torch.no_grad()(lambda q: model(q.T[None], latents)[0])


def sdf_to_mesh(sdf, grid: int = MESH_GRID, side: float = MESH_SIDE, batch: int = MESH_BATCH,
                device="cpu"):
    """Marching cubes at level 0 on sdf (Q, 3) -> (Q,) sampled on a grid^3 lattice filling a cube
    of side `side` centred at the origin. Returns verts (V, 3), faces (F, 3) tensors, wound so
    that normals point out of the positive-inside SDF."""
    aabb = torch.tensor([[-side / 2] * 3, [side / 2] * 3])
    coords = common.grid_points(aabb, grid).reshape(-1, 3).to(device)          # (grid^3, 3), x slowest
    vol = torch.cat([sdf(c).float() for c in coords.split(batch)]).view(grid, grid, grid)
    if (vol < 0).all() or (vol > 0).all():      # no zero crossing: centre it (as the official code)
        vol = vol - vol.mean()
    verts, faces = common.marching_cubes(vol, 0.0, aabb)
    return verts, faces[:, [1, 0, 2]]           # scikit-image winds these inwards: flip each triangle


def preview_image(xyz: torch.Tensor, rgb: torch.Tensor, size: int = 256, azimuth: float = 30.0,
                  elevation: float = 20.0) -> torch.Tensor:
    """An orthographic picture of a cloud: xyz (N, 3) in the Point-E frame, rgb (N, 3) in [0, 1]
    -> (size, size, 3) on white; each point a 3x3 splat, the nearest point wins each pixel."""
    a, e = math.radians(azimuth), math.radians(elevation)
    right = torch.tensor([-math.sin(a), math.cos(a), 0.0])                    # camera axes (z-up world)
    toward = torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    up = torch.linalg.cross(toward, right)
    px = ((xyz @ right + 0.6) / 1.2 * (size - 1)).round().long()              # the frame's [-0.6, 0.6]
    py = ((0.6 - xyz @ up) / 1.2 * (size - 1)).round().long()
    depth = -(xyz @ toward)                                                   # smaller = nearer
    img = torch.ones(size * size, 3)
    zbuf = torch.full((size * size,), float("inf"))
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            x, y = px + dx, py + dy
            ok = (x >= 0) & (x < size) & (y >= 0) & (y < size)
            pix = (y * size + x)[ok]
            zbuf.scatter_reduce_(0, pix, depth[ok], "amin")
            win = depth[ok] <= zbuf[pix]
            img[pix[win]] = rgb[ok][win].float()
    return img.view(size, size, 3)


def nearest_colours(verts, points, colours, chunk: int = 4096) -> torch.Tensor:
    """Each vertex (V, 3) takes the colour (N, 3) of its nearest point (N, 3)."""
    verts, points = torch.as_tensor(verts, dtype=torch.float32), torch.as_tensor(points).float().cpu()
    idx = torch.cat([torch.cdist(v, points).argmin(1) for v in verts.split(chunk)])
    return torch.as_tensor(colours).cpu()[idx]

# ================================================================================================
# Training on the toy world: toy-base (CLIP image vector -> 256 points), toy-upsample
# (256 -> +768 points), toy-sdf (cloud -> signed distance). Training only imports toyworld.
# ================================================================================================

TOY_SCALE = 0.8         # toy-world units -> the Point-E frame (objects inside [-0.5, 0.5]^3)
TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pointe")


def toy_clouds(caption_idx: torch.Tensor, n: int, generator=None) -> torch.Tensor:
    """Coloured surface points of toy objects, caption_idx (B,) -> (B, 6, n) in data units
    (xyz in the Point-E frame, RGB 0..255 from the albedo)."""
    import toyworld
    caption_idx = caption_idx.cpu()
    shape_idx, colour_idx = caption_idx // len(toyworld.COLOURS), caption_idx % len(toyworld.COLOURS)
    xyz = torch.zeros(len(caption_idx), n, 3)
    for s in shape_idx.unique().tolist():
        rows = (shape_idx == s).nonzero()[:, 0]
        pts, _ = toyworld.surface_points(toyworld.SHAPES[s], "red", len(rows) * n, generator)
        xyz[rows] = pts.view(len(rows), n, 3) * TOY_SCALE
    rgb = (toyworld.ALBEDO[colour_idx] * 255)[:, None].expand(-1, n, 3)
    return torch.cat([xyz, rgb], -1).permute(0, 2, 1)


def toy_sdf_batch(shape_idx: torch.Tensor, n_cloud: int, n_query: int, generator=None):
    """clouds (B, 3, n_cloud), queries (B, 3, n_query) and their positive-inside SDF (B, n_query),
    all in the Point-E frame (toyworld's SDF is negative inside). Samples are drawn per shape for
    all its rows at once and shuffled, so each row gets the near/far mix of sdf_samples."""
    import toyworld
    B = len(shape_idx)
    clouds, queries, targets = torch.zeros(B, n_cloud, 3), torch.zeros(B, n_query, 3), torch.zeros(B, n_query)
    for s in shape_idx.unique().tolist():
        rows = (shape_idx == s).nonzero()[:, 0]
        pts, _ = toyworld.surface_points(toyworld.SHAPES[s], "red", len(rows) * n_cloud, generator)
        q, d = toyworld.sdf_samples(toyworld.SHAPES[s], len(rows) * n_query, generator)
        perm = torch.randperm(len(q), generator=generator)
        clouds[rows] = pts.view(len(rows), n_cloud, 3)
        queries[rows], targets[rows] = q[perm].view(len(rows), n_query, 3), -d[perm].view(len(rows), n_query)
    return (clouds.permute(0, 2, 1) * TOY_SCALE, queries.permute(0, 2, 1) * TOY_SCALE, targets * TOY_SCALE)


def sd_samples(prior, per_caption: int, seed: int, chunk: int = 480):
    """`per_caption` toy-SD images of every toy caption (the images the sampling pipeline will
    see) -> images (30 per_caption, 3, H, W) in [0, 1] and caption_idx (30 per_caption,)."""
    import toyworld
    g = torch.Generator(prior.device).manual_seed(seed)
    idx = torch.arange(len(toyworld.CAPTIONS)).repeat_interleave(per_caption)
    images = [prior.sample([toyworld.CAPTIONS[i] for i in part.tolist()], generator=g).float()
              for part in idx.split(chunk)]
    return torch.cat(images), idx


def conditioning_pool(args, clip_prior, dev):
    """The base model's training pairs: toy-world renders (as the paper's renders of 3D models)
    plus toy-SD samples labelled by their prompt (DEVIATION, closes the render -> generated image
    gap). Returns CLIP image embeddings (P, D) and caption_idx (P,) on the CPU."""
    import toyworld
    t0 = time.time()
    images, captions = toyworld.random_renders(args.pool, args.render_size, args.seed, device=dev)
    parts = [(images, captions.cpu())]
    if args.sd_per_caption:
        parts.append(sd_samples(common.DiffusionPrior(args.prior, device=dev), args.sd_per_caption,
                                args.seed + 1))
    with torch.no_grad():
        emb = torch.cat([clip_prior.encode_image(chunk.to(dev)).float().cpu()
                         for im, _ in parts for chunk in im.split(256)])
    print(f"base pool: {args.pool} renders + {len(emb) - args.pool} toy-SD samples in {time.time() - t0:.0f} s")
    return emb, torch.cat([c for _, c in parts])


def train_stage(stage: str, args, run: common.RunDir, dev: torch.device, clip_prior=None):
    """Train one toy model with AdamW; the diffusion models with the hybrid loss (L_simple + L_vb)
    and 10% dropped conditioning, the SDF model by mean squared error on SDF samples. An
    exponential moving average of the weights (decay EMA_DECAY) is what gets saved."""
    import toyworld
    g = torch.Generator().manual_seed(args.seed)
    if stage == "base":
        emb, captions = conditioning_pool(args, clip_prior, dev)
        model = build_model("toy-base", clip_dim=emb.shape[1], device=dev)
    else:
        model = build_model(f"toy-{stage}", device=dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = None if stage == "sdf" else GaussianDiffusion(model.cfg["schedule"])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt, start = f"checkpoint_{stage}.pt", 0
    if args.resume and run.exists(ckpt):
        state = run.load_checkpoint(ckpt, map_location=dev)
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"]), common.set_rng_state(state["rng"])
        start = state["step"]
    B, n = args.batch, model.cfg["n_ctx"]
    bar = common.progress(range(start, args.steps), desc=f"toy-{stage}")
    t0 = time.time()
    for step in bar:
        for group in opt.param_groups:                                  # linear warm-up
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            t = torch.randint(0, TIMESTEPS, (B,), generator=g).to(dev)
            if stage == "sdf":
                cloud, q, target = (a.to(dev) for a in toy_sdf_batch(
                    torch.randint(0, len(toyworld.SHAPES), (B,), generator=g), n, args.queries, g))
                loss = F.mse_loss(model(q, model.encode(cloud)).float(), target)
            else:
                if stage == "base":
                    pick = torch.randint(0, len(emb), (B,), generator=g)
                    keep = (torch.rand(B, generator=g) >= COND_DROP).float()[:, None]   # CFG dropout
                    x0, cond = toy_clouds(captions[pick], n, g), {"clip": (emb[pick] * keep).to(dev)}
                else:                          # upsample: a random split of one cloud into 256 + 768
                    m = model.cfg["cond_ctx"]
                    pts = toy_clouds(torch.randint(0, len(toyworld.CAPTIONS), (B,), generator=g), m + n, g)
                    x0, cond = pts[:, :, m:], {"low_res": pts[:, :, :m].to(dev)}
                loss = diffusion.training_losses(model, x0.to(dev), t, **cond)["loss"].mean()
        common.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():                      # EMA, with a short warm-up of the decay
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        last = step + 1 == args.steps or (args.time_limit and time.time() - t0 > args.time_limit)
        if (step + 1) % args.save_every == 0 or last:
            run.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                 "step": step + 1, "generator": g.get_state(), "rng": common.rng_state()}, ckpt)
        if last:
            break
    print(f"toy-{stage}: {step + 1} steps, {time.time() - t0:.0f} s, final loss {loss.item():.4f}")
    # plain state dict; parameters in float16 to keep the repository small (load_model casts back)
    params = dict(ema.named_parameters())
    weights = {k: (v.half() if k in params else v).cpu() for k, v in ema.state_dict().items()}
    run.save_checkpoint(weights, f"toy-{stage}.pt")
    if args.export:
        os.makedirs(args.export, exist_ok=True)
        with common.atomic_path(os.path.join(args.export, f"toy-{stage}.pt")) as tmp:
            torch.save(weights, tmp)
    return ema

# ================================================================================================
# Evaluation on the toy world: is the cloud the right shape and colour, and how far from the truth
# ================================================================================================


def chamfer_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance between clouds a (B, N, 3) and b (B, M, 3) -> (B,):
    mean_i min_j |a_i - b_j| + mean_j min_i |a_i - b_j| (Euclidean, not squared)."""
    d = torch.cdist(a.float(), b.float())                                      # (B, N, M)
    return d.min(2).values.mean(1) + d.min(1).values.mean(1)


def classify_clouds(points: torch.Tensor):
    """The toy object a generated cloud shows. points (B, 6, N) in data units (Point-E frame,
    RGB 0..255). Shape: the toy shape whose analytic SDF is nearest zero on average over the points
    (argmin of mean |sdf|); colour: the toy albedo nearest the mean point colour.
    Returns shape_idx (B,), colour_idx (B,) (indices into toyworld.SHAPES / COLOURS)."""
    import toyworld
    xyz = points[:, :3].permute(0, 2, 1).float().cpu() / TOY_SCALE             # (B, N, 3) toy units
    mean_abs = torch.stack([toyworld.SDFS[s](xyz.reshape(-1, 3)).abs().view(xyz.shape[:2]).mean(1)
                            for s in toyworld.SHAPES], 1)                      # (B, shapes)
    rgb = points[:, 3:].float().mean(2).cpu() / 255.0                          # (B, 3)
    return mean_abs.argmin(1), torch.cdist(rgb, toyworld.ALBEDO).argmin(1)


def evaluate(args):
    """`python pointe.py eval`: `per_caption` clouds for each of the 30 toy captions through the
    whole toy pipeline (toy SD image -> toy CLIP -> base -> upsampler), each judged by
    classify_clouds and by its Chamfer distance (toy-world units) to 4096 ground-truth points of
    its caption's shape. Writes eval.json; prints a markdown table."""
    import toyworld
    dev = common.pick_device(args.device)
    common.seed_everything(args.seed)
    names = ("toy-base", "toy-upsample")
    base, up = (load_model(n, os.path.join(args.weights or TOY_DIR, f"{n}.pt"), dev) for n in names)
    clip = common.CLIPPrior(model="toy", device=dev)
    t0 = time.time()
    if args.source == "sd":
        images, caption_idx = sd_samples(common.DiffusionPrior(args.prior, device=dev), args.per_caption,
                                         args.seed)
    else:                                  # held-out renders: the base model without the image gap
        images, caption_idx = toyworld.random_renders(30 * args.per_caption, 64, args.seed, device=dev,
                                                      held_out=True)
        caption_idx = caption_idx.cpu()
    with torch.no_grad():
        emb = torch.cat([clip.encode_image(im.to(dev)).float() for im in images.split(256)])
        image_right = clip.similarity(emb, clip.encode_text(toyworld.CAPTIONS)).argmax(-1).cpu() == caption_idx
    t_image = time.time() - t0
    pts = torch.cat([generate_points(base, up, e, len(e), (args.guidance, 0.0), None, args.steps, dev).cpu()
                     for e in emb.split(args.batch)])                          # (S, 6, 1024)
    t_points = time.time() - t0 - t_image
    shape, colour = classify_clouds(pts)
    true_shape, true_colour = caption_idx // len(toyworld.COLOURS), caption_idx % len(toyworld.COLOURS)
    g = torch.Generator().manual_seed(args.seed)
    truth = torch.stack([toyworld.surface_points(toyworld.SHAPES[s], "red", 4096, g)[0]
                         for s in true_shape.tolist()])                        # (S, 4096, 3)
    chamfer = chamfer_distance(pts[:, :3].permute(0, 2, 1) / TOY_SCALE, truth)
    ok_shape, ok_colour = shape == true_shape, colour == true_colour
    rows = {}
    for s, name in enumerate(toyworld.SHAPES + ["all"]):
        m = true_shape == s if name != "all" else torch.ones_like(ok_shape)
        rows[name] = {k: v[m].float().mean().item() for k, v in
                      [("image_recognised", image_right), ("shape", ok_shape), ("colour", ok_colour),
                       ("shape_and_colour", ok_shape & ok_colour), ("chamfer", chamfer)]}
    res = {"source": args.source, "per_caption": args.per_caption, "clouds": len(pts), "device": str(dev),
           "steps": args.steps, "guidance": args.guidance, "seconds_images": t_image,
           "seconds_points": t_points, "by_shape": rows,
           "confusion_shape": [[int(((true_shape == i) & (shape == j)).sum()) for j in range(len(toyworld.SHAPES))]
                               for i in range(len(toyworld.SHAPES))]}
    run = common.RunDir(args.out, "pointe", args.name)
    run.write_json("eval.json", res)
    print(f"{len(pts)} clouds ({args.per_caption} per caption, images from {args.source}) on {dev}: "
          f"images {t_image:.0f} s, points {t_points:.0f} s -> {run.file('eval.json')}")
    print("| shape | image recognised by toy CLIP | right shape | right colour | both | Chamfer |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['image_recognised']:.0f}% | {100 * r['shape']:.0f}% | "
              f"{100 * r['colour']:.0f}% | {100 * r['shape_and_colour']:.0f}% | {r['chamfer']:.4f} |")
    return res

# ================================================================================================
# Command line: sample (text -> image -> points -> mesh) and train (the toy models)
# ================================================================================================


def train(args):
    dev = common.pick_device(args.device)
    common.seed_everything(args.seed)
    run = common.RunDir(args.out, "pointe", args.name)
    run.write_json("config.json", vars(args))
    stages = ["base", "upsample", "sdf"] if args.stage == "all" else [args.stage]
    clip_prior = common.CLIPPrior(model=args.clip, device=dev) if "base" in stages else None
    for stage in stages:
        train_stage(stage, args, run, dev, clip_prior)
    print(f"weights in {run.path}" + (f" and {args.export}" if args.export else ""))


def generate(args):
    dev = common.pick_device(args.device)
    common.seed_everything(args.seed)
    toy = args.base == "toy"
    names = ("toy-base", "toy-upsample", "toy-sdf") if toy else (args.base, "upsample", "sdf")
    weights = args.weights or (TOY_DIR if toy else "point_e_model_cache")
    paths = [os.path.join(weights, f"{n}.pt" if toy else CHECKPOINT_FILES[n]) for n in names]
    for p in paths:
        if not os.path.exists(p):
            raise common.UserError(f"{p} not found: " + ("train the toy models with `python pointe.py "
                                   "train --stage all --export data/pointe`" if toy else "download the "
                                   "official checkpoints (openai/point-e) into --weights"))
    base, up, sdf = (load_model(n, p, dev) for n, p in zip(names, paths))
    clip_name = args.clip or ("toy" if toy else "ViT-L-14")
    clip = common.CLIPPrior(model=clip_name, pretrained="openai" if clip_name == "ViT-L-14" else None,
                            device=dev)
    B, image, cond, t0 = args.batch, None, None, time.time()
    if names[0] == "base40M-textvec":                                      # text -> CLIP text vector
        cond = clip.encode_text([args.prompt] * B)
    elif base.cfg["cond"] is not None:                                    # text -> image -> CLIP
        image = common.DiffusionPrior(args.prior, device=dev).sample([args.prompt] * B,
                                                                     steps=args.prior_steps).float()
        with torch.no_grad():
            cond = clip.encode_image(image) if base.cfg["cond"] == "vec" else clip_image_grid(clip, image)
    # the upsampler sees the image grid only in the image pipeline (official notebooks)
    up_clip = cond if up.cfg["cond"] == "grid" and base.cfg["cond"] == "grid" else None
    guidance = (args.guidance, args.guidance if up_clip is not None else 0.0)
    bf16 = dev.type == "cuda" and args.precision == "auto"
    t_image = time.time() - t0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        pts = generate_points(base, up, cond, B, guidance, up_clip, args.steps, dev).cpu()   # (B, 6, N)
    t_points = time.time() - t0 - t_image
    run = common.RunDir(args.out, "pointe", args.name)
    run.write_json("config.json", vars(args))
    grid = args.grid or (64 if toy else MESH_GRID)
    for i in range(B):
        sfx = "" if B == 1 else f"_{i}"
        if image is not None:
            common.save_image(run.file(f"image{sfx}.png"), image[i].permute(1, 2, 0))
        xyz, rgb = pts[i, :3].T, pts[i, 3:].T / 255.0                            # (N, 3) each
        common.save_ply(run.file(f"points{sfx}.ply"), xyz, rgb)
        common.save_image(run.file(f"preview{sfx}.png"), preview_image(xyz, rgb))
        verts, faces = sdf_to_mesh(sdf_model_fn(sdf, xyz.to(dev)), grid, device=dev)
        colours = nearest_colours(verts, xyz, rgb)
        common.save_ply(run.file(f"mesh{sfx}.ply"), verts, colours, faces)
        common.save_obj(run.file(f"mesh{sfx}.obj"), verts, faces, colours)
        print(f"{run.path}: points{sfx}.ply ({xyz.shape[0]} points), mesh{sfx}.ply/.obj "
              f"({len(verts)} vertices, {len(faces)} faces)")
    run.write_json("metrics.json", {"seconds_image": t_image, "seconds_points": t_points,
                                    "seconds_meshes": time.time() - t0 - t_image - t_points,
                                    "points": pts.shape[-1], "device": str(dev)})


def parse_args(argv):
    if argv[:1] == ["train"]:
        p = argparse.ArgumentParser(prog="pointe.py train", description="train the toy Point-E models",
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--stage", choices=["base", "upsample", "sdf", "all"], default="all", help="which model(s)")
        p.add_argument("--steps", type=int, default=3000, help="optimizer steps per stage")
        p.add_argument("--batch", type=int, default=64, help="clouds per optimizer step")
        p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (200-step warm-up)")
        p.add_argument("--queries", type=int, default=2048, help="SDF samples per cloud (sdf stage)")
        p.add_argument("--pool", type=int, default=8192, help="renders embedded once (base stage)")
        p.add_argument("--render-size", type=int, default=64, help="pixels of those renders")
        p.add_argument("--sd-per-caption", type=int, default=256,
                       help="base stage: also this many toy-SD samples per caption (0: renders only)")
        p.add_argument("--prior", default="toy", help="text-to-image model of those samples")
        p.add_argument("--clip", default="toy", help="CLIP prior for the base stage's image vectors")
        p.add_argument("--time-limit", type=float, default=0.0, help="stop a stage after this many "
                       "seconds (0: run all --steps)")
        p.add_argument("--save-every", type=int, default=500, help="checkpoint every this many steps")
        p.add_argument("--export", default="", help="also write the plain state dicts here (data/pointe)")
        common.add_run_flags(p, "train")
        args = p.parse_args(argv[1:])
        args.command = "train"
    elif argv[:1] == ["eval"]:
        p = argparse.ArgumentParser(prog="pointe.py eval", description="shape, colour and Chamfer "
                                    "distance of toy clouds for all 30 toy captions",
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--per-caption", type=int, default=4, help="clouds per caption")
        p.add_argument("--source", choices=["sd", "render"], default="sd",
                       help="conditioning images: toy-SD samples (the pipeline) or held-out toy renders")
        p.add_argument("--weights", default="", help="folder with toy-base.pt and toy-upsample.pt")
        p.add_argument("--prior", default="toy", help="text-to-image model of the conditioning images")
        p.add_argument("--batch", type=int, default=128, help="clouds sampled at once")
        p.add_argument("--steps", type=int, default=SAMPLER["steps"], help="Karras steps per stage")
        p.add_argument("--guidance", type=float, default=SAMPLER["guidance"], help="base stage")
        p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
        common.add_run_flags(p, "eval")
        args = p.parse_args(argv[1:])
        args.command = "eval"
    else:
        p = argparse.ArgumentParser(prog="pointe.py", description=__doc__.split("\n")[0],
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--prompt", required=True, help="the text (toy models: a toy caption, e.g. \"a red cube\")")
        p.add_argument("--base", default="toy", choices=["toy", "base40M-textvec", "base40M-imagevec",
                                                         "base40M", "base300M", "base1B"],
                       help="base model: the toy one or an official configuration")
        p.add_argument("--weights", "--checkpoint", default="", help="checkpoint folder (toy: data/pointe; official: "
                                                     "point_e_model_cache)")
        p.add_argument("--prior", default="toy", help="text-to-image model (image pipelines)")
        p.add_argument("--prior-steps", type=int, default=50, help="DDIM steps of the text-to-image model")
        p.add_argument("--clip", default="", help="CLIP prior (default: toy for toy, else ViT-L-14 openai)")
        p.add_argument("--batch", type=int, default=1, help="samples drawn at once")
        p.add_argument("--steps", type=int, default=SAMPLER["steps"], help="Karras steps per stage")
        p.add_argument("--guidance", type=float, default=SAMPLER["guidance"], help="classifier-free guidance on x0")
        p.add_argument("--grid", type=int, default=0, help="marching-cubes grid (default 128; toy 64)")
        p.add_argument("--precision", choices=["auto", "fp32"], default="auto",
                       help="auto: bf16 autocast for the diffusion models on CUDA")
        p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default; "
                       "the toy models' small tensors run fastest on one, see the header)")
        common.add_run_flags(p, "sample")
        args = p.parse_args(argv)
        args.command = "sample"
        if not args.prompt.strip():
            raise common.UserError("--prompt is empty")
    if args.batch < 1 or (args.command != "train" and args.steps < 1) or getattr(args, "grid", 0) < 0:
        raise common.UserError("--batch and --steps must be >= 1, --grid >= 0")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return {"train": train, "eval": evaluate, "sample": generate}[args.command](args)


if __name__ == "__main__":
    with common.cli_errors():
        main()
