# ================================================================================================
# 7b. Priors: the CLIP prior (image and text embeddings, similarity, R-precision)
# ================================================================================================
"""A contrastive image-text model (CLIP) behind one small interface.

`CLIPPrior(model, pretrained)` loads any open_clip model, always through open_clip's own
`create_model_and_transforms`, and never touches the network:
  "toy"                            the bundled data/toy_clip (trained by `python toyworld.py train-clip`)
  a folder                         open_clip's folder format: open_clip_config.json + weights
  "ViT-B-16", "openai"             a built-in architecture + pretrained tag, if its weights are cached
  "ViT-B-16", "/path/to/ckpt.pt"   a built-in architecture + a local checkpoint file
  "hf-hub:org/repo"                a hub folder, if it is in the local Hugging Face cache

  encode_image(images)             (B, 3, H, W) in [0, 1] -> (B, D) unit vectors, differentiable
  encode_text(prompts)             list of B strings -> (B, D) unit vectors, cached per prompt
  similarity(img_emb, txt_emb)     cosine similarities (B, T)
  r_precision(images, captions, true_idx)   top-1 retrieval accuracy among the captions
"""
import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

TOY_CLIP = {"toy": os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "toy_clip")}
TOY_CLIP_VOCAB_FILE = "toyworld.json"      # present only in a bundled toy folder: {"vocab": [...], ...}
OPEN_CLIP_CONFIG = "open_clip_config.json"


def check_toy_prompt(prompt: str, vocab_words: list, real_flag: str):
    """A toy prior knows only the words it was trained on: refuse any other prompt with one line
    that lists its vocabulary and names the flag that selects a real model."""
    words = re.findall(r"[a-z]+", prompt.lower())
    unknown = [w for w in dict.fromkeys(words) if w not in vocab_words]
    if unknown or not words:
        what = f"the words {', '.join(repr(w) for w in unknown)} are" if unknown else "an empty prompt is"
        raise UserError(f"prompt {prompt!r}: {what} outside the toy vocabulary "
                        f"({' '.join(vocab_words)}); for other prompts pass a real model with {real_flag}")


def _cached_hub_file(repo_id: str, filenames) -> str:
    """The first of `filenames` of a Hugging Face repo found in the local cache, or None."""
    from huggingface_hub import try_to_load_from_cache
    for name in filenames:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def resolve_clip(model: str, pretrained: str = None, flag: str = "--clip") -> dict:
    """Turn (model, pretrained) into arguments for open_clip.create_model_and_transforms that
    need no network: a folder becomes "local-dir:<folder>", a pretrained tag becomes the path of
    its cached weights file (plus the tag's normalisation and activation). Anything not on disk
    is a UserError naming what to download."""
    import open_clip
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    model = TOY_CLIP.get(model, model)
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        config = _cached_hub_file(repo, [OPEN_CLIP_CONFIG])
        if config is None:
            raise UserError(f"CLIP model {model} is not in the local Hugging Face cache ({hf_home}): "
                            f"download the hub repo {repo} once (e.g. `huggingface-cli download {repo}`), "
                            f"set HF_HOME to the cache that has it, or pass a local folder with {flag}")
        model = os.path.dirname(config)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, OPEN_CLIP_CONFIG)):
            raise UserError(f"{model} is not an open_clip folder (no {OPEN_CLIP_CONFIG}); the toy CLIP "
                            "is made by `python toyworld.py train-clip`")
        return {"model_name": "local-dir:" + model}
    if model.replace("/", "-") not in open_clip.list_models():
        raise UserError(f"unknown CLIP model {model!r} for {flag}: use 'toy', a folder, hf-hub:org/repo "
                        f"or an open_clip architecture (open_clip.list_models())")
    name = model.replace("/", "-")
    if pretrained is None:
        raise UserError(f"CLIP model {name} needs pretrained weights: a tag "
                        f"({', '.join(open_clip.list_pretrained_tags_by_model(name))}) or a checkpoint file")
    if os.path.isfile(pretrained):
        return {"model_name": name, "pretrained": pretrained}
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise UserError(f"CLIP model {name} has no pretrained tag {pretrained!r} and no such file; tags: "
                        f"{', '.join(open_clip.list_pretrained_tags_by_model(name))}")
    # open_clip's hub convention: 'org/repo/' (default file name) or 'org/repo/file'
    path, source = None, cfg.get("url", "")
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        stem = os.path.splitext(filename)[0]
        path = _cached_hub_file(repo, [stem + ".safetensors", filename, "open_clip_model.safetensors"])
        source = f"the hub repo {repo}"
    if path is None and cfg.get("url"):
        local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        path = local if os.path.isfile(local) else None
        source = source or cfg["url"]
    if path is None:
        raise UserError(f"CLIP weights {name}/{pretrained} are not cached locally (looked in {hf_home} and "
                        f"~/.cache/clip): download {source} once on a machine with internet "
                        f"(open_clip.create_model('{name}', pretrained='{pretrained}')) and set HF_HOME to "
                        f"that cache, or pass a checkpoint file as the pretrained value of {flag}")
    return {"model_name": name, "pretrained": path, "image_mean": cfg.get("mean"), "image_std": cfg.get("std"),
            "force_quick_gelu": bool(cfg.get("quick_gelu", False))}


