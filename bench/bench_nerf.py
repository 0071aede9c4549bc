"""NeRF benchmark: trains nerf.py presets for a fixed time and prints PSNR against training time.

    python bench/bench_nerf.py --data ../shared/data/nerf_synthetic/lego --fields hashgrid mlp --seconds 300

For each field it runs `nerf.py` with --time-budget and --eval-at 15,30,60,120,300 (evaluation time
is not counted as training time) and reads the run's metrics.json.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKS = [15, 30, 60, 120, 300, 600]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--fields", nargs="+", default=["hashgrid", "mlp"])
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--test-views", type=int, default=0, help="0: all test views")
    p.add_argument("--out", default="out")
    p.add_argument("--extra", default="", help="extra flags passed to nerf.py")
    args = p.parse_args()
    marks = [m for m in MARKS if m <= args.seconds]
    rows = []
    for field in args.fields:
        name = f"bench_{field}"
        cmd = [sys.executable, os.path.join(ROOT, "nerf.py"), "--field", field, "--data", args.data,
               "--name", name, "--out", args.out, "--time-budget", str(args.seconds), "--iters", "10000000",
               "--eval-at", ",".join(map(str, marks)), "--test-views", str(args.test_views),
               "--video-frames", "24"] + args.extra.split()
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        with open(os.path.join(args.out, "nerf", name, "metrics.json")) as f:
            m = json.load(f)
        rows.append((field, m))
    print("\n| field | " + " | ".join(f"PSNR@{s}s" for s in marks) + " | final PSNR | SSIM | iters | it/s | peak GB | device |")
    print("|---" * (len(marks) + 7) + "|")
    for field, m in rows:
        at = []
        for s in marks:   # with --ema-decay: "averaged / trained weights"
            got = [c for c in m["curve"] if c["seconds"] >= s]
            raw = f" / {got[0]['psnr_no_ema']:.2f}" if got and "psnr_no_ema" in got[0] else ""
            at.append(f"{got[0]['psnr']:.2f}{raw}" if got else "-")
        print(f"| {field} | " + " | ".join(at) + f" | {m['test']['psnr']:.2f} | {m['test']['ssim']:.4f} | {m['iterations']} "
              f"| {m['iters_per_second']} | {m.get('peak_memory_gb', '-')} | {m['device']} |")


if __name__ == "__main__":
    main()
