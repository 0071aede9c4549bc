"""common.py -- the only code the method scripts share.

Nothing here knows which paper is calling. Sections, in reading order:
  1. Run plumbing       flags, run folder, seed, device, checkpoints, progress bar, writers
  2. Cameras and rays   look-at, spherical poses, intrinsics, rays (OpenGL / Blender convention)
  3. Data               the Blender-format (nerf_synthetic) loader
  4. Encodings          positional encoding, spherical harmonics, the multiresolution hash grid
  5. Volume rendering   stratified / inverse-CDF sampling, compositing, occupancy grid, ray marching
  6. Geometry           marching cubes (scikit-image), rasteriser, tetrahedral grid, marching tets
  7. Metrics            PSNR, SSIM
  8. Priors             the CLIP prior (open_clip or the bundled toy), the toy-vocabulary guard
  9. Priors             the diffusion prior (diffusers or the bundled toy): SDS, sampling
 10. Text-to-3D         object field (density blob, albedo, normals), background, shading,
                        orientation loss, shaded volume rendering (DreamFusion, Magic3D)

Conventions: world is z-up; a camera looks down its -z axis with +y up (OpenGL / Blender);
`c2w` is a camera-to-world matrix (4, 4); images are float tensors in [0, 1], (H, W, 3).
"""
import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import tempfile

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


def add_config_flags(p: argparse.ArgumentParser, defaults: dict, source_file: str):
    """One `--flag` per key of a script's config block (`key=value,   # meaning`): the type comes
    from the value, booleans get --flag/--no-flag, and the help is the comment on the key's line
    in `source_file`. Defaults are None, so a preset can fill what the user did not set."""
    helps = {}
    with open(source_file) as f:
        for line in f:
            m = re.match(r"\s+(\w+)=.*?#\s*(.+)$", line)
            if m and m.group(1) in defaults:
                helps.setdefault(m.group(1), m.group(2).strip())
    g = p.add_argument_group("config (defaults before presets)")
    for k, v in defaults.items():
        text = f"{helps.get(k, '')} (default {v})".strip().replace("%", "%%")     # argparse formats help
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            g.add_argument(flag, type=type(v), default=None, help=text)
    return p


def resolve_config(args: argparse.Namespace, defaults: dict, preset: dict = None) -> argparse.Namespace:
    """defaults < preset < flags the user gave."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    return argparse.Namespace(**{**defaults, **(preset or {}), **given})


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
    os.makedirs(d or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + base + ".", suffix=os.path.splitext(base)[1], dir=d or ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
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
    """Restore rng_state()'s streams (the states may have been loaded onto any device)."""
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"].cpu())
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


def progress(it, **kw):
    """A tqdm progress bar (use `.set_postfix(loss=..)` for live numbers)."""
    from tqdm.auto import tqdm
    return tqdm(it, dynamic_ncols=True, **kw)


class CtrlC:
    """Ctrl-C during a training loop: the first press sets `.hit`, so the loop can finish its step,
    save a checkpoint and stop; a second press kills as usual."""

    def __init__(self):
        self.hit = False
        signal.signal(signal.SIGINT, self._press)

    def _press(self, *_):
        self.hit = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def close(self, run: "RunDir", step: int):
        """Restore Ctrl-C; if it was pressed, say where the checkpoint is and exit with code 130."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.hit:
            print(f"interrupted: checkpoint at step {step} saved in {run.path}; continue with --resume", file=sys.stderr)
            sys.exit(130)


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


def save_video(path: str, frames, fps: int = 24) -> str:
    """Write a list of (H, W, 3) frames in [0, 1] as .mp4 (or .gif by the extension); without
    ffmpeg (the imageio-ffmpeg package) an .mp4 becomes a .gif beside it. Returns the path written."""
    import imageio.v2 as iio2
    ext = os.path.splitext(path)[1]
    if ext != ".gif" and importlib.util.find_spec("imageio_ffmpeg") is None:
        print(f"note: imageio-ffmpeg is not installed; writing {os.path.basename(path)} as a .gif", file=sys.stderr)
        path, ext = os.path.splitext(path)[0] + ".gif", ".gif"
    frames = [to_uint8(f) for f in frames]
    with atomic_path(path) as tmp:
        if ext == ".gif":
            iio2.mimsave(tmp, frames, format="GIF", duration=1000 / fps, loop=0)
        else:
            iio2.mimsave(tmp, frames, format="FFMPEG", fps=fps, macro_block_size=1)
    return path


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
                  generator=None, jitter: bool = False):
    """A random batch of n rays from N posed images. c2w (N, 4, 4).
    Each ray goes through its pixel's centre, or with jitter through a uniform random point of the
    pixel (Instant-NGP's training rays: a pixel's colour is an average over its area).
    Returns rays_o, rays_d (n, 3) and the (image, row, column) indices (n,) each, so the
    caller can gather target colours with images[img, row, col]."""
    N = c2w.shape[0]
    dev = c2w.device
    at = dev if generator is None else generator.device          # draw where the numbers are used: no copy
    if img_idx is None:
        img_idx = torch.randint(0, N, (n,), generator=generator, device=at).to(dev)
    if pix is None:
        pix = torch.randint(0, H * W, (n,), generator=generator, device=at).to(dev)
    row, col = pix // W, pix % W
    u = torch.rand(2, n, generator=generator, device=at).to(dev) if jitter else (0.5, 0.5)   # offsets within the pixel
    d_cam = torch.stack([(col + u[0] - W / 2) / focal, -(row + u[1] - H / 2) / focal,
                         -torch.ones_like(col, dtype=torch.float32)], dim=-1).float()   # (n, 3)
    R = c2w[img_idx, :3, :3]
    rays_d = (R @ d_cam[..., None])[..., 0]
    rays_o = c2w[img_idx, :3, 3]
    return rays_o, rays_d, (img_idx, row, col)


# ================================================================================================
# 3. Data: Blender-format scenes (nerf_synthetic: transforms_{train,val,test}.json + RGBA PNGs)
# ================================================================================================


def load_blender(root: str, split: str, half_res: bool = False, white_bkgd: bool = True,
                 max_images: int = 0) -> dict:
    """Load one split of a Blender-format scene.

    Returns dict: images (N, H, W, 3) float32 in [0, 1] (composited over white if white_bkgd,
    else premultiplied over black), alpha (N, H, W), poses (N, 4, 4) c2w, H, W, focal (pixels),
    near 2, far 6.
    focal = 0.5 W / tan(0.5 camera_angle_x); half_res averages 2x2 pixels and halves the focal.
    Missing or malformed files raise UserError."""
    import imageio.v3 as iio
    path = os.path.join(root, f"transforms_{split}.json")
    if not os.path.isdir(root):
        raise UserError(f"scene folder not found: {root}")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: a Blender-format scene has transforms_{{train,val,test}}.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        angle = float(meta["camera_angle_x"])
        frames = meta["frames"]
        files = [os.path.join(root, fr["file_path"]) for fr in frames]
        poses = np.array([fr["transform_matrix"] for fr in frames], dtype=np.float32)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is malformed ({type(e).__name__}: {e})")
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(frames) == 0:
        raise UserError(f"{path}: expected a non-empty list of 4x4 transform_matrix entries")
    if max_images:
        files, poses = files[:max_images], poses[:max_images]
    imgs, alphas = [], []
    for fp in files:
        fp = fp if os.path.splitext(fp)[1] else fp + ".png"
        if not os.path.exists(fp):
            raise UserError(f"image listed in {path} not found: {fp}")
        im = iio.imread(fp).astype(np.float32) / 255.0                      # (H, W, 4)
        if im.ndim != 3 or im.shape[2] not in (3, 4):
            raise UserError(f"{fp}: expected an RGB or RGBA image")
        if im.shape[2] == 3:
            im = np.concatenate([im, np.ones_like(im[..., :1])], -1)
        if half_res:  # 2x2 area average on premultiplied colour
            h, w = im.shape[0] // 2 * 2, im.shape[1] // 2 * 2
            pm = np.concatenate([im[:h, :w, :3] * im[:h, :w, 3:], im[:h, :w, 3:]], -1)
            pm = pm.reshape(h // 2, 2, w // 2, 2, 4).mean((1, 3))
            im = np.concatenate([pm[..., :3] / np.maximum(pm[..., 3:], 1e-8), pm[..., 3:]], -1)
        rgb, a = im[..., :3], im[..., 3:]
        imgs.append(rgb * a + (1.0 - a) if white_bkgd else rgb * a)
        alphas.append(a[..., 0])
    images = torch.from_numpy(np.stack(imgs))
    H, W = images.shape[1:3]
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise UserError(f"{root}: images of split {split} differ in size: {shapes}")
    return {"images": images, "alpha": torch.from_numpy(np.stack(alphas)), "poses": torch.from_numpy(poses),
            "H": H, "W": W, "focal": 0.5 * W / math.tan(0.5 * angle), "near": 2.0, "far": 6.0}


# ================================================================================================
# 4. Encodings
# ================================================================================================


def positional_encoding(x: torch.Tensor, n_freqs: int, include_input: bool = True) -> torch.Tensor:
    """NeRF Eq. 4: gamma(p) = (p, sin(2^k p), cos(2^k p)) for k = 0..L-1 (no pi factor, as the
    official code). x (..., C) -> (..., C (2 L + 1)) with include_input."""
    freqs = 2.0 ** torch.arange(n_freqs, device=x.device, dtype=x.dtype)     # (L,)
    xf = (x[..., None, :] * freqs[:, None]).flatten(-2)                       # (..., L C)
    out = [torch.sin(xf), torch.cos(xf)]
    return torch.cat(([x] if include_input else []) + out, dim=-1)


def positional_encoding_dim(n_freqs: int, channels: int = 3) -> int:
    """Width of positional_encoding's output (with the input): C (2 L + 1)."""
    return channels * (2 * n_freqs + 1)


