"""Tests for pointe.py (CPU, fast). References: the official Point-E structure written out below
(names/shapes from openai/point-e models/transformer.py, perceiver.py, sdf.py; parameter counts
measured on the official code, /work/shared/docs/pointe_official.md), closed-form formulas, exact
denoisers of Gaussian (mixture) data, scipy's KD-tree and the analytic sphere."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import pointe  # noqa: E402

# ---- the independent reference: official state-dict names and shapes ---------------------------


def _block(prefix, w):
    return {f"{prefix}.attn.c_qkv.weight": (3 * w, w), f"{prefix}.attn.c_qkv.bias": (3 * w,),
            f"{prefix}.attn.c_proj.weight": (w, w), f"{prefix}.attn.c_proj.bias": (w,),
            f"{prefix}.ln_1.weight": (w,), f"{prefix}.ln_1.bias": (w,),
            f"{prefix}.mlp.c_fc.weight": (4 * w, w), f"{prefix}.mlp.c_fc.bias": (4 * w,),
            f"{prefix}.mlp.c_proj.weight": (w, 4 * w), f"{prefix}.mlp.c_proj.bias": (w,),
            f"{prefix}.ln_2.weight": (w,), f"{prefix}.ln_2.bias": (w,)}


def official_point_keys(w, layers, clip=None, upsample=False):
    k = {"time_embed.c_fc.weight": (4 * w, w), "time_embed.c_fc.bias": (4 * w,),
         "time_embed.c_proj.weight": (w, 4 * w), "time_embed.c_proj.bias": (w,),
         "ln_pre.weight": (w,), "ln_pre.bias": (w,), "ln_post.weight": (w,), "ln_post.bias": (w,),
         "input_proj.weight": (w, 6), "input_proj.bias": (w,),
         "output_proj.weight": (12, w), "output_proj.bias": (12,)}
    for i in range(layers):
        k.update(_block(f"backbone.resblocks.{i}", w))
    if upsample:
        k.update({"cond_point_proj.weight": (w, 6), "cond_point_proj.bias": (w,),
                  "channel_scales": (6,), "channel_biases": (6,)})
    if clip == "vec":
        k.update({"clip_embed.weight": (w, 768), "clip_embed.bias": (w,)})
    if clip == "grid":
        k.update({"clip_embed.0.weight": (1024,), "clip_embed.0.bias": (1024,),
                  "clip_embed.1.weight": (w, 1024), "clip_embed.1.bias": (w,)})
    return k


def official_sdf_keys(w=256, enc=8, dec=4):
    k = {"encoder_input_proj.weight": (w, 3), "encoder_input_proj.bias": (w,),
         "decoder_input_proj.weight": (w, 3), "decoder_input_proj.bias": (w,),
         "ln_post.weight": (w,), "ln_post.bias": (w,), "output_proj.weight": (1, w), "output_proj.bias": (1,)}
    for i in range(enc):
        k.update(_block(f"encoder.resblocks.{i}", w))
    for i in range(dec):
        p = f"decoder.resblocks.{i}"
        k.update({f"{p}.attn.c_q.weight": (w, w), f"{p}.attn.c_q.bias": (w,),
                  f"{p}.attn.c_kv.weight": (2 * w, w), f"{p}.attn.c_kv.bias": (2 * w,),
                  f"{p}.attn.c_proj.weight": (w, w), f"{p}.attn.c_proj.bias": (w,),
                  f"{p}.mlp.c_fc.weight": (4 * w, w), f"{p}.mlp.c_fc.bias": (4 * w,),
                  f"{p}.mlp.c_proj.weight": (w, 4 * w), f"{p}.mlp.c_proj.bias": (w,)})
        for ln in ("ln_1", "ln_2", "ln_3"):
            k.update({f"{p}.{ln}.weight": (w,), f"{p}.{ln}.bias": (w,)})
    return k


OFFICIAL = {  # config: (reference keys, parameter count measured on the official code)
    "base40M-imagevec": (official_point_keys(512, 12, "vec"), 40_333_836),
    "base40M-textvec": (official_point_keys(512, 12, "vec"), 40_333_836),
    "base40M-uncond": (official_point_keys(512, 12), 39_940_108),
    "base40M": (official_point_keys(512, 12, "grid"), 40_466_956),
    "base300M": (official_point_keys(1024, 24, "grid"), 311_778_316),
    "base1B": (official_point_keys(2048, 24, "grid"), 1_244_311_564),
    "upsample": (official_point_keys(512, 12, "grid", upsample=True), 40_470_540),
    "sdf": (official_sdf_keys(), 9_481_985),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_configs_names_shapes_counts(name):
    ref, count = OFFICIAL[name]
    model = pointe.build_model(name, device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == ref
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name", ["upsample", "sdf"])
def test_official_layout_checkpoint_loads_strictly(name, tmp_path):
    """A state dict laid out as the official file (reference names/shapes) loads with strict=True
    and every tensor lands where its name says."""
    torch.manual_seed(0)
    state = {k: torch.randn(shape) for k, shape in OFFICIAL[name][0].items()}
    path = str(tmp_path / pointe.CHECKPOINT_FILES[name])
    torch.save(state, path)
    model = pointe.load_model(name, path)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) and got[k].dtype == torch.float32 for k, v in state.items())


def test_upsample_buffers_and_strict_roundtrip(tmp_path, monkeypatch):
    small = dict(kind="points", width=32, layers=1, heads=2, schedule="cosine")
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "toy-base", dict(small, n_ctx=64, cond="vec", clip_dim=None))
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "toy-upsample", dict(small, n_ctx=192, cond_ctx=256, cond=None))
    torch.manual_seed(0)
    up = pointe.build_model("toy-upsample")
    assert torch.allclose(up.channel_scales, torch.tensor([2, 2, 2, 2 / 255, 2 / 255, 2 / 255]))
    assert torch.equal(up.channel_biases, torch.tensor([0.0, 0, 0, -1, -1, -1]))
    for name, m in [("toy-base", pointe.build_model("toy-base", clip_dim=32)), ("toy-upsample", up)]:
        for p in m.parameters():                      # output_proj is zero at init: randomise all
            p.data.normal_(0, 0.05)
        path = str(tmp_path / f"{name}.pt")
        torch.save(m.state_dict(), path)
        m2 = pointe.load_model(name, path)
        x, t = torch.randn(2, 6, m.cfg["n_ctx"]), torch.tensor([3, 900])
        kw = {"clip": torch.randn(2, 32)} if name == "toy-base" else {"low_res": torch.rand(2, 6, 256) * 255}
        assert torch.allclose(m.eval()(x, t, **kw), m2(x, t, **kw), atol=1e-6)
    with pytest.raises(common.UserError):
        pointe.load_model("toy-sdf", path)


def test_forward_shapes():
    torch.manual_seed(0)
    base = pointe.build_model("toy-base", clip_dim=16)
    assert base(torch.randn(2, 6, 256), torch.tensor([0, 5]), clip=torch.randn(2, 16)).shape == (2, 12, 256)
    sdf = pointe.build_model("toy-sdf")
    lat = sdf.encode(torch.randn(2, 3, 100))
    assert lat.shape == (2, 100, 128) and sdf(torch.randn(2, 3, 7), lat).shape == (2, 7)


# ---- model pieces against the official formulas ---------------------------------------------------


def test_timestep_embedding_cos_first():
    t = torch.tensor([0, 7, 1023])
    e = pointe.timestep_embedding(t, 8)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    ref = np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], 1)
    assert np.allclose(e.numpy(), ref, atol=1e-5)


def _naive_heads(x, heads, parts):
    """Official layout: view (B, T, heads, parts * d) and split the last axis into `parts`."""
    B, T, W = x.shape
    return torch.split(x.view(B, T, heads, -1), W // heads // parts, dim=-1)


def _naive_attention(q, k, v):
    """Official QKV attention: q and k each scaled by d^-1/4, float32 softmax."""
    s = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    w = torch.softmax(torch.einsum("bthc,bshc->bhts", q * s, k * s).float(), -1)
    return torch.einsum("bhts,bshc->bthc", w, v).flatten(2)


def test_attention_head_layout_matches_official():
    torch.manual_seed(0)
    att = pointe.SelfAttention(32, 4, 0.2)
    x = torch.randn(2, 9, 32)
    q, k, v = _naive_heads(att.c_qkv(x), 4, 3)
    assert torch.allclose(att(x), att.c_proj(_naive_attention(q, k, v)), atol=1e-5)
    cross = pointe.CrossAttention(32, 4, 0.2)
    data = torch.randn(2, 11, 32)
    k, v = _naive_heads(cross.c_kv(data), 4, 2)
    q = cross.c_q(x).view(2, 9, 4, 8)
    assert torch.allclose(cross(x, data), cross.c_proj(_naive_attention(q, k, v)), atol=1e-5)


def _naive_point_forward(sd, heads, x, t, clip=None, grid=None, low_res=None):
    """The official forward written out from its description with the raw state dict: token
    order as the official classes ([clip, time] for *vec, [time, grid, low_res] for the image
    upsampler), official head layout, cos-first timestep embedding, exact GELU."""
    lin = lambda h, k: torch.nn.functional.linear(h, sd[k + ".weight"], sd[k + ".bias"])
    ln = lambda h, k: torch.nn.functional.layer_norm(h, h.shape[-1:], sd[k + ".weight"], sd[k + ".bias"])
    mlp = lambda h, k: lin(torch.nn.functional.gelu(lin(h, k + ".c_fc")), k + ".c_proj")
    w = sd["ln_pre.weight"].shape[0]
    half = w // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    temb = mlp(torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1), "time_embed")
    tokens = []
    if clip is not None:
        tokens.append(lin(clip * math.sqrt(clip.shape[1]), "clip_embed")[:, None])
    tokens.append(temb[:, None])
    if grid is not None:
        tokens.append(lin(ln(grid.permute(0, 2, 1), "clip_embed.0"), "clip_embed.1"))
    if low_res is not None:
        lr = low_res * sd["channel_scales"][:, None] + sd["channel_biases"][:, None]
        tokens.append(lin(lr.permute(0, 2, 1), "cond_point_proj"))
    n_cond = sum(a.shape[1] for a in tokens)
    h = ln(torch.cat(tokens + [lin(x.permute(0, 2, 1), "input_proj")], 1), "ln_pre")
    i = 0
    while f"backbone.resblocks.{i}.ln_1.weight" in sd:
        k = f"backbone.resblocks.{i}"
        q, kk, v = _naive_heads(lin(ln(h, k + ".ln_1"), k + ".attn.c_qkv"), heads, 3)
        h = h + lin(_naive_attention(q, kk, v), k + ".attn.c_proj")
        h = h + mlp(ln(h, k + ".ln_2"), k + ".mlp")
        i += 1
    return lin(ln(h, "ln_post")[:, n_cond:], "output_proj").permute(0, 2, 1)


def test_point_models_match_the_official_forward(monkeypatch):
    small = dict(kind="points", width=32, layers=2, heads=4, schedule="cosine")
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "t-vec", dict(small, n_ctx=10, cond="vec", clip_dim=12))
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "t-up", dict(small, n_ctx=10, cond_ctx=7, cond="grid", clip_dim=16))
    torch.manual_seed(0)
    x, t = torch.randn(2, 6, 10), torch.tensor([3, 1000])
    clip, grid, low_res = torch.randn(2, 12), torch.randn(2, 16, 5), torch.rand(2, 6, 7) * 255
    for name, kw, ref_kw in [("t-vec", {"clip": clip}, {"clip": clip}),
                             ("t-up", {"clip": grid, "low_res": low_res}, {"grid": grid, "low_res": low_res})]:
        model = pointe.build_model(name)
        for p in model.parameters():
            p.data.normal_(0, 0.3)
        with torch.no_grad():
            ref = _naive_point_forward(model.state_dict(), 4, x, t.float(), **ref_kw)
            assert torch.allclose(model(x, t, **kw), ref, atol=1e-4)


def test_sdf_model_matches_the_official_forward():
    torch.manual_seed(0)
    cfg = dict(kind="sdf", width=32, n_ctx=9, encoder_layers=2, encoder_heads=4, decoder_layers=2, decoder_heads=4)
    model = pointe.PointCloudSDFModel(cfg)
    sd = model.state_dict()
    lin = lambda h, k: torch.nn.functional.linear(h, sd[k + ".weight"], sd[k + ".bias"])
    ln = lambda h, k: torch.nn.functional.layer_norm(h, h.shape[-1:], sd[k + ".weight"], sd[k + ".bias"])
    mlp = lambda h, k: lin(torch.nn.functional.gelu(lin(h, k + ".c_fc")), k + ".c_proj")
    cloud, queries = torch.randn(2, 3, 9), torch.randn(2, 3, 5)
    h = lin(cloud.permute(0, 2, 1), "encoder_input_proj")
    for i in range(2):
        k = f"encoder.resblocks.{i}"
        q, kk, v = _naive_heads(lin(ln(h, k + ".ln_1"), k + ".attn.c_qkv"), 4, 3)
        h = h + lin(_naive_attention(q, kk, v), k + ".attn.c_proj")
        h = h + mlp(ln(h, k + ".ln_2"), k + ".mlp")
    y = lin(queries.permute(0, 2, 1), "decoder_input_proj")
    for i in range(2):
        k = f"decoder.resblocks.{i}"
        q = lin(ln(y, k + ".ln_1"), k + ".attn.c_q").view(2, 5, 4, 8)
        kk, v = _naive_heads(lin(ln(h, k + ".ln_2"), k + ".attn.c_kv"), 4, 2)
        y = y + lin(_naive_attention(q, kk, v), k + ".attn.c_proj")
        y = y + mlp(ln(y, k + ".ln_3"), k + ".mlp")
    ref = lin(ln(y, "ln_post"), "output_proj")[..., 0]
    with torch.no_grad():
        assert torch.allclose(model(queries, model.encode(cloud)), ref, atol=1e-5)


# ---- diffusion --------------------------------------------------------------------------------


def test_schedules_match_measured_endpoints():
    cos = pointe.GaussianDiffusion("cosine").alphas_cumprod
    lin = pointe.GaussianDiffusion("linear").alphas_cumprod
    assert len(cos) == len(lin) == 1024
    assert abs(cos[0].item() - 0.99996) < 1e-5 and 1e-9 < cos[-1].item() < 4e-9
    assert abs(lin[0].item() - 0.99990) < 1e-5 and abs(lin[-1].item() - 4.0e-5) < 0.1e-5


def test_learned_range_variance_formula():
    d = pointe.GaussianDiffusion("cosine")
    betas = d.betas.numpy()
    ab = np.cumprod(1 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post = betas * (1 - ab_prev) / (1 - ab)
    t = torch.tensor([0, 1, 500, 1023])
    lo = np.log(np.where(t.numpy() == 0, post[1], post[t.numpy()]))      # clipped at t = 0
    hi = np.log(betas[t.numpy()])
    for v in (-1.0, 0.0, 0.3, 1.0):
        got = d.learned_log_variance(torch.full((4, 1, 1), v), t)[:, 0, 0].double().numpy()
        frac = (v + 1) / 2
        assert np.allclose(got, frac * hi + (1 - frac) * lo, rtol=1e-5)


def test_training_loss_terms():
    """A model that returns the true noise and v = -1 has mse = 0 and vb = 0 (t >= 1); with
    another v the vb is the KL of two Gaussians of equal means; vb gives no gradient to eps."""
    d = pointe.GaussianDiffusion("cosine")
    x0 = torch.rand(3, 6, 5) * torch.tensor([1, 1, 1, 255, 255, 255.0])[:, None] - \
        torch.tensor([0.5, 0.5, 0.5, 0, 0, 0])[:, None]
    t = torch.tensor([1, 200, 1000])
    v_val, eps_param = {}, {}

    def model(x_t, t_):
        ab = d.at(d.alphas_cumprod, t_)
        eps = (x_t - ab.sqrt() * d.scale(x0)) / (1 - ab).sqrt()
        eps_param["p"] = eps.detach().clone().requires_grad_(True)
        return torch.cat([eps_param["p"], torch.full_like(eps, v_val["v"])], 1)

    v_val["v"] = -1.0
    out = d.training_losses(model, x0, t)
    assert out["mse"].abs().max() < 1e-8 and out["vb"].abs().max() < 1e-4
    v_val["v"] = 0.5
    out = d.training_losses(model, x0, t)
    lv1 = d.at(d.posterior_log_variance_clipped, t)
    lv2 = d.learned_log_variance(torch.full((3, 1, 1), 0.5), t)
    ref = (0.5 * (-1 + lv2 - lv1 + torch.exp(lv1 - lv2)) / math.log(2)).flatten()
    assert torch.allclose(out["vb"], ref, rtol=1e-3)
    out["vb"].sum().backward()
    assert eps_param["p"].grad is None or eps_param["p"].grad.abs().max() == 0


# ---- Karras sampler -----------------------------------------------------------------------------


def test_karras_sigmas_formula():
    s = pointe.karras_sigmas(64, 1e-3, 120.0, 7.0).double()
    assert len(s) == 65 and s[-1] == 0
    assert abs(s[0] - 120) < 1e-3 and abs(s[63] - 1e-3) < 1e-7
    r = s[:64] ** (1 / 7)                           # uniform in sigma^(1/rho)
    assert torch.allclose(r[1:] - r[:-1], torch.full((63,), (1e-3 ** (1 / 7) - 120 ** (1 / 7)) / 63,
                                                     dtype=torch.float64), atol=1e-5)


def test_heun_step_matches_hand_computation():
    D = lambda x, s: 0.5 * x / (1 + s ** 2) + 0.1     # any smooth denoiser
    x = torch.tensor([0.7, -1.3])
    s0, s1 = 2.0, 0.5
    out = pointe.heun_sample(D, x.clone(), torch.tensor([s0, s1]), s_churn=0.0)
    d0 = (x - D(x, s0)) / s0
    x1 = x + d0 * (s1 - s0)
    d1 = (x1 - D(x1, s1)) / s1
    assert torch.allclose(out, x + 0.5 * (d0 + d1) * (s1 - s0), atol=1e-6)
    # the last step to sigma 0 is Euler, which lands exactly on the denoised value
    assert torch.allclose(pointe.heun_sample(D, x.clone(), torch.tensor([s0, 0.0])), D(x, s0), atol=1e-6)
    # churn: sigma^ = sigma (1 + gamma), gamma = min(s_churn / n, sqrt 2 - 1), fresh noise each step
    torch.manual_seed(3)
    out = pointe.heun_sample(D, x.clone(), torch.tensor([s0, 0.0]), s_churn=0.2)
    torch.manual_seed(3)
    gamma = 0.2
    s_hat = s0 * (1 + gamma)
    xh = x + torch.randn_like(x) * math.sqrt(s_hat ** 2 - s0 ** 2)
    assert torch.allclose(out, D(xh, s_hat), atol=1e-6)


def test_guidance_is_applied_to_x0():
    d = pointe.GaussianDiffusion("cosine")

    def model(x, t, clip):                  # eps depends on the conditioning; x0 gets clamped
        return torch.cat([x * 0.3 + 2.0 * clip[:, :, None], torch.zeros_like(x)], 1)

    x = torch.randn(2, 6, 4)
    clip = torch.randn(2, 6)
    den_c = pointe.eps_denoiser(model, d, {"clip": clip})
    den_u = pointe.eps_denoiser(model, d, {"clip": torch.zeros_like(clip)})
    den_g = pointe.guided(pointe.eps_denoiser(model, d, {"clip": torch.cat([clip, 0 * clip])}), 3.0)
    for sigma in (0.05, 1.0, 30.0):
        ref = den_u(x, sigma) + 3.0 * (den_c(x, sigma) - den_u(x, sigma))
        assert torch.allclose(den_g(x, sigma), ref, atol=1e-6)


def _gmm_denoiser(w, mu, sd):
    """Exact E[x0 | x0 + sigma n] for a 1-D Gaussian mixture."""
    w, mu, var = (torch.tensor(a, dtype=torch.float64) for a in (w, mu, np.square(sd)))

    def D(x, sigma):
        tot = var + sigma ** 2
        logp = torch.log(w) - 0.5 * torch.log(tot) - 0.5 * (x[..., None] - mu) ** 2 / tot
        r = torch.softmax(logp, -1)
        return (r * (mu + var / tot * (x[..., None] - mu))).sum(-1)
    return D


@pytest.mark.parametrize("s_churn", [0.0, 3.0])
def test_sampler_reproduces_gaussian_mixture(s_churn):
    w, mu, sd = [0.3, 0.7], [-0.6, 0.4], [0.1, 0.2]
    mean = np.dot(w, mu)
    var = np.dot(w, np.square(sd) + np.square(mu)) - mean ** 2
    torch.manual_seed(0)
    n = 10000
    x = torch.randn(n, dtype=torch.float64) * 80.0
    out = pointe.heun_sample(_gmm_denoiser(w, mu, sd), x, pointe.karras_sigmas(64, 1e-3, 80.0).double(),
                             s_churn)
    se = math.sqrt(var / n)
    assert abs(out.mean().item() - mean) < 4 * se
    assert abs(out.var().item() / var - 1) < 0.04
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    p_neg = sum(wi * cdf(-m / s) for wi, m, s in zip(w, mu, sd))          # P(x < 0): mixture weights
    assert abs((out < 0).double().mean().item() - p_neg) < 4 * math.sqrt(p_neg * (1 - p_neg) / n)


def test_eps_denoiser_samples_a_gaussian_through_the_discrete_model():
    """An exact epsilon model of N(m, s^2) data (DDPM parameterisation) driven by the Karras
    sampler through sigma -> t: the samples have the data's mean and variance."""
    d = pointe.GaussianDiffusion("cosine")
    m, s = 0.3, 0.2

    def model(x_t, t):
        ab = d.at(d.alphas_cumprod, t)
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * m) / (ab * s ** 2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    torch.manual_seed(0)
    x = torch.randn(4000, 1, 1) * 120.0
    out = pointe.heun_sample(pointe.eps_denoiser(model, d, {}), x, pointe.karras_sigmas(64, 1e-3, 120.0), 3.0)
    assert abs(out.mean().item() - m) < 0.02 and abs(out.std().item() / s - 1) < 0.05


def test_sample_stage_and_pipeline_shapes(monkeypatch):
    small = dict(kind="points", width=32, layers=1, heads=2, schedule="cosine", cond=None)
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "tiny-base", dict(small, n_ctx=64, cond="vec", clip_dim=None))
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "tiny-up", dict(small, n_ctx=192, cond_ctx=64, schedule="linear"))
    torch.manual_seed(0)
    base, up = pointe.build_model("tiny-base", clip_dim=8), pointe.build_model("tiny-up")
    for m in (base, up):
        m.output_proj.weight.data.normal_(0, 0.01)
        m.eval()
    pts = pointe.generate_points(base, up, torch.randn(2, 8), batch=2, steps=3)
    assert pts.shape == (2, 6, 256)
    assert pts[:, 3:].min() >= 0 and pts[:, 3:].max() <= 255 and torch.equal(pts[:, 3:], pts[:, 3:].round())
    assert pts[:, :3].abs().max() <= 0.5 + 1e-4                 # clamped x0 in [-1, 1] / 2


