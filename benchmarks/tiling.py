"""Exact tiling against the whole-image pass: time, peak memory, and that the maps are equal.

Each (model, mode) runs in a fresh child process, so its peak RSS is its own: "whole" runs the network on
the whole image at once (the budget raised out of the way), "tiled" under the default 2 GB budget
(``convify.limits.DEFAULT_MAX_MEMORY``). Random weights: time and memory do not depend on them.

    python benchmarks/tiling.py                      # vgg16, resnet50, the default model; 3000x3000 px
    python benchmarks/tiling.py --models resnet50 --size 2000 --threads 2

Prints per model: the crop plan, seconds and peak RSS for each mode, the time ratio tiled/whole, the
pixels the crops recompute, megapixels per second, and the largest difference between the two maps.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
import convify
from convify import limits
from convify.models import build_architecture, load_default_model
from convify.tiling import plan_tiles, tiled_map

name, mode, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model, info = load_default_model() if name == "default" else build_architecture(name, num_classes=1000)
fcn = convify.convert(model, info.input_size, check=False)
del model
x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
budget = limits.DEFAULT_MAX_MEMORY if mode == "tiled" else 1 << 50
plan = plan_tiles(fcn, size, size, max_memory=budget)
start = time.perf_counter()
with torch.inference_mode():
    out = tiled_map(fcn, x, max_memory=budget)
seconds = time.perf_counter() - start
torch.save(out[:20].clone(), sys.argv[5])
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "crops": plan.count, "tile_cells": plan.tile_cells, "input_pixels": plan.input_pixels(),
                  "map": list(out.shape[1:])}))
"""


def _run(name: str, mode: str, size: int, threads: int, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, name, mode, str(size), str(threads), str(out)],
                          capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise SystemExit(f"{name} {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50", "default"])
    parser.add_argument("--size", type=int, default=3000, help="side of the square test image in pixels")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    print(f"{args.size}x{args.size} px, {args.threads} threads, tiled under the default 2 GB budget")
    print(f"{'model':<10} {'crops':>5} {'whole s':>8} {'tiled s':>8} {'ratio':>6} {'recomputed':>10} "
          f"{'whole RSS':>10} {'tiled RSS':>10} {'MP/s tiled':>10} {'max |diff|':>10}")
    for name in args.models:
        results, maps = {}, {}
        for mode in ("whole", "tiled"):
            path = ROOT / f".bench-{name}-{mode}.pt"
            results[mode] = _run(name, mode, args.size, args.threads, path)
            maps[mode] = torch.load(path)
            path.unlink()
        whole, tiled = results["whole"], results["tiled"]
        diff = float((maps["whole"] - maps["tiled"]).abs().max())
        print(f"{name:<10} {tiled['crops']:>5} {whole['seconds']:>8.2f} {tiled['seconds']:>8.2f} "
              f"{tiled['seconds'] / whole['seconds']:>5.2f}x {tiled['input_pixels'] / args.size ** 2:>9.2f}x "
              f"{whole['peak_rss'] / 2 ** 30:>8.2f}GB {tiled['peak_rss'] / 2 ** 30:>8.2f}GB "
              f"{args.size ** 2 / 1e6 / tiled['seconds']:>10.2f} {diff:>10.2g}")


if __name__ == "__main__":
    main()
