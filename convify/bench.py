"""``convify bench``: the dense pass against the crop loop a user would write, measured side by side in one run.

For a model and an image size it times (best of ``repeat``):

- **dense**: the converted network's one forward pass over the image;
- **crops**: the original classifier run on every window the map's cells stand for (``geometry.cell_box``),
  batched ``batch`` at a time: what sliding the classifier over the image costs without the shared work;
- **heatmap**: ``convify.heatmap`` end to end on a photo of that size (decode excluded, ``pad="none"`` so the
  network sees the same pixels) beside the bare pass on the very tensor ``heatmap()`` feeds the network
  (its values and channels-last layout both change the speed of a pass): that row's ``speed-up`` column is
  the overhead, heatmap time over the bare pass's (target: at most 1.1);

and reports their ratio (the speed-up), the ratio of the floating-point operations the two do
(``torch.utils.flop_counter``; the limit the speed-up would reach if both ran at the same FLOP rate), the
efficiency (speed-up / FLOP ratio), and the dense pass's peak memory (:func:`convify.tiling.activation_bytes`).
For each finer stride asked (:mod:`convify.finer`) it times the finer network against stitching the same
map from the coarse network run on the image shifted by each phase (shift-and-stitch). For each reduced
precision asked (:mod:`convify.devices`: ``bfloat16``, ``float16`` on a GPU) it times the dense pass under
autocast against float32 and reports their agreement: the share of cells whose best class is float32's, and
the largest logit difference. With ``compiled`` it times ``torch.compile`` (inductor, weights frozen) against
the eager pass, with the compile time and the same agreement: convify runs eager unless this shows a gain.

Random weights unless the model is a converted file: speed does not depend on them. Speed targets live
here, not in unit tests.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .devices import DeviceLike, autocast, check_finite, check_precision, on_device, resolve_device
from .fcn import FullyConvNet, main_map

__all__ = ["BenchRow", "bench", "format_rows", "ThroughputRow", "throughput", "format_throughput", "generated_images"]


@dataclass
class BenchRow:
    """One measurement. ``what``: ``"dense"`` (with the crop loop beside it), ``"heatmap"`` (the bare dense pass
    beside ``heatmap()`` end to end: ``speedup`` is then the overhead), ``"stride N"``, a precision name or
    ``"compiled"`` (beside the float32 / eager dense pass: ``agreement`` is the share of cells whose top-1 class
    is the same, ``max_diff`` the largest logit difference)."""

    model: str
    size: int
    what: str
    cells: int
    seconds: float
    reference: str  # what it is compared with
    reference_seconds: float
    flop_ratio: Optional[float] = None
    peak_bytes: Optional[int] = None
    agreement: Optional[float] = None
    max_diff: Optional[float] = None

    @property
    def speedup(self) -> float:
        return self.reference_seconds / self.seconds

    @property
    def efficiency(self) -> Optional[float]:
        return None if self.flop_ratio is None else self.speedup / self.flop_ratio


def _best(run: Callable[[], object], repeat: int, device: torch.device = torch.device("cpu")) -> float:
    times = []
    for _ in range(max(1, repeat)):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (GPU calls return before they finish)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()



def _agreement(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Share of cells whose top-1 class is ``ref``'s, and the largest absolute logit difference."""
    out, ref = out.float(), ref.float()
    return float((out.argmax(1) == ref.argmax(1)).float().mean()), float((out - ref).abs().max())


