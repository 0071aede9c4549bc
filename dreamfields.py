"""dreamfields.py -- Dream Fields (Jain et al., CVPR 2022): a NeRF optimised until CLIP matches it to a caption.

Run:
    python dreamfields.py --prompt "a blue torus"             # toy CLIP, CPU preset: ~3 min on 2 busy cores
    python dreamfields.py --prompt "a blue torus" --ablate    # each trick off in turn -> ablation.png/.md/.json
    python dreamfields.py --preset paper --clip ViT-B-16 --pretrained openai \\
        --eval-clip ViT-B-32 --eval-pretrained openai --prompt "a bouquet of flowers"   # the paper (a GPU)
    python dreamfields.py --name run1 --resume --iters 600    # continue a run (Ctrl-C saves a checkpoint)
Outputs in out/dreamfields/<name>/: config.json, checkpoint.pt, preview/ and views.png, turntable.mp4,
mesh.ply/.obj, metrics.json (CLIP score at the start and the end, R-precision over held-out views).
Measured (CPU preset, seed 0, 2 shared cores, --threads 1): CLIP score 0.48 -> 0.95, R-precision 1.0,
2 min 1 s to 2 min 51 s wall (3 min 31 s with a second run beside it); the toy CLIP already ranks the
untrained haze "a blue torus" first, so read caption_margin (0.09 -> 0.56) too. Over all 30 toy captions
(bench/eval_dreamfields.py, default settings, GPU) the R-precision is 0.97 (0.99 in another run), the
meshes' colours are right for 27 and their shapes for 17: spheres, cylinders, cones yes, cubes come out
rounded, tori flat (bench/RESULTS_dreamfields.md).
The object is NOT a recognisable torus: views.png shows a flat blue blob without a hole. The toy CLIP is
the limit: from the paper's 30-degree elevation it scores a torus with its hole filled (a flat disc)
0.94 and the true torus 0.91 (toyworld renders, 8 views, 32 px), so nothing rewards a hole (from 60
degrees: disc 0.27, torus 0.84). No preset variant we tried (48 px, hash grid, 6 frequencies, 16 crops
of 0.75, white backgrounds, training elevations U(20, 60) or U(50, 60), 1000 iterations) made the hole;
RESULTS_dreamfields.md has the pictures. A toy CLIP trained with hole-less decoys would be needed.

The script follows the paper: the field (a NeRF whose colour depends on position only, bounded in
|x| <= 1), pose sampling, rendering with jittered samples, the CLIP objective over augmented crops
(random backgrounds, random crops), the transmittance loss (sparsity), origin tracking (localisation),
the training loop (Adam with an exponential warm-up), evaluation (CLIP score, R-precision) and export.

DEVIATION: positions are encoded by NeRF's positional encoding (common.positional_encoding), not by
  mip-NeRF's integrated encoding over random Fourier features.
DEVIATION: the CPU preset (the default) renders 32 px with 48 samples per ray (paper: 88-252 px,
  192 samples), a 2-block MLP of width 64 (paper: 4 blocks of width 128/256), 300 iterations with
  lr 5e-4 -> 2e-3 over 100 steps, the transmittance target annealed over 150 steps and an origin EMA
  decay of 0.99 (paper: 1e-5 -> 1e-4 over 1500, tau over 500, 0.999, 10k iterations), so that it
  finishes in minutes with the toy CLIP. `--preset paper` has the paper's values.
NOTE: the CPU preset runs torch on one thread (--threads 1): its tensors are small, and on a busy
  2-core machine the synchronisation of two threads cost us 10-30x more than it saved.
DEVIATION: the MLP's head is LayerNorm -> Dense(4) (official: Dense 128 -> Dense 4); with the short
  CPU schedule the unnormalised head filled the whole cube with haze.
NOTE: --elevation-jitter (training elevations U(elevation -+ jitter)) is off in both presets (the paper
  fixes 30 degrees); it is there for priors that see shapes better from above.
NOTE: --amp (bf16 autocast), --compile (torch.compile of the field, and of CLIP's image tower replayed
  as CUDA graphs) and --checkpoint (recompute each ray chunk in the backward pass) are GPU speed and
  memory switches, off by default; bench/bench_dreamfields.py times them at the paper's 168 px.
DEVIATION: --occupancy (off by default) adds Instant-NGP's occupancy grid (common.OccupancyGrid, the
  density's moving maximum on a 64^3 grid, refreshed every 16 steps) with NGP's rule: samples in cells
  whose density x sample spacing stayed below --grid-thickness 0.01 skip the field. A GPU speed switch:
  in a paper-preset run on an H100 (with --amp --compile) the grid is 13-15% occupied after ~1500 steps
  and a step drops from ~125 to 25-31 ms: 10k iterations in 6.9 min, compilation included (the host's
  kernel launches, not the GPU's ~14 ms of work, set the pace; bench/RESULTS_dreamfields.md). On the
  CPU preset ("a blue torus", seed 0) it changes little (CLIP score 0.930 vs 0.948, R-precision 1.0
  both) and saves nothing (132 s vs 112 s of training).
DEVIATION: samples are drawn only where a ray is inside the cube |x| <= 1 (the density outside is
  zero, so the rendering is the same) and each is given the bin width as its interval.
DEVIATION: R-precision captions are the toy world's 30 captions (from the eval CLIP folder) or a file
  given by --captions (the paper: 153 object-centric COCO captions); "held-out" views are fixed
  azimuths 360 (k + 1/2) / n, which random training azimuths never hit exactly.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import common

# ================================================================================================
# Config: every hyperparameter, one comment each. A preset fills them; explicit flags override.
# ================================================================================================
PRESETS = {
    # CPU-sized: the default, so `python dreamfields.py` finishes in minutes with the toy CLIP.
    "cpu": dict(size=32, n_samples=48, width=64, n_blocks=2, n_freqs=4, iters=300, lr_start=5e-4, lr_end=2e-3,
                warmup_steps=100, tau_steps=150, n_crops=8, crop_frac=0.9, origin_decay=0.99, mesh_res=64,
                threads=1),
    # The paper's "low quality" setting (official defaults): 88 px renders, 80 px crops, 192 samples.
    "paper": dict(size=88, crop_frac=80 / 88, n_samples=192, width=128, n_blocks=4, n_freqs=8, iters=10_000,
                  lr_start=1e-5, lr_end=1e-4, warmup_steps=1500, tau_steps=500, n_crops=8, origin_decay=0.999,
                  mesh_res=128, threads=0),
}
DEFAULTS = dict(
    prompt="a blue torus",    # the caption the object should match
    clip="toy",               # CLIP for the loss: toy (data/toy_clip) | a folder | an open_clip architecture
    pretrained="",            # pretrained tag or checkpoint file for --clip (e.g. openai)
    eval_clip="",             # CLIP for the evaluation (R-precision); empty: the same as --clip
    eval_pretrained="",       # pretrained tag or checkpoint file for --eval-clip
    captions="",              # R-precision captions, one per line (empty: the eval CLIP's toy captions)
    field="mlp",              # mlp (the official residual MLP) | hashgrid (common.HashGrid + a small MLP)
    width=64,                 # MLP width (residual blocks widen to 2x inside)
    n_blocks=2,               # residual blocks
    n_freqs=4,                # positional-encoding frequencies of the position
    density_bias=-1.0,        # sigma = softplus(raw + bias): starts nearly empty (mip-NeRF)
    size=32,                  # render size in pixels (square)
    n_samples=48,             # jittered samples per ray (paper: 192)
    radius=4.0,               # camera distance from the tracked origin
    elevation=30.0,           # camera elevation in degrees (held-out views and the turntable: exactly this)
    elevation_jitter=0.0,     # training elevations ~ U(elevation - this, elevation + this) (paper: 0)
    focal_mult=1.2,           # focal length = Blender's focal length x this
    iters=300,                # training iterations (one render each)
    lr_start=5e-4,            # Adam learning rate at step 0 ...
    lr_end=2e-3,              # ... rising exponentially to this over --warmup-steps, then constant
    warmup_steps=100,         # length of the warm-up
    transmittance_loss=True,  # sparsity: -lambda * min(tau, mean transmittance)
    lam=0.5,                  # lambda, the weight of the transmittance loss
    tau_start=0.40,           # target transmittance at step 0 ...
    tau_end=0.88,             # ... annealed linearly to this over --tau-steps
    tau_steps=150,            # length of the anneal
    random_bg=True,           # composite over random backgrounds (off: white)
    max_blur=10.0,            # background blur sigma ~ U(0, this) pixels at 224 px (scaled to --size)
    n_crops=8,                # random crops per render fed to CLIP
    crop_frac=0.9,            # side of a crop / side of the render
    origin_tracking=True,     # shift the cameras to the EMA of the density's centre of mass
    origin_decay=0.99,        # EMA decay of the origin (paper: 0.999 over 10k steps)
    n_eval=8,                 # held-out views for the CLIP score and R-precision
    preview_every=100,        # write a preview image every this many steps
    ckpt_every=100,           # save a checkpoint every this many steps
    video_frames=24,          # turntable frames
    video_size=48,            # turntable frame size in pixels
    mesh_res=64,              # marching-cubes grid resolution over the cube
    mesh_level=2.0,           # density iso-level of the exported mesh
    keep_largest=True,        # export only the mesh's largest connected piece (drops floaters)
    ablate=False,             # run each trick off in turn and write a comparison
    threads=1,                # CPU threads for torch (0: torch's default; see the header)
    amp=False,                # bf16 autocast of the field and CLIP (a GPU; compositing stays fp32)
    compile=False,            # torch.compile the field and CLIP's image tower (a GPU)
    checkpoint=False,         # recompute each ray chunk's field in the backward pass (GPU memory at 168+ px)
    occupancy=False,          # skip samples in empty cells of an occupancy grid (GPU speed; see DEVIATION)
    grid_res=64,              # occupancy grid resolution over the cube
    grid_every=16,            # refresh the occupancy grid every this many steps
    grid_thickness=0.01,      # a cell is empty when its density x the sample spacing stays below this (NGP)
)
BLENDER_FOV_X = 0.6911112     # camera_angle_x of the nerf_synthetic scenes (radians)
AABB = torch.tensor([[-1.0] * 3, [1.0] * 3])   # the scene is bounded in the cube |x|_inf <= 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="named hyperparameter set")
    common.add_config_flags(p, DEFAULTS, __file__)
    common.add_run_flags(p, default_name="default")
    args = p.parse_args(argv)
    cfg = vars(common.resolve_config(args, DEFAULTS, PRESETS[args.preset]))
    if cfg["field"] not in ("mlp", "hashgrid"):
        raise common.UserError(f"--field must be mlp or hashgrid, not {cfg['field']!r}")
    if not 0 < cfg["crop_frac"] <= 1 or cfg["n_crops"] < 1:
        raise common.UserError("--crop-frac must be in (0, 1] and --n-crops at least 1")
    return argparse.Namespace(**cfg)


# ================================================================================================
# The field: density and colour from position only (no view dependence), zero outside the cube
# ================================================================================================
class DreamField(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.field == "mlp":   # Dense -> residual blocks -> LayerNorm -> Dense(4)
            self.encode = lambda x: common.positional_encoding(x, cfg.n_freqs)
            in_dim = common.positional_encoding_dim(cfg.n_freqs)
        else:                    # multiresolution hash grid over the cube
            self.grid = common.HashGrid(n_levels=8, n_features=2, log2_table=15, base_res=8, max_res=128)
            self.encode = lambda x: self.grid((x + 1) / 2)
            in_dim = self.grid.out_dim
        self.net = common.residual_mlp(in_dim, cfg.width, cfg.n_blocks)
        # --occupancy: Instant-NGP's grid of the density's moving maximum; renders skip its empty cells
        # NGP's rule: skip a cell whose optical thickness per sample, sigma * dt, stays below --grid-thickness;
        # dt = the widest spacing, a ray along the cube's diagonal (2 sqrt(3) / n_samples)
        dt = 2 * math.sqrt(3) / cfg.n_samples
        self.occupancy = (common.OccupancyGrid(AABB, cfg.grid_res, threshold=cfg.grid_thickness / dt)
                          if cfg.occupancy else None)

    def forward(self, x):
        """x (N, 3) -> sigma (N,) (softplus, zero outside |x| <= 1), rgb (N, 3) (sigmoid)."""
        raw = self.net(self.encode(x))                                          # (N, 4)
        inside = (x.abs() <= 1).all(-1)
        sigma = torch.where(inside, F.softplus(raw[:, 0] + self.cfg.density_bias), 0.0)
        return sigma, torch.sigmoid(raw[:, 1:])


# ================================================================================================
# Pose sampling: azimuth U(0, 360), elevation 30 (+- a jitter), radius 4, focal = Blender focal x focal_mult
# ================================================================================================
def focal_length(cfg) -> float:
    """Blender's focal length at --size pixels (0.5 W / tan(fov_x / 2)) times --focal-mult."""
    return 0.5 * cfg.size / math.tan(0.5 * BLENDER_FOV_X) * cfg.focal_mult


