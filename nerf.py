"""nerf.py -- NeRF (Mildenhall et al., ECCV 2020) and the Instant-NGP field (Mueller et al., 2022).

Run:
    python nerf.py                                    # bundled scene, CPU-sized hash grid, 3-4.5 min on 2 cores
    python nerf.py --preset ngp  --data ../shared/data/nerf_synthetic/lego   # Instant-NGP field (a GPU)
    python nerf.py --preset nerf --data ../shared/data/nerf_synthetic/lego   # the paper's MLP NeRF
    python nerf.py --name run1 --resume --iters 4000  # continue a run (Ctrl-C saves a checkpoint)
Outputs in out/nerf/<name>/: config.json, checkpoint.pt, test/ renders, turntable.mp4, mesh.ply/.obj,
metrics.json (PSNR/SSIM per split, iterations, seconds).

The script follows the paper: scene data (Sec. 4 / App. A), the field (positional encoding + MLP,
Sec. 5.1; or the hash grid, NGP Sec. 3), volume rendering (Sec. 4), hierarchical sampling
(Sec. 5.2) or occupancy-grid ray marching (NGP Sec. 4), the training loop (Sec. 5.3), export.

DEVIATION: the learning rate decays exponentially for both fields (NeRF's schedule), over a fixed
  number of steps (--lr-decay-steps), so a resumed run follows the same schedule.
DEVIATION: the hash-grid field is pure PyTorch (no tiny-cuda-nn): dense/hashed levels, trilinear
  interpolation and the occupancy grid are tensor code.
DEVIATION: the occupancy mask is dilated by one cell (never skips a cell next to seen density).
DEVIATION: the nerf_10min preset trains the paper's MLP with 4096 rays a step at lr 1e-3 decaying 10x over
  30k steps (paper: 1024 rays, 5e-4 over 500k) and stops after 600 s (bench/RESULTS_nerf.md).
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ================================================================================================
# Config: every hyperparameter, one comment each. A preset fills them; explicit flags override.
# ================================================================================================
PRESETS = {
    # CPU-sized hash grid: the default, so `python nerf.py` finishes in minutes on a laptop (4.5 min on a slow 2-core
    # machine; 1500 steps gave 0.6 dB more and took 5.5 min there).
    "quick": dict(field="hashgrid", iters=1200, batch_rays=1024, target_samples=2 ** 14, lr=1e-2,
                  lr_decay_steps=2400, n_levels=8, log2_table=16, base_res=8, max_res=512, grid_res=32,
                  n_steps=192, mesh_res=128, video_frames=36),
    # The NeRF paper (Blender configs of bmild/nerf): 64 coarse + 128 fine samples, 1024 rays.
    "nerf": dict(field="mlp", iters=200_000, batch_rays=1024, lr=5e-4, lr_decay_steps=500_000,
                 n_coarse=64, n_fine=128, precrop_iters=500, mesh_res=256),
    # The paper's network and samples trained for ten minutes on a GPU: 4x the rays, 2x the learning rate,
    # the decay sized to the ~19k steps that fit (30.68 on lego after 600 s on an H100).
    "nerf_10min": dict(field="mlp", iters=1_000_000, time_budget=600, batch_rays=4096, lr=1e-3,
                       lr_decay_steps=30_000, n_coarse=64, n_fine=128, precrop_iters=500, mesh_res=256, compile=True),
    # Instant-NGP: 16 levels x 2 features, T = 2^19, N_min 16, N_max 2048; 128^3 occupancy grid;
    # random backgrounds; an average of the weights (decay 0.95) renders; 2^18 samples a step, as in NGP. The training
    # march is replayed as CUDA graphs (178-223 it/s on an H100; on lego after 120 s
    # 34.76-35.10 in seven runs at seeds 0-3, mean 34.93).
    "ngp": dict(field="hashgrid", iters=30_000, batch_rays=4096, lr=1e-2, lr_decay_steps=30_000,
                n_levels=16, log2_table=19, base_res=16, max_res=2048, grid_res=128, n_steps=1024,
                mesh_res=256, random_bkgd=True, compile=True, target_samples=2 ** 18, cuda_graphs=True, ema_decay=0.95),
}
DEFAULTS = dict(
    data="data/still_life",   # Blender-format scene folder
    half_res=False,           # load images at half resolution (2x2 area average, focal / 2)
    field="hashgrid",         # mlp (NeRF) | hashgrid (Instant-NGP)
    iters=1500,               # training iterations
    time_budget=0.0,          # stop after this many seconds of training (0: no limit)
    batch_rays=1024,          # rays per iteration (hashgrid: starting value, adapted to --target-samples)
    target_samples=2 ** 18,   # hashgrid: samples evaluated with gradients a step (the ray batch adapts to it)
    scan_ratio=4,             # --early-stop with --cuda-graphs: the density pass's buffer, in units of --target-samples
    lr=1e-2,                  # Adam learning rate
    lr_decay_steps=3000,      # lr decays by 10x over this many steps (exponentially)
    ema_decay=0.0,            # render with a moving average of the weights, this decay a step (NGP: 0.95; 0: off)
    bound=1.5,                # the scene lives in the cube |x| <= bound
    white_bkgd=True,          # composite images and renders over white
    random_bkgd=False,        # train over a random colour per ray (NGP: the field must learn transparency)
    jitter_pixels=False,      # NGP: train on rays through random points of pixels (lego: -1.6 dB, RESULTS_nerf)
    # --- NeRF MLP ---
    n_coarse=64,              # stratified samples per ray (coarse network)
    n_fine=128,               # inverse-CDF samples per ray (fine network)
    pe_xyz=10,                # positional-encoding frequencies for positions (63 dims)
    pe_dir=4,                 # ... for view directions (27 dims)
    precrop_iters=0,          # sample rays only from the central 50% for this many first steps
    # --- Instant-NGP field ---
    n_levels=8,               # hash-grid levels L
    n_features=2,             # features per level F (NGP: 2; its paper trades L against F)
    log2_table=16,            # log2 of the hash table size T per level
    base_res=8,               # coarsest grid resolution N_min
    max_res=512,              # finest grid resolution N_max
    grid_res=64,              # occupancy grid resolution
    grid_every=16,            # refresh the occupancy grid every this many steps
    n_steps=256,              # ray-marching steps across the bounding cube's diagonal
    early_stop=False,         # training: skip samples behind transmittance 1e-4 (a density pass without grad first)
    # --- evaluation and export ---
    test_views=0,             # evaluate on the first N test (and val) views (0: all)
    eval_at="",               # comma-separated training seconds at which to evaluate (benchmarks)
    mesh_res=128,             # marching-cubes grid resolution
    mesh_level=10.0,          # density iso-level of the exported mesh
    video_frames=60,          # turntable frames
    ckpt_every=500,           # save a checkpoint every this many steps
    amp=True,                 # CUDA: bf16 autocast for the field's matrix products (rendering stays fp32)
    compile=False,            # CUDA: torch.compile the field and compositing (compile time is not training time)
    cuda_graphs=False,        # CUDA + --compile: replay the training march as CUDA graphs, in fixed-size sample buffers
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named hyperparameter set (default: quick; --field mlp alone implies nerf, hashgrid ngp)")
    common.add_config_flags(p, DEFAULTS, __file__)
    common.add_run_flags(p, default_name="default")
    args = p.parse_args(argv)
    if args.field not in (None, "mlp", "hashgrid"):
        raise common.UserError(f"--field must be mlp or hashgrid, not {args.field!r}")
    preset = args.preset or {None: "quick", "mlp": "nerf", "hashgrid": "ngp"}[args.field]
    cfg = common.resolve_config(args, DEFAULTS, PRESETS[preset])
    cfg.preset = preset
    return cfg


# ================================================================================================
# The field. NeRF Sec. 5.1: F(gamma(x), gamma(d)) -> (sigma, rgb), 8 x 256 ReLU layers with a skip.
# ================================================================================================
class NeRFMLP(nn.Module):
    def __init__(self, pe_xyz=10, pe_dir=4, width=256, depth=8, skip=4):
        super().__init__()
        self.pe_xyz, self.pe_dir, self.skip = pe_xyz, pe_dir, skip
        in_xyz, in_dir = common.positional_encoding_dim(pe_xyz), common.positional_encoding_dim(pe_dir)  # 63, 27
        self.layers = nn.ModuleList(
            [nn.Linear(in_xyz if i == 0 else width + (in_xyz if i == skip + 1 else 0), width) for i in range(depth)])
        self.sigma = nn.Linear(width, 1)
        self.feature = nn.Linear(width, width)                                  # no activation
        self.rgb = nn.Sequential(nn.Linear(width + in_dir, width // 2), nn.ReLU(), nn.Linear(width // 2, 3))

    def forward(self, x, d):
        gx = common.positional_encoding(x, self.pe_xyz)                        # (N, 63)
        h = gx
        for i, layer in enumerate(self.layers):
            h = F.relu(layer(torch.cat([h, gx], -1) if i == self.skip + 1 else h))
        sigma = F.relu(self.sigma(h)[:, 0])                                     # Eq. 3 uses relu(sigma)
        rgb = torch.sigmoid(self.rgb(torch.cat([self.feature(h), common.positional_encoding(d, self.pe_dir)], -1)))
        return sigma.float(), rgb.float()


# Instant-NGP field (NGP Sec. 3-4): hash grid -> 1x64 MLP -> 16 features (first = log density);
# features + SH(direction) -> 2x64 MLP -> rgb.
class NGPField(nn.Module):
    def __init__(self, bound, n_levels, n_features, log2_table, base_res, max_res):
        super().__init__()
        self.bound = bound
        self.grid = common.HashGrid(n_levels, n_features, log2_table, base_res, max_res)
        self.sigma_net = nn.Sequential(nn.Linear(self.grid.out_dim, 64), nn.ReLU(), nn.Linear(64, 16))
        self.color_net = nn.Sequential(nn.Linear(15 + 16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                       nn.Linear(64, 3))

    def density(self, x):
        h = self.sigma_net(self.grid((x / self.bound + 1) / 2)).float()          # (N, 16)
        return common.trunc_exp(h[:, 0]), h[:, 1:]

    def forward(self, x, d):
        sigma, feat = self.density(x)
        rgb = torch.sigmoid(self.color_net(torch.cat([feat, common.sh_encoding(d)], -1)))
        return sigma, rgb.float()


T_MIN = 1e-4   # NGP: a ray whose transmittance falls below this stops (inference; training with --early-stop)


class Model(nn.Module):
    """The networks of one run: coarse + fine MLPs (NeRF) or one hash-grid field + occupancy grid."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        aabb = torch.tensor([[-cfg.bound] * 3, [cfg.bound] * 3])
        if cfg.field == "mlp":
            self.coarse, self.fine = NeRFMLP(cfg.pe_xyz, cfg.pe_dir), NeRFMLP(cfg.pe_xyz, cfg.pe_dir)
        else:
            self.fine = NGPField(cfg.bound, cfg.n_levels, cfg.n_features, cfg.log2_table, cfg.base_res, cfg.max_res)
            self.dt = 2 * cfg.bound * math.sqrt(3) / cfg.n_steps                  # marching step
            # NGP skips cells whose optical thickness sigma * dt is below 0.01
            self.grid = common.OccupancyGrid(aabb, cfg.grid_res, threshold=0.01 / self.dt)
            self.train_march = self.march                                       # compiled apart (train())
            self.graphs = False           # train(): CUDA graphs on, so training packs into fixed-size buffers

    def density(self, x):
        return self.fine.density(x)[0] if self.cfg.field == "hashgrid" else self.fine(x, torch.zeros_like(x))[0]

    def march(self, rays_o, rays_d, t_near, t_far, u, first: int, n: int, bg, early_stop=False,
              capacity=None, scan=None):
        """Steps first .. first + n - 1 of the fixed-step march through the occupied cells: field
        and compositing of the packed samples (render() below; the part that --compile compiles).
        early_stop: evaluate only the samples in front of transmittance 1e-4 (in_front). capacity,
        scan: fixed sizes of the sample buffers (pack_mask) of the field and of in_front's pass."""
        steps = torch.arange(first, first + n, device=rays_o.device)
        dist = t_near[:, None] + (steps + u) * self.dt                          # (R, n), along unit dirs
        t = dist / rays_d.norm(dim=-1, keepdim=True)                            # in units of |d|
        pts = rays_o[:, None] + t[..., None] * rays_d[:, None]                  # (R, n, 3)
        mask = (dist < t_far[:, None]) & self.grid.query(pts)
        occupied = mask.sum(1).float()                                          # (R,) samples per ray
        complete = torch.ones_like(occupied, dtype=torch.bool)
        if early_stop:
            mask, complete = self.in_front(pts, mask, scan)
        ray, step, fits = common.pack_mask(mask, capacity)
        out = common.render_packed(self.fine, rays_o, rays_d, t, torch.full_like(t, self.dt), ray, step, bg)
        out["complete"] = complete & fits                                       # rays that kept all samples
        # samples per ray, occupied and evaluated with gradients (the adaptive batch size uses them)
        out["per_ray"] = torch.stack([occupied.mean(), mask.sum() / complete.sum().clamp(min=1)])
        return out

    @torch.no_grad()
    def in_front(self, pts, mask, capacity=None):
        """Instant-NGP's training compaction: the density alone (no gradients) at the masked samples
        pts (R, S, 3), packed (into `capacity` entries); keep those whose transmittance T_i is still
        above 1e-4. The samples behind a surface change the colour by less than 1e-4, so they need no
        forward/backward pass. Returns the kept mask (R, S) and which rays fit the buffer (R,)."""
        R, S = mask.shape
        ray, step, complete = common.pack_mask(mask, capacity)
        real = ray < R                                                          # not a dummy entry
        sigma = self.fine.density(pts[ray.clamp(max=R - 1), step])[0]
        front = real & (common.packed_transmittance(sigma * self.dt, ray, R + len(ray)) > T_MIN)
        # write the kept flags back to (R, S); dummies and dropped samples to spare cells, one each
        spare = R * S + torch.arange(len(ray), device=mask.device)
        keep = torch.zeros(R * S + len(ray), dtype=torch.bool, device=mask.device)
        keep[torch.where(front, ray * S + step, spare)] = front
        keep = keep[:R * S].reshape(R, S)
        return keep & complete[:, None], complete


