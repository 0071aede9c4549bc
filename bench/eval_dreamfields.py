"""Evaluate Dream Fields over the toy world's 30 captions: one run of dreamfields.py per caption
(default settings), several at a time in parallel processes, then per caption

- R-precision over the held-out views (metrics.json, ranked by the toy CLIP), the CLIP score and the
  caption margin (similarity to the prompt minus the best other caption);
- the mesh's shape: the analytic toy shape (toyworld.SHAPES, plus a decoy: a torus with its hole
  filled) nearest to the exported mesh's vertices by a two-sided distance (the vertices' mean |sdf| and
  the shape's surface points' mean distance to the vertices), after fitting a centre, a scale and
  (for the cube) a yaw;
- the mesh's colour: the toy albedo (toyworld.COLOURS) nearest to the mean vertex colour in
  chromaticity (rgb / |rgb|), so that painted shading does not count as another colour.

    python bench/eval_dreamfields.py [--jobs 8] [--device cuda] [--out out/eval_dreamfields] [-- FLAGS]
FLAGS after `--` go to every dreamfields.py run (e.g. `-- --iters 600`); --variants FILE runs each line
`name: FLAGS` over every caption. Prints a markdown table per variant and a summary, and writes
eval_<variant>.md/.json and eval_views_<variant>.png (a held-out view per caption: shapes down, colours
across).
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval_captions  # noqa: E402
import toyworld  # noqa: E402

SCALES = torch.logspace(np.log10(0.5), np.log10(2.0), 13)      # candidate object scales (canonical = 1)
YAWS = torch.deg2rad(torch.arange(0.0, 90.0, 10.0))             # the cube's yaw (the others are round about z)


def disc_points(n: int, generator) -> torch.Tensor:
    """n points uniform by area on the surface of toyworld's filled torus (the torus with its hole
    filled, the shape a Dream Field makes when it gets the outline but not the hole): the two flat
    faces and the outer half of the tube."""
    R, r = toyworld.TORUS_R, toyworld.TORUS_r
    faces, rim = 2 * math.pi * R ** 2, 2 * math.pi * r * (math.pi * R + 2 * r)       # areas
    tube, _ = toyworld.surface_points("torus", "red", 4 * n, generator)
    tube = tube[tube[:, :2].norm(dim=-1) >= R]                                        # the outer half
    n_rim = round(n * rim / (faces + rim))
    u = torch.rand(3, n - n_rim, generator=generator)
    rad, theta, z = R * u[0].sqrt(), 2 * math.pi * u[1], torch.where(u[2] < 0.5, -r, r)
    flat = torch.stack([rad * theta.cos(), rad * theta.sin(), z], -1)
    return torch.cat([tube[:n_rim], flat])


# the shapes a mesh is compared with: the toy shapes and a decoy (the torus without its hole)
CANDIDATES = {**{s: (toyworld.SDFS[s], lambda n, g, s=s: toyworld.surface_points(s, "red", n, g)[0])
                 for s in toyworld.SHAPES}, "disc": (toyworld.sdf_filled_torus, disc_points)}


def shape_distances(verts: torch.Tensor, n: int = 2000, seed: int = 0) -> dict:
    """Each candidate shape's distance to the points verts (V, 3): (mean |sdf| of the points + mean
    distance of the shape's surface points to the nearest point) / 2, at the best scale (and, for the
    cube, yaw), centred on the middle of the points' 1-99% box. Returns {shape: distance in world units}."""
    g = torch.Generator().manual_seed(seed)
    pts = verts[torch.randperm(len(verts), generator=g)[:n]]
    lo, hi = torch.quantile(pts, 0.01, dim=0), torch.quantile(pts, 0.99, dim=0)
    pts = pts - (lo + hi) / 2
    out = {}
    for shape, (sdf, surface) in CANDIDATES.items():
        surf = surface(n, g)                                                  # (n, 3) canonical pose
        best = float("inf")
        for yaw in (YAWS if shape == "cube" else YAWS[:1]):
            c, s = torch.cos(yaw), torch.sin(yaw)
            turned = torch.stack([pts[:, 0] * c + pts[:, 1] * s, -pts[:, 0] * s + pts[:, 1] * c, pts[:, 2]], -1)
            for scale in SCALES:
                to_shape = sdf(turned / scale).abs().mean() * scale           # the mesh's points -> the surface
                to_mesh = torch.cdist(surf * scale, turned).amin(1).mean()    # the surface -> the mesh's points
                best = min(best, float(to_shape + to_mesh) / 2)
        out[shape] = best
    return out


def nearest_colour(rgb: torch.Tensor) -> str:
    """The toy colour whose albedo points the same way as rgb (3,) (the largest cosine)."""
    cos = F.normalize(toyworld.ALBEDO, dim=-1) @ F.normalize(rgb, dim=0)
    return list(toyworld.COLOURS)[int(cos.argmax())]


def run_all(jobs, args):
    """Run dreamfields.py for every (name, caption, flags), args.jobs at a time."""
    runs = [(name, cap, ["--device", args.device, "--video-frames", "12"] + flags) for name, cap, flags in jobs]
    eval_captions.run_all("dreamfields", runs, args.out, args.jobs)


