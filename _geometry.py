"""Section for common.py: Geometry -- a differentiable triangle rasteriser, tetrahedral grids,
differentiable marching tetrahedra and mesh regularisers (Magic3D's fine stage, DMTet).

Everything is plain PyTorch (no custom CUDA), so it runs on CPU, CUDA and MPS alike.

Rasteriser in three steps, after nvdiffrast (Laine et al., 2020):
  rasterize    which triangle each pixel sees (no gradient: bounding-box candidates, edge functions,
               a depth test by scatter-min), then differentiable barycentrics of that triangle
  interpolate  vertex attributes at each pixel from those barycentrics (gradient to attributes and,
               through the barycentrics, to vertex positions)
  antialias    blends colours across silhouette edges by how far the edge is between two pixel centres,
               the only place where the *outline* of the mesh passes gradient to the geometry
Cameras follow common.py: OpenGL convention, the camera looks down -z, +y up; pixel (row j, column i)
is seen along the ray common.get_rays gives for it, and row 0 is the top of the image.
"""
import itertools

import torch
import torch.nn.functional as F

# ================================================================================================
# 6. Geometry: rasteriser, tetrahedral grid, marching tetrahedra, mesh regularisers
# ================================================================================================


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