def sample_pose(cfg, origin, generator=None):
    """A random camera looking at the tracked origin (3,): azimuth ~ U(0, 360), elevation ~
    U(elevation -+ elevation_jitter). Returns c2w (4, 4), the azimuth and the elevation (degrees)."""
    az = 360.0 * torch.rand((), generator=generator)
    el = cfg.elevation
    if cfg.elevation_jitter:
        el = el + cfg.elevation_jitter * (2 * float(torch.rand((), generator=generator)) - 1)
    return common.pose_spherical(cfg.radius, el, az, target=origin.tolist()), float(az), float(el)


# ================================================================================================
# Rendering: jittered samples where each ray is inside the cube, NeRF compositing (Eq. 3)
# ================================================================================================
def render(field, rays_o, rays_d, n_samples, perturb, grid=None):
    """Rays (R, 3) -> composite()'s dict (rgb over black, opacity, ...) plus the samples' sigma
    (R, S) and positions pts (R, S, 3), which origin tracking needs. With an occupancy grid only the
    samples in occupied cells go through the field (packed: sigma (N,), pts (N, 3))."""
    R = rays_o.shape[0]
    t0, t1 = common.ray_aabb(rays_o, rays_d, AABB.to(rays_o.device))            # (R,) in units of |d|
    t0 = t0.clamp(min=0)
    t1 = torch.maximum(t1, t0)                                                  # a miss: a zero-length interval
    t = common.stratified_samples(t0[:, None], t1[:, None], R, n_samples, perturb, rays_o.device)   # (R, S)
    deltas = ((t1 - t0) / n_samples * rays_d.norm(dim=-1))[:, None].expand(R, n_samples)
    pts = rays_o[:, None] + t[..., None] * rays_d[:, None]                      # (R, S, 3)
    if grid is not None:                                                        # empty-space skipping
        ray, step = grid.query(pts).nonzero(as_tuple=True)                      # (N,) each, ray-major
        kept = pts[ray, step]                                                   # (N, 3)
        sigma, rgb = field(kept)
        out = common.composite_packed(sigma, rgb, deltas[ray, step], t[ray, step], ray, R)
        out["sigma"], out["pts"] = sigma, kept
        return out
    sigma, rgb = field(pts.reshape(-1, 3))
    out = common.composite(sigma.reshape(R, -1), rgb.reshape(R, -1, 3), deltas, t)
    out["sigma"], out["pts"] = sigma.reshape(R, -1), pts
    return out


