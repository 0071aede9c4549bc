"""magic3d.py -- Magic3D (Lin et al., CVPR 2023): coarse-to-fine text-to-3D, a NeRF then a textured mesh.

Run:
    python magic3d.py --prompt "a green cone"                    # toy SD (data/toy_sd), CPU, both stages
    python magic3d.py --prompt "a green cone" --stage coarse     # the coarse stage only ...
    python magic3d.py --prompt "a green cone" --stage fine       # ... then the fine stage from its checkpoint
    python magic3d.py --preset paper --prompt "a DSLR photo of a corgi" \\
        --prior stabilityai/stable-diffusion-2-1-base            # a real latent diffusion model (a GPU;
                                                                  # 12.5 min on an H100, bench/RESULTS_magic3d.md)
    python magic3d.py --name run1 --resume --fine-iters 400      # continue a run (Ctrl-C saves a checkpoint)
Outputs in out/magic3d/<name>/: config.json, coarse.pt and fine.pt (checkpoints), coarse_*.mp4 and
fine_*.mp4 (colour / textureless / normals turntables of both stages), coarse_preview.png, preview.png,
mesh.obj / mesh.ply (the fine mesh, vertex colours from the texture field), metrics.json (per stage: loss,
toy-CLIP score and R-precision of held-out views; the mesh's size).

The script follows the paper (Sec. 4): the coarse stage (Sec. 4.1, a hash-grid field with an occupancy
grid, volume-rendered at low resolution, SDS with t in [0.02, 0.98]); the conversion (Sec. 4.2: the
coarse density on a tetrahedral grid becomes a signed distance, the coarse colour field the texture);
the fine stage (Sec. 4.2, DMTet: per-vertex SDF and bounded deformation, differentiable marching
tetrahedra, a differentiable rasteriser at high resolution, SDS with t in [0.02, 0.5], normal
consistency); evaluation and export of the textured mesh.

DEVIATION: the coarse prior is the same latent diffusion model as the fine one (paper: eDiff-I's
  pixel-space base model at 64 px; the open reimplementations use SD 2.1 base for both stages): the
  coarse render is upsampled and VAE-encoded inside common.DiffusionPrior.sds_loss.
DEVIATION: the coarse field is common.ObjectField, DreamFusion's: log-density + a Gaussian blob
  5 exp(-r^2 / (2 0.3^2)) + a constant bias through exp (paper: 10 (1 - r / 0.5) through softplus);
  normals from finite differences of the log-density, with DreamFusion's orientation and opacity losses.
DEVIATION: conversion: SDF = clamp(log(iso) - log(sigma), -1, 1) at the tet-grid vertices with a fixed
  --iso-level (open reimplementations: clamp(iso - sigma, -1, 1), iso = mean of the densities > 1e-5):
  the log-density is nearly linear over a cell, so marching tets puts the first surface where the
  coarse density crosses the iso-level, and this field's empty space (exp(bias) = 0.14) has no 1e-5 floor.
DEVIATION: the texture is queried at the rasterised surface points from the coarse field's hash grid
  and MLP (as the paper) and exported as vertex colours (no UV atlas).
DEVIATION: the CPU preset's fine stage learns the SDF at --lr-sdf 3e-3 with --lambda-normal 1e3 (the open
  reimplementations: Adam 1e-2 for everything, normal consistency 1e4; the paper preset uses those):
  with the toy SD, 1e-2 splits thin parts of the coarse shape into legs within 300 steps.
DEVIATION: the CPU preset (the default) renders the coarse stage at 32 px (upsampled to the toy SD's
  64 px) and the fine stage at 64 px on a tet grid of resolution 32, with a few hundred steps per stage.
DEVIATION: the CPU preset trains the coarse stage without the occupancy grid (--occupancy, on in the
  paper preset): with the toy SD it hurt, as in dreamfusion.py. "a red cube", seed 0: with the grid the
  coarse toy-CLIP score / R-precision were 0.770 / 0.50 and the mesh was read as a cylinder; without,
  0.842 / 0.875 and a cube. "a green cone": 0.787 / 0.75 with, 0.806 / 1.0 without.
RESULT (CPU preset, `--prompt "a green cone"`, 2 busy cores, the toy SD shipped in session 4): 3 min
  40 s wall in all (coarse 300 steps 109 s, fine 300 steps 56 s, the rest loading, conversion and
  export). Coarse: a green cone in a faint haze, toy-CLIP score 0.902, R-precision 1.0; fine: a green
  mesh with the cone's peak and a holed, ragged skin, toy-CLIP 0.780, R-precision 1.0;
  toyworld.classify calls the mesh "a green cone"
  (Chamfer: cone 0.056, cylinder 0.118, cube 0.129). With the first toy SD: 3 min 6 s on a quiet
  machine, coarse 0.806, fine 0.556. The fine stage mostly inherits the coarse shape: on the toy SD,
  300 steps at --lr-sdf 1e-2 split the base into legs, --lambda-normal 1e4 did not smooth it further.
  Without textureless steps (the default since session 8): 4 min 34 s wall beside a DreamFusion run
  (coarse 146 s, fine 57 s), coarse toy-CLIP 0.888, fine 0.849, R-precision 1.0 both; a green cone
  (cone 0.056, cylinder 0.109) with a smooth, closed skin (docs/magic3d_green_cone.png: the coarse
  NeRF's rows above, the fine mesh's below).
DEVIATION: no textureless steps with the toy SD, in either stage (--p-textureless 0; the paper preset
  keeps the paper's 0.375), as in dreamfusion.py: the toy SD has never seen a white object, so green
  objects thinned away in those steps and cubes lost their edges. --white-textureless-bg (off; not
  evaluated over the 30 captions) renders those steps over white instead.
RESULT (30 toy captions x seeds 0, 1, 2, H100, bench/eval_magic3d.py, session 8): 85/90 = 94.4% of the
  final meshes right (28, 28, 29 of 30; colour 90/90); R-precision coarse 0.53, fine 0.61. The misses:
  a green cube and a red cube read as cylinders, three cones as a sphere or cylinders. With textureless
  steps (p 0.375, sessions 4-7): 80/90 = 88.9%, the misses cubes read as cylinders and green objects
  thinned away (bench/RESULTS_magic3d.md).
The toy-CLIP figures above were judged by the shipped toy CLIP (--eval-clip toy). Since session 10 the
  default judge is the evaluation toy CLIP (toy-eval, trained with bumped objects; README, toy world):
  "a green cone" (CPU, seed 0, the same mesh of 2884 vertices) scores coarse 0.917, fine 0.890,
  R-precision 1.0 both; "a red sphere" 0.945 / 0.938, 1.0 both, its mesh read as a red sphere.
"""
import argparse
import json
import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ================================================================================================
# Config: every hyperparameter, one comment each. A preset fills them; explicit flags override.
# ================================================================================================
PRESETS = {
    # CPU-sized: the default, so `python magic3d.py` finishes both stages in minutes with the toy SD.
    # No occupancy grid here (see the DEVIATION line).
    "cpu": dict(size=32, n_samples=32, n_levels=8, log2_table=15, max_res=48, coarse_iters=300, albedo_iters=100,
                tet_res=32, fine_size=64, fine_iters=300, threads=1, occupancy=False),
    # The paper's setting (Sec. 4, 5): 64 px coarse renders for 10k steps, a 128^3 tet grid, 512 px fine
    # renders for 5k steps, guidance 100, fine-stage fov 30-45.
    "paper": dict(size=64, n_samples=128, n_levels=16, log2_table=19, max_res=2048, coarse_iters=10_000,
                  albedo_iters=2000, tet_res=128, fine_size=512, fine_iters=5000, threads=0, guidance=100.0,
                  fine_guidance=100.0, ambient=0.1, lambda_orient=1e-2, fd_eps=1e-2, fine_fov_min=30.0,
                  fine_fov_max=45.0, lambda_normal=1e4, lr_sdf=1e-2, video_size=256, compile=True,
                  p_textureless=0.375, preview_every=1000, ckpt_every=1000),
}
DEFAULTS = dict(
    prompt="a red cube",      # the text the object should match (a view suffix is appended per camera)
    prior="toy",              # diffusion prior: toy (data/toy_sd) | a diffusers folder | a cached hub id
    stage="all",              # coarse | fine (from the run's coarse.pt) | all (coarse, then fine)
    # --- coarse field (Sec. 4.1) ---
    n_levels=8,               # hash-grid levels L
    log2_table=15,            # log2 of the hash table size T per level
    base_res=16,              # coarsest grid resolution N_min
    max_res=48,               # finest grid resolution N_max
    width=32,                 # hidden width of the MLP after the hash grid
    blob=True,                # add the density blob near the origin (before the exp activation)
    blob_density=5.0,         # blob height: log-density + a exp(-r^2 / (2 s^2)) ...
    blob_radius=0.3,          # ... with s = this
    density_bias=-2.0,        # constant added to the log-density (empty space starts nearly clear)
    normals="fd",             # coarse normals: fd (central finite differences) | autograd
    fd_eps=0.03,              # finite-difference step (about one finest grid cell)
    normal_min_weight=1e-2,   # coarse normals only where the compositing weight exceeds this
    occupancy=True,           # skip empty space with an occupancy grid while training (Instant-NGP)
    grid_res=32,              # occupancy grid resolution over the cube
    grid_every=16,            # refresh the occupancy grid every this many steps
    # --- rendering and shading ---
    size=32,                  # coarse render size in pixels (square)
    n_samples=32,             # coarse stratified samples per ray inside the cube |x| <= 1
    shading=True,             # random lambertian / textureless shading (off: albedo only, both stages)
    albedo_iters=100,         # coarse stage: albedo-only shading for the first this many steps
    p_textureless=0.0,        # after that: P(textureless) (paper 0.375; toy SD: 0, see DEVIATION) ...
    p_lambertian=0.375,       # ... P(lambertian); albedo-only with the rest (fine stage: lambertian)
    ambient=0.3,              # ambient light in lambertian shading
    light_jitter=1.0,         # light = normalize(camera position + N(0, this^2 I))
    bg_net=True,              # background colour from a small MLP on the ray direction (off: white)
    p_random_bg=0.5,          # probability of a random solid background colour instead
    white_textureless_bg=False,  # coarse stage: textureless steps over white (colour words can't be met by the bg)
    # --- cameras (toy defaults: the toy SD's training distribution) ---
    radius_min=3.0,           # camera distance range ...
    radius_max=4.0,           # ...
    elev_min=-10.0,           # camera elevation range in degrees ...
    elev_max=80.0,            # ...
    fov_min=35.0,             # coarse-stage horizontal field of view range in degrees ...
    fov_max=45.0,             # ...
    fine_fov_min=35.0,        # fine-stage field of view range in degrees (paper 30-45) ...
    fine_fov_max=45.0,        # ...
    view_prompts=True,        # append "front / side / back / overhead view" to the prompt
    # --- score distillation ---
    guidance=30.0,            # coarse classifier-free guidance scale (paper 100; toy SD: see dreamfusion.py)
    t_min=0.02,               # coarse stage: t ~ U(t_min, t_max) ...
    t_max=0.98,               # ...
    fine_guidance=30.0,       # fine-stage guidance scale (paper 100)
    fine_t_min=0.02,          # fine stage: t ~ U(fine_t_min, fine_t_max) (Sec. 4.2: small t only) ...
    fine_t_max=0.5,           # ...
    # --- coarse regularisers and optimisation ---
    lambda_orient=0.1,        # orientation loss weight: sum stopgrad(w) max(0, n.d)^2
    lambda_opacity=1e-3,      # opacity loss weight: mean sqrt(opacity^2 + 0.01)
    coarse_iters=300,         # coarse-stage iterations (paper ~10k)
    lr=1e-2,                  # coarse Adam learning rate (eps 1e-15, betas 0.9 / 0.99)
    # --- conversion (Sec. 4.2) ---
    tet_res=32,               # tetrahedral grid: this many cubes per side of |x| <= 1 (paper 128), 6 tets each
    iso_level=5.0,            # coarse density iso-level: the first surface of the mesh
    # --- fine stage (DMTet) ---
    fine_size=64,             # fine render size in pixels (paper 512)
    deform=True,              # learn a bounded offset per grid vertex (off: the grid stays regular)
    deform_cells=0.5,         # offset bound: |offset| <= this many cells per axis, via tanh
    antialias=True,           # antialias silhouettes (the only gradient from the outline to the geometry)
    lambda_normal=1e3,        # normal-consistency loss weight: mean over edges of 1 - cos(n_f, n_g)
    fine_iters=300,           # fine-stage iterations (paper ~5k)
    lr_sdf=3e-3,              # fine Adam learning rate of the per-vertex SDF
    lr_deform=1e-2,           # ... of the per-vertex offsets (before tanh)
    lr_texture=1e-2,          # ... of the texture field (the coarse hash grid + MLP) and the background
    # --- evaluation and export ---
    n_eval=8,                 # held-out views (azimuths 360 (k + 1/2) / n) for the CLIP score
    eval_clip="toy-eval",     # CLIP for the evaluation (toy-eval: data/toy_clip_eval; empty: skip)
    video_frames=36,          # turntable frames
    video_size=64,            # turntable frame size in pixels
    keep_largest=True,        # export only the mesh's largest connected piece (drops floaters)
    preview_every=100,        # write a preview every this many steps
    ckpt_every=100,           # save a checkpoint every this many steps
    threads=1,                # CPU threads for torch (0: torch's default; small tensors run best on one)
    compile=False,            # CUDA speed path: prior as CUDA graphs; TF32, cuDNN autotuning, fused Adam
)
AABB = torch.tensor([[-1.0] * 3, [1.0] * 3])   # the scene is bounded in the cube |x|_inf <= 1
STAGES = ("coarse", "fine", "all")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="named hyperparameter set")
    common.add_config_flags(p, DEFAULTS, __file__)
    common.add_run_flags(p, default_name="default")
    args = p.parse_args(argv)
    cfg = common.resolve_config(args, DEFAULTS, PRESETS[args.preset])
    if cfg.stage not in STAGES:
        raise common.UserError(f"--stage must be one of {', '.join(STAGES)}, not {cfg.stage!r}")
    for lo, hi in (("t_min", "t_max"), ("fine_t_min", "fine_t_max")):
        if not 0 <= getattr(cfg, lo) < getattr(cfg, hi) <= 1:
            raise common.UserError(f"--{lo.replace('_', '-')} / --{hi.replace('_', '-')} must satisfy 0 <= min < max <= 1")
    if cfg.iso_level <= 0 or cfg.tet_res < 2:
        raise common.UserError("--iso-level must be > 0 and --tet-res >= 2")
    return cfg


