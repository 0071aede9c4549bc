"""Parity tests of common.py's rendering core against independent references."""
import json
import math
import os

import numpy as np
import pytest
import torch

import common


# ---- hash grid against a naive per-point, per-level, per-corner lookup ----------------------------
def naive_hash_grid(grid: common.HashGrid, x: torch.Tensor) -> torch.Tensor:
    out = []
    T = grid.table_size
    for p in x:
        feats = []
        for l in range(grid.n_levels):
            res = int(grid.res[l])
            size = (res + 1) ** 3
            pos = [float(p[i].clamp(0, 1)) * res for i in range(3)]
            lo = [min(int(math.floor(v)), res - 1) for v in pos]
            f = torch.zeros(grid.n_features, dtype=grid.table.dtype)
            for dx in (0, 1):
                for dy in (0, 1):
                    for dz in (0, 1):
                        c = (lo[0] + dx, lo[1] + dy, lo[2] + dz)
                        if size <= T:   # dense level
                            row = c[0] + c[1] * (res + 1) + c[2] * (res + 1) ** 2
                        else:           # NGP hash: XOR of coordinate * prime, mod T (uint32 arithmetic)
                            h = (c[0] * 1) ^ ((c[1] * 2654435761) & 0xFFFFFFFF) ^ ((c[2] * 805459861) & 0xFFFFFFFF)
                            row = h % T
                        w = 1.0
                        for i, d in enumerate((dx, dy, dz)):
                            fr = pos[i] - lo[i]
                            w *= fr if d else 1 - fr
                        f = f + w * grid.table[int(grid.offsets[l]) + row]
            feats.append(f)
        out.append(torch.cat(feats))
    return torch.stack(out)


def test_hash_grid_matches_naive_lookup_values_and_gradients():
    torch.manual_seed(0)
    grid = common.HashGrid(n_levels=5, n_features=2, log2_table=10, base_res=3, max_res=60).double()
    with torch.no_grad():
        grid.table.uniform_(-1, 1)
    assert 0 < grid.n_dense < grid.n_levels          # both dense and hashed levels are exercised
    x = torch.rand(40, 3, dtype=torch.float64)
    x[0] = torch.tensor([1.0, 0.0, 1.0])               # the cube's corners
    got = grid(x)
    ref = naive_hash_grid(grid, x)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    g = torch.randn_like(ref)
    (ga,) = torch.autograd.grad((got * g).sum(), grid.table)
    (gb,) = torch.autograd.grad((ref * g).sum(), grid.table)
    assert torch.allclose(ga, gb, atol=1e-5)


def test_hash_grid_level_layout():
    grid = common.HashGrid(n_levels=16, n_features=2, log2_table=19, base_res=16, max_res=2048)
    b = math.exp((math.log(2048) - math.log(16)) / 15)
    assert grid.res.long().tolist() == [int(math.floor(16 * b ** l)) for l in range(16)]
    assert grid.res[-1] == 2048 and grid.table.shape[1] == 2
    assert grid.table.abs().max() <= 1e-4


# ---- compositing against closed forms --------------------------------------------------------------
def test_homogeneous_slab_transmittance_is_exponential():
    sigma, depth, n = 0.7, 3.0, 3000
    t = torch.linspace(0, depth, n + 1)[:-1][None]
    deltas = torch.full_like(t, depth / n)
    out = common.composite(torch.full_like(t, sigma), torch.ones(1, n, 3), deltas, t)
    # T(s) = exp(-sigma s): opacity = 1 - exp(-sigma depth); the expected depth of a slab
    assert out["opacity"].item() == pytest.approx(1 - math.exp(-sigma * depth), rel=1e-4)
    assert torch.allclose(out["transmittance"][0], torch.exp(-sigma * t[0]), atol=1e-5)
    expected_depth = (1 - math.exp(-sigma * depth) * (1 + sigma * depth)) / sigma
    assert out["depth"].item() == pytest.approx(expected_depth, rel=2e-3)