def render_view(field, cfg, c2w, perturb=False, size=None, chunk=None):
    """One camera -> image (3, S, S) over black and opacity (1, S, S); plus sigma, pts of the samples
    (with --occupancy only those in the field's occupied cells).
    With --checkpoint a chunk keeps no activations for the backward pass: it is rendered again then
    (the same jitter: checkpoint replays the RNG). Rays go through in chunks of `chunk` (default: all at
    once, or 2^13 with --checkpoint; without it autograd keeps every chunk's activations anyway)."""
    S = size or cfg.size
    rays_o, rays_d = common.get_rays(S, S, focal_length(cfg) * S / cfg.size, c2w)
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    recompute = cfg.checkpoint and torch.is_grad_enabled()
    chunk = chunk or (2 ** 13 if recompute else len(rays_o))
    run = (lambda *a: torch.utils.checkpoint.checkpoint(render, *a, use_reentrant=False)) if recompute else render   # noqa: E731
    outs = [run(field, rays_o[i:i + chunk], rays_d[i:i + chunk], cfg.n_samples, perturb, field.occupancy)
            for i in range(0, len(rays_o), chunk)]
    cat = {k: torch.cat([o[k] for o in outs]) for k in ("rgb", "opacity", "sigma", "pts")}
    return (cat["rgb"].T.reshape(3, S, S), cat["opacity"].reshape(1, S, S), cat["sigma"], cat["pts"])