def sample_view(cfg, device, fov):
    """A random camera (fov range `fov`), a light near it and a background (None: the bg net)."""
    cam = common.sample_cameras(1, (cfg.radius_min, cfg.radius_max), (cfg.elev_min, cfg.elev_max), fov=fov)
    light = common.random_light(cam["c2w"][0, :3, 3], cfg.light_jitter).to(device)
    bg = None if cfg.bg_net and random.random() >= cfg.p_random_bg else \
        (torch.rand(3) if cfg.bg_net else torch.ones(3)).to(device)
    return cam, light, bg


# ================================================================================================
# Coarse stage (Sec. 4.1): DreamFusion's recipe with a hash-grid field and an occupancy grid
# ================================================================================================
def build_field(cfg) -> common.ObjectField:
    """common.ObjectField: hash grid + MLP, log-density + blob a exp(-|x|^2 / (2 s^2)) + bias; albedo."""
    return common.ObjectField(cfg.n_levels, cfg.log2_table, cfg.base_res, cfg.max_res, cfg.width,
                              cfg.blob_density if cfg.blob else 0.0, cfg.blob_radius, cfg.density_bias,
                              cfg.normals, cfg.fd_eps)


def render_coarse(field, bg_net, cfg, c2w, fov, size, mode, light, bg=None, perturb=False, occupancy=None):
    """Volume rendering of one camera -> dict of (size, size, 3) images; bg None: the bg net."""
    return common.render_object_view(field, bg_net, c2w, fov, size, mode, light, cfg.n_samples, cfg.ambient,
                                     cfg.normal_min_weight, cfg.lambda_orient > 0, bg, perturb, occupancy)