def test_one_opaque_sample_takes_everything():
    sigma = torch.tensor([[0.0, 0.0, 1e6, 0.0, 5.0]])
    rgb = torch.rand(1, 5, 3)
    t = torch.arange(5.0)[None]
    out = common.composite(sigma, rgb, torch.ones(1, 5), t, background=torch.ones(3))
    assert torch.allclose(out["weights"], torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(out["rgb"], rgb[:, 2], atol=1e-6)
    assert out["depth"].item() == pytest.approx(2.0)


def test_empty_ray_shows_background():
    out = common.composite(torch.zeros(2, 4), torch.rand(2, 4, 3), torch.ones(2, 4), background=torch.tensor([0.2, 0.4, 0.6]))
    assert torch.allclose(out["rgb"], torch.tensor([[0.2, 0.4, 0.6]] * 2))


# ---- inverse-CDF sampling reproduces a known pdf ---------------------------------------------------
def test_sample_pdf_reproduces_piecewise_constant_pdf():
    torch.manual_seed(0)
    bins = torch.linspace(0, 4, 5)[None]                           # 4 bins of width 1
    w = torch.tensor([[1.0, 3.0, 0.0, 4.0]])
    s = common.sample_pdf(bins, w, 200_000)
    hist = torch.histc(s, bins=4, min=0, max=4) / s.numel()
    expected = (w + 1e-5) / (w + 1e-5).sum()
    assert torch.allclose(hist, expected[0], atol=4e-3)
    inside = s[(s >= 3) & (s < 4)]                                  # uniform inside a bin
    assert inside.mean().item() == pytest.approx(3.5, abs=0.01)


def test_stratified_samples_stay_in_their_bins():
    t = common.stratified_samples(2.0, 6.0, 10, 8, perturb=True)
    edges = torch.linspace(2, 6, 9)
    assert ((t >= edges[:-1]) & (t <= edges[1:])).all()


# ---- occupancy grid never skips a cell that holds density -----------------------------------------
def test_occupancy_grid_keeps_every_cell_with_density():
    torch.manual_seed(0)
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3])
    grid = common.OccupancyGrid(aabb, res=16, threshold=0.01)
    centre, radius = torch.tensor([0.3, -0.2, 0.1]), 0.33

    def density(x):
        return ((x - centre).norm(dim=-1) < radius).float() * 50.0
    for _ in range(3):
        grid.update(density)
    pts = torch.rand(200_000, 3) * 2 - 1
    has_density = density(pts) > 0
    assert grid.query(pts[has_density]).all()                     # never skipped
    assert grid.query(pts).float().mean() < 0.2                    # but most of space is skipped
    with pytest.raises(common.UserError, match="non-finite"):
        grid.update(lambda x: density(x) * float("nan"))


# ---- cameras --------------------------------------------------------------------------------------
def test_look_at_and_rays_hit_the_target():
    c2w = common.pose_spherical(4.0, 30.0, 45.0)
    assert torch.allclose(c2w[:3, 3].norm(), torch.tensor(4.0))
    rays_o, rays_d = common.get_rays(8, 8, common.focal_from_fov(40, 8), c2w)
    centre = (rays_d[3, 3] + rays_d[4, 4]) / 2                     # between the four central pixels
    closest = rays_o[0, 0] + (-rays_o[0, 0] @ centre) / (centre @ centre) * centre
    assert closest.norm() < 1e-5                                   # passes through the origin
    assert torch.allclose(torch.linalg.det(c2w[:3, :3]), torch.tensor(1.0), atol=1e-6)


def test_ray_batch_matches_full_image_rays():
    c2w = torch.stack([common.pose_spherical(4.0, 20.0, a) for a in (0.0, 90.0)])
    o, d, (img, row, col) = common.get_ray_batch(c2w, 6, 5, 7.0, 20)
    fo, fd = common.get_rays(6, 5, 7.0, c2w)
    assert torch.allclose(d, fd[img, row, col], atol=1e-6) and torch.allclose(o, fo[img, row, col])


