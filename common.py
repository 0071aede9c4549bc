"""common.py -- the only code the method scripts share.

Nothing here knows which paper is calling. Sections, in reading order:
  1. Run plumbing       flags, run folder, seed, device, checkpoints, progress bar, writers
  2. Cameras and rays   look-at, spherical poses, intrinsics, rays (OpenGL / Blender convention)
  3. Data               the Blender-format (nerf_synthetic) loader
  4. Encodings          positional encoding, spherical harmonics, the multiresolution hash grid
  5. Volume rendering   stratified / inverse-CDF sampling, compositing, occupancy grid, ray marching
  6. Geometry           marching cubes (scikit-image)
  7. Metrics            PSNR, SSIM

Conventions: world is z-up; a camera looks down its -z axis with +y up (OpenGL / Blender);
`c2w` is a camera-to-world matrix (4, 4); images are float tensors in [0, 1], (H, W, 3).
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ================================================================================================
# 1. Run plumbing
# ================================================================================================


class UserError(Exception):
    """Bad input from the user: reported as one line `error: ...` and exit status 2."""


@contextlib.contextmanager
def cli_errors():
    """Wrap a script's main: a UserError becomes one clear line on stderr and exit code 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def add_run_flags(p: argparse.ArgumentParser, default_name: str):
    """Flags every script has: run name, output root, seed, device, resume."""
    g = p.add_argument_group("run")
    g.add_argument("--name", default=default_name, help="run name: outputs go to <out>/<script>/<name>/")
    g.add_argument("--out", default="out", help="root folder for run folders")
    g.add_argument("--seed", type=int, default=0, help="random seed (a CPU run repeats exactly)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    return p


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but MPS is not available")
    return dev


def seed_everything(seed: int):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RunDir:
    """The run folder `<out>/<script>/<name>/`. It is created on the first write, so a run that
    fails its input checks leaves nothing behind; every file is written atomically (tmp + rename)."""

    def __init__(self, out: str, script: str, name: str):
        self.path = os.path.join(out, script, name)

    def file(self, *parts) -> str:
        p = os.path.join(self.path, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def exists(self, *parts) -> bool:
        return os.path.exists(os.path.join(self.path, *parts))

    def write_json(self, rel: str, obj):
        with atomic_path(self.file(rel)) as tmp:
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2, default=_json_default)

    def save_checkpoint(self, state: dict, rel: str = "checkpoint.pt"):
        with atomic_path(self.file(rel)) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, rel: str = "checkpoint.pt", map_location="cpu") -> dict:
        p = os.path.join(self.path, rel)
        if not os.path.exists(p):
            raise UserError(f"--resume: no checkpoint at {p}")
        return torch.load(p, map_location=map_location, weights_only=False)


def _json_default(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    d, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix="." + base + ".", suffix=os.path.splitext(base)[1], dir=d or ".")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state() -> dict:
    """Every random stream a run draws from, for bit-exact `--resume` on the CPU."""
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def progress(it, **kw):
    """A tqdm progress bar (use `.set_postfix(loss=..)` for live numbers)."""
    from tqdm.auto import tqdm
    return tqdm(it, dynamic_ncols=True, **kw)


def check_finite(loss: torch.Tensor, step: int):
    """Stop the run with a clear message when the loss is NaN/inf (nothing more is written)."""
    if not torch.isfinite(loss).all():
        raise UserError(f"the loss became non-finite at step {step}; lower the learning rate "
                        "(--lr) or change --seed. The last good checkpoint is kept.")


# ---- writers: images, videos, point clouds, meshes ---------------------------------------------

def to_uint8(img) -> np.ndarray:
    """(H, W, C) float in [0, 1] (tensor or array) -> uint8 array."""
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu().numpy()
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_image(path: str, img):
    """Write an (H, W, 3|4) image in [0, 1] as PNG."""
    import imageio.v3 as iio
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, to_uint8(img), extension=".png")