def train_coarse(cfg, run, prior, device):
    common.seed_everything(cfg.seed)
    field, bg_net = build_field(cfg).to(device), common.Background().to(device)
    opt = torch.optim.Adam(list(field.parameters()) + list(bg_net.parameters()), lr=cfg.lr, betas=(0.9, 0.99),
                           eps=1e-15, fused=cfg.compile and torch.device(device).type == "cuda")
    # a cell is empty when one step through it would absorb < 1% (alpha = 1 - exp(-sigma dt))
    grid = common.OccupancyGrid(AABB, cfg.grid_res, threshold=0.01 * cfg.n_samples / 2).to(device)
    start, elapsed, curve = 0, 0.0, []
    if cfg.resume and run.exists("coarse.pt"):
        ck = run.load_checkpoint("coarse.pt")   # on the CPU, where the RNG state must stay; load_state_dict copies
        field.load_state_dict(ck["field"]), bg_net.load_state_dict(ck["bg"]), opt.load_state_dict(ck["opt"])
        grid.load_state_dict(ck["grid"])
        start, elapsed, curve = ck["step"], ck["elapsed"], ck["curve"]
        common.set_rng_state(ck["rng"])
    elif cfg.resume:
        raise common.UserError(f"--resume: no coarse.pt in {run.path}")
    elif run.exists("coarse.pt"):
        raise common.UserError(f"{run.path} already holds a run: pass --resume to continue it or --name for a new one")
    run.write_json("config.json", vars(cfg))

    def checkpoint(step):
        run.save_checkpoint({"field": field.state_dict(), "bg": bg_net.state_dict(), "opt": opt.state_dict(),
                             "grid": grid.state_dict(), "step": step, "elapsed": elapsed, "curve": curve,
                             "rng": common.rng_state()}, "coarse.pt")

    ctrl_c = common.CtrlC()       # Ctrl-C finishes the step, saves a checkpoint and exits
    bar = common.progress(range(start, cfg.coarse_iters), initial=start, total=cfg.coarse_iters, desc="magic3d coarse")
    step = start
    for step in range(start, cfg.coarse_iters):
        t0 = time.perf_counter()
        # --- 1. a random camera, a light near it, a shading mode (albedo-only at first), a background ---
        cam, light, bg = sample_view(cfg, device, (cfg.fov_min, cfg.fov_max))
        mode = common.pick_shading(step, cfg.albedo_iters, cfg.p_textureless, cfg.p_lambertian, random.random(),
                                   cfg.shading)
        if mode == "textureless" and cfg.white_textureless_bg:
            bg = torch.ones(3, device=device)
        # --- 2. volume-render at low resolution, skipping empty space ---
        out = render_coarse(field, bg_net, cfg, cam["c2w"][0].to(device), cam["fov"].item(), cfg.size, mode,
                            light, bg, perturb=True, occupancy=grid if cfg.occupancy else None)
        image = out["rgb"].permute(2, 0, 1)[None]                                    # (1, 3, S, S)
        # --- 3. score distillation, t in [0.02, 0.98], view-dependent prompt ---
        el, az = (cam["elevation"].item(), cam["azimuth"].item()) if cfg.view_prompts else (None, None)
        sds, info = prior.sds_loss(image, cfg.prompt, el, az, guidance=cfg.guidance, t_range=(cfg.t_min, cfg.t_max))
        # --- 4. regularisers: orientation, opacity ---
        opacity = torch.sqrt(out["opacity"] ** 2 + 0.01).mean()
        loss = sds + cfg.lambda_orient * out["orient"] + cfg.lambda_opacity * opacity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # checked after the step, so the host queues the backward pass without waiting for the forward one;
        # a non-finite loss still stops the run before any checkpoint holds the step's parameters
        common.check_finite(loss, step)
        if cfg.occupancy and (step + 1) % cfg.grid_every == 0:    # NGP: EMA of the density, new mask
            grid.update(field.density)
        elapsed += time.perf_counter() - t0
        step += 1
        # --- 5. log, preview, checkpoint ---
        loss_, t_, opacity_ = torch.stack([loss.detach(), info["t"][0].float(),
                                           out["opacity"].detach().mean()]).tolist()          # one transfer
        curve.append({"step": step, "loss": loss_, "t": t_, "mode": mode, "opacity": opacity_})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_:.2f}", opacity=f"{opacity_:.2f}", mode=mode[:4], refresh=False)
        if step % cfg.preview_every == 0:
            common.save_image(run.file("coarse_preview.png"), preview(coarse_renderer(field, bg_net, cfg), cfg.size, device))
        if step % cfg.ckpt_every == 0 or ctrl_c.hit:
            checkpoint(step)
        if ctrl_c.hit:
            break
    bar.close()
    checkpoint(step)
    ctrl_c.close(run, step)
    return field, bg_net, start, step, elapsed, curve