def test_jittered_rays_stay_inside_their_pixels():
    """With jitter a ray meets the camera's z = -1 plane inside its pixel's square, not only at the centre."""
    c2w = torch.eye(4)[None]
    H, W, f = 6, 5, 7.0
    _, d, (_, row, col) = common.get_ray_batch(c2w, H, W, f, 4000, jitter=True)
    x, y = d[:, 0] * f + W / 2 - col, -d[:, 1] * f + H / 2 - row               # position within the pixel
    assert x.min() >= 0 and x.max() <= 1 and y.min() >= 0 and y.max() <= 1
    assert x.std() > 0.25 and y.std() > 0.25                                  # ~ uniform (std 0.289)


# ---- the Blender loader on a tiny fixture ---------------------------------------------------------
def write_fixture(root, angle=0.5, size=4):
    import imageio.v3 as iio
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    img = np.zeros((size, size, 4), np.uint8)
    img[..., 0] = 255                                   # red
    img[: size // 2, :, 3] = 255                        # top half opaque, bottom transparent
    iio.imwrite(os.path.join(root, "train", "r_0.png"), img)
    pose = common.pose_spherical(4.0, 10.0, 20.0).tolist()
    for split in ("train", "val", "test"):
        with open(os.path.join(root, f"transforms_{split}.json"), "w") as f:
            json.dump({"camera_angle_x": angle, "frames": [{"file_path": "./train/r_0", "transform_matrix": pose}]}, f)
    return pose


def test_loader_focal_poses_and_white_compositing(tmp_path):
    pose = write_fixture(str(tmp_path))
    d = common.load_blender(str(tmp_path), "train")
    assert d["focal"] == pytest.approx(0.5 * 4 / math.tan(0.25))
    assert torch.allclose(d["poses"][0], torch.tensor(pose))
    assert torch.allclose(d["images"][0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(d["images"][0, -1, 0], torch.tensor([1.0, 1.0, 1.0]))   # transparent -> white
    assert d["alpha"].shape == (1, 4, 4) and d["alpha"][0, 0, 0] == 1 and d["alpha"][0, -1, 0] == 0
    h = common.load_blender(str(tmp_path), "train", half_res=True)
    assert h["images"].shape[1:3] == (2, 2) and h["focal"] == pytest.approx(d["focal"] / 2)


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(common.UserError, match="not found"):
        common.load_blender(str(tmp_path / "nope"), "train")
    write_fixture(str(tmp_path))
    (tmp_path / "transforms_test.json").write_text("{not json")
    with pytest.raises(common.UserError, match="malformed"):
        common.load_blender(str(tmp_path), "test")
    os.remove(tmp_path / "train" / "r_0.png")
    with pytest.raises(common.UserError, match="image listed"):
        common.load_blender(str(tmp_path), "train")


# ---- encodings and metrics -------------------------------------------------------------------------
def test_positional_encoding_formula():
    x = torch.tensor([[0.3, -1.2, 2.0]])
    pe = common.positional_encoding(x, 2)
    expected = torch.cat([x, torch.sin(x), torch.sin(2 * x), torch.cos(x), torch.cos(2 * x)], -1)
    assert pe.shape == (1, 15)
    assert torch.allclose(torch.sort(pe).values, torch.sort(expected).values)


def test_sh_encoding_is_orthonormal_on_the_sphere():
    torch.manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(400_000, 3, dtype=torch.float64), dim=-1)
    Y = common.sh_encoding(d)
    gram = (Y.T @ Y) * (4 * math.pi / len(d))                     # Monte-Carlo integral over the sphere
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=0.02)


def test_psnr_and_ssim():
    a = torch.rand(16, 16, 3)
    assert common.psnr(a, a) == float("inf")
    b = (a + 0.1).clamp(0, 1)
    assert common.psnr(a, b) == pytest.approx(-10 * math.log10(((a - b) ** 2).mean().item()), rel=1e-5)
    assert common.ssim(a, a) == pytest.approx(1.0)


def test_marching_cubes_sphere_matches_radius():
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3])
    pts = common.grid_points(aabb, 48)
    verts, faces = common.marching_cubes(pts.norm(dim=-1), 0.6, aabb)
    assert len(faces) > 0
    assert torch.allclose(verts.norm(dim=-1), torch.full((len(verts),), 0.6), atol=0.01)


