"""Benchmark of the PyTorch rasteriser and marching tetrahedra (common.py) at Magic3D's fine-stage
sizes: 512 x 512 images, ~200k triangles, a tet grid of resolution 128. Prints a markdown table.
    python bench/bench_raster.py            (needs a CUDA GPU)"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from timing import median_ms as timed  # noqa: E402
from common import (antialias, interpolate, marching_tets, project_to_clip, rasterize, tet_grid,  # noqa: E402
                       vertex_normals, normal_consistency_loss)


def uv_sphere(n_lat: int, n_lon: int, device):
    """A closed latitude-longitude sphere of radius 1 with 2 n_lon (n_lat - 1) triangles."""
    th = torch.linspace(0, math.pi, n_lat + 1, device=device)[1:-1]
    ph = torch.linspace(0, 2 * math.pi, n_lon + 1, device=device)[:-1]
    t, p = torch.meshgrid(th, ph, indexing="ij")
    ring = torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], -1).view(-1, 3)
    verts = torch.cat([torch.tensor([[0, 0, 1.0], [0, 0, -1.0]], device=device), ring])
    q = torch.arange(n_lat - 1, device=device)[:, None] * n_lon + torch.arange(n_lon, device=device) + 2
    nxt = q.roll(-1, dims=1)
    a, b, c, d = q[:-1], q[1:], nxt[1:], nxt[:-1]
    quads = torch.cat([torch.stack([a, b, c], -1), torch.stack([a, c, d], -1)]).view(-1, 3)
    top = torch.stack([torch.zeros_like(q[0]), q[0], nxt[0]], -1)
    bot = torch.stack([torch.ones_like(q[-1]), nxt[-1], q[-1]], -1)
    return verts, torch.cat([top, quads, bot])


def bumpy_sdf(x):
    """A sphere of radius 0.75 with bumps: the kind of surface Magic3D's DMTet stage meshes."""
    r = x.norm(dim=-1)
    return r - 0.75 - 0.06 * torch.sin(9 * x[:, 0]) * torch.sin(9 * x[:, 1]) * torch.sin(9 * x[:, 2])


def render(verts, faces, c2w, focal, H, W):
    """Rasterise, interpolate vertex normals into a lambertian-ish shade, antialias: (B, H, W, 3)."""
    clip = project_to_clip(verts, c2w, focal, H, W)
    rast = rasterize(clip, faces, H, W)
    n = interpolate(vertex_normals(verts, faces), rast, faces)
    shade = (n * torch.tensor([0.3, 0.5, 0.8], device=n.device)).sum(-1, keepdim=True).clamp(min=0)
    return antialias(shade.expand(-1, -1, -1, 3) * 0.8 + 0.2, rast, clip, faces)


def main():
    dev = torch.device("cuda")
    H = W = 512
    rows = []

    def add(what, ms, mib, note=""):
        rows.append(f"| {what} | {ms:.2f} | {mib:.0f} | {note} |")
        print(rows[-1], flush=True)

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}\n")
    print("| what | median ms | peak extra MiB | notes |\n| --- | --- | --- | --- |")
    focal = common.focal_from_fov(40.0, W)
    sv, sf = uv_sphere(250, 400, dev)
    meshes = [("uv sphere", sv, sf)]
    grid_v, tets = tet_grid(128, device=dev)
    ms, mib = timed(lambda: tet_grid(128, device=dev), reps=5)
    add("tet_grid(128)", ms, mib, f"{grid_v.shape[0]} verts, {tets.shape[0]} tets")
    sdf = bumpy_sdf(grid_v)
    mv, mf = marching_tets(grid_v, sdf, tets)
    meshes.append(("DMTet mesh", mv.detach(), mf))

    for name, verts, faces in meshes:
        tag = f"{name}, {faces.shape[0] / 1e3:.0f}k tris"
        for B in (1, 4):
            c2w = common.sample_cameras(B, generator=torch.Generator().manual_seed(0), device=dev)["c2w"]
            clip = project_to_clip(verts, c2w, focal, H, W)
            rast = rasterize(clip, faces, H, W)
            cover = (rast[..., 3] > 0).float().mean().item()
            ms, mib = timed(lambda: rasterize(clip, faces, H, W))
            add(f"rasterize, B={B}, 512^2", ms, mib, f"{tag}; {cover:.0%} of pixels covered")
            with torch.no_grad():
                ms, mib = timed(lambda: render(verts, faces, c2w, focal, H, W))
            add(f"rasterize+interpolate+antialias fwd, B={B}", ms, mib, tag)
            vp = verts.clone().requires_grad_()
            ms, mib = timed(lambda: render(vp, faces, c2w, focal, H, W).square().mean().backward())
            add(f"rasterize+interpolate+antialias fwd+bwd, B={B}", ms, mib, tag)

    s = sdf.clone().requires_grad_()
    with torch.no_grad():
        ms, mib = timed(lambda: marching_tets(grid_v, s, tets), reps=10)
    add("marching_tets fwd, res 128", ms, mib, f"{mf.shape[0] / 1e3:.0f}k tris, {mv.shape[0] / 1e3:.0f}k verts")

    def mt_step():
        v, f = marching_tets(grid_v, s, tets)
        (v.square().sum() + normal_consistency_loss(v, f)).backward()
    ms, mib = timed(mt_step, reps=10)
    add("marching_tets + normal consistency fwd+bwd, res 128", ms, mib, "")

    c2w = common.sample_cameras(1, generator=torch.Generator().manual_seed(1), device=dev)["c2w"]
    deform = torch.zeros_like(grid_v, requires_grad=True)

    def dmtet_step():
        v, f = marching_tets(grid_v + (2.0 / 128) * torch.tanh(deform), s, tets)
        loss = render(v, f, c2w, focal, H, W).square().mean() + normal_consistency_loss(v, f)
        loss.backward()
    ms, mib = timed(dmtet_step, reps=10)
    add("one DMTet step: marching tets + render + normal loss, fwd+bwd, B=1", ms, mib, "res 128, 512^2")


def profile(path: str):
    """Kernel-level profile of one fwd+bwd render (B=1, uv sphere) written to path."""
    dev = torch.device("cuda")
    verts, faces = uv_sphere(250, 400, dev)
    verts.requires_grad_()
    c2w = common.sample_cameras(1, generator=torch.Generator().manual_seed(0), device=dev)["c2w"]
    focal = common.focal_from_fov(40.0, 512)
    for _ in range(3):
        render(verts, faces, c2w, focal, 512, 512).square().mean().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            render(verts, faces, c2w, focal, 512, 512).square().mean().backward()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
    if len(sys.argv) > 2 and sys.argv[1] == "--profile":
        profile(sys.argv[2])