def coarse_renderer(field, bg_net, cfg):
    """render(c2w, fov, size, mode, light, bg) -> images of the coarse field (for eval and export)."""
    return lambda c2w, fov, size, mode, light, bg: render_coarse(field, bg_net, cfg, c2w, fov, size, mode, light, bg)


# ================================================================================================
# Conversion (Sec. 4.2): the coarse density on a tetrahedral grid becomes DMTet's signed distance
# ================================================================================================
class DMTet(nn.Module):
    """DMTet (Shen et al. 2021) as Magic3D's fine geometry: a tetrahedral grid over `aabb` whose vertices
    carry a learnable signed distance s_i (negative inside) and a learnable offset, bounded by tanh:
        v_i = g_i + deform_cells * cell * tanh(delta_i)                              (DMTet Eq. 1)
    The surface is marching_tets(v, s) (common.py): differentiable w.r.t. s and v."""

    def __init__(self, res: int, sdf: torch.Tensor = None, deform_cells: float = 0.5, aabb=AABB):
        super().__init__()
        verts, tets = common.tet_grid(res, aabb)
        self.register_buffer("grid_verts", verts)                                   # (V, 3)
        self.register_buffer("tets", tets)                                          # (T, 4)
        self.register_buffer("cell", (aabb[1] - aabb[0]) / res)                     # (3,) cell size
        self.deform_cells = deform_cells
        self.sdf = nn.Parameter(torch.zeros(len(verts)) if sdf is None else sdf.clone())   # (V,)
        self.offset = nn.Parameter(torch.zeros_like(verts))                         # (V, 3)

    def vertices(self) -> torch.Tensor:
        """Deformed grid vertices (V, 3): each within deform_cells cells of its place on the grid."""
        return self.grid_verts + self.deform_cells * self.cell * torch.tanh(self.offset)

    def forward(self):
        """The surface: mesh vertices (M, 3) and faces (K, 3), wound outwards."""
        return common.marching_tets(self.vertices(), self.sdf, self.tets)


