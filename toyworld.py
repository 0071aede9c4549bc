"""toyworld.py -- the procedural toy world and the training of the tiny toy priors.

Five shapes times six colours, 30 captions ("a red cube"). Every object is an analytic signed
distance function (SDF) in a canonical pose (z up, centred at the origin), rendered by sphere
tracing with lambertian shading. The method scripts never import this file: they load the priors
it trains from data/ (data/toy_clip here), exactly as they would load a real model.

  python toyworld.py train-clip [--steps N] [--decoys F] [--device cuda]   train the toy CLIP -> data/toy_clip
  python toyworld.py eval-clip                                  zero-shot top-1 on held-out renders
  python toyworld.py eval-clip --n 0 --decoys 60                decoys vs true shapes, Dream Fields' view
  python toyworld.py train-sd [--device cuda]                  train the toy Stable Diffusion -> data/toy_sd
  python toyworld.py train-sd --eval-only                       toy-CLIP recognition of its samples
  python toyworld.py preview                                    a grid of renders -> out/toyworld/

Sections: 1. the objects (SDFs, surface samples)  2. the renderer  3. backgrounds
          4. the render distributions and random_renders  5. the toy CLIP
          6. the toy Stable Diffusion  7. command line
"""
import argparse
import gzip
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import common

SHAPES = ["cube", "sphere", "cylinder", "cone", "torus"]
COLOURS = {                                         # albedo, sRGB
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.55, 0.20, 0.75),
    "orange": (0.98, 0.50, 0.08),
}
CAPTIONS = [f"a {c} {s}" for s in SHAPES for c in COLOURS]     # index = shape_idx * 6 + colour_idx
ALBEDO = torch.tensor(list(COLOURS.values()))                   # (6, 3)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BOUND = 1.0                 # every object (after the size jitter) lies inside the sphere |x| < BOUND

# ================================================================================================
# 1. The objects: exact signed distances (negative inside), canonical pose
# ================================================================================================

CUBE_HALF = 0.4                                    # side 0.8
SPHERE_R = 0.5
CYL_R, CYL_HALF = 0.4, 0.4                         # radius 0.4, height 0.8, axis z
CONE_R, CONE_HALF = 0.5, 0.45                      # base radius 0.5 at z = -0.45, apex at z = +0.45
TORUS_R, TORUS_r = 0.4, 0.15                       # major / minor radius, in the xy-plane


def sdf_cube(p: torch.Tensor) -> torch.Tensor:
    """p (N, 3) -> (N,). q = |p| - b; outside: |max(q, 0)|, inside: max_i q_i."""
    q = p.abs() - CUBE_HALF
    return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)


def sdf_sphere(p: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - SPHERE_R


def _sdf_box2(r: torch.Tensor, z: torch.Tensor, half_r: float, half_z: float) -> torch.Tensor:
    """Distance to the rectangle |r| <= half_r, |z| <= half_z in the (r, z) half-plane."""
    q = torch.stack([r.abs() - half_r, z.abs() - half_z], -1)
    return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)


def sdf_cylinder(p: torch.Tensor) -> torch.Tensor:
    """A solid of revolution: the 2D distance of (r, z) to its cross-section, r = |p_xy|."""
    return _sdf_box2(p[:, :2].norm(dim=-1), p[:, 2], CYL_R, CYL_HALF)


def _dist_segment2(q: torch.Tensor, a, b) -> torch.Tensor:
    """Distance from 2D points q (N, 2) to the segment a-b."""
    a, b = q.new_tensor(a), q.new_tensor(b)
    h = ((q - a) @ (b - a) / (b - a).dot(b - a)).clamp(0, 1)
    return (q - a - h[:, None] * (b - a)).norm(dim=-1)


def sdf_cone(p: torch.Tensor) -> torch.Tensor:
    """Cross-section in (r, z), r >= 0: the triangle apex (0, H), rim (R, -H), centre (0, -H).
    Its boundary (the axis is inside the solid, not a surface) is the slant side and the base."""
    q = torch.stack([p[:, :2].norm(dim=-1), p[:, 2]], -1)                          # (N, 2)
    apex, rim, centre = (0.0, CONE_HALF), (CONE_R, -CONE_HALF), (0.0, -CONE_HALF)
    d = torch.minimum(_dist_segment2(q, apex, rim), _dist_segment2(q, centre, rim))
    r_at_z = CONE_R * (CONE_HALF - q[:, 1]) / (2 * CONE_HALF)                      # radius at height z
    inside = (q[:, 1] >= -CONE_HALF) & (q[:, 0] <= r_at_z)
    return torch.where(inside, -d, d)


def sdf_torus(p: torch.Tensor) -> torch.Tensor:
    """(|p_xy| - R, z) is the offset from the tube's centre circle; minus the tube radius r."""
    q = torch.stack([p[:, :2].norm(dim=-1) - TORUS_R, p[:, 2]], -1)
    return q.norm(dim=-1) - TORUS_r


SDFS = {"cube": sdf_cube, "sphere": sdf_sphere, "cylinder": sdf_cylinder, "cone": sdf_cone,
        "torus": sdf_torus}


# Decoys: near misses of two shapes that belong to NO caption. The toy CLIP is trained to push them
# away from every caption (train_clip --decoys), so that a filled torus no longer passes for a torus
# nor a rounded cube for a cube. Both are a convex set grown by a ball (a Minkowski sum), whose
# exact SDF is the distance to the set minus the ball's radius.
ROUND_r = 0.2                                      # rounded cube: edge radius (outer side stays 0.8)


def sdf_filled_torus(p: torch.Tensor) -> torch.Tensor:
    """The toy torus with its hole filled: the points within TORUS_r of the disc |p_xy| <= TORUS_R,
    z = 0. Distance to the disc: |(max(|p_xy| - R, 0), z)|; minus r."""
    q = torch.stack([(p[:, :2].norm(dim=-1) - TORUS_R).clamp(min=0), p[:, 2]], -1)
    return q.norm(dim=-1) - TORUS_r


def sdf_rounded_cube(p: torch.Tensor) -> torch.Tensor:
    """The toy cube with edges and corners rounded by ROUND_r: the box of half side
    CUBE_HALF - ROUND_r grown by a ball of radius ROUND_r (same outer extent as the cube)."""
    q = p.abs() - (CUBE_HALF - ROUND_r)
    return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0) - ROUND_r


DECOYS = {"filled torus": sdf_filled_torus, "rounded cube": sdf_rounded_cube}
DECOY_OF = {"filled torus": "torus", "rounded cube": "cube"}     # the caption shape each one imitates
# Renderer shape indices: 0..4 the SHAPES, then the DECOYS (5 = filled torus, 6 = rounded cube).
OBJECTS = SHAPES + list(DECOYS)
OBJECT_SDFS = {**SDFS, **DECOYS}


def sdf_by_shape(q: torch.Tensor, shape_idx: torch.Tensor) -> torch.Tensor:
    """Canonical-pose distance of each point q (N, 3) to its own object OBJECTS[shape_idx] (N,):
    a shape of the captions (index < 5) or a decoy."""
    d = torch.empty_like(q[:, 0])
    for k, name in enumerate(OBJECTS):
        m = shape_idx == k
        d[m] = OBJECT_SDFS[name](q[m])
    return d