# ================================================================================================
# Sparsity: the transmittance loss, with its target annealed
# ================================================================================================
def target_transmittance(step, cfg) -> float:
    """tau rises linearly from --tau-start to --tau-end over --tau-steps, then stays."""
    return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * min(step / max(cfg.tau_steps, 1), 1.0)


def transmittance_loss(opacity, tau, lam):
    """L_T = -lambda * min(tau, mean transmittance); transmittance of a ray = 1 - its opacity."""
    return -lam * torch.clamp((1.0 - opacity).mean(), max=tau)


# ================================================================================================
# Augmentation: random backgrounds (noise, checkerboard, Fourier texture; blurred), random crops
# ================================================================================================
def gaussian_blur(img, sigma):
    """Blur one image (3, H, W) with a Gaussian of std sigma pixels (separable, reflect padding)."""
    if sigma < 0.1:
        return img
    r = min(int(math.ceil(3 * sigma)), img.shape[-1] - 1)
    x = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).expand(3, 1, 1, -1)                                       # (3, 1, 1, 2r+1)
    y = F.pad(img[None], (r, r, r, r), mode="reflect")
    y = F.conv2d(F.conv2d(y, k, groups=3), k.transpose(2, 3), groups=3)
    return y[0]


def random_background(kind, size, cfg, generator=None, device="cpu"):
    """A background (3, size, size) in [0, 1] on `device`: 'noise' (uniform per pixel), 'checker' (8 squares
    a side, two random colours), 'fourier' (a random sum of low-frequency plane waves), blurred by sigma ~
    U(0, max_blur). The random numbers come from the CPU generator; the image is built on `device`."""
    u = lambda *s: torch.rand(*s, generator=generator).to(device)               # noqa: E731
    c = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
    y, x = torch.meshgrid(c, c, indexing="ij")                                  # (S, S) each in (0, 1)
    if kind == "noise":
        bg = u(3, size, size)
    elif kind == "checker":
        odd = ((x * 8).floor() + (y * 8).floor()) % 2 == 1
        bg = torch.where(odd, u(3, 1, 1), u(3, 1, 1))
    elif kind == "fourier":
        freq = torch.randn(3, 16, 2, generator=generator).to(device) * 4 * 2 * math.pi   # (3, waves, 2) radians / image
        phase = u(3, 16, 1, 1) * 2 * math.pi
        bg = torch.sin(freq[..., 0, None, None] * x + freq[..., 1, None, None] * y + phase).sum(1)    # (3, S, S)
        lo, hi = bg.amin((1, 2), keepdim=True), bg.amax((1, 2), keepdim=True)
        bg = (bg - lo) / (hi - lo + 1e-6)
    else:
        raise ValueError(kind)
    sigma = float(torch.rand((), generator=generator))
    return gaussian_blur(bg, sigma * cfg.max_blur * size / 224)