def _flops(run: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


@torch.inference_mode()
def bench(name: str, fcn: FullyConvNet, original: Optional[nn.Module], sizes: Sequence[int],
          strides: Sequence[int] = (), repeat: int = 3, batch: int = 32, precisions: Sequence[str] = (),
          compiled: bool = False, device: DeviceLike = None) -> list[BenchRow]:
    """Measure ``fcn`` (and ``original``, the classifier it came from; None: ``fcn`` itself on each crop, which at
    the native size is the classifier) at each square image ``size`` on ``device`` (None: where ``fcn`` is).
    See the module docs for the rows and columns.

    Raises:
        ConvifyError: a size smaller than the network's window, a stride :func:`finer_stride` refuses, a
            device this machine lacks or a precision it does not offer there.
    """
    import numpy as np
    from PIL import Image

    from .engine import _normalise, heatmap
    from .errors import ConvifyError
    from .finer import finer_stride
    from .tiling import activation_bytes

    g = fcn.geometry
    where = resolve_device(device, fcn)
    precisions = [p for p in dict.fromkeys(check_precision(where, p) for p in precisions) if p != "float32"]
    fcn = on_device(fcn, where)
    classify = fcn if original is None else original if next(original.parameters()).device == where else \
        copy.deepcopy(original).to(where)  # the caller's module stays where it is
    rows = []
    for size in sizes:
        if size < g.min_input_size():
            raise ConvifyError(f"the size {size} px is smaller than the network's {g.min_input_size()} px")
        image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(where)
        h, w = g.output_size(size, size)
        boxes = [box for box in (g.cell_box(i, j, (size, size)) for i in range(h) for j in range(w))
                 if box[2] <= size and box[3] <= size]
        crops = torch.cat([image[:, :, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes])

        def loop() -> None:
            for k in range(0, len(crops), batch):
                classify(crops[k:k + batch])

        reference = main_map(fcn(image))
        classify(crops[:batch])  # warm up both
        dense = _best(lambda: fcn(image), repeat, where)
        sliding = _best(loop, repeat, where)
        ratio = _flops(lambda: classify(crops[:1])) * len(crops) / max(1, _flops(lambda: fcn(image)))
        rows.append(BenchRow(name, size, "dense", h * w, dense, f"{len(crops)} crops", sliding, ratio,
                             activation_bytes(fcn, size, size) if where.type == "cpu" else None))
        picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
        heatmap(picture, fcn, size=None, pad="none")  # warm up
        end_to_end = _best(lambda: heatmap(picture, fcn, size=None, pad="none"), repeat, where)
        same_input = _normalise(picture, fcn.meta.mean, fcn.meta.std).to(where)  # what heatmap() feeds the network
        fcn(same_input)
        bare = _best(lambda: fcn(same_input), repeat, where)
        rows.append(BenchRow(name, size, "heatmap", h * w, bare, "heatmap() end to end", end_to_end))
        for precision in precisions:
            with autocast(where, precision):
                low = main_map(fcn(image))
                seconds = _best(lambda: fcn(image), repeat, where)
            check_finite(low, precision)
            agreement, diff = _agreement(low, reference)
            rows.append(BenchRow(name, size, precision, h * w, seconds, "float32 dense", dense,
                                 agreement=agreement, max_diff=diff))
        if compiled:
            rows.append(_compiled_row(name, size, fcn, image, reference, dense, repeat, where))
        for stride in strides:
            fine = finer_stride(fcn, stride)
            r = g.stride // stride
            fine(image)
            seconds = _best(lambda: fine(image), repeat, where)
            shifts = [image[:, :, a * stride:, b * stride:] for a in range(r) for b in range(r)]
            stitched = _best(lambda: [fcn(x) for x in shifts], repeat, where)
            fh, fw = fine.geometry.output_size(size, size)
            rows.append(BenchRow(name, size, f"stride {stride}", fh * fw, seconds,
                                 f"shift-and-stitch ({r * r} passes)", stitched))
    return rows


def _compiled_row(name: str, size: int, fcn: FullyConvNet, image: torch.Tensor, reference: torch.Tensor,
                  eager: float, repeat: int, where: torch.device) -> BenchRow:
    """``torch.compile`` (inductor, parameters frozen as constants) beside the eager pass; the compile time
    (the first call's) is in the ``against`` column."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    with inductor.patch(freezing=True):
        run = torch.compile(fcn.net, dynamic=False)
        start = time.perf_counter()
        out = run(image)
        _sync(where)
        build = time.perf_counter() - start
        seconds = _best(lambda: run(image), repeat, where)
    agreement, diff = _agreement(main_map(out), reference)
    return BenchRow(name, size, "compiled", int(reference.shape[2] * reference.shape[3]), seconds,
                    f"eager (compile {build:.0f} s)", eager, agreement=agreement, max_diff=diff)


def format_rows(rows: Sequence[BenchRow]) -> list[str]:
    """The table ``convify bench`` prints (one line a row, header first)."""
    lines = [f"{'model':<14} {'px':>5} {'what':<10} {'cells':>6} {'seconds':>8}  {'against':<26} {'seconds':>8} "
             f"{'speed-up':>8} {'FLOP ratio':>10} {'efficiency':>10} {'peak memory':>11} {'top-1 same':>10} "
             f"{'max diff':>9}"]
    for r in rows:
        lines.append(
            f"{r.model[:14]:<14} {r.size:>5} {r.what:<10} {r.cells:>6} {r.seconds:>8.3f}  {r.reference:<26} "
            f"{r.reference_seconds:>8.3f} {r.speedup:>7.2f}x "
            f"{'' if r.flop_ratio is None else f'{r.flop_ratio:.2f}x':>10} "
            f"{'' if r.efficiency is None else f'{r.efficiency:.2f}':>10} "
            f"{'' if r.peak_bytes is None else f'{r.peak_bytes / 2 ** 20:.0f} MiB':>11} "
            f"{'' if r.agreement is None else f'{100 * r.agreement:.1f}%':>10} "
            f"{'' if r.max_diff is None else f'{r.max_diff:.2g}':>9}".rstrip())
    return lines


@dataclass
class ThroughputRow:
    """Images per second over a folder: ``pipeline`` (:func:`convify.batch.heatmaps`: read, resize, run, place
    the cells) and ``written`` (the same, each result's JSON summary written), beside ``bare``: the network
    alone on the very batches the pipeline runs, already prepared (the limit the pipeline can reach)."""

    model: str
    images: int
    batch_size: int
    workers: int
    bare: float  # seconds
    pipeline: float
    written: float

    @property
    def ratio(self) -> float:
        """The pipeline's images/s over the bare batched forward's (target: at least 0.9)."""
        return self.bare / self.pipeline


@torch.inference_mode()
def throughput(name: str, fcn: FullyConvNet, images: Sequence[object], batch_sizes: Sequence[int] = (1, 8),
               workers: Optional[int] = None, size: object = "auto", repeat: int = 3) -> list[ThroughputRow]:
    """Measure :func:`convify.batch.heatmaps` over ``images`` (paths) against the bare batched forward of the
    same prepared inputs in the same batches, side by side, for each batch size (best of ``repeat`` each)."""
    import tempfile

    from .batch import RunSettings, _Spec, default_workers, heatmaps, plan_groups, prepare_item
    from .tiling import batch_fits

    workers = default_workers() if workers is None else workers
    rows = []
    for batch_size in batch_sizes:
        settings = RunSettings(size=size, batch_size=batch_size)
        items = [prepare_item(i, image, _Spec(fcn), settings) for i, image in enumerate(images)]
        ready = [item for item in items if hasattr(item, "prepared")]
        passes = []
        for start in range(0, len(ready), settings.window_size):  # the windows and batches heatmaps() runs
            window = ready[start:start + settings.window_size]
            groups = plan_groups([tuple(item.prepared.x.shape[2:]) for item in window], batch_size,
                                 lambda shape: batch_fits(fcn, shape[0], shape[1]))
            passes.extend(torch.cat([window[p].prepared.x for p in group]) for group in groups)
        fcn(passes[0])  # warm up
        with tempfile.TemporaryDirectory(prefix="convify-bench-") as directory:
            def write() -> None:
                for result in heatmaps(images, fcn, batch_size=batch_size, workers=workers, size=size):
                    result.save(directory, stem=Path(result.source).stem, formats=("json",), force=True)

            def pipeline() -> None:
                list(heatmaps(images, fcn, batch_size=batch_size, workers=workers, size=size))

            # interleaved, best of each: a slow spell of the machine does not favour one of them
            times = [[_best(run, 1) for run in (lambda: [fcn(x) for x in passes], pipeline, write)]
                     for _ in range(max(1, repeat))]
        bare, pipeline_seconds, written = (min(column) for column in zip(*times))
        rows.append(ThroughputRow(name, len(ready), batch_size, workers, bare, pipeline_seconds, written))
    return rows


def format_throughput(rows: Sequence[ThroughputRow]) -> list[str]:
    """The throughput table ``convify bench --images/--folder`` prints."""
    lines = [f"{'model':<14} {'images':>6} {'batch':>5} {'workers':>7} {'bare img/s':>10} {'heatmaps() img/s':>16} "
             f"{'ratio':>6} {'+ JSON img/s':>12} {'ratio':>6}"]
    for r in rows:
        lines.append(f"{r.model[:14]:<14} {r.images:>6} {r.batch_size:>5} {r.workers:>7} {r.images / r.bare:>10.1f} "
                     f"{r.images / r.pipeline:>16.1f} {r.ratio:>5.2f}x {r.images / r.written:>12.1f} "
                     f"{r.bare / r.written:>5.2f}x")
    return lines


def generated_images(directory: Path, count: int, width: int = 640, height: int = 480) -> list[Path]:
    """``count`` JPEG photos-like images (smooth colour fields with detail, as compressible as photos) in ``directory``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize((width, height),
                                                                                                Image.BICUBIC)
        detail = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + detail, 0, 255).astype(np.uint8)
        path = directory / f"generated_{i:04d}.jpg"
        Image.fromarray(pixels, "RGB").save(path, quality=90)
        paths.append(path)
    return paths