def test_density_mesh_faces_point_out_of_the_dense_region():
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3])
    density = lambda x: 10.0 * (0.5 - x.norm(dim=-1)).clamp(min=0) / 0.5     # dense inside r = 0.5
    verts, faces, colors = common.density_mesh(density, lambda x: (x + 1) / 2, aabb, 40, 2.0)
    assert torch.allclose(verts.norm(dim=-1), torch.full((len(verts),), 0.4), atol=0.02)   # 10 (0.5 - r)/0.5 = 2
    tri = verts[faces]
    normals = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    assert ((normals * tri.mean(1)).sum(-1) > 0).float().mean() > 0.99
    assert torch.allclose(colors, (verts + 1) / 2)


def test_save_video_writes_a_gif_when_ffmpeg_is_missing(tmp_path, monkeypatch):
    import imageio.v2 as iio2
    frames = [torch.full((8, 8, 3), k / 3) for k in range(4)]
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: None)
    written = common.save_video(str(tmp_path / "turn.mp4"), frames)
    assert written.endswith("turn.gif") and not (tmp_path / "turn.mp4").exists()
    back = iio2.mimread(written)
    assert len(back) == 4 and abs(float(back[2][..., :3].mean()) - 2 / 3 * 255) < 2


def test_packed_compositing_matches_dense_compositing_with_zeroed_samples():
    """Skipping samples (packed) = compositing them with zero density (dense), values and grads."""
    g = torch.Generator().manual_seed(0)
    R, S = 7, 9
    sigma = (torch.rand(R, S, generator=g) * 3).requires_grad_(True)
    rgb = torch.rand(R, S, 3, generator=g).requires_grad_(True)
    deltas, t = torch.rand(R, S, generator=g) * 0.3, torch.rand(R, S, generator=g).cumsum(-1)
    mask = torch.rand(R, S, generator=g) < 0.5
    mask[3] = False                                                    # a ray with no samples at all
    bg = torch.tensor([0.2, 0.5, 0.9])
    dense = common.composite(sigma * mask, rgb, deltas, t, background=bg)
    ray, step = mask.nonzero(as_tuple=True)
    packed = common.composite_packed(sigma[ray, step], rgb[ray, step], deltas[ray, step], t[ray, step], ray, R, bg)
    for k in ("rgb", "depth", "opacity"):
        assert torch.allclose(dense[k], packed[k], atol=1e-6), k
    assert torch.allclose(dense["weights"][mask], packed["weights"], atol=1e-6)
    gd = torch.autograd.grad(dense["rgb"].sum() + dense["depth"].sum(), (sigma, rgb))
    gp = torch.autograd.grad(packed["rgb"].sum() + packed["depth"].sum(), (sigma, rgb))
    for a, b in zip(gd, gp):
        assert torch.allclose(a * (mask if a.dim() == 2 else mask[..., None]), b, atol=1e-5)


def test_pack_mask_with_a_capacity_matches_nonzero_and_drops_the_last_rays():
    """The fixed-size packing (binary search, no host sync) against torch.nonzero."""
    g = torch.Generator().manual_seed(1)
    R, S = 9, 13
    mask = torch.rand(R, S, generator=g) < 0.4
    mask[4] = False
    ray_ref, step_ref = mask.nonzero(as_tuple=True)
    n = len(ray_ref)
    ray, step, complete = common.pack_mask(mask, n + 5)              # room to spare: 5 dummies
    assert torch.equal(ray[:n], ray_ref) and torch.equal(step[:n], step_ref) and complete.all()
    assert torch.equal(ray[n:], R + torch.arange(n, n + 5)) and (step[n:] == 0).all()
    cap = n - 7                                                      # too small: the last rays lose samples
    ray, step, complete = common.pack_mask(mask, cap)
    assert torch.equal(ray, ray_ref[:cap]) and torch.equal(step, step_ref[:cap])
    assert torch.equal(complete, mask.sum(1).cumsum(0) <= cap)
    assert complete[0] and not complete[-1]