def sh_encoding(d: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics of degree 4 (bands 0..3, 16 values) of unit directions (..., 3)."""
    x, y, z = d.unbind(-1)
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.4886025119029199 * y, 0.4886025119029199 * z, -0.4886025119029199 * x,
        1.0925484305920792 * xy, -1.0925484305920792 * yz, 0.31539156525252005 * (2 * zz - xx - yy),
        -1.0925484305920792 * xz, 0.5462742152960396 * (xx - yy),
        -0.5900435899266435 * y * (3 * xx - yy), 2.890611442640554 * xy * z,
        -0.4570457994644658 * y * (4 * zz - xx - yy), 0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy),
        -0.4570457994644658 * x * (4 * zz - xx - yy), 1.445305721320277 * z * (xx - yy),
        -0.5900435899266435 * x * (xx - 3 * yy)], dim=-1)


HASH_PRIMES = (1, 2654435761, 805459861)   # Instant-NGP's spatial hash: XOR_i x_i * pi_i mod T


class HashGrid(nn.Module):
    """Multiresolution hash encoding (Instant-NGP, Sec. 3), in plain PyTorch.

    Level l has resolution N_l = floor(N_min * b^l), b = exp((ln N_max - ln N_min) / (L - 1)),
    and (N_l + 1)^3 grid vertices. A level whose vertices fit in the table size T is indexed
    densely (x + y (N_l+1) + z (N_l+1)^2); finer levels are hashed (NGP Eq. 4). All levels live
    in one parameter table (sum of level sizes, F), initialised U(-1e-4, 1e-4). The 8 corners of
    a cell are formed by broadcasting per-axis terms (N, L, 2) against each other, so the work is
    a handful of tensor ops over (points, levels, 8) that torch.compile can fuse.
    """

    def __init__(self, n_levels=16, n_features=2, log2_table=19, base_res=16, max_res=2048):
        super().__init__()
        T = 2 ** log2_table
        b = math.exp((math.log(max_res) - math.log(base_res)) / max(n_levels - 1, 1))
        res = [int(math.floor(base_res * b ** l)) for l in range(n_levels)]
        sizes = [min(T, (r + 1) ** 3) for r in res]
        self.n_levels, self.n_features, self.table_size = n_levels, n_features, T
        self.n_dense = sum((r + 1) ** 3 <= T for r in res)                 # coarse levels come first
        self.out_dim = n_levels * n_features
        self.register_buffer("res", torch.tensor(res, dtype=torch.float32), persistent=False)
        self.register_buffer("offsets", torch.tensor([0] + sizes[:-1]).cumsum(0), persistent=False)
        self.table = nn.Parameter(torch.empty(sum(sizes), n_features).uniform_(-1e-4, 1e-4))

    def corner_rows(self, lo: torch.Tensor) -> torch.Tensor:
        """Lower cell corners (N, L, 3) int64 -> table rows of the 8 corners (N, L, 2, 2, 2) int32.
        Each axis gives one term per coordinate (x_i and x_i + 1, shape (N, L, 2)); only their sum
        (dense) or XOR (hashed) spans all 8 corners, and runs in int32: a third of the time in int64."""
        c = torch.stack([lo, lo + 1], -1)                                  # (N, L, 3, 2): x_i, x_i + 1
        nd = self.n_dense
        r1 = (self.res[:nd].long() + 1)[:, None]                           # dense: x + y r1 + z r1^2 + offset
        dense = [c[:, :nd, 0] + self.offsets[:nd, None], c[:, :nd, 1] * r1, c[:, :nd, 2] * r1 * r1]
        # NGP Eq. 4, (XOR_i x_i pi_i) mod T; the mod (T a power of 2) is a mask, taken per axis before the XOR
        hashed = [(c[:, nd:, i] * HASH_PRIMES[i]) & (self.table_size - 1) for i in range(3)]
        dx, dy, dz = (t.int() for t in dense)
        hx, hy, hz = (t.int() for t in hashed)
        dense = dx[..., :, None, None] + dy[..., None, :, None] + dz[..., None, None, :]
        hashed = (hx[..., :, None, None] ^ hy[..., None, :, None] ^ hz[..., None, None, :]) \
            + self.offsets[nd:, None, None, None].int()
        return torch.cat([dense, hashed], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3) in [0, 1]^3 -> features (N, L * F), trilinearly interpolated per level."""
        pos = x.float()[:, None, :].clamp(0, 1) * self.res[None, :, None]          # (N, L, 3)
        lo = pos.floor().clamp(max=(self.res - 1)[None, :, None])
        frac = pos - lo
        w1 = torch.stack([1 - frac, frac], -1)                                     # (N, L, 3, 2)
        w = w1[:, :, 0, :, None, None] * w1[:, :, 1, None, :, None] * w1[:, :, 2, None, None, :]
        rows = self.corner_rows(lo.long())                                         # (N, L, 2, 2, 2)
        # index_select: its backward (index_add) is deterministic on the CPU, unlike table[rows]
        feats = self.table.index_select(0, rows.reshape(-1).long()).reshape(*rows.shape, self.n_features)
        return (feats * w[..., None]).sum((2, 3, 4)).flatten(1)                   # (N, L F)


class _TruncExp(torch.autograd.Function):
    """exp with a clamped gradient (Instant-NGP's density activation): stable for large inputs."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


class ResBlock(nn.Module):
    """A pre-norm residual block of the text-to-3D fields (Dream Fields' official MLP; DreamFusion's
    --field mlp): x + W_down swish(W_up LayerNorm(x)), widening to 2x inside.
    x (N, width) -> (N, width)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(self.norm(x))))


def residual_mlp(in_dim: int, width: int, n_blocks: int, out_dim: int = 4) -> nn.Sequential:
    """Dense -> n_blocks ResBlocks -> LayerNorm -> Dense: (N, in_dim) -> (N, out_dim)."""
    return nn.Sequential(nn.Linear(in_dim, width), *[ResBlock(width) for _ in range(n_blocks)],
                         nn.LayerNorm(width), nn.Linear(width, out_dim))


# ================================================================================================
# 5. Volume rendering
# ================================================================================================


def stratified_samples(near, far, n_rays: int, n_samples: int, perturb: bool, device="cpu"):
    """NeRF Eq. 2: n_samples depths per ray, one uniform draw in each of n equal bins
    (bin midpoints when perturb is False). Returns t (n_rays, n_samples)."""
    edges = torch.linspace(0, 1, n_samples + 1, device=device)
    u = torch.rand(n_rays, n_samples, device=device) if perturb else torch.full((n_rays, n_samples), 0.5, device=device)
    frac = edges[:-1] + (edges[1:] - edges[:-1]) * u
    return near + (far - near) * frac


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n: int, deterministic: bool = False):
    """Hierarchical sampling (NeRF Sec. 5.2): inverse-CDF samples of the piecewise-constant pdf
    given by `weights` (R, B) over intervals with edges `bins` (R, B + 1). Returns (R, n)."""
    w = weights + 1e-5                                                      # no zero-probability bin
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], -1)     # (R, B + 1)
    if deterministic:
        u = torch.linspace(0, 1, n, device=bins.device).expand(bins.shape[0], n).contiguous()
    else:
        u = torch.rand(bins.shape[0], n, device=bins.device)
    idx = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    b0, b1 = bins.gather(-1, idx - 1), bins.gather(-1, idx)
    frac = (u - c0) / (c1 - c0).clamp(min=1e-8)
    return b0 + frac * (b1 - b0)


def composite(sigma: torch.Tensor, rgb: torch.Tensor, deltas: torch.Tensor, t: torch.Tensor = None,
              background=None) -> dict:
    """NeRF Eq. 3: alpha_i = 1 - exp(-sigma_i delta_i), T_i = prod_{j<i} (1 - alpha_j),
    w_i = T_i alpha_i, C = sum_i w_i c_i + (1 - sum_i w_i) * background.

    sigma, deltas (R, S); rgb (R, S, 3); t (R, S) for the depth; background (R, 3), (3,) or None.
    Returns rgb (R, 3), depth (R,), opacity (R,), weights (R, S), transmittance (R, S)."""
    tau = sigma * deltas                                                      # optical thickness
    alpha = 1.0 - torch.exp(-tau)
    # exclusive cumulative sum: T_i = exp(-sum_{j<i} tau_j), computed in log space for stability
    trans = torch.exp(-torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1]], -1).cumsum(-1))
    weights = trans * alpha                                                   # (R, S)
    opacity = weights.sum(-1)
    out = {"rgb": (weights[..., None] * rgb).sum(-2), "opacity": opacity, "weights": weights,
           "transmittance": trans}
    if t is not None:
        out["depth"] = (weights * t).sum(-1)
    if background is not None:
        out["rgb"] = out["rgb"] + (1.0 - opacity)[:, None] * background
    return out


def deltas_from_t(t: torch.Tensor, rays_d: torch.Tensor, last: float = 1e10) -> torch.Tensor:
    """Distances between consecutive samples (R, S), in world units (scaled by |d|); the last
    interval is `last` (1e10 in NeRF: the final sample absorbs what is left)."""
    d = torch.cat([t[:, 1:] - t[:, :-1], torch.full_like(t[:, :1], last)], -1)
    return d * rays_d.norm(dim=-1, keepdim=True)


def ray_aabb(rays_o: torch.Tensor, rays_d: torch.Tensor, aabb: torch.Tensor):
    """Slab test against the box aabb (2, 3). Returns t_near, t_far (R,) (t_far < t_near: a miss)."""
    inv = 1.0 / torch.where(rays_d.abs() < 1e-9, torch.full_like(rays_d, 1e-9), rays_d)
    t0, t1 = (aabb[0] - rays_o) * inv, (aabb[1] - rays_o) * inv
    return torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)