def augment(rgb, opacity, cfg, generator=None):
    """Composite a render over a random (or white) background and cut --n-crops random square crops.
    rgb (3, S, S) over black, opacity (1, S, S) -> (n_crops, 3, c, c), c = crop_frac S."""
    S = rgb.shape[-1]
    if cfg.random_bg:
        kind = ("noise", "checker", "fourier")[int(torch.randint(3, (), generator=generator))]
        bg = random_background(kind, S, cfg, generator, rgb.device)
    else:
        bg = torch.ones(3, S, S, device=rgb.device)
    image = rgb + (1 - opacity) * bg
    c = max(1, round(cfg.crop_frac * S))
    corners = torch.randint(0, S - c + 1, (cfg.n_crops, 2), generator=generator).tolist()
    return torch.stack([image[:, i:i + c, j:j + c] for i, j in corners])


# ================================================================================================
# Localisation: the origin follows the density's centre of mass (an exponential moving average)
# ================================================================================================
@torch.no_grad()
def ema_origin(origin, sigma, pts, decay):
    """origin <- decay origin + (1 - decay) sum(sigma x) / sum(sigma). origin (3,), sigma (...), pts (..., 3),
    all on one device."""
    w = sigma.reshape(-1, 1)
    total = w.sum()
    centre = (w * pts.reshape(-1, 3)).sum(0) / total.clamp(min=1e-30)
    return torch.where(total > 0, decay * origin + (1 - decay) * centre, origin)     # no density: unchanged


# ================================================================================================
# Training: render a random view, augment, CLIP loss + transmittance loss, Adam with warm-up
# ================================================================================================
def learning_rate(step, cfg) -> float:
    """Exponential warm-up: lr_start (lr_end / lr_start)^(step / warmup_steps), then lr_end."""
    return cfg.lr_start * (cfg.lr_end / cfg.lr_start) ** min(step / max(cfg.warmup_steps, 1), 1.0)


def compile_image_tower(prior):
    """torch.compile a CLIP's image tower, replayed as CUDA graphs (mode "reduce-overhead"): in training
    its input has one shape (n_crops crops at CLIP's resolution), so its forward and its backward each
    become one graph launch instead of hundreds of kernel launches: the host's launches set the pace of
    a sparse step (bench/RESULTS_dreamfields.md)."""
    prior.model.visual = torch.compile(prior.model.visual, mode="reduce-overhead")