@torch.no_grad()
def density_to_sdf(field, points: torch.Tensor, iso_level: float, chunk: int = 2 ** 16) -> torch.Tensor:
    """The coarse field's density at points (V, 3) -> an SDF (V,), negative where sigma > iso_level:
        s = clamp(log(iso_level) - log sigma, -1, 1)
    (the open reimplementations clamp iso - sigma; see the DEVIATION in the header)."""
    log_sigma = torch.cat([field.log_density(points[i:i + chunk]) for i in range(0, len(points), chunk)])
    return (math.log(iso_level) - log_sigma).clamp(-1.0, 1.0)


def convert(field, cfg, device) -> DMTet:
    """Sec. 4.2: a DMTet grid whose SDF is initialised from the coarse density."""
    dmtet = DMTet(cfg.tet_res, deform_cells=cfg.deform_cells if cfg.deform else 0.0).to(device)
    dmtet.sdf.data = density_to_sdf(field, dmtet.grid_verts, cfg.iso_level)
    if not (dmtet.sdf < 0).any():
        raise common.UserError(f"the coarse density never exceeds --iso-level {cfg.iso_level}: no surface to "
                               "refine (lower --iso-level or train the coarse stage longer)")
    return dmtet


# ================================================================================================
# Fine stage (Sec. 4.2): rasterise the DMTet mesh, texture at the surface points, shade, SDS
# ================================================================================================
def render_mesh(verts, faces, field, bg_net, cfg, c2w, fov, size, mode, light, bg=None):
    """Rasterise a mesh verts (M, 3), faces (K, 3) seen by c2w (4, 4) -> dict of (size, size, 3) images
    (rgb, and for mode "all" also lambertian, textureless, normals) and the coverage mask (size, size)."""
    focal = common.focal_from_fov(fov, size)
    clip = common.project_to_clip(verts, c2w[None], focal, size, size)             # (1, M, 4)
    rast = common.rasterize(clip, faces, size, size)                               # (1, S, S, 4)
    hit = rast[0, ..., 3] > 0                                                      # (S, S)
    pos = common.interpolate(verts, rast, faces)[0]                                # (S, S, 3) surface points
    nrm = F.normalize(common.interpolate(common.vertex_normals(verts, faces), rast, faces)[0], dim=-1)
    # texture: the coarse colour field queried at the surface points
    albedo = torch.zeros(size, size, 3, device=verts.device).masked_scatter(hit[..., None].expand(size, size, 3),
                                                                              field.albedo(pos[hit]))
    _, rays_d = common.get_rays(size, size, focal, c2w)
    background = bg_net(rays_d.reshape(-1, 3)).view(size, size, 3) if bg is None else bg.expand(size, size, 3)

    def finish(img):   # composite over the background, then antialias the silhouettes
        img = torch.where(hit[..., None], img, background)
        return common.antialias(img[None], rast, clip, faces)[0] if cfg.antialias else img

    def shaded(m):
        return finish(common.shade(albedo.view(-1, 3), nrm.view(-1, 3), light, m, cfg.ambient).view(size, size, 3))

    out = {"mask": hit.float()}
    if mode == "all":
        out.update({m: shaded(m) for m in ("lambertian", "textureless")})
        out["normals"] = finish((nrm + 1) / 2)
        mode = "albedo"
    out["rgb"] = shaded(mode)
    return out


