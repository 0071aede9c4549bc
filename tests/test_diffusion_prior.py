"""The diffusion prior: SDS gradient, guidance, timesteps, view suffixes, loading and its errors.
Tiny randomly initialised pipelines are saved to a temporary folder and loaded back through
DiffusionPrior's real loading path."""
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import DiffusionPrior, view_suffix  # noqa: E402
from toyworld import build_toy_pipeline, build_toy_tokenizer, save_pipeline  # noqa: E402

PROMPT = "a red cube"
TEXTS = [f"{PROMPT}, {v}" for v in ("front view", "side view", "back view", "overhead view")]


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    """A latent (VAE) pipeline with the toy configs, random weights; returns (folder, parts)."""
    torch.manual_seed(0)
    parts = build_toy_pipeline(build_toy_tokenizer(TEXTS + [""]), unet_channels=(32, 32, 32),
                               vae_channels=(16, 16, 16), seed=0)
    folder = str(tmp_path_factory.mktemp("latent"))
    save_pipeline(parts, folder, vocab_words=["a", "red", "cube"])   # as a bundled toy folder
    # (the weights go through fp16, so `parts` are rounded in place)
    return folder, parts


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory, latent_folder):
    """A pixel-space pipeline (no VAE; the UNet also predicts a variance, as IF's stage I)."""
    from diffusers import UNet2DConditionModel
    src, _ = latent_folder
    folder = str(tmp_path_factory.mktemp("pixel"))
    for sub in ("tokenizer", "text_encoder", "scheduler"):
        shutil.copytree(os.path.join(src, sub), os.path.join(folder, sub))
    torch.manual_seed(1)
    UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32), cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(os.path.join(folder, "unet"))
    with open(os.path.join(src, "model_index.json")) as f:
        index = json.load(f)
    index = {k: v for k, v in index.items() if k in ("_class_name", "tokenizer", "text_encoder",
                                                     "unet", "scheduler")}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return folder


