"""Geometry section: rasteriser against a ray-casting reference, gradients against finite differences,
marching tetrahedra against the analytic sphere and scikit-image, tet-grid validity, mesh regularisers."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import (antialias, face_neighbors, interpolate, laplacian_loss, marching_tets,  # noqa: E402
                       normal_consistency_loss, project_to_clip, rasterize, tet_grid, vertex_normals,
                       _visible_triangles)

NEAR, FAR = 0.1, 100.0


def icosahedron(dtype=torch.float64):
    """The 12 vertices (unit sphere) and 20 outward-wound faces of a regular icosahedron."""
    t = (1 + 5 ** 0.5) / 2
    v = torch.tensor([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                      [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], dtype=dtype)
    f = torch.tensor([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                      [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                      [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    return v / v.norm(dim=-1, keepdim=True), f


def random_scene(seed=0, n_tris=10):
    """Random overlapping (and interpenetrating) triangles plus an icosahedron: (V, 3) float64, (F, 3)."""
    g = torch.Generator().manual_seed(seed)
    tv = torch.rand(n_tris * 3, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2
    iv, ifc = icosahedron()
    v = torch.cat([tv, 0.5 * iv + 0.2])
    f = torch.cat([torch.arange(n_tris * 3).view(-1, 3), ifc + n_tris * 3])
    return v, f


def cameras(dtype=torch.float64):
    c2w = common.pose_spherical(torch.tensor([3.0, 2.6]), torch.tensor([20.0, -35.0]),
                                torch.tensor([30.0, 200.0])).to(dtype)
    return c2w


def reference_raster(verts, faces, c2w, focal, H, W):
    """Slow independent reference: cast common.get_rays' ray of every pixel at every triangle
    (Moller-Trumbore), keep the nearest hit between the near and far planes.
    Returns tri (H, W) (-1 background), u, v (barycentrics of vertices 0, 1), z/w, and a mask of pixels
    where the answer is ambiguous (a ray within 1e-6 of an edge, or two hits at nearly the same depth)."""
    ro, rd = (x.numpy().reshape(-1, 3) for x in common.get_rays(H, W, focal, c2w.float()))
    ro, rd = ro.astype(np.float64), rd.astype(np.float64)
    w2c = np.linalg.inv(c2w.numpy())
    tri = verts.numpy()[faces.numpy()]                                             # (F, 3, 3)
    out_t, out_u, out_v, out_z = (np.full(H * W, -1.0) for _ in range(4))
    ambiguous = np.zeros(H * W, dtype=bool)
    for n in range(H * W):
        e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
        pv = np.cross(rd[n], e2)
        det = (e1 * pv).sum(-1)
        s = ro[n] - tri[:, 0]
        b1 = (s * pv).sum(-1) / det
        qv = np.cross(s, e1)
        b2 = (rd[n] * qv).sum(-1) / det
        t = (e2 * qv).sum(-1) / det
        b0 = 1 - b1 - b2
        hit_pt = ro[n] + t[:, None] * rd[n]
        zc = (np.c_[hit_pt, np.ones(len(t))] @ w2c.T)[:, 2]
        zndc = (-(FAR + NEAR) / (FAR - NEAR) * zc - 2 * FAR * NEAR / (FAR - NEAR)) / -zc
        bmin = np.minimum(np.minimum(b0, b1), b2)
        valid = (bmin >= 0) & (t > 0) & (np.abs(zndc) <= 1)
        ambiguous[n] = (np.abs(bmin) < 1e-6).any()
        if valid.any():
            idx = np.where(valid)[0]
            order = idx[np.argsort(zndc[idx])]
            k = order[0]
            if len(order) > 1 and zndc[order[1]] - zndc[k] < 1e-7:
                ambiguous[n] = True
            out_t[n], out_u[n], out_v[n], out_z[n] = k, b0[k], b1[k], zndc[k]
    sh = (H, W)
    return (torch.from_numpy(out_t).long().view(sh), torch.from_numpy(out_u).view(sh),
            torch.from_numpy(out_v).view(sh), torch.from_numpy(out_z).view(sh),
            torch.from_numpy(ambiguous).view(sh))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rasterize_matches_ray_casting(dtype):
    verts, faces = random_scene()
    H, W = 28, 36
    focal = common.focal_from_fov(50.0, W)
    c2w = cameras(torch.float64)
    clip = project_to_clip(verts.to(dtype), c2w.to(dtype), focal, H, W, NEAR, FAR)
    rast = rasterize(clip, faces, H, W)
    tol = 1e-4 if dtype == torch.float32 else 2e-6                             # get_rays is float32
    for b in range(c2w.shape[0]):
        tri, u, v, z, amb = reference_raster(verts, faces, c2w[b], focal, H, W)
        assert amb.float().mean() < 0.02 and (tri >= 0).float().mean() > 0.3
        ok = ~amb
        assert torch.equal(rast[b, ..., 3].long()[ok] - 1, tri[ok])
        hit = ok & (tri >= 0)
        assert torch.allclose(rast[b, ..., 0][hit].double(), u[hit], atol=tol)
        assert torch.allclose(rast[b, ..., 1][hit].double(), v[hit], atol=tol)
        assert torch.allclose(rast[b, ..., 2][hit].double(), z[hit], atol=tol)
        assert (rast[b][tri < 0] == 0).all()


def test_chunked_visibility_equals_one_pass():
    verts, faces = random_scene(seed=1)
    H, W = 20, 20
    clip = project_to_clip(verts, cameras(), common.focal_from_fov(50.0, W), H, W, NEAR, FAR)
    assert torch.equal(_visible_triangles(clip, faces, H, W, chunk=7), _visible_triangles(clip, faces, H, W))


def test_interpolated_positions_lie_on_the_pixel_rays():
    verts, faces = random_scene(seed=2)
    H, W = 16, 16
    focal = common.focal_from_fov(45.0, W)
    c2w = cameras()
    rast = rasterize(project_to_clip(verts, c2w, focal, H, W, NEAR, FAR), faces, H, W)
    pts = interpolate(verts, rast, faces)                                          # (B, H, W, 3)
    ro, rd = (x.double() for x in common.get_rays(H, W, focal, c2w.float()))     # get_rays is float32
    hit = rast[..., 3] > 0
    off = torch.cross(pts - ro, torch.nn.functional.normalize(rd, dim=-1), dim=-1).norm(dim=-1)
    assert hit.any() and off[hit].max() < 1e-5


def _render_loss(verts, attr, faces, c2w, focal, H, W, weights, aa):
    clip = project_to_clip(verts, c2w, focal, H, W, NEAR, FAR)
    rast = rasterize(clip, faces, H, W)
    img = interpolate(attr, rast, faces)
    if aa:
        img = antialias(img, rast, clip, faces)
    return (img * weights).sum()


@pytest.mark.parametrize("aa,constant", [(False, False), (True, False), (True, True)])
def test_gradients_match_finite_differences(aa, constant):
    """d loss / d (vertex positions, attributes) of interpolate (+ antialias) against central differences.
    With a constant colour only antialias (the silhouette) can move the loss."""
    g = torch.Generator().manual_seed(3)
    iv, faces = icosahedron()
    verts = (0.8 * iv + 0.05 * torch.randn(iv.shape, generator=g, dtype=torch.float64)).requires_grad_()
    attr = torch.ones(12, 3, dtype=torch.float64) if constant else \
        torch.rand(12, 3, generator=g, dtype=torch.float64)
    attr.requires_grad_()
    H, W = 16, 16
    focal = common.focal_from_fov(40.0, W)
    c2w = cameras()
    weights = torch.rand(2, H, W, 3, generator=g, dtype=torch.float64)
    args = (faces, c2w, focal, H, W, weights, aa)
    gv, ga = torch.autograd.grad(_render_loss(verts, attr, *args), [verts, attr])
    eps = 1e-6
    # every position coordinate; 9 random attribute entries (the loss is linear in them)
    attr_entries = torch.randperm(attr.numel(), generator=g)[:9].tolist()
    for x, gx, entries in ((verts, gv, range(verts.numel())), (attr, ga, attr_entries)):
        fd = torch.zeros_like(x)
        for i in entries:
            d = torch.zeros(x.numel(), dtype=x.dtype)
            d[i] = eps
            d = d.view_as(x)
            with torch.no_grad():
                xp, xm = x + d, x - d
                lp = _render_loss(xp if x is verts else verts, xp if x is attr else attr, *args)
                lm = _render_loss(xm if x is verts else verts, xm if x is attr else attr, *args)
            fd.view(-1)[i] = (lp - lm) / (2 * eps)
        idx = list(entries)
        assert torch.allclose(gx.reshape(-1)[idx], fd.reshape(-1)[idx], atol=1e-6, rtol=1e-5)
    if constant:
        assert gv.abs().max() > 1e-3                                              # the silhouette moves
    if not aa:
        # interpolate alone passes gradient to positions through the barycentrics
        assert gv.abs().max() > 1e-3


def test_antialias_blends_only_silhouettes():
    """A flat-coloured closed mesh on a background: pixels away from the outline are untouched,
    outline pixels move towards the background, never past it."""
    iv, faces = icosahedron(torch.float32)
    H, W = 32, 32
    c2w = cameras(torch.float32)
    clip = project_to_clip(iv, c2w, common.focal_from_fov(40.0, W), H, W, NEAR, FAR)
    rast = rasterize(clip, faces, H, W)
    img = interpolate(torch.ones(12, 1), rast, faces)
    out = antialias(img, rast, clip, faces)
    fg = rast[..., 3:] > 0
    inner = fg.clone()
    for dim, shift in ((1, 1), (1, -1), (2, 1), (2, -1)):
        inner &= fg.roll(shift, dims=dim)
    assert torch.equal(out[inner], img[inner])
    assert (out >= -1e-6).all() and (out <= 1 + 1e-6).all()
    assert (out[fg] < 1 - 1e-3).any() and (out[~fg] > 1e-3).any()


def test_antialias_approaches_supersampled_coverage():
    """Antialiased silhouette of a white mesh on black against its coverage from an 8x8-supersampled
    render: it should halve the per-pixel error of the aliased (one sample per pixel) image."""
    iv, faces = icosahedron()
    c2w = cameras()

    def raster(h):
        clip = project_to_clip(iv, c2w, common.focal_from_fov(40.0, h), h, h, NEAR, FAR)
        return rasterize(clip, faces, h, h), clip

    H = 32
    rast, clip = raster(H)
    img = (rast[..., 3:] > 0).double()
    aa = antialias(img, rast, clip, faces)[..., 0]
    fine, _ = raster(8 * H)
    coverage = torch.nn.functional.avg_pool2d((fine[:, None, ..., 3] > 0).double(), 8)[:, 0]
    err_aliased, err_aa = (img[..., 0] - coverage).abs().mean(), (aa - coverage).abs().mean()
    assert err_aa < 0.6 * err_aliased


def sphere_sdf(points, r):
    return points.norm(dim=-1) - r


def mesh_area_volume(v, f):
    v0, v1, v2 = v[f].unbind(1)
    area = 0.5 * torch.cross(v1 - v0, v2 - v0, dim=-1).norm(dim=-1).sum()
    vol = (v0 * torch.cross(v1, v2, dim=-1)).sum() / 6.0                          # divergence theorem
    return area, vol


def test_marching_tets_sphere_against_analytic_and_skimage():
    from skimage import measure
    res, r = 24, 0.7
    grid_v, tets = tet_grid(res)
    sdf = sphere_sdf(grid_v, r)
    v, f = marching_tets(grid_v, sdf, tets)
    area, vol = mesh_area_volume(v, f)
    assert abs(area / (4 * math.pi * r * r) - 1) < 0.03
    assert abs(vol / (4 / 3 * math.pi * r ** 3) - 1) < 0.03                      # > 0: outward winding
    # watertight, deduplicated, a sphere: every edge has a neighbour face, V - E + F = 2
    assert (face_neighbors(f) >= 0).all()
    assert v.shape[0] - 3 * f.shape[0] // 2 + f.shape[0] == 2
    # every vertex on its grid edge, at the zero of the linear interpolant
    assert (sphere_sdf(v, r).abs() < 0.02).all()
    # scikit-image marching cubes on the same samples (tet_grid's vertices are the cube grid, x-major)
    vol_np = sdf.view(res + 1, res + 1, res + 1).numpy()
    mv, mf, _, _ = measure.marching_cubes(vol_np, 0.0, spacing=(2.0 / res,) * 3)
    area_mc = measure.mesh_surface_area(mv, mf)
    assert abs(float(area) / area_mc - 1) < 0.02


def test_marching_tets_gradients_match_finite_differences():
    grid_v, tets = tet_grid(6)
    grid_v = grid_v.double()
    g = torch.Generator().manual_seed(4)
    sdf = (sphere_sdf(grid_v, 0.55) + 0.05 * torch.randn(grid_v.shape[0], generator=g, dtype=torch.float64))
    sdf.requires_grad_()
    gv = grid_v.clone().requires_grad_()

    def loss(vv, s):
        v, f = marching_tets(vv, s, tets)
        area, vol = mesh_area_volume(v, f)
        return area + 3 * vol + (v[:, 0] ** 2).sum()

    g_v, g_s = torch.autograd.grad(loss(gv, sdf), [gv, sdf])
    eps = 1e-6
    idx = torch.nonzero(g_s.abs() > 0)[:20, 0]
    assert idx.numel() >= 10
    for i in idx:
        d = torch.zeros_like(sdf)
        d[i] = eps
        with torch.no_grad():
            fd = (loss(gv, sdf + d) - loss(gv, sdf - d)) / (2 * eps)
        assert torch.allclose(g_s[i], fd, atol=1e-6, rtol=1e-5)
        for c in range(3):
            d = torch.zeros_like(gv)
            d[i, c] = eps
            with torch.no_grad():
                fd = (loss(gv + d, sdf) - loss(gv - d, sdf)) / (2 * eps)
            assert torch.allclose(g_v[i, c], fd, atol=1e-6, rtol=1e-5)


def test_tet_grid_is_a_valid_tetrahedralisation():
    res = 3
    lo, hi = (-1.0, -2.0, 0.0), (1.0, 0.5, 3.0)
    v, t = tet_grid(res, bbox=(lo, hi))
    assert t.shape == (6 * res ** 3, 4) and v.shape == ((res + 1) ** 3, 3)
    p = v[t].double()
    vol = torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], 1)) / 6
    assert (vol > 0).all()
    assert torch.isclose(vol.sum(), torch.tensor(2.0 * 2.5 * 3.0, dtype=torch.float64))
    tri = torch.cat([t[:, [1, 2, 3]], t[:, [0, 2, 3]], t[:, [0, 1, 3]], t[:, [0, 1, 2]]]).sort(1).values
    uniq, counts = torch.unique(tri, dim=0, return_counts=True)
    assert counts.max() == 2
    # faces used once are exactly the boundary: on the box, 2 triangles per boundary square
    boundary = uniq[counts == 1]
    pts = v[boundary]                                                              # (Fb, 3, 3)
    on_box = ((pts - torch.tensor(lo)).abs() < 1e-6) | ((pts - torch.tensor(hi)).abs() < 1e-6)
    assert on_box.all(1).any(-1).all()                                             # all 3 on one box side
    assert boundary.shape[0] == 6 * res * res * 2


def test_mesh_regularisers():
    iv, faces = icosahedron()
    n = vertex_normals(iv, faces)
    assert torch.allclose(n, iv, atol=1e-12)                                       # radial on a sphere
    # normal consistency: 1 - cos of the icosahedron's dihedral angle (normals 41.81 deg apart)
    expected = 1 - math.sqrt(5) / 3
    assert torch.isclose(normal_consistency_loss(iv, faces), torch.tensor(expected, dtype=torch.float64))
    # a flat grid: normal consistency 0; Laplacian 0 inside, against a dense-matrix reference
    k = 5
    x, y = torch.meshgrid(torch.arange(k, dtype=torch.float64), torch.arange(k, dtype=torch.float64),
                          indexing="ij")
    g = torch.Generator().manual_seed(5)
    verts = torch.stack([x, y, 0.3 * torch.rand(k, k, generator=g, dtype=torch.float64)], -1).view(-1, 3)
    q = torch.arange(k * k).view(k, k)
    a, b, c, d = q[:-1, :-1].flatten(), q[1:, :-1].flatten(), q[1:, 1:].flatten(), q[:-1, 1:].flatten()
    faces = torch.cat([torch.stack([a, b, c], 1), torch.stack([a, c, d], 1)])
    flat = verts.clone()
    flat[:, 2] = 0
    assert normal_consistency_loss(flat, faces).abs() < 1e-12
    A = torch.zeros(k * k, k * k, dtype=torch.float64)
    for f in faces.tolist():
        for i in range(3):
            A[f[i], f[(i + 1) % 3]] = A[f[(i + 1) % 3], f[i]] = 1
    L = A / A.sum(1, keepdim=True) - torch.eye(k * k, dtype=torch.float64)
    assert torch.isclose(laplacian_loss(verts, faces), ((L @ verts) ** 2).sum(-1).mean())


def test_largest_component_drops_a_floater():
    octa = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    of = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    tet = torch.tensor([[3.0, 0, 0], [3.1, 0, 0], [3, 0.1, 0], [3, 0, 0.1]])
    tf = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    # the floater's vertices first, so the kept piece has to be re-indexed
    verts, faces = torch.cat([tet, octa]), torch.cat([tf, of + 4])
    colours = torch.rand(len(verts), 3)
    v, f, c = common.largest_component(verts, faces, colours)
    assert torch.equal(v, octa) and torch.equal(f, of) and torch.equal(c, colours[4:])