def to_object(p: torch.Tensor, yaw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """World points or directions (N, 3) -> the canonical frame of objects rotated by `yaw`
    (radians, about z) and scaled by `scale` (N,): R_z(-yaw) p / scale."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    return torch.stack([c * p[:, 0] + s * p[:, 1], -s * p[:, 0] + c * p[:, 1], p[:, 2]], -1) / scale[:, None]


def bump(q: torch.Tensor, bumps: torch.Tensor) -> torch.Tensor:
    """Surface bumps added to the distance at canonical points q (N, 3): a sin(f q_x + p_1)
    sin(f q_y + p_2) sin(f q_z + p_3), with bumps (N, 5) = (a, f, p_1, p_2, p_3) per point.
    The sum is no longer an exact distance: its gradient is at most 1 + a f sqrt(3) (bump_lipschitz)."""
    a, f, ph = bumps[:, 0], bumps[:, 1, None], bumps[:, 2:]
    return a * torch.sin(f * q + ph).prod(-1)


def bump_lipschitz(bumps: torch.Tensor) -> torch.Tensor:
    return 1 + bumps[:, 0] * bumps[:, 1] * math.sqrt(3)


def object_sdf(q: torch.Tensor, shape_idx: torch.Tensor, bumps=None) -> torch.Tensor:
    """Canonical-frame distance at q (N, 3): the shape's SDF, plus the surface bumps (N, 5) if given."""
    d = sdf_by_shape(q, shape_idx)
    return d if bumps is None else d + bump(q, bumps)


def scene_sdf(p: torch.Tensor, shape_idx: torch.Tensor, yaw: torch.Tensor, scale: torch.Tensor, bumps=None):
    """World-space distance to posed objects, one per point: p (N, 3); shape_idx, yaw, scale (N,);
    bumps None or (N, 5) (see bump). An exact SDF stays exact under a rotation and a uniform scale:
    sdf_world(p) = scale * sdf(R_z(-yaw) p / scale)."""
    return object_sdf(to_object(p, yaw, scale), shape_idx, bumps) * scale


def _areas(shape: str) -> dict:
    """Surface area of each part of a shape (for area-uniform sampling)."""
    slant = math.hypot(CONE_R, 2 * CONE_HALF)
    return {"cube": {"faces": 6 * (2 * CUBE_HALF) ** 2},
            "sphere": {"sphere": 4 * math.pi * SPHERE_R ** 2},
            "cylinder": {"side": 2 * math.pi * CYL_R * 2 * CYL_HALF, "caps": 2 * math.pi * CYL_R ** 2},
            "cone": {"side": math.pi * CONE_R * slant, "base": math.pi * CONE_R ** 2},
            "torus": {"torus": 4 * math.pi ** 2 * TORUS_R * TORUS_r}}[shape]


def surface_points(shape: str, colour: str, n: int, generator=None):
    """n points drawn uniformly by area on the canonical surface, with the object's albedo.
    Returns xyz (n, 3) and rgb (n, 3)."""
    g = generator
    u = lambda *s: torch.rand(*s, generator=g)                                    # noqa: E731
    if shape == "cube":
        # a face (6 of equal area), then a uniform point on it
        face = torch.randint(0, 6, (n,), generator=g)
        axis, sign = face // 2, (face % 2) * 2.0 - 1.0
        xyz = (u(n, 3) * 2 - 1) * CUBE_HALF
        xyz[torch.arange(n), axis] = sign * CUBE_HALF
    elif shape == "sphere":
        xyz = F.normalize(torch.randn(n, 3, generator=g), dim=-1) * SPHERE_R
    elif shape == "cylinder":
        a = _areas("cylinder")
        on_side = u(n) < a["side"] / (a["side"] + a["caps"])
        theta = u(n) * 2 * math.pi
        rad = torch.where(on_side, torch.full((n,), CYL_R), CYL_R * u(n).sqrt())   # uniform on a disc
        z = torch.where(on_side, (u(n) * 2 - 1) * CYL_HALF, torch.sign(u(n) - 0.5) * CYL_HALF)
        xyz = torch.stack([rad * theta.cos(), rad * theta.sin(), z], -1)
    elif shape == "cone":
        a = _areas("cone")
        on_side = u(n) < a["side"] / (a["side"] + a["base"])
        theta = u(n) * 2 * math.pi
        frac = u(n).sqrt()              # side: area grows like (distance from apex)^2; base: a disc
        rad = CONE_R * frac
        z = torch.where(on_side, CONE_HALF - 2 * CONE_HALF * frac, torch.full((n,), -CONE_HALF))
        xyz = torch.stack([rad * theta.cos(), rad * theta.sin(), z], -1)
    elif shape == "torus":
        # area element (R + r cos phi) dphi dtheta: rejection-sample phi
        phis = []
        while sum(len(x) for x in phis) < n:
            phi = u(2 * n) * 2 * math.pi
            keep = u(2 * n) * (TORUS_R + TORUS_r) < TORUS_R + TORUS_r * phi.cos()
            phis.append(phi[keep])
        phi = torch.cat(phis)[:n]
        theta = u(n) * 2 * math.pi
        rad = TORUS_R + TORUS_r * phi.cos()
        xyz = torch.stack([rad * theta.cos(), rad * theta.sin(), TORUS_r * phi.sin()], -1)
    else:
        raise common.UserError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    if colour not in COLOURS:
        raise common.UserError(f"unknown colour {colour!r} (one of {', '.join(COLOURS)})")
    return xyz, torch.tensor(COLOURS[colour]).expand(n, 3).clone()


def sdf_samples(shape: str, n: int, generator=None):
    """Training samples for an SDF: half near the surface (surface points + N(0, 0.02^2) or
    N(0, 0.1^2) offsets), half uniform in [-1, 1]^3. Returns xyz (n, 3), sdf (n,)."""
    n_near = n // 2
    surf, _ = surface_points(shape, "red", n_near, generator)
    sigma = torch.where(torch.rand(n_near, 1, generator=generator) < 0.5, 0.02, 0.1)
    near = surf + sigma * torch.randn(n_near, 3, generator=generator)
    far = torch.rand(n - n_near, 3, generator=generator) * 2 - 1
    xyz = torch.cat([near, far])
    return xyz, SDFS[shape](xyz)


def chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance between point sets a (N, 3) and b (M, 3): the mean distance
    from each point to the nearest point of the other set, averaged over both directions."""
    d = torch.cdist(a[None].float(), b[None].float())[0]                              # (N, M)
    return (d.amin(1).mean() + d.amin(0).mean()) / 2


def load_ply(path: str):
    """Vertices (N, 3), colours (N, 3) in [0, 1] (grey if none) and triangles (F, 3) of an ASCII
    PLY written by common.save_ply."""
    with open(path) as f:
        header = []
        while not header or header[-1] != "end_header":
            header.append(f.readline().strip())
        count = {h.split()[1]: int(h.split()[2]) for h in header if h.startswith("element")}
        rows = torch.tensor([[float(v) for v in f.readline().split()] for _ in range(count["vertex"])])
        faces = [[int(x) for x in f.readline().split()[1:4]] for _ in range(count.get("face", 0))]
    colours = rows[:, 3:6] / 255.0 if rows.shape[1] >= 6 else torch.full((len(rows), 3), 0.5)
    return rows[:, :3], colours, torch.tensor(faces, dtype=torch.long).reshape(-1, 3)


def classify(points: torch.Tensor, colours: torch.Tensor, n: int = 800, generator=None) -> dict:
    """Which toy caption does a generated object show? points (N, 3) on its surface (mesh
    vertices or a point cloud, z up), colours (N, 3) in [0, 1]. Shape: centre the points on their
    bounding box and compare with each canonical shape by the Chamfer distance in its canonical
    frame, minimised over size (x0.5-1.5) and, for the cube (the others turn about z), yaw. Colour: the nearest albedo to the
    per-channel median colour. Returns {"shape", "colour", "caption", "chamfer": {shape: d}}."""
    g = generator or torch.Generator().manual_seed(0)
    if len(points) > n:
        pick = torch.randperm(len(points), generator=g)[:n]
        points, colours = points[pick], colours[pick]
    p = points.float() - (points.amax(0) + points.amin(0)).float() / 2                 # (n, 3)
    best = {}
    for shape in SHAPES:
        ref = surface_points(shape, "red", n, g)[0]
        scores = []
        for yaw in (torch.arange(0.0, 90.0, 15.0).tolist() if shape == "cube" else [0.0]):
            q = to_object(p, torch.full((len(p),), math.radians(yaw)), torch.ones(len(p)))
            for scale in torch.linspace(0.5, 1.5, 11).tolist():
                scores.append(chamfer(q / scale, ref).item())
        best[shape] = min(scores)
    shape = min(best, key=best.get)
    med = colours.float().median(0).values
    colour = list(COLOURS)[int((ALBEDO - med).norm(dim=-1).argmin())]
    return {"shape": shape, "colour": colour, "caption": f"a {colour} {shape}", "chamfer": best}


# ================================================================================================
# 2. The renderer: sphere tracing + lambertian shading
# ================================================================================================


def sphere_trace(rays_o, rays_d, shape_idx, yaw, scale, steps: int = 64, eps: float = 1e-3, bumps=None):
    """March each ray by the distance bound, t <- t + sdf(o + t d), until it is within eps of
    the surface or leaves the bounding sphere. rays_o, rays_d (N, 3) (d unit length);
    shape_idx, yaw, scale (N,); bumps None or (N, 5): the bumped distance divided by its Lipschitz
    bound is again a safe step (more steps are then allowed). Returns the hit points (N, 3) and a
    hit mask (N,)."""
    # start and stop where the ray meets the bounding sphere |x| = BOUND
    b = (rays_o * rays_d).sum(-1)
    disc = b * b - (rays_o * rays_o).sum(-1) + BOUND ** 2
    t_far = -b + disc.clamp(min=0).sqrt()
    t = (-b - disc.clamp(min=0).sqrt()).clamp(min=0)
    # march in each object's frame: p_obj = o_obj + t d_obj, world distance = scale * sdf(p_obj)
    o_obj, d_obj = to_object(rays_o, yaw, scale), to_object(rays_d, yaw, scale)
    active = torch.nonzero(disc > 0)[:, 0]              # only rays still marching are evaluated
    if bumps is not None:
        steps, lip = 4 * steps, bump_lipschitz(bumps)
    for _ in range(steps):
        q = o_obj[active] + t[active, None] * d_obj[active]
        dist = object_sdf(q, shape_idx[active], None if bumps is None else bumps[active]) * scale[active]
        if bumps is not None:
            dist = dist / lip[active]
        t[active] = torch.minimum(t[active] + dist, t_far[active])
        active = active[(dist > 0.1 * eps) & (t[active] < t_far[active])]
        if len(active) == 0:
            break
    x = rays_o + t[:, None] * rays_d
    hit = (disc > 0) & (t < t_far) & (scene_sdf(x, shape_idx, yaw, scale, bumps).abs() < 5 * eps)
    return x, hit


def scene_normals(x, shape_idx, yaw, scale, h: float = 1e-3, bumps=None):
    """Unit normals (N, 3): the SDF gradient by central differences."""
    grads = []
    for k in range(3):
        e = torch.zeros(3, device=x.device)
        e[k] = h
        grads.append(scene_sdf(x + e, shape_idx, yaw, scale, bumps) - scene_sdf(x - e, shape_idx, yaw, scale, bumps))
    return F.normalize(torch.stack(grads, -1), dim=-1)


def render_objects(shape_idx, colour_idx, c2w, fov, size: int, yaw, scale, light_dir, ambient,
                   supersample: int = 2, bumps=None):
    """Render one object per image. shape_idx (B,) long, into OBJECTS (the SHAPES, then the
    DECOYS); colour_idx (B,) long; c2w (B, 4, 4); fov (B,)
    degrees; yaw (B,) radians; scale (B,); light_dir (B, 3) unit, pointing at the light;
    ambient (B,); bumps None or (B, 5), surface bumps per object (see bump).
    Lambertian shading: colour = albedo * (ambient + (1 - ambient) max(0, n.l)).
    Renders at size * supersample and box-filters down (anti-aliasing).
    Returns premultiplied rgb (B, 3, size, size) and alpha (B, 1, size, size): composite as
    rgb + (1 - alpha) * background."""
    B, dev = len(shape_idx), c2w.device
    S = size * supersample
    focal = torch.tensor([common.focal_from_fov(f, S) for f in fov.tolist()], device=dev)     # (B,)
    dirs = common.pixel_directions(S, S, 1.0, device=dev)                                    # (S, S, 3)
    dirs = torch.cat([dirs[None, ..., :2] / focal[:, None, None, None],
                      dirs[None, ..., 2:].expand(B, S, S, 1)], -1)                          # (B, S, S, 3)
    rays_d = F.normalize((c2w[:, None, None, :3, :3] @ dirs[..., None])[..., 0], dim=-1).reshape(-1, 3)
    rays_o = c2w[:, None, None, :3, 3].expand(B, S, S, 3).reshape(-1, 3)
    per_ray = lambda v: v.to(dev)[:, None].expand(B, S * S).reshape(-1)              # noqa: E731
    sh, yw, sc = per_ray(shape_idx), per_ray(yaw), per_ray(scale)
    bm = None if bumps is None else bumps.to(dev)[:, None].expand(B, S * S, 5).reshape(-1, 5)
    x, hit = sphere_trace(rays_o, rays_d, sh, yw, sc, bumps=bm)
    n = scene_normals(x, sh, yw, sc, bumps=bm)                                        # (B S S, 3)
    l = light_dir.to(dev)[:, None, :].expand(B, S * S, 3).reshape(-1, 3)
    amb = per_ray(ambient)
    shade = amb + (1 - amb) * (n * l).sum(-1).clamp(min=0)                            # (B S S,)
    albedo = ALBEDO.to(dev)[colour_idx.to(dev)][:, None, :].expand(B, S * S, 3).reshape(-1, 3)
    rgb = (albedo * shade[:, None] * hit[:, None]).reshape(B, S, S, 3).permute(0, 3, 1, 2)
    alpha = hit.float().reshape(B, 1, S, S)
    return F.avg_pool2d(rgb, supersample), F.avg_pool2d(alpha, supersample)


# ================================================================================================
# 3. Backgrounds (Dream Fields composites renders over noise, checkerboards, Fourier textures,
#    all blurred; the held-out kinds are never seen in training)
# ================================================================================================

TRAIN_BACKGROUNDS = ("white", "solid", "noise", "checker", "fourier")
HELD_OUT_BACKGROUNDS = ("gradient", "stripes")


def _grid(size, device):
    """Pixel centres in [0, 1]: x, y each (1, 1, size, size)."""
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    return c[None, None, None, :].expand(1, 1, size, size), c[None, None, :, None].expand(1, 1, size, size)


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image (B, C, H, W) by its own Gaussian sigma (B,) in pixels (separable)."""
    B, C, H, W = img.shape
    r = max(int(math.ceil(3 * float(sigma.max()))), 1)
    x = torch.arange(-r, r + 1, device=img.device, dtype=img.dtype)
    k = torch.exp(-0.5 * (x[None, :] / sigma[:, None].clamp(min=1e-3)) ** 2)            # (B, 2r+1)
    k = (k / k.sum(-1, keepdim=True)).repeat_interleave(C, 0)                             # (B C, 2r+1)
    y = F.pad(img.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def backgrounds(kinds: list, size: int, generator: torch.Generator) -> torch.Tensor:
    """One background per entry of `kinds` -> (B, 3, size, size) in [0, 1], on the generator's
    device. Textured kinds are blurred by sigma ~ U(0, 10) pixels at 224 px (Dream Fields)."""
    B, dev = len(kinds), generator.device
    u = lambda *s: torch.rand(*s, generator=generator, device=dev)                  # noqa: E731
    x, y = _grid(size, dev)
    c0, c1 = u(B, 3, 1, 1), u(B, 3, 1, 1)
    out = {}
    out["white"] = torch.ones(B, 3, size, size, device=dev)
    out["solid"] = c0.expand(B, 3, size, size)
    out["noise"] = u(B, 3, size, size)
    # checkerboard of 8 squares per side, random phase
    ph = u(B, 2, 1, 1)
    out["checker"] = torch.where(((x * 8 + ph[:, :1]).floor() + (y * 8 + ph[:, 1:]).floor()) % 2 == 0, c0, c1)
    # random Fourier texture: 16 random plane waves per channel, normalised to [0, 1]
    freq = torch.randn(B, 3, 16, 2, generator=generator, device=dev) * 4 * 2 * math.pi    # radians / image
    phase = u(B, 3, 16) * 2 * math.pi
    waves = torch.sin(freq[..., 0, None, None] * x[..., None, :, :] + freq[..., 1, None, None] * y[..., None, :, :]
                      + phase[..., None, None]).sum(2)                                        # (B, 3, S, S)
    lo, hi = waves.amin((2, 3), keepdim=True), waves.amax((2, 3), keepdim=True)
    out["fourier"] = (waves - lo) / (hi - lo + 1e-6)
    # held out: linear gradient between two colours, and stripes, at random angles
    ang = u(B, 1, 1, 1) * 2 * math.pi
    proj = (x - 0.5) * ang.cos() + (y - 0.5) * ang.sin()
    out["gradient"] = c0 + (c1 - c0) * (proj / math.sqrt(0.5) + 0.5).clamp(0, 1)
    period = 0.1 + 0.2 * u(B, 1, 1, 1)
    out["stripes"] = torch.where((proj / period).floor() % 2 == 0, c0, c1)
    sigma = u(B) * 10 * size / 224
    names = list(out)
    pick = torch.tensor([names.index(k) for k in kinds], device=dev)
    img = torch.stack([out[k].expand(B, 3, size, size) for k in names])[pick, torch.arange(B, device=dev)]
    textured = (pick != names.index("white")) & (pick != names.index("solid"))
    return torch.where(textured[:, None, None, None], gaussian_blur(img, sigma), img)


# ================================================================================================
# 4. The render distributions: training, and held out (disjoint yaw, light and backgrounds)
# ================================================================================================


def light_near(elevation, azimuth, d_az, u):
    """Unit directions (n, 3) to a light near the camera: elevation + 30 u degrees (u (n,) uniform in
    [0, 1), at most 85), azimuth + d_az degrees. elevation, azimuth, d_az (n,) degrees."""
    return common.spherical_to_cartesian(1.0, (elevation + 30.0 * u).clamp(max=85.0), azimuth + d_az)


def sample_scenes(n: int, held_out: bool, generator: torch.Generator, decoys: bool = False) -> dict:
    """Random objects, cameras and lights (on the CPU generator). Object yaw is drawn from the
    first half of each 90-degree quadrant for training, the second half for held-out; the light
    sits near the camera, its azimuth offset |da| < 35 degrees (training) or 35..60 (held out).
    decoys: the objects are random DECOYS (shape_idx 5, 6, ...) instead of SHAPES."""
    g = generator
    u = lambda *s: torch.rand(*s, generator=g)                                     # noqa: E731
    shape_idx = (torch.randint(0, len(DECOYS), (n,), generator=g) + len(SHAPES) if decoys
                 else torch.randint(0, len(SHAPES), (n,), generator=g))
    colour_idx = torch.randint(0, len(COLOURS), (n,), generator=g)
    cams = common.sample_cameras(n, radius=(3.0, 4.0), elevation=(-10.0, 60.0), fov=(35.0, 45.0), generator=g)
    quadrant = torch.randint(0, 4, (n,), generator=g)
    yaw = torch.deg2rad(quadrant * 90.0 + 45.0 * u(n) + (45.0 if held_out else 0.0))
    side = torch.where(u(n) < 0.5, -1.0, 1.0)
    d_az = side * (35.0 + 25.0 * u(n)) if held_out else (u(n) * 2 - 1) * 35.0
    light = light_near(cams["elevation"], cams["azimuth"], d_az, u(n))
    return {"shape_idx": shape_idx, "colour_idx": colour_idx, "c2w": cams["c2w"], "fov": cams["fov"],
            "yaw": yaw, "scale": 0.9 + 0.2 * u(n), "light_dir": light, "ambient": 0.25 + 0.2 * u(n)}


def random_renders(n: int, size: int, seed: int = 0, device="cpu", held_out: bool = False,
                   background="random", chunk: int = 256, rough: float = 0.0):
    """n random toy renders. background: "random" (a uniform mix of the split's kinds), or one of
    TRAIN_BACKGROUNDS + HELD_OUT_BACKGROUNDS, e.g. "white". rough > 0: that fraction of the objects
    get random surface bumps (random_bumps). All randomness comes from `seed` on
    the CPU, so the images are the same on every device (up to float rounding).
    Returns images (n, 3, size, size) in [0, 1] and caption_idx (n,) long (index into CAPTIONS)."""
    g = torch.Generator().manual_seed(seed)
    kinds_all = HELD_OUT_BACKGROUNDS if held_out else TRAIN_BACKGROUNDS
    if background != "random" and background not in TRAIN_BACKGROUNDS + HELD_OUT_BACKGROUNDS:
        raise common.UserError(f"unknown background {background!r}")
    sc = sample_scenes(n, held_out, g)
    pick = torch.randint(0, len(kinds_all), (n,), generator=g)
    kinds = [kinds_all[i] for i in pick] if background == "random" else [background] * n
    bg = backgrounds(kinds, size, g)
    bumps = random_bumps(n, rough, g) if rough > 0 else None
    images = []
    for i in range(0, n, chunk):
        s = {k: v[i:i + chunk].to(device) for k, v in sc.items()}
        rgb, alpha = render_objects(s["shape_idx"], s["colour_idx"], s["c2w"], s["fov"], size, s["yaw"],
                                    s["scale"], s["light_dir"], s["ambient"],
                                    bumps=None if bumps is None else bumps[i:i + chunk])
        images.append(rgb + (1 - alpha) * bg[i:i + chunk].to(device))
    caption_idx = sc["shape_idx"] * len(COLOURS) + sc["colour_idx"]
    return torch.cat(images).clamp(0, 1), caption_idx.to(device)


# ================================================================================================
# 5. The toy CLIP: a tiny open_clip ViT, trained contrastively on toy renders and their captions
# ================================================================================================

TOY_CLIP_DIR = os.path.join(DATA, "toy_clip")
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# open_clip's folder format ("local-dir:"): the architecture and the preprocessing. The text tower
# keeps open_clip's BPE vocabulary (49408 tokens) with a narrow width, so the token table stays small.
TOY_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 6, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
    },
    "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                       "resize_mode": "squash"},
}
TOY_VOCAB = ["a"] + list(COLOURS) + SHAPES
NONE = len(CAPTIONS)        # the training target of a decoy: the extra "none" class after the 30 captions