def reference_embedding(prior, text):
    """Tokenizer + text encoder called directly, (1, L, D)."""
    ids = prior.tokenizer(text, padding="max_length", max_length=prior.tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    return prior.text_encoder(ids)[0]


def reference_grad(prior, x, prompt_text, guidance, seed, t_range=(0.02, 0.98)):
    """w(t) (eps_hat - eps) computed sample by sample, with separate UNet calls."""
    B = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(B, generator=g)
    T = prior.scheduler.config.num_train_timesteps
    t = ((t_range[0] + (t_range[1] - t_range[0]) * u) * T).long()
    eps = torch.randn(x.shape, generator=g)
    abar = prior.scheduler.alphas_cumprod[t].view(B, 1, 1, 1).float()
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
    C = x.shape[1]
    cond, uncond = reference_embedding(prior, prompt_text), reference_embedding(prior, "")
    grads = []
    for b in range(B):
        e_u = prior.unet(x_t[b:b + 1], t[b:b + 1], encoder_hidden_states=uncond).sample[:, :C]
        e_c = prior.unet(x_t[b:b + 1], t[b:b + 1], encoder_hidden_states=cond).sample[:, :C]
        grads.append((1 - abar[b]) * (e_u + guidance * (e_c - e_u) - eps[b:b + 1]))
    return torch.cat(grads), t


def test_view_suffix_by_angle():
    cases = [((0, 0), "front view"), ((30, 44), "front view"), ((30, -44), "front view"),
             ((30, 45), "side view"), ((30, -90), "side view"), ((30, 135), "side view"),
             ((30, 136), "back view"), ((30, 180), "back view"), ((30, -170), "back view"),
             ((61, 0), "overhead view"), ((89, 180), "overhead view"), ((60, 0), "front view"),
             ((0, 350), "front view"), ((0, 200), "back view"), ((0, 270), "side view")]
    for (el, az), want in cases:
        assert view_suffix(el, az) == want, (el, az)


def test_prompt_embeddings_use_view_suffix(latent_folder):
    prior = DiffusionPrior(latent_folder[0])
    with torch.no_grad():
        cond, uncond = prior.prompt_embeddings(PROMPT, torch.tensor([10.0, 70.0]), torch.tensor([170.0, 0.0]), 2)
        assert torch.equal(cond[0:1], reference_embedding(prior, f"{PROMPT}, back view"))
        assert torch.equal(cond[1:2], reference_embedding(prior, f"{PROMPT}, overhead view"))
        assert torch.equal(uncond[0:1], reference_embedding(prior, ""))
        plain, _ = prior.prompt_embeddings(PROMPT, batch=1)
        assert torch.equal(plain, reference_embedding(prior, PROMPT))


def test_sds_gradient_latent_model(latent_folder):
    """d loss / d image == J_encoder^T (w (eps_hat - eps)) / B, all computed independently."""
    prior = DiffusionPrior(latent_folder[0])
    B = 2
    images = torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    loss, info = prior.sds_loss(images, PROMPT, elevation=20.0, azimuth=10.0, guidance=7.5,
                                generator=torch.Generator().manual_seed(5))
    loss.backward()
    # independent encoder: resize to 64, [-1, 1], VAE mean, scaled
    x = prior.vae.encode(2 * F.interpolate(images, (64, 64), mode="bilinear") - 1).latent_dist.mean
    x = x * prior.vae.config.scaling_factor
    assert torch.allclose(x, info["x"], atol=1e-5)
    with torch.no_grad():
        grad, t = reference_grad(prior, x.detach(), f"{PROMPT}, front view", 7.5, seed=5)
    assert torch.equal(t, info["t"])
    want, = torch.autograd.grad(x, images, grad_outputs=grad / B)
    # the batched and the per-sample UNet calls differ by float rounding only
    assert torch.allclose(images.grad, want, rtol=1e-3, atol=1e-4 * want.abs().max())
    assert torch.allclose(loss, 0.5 * (grad ** 2).sum() / B, rtol=1e-4)


def test_sds_gradient_pixel_model(pixel_folder):
    prior = DiffusionPrior(pixel_folder)
    assert prior.vae is None and prior.resolution == 16
    B = 3
    images = torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    loss, info = prior.sds_loss(images, PROMPT, elevation=80.0, azimuth=0.0, guidance=100.0,
                                generator=torch.Generator().manual_seed(6))
    loss.backward()
    with torch.no_grad():
        grad, _ = reference_grad(prior, 2 * images - 1, f"{PROMPT}, overhead view", 100.0, seed=6)
    assert torch.allclose(images.grad, 2 * grad / B, rtol=1e-3, atol=1e-4 * grad.abs().max())   # x = 2 image - 1


def test_guidance_arithmetic_and_nonfinite(pixel_folder, monkeypatch):
    """With fixed noise predictions: grad = w (eps_u + s (eps_c - eps_u) - eps); NaN/inf -> 0."""
    prior = DiffusionPrior(pixel_folder)
    B = 2
    e_u = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    e_c = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    e_u[0, 0, 0, 0] = float("nan")
    monkeypatch.setattr(prior, "predict_eps", lambda x_t, t, c, u: (e_u, e_c))
    for s in (0.0, 1.0, 7.5, 100.0):
        images = torch.rand(B, 3, 16, 16, requires_grad=True)
        loss, info = prior.sds_loss(images, PROMPT, guidance=s, weighting="uniform",
                                    generator=torch.Generator().manual_seed(9))
        loss.backward()
        g = torch.Generator().manual_seed(9)
        torch.rand(B, generator=g)
        eps = torch.randn(B, 3, 16, 16, generator=g)
        want = torch.nan_to_num(e_u + s * (e_c - e_u) - eps, nan=0.0)
        assert torch.allclose(images.grad * B / 2, want, atol=1e-5), s
        assert images.grad[0, 0, 0, 0] == 0 and torch.isfinite(loss)


def test_v_prediction_is_turned_into_eps(pixel_folder):
    """eps = sqrt(abar) v + sqrt(1 - abar) x_t, with x_t made from a known x_0 and eps:
    a UNet that outputs the true v must give back the true eps."""
    prior = DiffusionPrior(pixel_folder)
    prior.scheduler.register_to_config(prediction_type="v_prediction")
    x0, eps = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t = torch.tensor([100, 800])
    a = prior.scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0

    class TrueV(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            # [uncond, cond] batch of 2B; 2C channels (mean and variance, as IF's stage I)
            return type("Out", (), {"sample": torch.cat([v, v], 1).repeat(2, 1, 1, 1)})()
    prior.unet = TrueV()
    cond = torch.zeros(2, 4, 64)
    eps_u, eps_c = prior.predict_eps(x_t, t, cond, cond)
    assert torch.allclose(eps_u, eps, atol=1e-5) and torch.allclose(eps_c, eps, atol=1e-5)


def test_timesteps_stay_in_range_and_weighting(pixel_folder, monkeypatch):
    prior = DiffusionPrior(pixel_folder)
    monkeypatch.setattr(prior, "predict_eps", lambda x_t, t, c, u: (torch.zeros_like(x_t),) * 2)
    images = torch.rand(256, 3, 16, 16)
    _, info = prior.sds_loss(images, PROMPT, t_range=(0.3, 0.5), weighting=lambda a: a.sqrt(),
                             generator=torch.Generator().manual_seed(0))
    t = info["t"]
    assert t.min() >= 300 and t.max() <= 500 and t.min() < 310 and t.max() > 490
    assert torch.allclose(info["w"], prior.scheduler.alphas_cumprod[t].sqrt())
    _, info = prior.sds_loss(images, PROMPT, generator=torch.Generator().manual_seed(1))
    assert info["t"].min() >= 20 and info["t"].max() <= 980
    assert torch.allclose(info["w"], 1 - prior.scheduler.alphas_cumprod[info["t"]])


def test_save_reload_identical(latent_folder, tmp_path):
    folder, parts = latent_folder
    a, b = DiffusionPrior(folder), DiffusionPrior(folder)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        h = parts["text_encoder"](torch.tensor([[1, 2, 3]]))[0]
        assert torch.equal(a.text_encoder(torch.tensor([[1, 2, 3]]))[0], h)
        c = a.embed(PROMPT).expand(2, -1, -1)
        assert torch.equal(a.unet(x, t, encoder_hidden_states=c).sample,
                           parts["unet"](x, t, encoder_hidden_states=c).sample)
        img = torch.rand(1, 3, 64, 64)
        assert torch.equal(a.vae.decode(a.vae.encode(img).latent_dist.mean).sample,
                           parts["vae"].decode(parts["vae"].encode(img).latent_dist.mean).sample)
    la, _ = a.sds_loss(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), PROMPT,
                       0.0, 90.0, generator=torch.Generator().manual_seed(2))
    lb, _ = b.sds_loss(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), PROMPT,
                       0.0, 90.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(la, lb)


def test_sample_is_seeded_images(latent_folder):
    prior = DiffusionPrior(latent_folder[0])
    s1 = prior.sample([PROMPT, PROMPT], steps=3, guidance=3.0, generator=torch.Generator().manual_seed(0))
    s2 = prior.sample([PROMPT, PROMPT], steps=3, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert s1.shape == (2, 3, 64, 64) and s1.min() >= 0 and s1.max() <= 1
    assert torch.equal(s1, s2) and not torch.equal(s1[0], s1[1])


def test_unknown_model_id_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(common.UserError) as e:
        DiffusionPrior("nobody-here/no-such-diffusion-model")
    msg = str(e.value)
    assert "nobody-here/no-such-diffusion-model" in msg and "--prior" in msg and "HF_HOME" in msg
    assert "\n" not in msg
    with pytest.raises(common.UserError, match="model_index.json"):
        DiffusionPrior(str(tmp_path))


def test_empty_tokenizer_is_one_clear_error(latent_folder, tmp_path):
    folder = str(tmp_path / "broken")
    shutil.copytree(latent_folder[0], folder)
    for f in os.listdir(os.path.join(folder, "tokenizer")):
        os.remove(os.path.join(folder, "tokenizer", f))
    with pytest.raises(common.UserError, match="tokenizer .* is empty"):
        DiffusionPrior(folder)


def test_toy_tokenizer_matches_open_clip_bpe(latent_folder):
    """The reduced BPE tokenises its texts exactly as open_clip's full tokenizer does."""
    from open_clip.tokenizer import SimpleTokenizer
    prior = DiffusionPrior(latent_folder[0])
    full = SimpleTokenizer()
    for text in TEXTS + ["a cube, red"]:
        ours = prior.tokenizer.convert_ids_to_tokens(prior.tokenizer(text).input_ids)
        assert ours == ["<|startoftext|>"] + [full.decoder[i] for i in full.encode(text)] + ["<|endoftext|>"]


def test_toy_vocabulary_guard(latent_folder):
    prior = DiffusionPrior(latent_folder[0])
    with pytest.raises(common.UserError, match="hamburger.*--prior"):
        prior.sds_loss(torch.rand(1, 3, 64, 64), "a red hamburger", 0.0, 0.0)
    with pytest.raises(common.UserError, match="--prior"):
        prior.sample("a blue cube", steps=1)


def test_bundled_toy_prior_loads_through_the_same_path():
    """"toy" resolves to data/toy_sd, a plain pipeline folder, loaded by the same code as any id."""
    folder = common.TOY_PRIORS["toy"]
    toy, direct = DiffusionPrior("toy"), DiffusionPrior(folder)
    assert toy.folder == folder and toy.vae is not None and toy.resolution == 64
    assert "cube" in toy.toy_vocab and "hamburger" not in toy.toy_vocab
    with torch.no_grad():
        assert torch.equal(toy.embed("a red cube, front view"), direct.embed("a red cube, front view"))
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss, info = toy.sds_loss(img, "a red cube", torch.tensor([10.0, 70.0]), torch.tensor([0.0, 90.0]),
                              generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
