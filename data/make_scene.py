"""Render the bundled NeRF scene `data/still_life/` (Blender / nerf_synthetic format).

    python data/make_scene.py            # rewrites data/still_life/ (deterministic, ~1 minute on a CPU)

A small procedural still life on a pedestal: a striped sphere, a checkered box, a torus with a
colour ramp, a banded cone. Surfaces are found by sphere tracing analytic signed distance
functions; shading is lambertian under two fixed lights (baked into the colour, so the scene is
view-independent like most of nerf_synthetic); each pixel averages 3x3 sub-pixel rays, which
gives anti-aliased edges and a soft alpha. Cameras sit on the upper hemisphere at radius 4 with
lego's field of view, as in the Blender scenes.
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "still_life")
SIZE, SUPERSAMPLE, ANGLE_X, RADIUS = 100, 3, 0.6911112070083618, 4.0
SPLITS = {"train": 100, "val": 10, "test": 25}


# ---- signed distances of the parts (x: (N, 3)) ------------------------------------------------
def sd_sphere(x, c, r):
    return (x - c).norm(dim=-1) - r


def sd_box(x, c, half):
    q = (x - c).abs() - half
    return q.clamp(min=0).norm(dim=-1) + q.max(-1).values.clamp(max=0)


def sd_torus_y(x, c, R, r):          # torus standing up: its axis is y
    p = x - c
    q = torch.stack([torch.stack([p[:, 0], p[:, 2]], -1).norm(dim=-1) - R, p[:, 1]], -1)
    return q.norm(dim=-1) - r


def sd_cylinder_z(x, c, r, h):
    p = x - c
    d = torch.stack([p[:, :2].norm(dim=-1) - r, p[:, 2].abs() - h], -1)
    return d.clamp(min=0).norm(dim=-1) + d.max(-1).values.clamp(max=0)


def sd_cone_z(x, c, r, h):            # base radius r at z = c_z, apex at c_z + h (a bound, fine for tracing)
    p = x - c
    q = torch.stack([p[:, :2].norm(dim=-1), p[:, 2]], -1)
    side = (q[:, 0] * h + (q[:, 1] - h) * r) / math.hypot(r, h)
    return torch.maximum(side, -q[:, 1])


PARTS = [  # (sdf, texture)
    (lambda x: sd_cylinder_z(x, torch.tensor([0.0, 0.0, -0.05]), 0.95, 0.05), "pedestal"),
    (lambda x: sd_sphere(x, torch.tensor([0.38, 0.32, 0.32]), 0.32), "sphere"),
    (lambda x: sd_box(x, torch.tensor([-0.35, -0.3, 0.25]), torch.tensor([0.25, 0.25, 0.25])), "box"),
    (lambda x: sd_torus_y(x, torch.tensor([0.35, -0.42, 0.32]), 0.24, 0.08), "torus"),
    (lambda x: sd_cone_z(x, torch.tensor([-0.35, 0.42, 0.0]), 0.25, 0.7), "cone"),
]


def scene_sdf(x):
    d = torch.stack([f(x) for f, _ in PARTS], -1)                    # (N, parts)
    return d.min(-1)


def texture(name_idx, x):
    """Albedo (N, 3) of the part each point belongs to."""
    out = torch.zeros_like(x)
    for k, (_, name) in enumerate(PARTS):
        m = name_idx == k
        p = x[m]
        if name == "pedestal":    # concentric rings
            ring = (torch.floor(p[:, :2].norm(dim=-1) * 10) % 2)[:, None]
            c = ring * torch.tensor([0.85, 0.80, 0.70]) + (1 - ring) * torch.tensor([0.45, 0.30, 0.20])
        elif name == "sphere":    # stripes around the sphere
            q = p - torch.tensor([0.38, 0.32, 0.32])
            s = (torch.sin(q[:, 2] * 40) > 0).float()[:, None]
            c = s * torch.tensor([0.95, 0.95, 0.95]) + (1 - s) * torch.tensor([0.85, 0.15, 0.25])
        elif name == "box":       # 3D checkerboard
            q = torch.floor((p + 2) * 8).long().sum(-1) % 2
            c = torch.where(q[:, None] == 1, torch.tensor([0.15, 0.35, 0.85]), torch.tensor([0.95, 0.85, 0.2]))
        elif name == "torus":     # colour ramp around the ring
            q = p - torch.tensor([0.35, -0.42, 0.32])
            a = torch.atan2(q[:, 2], q[:, 0])[:, None]
            c = 0.5 + 0.45 * torch.cat([torch.cos(a), torch.cos(a + 2.1), torch.cos(a + 4.2)], -1)
        else:                     # cone: horizontal bands
            b = (torch.floor(p[:, 2] * 12) % 3).long()
            pal = torch.tensor([[0.2, 0.7, 0.3], [0.95, 0.55, 0.1], [0.3, 0.2, 0.5]])
            c = pal[b]
        out[m] = c
    return out


def shade(x):
    """Lambertian colour (N, 3) at surface points x (N, 3)."""
    eps = 1e-3
    n = torch.stack([scene_sdf(x + eps * e)[0] - scene_sdf(x - eps * e)[0] for e in torch.eye(3)], -1)
    n = torch.nn.functional.normalize(n, dim=-1)
    lights = torch.nn.functional.normalize(torch.tensor([[0.6, 0.3, 1.0], [-0.8, -0.5, 0.4]]), dim=-1)
    diffuse = (n @ lights.T).clamp(min=0) @ torch.tensor([0.65, 0.35])
    return texture(scene_sdf(x)[1], x) * (0.3 + 0.75 * diffuse)[:, None]


def render(c2w, focal):
    """Sphere-trace one view: returns (SIZE, SIZE, 4) RGBA in [0, 1]."""
    S = SIZE * SUPERSAMPLE
    rays_o, rays_d = common.get_rays(S, S, focal * SUPERSAMPLE, c2w)
    o, d = rays_o.reshape(-1, 3), torch.nn.functional.normalize(rays_d.reshape(-1, 3), dim=-1)
    t = torch.full((len(o),), 2.0)
    for _ in range(160):
        t = t + scene_sdf(o + t[:, None] * d)[0].clamp(min=0) * 0.9
    x = o + t[:, None] * d
    hit = scene_sdf(x)[0] < 2e-3
    rgba = torch.zeros(len(o), 4)
    rgba[hit, :3] = shade(x[hit])
    rgba[hit, 3] = 1.0
    rgba = rgba.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 4).mean((1, 3))
    rgba[..., :3] = rgba[..., :3] / rgba[..., 3:].clamp(min=1e-6)   # straight (non-premultiplied) alpha
    return rgba


def main():
    g = torch.Generator().manual_seed(0)
    focal = 0.5 * SIZE / math.tan(0.5 * ANGLE_X)
    for split, n in SPLITS.items():
        os.makedirs(os.path.join(OUT, split), exist_ok=True)
        if split == "test":   # an even turn at 30 degrees elevation, as the Blender test sets
            el, az = torch.full((n,), 30.0), torch.linspace(-180, 180, n + 1)[:-1]
        else:                 # random on the upper hemisphere (uniform in area)
            el = torch.rad2deg(torch.asin(torch.rand(n, generator=g) * 0.95 + 0.05))
            az = torch.rand(n, generator=g) * 360 - 180
        frames = []
        for i in range(n):
            c2w = common.pose_spherical(RADIUS, el[i], az[i])
            common.save_image(os.path.join(OUT, split, f"r_{i}.png"), render(c2w, focal))
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
        with open(os.path.join(OUT, f"transforms_{split}.json"), "w") as f:
            json.dump({"camera_angle_x": ANGLE_X, "frames": frames}, f, indent=1)
        print(f"{split}: {n} views -> {OUT}")


if __name__ == "__main__":
    main()