def random_bumps(n: int, rough: float, generator: torch.Generator, max_amplitude: float = 0.03) -> torch.Tensor:
    """(n, 5) surface bumps (see bump): a fraction `rough` of the objects get an amplitude uniform in
    [0, max_amplitude] (canonical units: the sphere's radius is SPHERE_R), a frequency uniform in
    [8, 40] and random phases; the others none (a = 0)."""
    u = torch.rand(n, 5, generator=generator)
    a = torch.where(u[:, 0] < rough, u[:, 1] * max_amplitude, torch.zeros(n))
    return torch.cat([a[:, None], 8 + 32 * u[:, 2:3], 2 * math.pi * torch.rand(n, 3, generator=generator)], 1)


def render_pool(n: int, size: int, seed: int, device, chunk: int = 256, decoys: bool = False,
                rough: float = 0.0) -> dict:
    """n training-distribution objects without backgrounds: premultiplied rgb (n, 3, size, size)
    and alpha (n, 1, size, size) in half precision, and caption indices (n,). decoys: the objects
    are DECOYS, whose caption index is NONE (no caption). rough > 0: that fraction of the objects
    get random surface bumps (random_bumps), the rest are drawn exactly as with rough = 0."""
    sc = sample_scenes(n, held_out=False, generator=torch.Generator().manual_seed(seed), decoys=decoys)
    bumps = random_bumps(n, rough, torch.Generator().manual_seed(seed + 7000)) if rough > 0 else None
    rgb, alpha = [], []
    for i in range(0, n, chunk):
        s = {k: v[i:i + chunk].to(device) for k, v in sc.items()}
        c, a = render_objects(s["shape_idx"], s["colour_idx"], s["c2w"], s["fov"], size, s["yaw"], s["scale"],
                              s["light_dir"], s["ambient"], bumps=None if bumps is None else bumps[i:i + chunk])
        rgb.append(c.half())
        alpha.append(a.half())
    caption_idx = torch.full((n,), NONE) if decoys else sc["shape_idx"] * len(COLOURS) + sc["colour_idx"]
    return {"rgb": torch.cat(rgb), "alpha": torch.cat(alpha), "caption_idx": caption_idx.to(device)}