# ---- mesh -------------------------------------------------------------------------------------


def test_sdf_to_mesh_sphere():
    r = 0.35
    verts, faces = (a.numpy() for a in pointe.sdf_to_mesh(lambda q: r - q.norm(dim=-1), grid=48, side=1.02))
    radii = np.linalg.norm(verts, axis=1)
    assert np.abs(radii - r).max() < 1.02 / 47 / 2
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    vol = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6       # > 0: outward winding
    assert abs(vol / (4 / 3 * math.pi * r ** 3) - 1) < 0.02


def test_nearest_colours_match_kdtree():
    from scipy.spatial import cKDTree
    rng = np.random.default_rng(0)
    pts, cols, verts = rng.normal(size=(500, 3)), rng.random((500, 3)), rng.normal(size=(300, 3))
    got = pointe.nearest_colours(verts, pts, torch.tensor(cols), chunk=64).numpy()
    assert np.allclose(got, cols[cKDTree(pts).query(verts)[1]])


# ---- CLIP grid features and training ----------------------------------------------------------


def test_clip_image_grid_follows_the_official_recipe():
    """Official embed_images_grid: conv1 patches, class token, positions, ln_pre, the transformer;
    drop the class token; no ln_post / projection. A tiny open_clip ViT stands in for ViT-L/14."""
    from types import SimpleNamespace
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    vt = VisionTransformer(image_size=28, patch_size=7, width=32, layers=2, heads=2, mlp_ratio=4.0,
                           output_dim=16).eval()
    clip = SimpleNamespace(model=SimpleNamespace(visual=vt), preprocess=lambda im: im * 2 - 1)
    images = torch.rand(2, 3, 28, 28)
    got = pointe.clip_image_grid(clip, images)
    with torch.no_grad():
        x = vt.conv1(images * 2 - 1).flatten(2).permute(0, 2, 1)                  # (B, 16, 32)
        x = torch.cat([vt.class_embedding.expand(2, 1, 32), x], 1) + vt.positional_embedding
        ref = vt.transformer(vt.ln_pre(x))[:, 1:].permute(0, 2, 1)                # (B, 32, 16)
    assert got.shape == (2, 32, 16) and torch.allclose(got, ref, atol=1e-5)