class CLIPPrior(nn.Module):
    """A frozen open_clip model. Gradients flow from the embeddings to the input images only."""

    def __init__(self, model: str = "toy", pretrained: str = None, device="cpu", flag: str = "--clip"):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")           # never wait on the network
        import open_clip
        args = resolve_clip(model, pretrained, flag)
        self.model, _, _ = open_clip.create_model_and_transforms(**args, device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(args["model_name"])
        pp = self.model.visual.preprocess_cfg
        self.image_size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
        self.interpolation = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"
        self.register_buffer("mean", torch.tensor(pp["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pp["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.to(device)
        folder = args["model_name"][len("local-dir:"):] if args["model_name"].startswith("local-dir:") else None
        vocab_file = folder and os.path.join(folder, TOY_CLIP_VOCAB_FILE)
        self.vocab = None                                        # a real model takes any prompt
        if vocab_file and os.path.isfile(vocab_file):
            with open(vocab_file) as f:
                self.vocab = json.load(f)["vocab"]
        self.flag = flag
        self._text_cache = {}

    def check_prompt(self, prompt: str):
        """A toy model refuses words outside its vocabulary; a real model takes anything."""
        if self.vocab is not None:
            check_toy_prompt(prompt, self.vocab, self.flag)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's input: shortest side resized to its input size
        (torch interpolate, so gradients flow), centre crop, (x - mean) / std."""
        B, _, H, W = images.shape
        S = self.image_size
        if (H, W) != (S, S):
            scale = S / min(H, W)
            h, w = max(S, round(H * scale)), max(S, round(W * scale))
            images = F.interpolate(images, size=(h, w), mode=self.interpolation, align_corners=False,
                                   antialias=min(H, W) > S)
            top, left = (h - S) // 2, (w - S) // 2
            images = images[:, :, top:top + S, left:left + S]
        return (images - self.mean) / self.std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit vectors."""
        return F.normalize(self.model.encode_image(self.preprocess(images.float())).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, prompts: list) -> torch.Tensor:
        """list of B prompts -> (B, D) unit vectors (each prompt is encoded once, then cached)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        for p in new:
            self.check_prompt(p)
        if new:
            tokens = self.tokenizer(new).to(self.mean.device)
            emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            self._text_cache.update(zip(new, emb))
        return torch.stack([self._text_cache[p] for p in prompts])

    @staticmethod
    def similarity(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of unit vectors: (B, D), (T, D) -> (B, T)."""
        return img_emb @ txt_emb.T

    @torch.no_grad()
    def r_precision(self, images: torch.Tensor, captions: list, true_idx) -> float:
        """Dream Fields' R-precision: the fraction of images (B, 3, H, W) whose most similar
        caption among `captions` is their own, captions[true_idx[b]]."""
        sim = self.similarity(self.encode_image(images), self.encode_text(captions))        # (B, T)
        true_idx = torch.as_tensor(true_idx, device=sim.device)
        return float((sim.argmax(-1) == true_idx).float().mean())
