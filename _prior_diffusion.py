# ================================================================================================
# 7a. Priors: the diffusion prior (score distillation sampling, text-to-image sampling)
# ================================================================================================
"""A text-conditioned diffusion model behind one small interface.

`DiffusionPrior(name)` loads a diffusers Stable-Diffusion-style pipeline folder (model_index.json
plus the subfolders tokenizer/, text_encoder/, unet/, scheduler/ and, for a latent model, vae/)
from a hub id that is already in the local cache, from a local folder, or "toy" (the bundled
data/toy_sd, trained by toyworld). Every one is loaded by the same code. A folder without vae/
is a pixel-space model (a UNet on the image itself, the shape of DeepFloyd IF's stage I).

  sds_loss(images, prompt, elevation, azimuth)  DreamFusion's score distillation (Eq. 3)
  sample(prompt)                                 text -> images (Point-E's first stage)
"""
import importlib
import json
import math
import os

import torch
import torch.nn.functional as F

from common import UserError
from _prior_clip import check_toy_prompt

TOY_PRIORS = {"toy": os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "toy_sd")}
TOY_VOCAB_FILE = "toy_vocab.json"        # present only in a bundled toy folder: its prompt vocabulary


def view_suffix(elevation_deg: float, azimuth_deg: float) -> str:
    """DreamFusion's view-dependent prompt suffix. Azimuth in degrees, 0 = front (wrapped to
    [-180, 180)); elevation in degrees above the horizon."""
    az = (float(azimuth_deg) + 180.0) % 360.0 - 180.0
    if float(elevation_deg) > 60.0:
        return "overhead view"
    if abs(az) < 45.0:
        return "front view"
    if abs(az) > 135.0:
        return "back view"
    return "side view"


def resolve_pretrained(name: str) -> str:
    """A model name -> a local pipeline folder, never touching the network.
    "toy" -> data/toy_sd; an existing folder -> itself; a hub id -> its folder in the local cache
    (HF_HOME), or a UserError that says what to download."""
    if name in TOY_PRIORS:
        path = TOY_PRIORS[name]
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UserError(f"the toy prior is missing at {path}; train it with "
                            "`python toyworld.py` (or pass a real model with --prior)")
        return path
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model_index.json")):
            raise UserError(f"--prior {name}: the folder has no model_index.json (a diffusers "
                            "pipeline saved with save_pretrained is expected)")
        return name
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        raise UserError(f"diffusion model {name!r} is not in the local Hugging Face cache and this "
                        f"run is offline: download it first (`huggingface-cli download {name}`, "
                        "cached under $HF_HOME), or pass a local folder or `toy` with --prior")


def _load_component(folder: str, sub: str, library: str, cls_name: str, dtype):
    """One pipeline component, e.g. ("transformers", "CLIPTextModel") from folder/text_encoder."""
    cls = getattr(importlib.import_module(library), cls_name)
    kw = {} if sub in ("tokenizer", "scheduler") else {"torch_dtype": dtype}
    try:
        return cls.from_pretrained(folder, subfolder=sub, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {sub}/ of {folder}: {str(e).splitlines()[0]} "
                        "(re-download the model or pass another with --prior)")


