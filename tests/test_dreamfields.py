"""Dream Fields (dreamfields.py): backgrounds, transmittance loss, origin EMA, poses, a short toy run, bad prompts."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import dreamfields as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--device", "cpu", "--width", "32", "--n-samples", "24", "--n-eval", "4", "--video-frames", "2",
         "--video-size", "32", "--mesh-res", "24", "--preview-every", "1000"]


def cfg_with(**kw):
    return D.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


# ---- random backgrounds ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["noise", "checker", "fourier"])
def test_backgrounds_have_the_right_shape_and_range(kind):
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        bg = D.random_background(kind, 48, cfg_with(max_blur=10.0), g)
        assert bg.shape == (3, 48, 48) and torch.isfinite(bg).all()
        assert bg.min() >= -1e-6 and bg.max() <= 1 + 1e-6


def test_background_statistics():
    g = torch.Generator().manual_seed(1)
    sharp = cfg_with(max_blur=0.0)
    noise = D.random_background("noise", 256, sharp, g)
    assert abs(noise.mean() - 0.5) < 0.01 and abs(noise.std() - 1 / math.sqrt(12)) < 0.01   # U(0, 1)
    checker = D.random_background("checker", 64, sharp, g)
    cells = checker.reshape(3, 8, 8, 8, 8)                        # (C, row cell, y, col cell, x)
    assert torch.equal(cells, cells[:, :, :1, :, :1].expand_as(cells))      # 8 x 8 constant squares
    a, b = checker[:, 0, 0], checker[:, 0, 8]
    parity = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2           # alternating colours
    expect = torch.where(parity.bool(), b[:, None, None], a[:, None, None])
    assert torch.equal(cells[:, :, 0, :, 0], expect)
    fourier = D.random_background("fourier", 64, sharp, g)
    assert fourier.amin((1, 2)).max() < 1e-5 and fourier.amax((1, 2)).min() > 1 - 1e-4   # normalised per channel
    blurred = D.random_background("noise", 256, cfg_with(max_blur=1000.0), torch.Generator().manual_seed(1))
    assert blurred.std() < 0.5 * noise.std()                     # the blur removes pixel noise


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter
    img = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(2))
    ours = D.gaussian_blur(img, 2.0)
    ref = gaussian_filter(img.numpy(), sigma=(0, 2.0, 2.0), mode="mirror", truncate=3.0)   # radius 6 both
    assert np.allclose(ours.numpy(), ref, atol=1e-5)


def test_augment_makes_crops_of_the_composite():
    cfg = D.parse_args(["--n-crops", "5", "--crop-frac", "0.75", "--no-random-bg"])
    rgb, opacity = torch.zeros(3, 32, 32), torch.zeros(1, 32, 32)
    crops = D.augment(rgb, opacity, cfg)
    assert crops.shape == (5, 3, 24, 24) and torch.equal(crops, torch.ones_like(crops))     # white background


# ---- sparsity ----------------------------------------------------------------------------------

def test_target_transmittance_schedule():
    cfg = cfg_with(tau_start=0.4, tau_end=0.88, tau_steps=500)
    assert D.target_transmittance(0, cfg) == pytest.approx(0.40)
    assert D.target_transmittance(250, cfg) == pytest.approx(0.64)
    assert D.target_transmittance(500, cfg) == pytest.approx(0.88)
    assert D.target_transmittance(5000, cfg) == pytest.approx(0.88)


def test_transmittance_loss_value_and_gradient():
    opacity = torch.full((1, 4, 4), 0.7, requires_grad=True)               # transmittance 0.3 < tau
    loss = D.transmittance_loss(opacity, 0.5, 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5 * 0.3)
    assert torch.allclose(opacity.grad, torch.full_like(opacity, 0.5 / 16))  # d/d opacity of -lam mean(1 - o)
    opacity = torch.full((1, 4, 4), 0.05, requires_grad=True)              # transmittance 0.95 > tau: capped
    loss = D.transmittance_loss(opacity, 0.88, 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5 * 0.88) and not opacity.grad.any()


def test_learning_rate_warms_up_exponentially():
    cfg = cfg_with(lr_start=1e-5, lr_end=1e-4, warmup_steps=1500)
    assert D.learning_rate(0, cfg) == pytest.approx(1e-5)
    assert D.learning_rate(750, cfg) == pytest.approx(math.sqrt(1e-5 * 1e-4))
    assert D.learning_rate(1500, cfg) == pytest.approx(1e-4) and D.learning_rate(9000, cfg) == pytest.approx(1e-4)


# ---- localisation ------------------------------------------------------------------------------

def test_origin_ema_against_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    sigma, pts = torch.rand(10, 7, generator=g), torch.randn(10, 7, 3, generator=g)
    origin = torch.tensor([0.1, -0.2, 0.3])
    num, den = [0.0, 0.0, 0.0], 0.0
    for s, p in zip(sigma.flatten().tolist(), pts.reshape(-1, 3).tolist()):
        num, den = [n + s * x for n, x in zip(num, p)], den + s
    expect = [0.999 * o + 0.001 * n / den for o, n in zip(origin.tolist(), num)]
    assert torch.allclose(D.ema_origin(origin, sigma, pts, 0.999), torch.tensor(expect), atol=1e-6)
    assert torch.equal(D.ema_origin(origin, torch.zeros(10, 7), pts, 0.999), origin)        # empty: unchanged
    o, c = origin, torch.tensor([0.5, 0.5, 0.0])                          # one point: o_n = c + d^n (o_0 - c)
    for _ in range(100):
        o = D.ema_origin(o, torch.ones(1), c[None], 0.999)
    assert torch.allclose(o, c + 0.999 ** 100 * (origin - c), atol=1e-6)


# ---- pose sampling -----------------------------------------------------------------------------

def test_pose_sampler_angles_and_focal():
    cfg = cfg_with(size=88, elevation_jitter=0)
    assert D.focal_length(cfg) == pytest.approx(1.2 * 0.5 * 88 / math.tan(0.5 * 0.6911112))
    g = torch.Generator().manual_seed(4)
    origin = torch.tensor([0.1, 0.2, -0.1])
    azimuths = []
    for _ in range(200):
        c2w, az, el = D.sample_pose(cfg, origin, g)
        assert el == 30.0
        offset = c2w[:3, 3] - origin
        assert offset.norm() == pytest.approx(4.0, abs=1e-5)
        assert math.degrees(math.asin(offset[2] / offset.norm())) == pytest.approx(30.0, abs=1e-3)
        assert (math.degrees(math.atan2(offset[1], offset[0])) - az + 180) % 360 - 180 == pytest.approx(0, abs=1e-3)
        assert torch.allclose(-c2w[:3, 2], -offset / offset.norm(), atol=1e-5)     # looks at the origin
        azimuths.append(az)
    az = torch.tensor(azimuths)
    assert az.min() >= 0 and az.max() < 360 and abs(az.mean() - 180) < 30             # U(0, 360)


def test_pose_sampler_elevation_jitter():
    cfg = cfg_with(elevation=40, elevation_jitter=20)
    g = torch.Generator().manual_seed(5)
    els = []
    for _ in range(300):
        c2w, _, el = D.sample_pose(cfg, torch.zeros(3), g)
        assert math.degrees(math.asin(c2w[2, 3] / c2w[:3, 3].norm())) == pytest.approx(el, abs=1e-3)
        els.append(el)
    els = torch.tensor(els)
    assert els.min() >= 20 and els.max() <= 60 and els.min() < 23 and els.max() > 57       # U(20, 60)
    assert abs(els.mean() - 40) < 2.5


# ---- the field ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["mlp", "hashgrid"])
def test_field_is_empty_outside_the_cube(field):
    f = D.DreamField(cfg_with(field=field))
    x = torch.tensor([[0.0, 0.0, 0.0], [0.5, -0.9, 0.99], [1.01, 0.0, 0.0], [0.0, -3.0, 0.0]])
    sigma, rgb = f(x)
    assert (sigma[:2] > 0).all() and (sigma[2:] == 0).all()
    assert rgb.shape == (4, 3) and ((rgb > 0) & (rgb < 1)).all()


def test_checkpointed_render_has_the_same_values_and_gradients():
    cfg = cfg_with(width=16, n_blocks=1, n_samples=8, size=6)
    field = D.DreamField(cfg)
    c2w = D.sample_pose(cfg, torch.zeros(3), torch.Generator().manual_seed(6))[0]
    results = []
    for ckpt in (False, True):
        cfg.checkpoint = ckpt
        field.zero_grad()
        torch.manual_seed(7)                                      # the same jitter in both runs
        rgb, opacity, _, _ = D.render_view(field, cfg, c2w, perturb=True, chunk=10)    # 4 chunks of rays
        (rgb.square().sum() + opacity.sum()).backward()
        results.append((rgb.detach(), [p.grad.clone() for p in field.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(ga, gb))


def test_occupancy_skipping_renders_what_the_full_render_renders():
    """With every cell occupied the packed render equals the dense one (values and gradients); with a
    grid refreshed from the field it differs only by the density it skips (below the threshold)."""
    cfg = cfg_with(width=16, n_blocks=1, n_samples=16, size=8, grid_res=16)
    torch.manual_seed(3)
    field = D.DreamField(cfg)
    field.net[-1].bias.data[0] = -12.0                             # nearly empty ...
    with torch.no_grad():                                         # ... but for a dense ball of radius 0.4
        field.net[-1].weight.data[0] *= 0
    ball = lambda x: (x.norm(dim=-1) < 0.4).float() * 20.0          # noqa: E731
    base = field.forward
    field.forward = lambda x: (base(x)[0] + ball(x), base(x)[1])    # sigma = ball + softplus(-13) ~ 2e-6
    c2w = D.sample_pose(cfg, torch.zeros(3), torch.Generator().manual_seed(6))[0]
    outs = []
    for grid in (None, "full", "refreshed"):
        field.occupancy = None if grid is None else common.OccupancyGrid(D.AABB, cfg.grid_res)
        if grid == "refreshed":
            field.occupancy.update(lambda x: field(x)[0])
        field.zero_grad()
        rgb, opacity, sigma, _ = D.render_view(field, cfg, c2w)
        (rgb.square().sum() + opacity.sum()).backward()
        outs.append((rgb.detach(), opacity.detach(), sigma.numel(), [p.grad.clone() for p in field.parameters()]))
    (a, oa, na, ga), (b, ob, nb, gb), (c, oc, nc, _) = outs
    assert na == 8 * 8 * 16 and nb <= na               # "full" still drops samples outside the cube (sigma 0)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(oa, ob, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(ga, gb))
    assert nc < na / 2 and oa.max() > 0.5                          # most samples skipped; the ball is seen
    assert torch.allclose(a, c, atol=1e-4) and torch.allclose(oa, oc, atol=1e-4)


# ---- end to end --------------------------------------------------------------------------------

def test_short_run_raises_the_clip_score(tmp_path):
    D.main(SMALL + ["--out", str(tmp_path), "--iters", "30", "--prompt", "a blue torus"])
    run = tmp_path / "dreamfields" / "default"
    m = json.loads((run / "metrics.json").read_text())
    assert m["clip_score"] > m["start"]["clip_score"] + 0.05
    assert m["iterations"] == 30 and 0 <= m["r_precision"] <= 1 and m["n_captions"] == 30
    for f in ("config.json", "checkpoint.pt", "views.png", "turntable.mp4"):
        assert (run / f).exists(), f


def test_resumed_run_is_identical_to_an_uninterrupted_one(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = SMALL + ["--n-eval", "1", "--width", "16", "--n-samples", "8"]
    D.main(args + ["--iters", "6", "--out", str(a)])
    D.main(args + ["--iters", "3", "--out", str(b)])
    D.main(args + ["--iters", "6", "--out", str(b), "--resume"])
    sa = torch.load(a / "dreamfields" / "default" / "checkpoint.pt", weights_only=False)
    sb = torch.load(b / "dreamfields" / "default" / "checkpoint.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 6 and torch.equal(sa["origin"], sb["origin"])
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def test_bad_prompt_exits_2_with_one_line_and_writes_nothing(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "dreamfields.py"), "--out", str(tmp_path), "--prompt", "a blue teapot"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "'teapot'" in lines[0] and "--clip" in lines[0]
    assert not any(tmp_path.iterdir())