# ================================================================================================
# Volume rendering (Sec. 4) with hierarchical sampling (Sec. 5.2) or occupancy-grid marching (NGP)
# ================================================================================================
def render(model, rays_o, rays_d, near, far, train: bool, bg=None):
    """Render rays (R, 3) over the background bg ((R, 3) or (3,); None: white if --white-bkgd, else
    black). Returns the fine result dict (rgb, depth, opacity, ...), plus 'coarse' for the MLP field;
    hash-grid training adds 'complete' (R,), the rays whose samples all fitted the buffers, and
    'per_ray' (2,), the mean samples per ray: occupied, and evaluated with gradients."""
    cfg = model.cfg
    if bg is None and cfg.white_bkgd:
        bg = torch.ones(3, device=rays_o.device)
    R = rays_o.shape[0]
    if cfg.field == "mlp":
        t = common.stratified_samples(near, far, R, cfg.n_coarse, perturb=train, device=rays_o.device)
        coarse = common.render_rays(model.coarse, rays_o, rays_d, t, common.deltas_from_t(t, rays_d), background=bg)
        mids = 0.5 * (t[:, 1:] + t[:, :-1])                                     # bin edges for the pdf
        t_fine = common.sample_pdf(mids, coarse["weights"][:, 1:-1], cfg.n_fine, deterministic=not train).detach()
        t = torch.sort(torch.cat([t, t_fine], -1), -1).values                  # (R, 64 + 128)
        out = common.render_rays(model.fine, rays_o, rays_d, t, common.deltas_from_t(t, rays_d), background=bg)
        out["coarse"] = coarse
        return out
    # march through the bounding cube with a fixed step, skip empty cells of the occupancy grid
    t_near, t_far = common.ray_aabb(rays_o, rays_d / rays_d.norm(dim=-1, keepdim=True), model.grid.aabb)
    t_near = t_near.clamp(min=near)
    u = torch.rand(R, 1, device=rays_o.device) if train else torch.full((R, 1), 0.5, device=rays_o.device)
    if train:   # CUDA graphs: fixed-size sample buffers, so a step's shapes depend only on the ray count
        cap, scan = (cfg.target_samples, cfg.scan_ratio * cfg.target_samples) if model.graphs else (None, None)
        return model.train_march(rays_o, rays_d, t_near, t_far, u, 0, cfg.n_steps, bg, cfg.early_stop, cap, scan)
    # inference: march `seg` steps at a time; a ray stops once its transmittance is below T_MIN
    # (NGP Sec. 4, early ray termination). C = sum_k T_k C_k, T_{k+1} = T_k (1 - opacity_k).
    rgb, depth = torch.zeros(R, 3, device=rays_o.device), torch.zeros(R, device=rays_o.device)
    trans, alive, seg = torch.ones(R, device=rays_o.device), torch.arange(R, device=rays_o.device), 64
    for s0 in range(0, cfg.n_steps, seg):
        alive = alive[(trans[alive] > T_MIN) & (t_near[alive] + s0 * model.dt < t_far[alive])]
        if len(alive) == 0:
            break
        out = model.march(rays_o[alive], rays_d[alive], t_near[alive], t_far[alive], u[alive], s0,
                          min(seg, cfg.n_steps - s0), None)
        t_alive = trans[alive]                                                   # T_k of the live rays
        rgb[alive] += t_alive[:, None] * out["rgb"]
        depth[alive] += t_alive * out["depth"]
        trans[alive] = t_alive * (1 - out["opacity"])
    return {"rgb": rgb + trans[:, None] * bg if bg is not None else rgb, "depth": depth, "opacity": 1 - trans}


