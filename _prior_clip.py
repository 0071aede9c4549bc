"""Temporary shim while _prior_diffusion.py is finished: the CLIP prior now lives in common.py."""
from common import TOY_CLIP, CLIPPrior, check_toy_prompt, resolve_clip  # noqa: F401