def test_train_writes_loadable_weights_and_resumes_exactly(monkeypatch, tmp_path):
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "toy-upsample", dict(
        kind="points", width=32, layers=1, heads=2, n_ctx=48, cond_ctx=16, schedule="linear", cond=None))
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "toy-sdf", dict(
        kind="sdf", width=32, n_ctx=32, encoder_layers=1, encoder_heads=2, decoder_layers=1, decoder_heads=2))
    flags = ["--batch", "2", "--queries", "16", "--device", "cpu", "--save-every", "1", "--name", "r"]
    for stage in ("upsample", "sdf"):
        a, b = str(tmp_path / f"a{stage}"), str(tmp_path / f"b{stage}")
        pointe.main(["train", "--stage", stage, "--steps", "2", "--out", a] + flags)
        pointe.main(["train", "--stage", stage, "--steps", "1", "--out", b] + flags)
        pointe.main(["train", "--stage", stage, "--steps", "2", "--out", b, "--resume"] + flags)
        wa, wb = (torch.load(os.path.join(d, "pointe", "r", f"toy-{stage}.pt")) for d in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        model = pointe.load_model(f"toy-{stage}", os.path.join(a, "pointe", "r", f"toy-{stage}.pt"))
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("output_proj"))


def test_generate_writes_points_and_mesh(monkeypatch, tmp_path):
    """The sampling CLI end to end with tiny random models and stand-in priors (the real ones are
    tested in their own files): image -> CLIP vector -> 64 + 192 points -> SDF -> mesh files."""
    small = dict(kind="points", width=32, layers=1, heads=2)
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "toy-base", dict(small, n_ctx=64, schedule="cosine", cond="vec",
                                                               clip_dim=None))
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "toy-upsample", dict(small, n_ctx=192, cond_ctx=64,
                                                                   schedule="linear", cond=None))
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "toy-sdf", dict(kind="sdf", width=32, n_ctx=256, encoder_layers=1,
                                                              encoder_heads=2, decoder_layers=1, decoder_heads=2))

    class Clip:
        def __init__(self, model, pretrained, device):
            assert model == "toy" and pretrained is None

        def encode_image(self, images):
            return torch.nn.functional.normalize(images.flatten(1)[:, :8], dim=-1)

    class Prior:
        def __init__(self, name, device):
            assert name == "toy"

        def sample(self, prompts, steps=50):
            return torch.rand(len(prompts), 3, 16, 16)

    monkeypatch.setattr(common, "CLIPPrior", Clip, raising=False)
    monkeypatch.setattr(common, "DiffusionPrior", Prior, raising=False)
    torch.manual_seed(0)
    weights = tmp_path / "w"
    weights.mkdir()
    for name in ("toy-base", "toy-upsample", "toy-sdf"):
        m = pointe.build_model(name, clip_dim=8)
        for p in m.parameters():
            p.data.normal_(0, 0.1)
        torch.save(m.state_dict(), weights / f"{name}.pt")
    pointe.main(["--prompt", "a red cube", "--weights", str(weights), "--out", str(tmp_path), "--device", "cpu",
                 "--steps", "2", "--grid", "12", "--name", "e2e"])
    run = tmp_path / "pointe" / "e2e"
    assert (run / "image.png").exists() and (run / "mesh.obj").exists()
    head = (run / "points.ply").read_text().splitlines()
    assert "element vertex 256" in head
    mesh = (run / "mesh.ply").read_text()
    assert "element face 0\n" not in mesh and "element face" in mesh
    with pytest.raises(common.UserError):
        pointe.main(["--prompt", "a red cube", "--weights", str(tmp_path / "missing"), "--out", str(tmp_path)])