def load_priors(cfg, device):
    """The CLIP of the loss and the CLIP of the evaluation (the same object when they agree).
    Both check the prompt first: a toy CLIP refuses words outside its vocabulary."""
    prior = common.CLIPPrior(cfg.clip, cfg.pretrained or None, device=device, flag="--clip/--pretrained")
    prior.check_prompt(cfg.prompt)
    if cfg.compile:
        compile_image_tower(prior)
    if (cfg.eval_clip or cfg.clip, cfg.eval_pretrained or cfg.pretrained) == (cfg.clip, cfg.pretrained):
        return prior, prior
    ev = common.CLIPPrior(cfg.eval_clip or cfg.clip, cfg.eval_pretrained or None, device=device,
                          flag="--eval-clip/--eval-pretrained")
    ev.check_prompt(cfg.prompt)
    return prior, ev


def train_step(field, opt, cfg, prior, txt, origin, step, device):
    """One iteration: pose, render, augment, CLIP + transmittance loss, Adam step, origin update.
    txt (1, D) the prompt's embedding; origin (3,) on the CPU. Returns a log dict and the new origin."""
    for g in opt.param_groups:
        g["lr"] = learning_rate(step, cfg)
    if field.occupancy is not None and step % cfg.grid_every == 0:         # NGP: moving max of the density
        field.occupancy.update(lambda x: field(x)[0])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        # --- 1. pose sampling, 2. render with jittered samples ---
        c2w, _, _ = sample_pose(cfg, origin)
        rgb, opacity, sigma, pts = render_view(field, cfg, c2w.to(device), perturb=True)
        # --- 3. augment: random background, random crops; 4. CLIP loss: -mean cosine ---
        crops = augment(rgb.float(), opacity.float(), cfg)
        clip_loss = -prior.similarity(prior.encode_image(crops), txt).mean()
    # --- 5. sparsity: transmittance loss ---
    tau = target_transmittance(step, cfg)
    t_loss = transmittance_loss(opacity.float(), tau, cfg.lam) if cfg.transmittance_loss else 0.0
    loss = clip_loss + t_loss
    # --- 6. step (a non-finite loss or gradient skips the step) ---
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in field.parameters() if p.grad is not None]
    finite = torch.isfinite(loss) & torch.isfinite(torch.nn.utils.get_total_norm(grads))   # one norm over all grads
    # --- 7. localisation: the origin follows the density's centre of mass ---
    if cfg.origin_tracking:
        origin = ema_origin(origin.to(device), sigma.detach().float(), pts.detach(), cfg.origin_decay)
    # one host synchronisation a step: the finite flag, the logged values and the origin come back together
    logged = torch.stack([finite, loss.detach(), -clip_loss.detach(), opacity.detach().mean()]).float()
    ok, loss_v, clip_v, opacity_v, *xyz = torch.cat([logged, origin.to(device).float()]).tolist()
    if ok:                                                                  # 6: skip a non-finite step
        opt.step()
    return {"loss": loss_v, "clip": clip_v, "transmittance": 1 - opacity_v, "finite": bool(ok)}, torch.tensor(xyz)