@torch.no_grad()
def render_image(model, c2w, H, W, focal, near, far, chunk=2 ** 16):
    """A whole image (H, W, 3) and its depth (H, W) from one camera, rendered in chunks."""
    rays_o, rays_d = common.get_rays(H, W, focal, c2w)
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    rgb, depth = [], []
    amp = model.cfg.amp and c2w.device.type == "cuda"
    for i in range(0, rays_o.shape[0], chunk):
        with torch.autocast(c2w.device.type, torch.bfloat16, enabled=amp):
            out = render(model, rays_o[i:i + chunk], rays_d[i:i + chunk], near, far, train=False)
        rgb.append(out["rgb"]), depth.append(out["depth"])
    return torch.cat(rgb).reshape(H, W, 3), torch.cat(depth).reshape(H, W)


def evaluate(model, split, device, n_views=0, save_dir=None, with_ssim=True):
    """PSNR (and SSIM: 0.1 s a view on a CPU) over a split's views; optionally write the renders."""
    H, W, focal = split["H"], split["W"], split["focal"]
    n = len(split["poses"]) if not n_views else min(n_views, len(split["poses"]))
    psnrs, ssims, t0 = [], [], time.perf_counter()
    for i in range(n):
        img, _ = render_image(model, split["poses"][i].to(device), H, W, focal, split["near"], split["far"])
        gt = split["images"][i]
        psnrs.append(common.psnr(img.cpu(), gt))
        if with_ssim:
            ssims.append(common.ssim(img.cpu(), gt))
        if save_dir:
            common.save_image(os.path.join(save_dir, f"r_{i}.png"), img)
    res = {"psnr": sum(psnrs) / n, "views": n, "eval_seconds": round(time.perf_counter() - t0, 1)}
    return {**res, "ssim": sum(ssims) / n} if with_ssim else res


