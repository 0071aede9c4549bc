"""Evaluate Magic3D over the toy world's 30 captions: one run of magic3d.py per caption (default settings,
both stages), several at a time in parallel processes, then toyworld.classify on each final mesh (its
vertices and vertex colours: the nearest toy shape by Chamfer distance, the nearest toy colour to the
median vertex colour) -> the fraction of meshes with the right shape and colour. metrics.json's toy-CLIP
R-precision of both stages is reported beside it.

    python bench/eval_magic3d.py [--jobs 10] [--device cuda] [--out out/eval_magic3d] [-- FLAGS]
FLAGS after `--` go to every magic3d.py run. Prints a markdown table and writes eval.md, eval.json and
eval_views.png (a held-out fine-stage view per caption: shapes down, colours across).
"""
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval_captions  # noqa: E402
import toyworld  # noqa: E402


def run_all(captions, args, extra):
    """Run magic3d.py once per caption, args.jobs at a time. Returns {caption: seconds}."""
    runs = [(c.replace(" ", "_"), c, ["--device", args.device] + extra) for c in captions]
    done = eval_captions.run_all("magic3d", runs, args.out, args.jobs)
    return {c: done[c.replace(" ", "_")][0] for c in captions}


def check(caption: str, run_dir: str, seconds: float) -> dict:
    """The row of one caption: toyworld.classify of the mesh, R-precision of both stages."""
    row = {"caption": caption, "seconds": seconds}
    path = os.path.join(run_dir, "metrics.json")
    m = json.load(open(path)) if os.path.isfile(path) else {}
    for stage in ("coarse", "fine"):
        row[f"{stage}_r_precision"] = m.get(stage, {}).get("r_precision", float("nan"))
    ply = os.path.join(run_dir, "mesh.ply")
    if not os.path.isfile(ply):
        return {**row, "mesh": "no mesh", "shape_ok": False, "colour_ok": False}
    verts, colours, _ = toyworld.load_ply(ply)
    c = toyworld.classify(verts, colours)
    _, colour, shape = caption.split()
    row.update(mesh=c["caption"], chamfer=c["chamfer"], vertices=len(verts),
               shape_ok=c["shape"] == shape, colour_ok=c["colour"] == colour)
    return row


def table(rows) -> str:
    lines = ["| caption | mesh classified as | right | coarse R-prec. | fine R-prec. | vertices | seconds |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ok = "yes" if r["shape_ok"] and r["colour_ok"] else "shape" if r["colour_ok"] else "colour" if r["shape_ok"] else "no"
        ok = {"shape": "wrong shape", "colour": "wrong colour"}.get(ok, ok)
        lines.append(f"| {r['caption']} | {r['mesh']} | {ok} | {r['coarse_r_precision']:.2f} | {r['fine_r_precision']:.2f}"
                     f" | {r.get('vertices', 0)} | {r['seconds']:.0f} |")
    n = len(rows)
    both = sum(r["shape_ok"] and r["colour_ok"] for r in rows)
    lines.append(f"| **{n} captions** | shape {sum(r['shape_ok'] for r in rows)}/{n}, colour "
                 f"{sum(r['colour_ok'] for r in rows)}/{n} | **{both}/{n} = {both / n:.0%}** | "
                 f"{sum(r['coarse_r_precision'] for r in rows) / n:.2f} | {sum(r['fine_r_precision'] for r in rows) / n:.2f} | | |")
    return "\n".join(lines)


def montage(rows, out_dir: str):
    """The first held-out view of each final mesh (preview.png's top-left cell): shapes down, colours across."""
    import imageio.v2 as iio
    cells = {}
    for r in rows:
        path = os.path.join(out_dir, r["caption"].replace(" ", "_"), "preview.png")
        if os.path.isfile(path):
            img = iio.imread(path)
            S = img.shape[0] // 3
            cells[r["caption"]] = torch.from_numpy(img[:S, :S, :3]).float() / 255
    if not cells:
        return
    eval_captions.save_caption_grid(cells, os.path.join(out_dir, "eval_views.png"))


def main():
    own, extra = eval_captions.split_flags(sys.argv[1:])
    p = eval_captions.caption_parser(__doc__, "magic3d", jobs=10)
    p.add_argument("--collect-only", action="store_true", help="table the runs already in --out, run nothing")
    args = p.parse_args(own)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    seconds = {} if args.collect_only else run_all(args.captions, args, extra)
    runs = os.path.join(args.out, "magic3d")
    rows = [check(c, os.path.join(runs, c.replace(" ", "_")), seconds.get(c, float("nan"))) for c in args.captions]
    text = table(rows) + f"\n\n{len(rows)} runs, {args.jobs} at a time, {time.time() - t0:.0f} s wall"
    print(text)
    with open(os.path.join(args.out, "eval.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(rows, f, indent=1)
    montage(rows, runs)


if __name__ == "__main__":
    main()
