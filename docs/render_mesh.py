"""Render a coloured mesh (.ply from any script) to a PNG with common.py's rasteriser: a quick
look without a mesh viewer, and how the README's mesh pictures were made.

    python docs/render_mesh.py out/pointe/sample/mesh.ply mesh.png [--size 256] [--azimuth 30]
Lambertian shading with a light above the camera, vertex colours (grey if none), white background.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import toyworld  # noqa: E402


def render(verts, colours, faces, size=256, azimuth=30.0, elevation=25.0):
    """(size, size, 3) image of the mesh seen from a camera framing its bounding sphere."""
    centre = (verts.amax(0) + verts.amin(0)) / 2
    radius = (verts - centre).norm(dim=-1).max().item()
    c2w = common.pose_spherical(radius * 3.2, elevation, azimuth, target=centre.tolist())
    focal = common.focal_from_fov(40.0, size)
    rast = common.rasterize(common.project_to_clip(verts, c2w[None], focal, size, size), faces, size, size)
    normals = common.vertex_normals(verts, faces)
    light = F.normalize(c2w[:3, 3] - centre + torch.tensor([0.0, 0.0, radius * 2]), dim=0)
    n = F.normalize(common.interpolate(normals, rast, faces)[0], dim=-1)
    c = common.interpolate(colours, rast, faces)[0]
    shaded = c * (0.35 + 0.65 * (n @ light).abs()[..., None])       # abs: either winding shows lit
    hit = (rast[0, ..., 3] > 0)[..., None]
    return torch.where(hit, shaded, torch.ones_like(shaded)).clamp(0, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mesh")
    p.add_argument("png")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--azimuth", type=float, default=30.0)
    a = p.parse_args()
    with common.cli_errors():
        if not os.path.isfile(a.mesh):
            raise common.UserError(f"no such mesh: {a.mesh}")
        verts, colours, faces = toyworld.load_ply(a.mesh)
        if not len(faces):
            raise common.UserError(f"{a.mesh} has no triangles")
        with torch.no_grad():
            common.save_image(a.png, render(verts, colours, faces, a.size, a.azimuth))


if __name__ == "__main__":
    main()