def random_crops(images: torch.Tensor, generator: torch.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """Dream Fields-style augmentation: a random square crop (side min_scale..1 of the image),
    randomly mirrored, resized back to the input size (bilinear). (B, 3, S, S) -> same shape."""
    B, dev = len(images), images.device
    u = lambda *s: torch.rand(*s, generator=generator, device=dev)                  # noqa: E731
    side = min_scale + (1 - min_scale) * u(B)
    centre = (1 - side)[:, None] * (u(B, 2) * 2 - 1)                                # keep the crop inside
    flip = torch.where(u(B) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = side * flip, side, centre
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def write_clip_folder(folder: str, state_dict=None, info=None):
    """open_clip's folder format: open_clip_config.json, open_clip_pytorch_model.bin (weights),
    plus our toyworld.json (the vocabulary that the prior interface checks prompts against)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(TOY_CLIP_CONFIG, f, indent=2)
    if state_dict is not None:
        torch.save(state_dict, os.path.join(folder, "open_clip_pytorch_model.bin"))
    with open(os.path.join(folder, "toyworld.json"), "w") as f:
        json.dump({"vocab": TOY_VOCAB, "captions": CAPTIONS, **(info or {})}, f, indent=2)


def caption_or_none_loss(logits: torch.Tensor, target: torch.Tensor, none_logit=None) -> torch.Tensor:
    """CLIP's InfoNCE over the caption set, optionally with one extra "none" class for decoys.
    logits z (B, 30) = s <f(image_i), g(caption_j)>; target y (B,) in 0..29, or NONE for a decoy.
    Without none_logit: loss = mean_i -log softmax_j(z_ij)[y_i].
    With a scalar none_logit b, shared by every image:
        loss = mean_i -log( exp(z_{i,y_i}) / (sum_j exp(z_ij) + exp(b)) ),   z_{i,NONE} := b,
    so a real image must beat b with its own caption, and a decoy must stay below b with all 30."""
    if none_logit is None:
        return F.cross_entropy(logits, target)
    return F.cross_entropy(torch.cat([logits, none_logit.expand(len(logits), 1)], -1), target)


def train_clip(out: str, steps: int, batch: int, pool_size: int, lr: float, seed: int, device,
               decoys: float = 0.0, init: str = "", rough: float = 0.0):
    """Train the toy CLIP from scratch. Every batch holds all 30 captions, so the contrastive
    (InfoNCE) loss of CLIP is taken over the full caption set: for image i with caption y_i,
    loss_i = -log softmax_j(s * <f(image_i), g(caption_j)>)[y_i], with the learned temperature s.
    Each image is a pooled object composited over a fresh random background, then a random crop.
    decoys: the fraction of each batch that are DECOYS (a random decoy in a random toy colour, with
    the same cameras, lights, backgrounds and crops), trained towards the "none" class of
    caption_or_none_loss. Its logit is b = s * tau with tau a learned cosine threshold (a scalar
    that only training uses: the saved model is a plain open_clip model). decoys = 0: no decoys,
    no "none" class (the loss above, exactly). init: an open_clip folder whose weights to start from
    (fine-tuning a trained toy CLIP, e.g. with decoys) instead of a random initialisation.
    rough: the fraction of pooled objects with random surface bumps (render_pool), so that shape, not
    a perfectly smooth shading, is what names a sphere (the evaluation CLIP, data/toy_clip_eval)."""
    import open_clip
    if not 0.0 <= decoys < 1.0:
        raise common.UserError(f"--decoys {decoys} must be in [0, 1)")
    common.seed_everything(seed)
    write_clip_folder(out)                              # the architecture first: open_clip builds from it
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + out, device=device)
    if init:
        model.load_state_dict(torch.load(os.path.join(init, "open_clip_pytorch_model.bin"), map_location=device))
    tokenizer = open_clip.get_tokenizer("local-dir:" + out)
    tokens = tokenizer(CAPTIONS).to(device)                                                 # (30, 16)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (OPENAI_MEAN, OPENAI_STD))
    size = TOY_CLIP_CONFIG["model_cfg"]["vision_cfg"]["image_size"]
    n_decoy = round(decoys * batch)                     # decoy images per batch
    t0 = time.time()
    pool = render_pool(pool_size, size, seed, device, rough=rough)
    params = [{"params": model.parameters(), "weight_decay": 0.05}]
    if decoys > 0:
        decoy_pool = render_pool(max(1, round(decoys * pool_size)), size, seed + 5000, device, decoys=True)
        tau = torch.nn.Parameter(torch.zeros((), device=device))        # the "none" cosine threshold
        params.append({"params": [tau], "weight_decay": 0.0})
    print(f"rendered {pool_size} objects" + (f" and {len(decoy_pool['rgb'])} decoys" if decoys > 0 else "")
          + f" in {time.time() - t0:.0f} s", flush=True)
    g = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(   # linear warm-up, then cosine decay to 0
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0))))
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=torch.device(device).type == "cuda")
    model.train()
    bar = common.progress(range(steps), desc="toy CLIP")
    for step in bar:
        idx = torch.randint(0, pool_size, (batch - n_decoy,), generator=g, device=device)
        rgb, alpha, target = pool["rgb"][idx], pool["alpha"][idx], pool["caption_idx"][idx]
        if n_decoy:                                     # the decoys go last in the batch
            d = torch.randint(0, len(decoy_pool["rgb"]), (n_decoy,), generator=g, device=device)
            rgb, alpha, target = (torch.cat([v, decoy_pool[k][d]]) for v, k in
                                  ((rgb, "rgb"), (alpha, "alpha"), (target, "caption_idx")))
        kinds = [TRAIN_BACKGROUNDS[k] for k in torch.randint(0, len(TRAIN_BACKGROUNDS), (batch,)).tolist()]
        alpha = alpha.float()
        images = rgb.float() + (1 - alpha) * backgrounds(kinds, size, g)
        images = random_crops(images, g)
        with autocast:
            img = F.normalize(model.encode_image((images - mean) / std), dim=-1)           # (B, 128)
            txt = F.normalize(model.encode_text(tokens), dim=-1)                           # (30, 128)
            s = model.logit_scale.exp()
            logits = s * img.float() @ txt.float().T                                      # (B, 30)
            loss = caption_or_none_loss(logits, target, s * tau if decoys > 0 else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0:
            acc = (logits[:batch - n_decoy].argmax(-1) == target[:batch - n_decoy]).float().mean()
            stats = {"loss": f"{loss.item():.3f}", "acc": f"{acc.item():.3f}"}
            if n_decoy:                                 # decoys whose best caption is below the threshold
                stats["rejected"] = f"{(logits[batch - n_decoy:].amax(-1) < s * tau).float().mean().item():.3f}"
            bar.set_postfix(**stats)
    # keep the file small: half precision, and the token rows of words the captions never use
    # (they were never trained) set to zero, so the file compresses
    state = {k: v.detach().half().cpu() for k, v in model.state_dict().items()}
    used = torch.zeros(state["token_embedding.weight"].shape[0], dtype=torch.bool)
    used[tokens.unique().cpu()] = True
    state["token_embedding.weight"][~used] = 0
    info = {"trained": {"steps": steps, "batch": batch, "pool": pool_size, "lr": lr, "seed": seed, "init": init,
                        "decoys": decoys, "rough": rough, "device": str(device), "seconds": round(time.time() - t0)}}
    if decoys > 0:
        info["trained"].update(decoy_pool=len(decoy_pool["rgb"]), none_cosine=round(tau.item(), 4))
    if init:                                            # keep the record of the model fine-tuned here
        with open(os.path.join(init, "toyworld.json")) as f:
            info["trained"]["init_trained"] = json.load(f).get("trained")
    write_clip_folder(out, state, info)
    return info


def eval_clip(model: str, n: int, seed: int, device, pretrained: str = None, held_out: bool = True,
              rough: float = 0.0) -> float:
    """Zero-shot top-1 over the 30 captions on n renders (held out: new yaw, light, backgrounds;
    rough: the fraction with surface bumps), through the same prior interface the method scripts use."""
    from common import CLIPPrior
    prior = CLIPPrior(model, pretrained, device=device, flag="--model/--pretrained")
    correct = 0
    for i in range(0, n, 500):
        images, idx = random_renders(min(500, n - i), 64, seed=seed + i, device=device, held_out=held_out,
                                     rough=rough)
        correct += prior.r_precision(images, CAPTIONS, idx) * len(idx)
    return correct / n


@torch.no_grad()
def decoy_similarity(model: str, n: int, seed: int, device, pretrained: str = None, size: int = 32,
                     elevation: float = 30.0) -> dict:
    """Does the CLIP tell each decoy from the shape it imitates, from Dream Fields' view? For each
    decoy, n scenes (training-distribution colour, yaw, size, light) seen from `elevation` degrees at
    distance 4 with Dream Fields' field of view (Blender's 39.6 degrees, focal x 1.2), rendered at
    `size` px (its CPU preset) on white, once with the decoy and once with the true shape. Returns
    {decoy: {"caption": "a <colour> <shape>", "decoy": mean cosine of the decoy renders to their
    caption, "true": the same for the true shape, "decoy_higher": fraction of scenes where the decoy
    scores higher}}."""
    from common import CLIPPrior
    prior = CLIPPrior(model, pretrained, device=device, flag="--model/--pretrained")
    txt = prior.encode_text(CAPTIONS)                                                     # (30, D)
    fov = math.degrees(2 * math.atan(math.tan(0.5 * 0.6911112) / 1.2))
    out = {}
    for k, (name, shape) in enumerate(DECOY_OF.items()):
        g = torch.Generator().manual_seed(seed + k)
        sc = sample_scenes(n, held_out=False, generator=g)
        az, el = torch.rand(n, generator=g) * 360.0, torch.full((n,), elevation)
        sc["c2w"], sc["fov"] = common.pose_spherical(torch.full((n,), 4.0), el, az), torch.full((n,), fov)
        u_el = torch.rand(n, generator=g)
        sc["light_dir"] = light_near(el, az, (torch.rand(n, generator=g) * 2 - 1) * 35.0, u_el)
        cap = SHAPES.index(shape) * len(COLOURS) + sc["colour_idx"]                       # (n,)
        sims = {}
        for kind, idx in (("decoy", OBJECTS.index(name)), ("true", SHAPES.index(shape))):
            s = {key: v.to(device) for key, v in sc.items()}
            rgb, alpha = render_objects(torch.full((n,), idx, device=device), s["colour_idx"], s["c2w"],
                                        s["fov"], size, s["yaw"], s["scale"], s["light_dir"], s["ambient"])
            img = prior.encode_image((rgb + 1 - alpha).clamp(0, 1))                          # white background
            sims[kind] = (img * txt[cap.to(device)]).sum(-1)                                  # (n,)
        out[name] = {"caption": f"a <colour> {shape}", "decoy": sims["decoy"].mean().item(),
                     "true": sims["true"].mean().item(),
                     "decoy_higher": (sims["decoy"] > sims["true"]).float().mean().item()}
    return out


def print_decoy_similarity(sims: dict, n: int):
    """One line per decoy of decoy_similarity's result."""
    for name, r in sims.items():
        print(f"{name:13s} vs {r['caption']:18s} (30 deg, {n} each): decoy {r['decoy']:.3f}, true "
              f"{r['true']:.3f}, decoy higher in {100 * r['decoy_higher']:.0f}% of the scenes")


# ================================================================================================
# 6. The toy Stable Diffusion (data/toy_sd)
# ================================================================================================
# The toy Stable Diffusion: real diffusers/transformers classes with tiny configs, trained on
# toy-world renders, saved as an ordinary pipeline folder (data/toy_sd) that `DiffusionPrior("toy")`
# loads through exactly the code path of a hub model.
#
#   tokenizer     CLIPTokenizer whose BPE is the one open_clip ships (bpe_simple_vocab_16e6), cut
#                 down to the merges the toy captions use (same tokens, same BPE rules)
#   text_encoder  CLIPTextModel, 2 layers, width 64
#   vae           AutoencoderKL, 64x64x3 <-> 16x16x4 latents (4x down, SD has 8x)
#   unet          UNet2DConditionModel on 16x16x4 latents, cross-attention to the text states
#   scheduler     DDPMScheduler, SD's "scaled_linear" betas 0.00085..0.012 over 1000 steps
#
# Captions: "<toy caption>, <view suffix>" with the view suffix DreamFusion uses (front/side/back/
# overhead view, from the camera of each render), so view-dependent prompts in SDS ask for what the
# model has seen. The unconditional (empty) caption replaces 10% of captions (classifier-free
# guidance).
#
# Run (GPU; seeded):  python toyworld.py train-sd --device cuda --out data/toy_sd
# On the H100: 24k renders 26 s, VAE (64/128/128 channels) 5000 steps 252 s, UNet 3500 steps (batch
# 512) 377-420 s, evaluation 40 s. The shipped data/toy_sd was trained in two commands (the lent GPU
# caps one at 10 minutes): `--unet-steps 1 --out /tmp/tsd2`, then `--init /tmp/tsd2 --unet-steps 3500`.
# Evaluation: DDIM 50 steps, guidance 7.5, 10 samples per caption; the toy CLIP ranks the sample's
# own caption first among the 30 for 88.7% (H100) and 91.7 / 90.7 / 91.3% (CPU, seeds 0/1/2) of them,
# 90.6% on the mean (99.0% for real renders of the same distribution, 97.0% for their VAE
# reconstructions); cylinders are the weak shape (65-73%). The first toy SD (VAE 32/64/64, 2500
# steps): 80.0%.

VIEW_SUFFIXES = ["front view", "side view", "back view", "overhead view"]
MAX_TOKENS = 16          # the toy tokenizer's model_max_length (SD: 77)


# ---- tokenizer: open_clip's BPE, reduced to the toy vocabulary ------------------------------------

def _open_clip_bpe():
    """open_clip's byte-level BPE: (merges as a list of pairs, the pre-tokeniser)."""
    from open_clip import tokenizer as oct
    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
    simple = oct.SimpleTokenizer()

    def pieces(text):
        text = oct.whitespace_clean(oct.basic_clean(text)).lower()
        return ["".join(simple.byte_encoder[b] for b in p.encode("utf-8"))
                for p in oct.re.findall(simple.pat, text)]
    return merges, pieces


def _bpe_with_trace(piece: str, ranks: dict):
    """Byte-pair-encode one pre-token; returns (tokens, the merges that fired)."""
    word = list(piece[:-1]) + [piece[-1] + "</w>"]
    fired = []
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        fired.append(best)
        out, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word, fired


def build_toy_tokenizer(texts):
    """A CLIPTokenizer with open_clip's BPE rules, keeping only the merges that the given texts
    use. Keeping a subset of merges in their original order leaves the tokenisation of these texts
    unchanged (at every step the merge that fires is the lowest-ranked applicable one in both).
    Vocabulary: the 256 byte symbols, the same with </w>, the kept merges, the two specials."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer
    merges, pieces = _open_clip_bpe()
    ranks = {m: i for i, m in enumerate(merges)}
    used = set()
    for text in texts:
        for piece in pieces(text):
            used.update(_bpe_with_trace(piece, ranks)[1])
    kept = [m for m in merges if m in used]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in kept]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=kept)
    tok.model_max_length = MAX_TOKENS
    return tok


# ---- the tiny pipeline -------------------------------------------------------------------------

def build_toy_pipeline(tokenizer, width: int = 64, unet_channels=(64, 128, 128), vae_channels=(32, 64, 64),
                       seed: int = 0):
    """Randomly initialised components (a dict of the five) with tiny configs. width: the text
    encoder's; unet_channels (multiples of 32) and vae_channels (of 16): per resolution level."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=vae_channels, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=unet_channels, cross_attention_dim=width, attention_head_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "scheduler": scheduler}


def load_toy_pipeline(folder: str) -> dict:
    """The five components of a saved toy pipeline, in fp32 (to continue its training), loaded as
    common.DiffusionPrior loads them."""
    classes = {"tokenizer": ("transformers", "CLIPTokenizer"), "text_encoder": ("transformers", "CLIPTextModel"),
               "vae": ("diffusers", "AutoencoderKL"), "unet": ("diffusers", "UNet2DConditionModel"),
               "scheduler": ("diffusers", "DDPMScheduler")}
    return {sub: common._load_component(folder, sub, lib, cls, torch.float32) for sub, (lib, cls) in classes.items()}


def save_pipeline(parts: dict, out: str, vocab_words=None):
    """Save as a diffusers pipeline folder (model_index.json + one subfolder per component), weights
    in fp16. vocab_words: the toy vocabulary, written to toy_vocab.json (the prompt guard)."""
    from diffusers import StableDiffusionPipeline
    half = {k: (v.half() if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}
    pipe = StableDiffusionPipeline(**half, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    for k, v in parts.items():
        if isinstance(v, torch.nn.Module):
            v.float()
    if vocab_words is not None:
        with open(os.path.join(out, "toy_vocab.json"), "w") as f:
            json.dump({"words": sorted(set(vocab_words))}, f, indent=1)


# ---- training data: toy renders on plain backgrounds, captions with the view suffix --------------

def toy_sd_renders(n: int, size: int, seed: int, device="cpu", white: float = 0.75):
    """n toy renders for the toy SD, all randomness from `seed` (CPU generator).
    Objects, colours, yaw, scale and ambient light come from sample_scenes; the cameras
    are redrawn with elevation in [-10, 80] degrees so that every view suffix (overhead included)
    occurs, the light near the camera as in sample_scenes (light_near). Backgrounds are plain as
    DreamFusion's: white with probability `white`, else one random solid colour.
    Returns images (n, 3, size, size) in [0, 1] and captions (list of n strings)."""
    g = torch.Generator().manual_seed(seed)
    sc = sample_scenes(n, False, g)
    cams = common.sample_cameras(n, radius=(3.0, 4.0), elevation=(-10.0, 80.0), fov=(35.0, 45.0), generator=g)
    d_az = (torch.rand(n, generator=g) * 2 - 1) * 35.0
    sc["c2w"], sc["fov"] = cams["c2w"], cams["fov"]
    sc["light_dir"] = light_near(cams["elevation"], cams["azimuth"], d_az, torch.rand(n, generator=g))
    kinds = ["white" if w < white else "solid" for w in torch.rand(n, generator=g).tolist()]
    bg = backgrounds(kinds, size, g)
    images = []
    for i in range(0, n, 1024):
        s = {k: v[i:i + 1024].to(device) for k, v in sc.items()}
        rgb, alpha = render_objects(s["shape_idx"], s["colour_idx"], s["c2w"], s["fov"], size,
                                             s["yaw"], s["scale"], s["light_dir"], s["ambient"])
        images.append(rgb + (1 - alpha) * bg[i:i + 1024].to(device))
    cap_idx = sc["shape_idx"] * len(COLOURS) + sc["colour_idx"]
    captions = [f"{CAPTIONS[c]}, {common.view_suffix(e, a)}"
                for c, e, a in zip(cap_idx.tolist(), cams["elevation"].tolist(), cams["azimuth"].tolist())]
    return torch.cat(images).clamp(0, 1), captions


# ---- training ----------------------------------------------------------------------------------

def train_vae(vae, images, steps: int, batch: int = 128, lr: float = 1e-3, kl_weight: float = 1e-6,
              log=print):
    """Autoencoder: L1 + L2 reconstruction of images in [-1, 1] plus a small KL term (SD's KL-f8
    uses 1e-6; no adversarial or perceptual loss here). Returns the final reconstruction L1."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), device=images.device)] * 2 - 1
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        l1 = (rec - x).abs().mean()
        loss = l1 + ((rec - x) ** 2).mean() + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"vae step {step:5d}  l1 {l1.item():.4f}")
    vae.eval()
    return l1.item()


@torch.no_grad()
def encode_all(vae, images, batch: int = 512):
    """Latent mean and std of every image, (N, 4, h, w) each (unscaled)."""
    mean, std = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch] * 2 - 1).latent_dist
        mean.append(post.mean)
        std.append(post.std)
    return torch.cat(mean), torch.cat(std)


def train_unet(unet, text_encoder, tokenizer, scheduler, lat_mean, lat_std, captions, steps: int,
               batch: int = 512, lr: float = 4e-4, p_uncond: float = 0.1, ema_decay: float = 0.999,
               log=print):
    """Epsilon prediction (DDPM's simple loss) on scaled latents; the text encoder learns with the
    UNet (it starts from random weights). A caption is replaced by "" with probability p_uncond
    (classifier-free guidance). The UNet and text encoder end with their exponential moving
    averages."""
    import copy
    dev = lat_mean.device
    texts = sorted(set(captions)) + [""]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(dev)           # (K, L)
    cap = torch.tensor([texts.index(c) for c in captions], device=dev)             # (N,)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    abar = scheduler.alphas_cumprod.to(dev)
    T = scheduler.config.num_train_timesteps
    unet.train()
    text_encoder.train()
    t0 = time.time()
    for step in range(steps):
        i = torch.randint(0, len(cap), (batch,), device=dev)
        x = lat_mean[i] + lat_std[i] * torch.randn_like(lat_mean[i])                 # a VAE sample
        k = torch.where(torch.rand(batch, device=dev) < p_uncond, len(texts) - 1, cap[i])
        t = torch.randint(0, T, (batch,), device=dev)
        eps = torch.randn_like(x)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * eps
        for g in opt.param_groups:                                                   # 200-step warmup
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
            h = text_encoder(ids[k])[0]
            loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=h).sample.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for e, m in zip(ema, (unet, text_encoder)):
                torch._foreach_lerp_(list(e.parameters()), list(m.parameters()), 1 - d)
        if step % 1000 == 0:
            log(f"unet step {step:6d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    unet.load_state_dict(ema[0].state_dict())
    text_encoder.load_state_dict(ema[1].state_dict())
    unet.eval()
    text_encoder.eval()


@torch.no_grad()
def eval_vae(folder: str, n: int, seed: int, device) -> tuple:
    """The ceiling that the autoencoder puts on the samples: toy-CLIP top-1 over the 30 captions of
    n training-distribution renders (toy_sd_renders) and of their VAE reconstructions
    decode(mean of encode(x)). Returns (top-1 of the renders, top-1 of the reconstructions)."""
    prior = common.DiffusionPrior(folder, device=device)
    vae = prior.vae.float()
    images, captions = toy_sd_renders(n, 64, seed, device)
    rec = ((vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
    clip = common.CLIPPrior("toy", device=device)
    true = [CAPTIONS.index(c.split(",")[0]) for c in captions]
    return clip.r_precision(images, CAPTIONS, true), clip.r_precision(rec, CAPTIONS, true)


@torch.no_grad()
def eval_sd(folder: str, per_caption: int, seed: int, device, guidance: float = 7.5, clip="toy",
             samples_png: str = ""):
    """Sample `per_caption` images of every toy caption (DDIM, 50 steps, `guidance`) and return
    the fraction that the toy CLIP ranks their own caption first among the 30 (Dream Fields'
    R-precision) and that fraction per shape; None while data/toy_clip is not trained.
    Optionally write a grid (one row per caption) to samples_png."""
    prior = common.DiffusionPrior(folder, device=device)
    g = torch.Generator(device).manual_seed(seed)
    imgs = torch.cat([prior.sample([c] * per_caption, steps=50, guidance=guidance, generator=g)
                      for c in CAPTIONS])                                  # (30 n, 3, H, W)
    if samples_png:
        S = imgs.shape[-1]
        grid = imgs.reshape(len(CAPTIONS), per_caption, 3, S, S).permute(0, 3, 1, 4, 2)
        common.save_image(samples_png, grid.reshape(len(CAPTIONS) * S, per_caption * S, 3))
    if clip == "toy" and not os.path.isdir(common.TOY_CLIP["toy"]):
        return None
    clip = common.CLIPPrior(clip, device=device)
    sim = clip.similarity(clip.encode_image(imgs.float()), clip.encode_text(CAPTIONS))   # (30 n, 30)
    true_idx = torch.arange(len(CAPTIONS), device=sim.device).repeat_interleave(per_caption)
    right = (sim.argmax(-1) == true_idx).float()
    per_shape = right.reshape(len(SHAPES), -1).mean(1)     # CAPTIONS are grouped by shape
    return right.mean().item(), dict(zip(SHAPES, per_shape.tolist()))


def train_sd(args, device):
    """`python toyworld.py train-sd`: renders, VAE, UNet, save to args.out, then the evaluation."""
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    if not args.eval_only:
        t0 = time.time()
        images, captions = toy_sd_renders(args.n, args.size, args.seed, device)
        print(f"{len(images)} renders in {time.time() - t0:.0f}s")
        if args.init:            # continue a trained pipeline: its tokenizer and VAE stay as they are
            parts = load_toy_pipeline(args.init)
            vae, unet, te = (parts[k].to(device) for k in ("vae", "unet", "text_encoder"))
            lat_mean, lat_std = encode_all(vae, images)
            scale = vae.config.scaling_factor
        else:
            texts = [f"{c}, {v}" for c in CAPTIONS for v in VIEW_SUFFIXES] + [""]
            vae_channels = tuple(int(c) for c in args.vae_channels.split(","))
            parts = build_toy_pipeline(build_toy_tokenizer(texts), vae_channels=vae_channels, seed=args.seed)
            vae, unet, te = (parts[k].to(device) for k in ("vae", "unet", "text_encoder"))
            t0 = time.time()
            l1 = train_vae(vae, images, args.vae_steps)
            lat_mean, lat_std = encode_all(vae, images)
            scale = 1.0 / lat_mean.std().item()              # unit-variance latents, as SD's 0.18215
            vae.register_to_config(scaling_factor=scale)
            print(f"vae: {time.time() - t0:.0f}s, final l1 {l1:.4f}, scaling_factor {scale:.4f}")
        t0 = time.time()
        train_unet(unet, te, parts["tokenizer"], parts["scheduler"], lat_mean * scale, lat_std * scale, captions,
                   args.unet_steps, lr=args.unet_lr)
        print(f"unet: {args.unet_steps} steps in {time.time() - t0:.0f}s")
        # the prompt guard's vocabulary: the caption words (the view suffixes are the prior's own)
        save_pipeline(parts, args.out, [w for c in CAPTIONS for w in c.split()])
        print(f"saved {args.out}")
    if args.eval_per_caption and os.path.isdir(common.TOY_CLIP["toy"]):
        raw, rec = eval_vae(args.out, 300, 10_000 + args.seed, device)
        print(f"toy CLIP top-1 on 300 renders: {100 * raw:.1f}%; on their VAE reconstructions: {100 * rec:.1f}% "
              "(the ceiling for the samples)")
    if args.eval_per_caption:
        t0 = time.time()
        res = eval_sd(args.out, args.eval_per_caption, args.seed, device, args.eval_guidance,
                      samples_png=args.samples)
        if res is None:
            print("no toy CLIP in data/toy_clip yet: recognition not measured")
            return
        r, per_shape = res
        print(f"toy CLIP recognises {100 * r:.1f}% of {args.eval_per_caption} samples per caption "
              f"(50 DDIM steps, guidance {args.eval_guidance}), {time.time() - t0:.0f}s; by shape: "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in per_shape.items()))


# ================================================================================================
# 7. Command line
# ================================================================================================


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-clip", help="train the toy CLIP (-> data/toy_clip)")
    t.add_argument("--out", default=TOY_CLIP_DIR)
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--pool", type=int, default=20000, help="number of pre-rendered objects")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--eval-n", type=int, default=3000, help="held-out renders for the final evaluation")
    t.add_argument("--init", default="", help="start from this trained open_clip folder (e.g. data/toy_clip)")
    t.add_argument("--decoys", type=float, default=0.15,
                   help="fraction of each batch that are decoys (filled tori, rounded cubes) trained towards "
                        "no caption; 0: none (the original training)")
    t.add_argument("--rough", type=float, default=0.0,
                   help="fraction of training objects with random surface bumps (the evaluation CLIP: 0.5)")
    e = sub.add_parser("eval-clip", help="zero-shot top-1 of a CLIP on held-out toy renders")
    e.add_argument("--model", default="toy", help="toy | an open_clip folder | architecture (with --pretrained)")
    e.add_argument("--pretrained", default=None)
    e.add_argument("--n", type=int, default=3000, help="held-out renders for the top-1 (0: skip it)")
    e.add_argument("--rough", type=float, default=0.0, help="fraction of the renders with surface bumps")
    e.add_argument("--decoys", type=int, default=0, metavar="N",
                   help="also N renders per decoy and of its true shape from Dream Fields' 30-degree view: "
                        "mean cosine to the caption of the true shape (e.g. 60)")
    d = sub.add_parser("train-sd", help="train (or with --eval-only, evaluate) the toy Stable Diffusion (-> data/toy_sd)")
    d.add_argument("--out", default="data/toy_sd")
    d.add_argument("--n", type=int, default=24000, help="training renders")
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--vae-steps", type=int, default=5000)
    d.add_argument("--unet-steps", type=int, default=3500)
    d.add_argument("--unet-lr", type=float, default=4e-4, help="UNet (and text encoder) learning rate")
    d.add_argument("--vae-channels", default="64,128,128", help="VAE channels per level (multiples of 16)")
    d.add_argument("--init", default="", help="continue training this saved toy pipeline (its VAE is kept)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--eval-only", action="store_true", help="skip training: evaluate --out")
    d.add_argument("--eval-per-caption", type=int, default=10, help="samples per caption (0: no evaluation)")
    d.add_argument("--eval-guidance", type=float, default=7.5, help="classifier-free guidance scale")
    d.add_argument("--samples", default="", help="also write the evaluation samples as a PNG grid here")
    v = sub.add_parser("preview", help="a grid of 30 training and 30 held-out renders")
    v.add_argument("--out", default="out/toyworld")
    for s in (t, e, v):
        s.add_argument("--seed", type=int, default=0)
    for s in (t, e, v, d):
        s.add_argument("--device", default="auto")
    a = p.parse_args()
    device = common.pick_device(a.device)
    if a.cmd == "train-clip":
        info = train_clip(a.out, a.steps, a.batch, a.pool, a.lr, a.seed, device, a.decoys, a.init, a.rough)
        acc = eval_clip(a.out, a.eval_n, 10_000 + a.seed, device)
        info["zero_shot_top1_held_out"] = {"top1": round(acc, 4), "renders": a.eval_n}
        acc = eval_clip(a.out, a.eval_n, 10_000 + a.seed, device, rough=1.0)
        info["zero_shot_top1_held_out_all_bumped"] = {"top1": round(acc, 4), "renders": a.eval_n}
        sims = decoy_similarity(a.out, 300, 20_000 + a.seed, device)
        info["decoy_similarity_30deg"] = {k: {m: (round(v, 4) if isinstance(v, float) else v) for m, v in r.items()}
                                          for k, r in sims.items()}
        write_clip_folder(a.out, info=info)
        print(f"zero-shot top-1 on {a.eval_n} held-out renders: {info['zero_shot_top1_held_out']['top1']:.4f} "
              f"(all with surface bumps: {acc:.4f})")
        print_decoy_similarity(sims, 300)
    elif a.cmd == "eval-clip":
        if a.n:
            acc = eval_clip(a.model, a.n, 10_000 + a.seed, device, a.pretrained, rough=a.rough)
            print(f"zero-shot top-1 on {a.n} held-out renders (a fraction {a.rough:g} bumped): {acc:.4f}")
        if a.decoys:
            print_decoy_similarity(decoy_similarity(a.model, a.decoys, 20_000 + a.seed, device, a.pretrained),
                                   a.decoys)
    elif a.cmd == "train-sd":
        train_sd(a, device)
    elif a.cmd == "preview":
        for held_out in (False, True):
            images, _ = random_renders(30, 64, seed=a.seed, held_out=held_out, device=device)
            grid = images.reshape(5, 6, 3, 64, 64).permute(0, 3, 1, 4, 2).reshape(5 * 64, 6 * 64, 3)
            path = os.path.join(a.out, f"renders_{'held_out' if held_out else 'train'}.png")
            os.makedirs(a.out, exist_ok=True)
            common.save_image(path, grid)
            print(path)


if __name__ == "__main__":
    with common.cli_errors():
        main()
