"""Run a text-to-3D script on all 30 toy captions and score what comes out.

    python bench/eval_captions.py dreamfusion --jobs 8 --out out/eval [-- extra flags for the script]

Each caption is one run of `python <script>.py --prompt <caption> --name <caption>` (in parallel
processes, --jobs at a time). Scores per run:
  - the script's own metrics.json: toy-CLIP score and R-precision of held-out views;
  - the exported mesh (mesh.ply): toyworld.classify names its shape (Chamfer distance to each
    canonical shape) and colour (nearest albedo to the median vertex colour).
Prints a markdown table (one row per caption, then the totals) and writes it to <out>/eval.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import toyworld  # noqa: E402


def split_flags(argv: list):
    """argv -> (the evaluation's own arguments, the flags after `--` for every run of the script)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut], argv[cut + 1:]


def caption_parser(doc: str, script: str, jobs: int) -> argparse.ArgumentParser:
    """The flags every per-caption evaluation of `script` takes: --jobs, --device, --out, --captions."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=jobs, help=f"{script}.py processes at a time")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.path.join(ROOT, "out", f"eval_{script}"))
    p.add_argument("--captions", nargs="*", default=toyworld.CAPTIONS, help="a subset of the toy captions")
    return p


def save_caption_grid(cells: dict, path: str):
    """One (S, S, 3) picture per caption in `cells` (a non-empty dict) in a grid: toyworld's shapes
    down, its colours across; captions without a picture stay white."""
    S = next(iter(cells.values())).shape[0]
    grid = torch.ones(len(toyworld.SHAPES) * S, len(toyworld.COLOURS) * S, 3)
    for i, shape in enumerate(toyworld.SHAPES):
        for j, colour in enumerate(toyworld.COLOURS):
            cap = f"a {colour} {shape}"
            if cap in cells:
                grid[i * S:(i + 1) * S, j * S:(j + 1) * S] = cells[cap]
    common.save_image(path, grid)


def run_all(script: str, runs: list, out: str, jobs: int, threads: int = 0) -> dict:
    """Run `<script>.py --prompt PROMPT --name NAME --out OUT FLAGS...` for every (name, prompt,
    flags) in `runs`, `jobs` processes at a time (threads > 0: OMP_NUM_THREADS for each); each
    run's output goes to <out>/<name, "/" as "__">.log. Returns {name: (seconds, returncode, log)}."""
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}

    def one(run):
        name, prompt, flags = run
        log = os.path.join(out, name.replace("/", "__") + ".log")
        cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--prompt", prompt, "--name", name,
               "--out", out, *flags]
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
        if rc:
            print(f"{name}: {script}.py exited {rc} (see {log})", flush=True)
        return name, (time.time() - t0, rc, log)
    with ThreadPoolExecutor(jobs) as ex:
        return dict(ex.map(one, runs))


def score(script: str, caption: str, out: str, seconds: float, rc: int, log: str) -> dict:
    """One caption's row: the run's metrics.json (the last stage's, for staged scripts) and
    toyworld.classify of its mesh."""
    row = {"caption": caption, "seconds": round(seconds, 1), "rc": rc}
    folder = os.path.join(out, script, caption.replace(" ", "_"))
    if rc != 0:
        with open(log) as f:
            row["error"] = ([line for line in f.read().splitlines() if line.strip()] or ["?"])[-1]
        return row
    with open(os.path.join(folder, "metrics.json")) as f:
        m = json.load(f)
    m = m.get("fine", m)                                   # magic3d: metrics per stage
    row.update(clip_score=m.get("clip_score"), r_precision=m.get("r_precision"))
    mesh = os.path.join(folder, "mesh.ply")
    if os.path.isfile(mesh):
        pts, cols, _ = toyworld.load_ply(mesh)
        c = toyworld.classify(pts, cols)
        row.update(mesh_caption=c["caption"], chamfer=c["chamfer"][caption.split()[-1]])
    else:
        row["mesh_caption"] = "no mesh"
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", choices=["dreamfields", "dreamfusion", "magic3d"])
    p.add_argument("--jobs", type=int, default=4, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--out", default="out/eval")
    p.add_argument("--captions", nargs="*", default=toyworld.CAPTIONS, help="a subset of the toy captions (default: all)")
    own, extra = split_flags(sys.argv[1:])
    a = p.parse_args(own)
    caps = a.captions
    t0 = time.time()
    done = run_all(a.script, [(c.replace(" ", "_"), c, extra) for c in caps], a.out, a.jobs, a.threads)
    rows = [score(a.script, c, a.out, *done[c.replace(" ", "_")]) for c in caps]
    ok = [r for r in rows if r["rc"] == 0]
    lines = [f"`{a.script}.py {' '.join(extra)}` on {len(caps)} toy captions, {a.jobs} at a time, "
             f"{time.time() - t0:.0f} s in all", "",
             "| caption | R-precision | toy-CLIP score | mesh classified as | Chamfer to the caption's shape | s |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        if r["rc"]:
            lines.append(f"| {r['caption']} | failed: {r['error']} | | | | {r['seconds']} |")
            continue
        ch = f"{r['chamfer']:.3f}" if "chamfer" in r else "-"
        lines.append(f"| {r['caption']} | {r['r_precision']:.2f} | {r['clip_score']:.3f} | {r['mesh_caption']} "
                     f"| {ch} | {r['seconds']} |")
    n = len(caps)
    rp = sum(r["r_precision"] for r in ok) / n
    top1 = sum(r["r_precision"] >= 0.5 for r in ok) / n
    right = sum(r.get("mesh_caption") == r["caption"] for r in ok) / n
    shape = sum(r.get("mesh_caption", "").split()[-1:] == r["caption"].split()[-1:] for r in ok) / n
    colour = sum(r.get("mesh_caption", "").split()[1:2] == r["caption"].split()[1:2] for r in ok) / n
    lines += ["", f"- mean R-precision over held-out views: {rp:.3f}; runs whose views are mostly ranked right "
              f"(R-precision >= 0.5): {top1:.0%}",
              f"- meshes with the right shape and colour: {right:.0%} (shape {shape:.0%}, colour {colour:.0%})",
              f"- failed runs: {n - len(ok)}"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "eval.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