def train(cfg, run, prior, ev, device):
    """Optimise one Dream Field. Returns the field, the tracked origin, the steps done, seconds, start metrics."""
    common.seed_everything(cfg.seed)
    field = DreamField(cfg).to(device)
    opt = torch.optim.Adam(field.parameters(), lr=learning_rate(0, cfg), eps=1e-5, fused=device.type == "cuda")
    txt = prior.encode_text([cfg.prompt])                                       # (1, D)
    origin, start, elapsed, skipped, curve = torch.zeros(3), 0, 0.0, 0, []
    if cfg.resume and run.exists("checkpoint.pt"):
        ck = run.load_checkpoint(map_location=device)
        field.load_state_dict(ck["model"]), opt.load_state_dict(ck["opt"])
        origin, start, elapsed, skipped, curve = ck["origin"], ck["step"], ck["elapsed"], ck["skipped"], ck["curve"]
        start_metrics = ck["start_metrics"]
        common.set_rng_state(ck["rng"])
    elif cfg.resume:
        raise common.UserError(f"--resume: no checkpoint at {run.path}")
    elif run.exists("checkpoint.pt"):
        raise common.UserError(f"{run.path} already holds a run: pass --resume to continue it or --name for a new one")
    else:
        start_metrics = evaluate(field, cfg, origin, prior, ev, device)[1]      # the untrained field's scores
    run.write_json("config.json", vars(cfg))

    def checkpoint(step):
        run.save_checkpoint({"model": field.state_dict(), "opt": opt.state_dict(), "origin": origin, "step": step,
                             "elapsed": elapsed, "skipped": skipped, "curve": curve,
                             "start_metrics": start_metrics, "rng": common.rng_state()})

    fast_field = torch.compile(field) if cfg.compile else field                # the same parameters
    # Ctrl-C finishes the current step, saves a checkpoint and exits (a second Ctrl-C kills)
    ctrl_c = common.CtrlC()
    bar = common.progress(range(start, cfg.iters), initial=start, total=cfg.iters, desc=f"dreamfields {run.path}")
    step = start
    for step in range(start, cfg.iters):
        t0 = time.perf_counter()
        log, origin = train_step(fast_field, opt, cfg, prior, txt, origin, step, device)
        skipped += not log["finite"]
        elapsed += time.perf_counter() - t0
        step += 1
        # --- 8. log, preview, checkpoint ---
        bar.update(1)
        bar.set_postfix(loss=f"{log['loss']:.3f}", clip=f"{log['clip']:.3f}", trans=f"{log['transmittance']:.2f}")
        if step % 10 == 0:
            curve.append({"step": step, **{k: log[k] for k in ("loss", "clip", "transmittance")}})
        if step % cfg.preview_every == 0:
            common.save_image(run.file("preview", f"step_{step:05d}.png"), preview_row(field, cfg, origin, device))
        if step % cfg.ckpt_every == 0 or ctrl_c.hit:
            checkpoint(step)
        if ctrl_c.hit:
            break
    bar.close()
    checkpoint(step)
    ctrl_c.close(run, step)
    return field, origin, step, elapsed, skipped, start_metrics


# ================================================================================================
# Evaluation: CLIP score and R-precision over held-out views on white; export: video, mesh
# ================================================================================================
def eval_captions(cfg, ev):
    """R-precision captions (the prompt among them) from --captions, or the toy captions of the eval CLIP."""
    if cfg.captions:
        if not os.path.isfile(cfg.captions):
            raise common.UserError(f"--captions: no such file {cfg.captions}")
        with open(cfg.captions) as f:
            caps = [line.strip() for line in f if line.strip()]
    else:
        caps = common.toy_captions(cfg.eval_clip or cfg.clip)
        if caps is None:
            return None
    return caps if cfg.prompt in caps else [cfg.prompt] + caps


@torch.no_grad()
def eval_views(field, cfg, origin, device, n=None):
    """n held-out views (azimuths 360 (k + 1/2) / n) on white -> (n, 3, S, S), and their mean transmittance."""
    n = n or cfg.n_eval
    images, trans = [], []
    for k in range(n):
        c2w = common.pose_spherical(cfg.radius, cfg.elevation, 360.0 * (k + 0.5) / n, target=origin.tolist())
        rgb, opacity, _, _ = render_view(field, cfg, c2w.to(device))
        images.append(rgb + (1 - opacity)), trans.append(1 - opacity.mean().item())
    return torch.stack(images), sum(trans) / n


@torch.no_grad()
def evaluate(field, cfg, origin, prior, ev, device):
    """CLIP score (mean cosine with the prompt, loss CLIP and eval CLIP), R-precision, transmittance."""
    images, trans = eval_views(field, cfg, origin, device)
    caps = eval_captions(cfg, ev)
    # the eval CLIP: its score, and R-precision / caption margin (> 0: the prompt wins) among the captions
    ev_m = common.caption_metrics(ev, images, cfg.prompt, caps)
    loss_m = ev_m if ev is prior else common.caption_metrics(prior, images, cfg.prompt)    # the loss CLIP
    m = {"clip_score": loss_m["clip_score"], "mean_transmittance": trans}
    m["eval_clip_score"] = ev_m.pop("clip_score")
    m.update(ev_m)
    if caps is None:
        m["r_precision"] = "skipped: no caption set (pass --captions FILE)"
    return images, m


def preview_row(field, cfg, origin, device, n=4):
    """n views side by side (S, n S, 3) for previews and the ablation grid."""
    images, _ = eval_views(field, cfg, origin, device, n)
    return images.permute(2, 0, 3, 1).reshape(cfg.size, n * cfg.size, 3)


