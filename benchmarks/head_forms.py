"""The forms of a flattening head (convify.layers.WindowLinear), timed side by side on the zoo's heads.

A flattening head's first Linear applied at every window can be computed as a KxK convolution ("conv"), as
the windows unfolded and run through the Linear ("unfold"), or as a sum over the KxK taps of a shifted view
times that tap's weight ("taps", its weight laid out tap by tap in advance: its best case). This times all
three on AlexNet's (6x6x256 -> 4096) and VGG16's (7x7x512 -> 4096) heads, random weights, on the map each
head sees for a square image of each size at stride 32 and at stride 16 (dilation 2), and prints the form
WindowLinear picks (UNFOLD_POSITIONS) beside the fastest:

    python benchmarks/head_forms.py                    # 224, 384, 512, 1024 px; strides 32 and 16
    python benchmarks/head_forms.py --sizes 512 --threads 2 --repeat 5
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["alexnet", "vgg16"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    import convify
    from convify.finer import finer_stride
    from convify.layers import WindowLinear
    from convify.models import build_architecture

    def best(run) -> float:
        run()
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    def by_taps(head: WindowLinear, per_tap: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (dh, dw) = head.kernel_size, head.dilation
        rows, cols = head.output_size(x.shape[2], x.shape[3])
        view = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        out = head.bias.expand(x.shape[0], rows, cols, head.out_channels).clone()
        for i in range(kh):
            for j in range(kw):
                out += view[:, i * dh:i * dh + rows, j * dw:j * dw + cols] @ per_tap[i, j]
        return out.permute(0, 3, 1, 2)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeat}, milliseconds")
    print(f"{'model':<8} {'px':>5} {'stride':>6} {'head in':>8} {'positions':>9} {'conv':>8} {'unfold':>8} "
          f"{'taps':>8} {'fastest':>8} {'picked':>8} {'max diff':>9}")
    for name in args.models:
        torch.manual_seed(0)
        model, info = build_architecture(name, num_classes=1000)
        coarse = convify.convert(model, info.input_size, check=False)
        for stride in (coarse.geometry.stride, coarse.geometry.stride // 2):
            fcn = finer_stride(coarse, stride)
            [head] = [m for m in fcn.net.modules() if isinstance(m, WindowLinear)]
            per_tap = head.weight.permute(2, 3, 1, 0).contiguous()  # (kh, kw, C, out)
            (kh, _), (dh, _) = head.kernel_size, head.dilation
            for size in args.sizes:
                out = fcn.geometry.output_size(size, size)[0]
                if out < 1:
                    continue
                side = out + dh * (kh - 1)
                x = torch.randn(1, head.in_channels, side, side, generator=torch.Generator().manual_seed(0))
                with torch.inference_mode():
                    reference = F.conv2d(x, head.weight, head.bias, head.stride, head.padding, head.dilation)
                    runs = {"conv": lambda: head.compute(x, "conv"), "unfold": lambda: head.compute(x, "unfold"),
                            "taps": lambda: by_taps(head, per_tap, x)}
                    diff = max(float((run() - reference).abs().max()) for run in runs.values())
                    ms = {form: 1e3 * best(run) for form, run in runs.items()}
                print(f"{name:<8} {size:>5} {stride:>6} {side:>4}x{side:<3} {out * out:>9} {ms['conv']:>8.1f} "
                      f"{ms['unfold']:>8.1f} {ms['taps']:>8.1f} {min(ms, key=ms.get):>8} "
                      f"{head.form_for(1, side, side):>8} {diff:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