class OccupancyGrid(nn.Module):
    """Instant-NGP's occupancy grid (Sec. 4, "accelerated ray marching"): a res^3 grid over the
    aabb holding an exponential moving maximum of the density; samples in cells whose value is
    below min(threshold, mean) are skipped. The mask is dilated by one cell, so a cell that
    touches density seen in a neighbouring cell is never skipped."""

    def __init__(self, aabb, res: int = 128, decay: float = 0.95, threshold: float = 0.01):
        super().__init__()
        self.res, self.decay, self.threshold = res, decay, threshold
        self.register_buffer("aabb", torch.as_tensor(aabb, dtype=torch.float32))
        self.register_buffer("density", torch.zeros(res, res, res))
        self.register_buffer("mask", torch.ones(res, res, res, dtype=torch.bool))

    def cell_centres(self, jitter: bool) -> torch.Tensor:
        r = self.res
        idx = torch.stack(torch.meshgrid(*[torch.arange(r, device=self.aabb.device)] * 3, indexing="ij"), -1)
        u = (idx.float() + (torch.rand_like(idx.float()) if jitter else 0.5)) / r     # (r, r, r, 3)
        return self.aabb[0] + u * (self.aabb[1] - self.aabb[0])

    @torch.no_grad()
    def update(self, density_fn, chunk: int = 2 ** 20):
        """density <- max(decay * density, sigma(random point in each cell)); refresh the mask."""
        x = self.cell_centres(jitter=True).reshape(-1, 3)
        sigma = torch.cat([density_fn(x[i:i + chunk]).float().reshape(-1) for i in range(0, len(x), chunk)])
        if not torch.isfinite(sigma).all():   # NaN would silently read as empty space
            raise UserError("the field's density became non-finite (NaN/inf); lower the learning rate (--lr)")
        self.density.copy_(torch.maximum(self.density * self.decay, sigma.reshape(self.density.shape)))
        occupied = self.density > min(self.threshold, self.density.mean().item())
        self.mask.copy_(F.max_pool3d(occupied[None, None].float(), 3, 1, 1)[0, 0] > 0)   # in place: CUDA graphs read it

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Points (..., 3) -> bool (...): inside the aabb and in an occupied cell."""
        u = (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        inside = ((u >= 0) & (u < 1)).all(-1)
        ijk = (u * self.res).long().clamp(0, self.res - 1)
        return inside & self.mask[ijk[..., 0], ijk[..., 1], ijk[..., 2]]


def packed_transmittance(tau: torch.Tensor, ray: torch.Tensor, n_rays: int) -> torch.Tensor:
    """T_i = exp(-sum_{j<i, same ray} tau_j) for samples packed ray after ray (NeRF Eq. 3's T_i).
    tau (N,) optical thickness sigma * delta; ray (N,) non-decreasing ray index. Returns (N,)."""
    tau64 = tau.double()                                     # fp64: the running sum spans all rays
    before = tau64.cumsum(0) - tau64                         # sum of tau over all earlier samples
    ones = torch.ones_like(ray)                              # samples per ray: bincount without its host sync
    counts = torch.zeros(n_rays, dtype=torch.long, device=ray.device).index_add_(0, ray, ones)
    first = (counts.cumsum(0) - counts).clamp(max=max(len(tau) - 1, 0))   # each ray's first sample
    start = before[first] if len(tau) else before.new_zeros(n_rays)
    return torch.exp(-(before - start[ray])).to(tau.dtype)


def composite_packed(sigma: torch.Tensor, rgb: torch.Tensor, deltas: torch.Tensor, t: torch.Tensor,
                     ray: torch.Tensor, n_rays: int, background=None) -> dict:
    """composite() for samples packed ray after ray (what empty-space skipping leaves): no
    (R, S) tensors, so skipped samples cost nothing. sigma, deltas, t (N,); rgb (N, 3);
    ray (N,) the ray of each sample, non-decreasing, samples in marching order within a ray.
    Returns rgb (R, 3), depth (R,), opacity (R,) and weights (N,)."""
    trans = packed_transmittance(sigma * deltas, ray, n_rays)
    weights = trans * (1.0 - torch.exp(-sigma * deltas))      # w_i = T_i alpha_i
    zeros = torch.zeros(n_rays, device=sigma.device, dtype=weights.dtype)
    opacity = zeros.index_add(0, ray, weights)
    out = {"rgb": torch.zeros(n_rays, 3, device=sigma.device, dtype=weights.dtype).index_add(0, ray, weights[:, None] * rgb),
           "depth": zeros.index_add(0, ray, weights * t), "opacity": opacity, "weights": weights}
    if background is not None:
        out["rgb"] = out["rgb"] + (1.0 - opacity)[:, None] * background
    return out


def render_rays(field, rays_o: torch.Tensor, rays_d: torch.Tensor, t: torch.Tensor,
                deltas: torch.Tensor, mask: torch.Tensor = None, background=None) -> dict:
    """Evaluate `field(x (N, 3), d (N, 3)) -> (sigma (N,), rgb (N, 3))` at the samples
    o + t d (R, S) and composite them. With a boolean `mask` (R, S) only the masked samples are
    evaluated and composited, packed (empty space skipping: render_packed); without, composite()'s dict."""
    R, S = t.shape
    if mask is None:
        pts = rays_o[:, None, :] + t[..., None] * rays_d[:, None, :]          # (R, S, 3)
        dirs = F.normalize(rays_d, dim=-1)[:, None, :].expand(R, S, 3)
        sigma, rgb = field(pts.reshape(-1, 3), dirs.reshape(-1, 3))
        return composite(sigma.reshape(R, S), rgb.reshape(R, S, 3), deltas, t, background)
    ray, step, _ = pack_mask(mask)
    return render_packed(field, rays_o, rays_d, t, deltas, ray, step, background)


def pack_mask(mask: torch.Tensor, capacity: int = None):
    """The (ray, step) indices of the True entries of mask (R, S), ray after ray.

    capacity None: exactly those (torch.nonzero: its length depends on the data, a host sync).
    capacity an int: a buffer of exactly `capacity` entries and no host sync (static shapes, so a
    step can be replayed as a CUDA graph): entry k holds the (k+1)-th True entry, found by binary
    search in the running count. True entries past the capacity are dropped, the last rays' first;
    unused entries are dummies with rays R, R + 1, ... (one each, so that summing per ray never
    piles them onto one address) and step 0.
    Returns ray (N,), step (N,) and complete (R,) bool: the ray kept all its samples."""
    R, S = mask.shape
    if capacity is None:
        ray, step = mask.nonzero(as_tuple=True)
        return ray, step, torch.ones(R, dtype=torch.bool, device=mask.device)
    count = mask.reshape(-1).cumsum(0)                                    # (R S,) True entries so far
    k = torch.arange(capacity, device=mask.device)
    idx = torch.searchsorted(count, k + 1)                                # R S: there is no (k+1)-th
    ray = torch.where(idx < R * S, idx // S, R + k)
    return ray, idx % S, count.reshape(R, S)[:, -1] <= capacity


def render_packed(field, rays_o: torch.Tensor, rays_d: torch.Tensor, t: torch.Tensor, deltas: torch.Tensor,
                  ray: torch.Tensor, step: torch.Tensor, background=None) -> dict:
    """Evaluate and composite only the samples (ray, step) (N,) of t, deltas (R, S), as pack_mask
    gives them; dummy samples (ray >= R) are evaluated (at ray R - 1's points) and thrown away.
    Returns rgb (R, 3), depth (R,), opacity (R,) and weights (N,) (composite_packed)."""
    R = rays_o.shape[0]
    r = ray.clamp(max=R - 1)
    ts = t[r, step]
    pts = rays_o[r] + ts[:, None] * rays_d[r]                                   # (N, 3)
    sigma, rgb = field(pts, F.normalize(rays_d, dim=-1)[r])
    out = composite_packed(sigma, rgb, deltas[r, step], ts, ray, R + len(ray))  # + a bin per dummy
    out.update(rgb=out["rgb"][:R], depth=out["depth"][:R], opacity=out["opacity"][:R])
    if background is not None:
        out["rgb"] = out["rgb"] + (1.0 - out["opacity"])[:, None] * background
    return out


# ================================================================================================
# 6. Geometry
# ================================================================================================
# Section for common.py: Geometry -- a differentiable triangle rasteriser, tetrahedral grids,
# differentiable marching tetrahedra and mesh regularisers (Magic3D's fine stage, DMTet).
#
# Everything is plain PyTorch (no custom CUDA), so it runs on CPU, CUDA and MPS alike.
#
# Rasteriser in three steps, after nvdiffrast (Laine et al., 2020):
#   rasterize    which triangle each pixel sees (no gradient: bounding-box candidates, edge functions,
#                a depth test by scatter-min), then differentiable barycentrics of that triangle
#   interpolate  vertex attributes at each pixel from those barycentrics (gradient to attributes and,
#                through the barycentrics, to vertex positions)
#   antialias    blends colours across silhouette edges by how far the edge is between two pixel centres,
#                the only place where the *outline* of the mesh passes gradient to the geometry
# Cameras follow common.py: OpenGL convention, the camera looks down -z, +y up; pixel (row j, column i)
# is seen along the ray common.get_rays gives for it, and row 0 is the top of the image.



@torch.no_grad()
def grid_points(aabb, res: int) -> torch.Tensor:
    """Vertices of a res^3 lattice spanning the box aabb (2, 3): (res, res, res, 3), index ijk."""
    aabb = torch.as_tensor(aabb, dtype=torch.float32)
    axes = [torch.linspace(float(aabb[0, i]), float(aabb[1, i]), res) for i in range(3)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


@torch.no_grad()
def marching_cubes(values: torch.Tensor, level: float, aabb):
    """Iso-surface of a scalar field sampled on grid_points(aabb, res): values (res, res, res).
    Returns verts (V, 3) in world units and faces (F, 3) (scikit-image's Lewiner marching cubes),
    or empty tensors when the level is not crossed. Right-hand face normals point towards higher values."""
    from skimage import measure
    v = values.detach().float().cpu().numpy()
    if not (v.min() < level < v.max()):
        return torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)
    aabb = torch.as_tensor(aabb, dtype=torch.float32)
    spacing = ((aabb[1] - aabb[0]) / (v.shape[0] - 1)).tolist()
    verts, faces, _, _ = measure.marching_cubes(v, level=level, spacing=spacing)
    return torch.from_numpy(verts.copy()).float() + aabb[0], torch.from_numpy(faces.copy()).long()


def perspective(focal, H: int, W: int, near: float = 0.1, far: float = 100.0) -> torch.Tensor:
    """OpenGL projection matrix (..., 4, 4) for a pinhole camera with the principal point at the image
    centre (as common.pixel_directions). focal: float or (B,) tensor, in pixels.
    Camera point (x, y, z, 1) -> clip (x', y', z', w') with w' = -z (depth in front of the camera),
    x'/w' = 2 f x / (W (-z)), y'/w' = 2 f y / (H (-z)), z'/w' in [-1, 1] between near and far."""
    f = torch.as_tensor(focal, dtype=torch.float32)
    P = torch.zeros(f.shape + (4, 4))
    P[..., 0, 0] = 2.0 * f / W
    P[..., 1, 1] = 2.0 * f / H
    P[..., 2, 2] = -(far + near) / (far - near)
    P[..., 2, 3] = -2.0 * far * near / (far - near)
    P[..., 3, 2] = -1.0
    return P


def project_to_clip(verts: torch.Tensor, c2w: torch.Tensor, focal, H: int, W: int,
                    near: float = 0.1, far: float = 100.0) -> torch.Tensor:
    """World-space vertices (V, 3) or (B, V, 3) seen by cameras c2w (B, 4, 4) -> clip coordinates
    (B, V, 4), so that the pixel rasterize() shows a point at is the pixel whose common.get_rays ray
    passes through it. clip = P @ w2c @ (x, y, z, 1)."""
    c2w = c2w.reshape(-1, 4, 4)
    P = perspective(focal, H, W, near, far).to(c2w).expand(c2w.shape[0], 4, 4)
    full = P @ torch.linalg.inv(c2w)                                               # (B, 4, 4)
    verts = verts.to(c2w.dtype)
    homog = torch.cat([verts, torch.ones_like(verts[..., :1])], dim=-1)            # ([B,] V, 4)
    return homog.expand(c2w.shape[0], -1, 4) @ full.transpose(1, 2)               # (B, V, 4)


def pixel_ndc(H: int, W: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Pixel centres in homogeneous normalised device coordinates (x, y, 1), (H, W, 3): x from -1 (left)
    to 1 (right), y from 1 (top row) to -1 (bottom row)."""
    j, i = torch.meshgrid(torch.arange(H, device=device, dtype=dtype) + 0.5,
                          torch.arange(W, device=device, dtype=dtype) + 0.5, indexing="ij")
    return torch.stack([2.0 * i / W - 1.0, 1.0 - 2.0 * j / H, torch.ones_like(i)], dim=-1)


def _edge_functions(tri_clip: torch.Tensor) -> torch.Tensor:
    """Homogeneous edge functions (Olano & Greer, 1997) of triangles given by their clip-space vertices
    (..., 3, 4). Returns e (..., 3, 3) with e_k = c_{k+1} x c_{k+2}, c_k = (x_k, y_k, w_k).
    For a pixel at NDC p = (px, py, 1), d_k = e_k . p is proportional to the perspective-correct
    barycentric of vertex k: lambda_k = d_k / sum_j d_j (Eq. E1), and d_k = 0 on the projected edge
    opposite vertex k (it is an affine function of the pixel position)."""
    c = torch.cat([tri_clip[..., :2], tri_clip[..., 3:]], dim=-1)                  # (..., 3, 3)
    return torch.cross(c.roll(-1, dims=-2), c.roll(-2, dims=-2), dim=-1)


def _orientation(tri_clip: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """det(c_0, c_1, c_2) = c_0 . e_0 of triangles (..., 3, 4) with edge functions e (..., 3, 3): its sign
    is the sign every d_k takes inside the triangle (front or back facing), 0 for a degenerate one."""
    c0 = torch.cat([tri_clip[..., 0, :2], tri_clip[..., 0, 3:]], dim=-1)          # (..., 3)
    return (c0 * e[..., 0, :]).sum(-1)


def _visible_triangles(verts_clip: torch.Tensor, faces: torch.Tensor, H: int, W: int,
                       chunk: int = 1 << 23) -> torch.Tensor:
    """Which triangle each pixel sees, without gradient. (B, V, 4), (F, 3) -> (B, H, W) long, -1 for
    background. Triangles with a vertex behind the camera (w <= 0) are dropped, pixels outside
    near/far (|z/w| > 1) are clipped.
    1. Screen-space bounding box of each triangle -> its (triangle, pixel) candidate pairs.
    2. Coverage: all three edge functions d_k have the triangle's orientation sign.
    3. Depth test: scatter-min of the key (depth bits << 32 | triangle) per pixel."""
    B, Fn = verts_clip.shape[0], faces.shape[0]
    dev = verts_clip.device
    tri = verts_clip[:, faces]                                                     # (B, F, 3, 4)
    w = tri[..., 3]
    e = _edge_functions(tri)                                                       # (B, F, 3, 3)
    det = _orientation(tri, e)                                                     # (B, F)
    ok = (w > 1e-8).all(-1) & (det != 0)
    w_safe = torch.where(ok[..., None], w, torch.ones_like(w))
    sx = ((tri[..., 0] / w_safe + 1.0) * 0.5 * W).clamp(-1.0, W + 1.0)             # (B, F, 3) screen x
    sy = ((1.0 - tri[..., 1] / w_safe) * 0.5 * H).clamp(-1.0, H + 1.0)             # screen y (down)
    # pixel centres (i + 0.5, j + 0.5) inside the box: i in [ceil(min - 0.5), floor(max - 0.5)]
    i0 = torch.ceil(sx.amin(-1) - 0.5).clamp(min=0).long()
    i1 = torch.floor(sx.amax(-1) - 0.5).clamp(max=W - 1).long()
    j0 = torch.ceil(sy.amin(-1) - 0.5).clamp(min=0).long()
    j1 = torch.floor(sy.amax(-1) - 0.5).clamp(max=H - 1).long()
    nx, ny = (i1 - i0 + 1).clamp(min=0), (j1 - j0 + 1).clamp(min=0)
    counts = torch.where(ok, nx * ny, 0).flatten()                                 # (B*F,)
    nx, i0, j0 = nx.flatten(), i0.flatten(), j0.flatten()
    e, z, w = e.reshape(-1, 3, 3), tri[..., 2].reshape(-1, 3), w.reshape(-1, 3)
    sign = det.sign().flatten()

    ends = counts.cumsum(0)
    starts = ends - counts
    total = int(ends[-1]) if ends.numel() else 0
    runs = [(0, B * Fn, total)]
    if total > chunk:   # split the triangles into runs of about `chunk` candidate pairs
        cuts = torch.searchsorted(ends, torch.arange(chunk, total, chunk, device=dev), right=True)
        bounds = torch.unique(torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), B * Fn)]))
        lo, hi = bounds[:-1], bounds[1:]
        runs = list(zip(lo.tolist(), hi.tolist(), (ends[hi - 1] - starts[lo]).tolist()))
    NONE = torch.iinfo(torch.int64).max
    best = torch.full((B * H * W,), NONE, dtype=torch.int64, device=dev)
    for lo, hi, n in runs:
        if n == 0:
            continue
        g = torch.repeat_interleave(torch.arange(lo, hi, device=dev), counts[lo:hi], output_size=n)
        k = torch.arange(n, device=dev) - (starts[g] - starts[lo])                 # index inside the box
        col, row = i0[g] + k % nx[g], j0[g] + k // nx[g]
        p = torch.stack([(2 * col + 1).to(e.dtype) / W - 1.0, 1.0 - (2 * row + 1).to(e.dtype) / H,
                         torch.ones(n, device=dev, dtype=e.dtype)], dim=-1)        # (n, 3) NDC
        d = (e[g] * p[:, None, :]).sum(-1)                                         # (n, 3) Eq. E1
        zndc = (d * z[g]).sum(-1) / (d * w[g]).sum(-1)                             # z/w at the pixel
        inside = ((d * sign[g, None]) >= 0).all(-1) & (zndc.abs() <= 1.0)
        # Depth test: floats >= 0 order like their bit patterns, so (z/w + 2) can lead the key
        depth_bits = (zndc.float() + 2.0).clamp(1.0, 3.0).view(torch.int32).long()
        key = torch.where(inside, (depth_bits << 32) | (g % Fn), NONE)
        pix = (g // Fn) * (H * W) + row * W + col
        best.scatter_reduce_(0, pix, key, reduce="amin")
    tri_id = torch.where(best == NONE, -1, best & 0xFFFFFFFF)
    return tri_id.view(B, H, W)


def _gather_triangles(verts: torch.Tensor, faces: torch.Tensor, tri_id: torch.Tensor) -> torch.Tensor:
    """Vertices (B, V, C), or (V, C) shared by the batch, of the triangle tri_id (B, H, W) each pixel
    sees -> (B, H, W, 3, C). Background pixels get arbitrary vertices (callers mask them out), spread
    over the mesh so that the backward pass (index_select's scatter-add) does not pile them all onto
    one vertex."""
    idx = faces[tri_id.clamp(min=0)]                                               # (B, H, W, 3)
    if verts.dim() == 3:
        B, V, C = verts.shape
        idx = idx + V * torch.arange(B, device=verts.device).view(B, 1, 1, 1)
        verts = verts.reshape(B * V, C)
    spread = torch.arange(idx.numel(), device=idx.device).view(idx.shape) % verts.shape[0]
    idx = torch.where((tri_id >= 0)[..., None], idx, spread)
    return verts.index_select(0, idx.flatten()).view(idx.shape + verts.shape[-1:])


def rasterize(verts_clip: torch.Tensor, faces: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Rasterise triangles faces (F, 3) with clip-space vertices verts_clip (B, V, 4) (see
    project_to_clip) into rast (B, H, W, 4) = (u, v, z/w, triangle id + 1), 0 in all four on background.
    u, v are the perspective-correct barycentrics of the triangle's vertices 0 and 1 (vertex 2 gets
    1 - u - v); they and z/w carry gradient to verts_clip (Eq. E1), so interpolate() does too.
    The triangle id is stored as a float: exact up to 2^24 triangles. A triangle with a vertex behind
    the camera is skipped whole (no near-plane clipping): keep the near plane in front of the mesh."""
    with torch.no_grad():
        tri_id = _visible_triangles(verts_clip.detach(), faces, H, W)               # (B, H, W)
    hit = tri_id >= 0
    tri = _gather_triangles(verts_clip, faces, tri_id)                             # (B, H, W, 3, 4)
    p = pixel_ndc(H, W, verts_clip.device, verts_clip.dtype)                       # (H, W, 3)
    d = (_edge_functions(tri) * p[:, :, None, :]).sum(-1)                          # (B, H, W, 3)
    dsum = torch.where(hit, d.sum(-1), torch.ones_like(d[..., 0]))                 # guarded: no NaN grads
    lam = d / dsum[..., None]                                                      # Eq. E1 barycentrics
    wsum = torch.where(hit, (lam * tri[..., 3]).sum(-1), torch.ones_like(dsum))
    zndc = (lam * tri[..., 2]).sum(-1) / wsum                                      # clip z / clip w
    rast = torch.stack([lam[..., 0], lam[..., 1], zndc, (tri_id + 1).to(zndc.dtype)], dim=-1)
    return torch.where(hit[..., None], rast, torch.zeros_like(rast))


def interpolate(attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Per-vertex attributes attr (V, C) or (B, V, C) at every pixel of rast (B, H, W, 4) ->
    (B, H, W, C), zero on background: a = u a_0 + v a_1 + (1 - u - v) a_2."""
    tri_id = rast[..., 3].long() - 1
    a = _gather_triangles(attr, faces, tri_id)                                     # (B, H, W, 3, C)
    u, v = rast[..., 0:1], rast[..., 1:2]
    out = u * a[..., 0, :] + v * a[..., 1, :] + (1.0 - u - v) * a[..., 2, :]
    return out * (tri_id >= 0)[..., None]


def face_neighbors(faces: torch.Tensor) -> torch.Tensor:
    """For each face (F, 3) and each of its edges k (the edge opposite vertex k, from vertex k+1 to k+2),
    the face on the other side of that edge, (F, 3) long, -1 on a boundary. Manifold meshes."""
    Fn = faces.shape[0]
    a, b = faces.roll(-1, dims=1), faces.roll(-2, dims=1)                          # (F, 3) edge ends
    key = ((torch.minimum(a, b) << 32) | torch.maximum(a, b)).flatten()            # (3F,) edge id
    order = torch.argsort(key)
    ks = key[order]
    same_next = torch.zeros_like(ks, dtype=torch.bool)
    same_next[:-1] = ks[:-1] == ks[1:]
    same_prev = torch.zeros_like(same_next)
    same_prev[1:] = same_next[:-1]
    nxt, prv = order.roll(-1), order.roll(1)
    partner = torch.where(same_next, nxt, torch.where(same_prev, prv, -1))          # sorted position -> slot
    nb = torch.empty_like(partner)
    nb[order] = torch.where(partner >= 0, partner // 3, -1)
    return nb.view(Fn, 3)


def antialias(color: torch.Tensor, rast: torch.Tensor, verts_clip: torch.Tensor,
              faces: torch.Tensor) -> torch.Tensor:
    """Analytic antialiasing of silhouette edges (after nvdiffrast's antialias), color (B, H, W, C) ->
    (B, H, W, C). Each pixel looks at its 4 neighbours. Where a neighbour shows another surface that is
    farther (or background), the pixel's own triangle is followed along the segment between the two
    pixel centres (t = 0 here, t = 1 at the neighbour) to the first of its edges the segment crosses, at
        t* = d_k(here) / (d_k(here) - d_k(neighbour))                        (Eq. A1, d_k affine, Eq. E1)
    If that edge is a silhouette (its two faces face opposite ways, or the neighbour is background),
    the pixel the edge passes through (a pixel spans half a step either side of its centre) takes the
    other one's colour in proportion to its part beyond the edge:
        t* < 1/2:  c_here += (1/2 - t*) (c_nb - c_here)      else:  c_nb += (t* - 1/2) (c_here - c_nb)
    t* moves with the edge's two vertices, so the outline of the mesh gets gradient."""
    B, H, W, C = color.shape
    dev, dt = color.device, verts_clip.dtype
    tri_id = rast[..., 3].detach().long() - 1                                      # (B, H, W)
    depth = torch.where(tri_id >= 0, rast[..., 2].detach(), torch.inf)
    tri = _gather_triangles(verts_clip, faces, tri_id)                             # (B, H, W, 3, 4)
    e = _edge_functions(tri)                                                       # (B, H, W, 3, 3)
    with torch.no_grad():
        sign = _orientation(tri, e).sign()                                         # (B, H, W)
        ftri = verts_clip[:, faces]                                                # (B, F, 3, 4)
        facing = _orientation(ftri, _edge_functions(ftri)) > 0                    # (B, F)
        nb_face = face_neighbors(faces)                                            # (F, 3)
        sil_face = (nb_face < 0) | (facing[:, nb_face.clamp(min=0)] != facing[..., None])  # (B, F, 3)
        sil = sil_face[torch.arange(B, device=dev).view(B, 1, 1), tri_id.clamp(min=0)]     # (B, H, W, 3)
    p = pixel_ndc(H, W, dev, dt)                                                   # (H, W, 3)
    d = sign[..., None] * (e * p[:, :, None, :]).sum(-1)                           # (B, H, W, 3) here
    # neighbours right, left, below, above; their centres are one pixel away in NDC (y points up)
    step = torch.tensor([[2.0 / W, 0, 0], [-2.0 / W, 0, 0], [0, -2.0 / H, 0], [0, 2.0 / H, 0]],
                        device=dev, dtype=dt)                                      # (4, 3)
    d_nb = d + sign[..., None] * (e * step.view(4, 1, 1, 1, 1, 3)).sum(-1)         # (4, B, H, W, 3)

    def at_nb(x):
        """x (B, H, W, ...) at the 4 neighbours of each pixel -> (4, B, H, W, ...)."""
        return torch.stack([x.roll(-1, 2), x.roll(1, 2), x.roll(-1, 1), x.roll(1, 1)])

    i, j = torch.arange(W, device=dev).expand(H, W), torch.arange(H, device=dev)[:, None].expand(H, W)
    in_image = torch.stack([i < W - 1, i > 0, j < H - 1, j > 0])[:, None]         # (4, 1, H, W)
    nb_id = at_nb(tri_id)
    front = in_image & (depth < at_nb(depth)) & (nb_id != tri_id)                  # (4, B, H, W)
    crossing = d_nb < 0
    d_here = d.clamp(min=0)
    denom = torch.where(crossing, d_here - d_nb, torch.ones_like(d_nb))
    t = torch.where(crossing, d_here / denom, torch.full_like(d_nb, 2.0))           # Eq. A1 per edge
    t_star, k = t.min(-1)                                                          # first edge crossed
    edge_sil = sil.expand(4, -1, -1, -1, -1).gather(-1, k[..., None])[..., 0]
    blend = (front & (t_star <= 1.0) & (edge_sil | (nb_id < 0)))[..., None]         # (4, B, H, W, 1)
    t_star = t_star[..., None].to(color.dtype)
    c_nb = at_nb(color)                                                            # (4, B, H, W, C)
    to_here = torch.where(blend & (t_star < 0.5), (0.5 - t_star) * (c_nb - color), 0.0).sum(0)
    to_nb = torch.where(blend & (t_star >= 0.5), (t_star - 0.5) * (color - c_nb), 0.0)
    back = to_nb[0].roll(1, 2) + to_nb[1].roll(-1, 2) + to_nb[2].roll(1, 1) + to_nb[3].roll(-1, 1)
    return color + to_here + back


def tet_grid(res: int, bbox=((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)), device="cpu"):
    """A tetrahedral grid: the box bbox = (min xyz, max xyz) cut into res^3 cubes, each cut into 6
    tetrahedra around its main diagonal (Kuhn / Freudenthal). Every cube face is cut along the diagonal
    from its lowest to its highest corner in both cubes that share it, so neighbouring tetrahedra share
    whole faces. Returns verts ((res+1)^3, 3), tets (6 res^3, 4) long, every tet of positive volume
    det(v1 - v0, v2 - v0, v3 - v0) > 0."""
    n = res + 1
    lo, hi = (torch.as_tensor(b, dtype=torch.float32, device=device) for b in bbox)
    ax = torch.linspace(0.0, 1.0, n, device=device)
    g = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1).reshape(-1, 3)   # (n^3, 3)
    verts = lo + g * (hi - lo)
    stride = torch.tensor([n * n, n, 1], device=device)                            # vertex id of (i, j, k)
    c = torch.stack(torch.meshgrid(*[torch.arange(res, device=device)] * 3, indexing="ij"), -1)
    base = (c.reshape(-1, 3) * stride).sum(-1)                                     # (res^3,) corner 000
    tets = []
    for perm in itertools.permutations(range(3)):
        # walk 000 -> +e_a -> +e_a+e_b -> 111: orientation = sign of the permutation
        steps = torch.cumsum(stride[list(perm)], 0)
        corner = torch.cat([torch.zeros(1, dtype=torch.long, device=device), steps])   # (4,)
        odd = sum(perm[i] > perm[j] for i in range(3) for j in range(i + 1, 3)) % 2
        if odd:
            corner = corner[[0, 1, 3, 2]]
        tets.append(base[:, None] + corner)
    return verts, torch.stack(tets, 1).reshape(-1, 4)


# Marching tetrahedra tables, derived (not typed in): the 6 edges of a tet, and for each of the 16
# inside/outside codes (bit i set: vertex i inside, sdf < 0) up to 2 triangles given as edge indices.
_TET_EDGES = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


def _marching_tets_table():
    """(16, 2, 3) edge indices of each code's triangles (-1 pad) and (16,) their count. Triangles wind
    counter-clockwise seen from outside: checked on the unit tet, whose vertices
    (0,0,0), (1,0,0), (0,1,0), (0,0,1) have positive volume like every tet of tet_grid."""
    P = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    edge_of = {tuple(sorted(e)): k for k, e in enumerate(_TET_EDGES.tolist())}
    table, count = torch.full((16, 2, 3), -1), torch.zeros(16, dtype=torch.long)
    for code in range(1, 15):
        ins = [v for v in range(4) if code >> v & 1]
        out = [v for v in range(4) if not code >> v & 1]
        if len(ins) == 2:   # a quad through the edges a-c, a-d, b-d, b-c (a cycle), cut in two
            (a, b), (c, d) = ins, out
            loop = [(a, c), (a, d), (b, d), (b, c)]
            tris = [[loop[0], loop[1], loop[2]], [loop[0], loop[2], loop[3]]]
        else:               # one vertex alone on its side: the triangle through its 3 edges
            lone = ins[0] if len(ins) == 1 else out[0]
            tris = [[(lone, v) for v in range(4) if v != lone]]
        outward = P[out].mean(0) - P[ins].mean(0)
        for t, tri in enumerate(tris):
            m = torch.stack([P[list(e)].mean(0) for e in tri])                     # edge midpoints
            if torch.dot(torch.cross(m[1] - m[0], m[2] - m[0], dim=0), outward) < 0:
                tri = tri[::-1]
            table[code, t] = torch.tensor([edge_of[tuple(sorted(e))] for e in tri])
        count[code] = len(tris)
    return table, count


_MT_TRIANGLES, _MT_COUNT = _marching_tets_table()


def marching_tets(verts: torch.Tensor, sdf: torch.Tensor, tets: torch.Tensor):
    """Differentiable marching tetrahedra (DMTet, Shen et al. 2021): the surface sdf = 0 of a signed
    distance sampled at the vertices verts (V, 3) of tets (T, 4) (sdf (V,), negative inside).
    Returns mesh_verts (M, 3), one per sign-changing grid edge (shared by all tets around the edge),
    at the linear zero crossing
        x = (x_a s_b - x_b s_a) / (s_b - s_a)                                    (Eq. M1)
    so gradient reaches both sdf and verts; and faces (K, 3) long, wound counter-clockwise seen from
    outside (normals point to sdf > 0), provided the tets have positive volume."""
    dev = verts.device
    with torch.no_grad():
        inside = sdf < 0                                                           # (V,)
        code = (inside[tets].byte() << torch.arange(4, device=dev, dtype=torch.uint8)).sum(-1)   # (T,)
        cut = (code > 0) & (code < 15)
        tets, code = tets[cut], code[cut]                                          # (T', 4) crossed tets
        ends = tets[:, _TET_EDGES.to(dev)]                                         # (T', 6, 2)
        crosses = inside[ends[..., 0]] != inside[ends[..., 1]]                     # (T', 6)
        V = verts.shape[0]
        key = ends.amin(-1) * V + ends.amax(-1)                                    # undirected edge id
        uniq, inv = torch.unique(key[crosses], return_inverse=True)
        vid = torch.full_like(key, -1)
        vid[crosses] = inv                                                         # (T', 6) mesh vertex
        a, b = uniq // V, uniq % V
        tri = _MT_TRIANGLES.to(dev)[code]                                          # (T', 2, 3)
        keep = torch.arange(2, device=dev) < _MT_COUNT.to(dev)[code][:, None]      # (T', 2)
        faces = vid.gather(1, tri.clamp(min=0).flatten(1)).view(-1, 2, 3)[keep]    # (K, 3)
    sa, sb = sdf[a][:, None], sdf[b][:, None]
    mesh_verts = (verts[a] * sb - verts[b] * sa) / (sb - sa)                       # Eq. M1
    return mesh_verts, faces


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, 3), (F, 3) -> (F, 3) face normals scaled by twice the face area: (v1 - v0) x (v2 - v0)."""
    v0, v1, v2 = verts.index_select(0, faces.flatten()).view(-1, 3, 3).unbind(1)
    return torch.cross(v1 - v0, v2 - v0, dim=-1)


def _unit(x: torch.Tensor, tiny: float = 1e-12):
    """x / |x| over the last axis, and where |x| <= tiny (a degenerate triangle has no normal) 0 with
    no gradient instead of a huge one. Returns (unit (..., 3), ok (...))."""
    norm = x.norm(dim=-1, keepdim=True)
    ok = norm > tiny
    return torch.where(ok, x / torch.where(ok, norm, torch.ones_like(norm)), 0.0), ok[..., 0]


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals (V, 3): the area-weighted mean of the normals of the faces around each vertex."""
    fn = face_normals(verts, faces)                                                # (F, 3)
    n = torch.zeros_like(verts).index_add(0, faces.flatten(), fn.repeat_interleave(3, dim=0))
    return _unit(n)[0]


def normal_consistency_loss(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of faces sharing an edge of 1 - cos(n_f, n_g): 0 for a flat surface.
    Pairs with a degenerate face (area below 1e-6 of the mean: its normal is rounding noise) are left out."""
    nb = face_neighbors(faces)                                                     # (F, 3)
    f = torch.arange(faces.shape[0], device=faces.device)[:, None].expand_as(nb)
    fn = face_normals(verts, faces)                                                # (F, 3)
    n, ok = _unit(fn, tiny=1e-6 * fn.detach().norm(dim=-1).mean())                # (F, 3), (F,)
    pair = (nb > f) & ok[f] & ok[nb.clamp(min=0)]                                  # each pair once
    return (1.0 - (n[f[pair]] * n[nb[pair]]).sum(-1)).mean()


def laplacian_loss(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Uniform Laplacian smoothing: mean over vertices of |mean of neighbours - v_i|^2 (0 for a mesh
    whose every vertex is the centroid of its neighbours)."""
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = torch.unique(torch.cat([e, e.flip(1)]), dim=0)                             # (E, 2) both ways
    V = verts.shape[0]
    deg = torch.zeros(V, device=verts.device, dtype=verts.dtype).index_add(
        0, e[:, 0], torch.ones(e.shape[0], device=verts.device, dtype=verts.dtype))
    nb_sum = torch.zeros_like(verts).index_add(0, e[:, 0], verts[e[:, 1]])
    lap = nb_sum / deg.clamp(min=1)[:, None] - verts                               # (V, 3)
    return (lap ** 2).sum(-1).mean()


@torch.no_grad()
def density_mesh(density_fn, color_fn, aabb, res: int, level: float, device="cpu", chunk: int = 2 ** 18):
    """A coloured mesh of a density field: marching cubes of density_fn on a res^3 grid over aabb
    (2, 3), faces flipped so their right-hand normals point out of the dense region, and vertex
    colours color_fn(verts) in [0, 1]. density_fn / color_fn take points (N, 3) on `device`.
    Returns verts (V, 3), faces (F, 3), colors (V, 3) on the CPU; empty when `level` is never crossed."""
    pts = grid_points(aabb, res).reshape(-1, 3)
    sigma = torch.cat([density_fn(pts[i:i + chunk].to(device)).float().cpu() for i in range(0, len(pts), chunk)])
    verts, faces = marching_cubes(sigma.reshape(res, res, res), level, aabb)
    if len(faces) == 0:
        return verts, faces, torch.zeros(0, 3)
    colors = torch.cat([color_fn(verts[i:i + chunk].to(device)).float().cpu() for i in range(0, len(verts), chunk)])
    return verts, faces[:, [0, 2, 1]], colors


@torch.no_grad()
def largest_component(verts: torch.Tensor, faces: torch.Tensor, *vertex_attrs: torch.Tensor):
    """The connected piece of a mesh with the most faces (drops floaters): verts (V, 3), faces (F, 3)
    and any per-vertex attributes (V, ...) -> the piece's verts (V', 3), faces (F', 3) re-indexed and
    attributes (V', ...). Labels spread along edges until every vertex holds the smallest vertex id of
    its piece."""
    if len(faces) == 0:
        return (verts, faces, *vertex_attrs)
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = torch.cat([edges, edges.flip(1)])                                      # (6F, 2) both ways
    label = torch.arange(len(verts), device=verts.device)
    while True:
        new = label.scatter_reduce(0, edges[:, 0], label[edges[:, 1]], reduce="amin")
        if torch.equal(new, label):
            break
        label = new
    face_label = label[faces[:, 0]]                                                # (F,)
    keep = face_label == torch.mode(face_label).values
    used = torch.zeros(len(verts), dtype=torch.bool, device=verts.device)
    used[faces[keep].flatten()] = True
    new_id = torch.cumsum(used.long(), 0) - 1
    return (verts[used], new_id[faces[keep]], *(a[used] for a in vertex_attrs))


# ================================================================================================
# 7. Metrics
# ================================================================================================


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [0, 1]: -10 log10(MSE)."""
    return float(-10.0 * torch.log10(F.mse_loss(pred.float(), target.float())))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Structural similarity (scikit-image, Gaussian window as in the NeRF evaluations) of two
    (H, W, 3) images in [0, 1]."""
    from skimage.metrics import structural_similarity
    a, b = (x.detach().float().cpu().numpy() for x in (pred, target))
    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


# ================================================================================================
# 8. Priors: the CLIP prior (image and text embeddings, similarity, R-precision)
# ================================================================================================
# A contrastive image-text model (CLIP) behind one small interface.
#
# `CLIPPrior(model, pretrained)` loads any open_clip model, always through open_clip's own
# `create_model_and_transforms`, and never touches the network:
#   "toy"                            the bundled data/toy_clip (trained by `python toyworld.py train-clip`)
#   a folder                         open_clip's folder format: open_clip_config.json + weights
#   "ViT-B-16", "openai"             a built-in architecture + pretrained tag, if its weights are cached
#   "ViT-B-16", "/path/to/ckpt.pt"   a built-in architecture + a local checkpoint file
#   "hf-hub:org/repo"                a hub folder, if it is in the local Hugging Face cache
#
#   encode_image(images)             (B, 3, H, W) in [0, 1] -> (B, D) unit vectors, differentiable
#   encode_text(prompts)             list of B strings -> (B, D) unit vectors, cached per prompt
#   similarity(img_emb, txt_emb)     cosine similarities (B, T)
#   r_precision(images, captions, true_idx)   top-1 retrieval accuracy among the captions

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")   # the bundled toy priors
TOY_CLIP = {"toy": os.path.join(DATA_DIR, "toy_clip"), "toy-eval": os.path.join(DATA_DIR, "toy_clip_eval")}
TOY_CLIP_VOCAB_FILE = "toyworld.json"      # present only in a bundled toy folder: {"vocab": [...], ...}
OPEN_CLIP_CONFIG = "open_clip_config.json"


def check_toy_prompt(prompt: str, vocab_words: list, real_flag: str):
    """A toy prior knows only the words it was trained on: refuse any other prompt with one line
    that lists its vocabulary and names the flag that selects a real model."""
    words = re.findall(r"[a-z]+", prompt.lower())
    unknown = [w for w in dict.fromkeys(words) if w not in vocab_words]
    if unknown or not words:
        names = ", ".join(repr(w) for w in unknown)
        what = {0: "an empty prompt is", 1: f"the word {names} is"}.get(len(unknown), f"the words {names} are")
        raise UserError(f"prompt {prompt!r}: {what} outside the toy vocabulary "
                        f"({' '.join(vocab_words)}); for other prompts pass a real model with {real_flag}")


def _cached_hub_file(repo_id: str, filenames) -> str:
    """The first of `filenames` of a Hugging Face repo found in the local cache, or None."""
    from huggingface_hub import try_to_load_from_cache
    for name in filenames:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def resolve_clip(model: str, pretrained: str = None, flag: str = "--clip") -> dict:
    """Turn (model, pretrained) into arguments for open_clip.create_model_and_transforms that
    need no network: a folder becomes "local-dir:<folder>", a pretrained tag becomes the path of
    its cached weights file (plus the tag's normalisation and activation). Anything not on disk
    is a UserError naming what to download."""
    import open_clip
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    model = TOY_CLIP.get(model, model)
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        config = _cached_hub_file(repo, [OPEN_CLIP_CONFIG])
        if config is None:
            raise UserError(f"CLIP model {model} is not in the local Hugging Face cache ({hf_home}): "
                            f"download the hub repo {repo} once (e.g. `huggingface-cli download {repo}`), "
                            f"set HF_HOME to the cache that has it, or pass a local folder with {flag}")
        model = os.path.dirname(config)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, OPEN_CLIP_CONFIG)):
            raise UserError(f"{model} is not an open_clip folder (no {OPEN_CLIP_CONFIG}); the toy CLIP "
                            "is made by `python toyworld.py train-clip`")
        return {"model_name": "local-dir:" + model}
    if model.replace("/", "-") not in open_clip.list_models():
        raise UserError(f"unknown CLIP model {model!r} for {flag}: use 'toy', a folder, hf-hub:org/repo "
                        f"or an open_clip architecture (open_clip.list_models())")
    name = model.replace("/", "-")
    if pretrained is None:
        raise UserError(f"CLIP model {name} needs pretrained weights: a tag "
                        f"({', '.join(open_clip.list_pretrained_tags_by_model(name))}) or a checkpoint file")
    if os.path.isfile(pretrained):
        return {"model_name": name, "pretrained": pretrained}
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise UserError(f"CLIP model {name} has no pretrained tag {pretrained!r} and no such file; tags: "
                        f"{', '.join(open_clip.list_pretrained_tags_by_model(name))}")
    # open_clip's hub convention: 'org/repo/' (default file name) or 'org/repo/file'
    path, source = None, cfg.get("url", "")
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        stem = os.path.splitext(filename)[0]
        path = _cached_hub_file(repo, [stem + ".safetensors", filename, "open_clip_model.safetensors"])
        source = f"the hub repo {repo}"
    if path is None and cfg.get("url"):
        local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        path = local if os.path.isfile(local) else None
        source = source or cfg["url"]
    if path is None:
        raise UserError(f"CLIP weights {name}/{pretrained} are not cached locally (looked in {hf_home} and "
                        f"~/.cache/clip): download {source} once on a machine with internet "
                        f"(open_clip.create_model('{name}', pretrained='{pretrained}')) and set HF_HOME to "
                        f"that cache, or pass a checkpoint file as the pretrained value of {flag}")
    return {"model_name": name, "pretrained": path, "image_mean": cfg.get("mean"), "image_std": cfg.get("std"),
            "force_quick_gelu": bool(cfg.get("quick_gelu", False))}


class CLIPPrior(nn.Module):
    """A frozen open_clip model. Gradients flow from the embeddings to the input images only."""

    def __init__(self, model: str = "toy", pretrained: str = None, device="cpu", flag: str = "--clip"):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")           # never wait on the network
        import open_clip
        args = resolve_clip(model, pretrained, flag)
        self.model, _, _ = open_clip.create_model_and_transforms(**args, device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(args["model_name"])
        pp = self.model.visual.preprocess_cfg
        self.image_size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
        self.interpolation = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"
        self.register_buffer("mean", torch.tensor(pp["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pp["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.to(device)
        folder = args["model_name"][len("local-dir:"):] if args["model_name"].startswith("local-dir:") else None
        vocab_file = folder and os.path.join(folder, TOY_CLIP_VOCAB_FILE)
        self.vocab = None                                        # a real model takes any prompt
        if vocab_file and os.path.isfile(vocab_file):
            with open(vocab_file) as f:
                self.vocab = json.load(f)["vocab"]
        self.flag = flag
        self._text_cache = {}

    def check_prompt(self, prompt: str):
        """A toy model refuses words outside its vocabulary; a real model takes anything."""
        if self.vocab is not None:
            check_toy_prompt(prompt, self.vocab, self.flag)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's input: shortest side resized to its input size
        (torch interpolate, so gradients flow), centre crop, (x - mean) / std."""
        B, _, H, W = images.shape
        S = self.image_size
        if (H, W) != (S, S):
            scale = S / min(H, W)
            h, w = max(S, round(H * scale)), max(S, round(W * scale))
            images = F.interpolate(images, size=(h, w), mode=self.interpolation, align_corners=False,
                                   antialias=min(H, W) > S)
            top, left = (h - S) // 2, (w - S) // 2
            images = images[:, :, top:top + S, left:left + S]
        return (images - self.mean) / self.std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit vectors."""
        return F.normalize(self.model.encode_image(self.preprocess(images.float())).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, prompts: list) -> torch.Tensor:
        """list of B prompts -> (B, D) unit vectors (each prompt is encoded once, then cached)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        for p in new:
            self.check_prompt(p)
        if new:
            tokens = self.tokenizer(new).to(self.mean.device)
            emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            self._text_cache.update(zip(new, emb))
        return torch.stack([self._text_cache[p] for p in prompts])

    @staticmethod
    def similarity(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of unit vectors: (B, D), (T, D) -> (B, T)."""
        return img_emb @ txt_emb.T

    @torch.no_grad()
    def r_precision(self, images: torch.Tensor, captions: list, true_idx) -> float:
        """Dream Fields' R-precision: the fraction of images (B, 3, H, W) whose most similar
        caption among `captions` is their own, captions[true_idx[b]]."""
        sim = self.similarity(self.encode_image(images), self.encode_text(captions))        # (B, T)
        true_idx = torch.as_tensor(true_idx, device=sim.device)
        return float((sim.argmax(-1) == true_idx).float().mean())


def toy_captions(clip: str):
    """The caption set of a bundled toy CLIP (its toyworld.json), or None for any other CLIP."""
    path = os.path.join(TOY_CLIP.get(clip, clip), TOY_CLIP_VOCAB_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["captions"]


@torch.no_grad()
def caption_metrics(clip: "CLIPPrior", images: torch.Tensor, prompt: str, captions=None) -> dict:
    """How well renders `images` (N, 3, H, W) match `prompt`: clip_score = mean cosine similarity;
    with a caption list (the prompt added if missing): r_precision (the fraction of images whose
    best caption is the prompt), caption_margin (mean cosine of the prompt minus the best other
    caption; > 0: the prompt wins) and n_captions."""
    img = clip.encode_image(images)                                           # (N, D)
    m = {"clip_score": clip.similarity(img, clip.encode_text([prompt])).mean().item()}
    if captions:
        caps = captions if prompt in captions else [prompt] + list(captions)
        i = caps.index(prompt)
        sim = clip.similarity(img, clip.encode_text(caps))                     # (N, captions)
        others = torch.cat([sim[:, :i], sim[:, i + 1:]], 1)
        m.update(r_precision=(sim.argmax(1) == i).float().mean().item(),
                 caption_margin=(sim[:, i] - others.amax(1)).mean().item(), n_captions=len(caps))
    return m


# ================================================================================================
# 9. Priors: the diffusion prior (score distillation sampling, text-to-image sampling)
# ================================================================================================
# A text-conditioned diffusion model behind one small interface.
#
# `DiffusionPrior(name)` loads a diffusers Stable-Diffusion-style pipeline folder (model_index.json
# plus the subfolders tokenizer/, text_encoder/, unet/, scheduler/ and, for a latent model, vae/)
# from a hub id that is already in the local cache, from a local folder, or "toy" (the bundled
# data/toy_sd, trained by toyworld). Every one is loaded by the same code. A folder without vae/
# is a pixel-space model (a UNet on the image itself, the shape of DeepFloyd IF's stage I).
#
#   sds_loss(images, prompt, elevation, azimuth)  DreamFusion's score distillation (Eq. 3)
#   sample(prompt)                                 text -> images (Point-E's first stage)

TOY_PRIORS = {"toy": os.path.join(DATA_DIR, "toy_sd")}
TOY_VOCAB_FILE = "toy_vocab.json"        # present only in a bundled toy folder: its prompt vocabulary


def view_suffix(elevation_deg: float, azimuth_deg: float) -> str:
    """DreamFusion's view-dependent prompt suffix. Azimuth in degrees, 0 = front (wrapped to
    [-180, 180)); elevation in degrees above the horizon."""
    az = (float(azimuth_deg) + 180.0) % 360.0 - 180.0
    if float(elevation_deg) > 60.0:
        return "overhead view"
    if abs(az) < 45.0:
        return "front view"
    if abs(az) > 135.0:
        return "back view"
    return "side view"


def resolve_pretrained(name: str) -> str:
    """A model name -> a local pipeline folder, never touching the network.
    "toy" -> data/toy_sd; an existing folder -> itself; a hub id -> its folder in the local cache
    (HF_HOME), or a UserError that says what to download."""
    if name in TOY_PRIORS:
        path = TOY_PRIORS[name]
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UserError(f"the toy prior is missing at {path}; train it with "
                            "`python toyworld.py` (or pass a real model with --prior)")
        return path
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model_index.json")):
            raise UserError(f"--prior {name}: the folder has no model_index.json (a diffusers "
                            "pipeline saved with save_pretrained is expected)")
        return name
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        raise UserError(f"diffusion model {name!r} is not in the local Hugging Face cache and this "
                        f"run is offline: download it first (`huggingface-cli download {name}`, "
                        "cached under $HF_HOME), or pass a local folder or `toy` with --prior")


def toy_prior_vocab(folder: str):
    """The prompt vocabulary of a bundled toy prior folder (its toy_vocab.json), or None."""
    path = os.path.join(folder, TOY_VOCAB_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["words"]


def check_prior_prompt(prior: str, prompt: str):
    """Refuse a prompt outside a toy diffusion prior's vocabulary before any model is loaded."""
    words = toy_prior_vocab(resolve_pretrained(prior))
    if words is not None:
        check_toy_prompt(prompt, words, "--prior")


def _load_component(folder: str, sub: str, library: str, cls_name: str, dtype):
    """One pipeline component, e.g. ("transformers", "CLIPTextModel") from folder/text_encoder."""
    cls = getattr(importlib.import_module(library), cls_name)
    kw = {} if sub in ("tokenizer", "scheduler") else {"torch_dtype": dtype}
    if library == "diffusers" and sub not in ("tokenizer", "scheduler"):
        kw["low_cpu_mem_usage"] = False          # without `accelerate`, say so instead of warning about it
    try:
        return cls.from_pretrained(folder, subfolder=sub, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {sub}/ of {folder}: {str(e).splitlines()[0]} "
                        "(re-download the model or pass another with --prior)")


class DiffusionPrior:
    """A text-to-image diffusion model: tokenizer, text encoder, UNet, noise scheduler and, for a
    latent model, the VAE. fp16 on CUDA, fp32 elsewhere; all weights frozen."""

    def __init__(self, name: str = "toy", device="cpu", dtype=None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")           # never wait on the network
        folder = resolve_pretrained(name)
        self.name, self.folder, self.device = name, folder, torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
        parts = {}
        for sub in ("tokenizer", "text_encoder", "unet", "scheduler", "vae"):
            spec = index.get(sub)
            if spec is None or spec[0] is None:
                if sub != "vae":
                    raise UserError(f"{folder} has no {sub}/ component; not a text-to-image pipeline")
                continue
            parts[sub] = _load_component(folder, sub, spec[0], spec[1], self.dtype)
            # offline, a tokenizer whose files are missing can come back empty instead of failing
            if sub == "tokenizer" and len(parts[sub]) <= len(parts[sub].all_special_tokens):
                raise UserError(f"the tokenizer of {name!r} is empty (its files are missing from "
                                f"{folder}); re-download the model (cache under $HF_HOME) or use --prior")
        self.tokenizer, self.scheduler = parts["tokenizer"], parts["scheduler"]
        self.text_encoder = parts["text_encoder"].to(self.device).eval().requires_grad_(False)
        self.unet = parts["unet"].to(self.device).eval().requires_grad_(False)
        self.vae = parts.get("vae")
        if self.vae is not None:
            self.vae = self.vae.to(self.device).eval().requires_grad_(False)
            self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent
        else:
            self.vae_scale = 1
        size = self.unet.config.sample_size
        self.resolution = (size if isinstance(size, int) else size[0]) * self.vae_scale  # model's pixels
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)  # (T,)
        self.toy_vocab = toy_prior_vocab(folder)
        self._embeddings = {}

    def compile(self):
        """Channels-last weights (the layout fp16 convolutions run fastest in), then torch.compile the
        UNet and the VAE encoder (its forward and backward passes), each replayed as CUDA graphs
        (mode "reduce-overhead": one launch instead of hundreds of kernels a call, which is what an SDS
        step waits on): about 2x faster SDS steps on a GPU (bench/RESULTS_priors.md); the first calls
        take a minute or two to compile. The VAE's attention (one head of width 512 over the 64 x 64
        positions of its middle block) is too wide for flash attention, and SDPA's fallback kernel
        spent ~6 ms a step in its backward pass on an H100 (bench/RESULTS_magic3d.md): it runs as
        plain matrix products instead.
        Off CUDA (no CUDA graphs) it leaves the prior as it is."""
        if self.device.type != "cuda":
            return self
        from diffusers.models.attention_processor import AttnProcessor
        self.unet.to(memory_format=torch.channels_last)
        self.unet = torch.compile(self.unet, mode="reduce-overhead", fullgraph=True)
        if self.vae is not None:
            self.vae.set_attn_processor(AttnProcessor())          # softmax(Q K^T / sqrt(d)) V as matmuls
            self.vae.to(memory_format=torch.channels_last)
            self.vae.encoder = torch.compile(self.vae.encoder, mode="reduce-overhead")
        return self

    # ---- text ----------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, text: str) -> torch.Tensor:
        """Text-encoder hidden states of one prompt, (1, L, D), cached."""
        if text not in self._embeddings:
            tok = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
            kw = {}
            if "T5" in type(self.text_encoder).__name__:   # T5 (DeepFloyd IF) needs the padding mask
                kw["attention_mask"] = tok.attention_mask.to(self.device)
            out = self.text_encoder(tok.input_ids.to(self.device), **kw)[0]
            self._embeddings[text] = out.to(self.dtype)
        return self._embeddings[text]

    def check_prompt(self, prompt: str):
        """A bundled toy prior knows only its own words: anything else is a UserError."""
        if self.toy_vocab is not None:
            check_toy_prompt(prompt, self.toy_vocab, "--prior")

    def prompt_embeddings(self, prompt: str, elevation=None, azimuth=None, batch: int = 1):
        """Conditional and unconditional embeddings, each (B, L, D). With camera angles (floats or
        (B,) tensors, degrees) the prompt becomes "<prompt>, <view suffix>" per sample."""
        self.check_prompt(prompt)
        if elevation is None:
            texts = [prompt] * batch
        else:
            el = torch.as_tensor(elevation, dtype=torch.float32).reshape(-1).expand(batch)
            az = torch.as_tensor(azimuth, dtype=torch.float32).reshape(-1).expand(batch)
            texts = [f"{prompt}, {view_suffix(e, a)}" for e, a in zip(el.tolist(), az.tolist())]
        cond = torch.cat([self.embed(t) for t in texts])                      # (B, L, D)
        uncond = self.embed("").expand_as(cond)                               # (B, L, D)
        return cond, uncond

    # ---- images <-> the space the UNet works in ----------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the UNet's input space, with gradient.
        Latent model: bilinear resize to the model's resolution, VAE mean, times the scaling factor
        -> (B, 4, h, w). Pixel model: resize and map to [-1, 1] -> (B, 3, h, w)."""
        x = F.interpolate(images, (self.resolution, self.resolution), mode="bilinear",
                          align_corners=False) if images.shape[-1] != self.resolution else images
        x = (2 * x - 1).to(self.dtype)
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's space -> images (B, 3, H, W) in [0, 1]."""
        if self.vae is not None:
            x = self.vae.decode(x.to(self.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor):
        """Noise predictions (eps_u, eps_c), each like x_t, from ONE UNet call on a batch of 2B.
        x_t (B, C, h, w); t (B,) integer timesteps; cond/uncond (B, L, D)."""
        B, C = x_t.shape[:2]
        out = self.unet(torch.cat([x_t, x_t]).to(self.dtype), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
        out = out[:, :C]                     # a UNet with learned variance (IF) also outputs 2C
        # v-prediction (SD 2.x 768): v = sqrt(abar) eps - sqrt(1-abar) x_0, so
        # eps = sqrt(abar) v + sqrt(1-abar) x_t
        if self.scheduler.config.prediction_type == "v_prediction":
            a = self.alphas_cumprod[torch.cat([t, t])].view(-1, 1, 1, 1)
            out = a.sqrt() * out + (1 - a).sqrt() * torch.cat([x_t, x_t]).float()
        return out[:B], out[B:]

    # ---- score distillation sampling (DreamFusion, Sec. 3) ---------------------------------------

    def sds_loss(self, images: torch.Tensor, prompt: str, elevation=None, azimuth=None,
                 guidance: float = 100.0, t_range=(0.02, 0.98), weighting="1-alpha_bar",
                 generator=None):
        """Score distillation loss of renders `images` (B, 3, H, W) in [0, 1] under `prompt`.
        elevation/azimuth: floats or (B,) tensors in degrees (None: no view suffix).
        weighting: "1-alpha_bar", "uniform", or a callable alpha_bar (B,) -> w (B,).
        Returns (loss, info); d loss / d x_b = w(t_b) (eps_hat_b - eps_b) / B exactly, where x is
        the encoded images (info["x"]); info also holds t (B,), w (B,) and the per-sample grad norm.
        generator: a torch.Generator for t and eps (its device is where they are drawn)."""
        B = images.shape[0]
        cond, uncond = self.prompt_embeddings(prompt, elevation, azimuth, B)
        x = self.encode(images).float()                                       # (B, C, h, w)
        gen_dev = generator.device if generator is not None else x.device
        # t ~ U(t_range) * T, an integer timestep per sample
        u = torch.rand(B, generator=generator, device=gen_dev).to(x.device)
        lo, hi = t_range
        t = ((lo + (hi - lo) * u) * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        eps = torch.randn(x.shape, generator=generator, device=gen_dev).to(x.device)
        abar = self.alphas_cumprod[t].view(B, 1, 1, 1)
        # forward process q(x_t | x): x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps
        x_t = abar.sqrt() * x.detach() + (1 - abar).sqrt() * eps
        with torch.no_grad():
            eps_u, eps_c = self.predict_eps(x_t, t, cond, uncond)
        # classifier-free guidance: eps_hat = eps_u + s (eps_c - eps_u)
        eps_hat = eps_u + guidance * (eps_c - eps_u)
        if weighting == "1-alpha_bar":
            w = 1 - abar
        elif weighting == "uniform":
            w = torch.ones_like(abar)
        else:
            w = torch.as_tensor(weighting(abar.view(B)), dtype=torch.float32, device=x.device).view(B, 1, 1, 1)
        # DreamFusion Eq. 3: grad_theta L_SDS = E[ w(t) (eps_hat(x_t; y, t) - eps) dx/dtheta ],
        # the UNet's Jacobian left out
        grad = torch.nan_to_num(w * (eps_hat - eps), nan=0.0, posinf=0.0, neginf=0.0)
        # inject it without a custom autograd function: target = (x - grad) carries no gradient, so
        # loss = 0.5 sum_b ||x_b - target_b||^2 / B has d loss / d x_b = grad_b / B, i.e. the
        # gradient reaching the field is the batch mean of the per-sample SDS gradients
        # (for B = 1: d loss / d x = grad exactly)
        target = (x - grad).detach()
        loss = 0.5 * ((x - target) ** 2).sum() / B
        info = {"t": t, "w": w.view(B), "grad_norm": grad.flatten(1).norm(dim=1), "x": x.detach()}
        return loss, info

    # ---- text-to-image sampling ------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompt, steps: int = 50, guidance: float = 7.5, size=None, generator=None):
        """Text -> images (B, 3, H, W) in [0, 1] with DDIM (eta 0) and classifier-free guidance.
        prompt: a string or a list of B strings; size: pixels (default: the model's resolution)."""
        from diffusers import DDIMScheduler
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for p in prompts:
            self.check_prompt(p)
        B = len(prompts)
        cond = torch.cat([self.embed(p) for p in prompts])                    # (B, L, D)
        uncond = self.embed("").expand_as(cond)
        size = size or self.resolution
        C = self.unet.config.in_channels
        # predict_eps always returns eps, whatever the model predicts
        sched = DDIMScheduler.from_config(self.scheduler.config, prediction_type="epsilon")
        sched.set_timesteps(steps, device=self.device)
        gen_dev = generator.device if generator is not None else self.device
        x = torch.randn((B, C, size // self.vae_scale, size // self.vae_scale), generator=generator,
                        device=gen_dev).to(self.device) * sched.init_noise_sigma
        for t in sched.timesteps:
            tb = t.expand(B).to(self.device)
            eps_u, eps_c = self.predict_eps(sched.scale_model_input(x, t), tb, cond, uncond)
            eps_hat = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps_hat, t, x).prev_sample
        return self.decode(x)


# ================================================================================================
# 10. Text-to-3D pieces shared by DreamFusion and Magic3D's coarse stage
# ================================================================================================
# An object field (density + albedo from position, normals from the density), a background
# network on the ray direction, shading with a point light, the orientation loss, and a renderer
# that ties them together (with optional empty-space skipping by an OccupancyGrid).


class ObjectField(nn.Module):
    """Density and albedo from position only. encoding "hashgrid": Instant-NGP's hash grid + a
    1-hidden-layer MLP of `width`; "mlp": positional encoding (n_freqs) + a residual MLP of
    `mlp_blocks` ResBlocks of width `mlp_width` (the kind of network DreamFusion's paper uses).
    log sigma = h_0 + blob_density exp(-|x|^2 / (2 blob_radius^2)) + density_bias (DreamFusion's
    density "blob", Sec. 3.1; blob_density 0 turns it off); albedo = sigmoid(h_1..3).
    Points live in the cube |x| <= 1. normals: "fd" (central differences of step fd_eps) or
    "autograd" (the exact gradient)."""

    def __init__(self, n_levels=8, log2_table=15, base_res=16, max_res=48, width=32, blob_density=5.0,
                 blob_radius=0.3, density_bias=-2.0, normals="fd", fd_eps=0.03, encoding="hashgrid",
                 n_freqs=4, mlp_width=64, mlp_blocks=2):
        super().__init__()
        if normals not in ("fd", "autograd"):
            raise UserError(f"--normals must be fd or autograd, not {normals!r}")
        if encoding not in ("hashgrid", "mlp"):
            raise UserError(f"--field must be hashgrid or mlp, not {encoding!r}")
        self.blob_density, self.blob_radius, self.density_bias = blob_density, blob_radius, density_bias
        self.normal_mode, self.fd_eps, self.encoding = normals, fd_eps, encoding
        if encoding == "hashgrid":
            self.grid = HashGrid(n_levels, 2, log2_table, base_res, max_res)
            self.net = nn.Sequential(nn.Linear(self.grid.out_dim, width), nn.ReLU(), nn.Linear(width, 4))
        else:
            self.n_freqs = n_freqs
            self.net = residual_mlp(positional_encoding_dim(n_freqs), mlp_width, mlp_blocks)
            # the output starts at zero, so the field starts as the blob alone (a hash grid's tiny initial
            # table does the same); a random output layer starts a cloud of density that SDS can fill the cube with
            nn.init.zeros_(self.net[-1].weight), nn.init.zeros_(self.net[-1].bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3) in the cube -> the MLP's input features (N, D)."""
        if self.encoding == "hashgrid":
            return self.grid((x + 1) / 2)
        return positional_encoding(x, self.n_freqs)

    def log_density(self, x: torch.Tensor, h: torch.Tensor = None) -> torch.Tensor:
        """x (N, 3) -> log sigma (N,); h: the MLP's output (N, 4) if already computed."""
        h = self.net(self.encode(x)) if h is None else h
        blob = self.blob_density * torch.exp(-(x ** 2).sum(-1) / (2 * self.blob_radius ** 2))
        return h[:, 0] + blob + self.density_bias

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return trunc_exp(self.log_density(x))

    def albedo(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(self.encode(x))[:, 1:])

    def forward(self, x: torch.Tensor):
        """x (N, 3) -> sigma (N,), albedo (N, 3)."""
        h = self.net(self.encode(x))
        return trunc_exp(self.log_density(x, h)), torch.sigmoid(h[:, 1:])

    def normals(self, x: torch.Tensor) -> torch.Tensor:
        """Unit normals n = -grad sigma / |grad sigma| (N, 3) at x (N, 3), differentiable w.r.t.
        the field; from the log-density, whose gradient has the same direction."""
        if self.normal_mode == "fd":
            e = self.fd_eps * torch.eye(3, device=x.device)                             # (3, 3)
            ld = self.log_density(torch.cat([x + e[i] for i in range(3)] + [x - e[i] for i in range(3)]))
            ld = ld.view(2, 3, -1)                                                       # (+/-, axis, N)
            grad = ((ld[0] - ld[1]) / (2 * self.fd_eps)).T                              # (N, 3)
        else:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                grad = torch.autograd.grad(self.log_density(x).sum(), x, create_graph=torch.is_grad_enabled())[0]
        return -F.normalize(grad, dim=-1, eps=1e-12)


class Background(nn.Module):
    """DreamFusion Sec. 3.1: the background colour (R, 3) is a small MLP on the ray direction (R, 3)."""

    def __init__(self, n_freqs: int = 2, width: int = 16):
        super().__init__()
        self.n_freqs = n_freqs
        self.net = nn.Sequential(nn.Linear(positional_encoding_dim(n_freqs), width), nn.ReLU(), nn.Linear(width, 3))

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(positional_encoding(F.normalize(d, dim=-1), self.n_freqs)))


def shade(albedo: torch.Tensor, normals: torch.Tensor, light: torch.Tensor, mode: str, ambient: float):
    """DreamFusion Sec. 3.1: c = rho (ambient + (1 - ambient) max(0, n . l)); "textureless" sets
    rho = 1 (white), "albedo" returns rho. albedo, normals (N, 3); light (3,) unit."""
    if mode == "albedo":
        return albedo
    rho = torch.ones_like(albedo) if mode == "textureless" else albedo
    return rho * (ambient + (1 - ambient) * (normals @ light).clamp(min=0)[:, None])


def random_light(cam_pos: torch.Tensor, jitter: float, generator=None) -> torch.Tensor:
    """DreamFusion Sec. 3.1: a point light near the camera, normalize(cam_pos + N(0, jitter^2 I))."""
    return F.normalize(cam_pos + jitter * torch.randn(3, generator=generator), dim=-1)


def orientation_loss(weights: torch.Tensor, normals: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Ref-NeRF / DreamFusion: sum_i stopgrad(w_i) max(0, n_i . d)^2 per ray, mean over rays.
    weights (R, S); normals (R, S, 3); dirs (R, 3) unit, pointing away from the camera."""
    nd = (normals * dirs[:, None, :]).sum(-1)                                        # (R, S)
    return (weights.detach() * nd.clamp(min=0) ** 2).sum(-1).mean()


def render_object(field: ObjectField, rays_o: torch.Tensor, rays_d: torch.Tensor, light: torch.Tensor,
                  mode: str, background: torch.Tensor, n_samples: int, perturb: bool, ambient: float,
                  normal_min_weight: float = 1e-2, need_orient: bool = True, occupancy: OccupancyGrid = None):
    """Volume-render an ObjectField inside the cube |x| <= 1 with shading `mode` (albedo |
    lambertian | textureless | all) over `background` (R, 3). rays_o, rays_d (R, 3).
    Normals are computed only where the compositing weight exceeds normal_min_weight (elsewhere
    they add nothing to the colour or the orientation loss) and only when the shading or the
    orientation loss needs them. With an `occupancy` grid, samples in empty cells are skipped.
    Returns rgb (R, 3), opacity (R,), weights (R, S), orient (scalar) and, for "all", the
    lambertian, textureless and normal maps (R, 3) too."""
    R, S = rays_o.shape[0], n_samples
    d = F.normalize(rays_d, dim=-1)
    near, far = ray_aabb(rays_o, d, torch.tensor([[-1.0] * 3, [1.0] * 3], device=rays_o.device))
    far = torch.maximum(far, near.clamp(min=0))                                       # a miss: zero length
    near = near.clamp(min=0)
    t = stratified_samples(near[:, None], far[:, None], R, S, perturb, rays_o.device)  # (R, S)
    pts = rays_o[:, None] + t[..., None] * d[:, None]                                 # (R, S, 3)
    if occupancy is None:
        sigma, albedo = field(pts.reshape(-1, 3))
        sigma, albedo = sigma.view(R, S), albedo.view(R, S, 3)
    else:                                                   # evaluate the occupied samples only
        keep = occupancy.query(pts)                                                   # (R, S)
        s, a = field(pts[keep])
        sigma = torch.zeros(R, S, device=t.device, dtype=s.dtype).masked_scatter(keep, s)
        albedo = torch.zeros(R, S, 3, device=t.device, dtype=a.dtype).masked_scatter(keep[..., None].expand(R, S, 3), a)
    out = composite(sigma, albedo, ((far - near) / S)[:, None].expand(R, S))
    w = out["weights"]                                                                # (R, S)
    n = torch.zeros(R, S, 3, device=rays_o.device)
    if mode != "albedo" or need_orient:
        sel = w.detach() > normal_min_weight
        n = n.masked_scatter(sel[..., None].expand(R, S, 3), field.normals(pts[sel]))
    res = {"opacity": out["opacity"], "weights": w,
           "orient": orientation_loss(w, n, d) if need_orient else torch.zeros((), device=t.device)}
    bg = (1 - out["opacity"])[:, None] * background

    def composite_colour(m):
        c = shade(albedo.reshape(-1, 3), n.view(-1, 3), light, m, ambient).view(R, S, 3)
        return (w[..., None] * c).sum(1) + bg

    if mode == "all":
        res.update({m: composite_colour(m) for m in ("lambertian", "textureless")})
        res["normals"] = (w[..., None] * (n + 1) / 2).sum(1) + bg
        mode = "albedo"
    res["rgb"] = composite_colour(mode)
    return res


def render_object_view(field: ObjectField, bg_net: Background, c2w: torch.Tensor, fov: float, size: int,
                       mode: str, light: torch.Tensor, n_samples: int, ambient: float,
                       normal_min_weight: float = 1e-2, need_orient: bool = True, bg: torch.Tensor = None,
                       perturb: bool = False, occupancy: OccupancyGrid = None, chunk: int = 4096) -> dict:
    """render_object for one camera: c2w (4, 4), horizontal field of view in degrees, a square
    image of `size` pixels, over the background network (bg None) or a solid colour bg (3,).
    Rays are rendered `chunk` at a time (memory grows with rays x samples: a 256-px frame at 128
    samples in one pass needs tens of GB). Returns render_object's maps as images: (size, size, 3),
    opacity (size, size), and orient (the mean over all rays)."""
    rays_o, rays_d = get_rays(size, size, focal_from_fov(fov, size), c2w)
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    R = rays_d.shape[0]
    background = bg_net(rays_d) if bg is None else bg.expand(R, 3)

    def render(o, d, b):
        return render_object(field, o, d, light, mode, b, n_samples, perturb, ambient, normal_min_weight,
                             need_orient, occupancy)

    if R <= chunk:   # one call (every training render): slicing the background would change its rounding
        out = render(rays_o, rays_d, background)
    else:
        parts = [render(rays_o[i:i + chunk], rays_d[i:i + chunk], background[i:i + chunk]) for i in range(0, R, chunk)]
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "orient"}
        out["orient"] = sum(p["orient"] * len(p["opacity"]) for p in parts) / R
    out.pop("weights")
    return {k: (v.view(size, size, -1).squeeze(-1) if v.dim() else v) for k, v in out.items()}


def pick_shading(step: int, albedo_iters: int, p_textureless: float, p_lambertian: float, u: float,
                 shading: bool = True) -> str:
    """DreamFusion's shading schedule: albedo only for the first albedo_iters steps (or always when
    shading is off), then by a uniform draw u: textureless, lambertian, or albedo with the rest."""
    if not shading or step < albedo_iters:
        return "albedo"
    if u < p_textureless:
        return "textureless"
    return "lambertian" if u < p_textureless + p_lambertian else "albedo"