class DiffusionPrior:
    """A text-to-image diffusion model: tokenizer, text encoder, UNet, noise scheduler and, for a
    latent model, the VAE. fp16 on CUDA, fp32 elsewhere; all weights frozen."""

    def __init__(self, name: str = "toy", device="cpu", dtype=None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")           # never wait on the network
        folder = resolve_pretrained(name)
        self.name, self.folder, self.device = name, folder, torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
        parts = {}
        for sub in ("tokenizer", "text_encoder", "unet", "scheduler", "vae"):
            spec = index.get(sub)
            if spec is None or spec[0] is None:
                if sub != "vae":
                    raise UserError(f"{folder} has no {sub}/ component; not a text-to-image pipeline")
                continue
            parts[sub] = _load_component(folder, sub, spec[0], spec[1], self.dtype)
            # offline, a tokenizer whose files are missing can come back empty instead of failing
            if sub == "tokenizer" and len(parts[sub]) <= len(parts[sub].all_special_tokens):
                raise UserError(f"the tokenizer of {name!r} is empty (its files are missing from "
                                f"{folder}); re-download the model (cache under $HF_HOME) or use --prior")
        self.tokenizer, self.scheduler = parts["tokenizer"], parts["scheduler"]
        self.text_encoder = parts["text_encoder"].to(self.device).eval().requires_grad_(False)
        self.unet = parts["unet"].to(self.device).eval().requires_grad_(False)
        self.vae = parts.get("vae")
        if self.vae is not None:
            self.vae = self.vae.to(self.device).eval().requires_grad_(False)
            self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent
        else:
            self.vae_scale = 1
        size = self.unet.config.sample_size
        self.resolution = (size if isinstance(size, int) else size[0]) * self.vae_scale  # model's pixels
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)  # (T,)
        vocab_file = os.path.join(folder, TOY_VOCAB_FILE)
        self.toy_vocab = None
        if os.path.isfile(vocab_file):
            with open(vocab_file) as f:
                self.toy_vocab = json.load(f)["words"]
        self._embeddings = {}

    # ---- text ----------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, text: str) -> torch.Tensor:
        """Text-encoder hidden states of one prompt, (1, L, D), cached."""
        if text not in self._embeddings:
            tok = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
            kw = {}
            if "T5" in type(self.text_encoder).__name__:   # T5 (DeepFloyd IF) needs the padding mask
                kw["attention_mask"] = tok.attention_mask.to(self.device)
            out = self.text_encoder(tok.input_ids.to(self.device), **kw)[0]
            self._embeddings[text] = out.to(self.dtype)
        return self._embeddings[text]

    def check_prompt(self, prompt: str):
        """A bundled toy prior knows only its own words: anything else is a UserError."""
        if self.toy_vocab is not None:
            check_toy_prompt(prompt, self.toy_vocab, "--prior")

    def prompt_embeddings(self, prompt: str, elevation=None, azimuth=None, batch: int = 1):
        """Conditional and unconditional embeddings, each (B, L, D). With camera angles (floats or
        (B,) tensors, degrees) the prompt becomes "<prompt>, <view suffix>" per sample."""
        self.check_prompt(prompt)
        if elevation is None:
            texts = [prompt] * batch
        else:
            el = torch.as_tensor(elevation, dtype=torch.float32).reshape(-1).expand(batch)
            az = torch.as_tensor(azimuth, dtype=torch.float32).reshape(-1).expand(batch)
            texts = [f"{prompt}, {view_suffix(e, a)}" for e, a in zip(el.tolist(), az.tolist())]
        cond = torch.cat([self.embed(t) for t in texts])                      # (B, L, D)
        uncond = self.embed("").expand_as(cond)                               # (B, L, D)
        return cond, uncond

    # ---- images <-> the space the UNet works in ----------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the UNet's input space, with gradient.
        Latent model: bilinear resize to the model's resolution, VAE mean, times the scaling factor
        -> (B, 4, h, w). Pixel model: resize and map to [-1, 1] -> (B, 3, h, w)."""
        x = F.interpolate(images, (self.resolution, self.resolution), mode="bilinear",
                          align_corners=False) if images.shape[-1] != self.resolution else images
        x = (2 * x - 1).to(self.dtype)
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's space -> images (B, 3, H, W) in [0, 1]."""
        if self.vae is not None:
            x = self.vae.decode(x.to(self.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor):
        """Noise predictions (eps_u, eps_c), each like x_t, from ONE UNet call on a batch of 2B.
        x_t (B, C, h, w); t (B,) integer timesteps; cond/uncond (B, L, D)."""
        B, C = x_t.shape[:2]
        out = self.unet(torch.cat([x_t, x_t]).to(self.dtype), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
        out = out[:, :C]                     # a UNet with learned variance (IF) also outputs 2C
        # v-prediction (SD 2.x 768): v = sqrt(abar) eps - sqrt(1-abar) x_0, so
        # eps = sqrt(abar) v + sqrt(1-abar) x_t
        if self.scheduler.config.prediction_type == "v_prediction":
            a = self.alphas_cumprod[torch.cat([t, t])].view(-1, 1, 1, 1)
            out = a.sqrt() * out + (1 - a).sqrt() * torch.cat([x_t, x_t]).float()
        return out[:B], out[B:]

    # ---- score distillation sampling (DreamFusion, Sec. 3) ---------------------------------------

    def sds_loss(self, images: torch.Tensor, prompt: str, elevation=None, azimuth=None,
                 guidance: float = 100.0, t_range=(0.02, 0.98), weighting="1-alpha_bar",
                 generator=None):
        """Score distillation loss of renders `images` (B, 3, H, W) in [0, 1] under `prompt`.
        elevation/azimuth: floats or (B,) tensors in degrees (None: no view suffix).
        weighting: "1-alpha_bar", "uniform", or a callable alpha_bar (B,) -> w (B,).
        Returns (loss, info); d loss / d x_b = w(t_b) (eps_hat_b - eps_b) / B exactly, where x is
        the encoded images (info["x"]); info also holds t (B,), w (B,) and the per-sample grad norm.
        generator: a torch.Generator for t and eps (its device is where they are drawn)."""
        B = images.shape[0]
        cond, uncond = self.prompt_embeddings(prompt, elevation, azimuth, B)
        x = self.encode(images).float()                                       # (B, C, h, w)
        gen_dev = generator.device if generator is not None else x.device
        # t ~ U(t_range) * T, an integer timestep per sample
        u = torch.rand(B, generator=generator, device=gen_dev).to(x.device)
        lo, hi = t_range
        t = ((lo + (hi - lo) * u) * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        eps = torch.randn(x.shape, generator=generator, device=gen_dev).to(x.device)
        abar = self.alphas_cumprod[t].view(B, 1, 1, 1)
        # forward process q(x_t | x): x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps
        x_t = abar.sqrt() * x.detach() + (1 - abar).sqrt() * eps
        with torch.no_grad():
            eps_u, eps_c = self.predict_eps(x_t, t, cond, uncond)
        # classifier-free guidance: eps_hat = eps_u + s (eps_c - eps_u)
        eps_hat = eps_u + guidance * (eps_c - eps_u)
        if weighting == "1-alpha_bar":
            w = 1 - abar
        elif weighting == "uniform":
            w = torch.ones_like(abar)
        else:
            w = torch.as_tensor(weighting(abar.view(B)), dtype=torch.float32, device=x.device).view(B, 1, 1, 1)
        # DreamFusion Eq. 3: grad_theta L_SDS = E[ w(t) (eps_hat(x_t; y, t) - eps) dx/dtheta ],
        # the UNet's Jacobian left out
        grad = torch.nan_to_num(w * (eps_hat - eps), nan=0.0, posinf=0.0, neginf=0.0)
        # inject it without a custom autograd function: target = (x - grad) carries no gradient, so
        # loss = 0.5 sum_b ||x_b - target_b||^2 / B has d loss / d x_b = grad_b / B, i.e. the
        # gradient reaching the field is the batch mean of the per-sample SDS gradients
        # (for B = 1: d loss / d x = grad exactly)
        target = (x - grad).detach()
        loss = 0.5 * ((x - target) ** 2).sum() / B
        info = {"t": t, "w": w.view(B), "grad_norm": grad.flatten(1).norm(dim=1), "x": x.detach()}
        return loss, info

    # ---- text-to-image sampling ------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompt, steps: int = 50, guidance: float = 7.5, size=None, generator=None):
        """Text -> images (B, 3, H, W) in [0, 1] with DDIM (eta 0) and classifier-free guidance.
        prompt: a string or a list of B strings; size: pixels (default: the model's resolution)."""
        from diffusers import DDIMScheduler
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for p in prompts:
            self.check_prompt(p)
        B = len(prompts)
        cond = torch.cat([self.embed(p) for p in prompts])                    # (B, L, D)
        uncond = self.embed("").expand_as(cond)
        size = size or self.resolution
        C = self.unet.config.in_channels
        # predict_eps always returns eps, whatever the model predicts
        sched = DDIMScheduler.from_config(self.scheduler.config, prediction_type="epsilon")
        sched.set_timesteps(steps, device=self.device)
        gen_dev = generator.device if generator is not None else self.device
        x = torch.randn((B, C, size // self.vae_scale, size // self.vae_scale), generator=generator,
                        device=gen_dev).to(self.device) * sched.init_noise_sigma
        for t in sched.timesteps:
            tb = t.expand(B).to(self.device)
            eps_u, eps_c = self.predict_eps(sched.scale_model_input(x, t), tb, cond, uncond)
            eps_hat = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps_hat, t, x).prev_sample
        return self.decode(x)
