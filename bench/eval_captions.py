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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import toyworld  # noqa: E402


def run_one(script, caption, out, extra, threads):
    name = caption.replace(" ", "_")
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--prompt", caption, "--name", name,
           "--out", out, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    row = {"caption": caption, "seconds": round(time.time() - t0, 1), "rc": r.returncode}
    folder = os.path.join(out, script, name)
    if r.returncode != 0:
        row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1]
        return row
    with open(os.path.join(folder, "metrics.json")) as f:
        m = json.load(f)
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
    p.add_argument("--captions", type=int, default=30, help="the first this many toy captions")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    extra = argv[cut + 1:]                                   # after "--": flags for the script
    caps = toyworld.CAPTIONS[:a.captions]
    t0 = time.time()
    with ThreadPoolExecutor(a.jobs) as ex:
        rows = list(ex.map(lambda c: run_one(a.script, c, a.out, extra, a.threads), caps))
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
