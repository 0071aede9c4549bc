"""The CLIP prior: the real open_clip loading path, preprocessing gradients, offline and vocabulary
guards, and the bundled toy CLIP on held-out toy renders."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import common
from common import CLIPPrior, check_toy_prompt

TINY = {  # a tiny open_clip architecture, for the loading path
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"},
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random tiny model built by open_clip and saved in open_clip's folder format."""
    import open_clip
    folder = str(tmp_path_factory.mktemp("tiny_clip"))
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(TINY, f)
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + folder)
    torch.save(model.state_dict(), os.path.join(folder, "open_clip_pytorch_model.bin"))
    return folder, model.eval()


def test_reload_gives_identical_embeddings(tiny_folder):
    import open_clip
    folder, model = tiny_folder
    prior = CLIPPrior(folder)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref_img = F.normalize(model.encode_image((images - mean) / std), dim=-1)
        tokens = open_clip.tokenize(["a red cube", "anything at all"], context_length=8)
        ref_txt = F.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(prior.encode_image(images), ref_img, atol=1e-6)
    assert torch.allclose(prior.encode_text(["a red cube", "anything at all"]), ref_txt, atol=1e-6)
    sim = prior.similarity(ref_img, ref_txt)
    assert sim.shape == (3, 2) and torch.allclose(sim, (ref_img[:, None] * ref_txt[None]).sum(-1))


def test_architecture_name_plus_checkpoint_file(tiny_folder, tmp_path):
    """The other loading path: a registered architecture + a local checkpoint (OpenAI mean/std)."""
    import open_clip
    folder, model = tiny_folder
    with open(tmp_path / "tiny-test-arch.json", "w") as f:
        json.dump(TINY["model_cfg"], f)
    open_clip.add_model_config(tmp_path / "tiny-test-arch.json")
    prior = CLIPPrior("tiny-test-arch", os.path.join(folder, "open_clip_pytorch_model.bin"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = F.normalize(model.encode_image((images - mean) / std), dim=-1)
    assert torch.allclose(prior.encode_image(images), ref, atol=1e-6)


def test_text_cache_and_r_precision(tiny_folder):
    folder, _ = tiny_folder
    prior = CLIPPrior(folder)
    a = prior.encode_text(["x", "y", "x"])
    assert torch.equal(a[0], a[2]) and set(prior._text_cache) == {"x", "y"}
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    best = prior.similarity(prior.encode_image(images), prior.encode_text(["p", "q", "r"])).argmax(-1)
    assert prior.r_precision(images, ["p", "q", "r"], best) == 1.0
    assert prior.r_precision(images, ["p", "q", "r"], (best + 1) % 3) == 0.0



def test_caption_metrics_against_explicit_loops(tiny_folder):
    folder, _ = tiny_folder
    prior = CLIPPrior(folder)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    caps = ["p", "q", "r", "s"]
    m = common.caption_metrics(prior, images, "q", caps)
    sim = prior.similarity(prior.encode_image(images), prior.encode_text(caps))     # (5, 4)
    hits = [int(max(range(4), key=lambda j: float(sim[n, j])) == 1) for n in range(5)]
    margins = [float(sim[n, 1]) - max(float(sim[n, j]) for j in (0, 2, 3)) for n in range(5)]
    assert abs(m["clip_score"] - float(sim[:, 1].mean())) < 1e-6
    assert m["r_precision"] == sum(hits) / 5 == prior.r_precision(images, caps, [1] * 5)
    assert abs(m["caption_margin"] - sum(margins) / 5) < 1e-6 and m["n_captions"] == 4
    assert common.caption_metrics(prior, images, "t", caps)["n_captions"] == 5       # the prompt is added
    assert set(common.caption_metrics(prior, images, "q")) == {"clip_score"}

def test_encode_image_resizes_with_gradient(tiny_folder):
    folder, _ = tiny_folder
    prior = CLIPPrior(folder)
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    emb = prior.encode_image(x)
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    (grad,) = torch.autograd.grad(emb[:, 0].sum(), x)
    assert grad.abs().sum() > 0
    # autograd against central finite differences along a random direction (double precision)
    prior = prior.double()
    xd, v = x.detach().double(), torch.randn_like(x, dtype=torch.float64)
    xd.requires_grad_(True)
    f = lambda z: prior.model.encode_image(prior.preprocess(z)).sum()             # noqa: E731
    (g,) = torch.autograd.grad(f(xd), xd)
    h = 1e-5
    fd = (f(xd.detach() + h * v) - f(xd.detach() - h * v)) / (2 * h)
    assert float((g * v).sum()) == pytest.approx(float(fd), rel=1e-4, abs=1e-7)
    # the preprocessing is the model's own: a 64x48 image is resized on its short side, then centre-cropped
    assert prior.preprocess(xd).shape == (2, 3, 32, 32)


def test_offline_error_names_model_download_and_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(os.path, "expanduser", lambda p: p.replace("~", str(tmp_path)))
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(common.UserError) as e:
        CLIPPrior("ViT-B-16", "openai", flag="--clip-model")
    msg = str(e.value)
    assert "ViT-B-16" in msg and "openai" in msg and "--clip-model" in msg and "HF_HOME" in msg
    assert "timm/vit_base_patch16_clip_224.openai" in msg and "\n" not in msg
    with pytest.raises(common.UserError, match="hf-hub:org/none"):
        CLIPPrior("hf-hub:org/none")
    with pytest.raises(common.UserError, match="no pretrained tag"):
        CLIPPrior("ViT-B-16", "no-such-tag")


def test_vocabulary_guard():
    vocab = ["a", "red", "cube"]
    check_toy_prompt("a red cube", vocab, "--prior")
    check_toy_prompt("A red, cube", vocab, "--prior")
    with pytest.raises(common.UserError) as e:
        check_toy_prompt("a red dragon, photo", vocab, "--prior")
    msg = str(e.value)
    assert "'dragon'" in msg and "'photo'" in msg and "a red cube" in msg and "--prior" in msg
    with pytest.raises(common.UserError, match="empty"):
        check_toy_prompt("  ", vocab, "--prior")


def test_toy_clip_ranks_the_right_caption_on_held_out_renders():
    import toyworld
    prior = CLIPPrior("toy")
    images, idx = toyworld.random_renders(30, 64, seed=123, held_out=True)
    assert prior.r_precision(images, toyworld.CAPTIONS, idx) >= 0.9
    with pytest.raises(common.UserError, match="--clip"):
        prior.encode_text(["a red dragon"])


def test_evaluation_toy_clip_ranks_bumped_objects_right():
    """data/toy_clip_eval (--eval-clip toy-eval) was trained with surface bumps: held-out renders
    whose every object is bumped are still ranked by shape and colour."""
    import toyworld
    images, idx = toyworld.random_renders(30, 64, seed=321, held_out=True, rough=1.0)
    assert CLIPPrior("toy-eval").r_precision(images, toyworld.CAPTIONS, idx) >= 0.85