# ---- evaluation on the toy world ----------------------------------------------------------------


def test_classify_clouds_names_every_analytic_toy_object():
    """Ground-truth clouds of all 30 captions (with a little noise) are judged right."""
    import toyworld
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(len(toyworld.CAPTIONS))
    pts = pointe.toy_clouds(idx, 512, g)                                           # (30, 6, 512)
    pts[:, :3] += 0.01 * torch.randn(pts[:, :3].shape, generator=g)
    pts[:, 3:] = (pts[:, 3:] + 20 * torch.randn(pts[:, 3:].shape, generator=g)).clamp(0, 255)
    shape, colour = pointe.classify_clouds(pts)
    assert torch.equal(shape, idx // len(toyworld.COLOURS)) and torch.equal(colour, idx % len(toyworld.COLOURS))


def test_chamfer_distance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 40, 3, generator=g), torch.randn(2, 25, 3, generator=g)
    got = pointe.chamfer_distance(a, b)
    for k in range(2):
        d = [[math.dist(p.tolist(), q.tolist()) for q in b[k]] for p in a[k]]
        ref = np.mean([min(r) for r in d]) + np.mean([min(c) for c in zip(*d)])
        assert abs(got[k].item() - ref) < 1e-5
    assert pointe.chamfer_distance(a, a).abs().max() < 1e-3


