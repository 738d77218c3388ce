"""Finer output strides: the time of a stride-16 (and stride-8) map against the network's own stride-32 map.

One process, side by side, best of --repeat runs each, random weights (time does not depend on them):

    python benchmarks/finer.py                          # vgg16 and resnet50 at 512 px, strides 16 and 8
    python benchmarks/finer.py --models vgg16 --size 384 --threads 2

Prints per model and stride: the map size, seconds, the ratio to the network's own stride, what the layers
after the removed subsampling were promised to cost (``finer_cost``), and that the coarse cells are equal.
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--strides", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import convify
    from convify.finer import finer_cost, finer_stride
    from convify.models import build_architecture

    def best(fcn: convify.FullyConvNet, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        times = []
        with torch.inference_mode():
            fcn(x)  # warm up
            for _ in range(args.repeat):
                start = time.perf_counter()
                out = fcn(x)
                times.append(time.perf_counter() - start)
        return min(times), out

    print(f"{args.size}x{args.size} px, {args.threads} threads, best of {args.repeat}")
    print(f"{'model':<10} {'stride':>6} {'map':>7} {'seconds':>8} {'ratio':>6} {'cost after cut':>14} "
          f"{'coarse cells':>12}")
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    for name in args.models:
        torch.manual_seed(0)
        model, info = build_architecture(name, num_classes=1000)
        coarse = convify.convert(model, info.input_size, check=False)
        base, ref = best(coarse, x)
        g = coarse.geometry
        print(f"{name:<10} {g.stride:>6} {ref.shape[2]:>3}x{ref.shape[3]:<3} {base:>8.3f} {1:>5.2f}x {'':>14} {'':>12}")
        for stride in args.strides:
            fine = finer_stride(coarse, stride)
            seconds, out = best(fine, x)
            r = g.stride // stride
            same = torch.allclose(out[:, :, ::r, ::r], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
            print(f"{name:<10} {stride:>6} {out.shape[2]:>3}x{out.shape[3]:<3} {seconds:>8.3f} "
                  f"{seconds / base:>5.2f}x {finer_cost(coarse, stride):>13}x {'equal' if same else 'DIFFER':>12}")


if __name__ == "__main__":
    main()