def save_video(path: str, frames, fps: int = 24):
    """Write a list of (H, W, 3) frames in [0, 1] as .mp4 (or .gif by the extension)."""
    import imageio.v2 as iio2
    ext = os.path.splitext(path)[1]
    frames = [to_uint8(f) for f in frames]
    with atomic_path(path) as tmp:
        if ext == ".gif":
            iio2.mimsave(tmp, frames, format="GIF", duration=1000 / fps, loop=0)
        else:
            iio2.mimsave(tmp, frames, format="FFMPEG", fps=fps, macro_block_size=1,
                         output_params=["-pix_fmt", "yuv420p"])


def save_ply(path: str, points, colors=None, faces=None):
    """ASCII PLY of points (N, 3), optional colours (N, 3) in [0, 1] and triangles (M, 3)."""
    points = np.asarray(torch.as_tensor(points).detach().cpu(), dtype=np.float32)
    lines = ["ply", "format ascii 1.0", f"element vertex {len(points)}",
             "property float x", "property float y", "property float z"]
    if colors is not None:
        colors = to_uint8(torch.as_tensor(colors))
        lines += ["property uchar red", "property uchar green", "property uchar blue"]
    if faces is not None:
        faces = np.asarray(torch.as_tensor(faces).cpu(), dtype=np.int64)
        lines += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    lines.append("end_header")
    body = []
    for i, p in enumerate(points):
        row = f"{p[0]:.6f} {p[1]:.6f} {p[2]:.6f}"
        if colors is not None:
            row += f" {colors[i, 0]} {colors[i, 1]} {colors[i, 2]}"
        body.append(row)
    if faces is not None:
        body += [f"3 {f[0]} {f[1]} {f[2]}" for f in faces]
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(lines + body) + "\n")


def save_obj(path: str, verts, faces, colors=None):
    """Wavefront OBJ with optional per-vertex colours (`v x y z r g b`, read by MeshLab/Blender)."""
    verts = np.asarray(torch.as_tensor(verts).detach().cpu(), dtype=np.float32)
    faces = np.asarray(torch.as_tensor(faces).cpu(), dtype=np.int64)
    cols = None if colors is None else np.clip(np.asarray(torch.as_tensor(colors).detach().cpu()), 0, 1)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for i, v in enumerate(verts):
                c = "" if cols is None else f" {cols[i, 0]:.4f} {cols[i, 1]:.4f} {cols[i, 2]:.4f}"
                f.write(f"v {v[0]:.6f} {v[1]:.6f} {v[2]:.6f}{c}\n")
            for t in faces + 1:
                f.write(f"f {t[0]} {t[1]} {t[2]}\n")


# ================================================================================================
# 2. Cameras and rays (OpenGL / Blender: the camera looks down -z, +y is up; the world is z-up)
# ================================================================================================


