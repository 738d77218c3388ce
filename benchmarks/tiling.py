"""Exact tiling against the whole-image pass: time, peak memory, and that the maps are equal.

Each (model, mode) runs in a fresh child process, so its peak RSS is its own: "whole" runs the network on
the whole image at once (the budget raised out of the way); "crops" cuts it into square crops under the
default 2 GB budget (``convify.limits.DEFAULT_MAX_MEMORY``), each recomputing the context around it;
"streamed" is what convify does by default: strips of rows, every layer's rows computed once (bands of the
width only when whole rows do not fit). Random weights: time and memory do not depend on them.

    python benchmarks/tiling.py                      # vgg16, resnet50, the default model; 3500x3500 px
    python benchmarks/tiling.py --models resnet50 --size 2000 --threads 2

Prints per model and mode: passes (crops or strips), seconds, the time ratio to the whole pass, the input
pixels run over the image's, peak RSS, megapixels per second, and the largest difference from the whole
pass's map.
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
budget = limits.DEFAULT_MAX_MEMORY if mode != "whole" else 1 << 50
stream = mode == "streamed"
plan = plan_tiles(fcn, size, size, max_memory=budget, stream=stream)
assert plan.whole == (mode == "whole") and bool(plan.strip) == stream, plan
start = time.perf_counter()
with torch.inference_mode():
    out = tiled_map(fcn, x, max_memory=budget, stream=stream)
seconds = time.perf_counter() - start
torch.save(out[:20].clone(), sys.argv[5])
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "passes": plan.count, "tile_cells": plan.tile_cells, "input_pixels": plan.input_pixels(),
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
    parser.add_argument("--size", type=int, default=3500, help="side of the square test image in pixels")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    print(f"{args.size}x{args.size} px, {args.threads} threads, crops and streamed under the default 2 GB budget")
    print(f"{'model':<10} {'mode':<9} {'passes':>6} {'seconds':>8} {'/whole':>7} {'pixels run':>10} "
          f"{'peak RSS':>9} {'MP/s':>6} {'max |diff|':>10}")
    for name in args.models:
        results, maps = {}, {}
        for mode in ("whole", "crops", "streamed"):
            path = ROOT / f".bench-{name}-{mode}.pt"
            results[mode] = _run(name, mode, args.size, args.threads, path)
            maps[mode] = torch.load(path)
            path.unlink()
        whole = results["whole"]
        for mode, r in results.items():
            diff = float((maps["whole"] - maps[mode]).abs().max())
            print(f"{name:<10} {mode:<9} {r['passes']:>6} {r['seconds']:>8.2f} "
                  f"{r['seconds'] / whole['seconds']:>6.2f}x {r['input_pixels'] / args.size ** 2:>9.2f}x "
                  f"{r['peak_rss'] / 2 ** 30:>7.2f}GB {args.size ** 2 / 1e6 / r['seconds']:>6.2f} {diff:>10.2g}")


if __name__ == "__main__":
    main()
