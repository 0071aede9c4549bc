"""The toy world: analytic SDFs, area-uniform surface samples, the sphere tracer, random renders,
the decoys and the toy CLIP's training with them."""
import json
import os
import math

import pytest
import torch
import torch.nn.functional as F

import common
import toyworld as tw


def test_captions_index_is_shape_times_six_plus_colour():
    assert len(tw.CAPTIONS) == 30
    assert tw.CAPTIONS[3 * 6 + 4] == "a purple cone"
    assert tw.CAPTIONS[0] == "a red cube" and tw.CAPTIONS[-1] == "a orange torus"


@pytest.mark.parametrize("shape,point,dist", [
    ("cube", (0, 0, 0), -0.4), ("cube", (1, 0, 0), 0.6), ("cube", (0.5, 0.5, 0.5), math.sqrt(3) * 0.1),
    ("sphere", (0, 0, 0), -0.5), ("sphere", (0, 0.3, -0.4), 0.0), ("sphere", (1, 0, 0), 0.5),
    ("cylinder", (0, 0, 0), -0.4), ("cylinder", (0, 0, 1), 0.6), ("cylinder", (1, 0, 1), math.hypot(0.6, 0.6)),
    ("cylinder", (0.3, 0, 0.35), -0.05),
    ("cone", (0, 0, 0.45), 0.0), ("cone", (0, 0, 1), 0.55), ("cone", (0, 0, -1), 0.55),
    ("cone", (0.5, 0, -0.45), 0.0), ("cone", (0, 0, -0.4), -0.05),
    # 0.1 off the middle of the slant side, along its outward normal (0.9, 0.5) / |.|
    ("cone", (0.25 + 0.1 * 0.9 / math.hypot(0.9, 0.5), 0, 0.1 * 0.5 / math.hypot(0.9, 0.5)), 0.1),
    ("torus", (0.4, 0, 0), -0.15), ("torus", (0, 0, 0), 0.25), ("torus", (0, 0, 1), math.hypot(0.4, 1) - 0.15),
])
def test_sdf_at_known_points(shape, point, dist):
    assert float(tw.SDFS[shape](torch.tensor([point], dtype=torch.float32))) == pytest.approx(dist, abs=1e-5)


INSIDE = {  # independent inside tests from the shape definitions
    "cube": lambda p: (p.abs() <= 0.4).all(-1),
    "sphere": lambda p: p.norm(dim=-1) <= 0.5,
    "cylinder": lambda p: (p[:, :2].norm(dim=-1) <= 0.4) & (p[:, 2].abs() <= 0.4),
    "cone": lambda p: (p[:, 2] >= -0.45) & (p[:, 2] <= 0.45) & (p[:, :2].norm(dim=-1) <= 0.5 * (0.45 - p[:, 2]) / 0.9),
    "torus": lambda p: torch.hypot(p[:, :2].norm(dim=-1) - 0.4, p[:, 2]) <= 0.15,
}


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_sdf_sign_gradient_and_distance_to_dense_surface(shape):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(300, 3, generator=g) * 2 - 1
    d = tw.SDFS[shape](p)
    assert torch.equal(d <= 0, INSIDE[shape](p))
    # an exact SDF has a unit gradient almost everywhere (autograd)
    q = p.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tw.SDFS[shape](q).sum(), q)
    assert (grad.norm(dim=-1) - 1).abs().quantile(0.95) < 1e-4
    # |sdf| is the distance to the surface: compare with the nearest of 40k surface samples
    surf, _ = tw.surface_points(shape, "red", 40000, g)
    nearest = torch.cdist(p, surf).amin(1)
    assert (nearest - d.abs()).abs().max() < 0.02


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_surface_points_on_surface_with_colour(shape):
    g = torch.Generator().manual_seed(1)
    xyz, rgb = tw.surface_points(shape, "orange", 5000, g)
    assert xyz.shape == (5000, 3) and rgb.shape == (5000, 3)
    assert tw.SDFS[shape](xyz).abs().max() < 1e-5
    assert torch.allclose(rgb, torch.tensor(tw.COLOURS["orange"]).expand(5000, 3))


