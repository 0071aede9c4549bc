"""Tests for dreamfusion.py: shading, normals, orientation loss, view prompts, the blob, one SDS step, the CLI."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import dreamfusion as df

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(*flags):
    return df.parse_args(["--n-levels", "4", "--log2-table", "12", "--max-res", "32", "--size", "16",
                          "--n-samples", "16", *flags])


def blob_only_field(cfg):
    """A field whose network outputs zero: log-density = blob + bias, albedo = sigmoid(0) = 0.5."""
    field = df.build_field(cfg)
    with torch.no_grad():
        field.net[-1].weight.zero_(), field.net[-1].bias.zero_()
    return field


def test_shading_modes_against_the_formula():
    g = torch.Generator().manual_seed(0)
    albedo = torch.rand(50, 3, generator=g)
    normals = F.normalize(torch.randn(50, 3, generator=g), dim=-1)
    light = F.normalize(torch.randn(3, generator=g), dim=0)
    a = 0.2
    assert torch.equal(common.shade(albedo, normals, light, "albedo", a), albedo)
    lam = common.shade(albedo, normals, light, "lambertian", a)
    tex = common.shade(albedo, normals, light, "textureless", a)
    for i in range(50):   # naive per-point reference
        ndl = max(0.0, float(sum(normals[i, k] * light[k] for k in range(3))))
        assert torch.allclose(lam[i], albedo[i] * (a + (1 - a) * ndl), atol=1e-6)
        assert torch.allclose(tex[i], torch.full((3,), a + (1 - a) * ndl), atol=1e-6)   # grey: white albedo
    # facing away from the light: ambient only; facing it: full albedo / white
    n = torch.stack([-light, light])
    assert torch.allclose(common.shade(albedo[:2], n, light, "lambertian", a), albedo[:2] * torch.tensor([[a], [1.0]]))
    assert torch.allclose(common.shade(albedo[:2], n, light, "textureless", a), torch.tensor([[a] * 3, [1.0] * 3]))


def test_textureless_render_is_grey_and_lambertian_follows_the_light():
    cfg = small_cfg()
    field = blob_only_field(cfg)
    c2w = common.pose_spherical(3.5, 0.0, 0.0)
    light_front = torch.tensor([1.0, 0.0, 0.0])
    with torch.no_grad():
        v = df.render_view(field, None, cfg, c2w, 40.0, 16, "all", light_front, torch.ones(3))
        w = df.render_view(field, None, cfg, c2w, 40.0, 16, "all", -light_front, torch.ones(3))
    tex = v["textureless"]
    assert torch.allclose(tex[..., 0], tex[..., 1]) and torch.allclose(tex[..., 1], tex[..., 2])
    # the blob is seen from +x: lit from the camera side it is brighter than lit from behind
    c = slice(6, 10)
    assert v["lambertian"][c, c].mean() > w["lambertian"][c, c].mean() + 0.1
    assert torch.allclose(v["rgb"], w["rgb"])          # albedo-only ignores the light


def test_a_view_rendered_in_chunks_equals_one_pass():
    """render_object_view splits the rays into chunks (the memory of large export frames): every map
    and the ray-averaged orientation loss must equal one pass over all rays."""
    cfg = small_cfg()
    torch.manual_seed(0)
    field, bg_net = df.build_field(cfg), common.Background()
    c2w, light = common.pose_spherical(3.5, 20.0, 30.0), torch.tensor([0.6, 0.0, 0.8])
    with torch.no_grad():
        one = common.render_object_view(field, bg_net, c2w, 40.0, 16, "all", light, 16, 0.1, chunk=256)
        parts = common.render_object_view(field, bg_net, c2w, 40.0, 16, "all", light, 16, 0.1, chunk=100)
    assert set(one) == set(parts) and one["orient"] > 0
    for k in one:
        assert torch.allclose(one[k], parts[k], atol=1e-6), k


@pytest.mark.parametrize("mode", ["fd", "autograd"])
@pytest.mark.parametrize("kind", ["hashgrid", "mlp"])
def test_normals_of_the_blob_point_outwards(mode, kind):
    cfg = small_cfg("--normals", mode, "--field", kind)
    field = blob_only_field(cfg)
    x = F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(1)), dim=-1) * 0.3
    n = field.normals(x)
    assert torch.allclose(n, F.normalize(x, dim=-1), atol=1e-3)   # -grad of a radial bump = outward
    assert torch.allclose(n.norm(dim=-1), torch.ones(64), atol=1e-5)


@pytest.mark.parametrize("kind", ["hashgrid", "mlp"])
def test_fd_normals_carry_gradient_to_the_field(kind):
    field = df.build_field(small_cfg("--field", kind))
    field.normals(torch.rand(32, 3) - 0.5)[:, 0].sum().backward()
    param = field.grid.table if kind == "hashgrid" else field.net[-1].weight   # (the MLP's output starts at 0)
    assert param.grad.abs().sum() > 0


def test_mlp_field_against_the_explicit_formula():
    """--field mlp: h = W_out LN(block(...block(W_in gamma(x)))), block(z) = z + W_d swish(W_u LN(z))."""
    torch.manual_seed(0)
    cfg = small_cfg("--field", "mlp", "--n-freqs", "3", "--mlp-width", "8", "--mlp-blocks", "2")
    field = df.build_field(cfg)
    x = torch.rand(5, 3) * 2 - 1
    blob = cfg.blob_density * torch.exp(-(x ** 2).sum(-1) / (2 * cfg.blob_radius ** 2))
    with torch.no_grad():
        assert torch.allclose(field.density(x), torch.exp(blob + cfg.density_bias))   # starts as the blob alone
        torch.nn.init.normal_(field.net[-1].weight), torch.nn.init.normal_(field.net[-1].bias)

    def layer_norm(z, ln):                    # (z - mean) / sqrt(var + eps) * gamma + beta, biased variance
        mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    def linear(z, lin):
        return z @ lin.weight.T + lin.bias

    xk = (x[:, None, :] * 2.0 ** torch.arange(3)[:, None]).flatten(1)       # (5, 9): x_c 2^k, k-major
    enc = torch.cat([x, torch.sin(xk), torch.cos(xk)], -1)                   # gamma(x), NeRF Eq. 4
    z = linear(enc, field.net[0])
    for blk in field.net[1:3]:
        u = linear(layer_norm(z, blk.norm), blk.up)
        z = z + linear(u * torch.sigmoid(u), blk.down)
    h = linear(layer_norm(z, field.net[3]), field.net[4])
    sigma, albedo = field(x)
    assert torch.allclose(sigma, torch.exp(h[:, 0] + blob + cfg.density_bias), rtol=1e-5)
    assert torch.allclose(albedo, torch.sigmoid(h[:, 1:]), atol=1e-6)


def test_orientation_loss_on_a_hand_made_case():
    d = torch.tensor([[0.0, 0.0, -1.0]])                                  # looking down -z
    normals = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.6, -0.8]]])   # facing, away, slanted away
    w = torch.tensor([[0.5, 0.3, 0.2]], requires_grad=True)
    loss = common.orientation_loss(w, normals, d)
    assert torch.isclose(loss, torch.tensor(0.5 * 0.0 + 0.3 * 1.0 + 0.2 * 0.8 ** 2))
    n = normals.clone().requires_grad_(True)
    common.orientation_loss(w, n, d).backward()
    assert w.grad is None                                                 # stopgrad on the weights
    assert torch.allclose(n.grad[0, 1], 2 * 0.3 * 1.0 * d[0])            # d/dn w (n.d)^2 = 2 w (n.d) d


@pytest.mark.parametrize("el, az, suffix", [(70, 0, "overhead view"), (30, 10, "front view"), (30, -40, "front view"),
                                            (30, 90, "side view"), (0, -100, "side view"), (10, 180, "back view"),
                                            (10, -170, "back view"), (10, 530, "back view")])
def test_view_prompt(el, az, suffix):
    assert common.view_suffix(el, az) == suffix          # what sds_loss appends: "<prompt>, <suffix>"


def test_shading_schedule():
    def pick_shading(step, cfg, u):                       # as dreamfusion.train calls it
        return common.pick_shading(step, cfg.albedo_iters, cfg.p_textureless, cfg.p_lambertian, u, cfg.shading)
    cfg = small_cfg("--albedo-iters", "10", "--p-textureless", "0.3", "--p-lambertian", "0.5")
    assert {pick_shading(s, cfg, u) for s in range(10) for u in (0.0, 0.5, 0.99)} == {"albedo"}
    assert [pick_shading(10, cfg, u) for u in (0.1, 0.5, 0.9)] == ["textureless", "lambertian", "albedo"]
    assert pick_shading(50, small_cfg("--no-shading"), 0.1) == "albedo"


def test_blob_makes_the_density_highest_at_the_origin():
    cfg = small_cfg()
    torch.manual_seed(0)
    field = df.build_field(cfg)
    pts = common.grid_points(df.AABB, 21).reshape(-1, 3)                  # includes the origin
    with torch.no_grad():
        sigma = field.density(pts)
    assert pts[sigma.argmax()].abs().max() < 1e-6
    assert sigma.max() > 20 * sigma.median()
    no_blob = df.build_field(small_cfg("--no-blob"))
    with torch.no_grad():
        assert no_blob.density(pts).max() < 2 * no_blob.density(pts).min()


def test_occupancy_grid_skips_only_empty_space():
    """Rendering with the occupancy grid (after an update) matches rendering every sample."""
    cfg = small_cfg("--density-bias", "-8")        # empty space: sigma = e^-8, far below the threshold
    torch.manual_seed(0)
    field = blob_only_field(cfg)
    grid = common.OccupancyGrid(df.AABB, 16, threshold=0.01 * cfg.n_samples / 2)
    grid.update(field.density)
    assert 0 < grid.mask.float().mean() < 0.5                               # most of the cube is skipped
    c2w, light = common.pose_spherical(3.5, 20.0, 30.0), torch.tensor([0.0, 0.0, 1.0])
    with torch.no_grad():
        full = df.render_view(field, None, cfg, c2w, 40.0, 16, "all", light, torch.ones(3))
        fast = df.render_view(field, None, cfg, c2w, 40.0, 16, "all", light, torch.ones(3), occupancy=grid)
    for k in ("rgb", "lambertian", "opacity"):
        assert torch.allclose(full[k], fast[k], atol=2e-3), k


def test_one_sds_step_with_the_toy_prior_reaches_the_field():
    cfg = small_cfg()
    torch.manual_seed(0)
    prior = common.DiffusionPrior("toy")
    field, bg = df.build_field(cfg), common.Background()
    cam = common.sample_cameras(1, (3.0, 4.0), (-10.0, 80.0), fov=(35.0, 45.0))
    light = common.random_light(cam["c2w"][0, :3, 3], 1.0)
    out = df.render_view(field, bg, cfg, cam["c2w"][0], cam["fov"].item(), 16, "lambertian", light, None, True)
    loss, info = prior.sds_loss(out["rgb"].permute(2, 0, 1)[None], cfg.prompt, cam["elevation"].item(),
                                cam["azimuth"].item(), guidance=cfg.guidance)
    loss = loss + cfg.lambda_orient * out["orient"]
    assert torch.isfinite(loss)
    loss.backward()
    for p in (field.grid.table, field.net[0].weight, bg.net[0].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_bad_prompt_exits_2_with_one_line_and_writes_nothing(tmp_path):
    cmd = [sys.executable, "dreamfusion.py", "--prompt", "a corgi on a skateboard", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "corgi" in lines[0] and "--prior" in lines[0]
    assert os.listdir(tmp_path) == []


def test_resumed_run_is_identical_to_an_uninterrupted_one(tmp_path):
    tiny = ["--n-levels", "4", "--log2-table", "12", "--max-res", "32", "--size", "16", "--n-samples", "16",
            "--albedo-iters", "1", "--video-frames", "2", "--video-size", "16", "--mesh-res", "16",
            "--eval-clip", "", "--out", str(tmp_path), "--threads", "1"]
    df.main(tiny + ["--name", "straight", "--iters", "3"])
    df.main(tiny + ["--name", "split", "--iters", "2"])
    df.main(tiny + ["--name", "split", "--iters", "3", "--resume"])
    a = torch.load(tmp_path / "dreamfusion" / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "dreamfusion" / "split" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for k in a["field"]:
        assert torch.equal(a["field"][k], b["field"][k]), k
    assert [c["loss"] for c in a["curve"]] == [c["loss"] for c in b["curve"]]
    for f in ("config.json", "colour.mp4", "normals.mp4", "textureless.mp4", "metrics.json", "preview.png"):
        assert (tmp_path / "dreamfusion" / "straight" / f).exists(), f
