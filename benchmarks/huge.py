"""A huge tiled TIFF through `convify heatmap --size none`: peak memory against the budget, and speed.

Generates (once) a SIDE x SIDE RGB tiled, deflate-compressed TIFF whose content is a smooth pattern with
shapes on it (written tile by tile: the image is never in memory), then, for each model, runs the command
line's streamed path in a child process (read by region, exact tiles within --max-memory, map streamed to a
zarr store, overlays at 4096 px) and prints its wall time, megapixels per second, crops, and peak RSS next
to the budget. Random weights for torchvision models (speed and memory do not depend on them); the default
model has its real weights.

    python benchmarks/huge.py                          # 20000 x 20000, the default model and vgg16
    python benchmarks/huge.py --side 8000 --models default
    python benchmarks/huge.py --height 4000 --models vgg16   # 20000 wide: the memory of the full size
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
import convify
from convify.large import large_heatmap
from convify.models import build_architecture, default_network

image, model, out, _, budget = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
if model == "default":
    fcn = default_network()
else:
    torch.manual_seed(0)
    net, info = build_architecture(model)
    fcn = convify.convert(net, info.input_size, classes=info.classes, check=False)
    del net
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
result = large_heatmap(image, out, fcn, max_memory=budget, force=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "passes": result.passes, "streamed": result.streamed,
                  "map": list(result.map_size),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before": before,
                  "top": result.top[0]["name"]}))
"""


def make_tiff(path: Path, side: int, height: int, tile: int = 512) -> None:
    """A side (wide) x height RGB tiled TIFF, written tile by tile."""
    import tifffile

    def tiles():
        for y in range(0, height, tile):
            for x in range(0, side, tile):
                yy, xx = np.mgrid[y:y + tile, x:x + tile]
                r = (127 + 120 * np.sin(xx / 97.0)).astype(np.uint8)
                g = (127 + 120 * np.cos(yy / 131.0)).astype(np.uint8)
                b = (((xx // 800 + yy // 800) % 2) * 200).astype(np.uint8)
                yield np.stack([r, g, b], axis=-1)

    tifffile.imwrite(path, tiles(), shape=(height, side, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="zlib", bigtiff=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=20000, help="width (and height) in pixels")
    parser.add_argument("--height", type=int, help="a height other than --side (memory does not depend on it)")
    parser.add_argument("--models", nargs="+", default=["default", "vgg16"])
    parser.add_argument("--budget", type=int, default=2 * 1024 ** 3, help="--max-memory in bytes (default 2 GB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="a folder to keep the TIFF and outputs in")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="convify-huge-"))
    work.mkdir(parents=True, exist_ok=True)
    height = args.height or args.side
    image = work / f"huge{args.side}x{height}.tif"
    if not image.exists():
        start = time.perf_counter()
        make_tiff(image, args.side, height)
        print(f"wrote {image} ({image.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s")
    print(f"{args.side}x{height} px ({args.side * height / 1e6:.0f} MP), budget {args.budget / 2 ** 30:.1f} GB, "
          f"{args.threads} threads")
    print(f"{'model':<10} {'passes':>6} {'map':>11} {'seconds':>8} {'MP/s':>6} {'peak RSS':>9} {'before run':>10} "
          f"{'above budget':>12}")
    for model in args.models:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(image), model, str(work / model),
                               str(args.threads), str(args.budget)], capture_output=True, text=True, cwd=ROOT,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        if done.returncode != 0:
            print(f"{model}: failed\n{done.stderr[-2000:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{model:<10} {r['passes']:>6} {r['map'][0]:>5}x{r['map'][1]:<5} {r['seconds']:>8.0f} "
              f"{args.side * height / 1e6 / r['seconds']:>6.2f} {r['peak_rss'] / 2 ** 30:>7.2f}GB "
              f"{r['rss_before'] / 2 ** 30:>8.2f}GB {(r['peak_rss'] - args.budget) / 2 ** 30:>10.2f}GB")


if __name__ == "__main__":
    main()