def test_surface_points_are_area_uniform():
    g = torch.Generator().manual_seed(2)
    n = 40000
    cyl, _ = tw.surface_points("cylinder", "red", n, g)
    side = 2 * math.pi * 0.4 * 0.8
    on_side = (cyl[:, 2].abs() < 0.4 - 1e-6).float().mean()
    assert on_side == pytest.approx(side / (side + 2 * math.pi * 0.4 ** 2), abs=0.01)
    cone, _ = tw.surface_points("cone", "red", n, g)
    upper = (cone[:, 2] > 0).float().mean()           # side above mid-height: a quarter of the side area
    slant_area, base_area = math.pi * 0.5 * math.hypot(0.5, 0.9), math.pi * 0.25
    assert upper == pytest.approx(0.25 * slant_area / (slant_area + base_area), abs=0.01)
    tor, _ = tw.surface_points("torus", "red", n, g)
    outer = (tor[:, :2].norm(dim=-1) > 0.4).float().mean()   # integral of (R + r cos phi) over cos phi > 0
    assert outer == pytest.approx((0.4 * math.pi + 2 * 0.15) / (2 * math.pi * 0.4), abs=0.01)
    cube, _ = tw.surface_points("cube", "red", n, g)
    top = (cube[:, 2] > 0.4 - 1e-6).float().mean()
    assert top == pytest.approx(1 / 6, abs=0.01)


def test_sdf_samples_match_sdf():
    xyz, d = tw.sdf_samples("torus", 1000, torch.Generator().manual_seed(3))
    assert xyz.shape == (1000, 3) and torch.allclose(d, tw.sdf_torus(xyz))
    assert (xyz[500:].abs() <= 1).all() and (d[:500].abs() < 0.4).all()


