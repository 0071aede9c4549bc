"""Tests for magic3d.py: density -> SDF conversion, the bounded deformation, the fine-stage render and
a short fine-stage run with the toy SD, the CLI (bad prompt, --help, --stage fine and --resume).
The rasteriser and marching tetrahedra have their own parity tests in tests/test_geometry.py."""
import math
import os
import subprocess
import sys

import torch

import common
import magic3d as m3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n-levels", "4", "--log2-table", "12", "--max-res", "32", "--size", "16", "--n-samples", "16",
         "--tet-res", "16", "--fine-size", "32"]


def small_cfg(*flags):
    return m3.parse_args(SMALL + list(flags))


def blob_field(cfg):
    """A field whose network outputs zero: log-density = blob + bias exactly, albedo = sigmoid(0) = 0.5."""
    torch.manual_seed(0)
    field = m3.build_field(cfg)
    with torch.no_grad():
        field.net[-1].weight.zero_(), field.net[-1].bias.zero_()
    return field


def test_conversion_of_a_blob_gives_a_sphere_of_the_iso_radius():
    # log sigma = a exp(-r^2 / (2 s^2)) + b crosses log(iso) at r* = s sqrt(2 ln(a / (log(iso) - b)))
    a, s, b, iso = 10.0, 0.3, -2.0, 10.0
    cfg = small_cfg("--blob-density", str(a), "--blob-radius", str(s), "--density-bias", str(b),
                    "--iso-level", str(iso), "--tet-res", "32")
    dmtet = m3.convert(blob_field(cfg), cfg, "cpu")
    verts, faces = dmtet()
    r_star = s * math.sqrt(2 * math.log(a / (math.log(iso) - b)))
    r = verts.norm(dim=-1)
    cell = 2.0 / 32
    assert abs(r.mean().item() - r_star) < 0.05 * cell and (r - r_star).abs().max() < 0.2 * cell
    # the SDF is negative inside, clamped to [-1, 1], and the faces wind outwards (normals along x)
    g = dmtet.grid_verts.norm(dim=-1)
    assert (dmtet.sdf[g < r_star - cell] < 0).all() and (dmtet.sdf[g > r_star + cell] > 0).all()
    assert dmtet.sdf.abs().max() <= 1.0
    fn = common.face_normals(verts, faces)
    assert ((fn * verts[faces].mean(1)).sum(-1) > 0).all()


def test_conversion_refuses_a_density_below_the_iso_level():
    cfg = small_cfg("--iso-level", "1e6")
    try:
        m3.convert(blob_field(cfg), cfg, "cpu")
    except common.UserError as e:
        assert "--iso-level" in str(e)
    else:
        raise AssertionError("no UserError")


def test_deformation_is_bounded_by_the_cell_fraction():
    dmtet = m3.DMTet(4, deform_cells=0.5)
    with torch.no_grad():
        dmtet.offset.copy_(torch.randn(dmtet.offset.shape, generator=torch.Generator().manual_seed(0)) * 100)
    moved = (dmtet.vertices() - dmtet.grid_verts).abs()
    cell = 2.0 / 4
    assert moved.max() <= 0.5 * cell + 1e-6
    assert moved.max() > 0.49 * cell                                   # the bound is reached, not smaller
    assert torch.equal(m3.DMTet(4, deform_cells=0.0).vertices(), dmtet.grid_verts)   # --no-deform
    # small offsets move a vertex by deform_cells * cell * offset (tanh'(0) = 1)
    with torch.no_grad():
        dmtet.offset.fill_(1e-3)
    assert torch.allclose(dmtet.vertices() - dmtet.grid_verts, torch.full((125, 3), 0.5 * cell * 1e-3), atol=1e-6)


