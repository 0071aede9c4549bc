"""The toy Stable Diffusion: real diffusers/transformers classes with tiny configs, trained on
toy-world renders, saved as an ordinary pipeline folder (data/toy_sd) that `DiffusionPrior("toy")`
loads through exactly the code path of a hub model.

  tokenizer     CLIPTokenizer whose BPE is the one open_clip ships (bpe_simple_vocab_16e6), cut
                down to the merges the toy captions use (same tokens, same BPE rules)
  text_encoder  CLIPTextModel, 2 layers, width 64
  vae           AutoencoderKL, 64x64x3 <-> 16x16x4 latents (4x down, SD has 8x)
  unet          UNet2DConditionModel on 16x16x4 latents, cross-attention to the text states
  scheduler     DDPMScheduler, SD's "scaled_linear" betas 0.00085..0.012 over 1000 steps

Captions: "<toy caption>, <view suffix>" with the view suffix DreamFusion uses (front/side/back/
overhead view, from the camera of each render), so view-dependent prompts in SDS ask for what the
model has seen. The unconditional (empty) caption replaces 10% of captions (classifier-free
guidance).

Run (GPU; seeded):  python _toy_sd_train.py --out data/toy_sd
On the H100: 24k renders 28 s, VAE 2500 steps 142 s, UNet 2311 steps (batch 512) 300 s, evaluation
43 s. The shipped data/toy_sd came from the same settings with the UNet stopped by a 300-second
clock (which made those 2311 steps). Evaluation: DDIM 50 steps, guidance 7.5, 10 samples per
caption; the toy CLIP ranks the sample's own caption first among the 30 for 80.0% of them (97.7%
for real renders of the same distribution); the misses are mostly orange read as yellow and cubes
read as cylinders.
"""
import argparse
import gzip
import json
import math
import os
import time

import torch
import torch.nn.functional as F

VIEW_SUFFIXES = ["front view", "side view", "back view", "overhead view"]
MAX_TOKENS = 16          # the toy tokenizer's model_max_length (SD: 77)


# ---- tokenizer: open_clip's BPE, reduced to the toy vocabulary ------------------------------------

def _open_clip_bpe():
    """open_clip's byte-level BPE: (merges as a list of pairs, the pre-tokeniser)."""
    from open_clip import tokenizer as oct
    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
    simple = oct.SimpleTokenizer()

    def pieces(text):
        text = oct.whitespace_clean(oct.basic_clean(text)).lower()
        return ["".join(simple.byte_encoder[b] for b in p.encode("utf-8"))
                for p in oct.re.findall(simple.pat, text)]
    return merges, pieces


def _bpe_with_trace(piece: str, ranks: dict):
    """Byte-pair-encode one pre-token; returns (tokens, the merges that fired)."""
    word = list(piece[:-1]) + [piece[-1] + "</w>"]
    fired = []
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        fired.append(best)
        out, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word, fired


def build_toy_tokenizer(texts):
    """A CLIPTokenizer with open_clip's BPE rules, keeping only the merges that the given texts
    use. Keeping a subset of merges in their original order leaves the tokenisation of these texts
    unchanged (at every step the merge that fires is the lowest-ranked applicable one in both).
    Vocabulary: the 256 byte symbols, the same with </w>, the kept merges, the two specials."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer
    merges, pieces = _open_clip_bpe()
    ranks = {m: i for i, m in enumerate(merges)}
    used = set()
    for text in texts:
        for piece in pieces(text):
            used.update(_bpe_with_trace(piece, ranks)[1])
    kept = [m for m in merges if m in used]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in kept]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=kept)
    tok.model_max_length = MAX_TOKENS
    return tok


# ---- the tiny pipeline -------------------------------------------------------------------------

def build_toy_pipeline(tokenizer, width: int = 64, unet_channels=(64, 128, 128), vae_channels=(32, 64, 64),
                       seed: int = 0):
    """Randomly initialised components (a dict of the five) with tiny configs. width: the text
    encoder's; unet_channels (multiples of 32) and vae_channels (of 16): per resolution level."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=vae_channels, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=unet_channels, cross_attention_dim=width, attention_head_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "scheduler": scheduler}