def test_sphere_silhouette_matches_projection():
    """A sphere of radius r at distance D projects to a disc of radius f tan(asin(r / D)) pixels."""
    size, fov, D, scale = 48, 40.0, 3.5, 1.1
    c2w = common.pose_spherical(torch.tensor([D]), torch.tensor([20.0]), torch.tensor([30.0]))
    one = torch.ones(1)
    rgb, alpha = tw.render_objects(torch.tensor([1]), torch.tensor([2]), c2w, torch.tensor([fov]), size,
                                   0 * one, scale * one, torch.tensor([[0.0, 0.0, 1.0]]), 0.3 * one)
    f = common.focal_from_fov(fov, size)
    rho = f * math.tan(math.asin(0.5 * scale / D))
    assert float(alpha.sum()) == pytest.approx(math.pi * rho ** 2, rel=0.03)
    # the centre pixel is the shaded albedo: ambient + (1 - ambient) n.l, n.l = sin(20 deg) here
    expect = torch.tensor(tw.COLOURS["blue"]) * (0.3 + 0.7 * math.sin(math.radians(20)))
    centre = rgb[0, :, size // 2 - 1:size // 2 + 1, size // 2 - 1:size // 2 + 1].mean((1, 2))
    assert torch.allclose(centre, expect, atol=0.02)


def test_bumped_sphere_trace_finds_the_first_crossing_of_a_dense_march():
    """Surface bumps (the evaluation CLIP's training objects): the Lipschitz-scaled sphere trace must
    stop at the first zero of the bumped distance, which a dense fixed-step march finds independently."""
    g = torch.Generator().manual_seed(0)
    n = 64
    bumps = torch.cat([torch.full((n, 1), 0.03), torch.full((n, 1), 30.0), 6.3 * torch.rand(n, 3, generator=g)], 1)
    o = torch.tensor([[0.0, -3.0, 0.0]]).expand(n, 3)
    d = F.normalize(torch.stack([0.16 * torch.rand(n, generator=g) - 0.08, torch.ones(n),
                                 0.16 * torch.rand(n, generator=g) - 0.08], -1), dim=-1)   # towards the middle
    shape, yaw, scale = torch.full((n,), 1), torch.rand(n, generator=g), torch.full((n,), 1.1)
    x, hit = tw.sphere_trace(o, d, shape, yaw, scale, bumps=bumps)
    assert hit.all()
    t = torch.linspace(2.0, 3.5, 6001)                                   # steps of 2.5e-4
    pts = o[:, None] + t[None, :, None] * d[:, None]                     # (n, T, 3)
    sdf = tw.scene_sdf(pts.reshape(-1, 3), shape.repeat_interleave(len(t)), yaw.repeat_interleave(len(t)),
                       scale.repeat_interleave(len(t)), bumps.repeat_interleave(len(t), 0)).view(n, -1)
    first = (sdf < 0).float().argmax(1)                                  # first sample inside
    assert torch.allclose((x - o).norm(dim=-1), t[first], atol=2e-3)


def test_random_renders_reproducible_and_held_out_differs():
    a, ia = tw.random_renders(6, 32, seed=5)
    b, ib = tw.random_renders(6, 32, seed=5)
    c, ic = tw.random_renders(6, 32, seed=5, held_out=True)
    assert a.shape == (6, 3, 32, 32) and ia.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert 0 <= a.min() and a.max() <= 1 and not torch.equal(a, c)
    w, _ = tw.random_renders(4, 32, seed=1, background="white")
    assert torch.all(w[:, :, 0, 0] == 1)


def test_chamfer_against_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(17, 3, generator=g), torch.rand(11, 3, generator=g)
    ab = sum(min(float((p - q).norm()) for q in b) for p in a) / len(a)
    ba = sum(min(float((p - q).norm()) for q in a) for p in b) / len(b)
    assert abs(tw.chamfer(a, b).item() - (ab + ba) / 2) < 1e-5
    assert tw.chamfer(a, a).item() < 1e-6


def test_classify_names_posed_noisy_objects():
    """Each shape, turned, resized, shifted, with noisy points and colours, is named right."""
    g = torch.Generator().manual_seed(3)
    for k, shape in enumerate(tw.SHAPES):
        colour = list(tw.COLOURS)[k % 6]
        xyz, rgb = tw.surface_points(shape, colour, 2000, g)
        n = len(xyz)
        xyz = tw.to_object(xyz, torch.full((n,), -0.5), torch.full((n,), 1 / 1.2)) + torch.tensor([0.1, -0.2, 0.05])
        xyz = xyz + 0.01 * torch.randn(n, 3, generator=g)
        rgb = (rgb + 0.05 * torch.randn(n, 3, generator=g)).clamp(0, 1)
        r = tw.classify(xyz, rgb)
        assert r["caption"] == f"a {colour} {shape}", r
        assert r["chamfer"][shape] < 0.05


def test_load_ply_reads_back_what_save_ply_wrote(tmp_path):
    g = torch.Generator().manual_seed(0)
    pts, cols = torch.rand(20, 3, generator=g), torch.rand(20, 3, generator=g)
    faces = torch.tensor([[0, 1, 2], [2, 3, 4]])
    common.save_ply(str(tmp_path / "m.ply"), pts, cols, faces)
    p, c, f = tw.load_ply(str(tmp_path / "m.ply"))
    assert torch.allclose(p, pts, atol=1e-5) and torch.allclose(c, cols, atol=0.5 / 255 + 1e-6)   # uint8
    assert torch.equal(f, faces)
    common.save_ply(str(tmp_path / "p.ply"), pts)                        # points only, no colours
    p, c, f = tw.load_ply(str(tmp_path / "p.ply"))
    assert torch.allclose(p, pts, atol=1e-5) and c.shape == (20, 3) and f.shape == (0, 3)


# ---- decoys: near-miss shapes of no caption (train_clip --decoys) --------------------------------

@pytest.mark.parametrize("name,point,dist", [
    ("filled torus", (0, 0, 0), -0.15), ("filled torus", (0, 0, 0.1), -0.05), ("filled torus", (0, 0, 1), 0.85),
    ("filled torus", (0.2, 0, 0.15), 0.0), ("filled torus", (0.5, 0, 0), -0.05), ("filled torus", (1, 0, 0), 0.45),
    ("filled torus", (0.7, 0, 0.4), 0.35),
    ("rounded cube", (0, 0, 0), -0.4), ("rounded cube", (1, 0, 0), 0.6), ("rounded cube", (0.4, 0, 0), 0.0),
    ("rounded cube", (0.35, 0.1, 0), -0.05), ("rounded cube", (0.3, 0.3, 0), math.hypot(0.1, 0.1) - 0.2),
    ("rounded cube", (0.5, 0.5, 0.5), math.sqrt(3) * 0.3 - 0.2),
])
def test_decoy_sdf_at_known_points(name, point, dist):
    assert float(tw.DECOYS[name](torch.tensor([point], dtype=torch.float32))) == pytest.approx(dist, abs=1e-5)


def _disc_points(h=0.01):
    """The disc |xy| <= 0.4, z = 0: a square grid of spacing h plus its rim, densely."""
    c = torch.arange(-0.4, 0.4 + 1e-6, h)
    xy = torch.cartesian_prod(c, c)
    theta = torch.linspace(0, 2 * math.pi, 2000)
    xy = torch.cat([xy[xy.norm(dim=-1) <= 0.4], 0.4 * torch.stack([theta.cos(), theta.sin()], -1)])
    return torch.cat([xy, torch.zeros(len(xy), 1)], -1)


def _box_surface_points(half=0.2, h=0.01):
    """The six faces of the box |p_i| <= half on a grid of spacing h (edges included)."""
    c = torch.linspace(-half, half, round(2 * half / h) + 1)
    uv = torch.cartesian_prod(c, c)
    faces = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            f = torch.zeros(len(uv), 3)
            f[:, [a for a in range(3) if a != axis]] = uv
            f[:, axis] = sign * half
            faces.append(f)
    return torch.cat(faces)


def test_decoy_sdfs_are_unions_of_balls_by_brute_force():
    """Both decoys are a convex set K grown by a ball of radius r: outside K the signed distance is
    min over the points c of K of |p - c| - r (the filled torus: K the disc, r 0.15, everywhere; the
    rounded cube: K the box of half side 0.2, r 0.2). Inside the rounded cube's K the distance to the
    nearest face is r + (0.2 - max_i |p_i|). Plus the unit gradient of an exact SDF (autograd)."""
    g = torch.Generator().manual_seed(0)
    p = (torch.rand(400, 3, generator=g) * 2 - 1) * 0.7
    ft = tw.sdf_filled_torus(p)
    ref = torch.cdist(p, _disc_points()).amin(1) - 0.15
    assert (ft - ref).abs().max() < 0.01
    rc = tw.sdf_rounded_cube(p)
    in_k = (p.abs() <= 0.2).all(-1)
    ref = torch.where(in_k, -(0.2 + 0.2 - p.abs().amax(-1)), torch.cdist(p, _box_surface_points()).amin(1) - 0.2)
    assert in_k.any() and (rc - ref).abs().max() < 0.01
    for sdf in tw.DECOYS.values():
        q = p.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(sdf(q).sum(), q)
        assert (grad.norm(dim=-1) - 1).abs().quantile(0.95) < 1e-4


def test_decoys_render_after_the_shapes_and_keep_the_captions():
    assert tw.OBJECTS[:5] == tw.SHAPES and tw.OBJECTS[5:] == list(tw.DECOYS) and len(tw.CAPTIONS) == 30
    p = torch.rand(70, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    idx = torch.arange(70) % 7
    expect = torch.stack([tw.OBJECT_SDFS[tw.OBJECTS[k]](p[i:i + 1])[0] for i, k in enumerate(idx.tolist())])
    assert torch.allclose(tw.sdf_by_shape(p, idx), expect)
    sc = tw.sample_scenes(50, False, torch.Generator().manual_seed(2), decoys=True)
    assert set(sc["shape_idx"].tolist()) == {5, 6}
    # seen from straight above, the torus has a hole at its centre and the filled torus has none
    n = 2
    c2w = common.pose_spherical(torch.full((n,), 3.5), torch.full((n,), 89.0), torch.zeros(n))
    _, alpha = tw.render_objects(torch.tensor([4, 5]), torch.tensor([2, 2]), c2w, torch.full((n,), 40.0), 24,
                                 torch.zeros(n), torch.ones(n), torch.tensor([[0.0, 0.0, 1.0]] * n), torch.full((n,), 0.3))
    assert alpha[0, 0, 12, 12] == 0 and alpha[1, 0, 12, 12] == 1
    # silhouette areas: annulus of radii R -+ r (0.25, 0.55) vs the disc of radius R + r
    assert float(alpha[0].sum() / alpha[1].sum()) == pytest.approx(1 - 0.25 ** 2 / 0.55 ** 2, abs=0.05)


def test_caption_or_none_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    z, b = torch.randn(5, 30, generator=g) * 3, torch.tensor(1.5)
    y = torch.tensor([0, 29, tw.NONE, 7, tw.NONE])
    own = torch.stack([b if t == tw.NONE else z[i, t] for i, t in enumerate(y.tolist())])
    expect = -(own.exp() / (z.exp().sum(-1) + b.exp())).log().mean()
    assert tw.caption_or_none_loss(z, y, b).item() == pytest.approx(expect.item(), rel=1e-5)
    assert tw.caption_or_none_loss(z[:2], y[:2]).item() == pytest.approx(
        -(z[[0, 1], [0, 29]].exp() / z[:2].exp().sum(-1)).log().mean().item(), rel=1e-5)


@pytest.fixture
def one_thread():
    """Tiny tensors: on a busy shared 2-core machine a second torch thread costs far more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_clip_with_decoys_saves_a_folder_the_prior_loads(tmp_path, one_thread):
    out = str(tmp_path / "clip")
    info = tw.train_clip(out, steps=2, batch=4, pool_size=4, lr=1e-3, seed=0, device="cpu", decoys=0.25)
    assert info["trained"]["decoys"] == 0.25 and info["trained"]["decoy_pool"] == 1
    with open(tmp_path / "clip" / "toyworld.json") as f:
        saved = json.load(f)
    assert saved["captions"] == tw.CAPTIONS and saved["trained"]["decoys"] == 0.25
    prior = common.CLIPPrior(out)                 # a plain open_clip model: no "none" parameter in it
    assert prior.encode_text(tw.CAPTIONS).shape == (30, 128)
    sims = tw.decoy_similarity(out, 1, 0, "cpu", size=16)
    assert list(sims) == list(tw.DECOYS)
    assert all(-1 <= r[k] <= 1 for r in sims.values() for k in ("decoy", "true"))
    with pytest.raises(common.UserError):
        tw.train_clip(out, 1, 4, 4, 1e-3, 0, "cpu", decoys=1.0)


def test_train_clip_init_starts_from_the_given_weights(tmp_path, one_thread):
    """With a zero learning rate, a fine-tuning run from data/toy_clip saves exactly its weights."""
    out = str(tmp_path / "clip")
    info = tw.train_clip(out, steps=1, batch=4, pool_size=4, lr=0.0, seed=0, device="cpu", init=tw.TOY_CLIP_DIR)
    assert info["trained"]["init"] == tw.TOY_CLIP_DIR and info["trained"]["init_trained"]["steps"] > 0
    a = torch.load(os.path.join(tw.TOY_CLIP_DIR, "open_clip_pytorch_model.bin"))
    b = torch.load(os.path.join(out, "open_clip_pytorch_model.bin"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