# ================================================================================================
# Training (Sec. 5.3): random rays from all images, MSE on colour, Adam with exponential lr decay
# ================================================================================================
def train(cfg):
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    train_set = common.load_blender(cfg.data, "train", cfg.half_res, cfg.white_bkgd)
    test_set = common.load_blender(cfg.data, "test", cfg.half_res, cfg.white_bkgd)
    val_set = common.load_blender(cfg.data, "val", cfg.half_res, cfg.white_bkgd)
    run = common.RunDir(cfg.out, "nerf", cfg.name)
    model = Model(cfg).to(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    compiled = cfg.compile and device.type == "cuda"
    graphs = compiled and cfg.cuda_graphs and cfg.field == "hashgrid"
    model.graphs = graphs
    grid_density = model.density                 # what the occupancy grid's refresh evaluates
    if compiled and cfg.field == "mlp":
        model.coarse.compile(dynamic=True)
        model.fine.compile(dynamic=True)
    elif compiled:   # the marcher: field + packed compositing; training's has static buffers (CUDA graphs)
        model.train_march = torch.compile(model.march, dynamic=True, mode="reduce-overhead" if graphs else None)
        model.march = torch.compile(model.march, dynamic=True)   # inference: graph break at nonzero
        grid_density = torch.compile(model.density)
    eps = 1e-15 if cfg.field == "hashgrid" else 1e-8
    betas = (0.9, 0.99) if cfg.field == "hashgrid" else (0.9, 0.999)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=betas, eps=eps, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** (s / cfg.lr_decay_steps))
    # NGP's optimizer keeps an exponential moving average of the weights and renders with it
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params] if cfg.ema_decay else []
    start, elapsed, curve, n_rays = 0, 0.0, [], cfg.batch_rays
    if cfg.resume:
        ck = run.load_checkpoint(map_location=device)
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["opt"]), sched.load_state_dict(ck["sched"])
        start, elapsed, curve, n_rays, ema = ck["step"], ck["elapsed"], ck["curve"], ck["n_rays"], ck.get("ema", ema)
        common.set_rng_state(ck["rng"])
    elif run.exists("checkpoint.pt"):
        raise common.UserError(f"{run.path} already holds a run: pass --resume to continue it or --name for a new one")
    run.write_json("config.json", vars(cfg))

    images = train_set["images"].to(device)                                    # (N, H, W, 3)
    alphas = train_set["alpha"].to(device)                                     # (N, H, W)
    poses = train_set["poses"].to(device)
    H, W, focal = train_set["H"], train_set["W"], train_set["focal"]
    near, far = train_set["near"], train_set["far"]
    eval_at = sorted(float(s) for s in cfg.eval_at.split(",") if s) if cfg.eval_at else []
    eval_at = [s for s in eval_at if s > elapsed]

    @torch.no_grad()
    def swap_ema():   # exchange trained and averaged weights in place (CUDA graphs keep their addresses)
        for p, e in zip(params, ema):
            trained = p.clone()
            p.copy_(e), e.copy_(trained)

    def checkpoint(step):
        run.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                             "step": step, "elapsed": elapsed, "curve": curve, "n_rays": n_rays, "ema": ema,
                             "rng": common.rng_state()})

    amp = cfg.amp and device.type == "cuda"
    model.compile_seconds = 0.0
    if compiled:                                  # compile before the clock starts: one forward + backward
        t0, rng = time.perf_counter(), common.rng_state()
        rays_o, rays_d, _ = common.get_ray_batch(poses, H, W, focal, n_rays)
        bg = torch.rand_like(rays_o) if cfg.random_bkgd else None
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            render(model, rays_o, rays_d, near, far, train=True, bg=bg)["rgb"].sum().backward()
        opt.zero_grad(set_to_none=True)
        if cfg.field == "hashgrid":
            model.grid.update(grid_density)       # compiles the refresh too (one extra refresh of the new field)
        common.set_rng_state(rng)
        torch.cuda.synchronize()
        model.compile_seconds = time.perf_counter() - t0
        print(f"compiled in {model.compile_seconds:.0f} s (not counted as training time)")
    # Ctrl-C finishes the current step, saves a checkpoint and exits (a second Ctrl-C kills)
    ctrl_c = common.CtrlC()
    bar = common.progress(range(start, cfg.iters), initial=start, total=cfg.iters, desc="nerf")
    step = start
    for step in range(start, cfg.iters):
        t0 = time.perf_counter()
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()       # last step's graph outputs may be overwritten
        # --- 1. a batch of random rays (the centre crop first, for the MLP on lego) ---
        pix = None
        if step < cfg.precrop_iters:
            r = torch.randint(H // 4, H - H // 4, (n_rays,)) * W + torch.randint(W // 4, W - W // 4, (n_rays,))
            pix = r.to(device)
        rays_o, rays_d, (img, row, col) = common.get_ray_batch(poses, H, W, focal, n_rays, pix=pix,
                                                               jitter=cfg.jitter_pixels)
        target, bg = images[img, row, col], None                                # (R, 3)
        if cfg.random_bkgd:   # the image over a random colour: premultiplied colour + (1 - alpha) bg
            bg = torch.rand_like(target)
            target = target + (1 - alphas[img, row, col])[:, None] * (bg - float(cfg.white_bkgd))
        # --- 2. render, 3. loss: MSE on the fine (and coarse) colour, Sec. 5.3 ---
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out = render(model, rays_o, rays_d, near, far, train=True, bg=bg)
        ok = out["complete"][:, None].float() if "complete" in out else torch.ones_like(target[:, :1])
        mse = ((out["rgb"] - target) ** 2 * ok).sum() / (3 * ok.sum()).clamp(min=1)   # overflowed rays sit out
        loss = mse + (F.mse_loss(out["coarse"]["rgb"], target) if "coarse" in out else 0.0)
        # --- 4. step (the finite check after it: no host sync mid-step; a bad step is never saved) ---
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        common.check_finite(loss, step)
        if ema:
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1 - cfg.ema_decay)   # ema <- decay * ema + (1 - decay) * w
        # --- 5. occupancy grid refresh; adaptive batch (NGP): as many rays as fill --target-samples.
        #        With CUDA graphs every 16 steps, on a ladder of 2^(1/4) steps: each new shape records a graph ---
        if cfg.field == "hashgrid":
            if step % cfg.grid_every == 0:
                model.grid.update(grid_density)
            if not graphs or step % cfg.grid_every == 0:
                occupied, evaluated = out["per_ray"].tolist()
                fit = cfg.target_samples / max(evaluated, 1e-3)
                if graphs and cfg.early_stop:
                    fit = min(fit, cfg.scan_ratio * cfg.target_samples / max(occupied, 1e-3))
                fit = min(max(fit, 256), 2 ** 16)
                n_rays = round(2 ** (round(4 * math.log2(fit)) / 4)) if graphs else int(fit)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        step += 1
        # --- 6. log, checkpoint, timed evaluations ---
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{-10 * math.log10(mse.item()):.2f}")
        if eval_at and elapsed >= eval_at[0]:
            # SSIM only at the end; with --ema-decay the trained weights are scored too (what the average buys)
            raw = evaluate(model, test_set, device, cfg.test_views, with_ssim=False) if ema else {}
            swap_ema()
            res = evaluate(model, test_set, device, cfg.test_views, with_ssim=False)
            swap_ema()
            if raw:
                res["psnr_no_ema"] = raw["psnr"]
            curve.append({"seconds": round(elapsed, 2), "step": step, **res})
            bar.write(f"[{elapsed:6.1f}s, step {step}] test PSNR {res['psnr']:.2f} "
                      f"({res['eval_seconds']} s to evaluate)")
            eval_at = [s for s in eval_at if s > elapsed]
        if step % cfg.ckpt_every == 0 or ctrl_c.hit:
            checkpoint(step)
        if ctrl_c.hit or (cfg.time_budget and elapsed >= cfg.time_budget):
            break
    bar.close()
    checkpoint(step)
    model.rays_per_step = n_rays                  # the adapted batch at the end (reported in metrics.json)
    ctrl_c.close(run, step)
    swap_ema()                                    # export renders with the averaged weights
    return model, run, {"train": train_set, "val": val_set, "test": test_set}, step, elapsed, curve, device