def test_fine_render_covers_the_sphere_and_passes_gradient_to_sdf_offsets_and_texture():
    cfg = small_cfg("--blob-density", "10")
    field = blob_field(cfg)
    dmtet = m3.convert(field, cfg, "cpu")
    verts, faces = dmtet()
    r = verts.norm(dim=-1).mean().item()
    size, fov, dist = 32, 40.0, 3.5
    c2w = common.pose_spherical(dist, 10.0, 30.0)
    out = m3.render_mesh(verts, faces, field, common.Background(), cfg, c2w, fov, size, "lambertian",
                         torch.tensor([0.0, 0.0, 1.0]), torch.ones(3))
    # the sphere's silhouette: a disc of radius f tan(asin(r / d)) pixels
    f = common.focal_from_fov(fov, size)
    disc = math.pi * (f * math.tan(math.asin(r / dist))) ** 2
    assert abs(out["mask"].sum().item() - disc) < 0.15 * disc
    assert torch.equal(out["rgb"][0, 0], torch.ones(3))                # background pixel: white
    out["rgb"][..., 0].sum().backward()
    for p in (dmtet.sdf, dmtet.offset, field.net[-1].weight):      # (the blob field's last layer is zero)
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def fixed_sds(prior, cfg, dmtet, field, bg, prompt, n=6):
    """The mean SDS loss of n fixed (camera, t, noise) draws: a deterministic measure of the fine stage."""
    with torch.no_grad():
        verts, faces = dmtet()
        total = 0.0
        for k in range(n):
            c2w = common.pose_spherical(3.5, 20.0, 360.0 * k / n)
            out = m3.render_mesh(verts, faces, field, bg, cfg, c2w, 40.0, cfg.fine_size, "lambertian",
                                 torch.tensor([0.0, 0.0, 1.0]), torch.ones(3))
            loss, _ = prior.sds_loss(out["rgb"].permute(2, 0, 1)[None], prompt, 20.0, 360.0 * k / n,
                                     guidance=cfg.fine_guidance, t_range=(cfg.fine_t_min, cfg.fine_t_max),
                                     generator=torch.Generator().manual_seed(k))
            total += loss.item() / n
    return total, len(faces)


def test_short_fine_stage_lowers_its_loss_and_keeps_a_mesh(tmp_path):
    """A grey blob turned into "a red sphere" by 40 fine steps (toy SD, 32 px): the SDS loss of fixed
    draws goes down and the mesh is still there."""
    torch.set_num_threads(1)
    cfg = small_cfg("--prompt", "a red sphere", "--blob-density", "10", "--fine-iters", "40",
                    "--preview-every", "1000", "--ckpt-every", "1000")
    prior = common.DiffusionPrior("toy")
    field, bg = blob_field(cfg), common.Background()
    before, faces0 = fixed_sds(prior, cfg, m3.convert(field, cfg, "cpu"), field, bg, cfg.prompt)
    run = common.RunDir(str(tmp_path), "magic3d", "fine")
    dmtet, start, step, elapsed, curve = m3.train_fine(cfg, run, prior, "cpu", field, bg)
    after, faces1 = fixed_sds(prior, cfg, dmtet, field, bg, cfg.prompt)
    assert step == 40 and len(curve) == 40 and all(math.isfinite(c["loss"]) for c in curve)
    assert after < 0.7 * before, (before, after)
    assert faces1 > 0.5 * faces0
    assert run.exists("fine.pt")


def test_help_lists_every_config_flag():
    r = subprocess.run([sys.executable, "magic3d.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for k in m3.DEFAULTS:
        assert "--" + k.replace("_", "-") in r.stdout, k


def test_bad_prompt_exits_2_with_one_line_and_writes_nothing(tmp_path):
    cmd = [sys.executable, "magic3d.py", "--prompt", "a corgi on a skateboard", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "corgi" in lines[0] and "--prior" in lines[0]
    assert os.listdir(tmp_path) == []


def test_fine_stage_from_the_coarse_checkpoint_and_resume_match_one_straight_run(tmp_path):
    tiny = SMALL + ["--albedo-iters", "1", "--video-frames", "2", "--video-size", "16", "--eval-clip", "",
                    "--out", str(tmp_path), "--threads", "1", "--coarse-iters", "2"]
    m3.main(tiny + ["--name", "straight", "--fine-iters", "3"])
    m3.main(tiny + ["--name", "split", "--stage", "coarse"])
    m3.main(tiny + ["--name", "split", "--stage", "fine", "--fine-iters", "2"])
    m3.main(tiny + ["--name", "split", "--stage", "fine", "--fine-iters", "3", "--resume"])
    a = torch.load(tmp_path / "magic3d" / "straight" / "fine.pt", weights_only=False)
    b = torch.load(tmp_path / "magic3d" / "split" / "fine.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for part in ("dmtet", "field"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert [c["loss"] for c in a["curve"]] == [c["loss"] for c in b["curve"]]
    for f in ("config.json", "coarse.pt", "coarse_colour.mp4", "fine_colour.mp4", "fine_normals.mp4", "mesh.obj",
              "mesh.ply", "metrics.json", "preview.png", "coarse_preview.png"):
        assert (tmp_path / "magic3d" / "straight" / f).exists(), f
    # a second run into the same folder without --resume is refused
    try:
        m3.main(tiny + ["--name", "straight"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("no exit 2")