def train_fine(cfg, run, prior, device, field, bg_net):
    common.seed_everything(cfg.seed + 1)     # the same fine stage whether run after the coarse one or alone
    dmtet = convert(field, cfg, device)
    opt = torch.optim.Adam([{"params": [dmtet.sdf], "lr": cfg.lr_sdf},
                            {"params": [dmtet.offset], "lr": cfg.lr_deform},
                            {"params": list(field.parameters()) + list(bg_net.parameters()), "lr": cfg.lr_texture}],
                           betas=(0.9, 0.99), eps=1e-15,
                           fused=cfg.compile and torch.device(device).type == "cuda")
    start, elapsed, curve = 0, 0.0, []
    if cfg.resume and run.exists("fine.pt"):
        ck = run.load_checkpoint("fine.pt")
        dmtet.load_state_dict(ck["dmtet"]), field.load_state_dict(ck["field"]), bg_net.load_state_dict(ck["bg"])
        opt.load_state_dict(ck["opt"])
        start, elapsed, curve = ck["step"], ck["elapsed"], ck["curve"]
        common.set_rng_state(ck["rng"])
    elif run.exists("fine.pt"):
        raise common.UserError(f"{run.path} already holds a fine stage: pass --resume to continue it or --name for a new run")

    def checkpoint(step):
        run.save_checkpoint({"dmtet": dmtet.state_dict(), "field": field.state_dict(), "bg": bg_net.state_dict(),
                             "opt": opt.state_dict(), "step": step, "elapsed": elapsed, "curve": curve,
                             "rng": common.rng_state()}, "fine.pt")

    ctrl_c = common.CtrlC()
    bar = common.progress(range(start, cfg.fine_iters), initial=start, total=cfg.fine_iters, desc="magic3d fine")
    step = start
    for step in range(start, cfg.fine_iters):
        t0 = time.perf_counter()
        # --- 1. a random camera, a light near it, lambertian (or textureless) shading, a background ---
        cam, light, bg = sample_view(cfg, device, (cfg.fine_fov_min, cfg.fine_fov_max))
        mode = "textureless" if cfg.shading and random.random() < cfg.p_textureless else "lambertian" if cfg.shading else "albedo"
        # --- 2. extract the mesh (marching tets), rasterise at high resolution, texture, shade ---
        verts, faces = dmtet()
        if len(faces) == 0:
            raise common.UserError(f"the mesh vanished at fine step {step}; lower --lr-sdf or raise --lambda-normal")
        out = render_mesh(verts, faces, field, bg_net, cfg, cam["c2w"][0].to(device), cam["fov"].item(),
                          cfg.fine_size, mode, light, bg)
        image = out["rgb"].permute(2, 0, 1)[None]                                    # (1, 3, S, S)
        # --- 3. score distillation in the latent space, t in [0.02, 0.5] ---
        el, az = (cam["elevation"].item(), cam["azimuth"].item()) if cfg.view_prompts else (None, None)
        sds, info = prior.sds_loss(image, cfg.prompt, el, az, guidance=cfg.fine_guidance,
                                   t_range=(cfg.fine_t_min, cfg.fine_t_max))
        # --- 4. normal consistency: neighbouring faces should agree ---
        normal = common.normal_consistency_loss(verts, faces)
        loss = sds + cfg.lambda_normal * normal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        common.check_finite(loss, step)
        elapsed += time.perf_counter() - t0
        step += 1
        # --- 5. log, preview, checkpoint ---
        loss_, sds_, normal_, t_ = torch.stack([loss.detach(), sds.detach(), normal.detach(),
                                                info["t"][0].float()]).tolist()
        curve.append({"step": step, "loss": loss_, "sds": sds_, "normal": normal_, "t": t_, "mode": mode,
                      "faces": len(faces)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_:.2f}", normal=f"{normal_:.3f}", faces=len(faces), refresh=False)
        if step % cfg.preview_every == 0:
            common.save_image(run.file("preview.png"), preview(mesh_renderer(verts, faces, field, bg_net, cfg), cfg.fine_size, device))
        if step % cfg.ckpt_every == 0 or ctrl_c.hit:
            checkpoint(step)
        if ctrl_c.hit:
            break
    bar.close()
    checkpoint(step)
    ctrl_c.close(run, step)
    return dmtet, start, step, elapsed, curve


def mesh_renderer(verts, faces, field, bg_net, cfg):
    """render(c2w, fov, size, mode, light, bg) -> images of a fixed mesh (for eval and export)."""
    verts = verts.detach()
    return lambda c2w, fov, size, mode, light, bg: render_mesh(verts, faces, field, bg_net, cfg, c2w, fov, size,
                                                               mode, light, bg)


# ================================================================================================
# Evaluation and export: held-out views, CLIP score / R-precision, turntables, the textured mesh
# ================================================================================================
@torch.no_grad()
def eval_views(render, device, n, size, elevation=20.0, radius=3.5, fov=40.0):
    """n views at azimuths 360 (k + 1/2) / n on white, light above the camera: dict of (n, S, S, 3)."""
    views = []
    for k in range(n):
        az = 360.0 * (k + 0.5) / n
        c2w = common.pose_spherical(radius, elevation, az).to(device)
        light = F.normalize(common.spherical_to_cartesian(1.0, elevation + 30.0, az), dim=-1).to(device)
        views.append(render(c2w, fov, size, "all", light, torch.ones(3, device=device)))
    return {k: torch.stack([v[k] for v in views]) for k in ("rgb", "lambertian", "textureless", "normals")}


def preview(render, size, device, n=4):
    """Rows: lambertian colour, textureless, normals of n views -> (3 S, n S, 3)."""
    v = eval_views(render, device, n, size)
    return torch.cat([v[k].permute(1, 0, 2, 3).reshape(size, n * size, 3) for k in ("lambertian", "textureless", "normals")])


@torch.no_grad()
def evaluate(render, cfg, device):
    """Toy-CLIP score (mean cosine of held-out lambertian views with the prompt) and R-precision among
    the toy captions."""
    if not cfg.eval_clip:
        return {"clip": "skipped (--eval-clip empty)"}
    ev = common.CLIPPrior(cfg.eval_clip, device=device, flag="--eval-clip")
    images = eval_views(render, device, cfg.n_eval, 64)["lambertian"].permute(0, 3, 1, 2)
    return common.caption_metrics(ev, images, cfg.prompt, common.toy_captions(cfg.eval_clip))


@torch.no_grad()
def export(cfg, run, device, stage, render, step, elapsed, curve, mesh=None):
    """Turntables <stage>_{colour,textureless,normals}.mp4, a preview, the stage's metrics and (fine) the
    mesh with vertex colours from the texture field. mesh: (verts, faces, colour function) or None."""
    frames = {k: [] for k in ("lambertian", "textureless", "normals")}
    for az in torch.linspace(-180, 180, cfg.video_frames + 1)[:-1].tolist():
        c2w = common.pose_spherical(3.5, 20.0, az).to(device)
        light = F.normalize(common.spherical_to_cartesian(1.0, 50.0, az), dim=-1).to(device)
        v = render(c2w, 40.0, cfg.video_size, "all", light, torch.ones(3, device=device))
        for k in frames:
            frames[k].append(v[k])
    for k, name in (("lambertian", "colour"), ("textureless", "textureless"), ("normals", "normals")):
        common.save_video(run.file(f"{stage}_{name}.mp4"), frames[k])
    common.save_image(run.file("coarse_preview.png" if stage == "coarse" else "preview.png"),
                      preview(render, cfg.video_size, device))
    last = curve[-20:]
    m = {"iterations": step, "train_seconds": round(elapsed, 1),
         "final_loss": sum(c["loss"] for c in last) / max(len(last), 1), **evaluate(render, cfg, device)}
    if mesh is not None:
        verts, faces, colour_fn = mesh
        colours = colour_fn(verts)
        common.save_ply(run.file("mesh.ply"), verts, colours, faces)
        common.save_obj(run.file("mesh.obj"), verts, faces, colours)
        m["mesh"] = {"vertices": len(verts), "faces": len(faces)}
    metrics = {}
    if run.exists("metrics.json"):
        with open(run.file("metrics.json")) as f:
            metrics = json.load(f)
    metrics[stage] = m
    run.write_json("metrics.json", metrics)
    print(f"{stage}: {step} iterations in {elapsed:.0f} s; CLIP score {m.get('clip_score', float('nan')):.3f}, "
          f"R-precision {m.get('r_precision', 'n/a')} -> {run.path}")
    return m


def load_coarse(cfg, run, device):
    """The coarse field and background of a finished coarse stage (coarse.pt in the run folder)."""
    if not run.exists("coarse.pt"):
        raise common.UserError(f"--stage fine needs the coarse stage's checkpoint {run.file('coarse.pt')}: "
                               "run --stage coarse (or all) first with the same --name")
    ck = run.load_checkpoint("coarse.pt")
    field, bg_net = build_field(cfg).to(device), common.Background().to(device)
    field.load_state_dict(ck["field"]), bg_net.load_state_dict(ck["bg"])
    return field, bg_net


def main(argv=None):
    with common.cli_errors():
        cfg = parse_args(argv)
        device = common.pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.compile and device.type == "cuda":   # the speed path: TF32 matmuls, cuDNN's fastest conv kernels
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        common.check_prior_prompt(cfg.prior, cfg.prompt)   # a bad prompt stops here, nothing written
        prior = common.DiffusionPrior(cfg.prior, device=device)
        if cfg.compile:
            prior.compile()
        run_stages(cfg, prior, device)


def run_stages(cfg, prior, device):
    """The stages --stage names, each trained (or resumed) and exported into the run folder."""
    run = common.RunDir(cfg.out, "magic3d", cfg.name)
    if cfg.stage in ("coarse", "all"):
        field, bg_net, start, step, elapsed, curve = train_coarse(cfg, run, prior, device)
        if start < step or not run.exists("coarse_preview.png"):
            field.eval()
            export(cfg, run, device, "coarse", coarse_renderer(field, bg_net, cfg), step, elapsed, curve)
    else:
        field, bg_net = load_coarse(cfg, run, device)
    if cfg.stage in ("fine", "all"):
        dmtet, start, step, elapsed, curve = train_fine(cfg, run, prior, device, field, bg_net)
        with torch.no_grad():
            verts, faces = dmtet()
        if cfg.keep_largest:
            verts, faces = common.largest_component(verts, faces)
        export(cfg, run, device, "fine", mesh_renderer(verts, faces, field, bg_net, cfg), step, elapsed, curve,
               mesh=(verts, faces, field.albedo))


if __name__ == "__main__":
    main()