# ================================================================================================
# Export: test renders, metrics, turntable video, mesh by marching cubes on the density
# ================================================================================================
@torch.no_grad()
def export(cfg, model, run, data, step, elapsed, curve, device):
    model.eval()
    test = evaluate(model, data["test"], device, cfg.test_views, save_dir=run.file("test"))
    val = evaluate(model, data["val"], device, cfg.test_views)
    metrics = {"test": test, "val": val, "iterations": step, "train_seconds": round(elapsed, 2),
               "iters_per_second": round(step / max(elapsed, 1e-9), 2),
               "compile_seconds": round(model.compile_seconds, 1), "rays_per_step": model.rays_per_step,
               "curve": curve, "device": str(device)}
    if device.type == "cuda":
        metrics["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    run.write_json("metrics.json", metrics)          # written again below with the mesh's size
    # turntable at 30 degrees elevation, at the training cameras' mean distance
    radius = data["train"]["poses"][:, :3, 3].norm(dim=-1).mean().item()
    frames = []
    for az in torch.linspace(-180, 180, cfg.video_frames + 1)[:-1]:
        c2w = common.pose_spherical(radius, 30.0, az).to(device)
        frames.append(render_image(model, c2w, data["test"]["H"], data["test"]["W"], data["test"]["focal"],
                                   data["test"]["near"], data["test"]["far"])[0])
    common.save_video(run.file("turntable.mp4"), frames)
    # mesh: marching cubes of the density; vertex colours seen from outside (looking at the centre)
    aabb = torch.tensor([[-cfg.bound] * 3, [cfg.bound] * 3])
    verts, faces, colors = common.density_mesh(model.density, lambda v: model.fine(v, -F.normalize(v, dim=-1))[1],
                                               aabb, cfg.mesh_res, cfg.mesh_level, device)
    if len(faces):
        common.save_ply(run.file("mesh.ply"), verts, colors, faces)
        common.save_obj(run.file("mesh.obj"), verts, faces, colors)
        metrics["mesh"] = {"vertices": len(verts), "faces": len(faces)}
    else:
        metrics["mesh"] = f"empty: the density never crosses --mesh-level {cfg.mesh_level}"
    run.write_json("metrics.json", metrics)
    print(f"test PSNR {test['psnr']:.2f}  SSIM {test['ssim']:.4f}  ({step} iterations, {elapsed:.0f} s) -> {run.path}")
    return metrics


def main(argv=None):
    with common.cli_errors():
        cfg = parse_args(argv)
        export(cfg, *train(cfg))


if __name__ == "__main__":
    main()