@torch.no_grad()
def export(cfg, field, origin, run, prior, ev, device, step, elapsed, skipped, start_metrics):
    field.eval()
    images, end = evaluate(field, cfg, origin, prior, ev, device)
    common.save_image(run.file("views.png"), images.permute(2, 0, 3, 1).reshape(cfg.size, -1, 3))
    metrics = {"prompt": cfg.prompt, "start": start_metrics, **end, "iterations": step, "skipped_steps": skipped,
               "train_seconds": round(elapsed, 2), "origin": origin.tolist(), "device": str(device),
               "held_out_azimuths": [360.0 * (k + 0.5) / cfg.n_eval for k in range(cfg.n_eval)]}
    run.write_json("metrics.json", metrics)
    frames = []
    for az in torch.linspace(0, 360, cfg.video_frames + 1)[:-1]:
        c2w = common.pose_spherical(cfg.radius, cfg.elevation, az, target=origin.tolist()).to(device)
        rgb, opacity, _, _ = render_view(field, cfg, c2w, size=cfg.video_size)
        frames.append((rgb + (1 - opacity)).permute(1, 2, 0))
    common.save_video(run.file("turntable.mp4"), frames)
    # mesh: marching cubes of the density in the cube, coloured by the field's rgb at the vertices
    verts, faces, colors = common.density_mesh(lambda x: field(x)[0], lambda x: field(x)[1], AABB,
                                               cfg.mesh_res, cfg.mesh_level, device, chunk=2 ** 16)
    if cfg.keep_largest:
        verts, faces, colors = common.largest_component(verts, faces, colors)
    if len(faces):
        common.save_ply(run.file("mesh.ply"), verts, colors, faces)
        common.save_obj(run.file("mesh.obj"), verts, faces, colors)
        metrics["mesh"] = {"vertices": len(verts), "faces": len(faces)}
    else:
        metrics["mesh"] = (f"empty: the density never crosses --mesh-level {cfg.mesh_level}; "
                           "lower --mesh-level or train longer")
    run.write_json("metrics.json", metrics)
    r = metrics["r_precision"]
    print(f"CLIP score {start_metrics['clip_score']:.3f} -> {end['clip_score']:.3f}, R-precision "
          f"{r if isinstance(r, str) else f'{r:.2f}'}, transmittance {end['mean_transmittance']:.2f} "
          f"({step} iterations, {elapsed:.0f} s) -> {run.path}")
    return metrics


ABLATIONS = {"all tricks": {}, "no transmittance loss": {"transmittance_loss": False},
             "no random backgrounds": {"random_bg": False}, "no origin tracking": {"origin_tracking": False},
             "one crop": {"n_crops": 1}}


def ablate(cfg, prior, ev, device):
    """The same prompt and seed with each trick off in turn: ablation.png (a row per run) + .md/.json."""
    rows, images = [], []
    for label, change in ABLATIONS.items():
        sub = argparse.Namespace(**{**vars(cfg), **change})
        run = common.RunDir(cfg.out, "dreamfields", os.path.join(cfg.name, label.replace(" ", "_")))
        field, origin, step, elapsed, _, _ = train(sub, run, prior, ev, device)
        _, m = evaluate(field, sub, origin, prior, ev, device)
        rows.append({"run": label, "clip_score": m["clip_score"], "mean_transmittance": m["mean_transmittance"],
                     "r_precision": m["r_precision"], "seconds": round(elapsed, 1)})
        images.append(preview_row(field, sub, origin, device))
    top = common.RunDir(cfg.out, "dreamfields", cfg.name)
    common.save_image(top.file("ablation.png"), torch.cat(images))
    top.write_json("ablation.json", rows)
    lines = ["| run (rows of ablation.png) | CLIP score | mean transmittance | R-precision |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['run']} | {r['clip_score']:.3f} | {r['mean_transmittance']:.2f} | {r['r_precision']} |"
              for r in rows]
    with open(top.file("ablation.md"), "w") as f:
        f.write(f"Prompt {cfg.prompt!r}, seed {cfg.seed}, {cfg.iters} iterations.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    with common.cli_errors():
        cfg = parse_args(argv)
        device = common.pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        prior, ev = load_priors(cfg, device)                # refuses a bad prompt before anything is written
        if cfg.ablate:
            return ablate(cfg, prior, ev, device)
        run = common.RunDir(cfg.out, "dreamfields", cfg.name)
        field, origin, step, elapsed, skipped, start = train(cfg, run, prior, ev, device)
        export(cfg, field, origin, run, prior, ev, device, step, elapsed, skipped, start)


if __name__ == "__main__":
    main()