def test_toy_sdf_batch_targets_are_the_analytic_sdf():
    import toyworld
    g = torch.Generator().manual_seed(0)
    shape_idx = torch.tensor([4, 0, 4, 2])
    clouds, queries, sdf = pointe.toy_sdf_batch(shape_idx, 64, 200, g)
    for i, s in enumerate(shape_idx.tolist()):
        f = toyworld.SDFS[toyworld.SHAPES[s]]
        assert f(clouds[i].T / pointe.TOY_SCALE).abs().max() < 1e-4                 # on the surface
        assert torch.allclose(sdf[i], -f(queries[i].T / pointe.TOY_SCALE) * pointe.TOY_SCALE, atol=1e-6)
        near = f(queries[i].T / pointe.TOY_SCALE).abs() < 0.05
        assert 0.2 < near.float().mean() < 0.8                                       # near and far mixed


def test_eval_cli_runs_on_tiny_models(monkeypatch, tmp_path):
    import toyworld
    small = dict(kind="points", width=32, layers=1, heads=2)
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "toy-base", dict(small, n_ctx=32, schedule="cosine", cond="vec",
                                                               clip_dim=None))
    monkeypatch.setitem(pointe.MODEL_CONFIGS, "toy-upsample", dict(small, n_ctx=96, cond_ctx=32,
                                                                   schedule="linear", cond=None))

    class Clip:
        def __init__(self, model, device):
            pass

        def encode_image(self, images):
            return torch.nn.functional.normalize(images.flatten(1)[:, :8], dim=-1)

        def encode_text(self, texts):
            return torch.nn.functional.normalize(torch.randn(len(texts), 8), dim=-1)

        similarity = staticmethod(common.CLIPPrior.similarity)

    class Prior:
        def __init__(self, name, device):
            self.device = torch.device(device)

        def sample(self, prompts, generator=None):
            return torch.rand(len(prompts), 3, 16, 16, generator=generator)

    monkeypatch.setattr(common, "CLIPPrior", Clip)
    monkeypatch.setattr(common, "DiffusionPrior", Prior)
    for name in ("toy-base", "toy-upsample"):
        torch.save(pointe.build_model(name, clip_dim=8).state_dict(), tmp_path / f"{name}.pt")
    res = pointe.main(["eval", "--weights", str(tmp_path), "--per-caption", "1", "--steps", "2", "--batch", "16",
                       "--device", "cpu", "--out", str(tmp_path), "--name", "ev"])
    assert res["clouds"] == len(toyworld.CAPTIONS) and (tmp_path / "pointe" / "ev" / "eval.json").exists()
    assert sum(map(sum, res["confusion_shape"])) == len(toyworld.CAPTIONS)
    assert 0 <= res["by_shape"]["all"]["shape_and_colour"] <= 1 and res["by_shape"]["all"]["chamfer"] > 0


def test_preview_image_nearest_point_wins():
    """Two points on one viewing ray: the one nearer the camera colours the pixel; a lone point
    lands where the orthographic projection puts it (the centre of the frame for the origin)."""
    toward = torch.tensor([1.0, 0.0, 0.0])                           # azimuth 0, elevation 0
    xyz = torch.stack([0.3 * toward, -0.3 * toward])                  # near (red), far (blue)
    img = pointe.preview_image(xyz, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), size=65, azimuth=0.0,
                               elevation=0.0)
    assert torch.equal(img[32, 32], torch.tensor([1.0, 0, 0]))
    assert (img != 1).any(-1).sum() == 9                                 # one 3x3 splat, white elsewhere