def look_at(eye: torch.Tensor, target: torch.Tensor, up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """Camera-to-world matrices for cameras at `eye` (..., 3) looking at `target` (..., 3).
    Returns (..., 4, 4). The camera's -z axis points at the target."""
    eye, target = torch.as_tensor(eye, dtype=torch.float32), torch.as_tensor(target, dtype=torch.float32)
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    back = F.normalize(eye - target, dim=-1)                       # camera +z (points away from target)
    right = torch.cross(up, back, dim=-1)
    # looking straight along `up`: pick any perpendicular right vector
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, torch.tensor([0.0, 1.0, 0.0], device=eye.device).expand_as(right), right)
    right = F.normalize(right, dim=-1)
    cam_up = torch.cross(back, right, dim=-1)
    c2w = torch.zeros(eye.shape[:-1] + (4, 4), dtype=eye.dtype, device=eye.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = right, cam_up, back, eye
    c2w[..., 3, 3] = 1.0
    return c2w


def spherical_to_cartesian(radius, elevation_deg, azimuth_deg) -> torch.Tensor:
    """Point at `radius` with elevation above the xy-plane and azimuth from +x towards +y. (..., 3)"""
    r, el, az = (torch.as_tensor(v, dtype=torch.float32) for v in (radius, elevation_deg, azimuth_deg))
    el, az = torch.deg2rad(el), torch.deg2rad(az)
    return torch.stack([r * torch.cos(el) * torch.cos(az), r * torch.cos(el) * torch.sin(az),
                        r * torch.sin(el)], dim=-1)


def pose_spherical(radius, elevation_deg, azimuth_deg, target=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """c2w (..., 4, 4) of a camera on a sphere around `target`, looking at it, world z up.
    Azimuth 0 is the +x axis ("front" for the view-dependent prompts)."""
    eye = spherical_to_cartesian(radius, elevation_deg, azimuth_deg)
    target = torch.as_tensor(target, dtype=torch.float32).expand_as(eye)
    return look_at(eye + target, target)


def focal_from_fov(fov_deg, width: int):
    """Pinhole focal length in pixels from the horizontal field of view in degrees."""
    return 0.5 * width / math.tan(0.5 * math.radians(float(fov_deg)))


def sample_cameras(n: int, radius=(3.0, 3.5), elevation=(-10.0, 45.0), azimuth=(0.0, 360.0),
                   fov=(40.0, 40.0), generator=None, device="cpu"):
    """Random cameras on a sphere, each of (lo, hi) drawn uniformly.
    Returns dict c2w (n, 4, 4), radius/elevation/azimuth/fov (n,), degrees; azimuth wrapped to
    [-180, 180)."""
    def u(lo_hi):
        lo, hi = lo_hi if isinstance(lo_hi, (tuple, list)) else (lo_hi, lo_hi)
        return lo + (hi - lo) * torch.rand(n, generator=generator)
    r, el, az, fv = u(radius), u(elevation), u(azimuth), u(fov)
    az = (az + 180.0) % 360.0 - 180.0
    return {"c2w": pose_spherical(r, el, az).to(device), "radius": r.to(device),
            "elevation": el.to(device), "azimuth": az.to(device), "fov": fv.to(device)}


def pixel_directions(H: int, W: int, focal, device="cpu", cx=None, cy=None) -> torch.Tensor:
    """Camera-space ray directions through pixel centres, (H, W, 3): ((i-cx)/f, -(j-cy)/f, -1)."""
    cx = W / 2 if cx is None else cx
    cy = H / 2 if cy is None else cy
    j, i = torch.meshgrid(torch.arange(H, device=device, dtype=torch.float32) + 0.5,
                          torch.arange(W, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    return torch.stack([(i - cx) / focal, -(j - cy) / focal, -torch.ones_like(i)], dim=-1)


def get_rays(H: int, W: int, focal, c2w: torch.Tensor):
    """Rays for whole images. c2w (..., 4, 4) -> rays_o, rays_d each (..., H, W, 3).
    Directions are not normalised (their z component in camera space is -1), as in NeRF."""
    dirs = pixel_directions(H, W, focal, device=c2w.device)                      # (H, W, 3)
    R, t = c2w[..., None, None, :3, :3], c2w[..., None, None, :3, 3]
    rays_d = (R @ dirs[..., None])[..., 0]                                       # (..., H, W, 3)
    return t.expand_as(rays_d), rays_d


def get_ray_batch(c2w: torch.Tensor, H: int, W: int, focal, n: int, img_idx=None, pix=None,
                  generator=None):
    """A random batch of n rays from N posed images. c2w (N, 4, 4).
    Returns rays_o, rays_d (n, 3) and the (image, row, column) indices (n,) each, so the
    caller can gather target colours with images[img, row, col]."""
    N = c2w.shape[0]
    dev = c2w.device
    if img_idx is None:
        img_idx = torch.randint(0, N, (n,), generator=generator).to(dev)
    if pix is None:
        pix = torch.randint(0, H * W, (n,), generator=generator).to(dev)
    row, col = pix // W, pix % W
    d_cam = torch.stack([(col + 0.5 - W / 2) / focal, -(row + 0.5 - H / 2) / focal,
                         -torch.ones_like(col, dtype=torch.float32)], dim=-1).float()   # (n, 3)
    R = c2w[img_idx, :3, :3]
    rays_d = (R @ d_cam[..., None])[..., 0]
    rays_o = c2w[img_idx, :3, 3]
    return rays_o, rays_d, (img_idx, row, col)