def check(caption: str, run_dir: str) -> dict:
    """The row of one caption: metrics.json's scores plus the mesh's nearest shape and colour."""
    _, colour, shape = caption.split()
    if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return {"caption": caption, "r_precision": 0.0, "clip_score": float("nan"), "caption_margin": float("nan"),
                "transmittance": float("nan"), "train_seconds": float("nan"), "mesh_shape": "no run",
                "mesh_colour": "no run", "shape_ok": False, "colour_ok": False}
    m = json.load(open(os.path.join(run_dir, "metrics.json")))
    row = {"caption": caption, "r_precision": m["r_precision"], "clip_score": m["clip_score"],
           "caption_margin": m["caption_margin"], "transmittance": m["mean_transmittance"],
           "train_seconds": m["train_seconds"]}
    ply = os.path.join(run_dir, "mesh.ply")
    if not os.path.isfile(ply):
        return {**row, "mesh_shape": "no mesh", "mesh_colour": "no mesh", "shape_ok": False, "colour_ok": False}
    verts, colours, _ = toyworld.load_ply(ply)
    dist = shape_distances(verts)
    row["mesh_shape"] = min(dist, key=dist.get)
    row["chamfer"] = dist
    row["mesh_colour"] = nearest_colour(colours.mean(0))
    row["mean_colour"] = colours.mean(0).tolist()
    row["shape_ok"], row["colour_ok"] = row["mesh_shape"] == shape, row["mesh_colour"] == colour
    return row


def table(rows) -> str:
    lines = ["| caption | R-precision | CLIP score | margin | transmittance | mesh shape (distance) | mesh colour |"
             " train s |", "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in rows:
        ch = f" ({r['chamfer'][r['mesh_shape']]:.3f})" if "chamfer" in r else ""
        lines.append(f"| {r['caption']} | {r['r_precision']:.2f} | {r['clip_score']:.3f} | {r['caption_margin']:+.3f}"
                     f" | {r['transmittance']:.2f} | {r['mesh_shape']}{ch}{'' if r['shape_ok'] else ' (wrong)'}"
                     f" | {r['mesh_colour']}{'' if r['colour_ok'] else ' (wrong)'} | {r['train_seconds']:.0f} |")
    n = len(rows)
    lines.append(f"| **mean over {n}** | **{sum(r['r_precision'] for r in rows) / n:.3f}** |"
                 f" {sum(r['clip_score'] for r in rows) / n:.3f} | {sum(r['caption_margin'] for r in rows) / n:+.3f}"
                 f" | {sum(r['transmittance'] for r in rows) / n:.2f} | {sum(r['shape_ok'] for r in rows)}/{n} right"
                 f" | {sum(r['colour_ok'] for r in rows)}/{n} right | |")
    return "\n".join(lines)


def montage(rows, runs_dir: str, path: str):
    """The first held-out view of each run in a grid: toyworld's shapes down, colours across."""
    import imageio.v2 as iio
    cells = {}
    for r in rows:
        if r["mesh_shape"] == "no run":
            continue
        img = iio.imread(os.path.join(runs_dir, r["caption"].replace(" ", "_"), "views.png"))
        cells[r["caption"]] = torch.from_numpy(img[:, :img.shape[0], :3]).float() / 255   # (S, S, 3)
    eval_captions.save_caption_grid(cells, path)


def read_variants(path: str, default_flags: list) -> dict:
    """{name: flags} from a file of lines `name: --flag value ...` (# comments), or one variant "default"."""
    if not path:
        return {"default": default_flags}
    out = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if line:
            name, flags = line.split(":", 1)
            out[name.strip()] = default_flags + flags.split()
    return out


def main():
    own, extra = eval_captions.split_flags(sys.argv[1:])
    p = eval_captions.caption_parser(__doc__, "dreamfields", jobs=8)
    p.add_argument("--variants", default="", help="a file of lines `name: FLAGS`: each variant over every caption")
    args = p.parse_args(own)
    os.makedirs(args.out, exist_ok=True)
    variants = read_variants(args.variants, extra)
    t0 = time.time()
    run_all([(f"{v}/{c.replace(' ', '_')}", c, flags) for v, flags in variants.items() for c in args.captions], args)
    summary = ["| variant | flags | R-precision | shape right | colour right |", "| --- | --- | ---: | ---: | ---: |"]
    for v, flags in variants.items():
        runs = os.path.join(args.out, "dreamfields", v)
        rows = [check(c, os.path.join(runs, c.replace(" ", "_"))) for c in args.captions]
        text = table(rows)
        print(f"\n### {v}: {' '.join(flags) or '(default settings)'}\n\n{text}")
        with open(os.path.join(args.out, f"eval_{v}.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, f"eval_{v}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        montage(rows, runs, os.path.join(args.out, f"eval_views_{v}.png"))
        n = len(rows)
        summary.append(f"| {v} | {' '.join(flags)} | {sum(r['r_precision'] for r in rows) / n:.3f} |"
                       f" {sum(r['shape_ok'] for r in rows)}/{n} | {sum(r['colour_ok'] for r in rows)}/{n} |")
    print("\n" + "\n".join(summary))
    print(f"{len(variants) * len(args.captions)} runs, {args.jobs} at a time, {time.time() - t0:.0f} s wall")


if __name__ == "__main__":
    main()
