"""Images per second of a run over a folder: on this machine (convify.heatmaps with worker processes) and on a
local Ray instance with 1 and 2 actors, side by side in one run, each writing every image's JSON summary.

    python benchmarks/ray_throughput.py --images 64 --workers 1 --workers 2

Ray's times include starting the actors and loading the network in each (a warm-up run on a few images first
starts Ray's worker processes and imports torch in them, so that is not counted). Needs ``convify[ray]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from convify.batch import RunSettings, default_batch_size
from convify.bench import generated_images
from convify.collection import find_images
from convify.models import default_network
from convify.runner import OutputSpec, run_images


def timed_run(images, fcn, out_dir: Path, settings: RunSettings, backend=None, workers=None) -> float:
    start = time.perf_counter()
    outcomes = list(run_images(find_images([str(p) for p in images]), fcn, OutputSpec(out_dir, formats=("json",)),
                               settings, workers=workers, backend=backend))
    seconds = time.perf_counter() - start
    failed = [o for o in outcomes if o.status != "done"]
    if failed:
        raise SystemExit(f"{len(failed)} images did not run: {failed[0].message}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, action="append", help="Ray actors (repeatable; default 1 and 2)")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    import ray

    from convify.ray import jobs_backend

    fcn = default_network()
    settings = RunSettings(batch_size=args.batch_size or default_batch_size(fcn))
    cpus = os.cpu_count() or 1
    print(f"torch {torch.__version__}, ray {ray.__version__}, {cpus} CPUs, {platform.machine()}, "
          f"EfficientNet-Lite0 at auto size, {args.images} generated 640x480 JPEGs, batch {settings.batch_size}")
    with tempfile.TemporaryDirectory(prefix="convify-ray-bench-") as directory:
        root = Path(directory)
        (root / "in").mkdir()
        images = generated_images(root / "in", args.images)
        local = timed_run(images, fcn, root / "local", settings)
        rows = [("local (heatmaps, worker processes)", "-", local)]
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        out = OutputSpec(root / "warm", formats=("json",))
        timed_run(images[:4], fcn, root / "warm", settings, jobs_backend(fcn, out, settings, workers=1))
        for workers in args.workers or [1, 2]:
            out = OutputSpec(root / f"ray{workers}", formats=("json",))
            seconds = timed_run(images, fcn, root / f"ray{workers}", settings,
                                jobs_backend(fcn, out, settings, workers=workers))
            rows.append((f"Ray Data, {workers} actor{'s' if workers > 1 else ''}", str(workers), seconds))
        ray.shutdown()
    print(f"{'run':<36} {'actors':>6} {'seconds':>8} {'img/s':>7} {'vs local':>8}")
    for name, workers, seconds in rows:
        print(f"{name:<36} {workers:>6} {seconds:>8.1f} {args.images / seconds:>7.2f} {local / seconds:>7.2f}x")


if __name__ == "__main__":
    main()