def save_pipeline(parts: dict, out: str, vocab_words=None):
    """Save as a diffusers pipeline folder (model_index.json + one subfolder per component), weights
    in fp16. vocab_words: the toy vocabulary, written to toy_vocab.json (the prompt guard)."""
    from diffusers import StableDiffusionPipeline
    half = {k: (v.half() if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}
    pipe = StableDiffusionPipeline(**half, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    for k, v in parts.items():
        if isinstance(v, torch.nn.Module):
            v.float()
    if vocab_words is not None:
        with open(os.path.join(out, "toy_vocab.json"), "w") as f:
            json.dump({"words": sorted(set(vocab_words))}, f, indent=1)


# ---- training data: toy renders on plain backgrounds, captions with the view suffix --------------

def toy_sd_renders(n: int, size: int, seed: int, device="cpu", white: float = 0.75):
    """n toy renders for the toy SD, all randomness from `seed` (CPU generator).
    Objects, colours, yaw, scale and ambient light come from toyworld.sample_scenes; the cameras
    are redrawn with elevation in [-10, 80] degrees so that every view suffix (overhead included)
    occurs, the light near the camera as in toyworld. Backgrounds are plain as DreamFusion's: white
    with probability `white`, else one random solid colour.
    Returns images (n, 3, size, size) in [0, 1] and captions (list of n strings)."""
    import common
    import toyworld
    g = torch.Generator().manual_seed(seed)
    sc = toyworld.sample_scenes(n, False, g)
    cams = common.sample_cameras(n, radius=(3.0, 4.0), elevation=(-10.0, 80.0), fov=(35.0, 45.0), generator=g)
    d_az = (torch.rand(n, generator=g) * 2 - 1) * 35.0
    light_el = (cams["elevation"] + 30.0 * torch.rand(n, generator=g)).clamp(max=85.0)
    sc["c2w"], sc["fov"] = cams["c2w"], cams["fov"]
    sc["light_dir"] = common.spherical_to_cartesian(1.0, light_el, cams["azimuth"] + d_az)
    kinds = ["white" if w < white else "solid" for w in torch.rand(n, generator=g).tolist()]
    bg = toyworld.backgrounds(kinds, size, g)
    images = []
    for i in range(0, n, 1024):
        s = {k: v[i:i + 1024].to(device) for k, v in sc.items()}
        rgb, alpha = toyworld.render_objects(s["shape_idx"], s["colour_idx"], s["c2w"], s["fov"], size,
                                             s["yaw"], s["scale"], s["light_dir"], s["ambient"])
        images.append(rgb + (1 - alpha) * bg[i:i + 1024].to(device))
    from _prior_diffusion import view_suffix
    cap_idx = sc["shape_idx"] * len(toyworld.COLOURS) + sc["colour_idx"]
    captions = [f"{toyworld.CAPTIONS[c]}, {view_suffix(e, a)}"
                for c, e, a in zip(cap_idx.tolist(), cams["elevation"].tolist(), cams["azimuth"].tolist())]
    return torch.cat(images).clamp(0, 1), captions


# ---- training ----------------------------------------------------------------------------------

def train_vae(vae, images, steps: int, batch: int = 128, lr: float = 1e-3, kl_weight: float = 1e-6,
              log=print):
    """Autoencoder: L1 + L2 reconstruction of images in [-1, 1] plus a small KL term (SD's KL-f8
    uses 1e-6; no adversarial or perceptual loss here). Returns the final reconstruction L1."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), device=images.device)] * 2 - 1
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        l1 = (rec - x).abs().mean()
        loss = l1 + ((rec - x) ** 2).mean() + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"vae step {step:5d}  l1 {l1.item():.4f}")
    vae.eval()
    return l1.item()


@torch.no_grad()
def encode_all(vae, images, batch: int = 512):
    """Latent mean and std of every image, (N, 4, h, w) each (unscaled)."""
    mean, std = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch] * 2 - 1).latent_dist
        mean.append(post.mean)
        std.append(post.std)
    return torch.cat(mean), torch.cat(std)


def train_unet(unet, text_encoder, tokenizer, scheduler, lat_mean, lat_std, captions, steps: int,
               batch: int = 512, lr: float = 4e-4, p_uncond: float = 0.1, ema_decay: float = 0.999,
               log=print):
    """Epsilon prediction (DDPM's simple loss) on scaled latents; the text encoder learns with the
    UNet (it starts from random weights). A caption is replaced by "" with probability p_uncond
    (classifier-free guidance). The UNet and text encoder end with their exponential moving
    averages."""
    import copy
    dev = lat_mean.device
    texts = sorted(set(captions)) + [""]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(dev)           # (K, L)
    cap = torch.tensor([texts.index(c) for c in captions], device=dev)             # (N,)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    abar = scheduler.alphas_cumprod.to(dev)
    T = scheduler.config.num_train_timesteps
    unet.train()
    text_encoder.train()
    t0 = time.time()
    for step in range(steps):
        i = torch.randint(0, len(cap), (batch,), device=dev)
        x = lat_mean[i] + lat_std[i] * torch.randn_like(lat_mean[i])                 # a VAE sample
        k = torch.where(torch.rand(batch, device=dev) < p_uncond, len(texts) - 1, cap[i])
        t = torch.randint(0, T, (batch,), device=dev)
        eps = torch.randn_like(x)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * eps
        for g in opt.param_groups:                                                   # 200-step warmup
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
            h = text_encoder(ids[k])[0]
            loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=h).sample.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for e, m in zip(ema, (unet, text_encoder)):
                torch._foreach_lerp_(list(e.parameters()), list(m.parameters()), 1 - d)
        if step % 1000 == 0:
            log(f"unet step {step:6d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    unet.load_state_dict(ema[0].state_dict())
    text_encoder.load_state_dict(ema[1].state_dict())
    unet.eval()
    text_encoder.eval()


@torch.no_grad()
def evaluate(folder: str, per_caption: int, seed: int, device, guidance: float = 7.5, clip="toy",
             samples_png: str = ""):
    """Sample `per_caption` images of every toy caption (DDIM, 50 steps, `guidance`) and return
    the fraction that the toy CLIP ranks their own caption first among the 30 (Dream Fields'
    R-precision) and that fraction per shape; None while data/toy_clip is not trained.
    Optionally write a grid (one row per caption) to samples_png."""
    import common
    import toyworld
    from _prior_clip import TOY_CLIP, CLIPPrior
    from _prior_diffusion import DiffusionPrior
    prior = DiffusionPrior(folder, device=device)
    g = torch.Generator(device).manual_seed(seed)
    imgs = torch.cat([prior.sample([c] * per_caption, steps=50, guidance=guidance, generator=g)
                      for c in toyworld.CAPTIONS])                                  # (30 n, 3, H, W)
    if samples_png:
        S = imgs.shape[-1]
        grid = imgs.reshape(len(toyworld.CAPTIONS), per_caption, 3, S, S).permute(0, 3, 1, 4, 2)
        common.save_image(samples_png, grid.reshape(len(toyworld.CAPTIONS) * S, per_caption * S, 3))
    if clip == "toy" and not os.path.isdir(TOY_CLIP["toy"]):
        return None
    clip = CLIPPrior(clip, device=device)
    sim = clip.similarity(clip.encode_image(imgs.float()), clip.encode_text(toyworld.CAPTIONS))   # (30 n, 30)
    true_idx = torch.arange(len(toyworld.CAPTIONS), device=sim.device).repeat_interleave(per_caption)
    right = (sim.argmax(-1) == true_idx).float()
    per_shape = right.reshape(len(toyworld.SHAPES), -1).mean(1)     # CAPTIONS are grouped by shape
    return right.mean().item(), dict(zip(toyworld.SHAPES, per_shape.tolist()))


def main():
    import toyworld
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/toy_sd")
    p.add_argument("--n", type=int, default=24000, help="training renders")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--unet-steps", type=int, default=2311)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-only", action="store_true", help="skip training: evaluate --out")
    p.add_argument("--eval-per-caption", type=int, default=10, help="samples per caption (0: no evaluation)")
    p.add_argument("--eval-guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--samples", default="", help="also write the evaluation samples as a PNG grid here")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    if not args.eval_only:
        t0 = time.time()
        images, captions = toy_sd_renders(args.n, args.size, args.seed, dev)
        print(f"{len(images)} renders in {time.time() - t0:.0f}s")
        texts = [f"{c}, {v}" for c in toyworld.CAPTIONS for v in VIEW_SUFFIXES] + [""]
        tokenizer = build_toy_tokenizer(texts)
        parts = build_toy_pipeline(tokenizer, seed=args.seed)
        vae, unet, te = (parts[k].to(dev) for k in ("vae", "unet", "text_encoder"))
        t0 = time.time()
        l1 = train_vae(vae, images, args.vae_steps)
        lat_mean, lat_std = encode_all(vae, images)
        scale = 1.0 / lat_mean.std().item()                  # unit-variance latents, as SD's 0.18215
        vae.register_to_config(scaling_factor=scale)
        print(f"vae: {time.time() - t0:.0f}s, final l1 {l1:.4f}, scaling_factor {scale:.4f}")
        t0 = time.time()
        train_unet(unet, te, tokenizer, parts["scheduler"], lat_mean * scale, lat_std * scale, captions,
                   args.unet_steps)
        print(f"unet: {args.unet_steps} steps in {time.time() - t0:.0f}s")
        # the prompt guard's vocabulary: the caption words (the view suffixes are the prior's own)
        save_pipeline(parts, args.out, [w for c in toyworld.CAPTIONS for w in c.split()])
        print(f"saved {args.out}")
    if args.eval_per_caption:
        t0 = time.time()
        res = evaluate(args.out, args.eval_per_caption, args.seed, dev, args.eval_guidance,
                     samples_png=args.samples)
        if res is None:
            print("no toy CLIP in data/toy_clip yet: recognition not measured")
            return
        r, per_shape = res
        print(f"toy CLIP recognises {100 * r:.1f}% of {args.eval_per_caption} samples per caption "
              f"(50 DDIM steps, guidance {args.eval_guidance}), {time.time() - t0:.0f}s; by shape: "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in per_shape.items()))


if __name__ == "__main__":
    main()
