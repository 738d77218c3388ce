"""Exact tiling: the score map of an image of any size, crop by crop, in bounded memory.

A converted network whose cells are local (``geometry.local``) computes each cell from its receptive field
alone. So the map of a large image can be computed from crops: each crop starts on the network's stride
grid (every layer's grid then lines up with the whole image's), is extended by the context its cells
need (receptive field minus stride), and only the cells whose whole receptive field lies inside the crop,
or leaves it only at the image's own edge, are kept (:meth:`~convify.geometry.Geometry.tiles`). Those
cells are *equal* to the whole-image pass: padding, ceil-mode pools and all. The cost is the context
recomputed around each crop.

How large a crop may be comes from a memory budget: :func:`activation_bytes` measures what the network
allocates at two input sizes (every tensor torch creates, counted until it is freed), which gives its
bytes per input pixel, and the crop is the largest square that fits.

Crops are the fallback. Where the graph allows (:mod:`convify.stream`: convolutions, pools, pads and
per-position layers, which is most CNNs), an image is instead *streamed*: it enters a strip of rows at a
time and every layer computes each of its rows once, so nothing is recomputed along the height. An image
too wide for one strip's budget is cut into vertical bands first, each extended by the context its cells
need along the width, and each band streamed. Streaming is also the faster way to run a large image whose
whole pass would fit: a strip's layers stay small (see ``benchmarks/tiling.py``).

Networks with global context (squeeze-and-excitation, GroupNorm over the map) see the whole image in
every cell: they run whole when that fits the budget, and are refused otherwise.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import limits
from .errors import LimitError
from .fcn import FullyConvNet, main_map
from .stream import NotStreamable, Program, compile_stream, stream_rows

__all__ = ["TilePlan", "plan_tiles", "activation_bytes", "iter_tiles", "tiled_map", "stream_refusal", "plan_bytes"]

# Crop reader: (x0, y0, x1, y1) in input pixels -> (1, 3, y1 - y0, x1 - x0) network input.
Reader = Callable[[int, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class TilePlan:
    """How an image is cut into crops.

    Attributes:
        rows, cols: per axis, ``((first, last), (start, end))``: map cells ``first .. last - 1`` come from input
            pixels ``[start, end)`` (see :meth:`Geometry.tiles`).
        map_size: ``(H', W')`` of the whole map.
        tile_cells: cells per crop side (the last crop of an axis may have fewer); when streaming, per band.
        strip: 0 for crops; else the image is streamed (``rows`` is then the whole height, ``cols`` the
            bands) and this is the input rows one strip holds.
        whole: True when one crop is the whole image (one pass, not streamed).
    """

    rows: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    cols: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    map_size: tuple[int, int]
    tile_cells: int
    strip: int = 0

    @property
    def whole(self) -> bool:
        return len(self.rows) == 1 and len(self.cols) == 1 and not self.strip

    @property
    def count(self) -> int:
        """Forward passes: crops, or strips over all bands."""
        strips = -(-self.rows[0][1][1] // self.strip) if self.strip else 1
        return len(self.rows) * len(self.cols) * strips

    def input_pixels(self) -> int:
        """Pixels the network runs on over all crops (the whole image's count when ``whole``)."""
        return sum((r[1][1] - r[1][0]) * (c[1][1] - c[1][0]) for r in self.rows for c in self.cols)


class _AllocationMeter(TorchDispatchMode):
    """Counts the bytes of every tensor storage torch creates while active, until it is freed; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive on it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [t.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                self.current -= entry[0]
                del self.live[ptr]


def activation_bytes(fcn: FullyConvNet, height: int, width: int) -> int:
    """Peak bytes a forward pass on a ``height x width`` input adds (weights excluded), measured.

    The pass runs (on zeros) twice over: once counting every tensor torch creates until it is freed, and,
    where Linux lets a process reset its peak resident memory (``/proc/self/clear_refs``), once reading the
    real peak the process reached above where it started; the larger of the two is returned. The second
    sees what the first cannot (workspaces inside CPU convolution kernels, allocator overheads): on VGG16
    it is about 1.5x the tensors alone.
    """
    dtype, device = _dtype_device(fcn)
    x = torch.zeros(1, 3, height, width, dtype=dtype, device=device)
    return max(x.numel() * x.element_size() + _peak(lambda: fcn.net(x), device), 0)


def plan_bytes(fcn: FullyConvNet, plan: TilePlan) -> int:
    """Peak bytes (measured as :func:`activation_bytes` does) of the plan's largest unit of work: its largest
    crop's pass, or, streamed, its widest band streamed from top to bottom (strips read on the way)."""
    if not plan.strip:
        h, w = max(((r[1][1] - r[1][0], c[1][1] - c[1][0]) for r in plan.rows for c in plan.cols),
                   key=lambda hw: hw[0] * hw[1])
        return activation_bytes(fcn, h, w)
    height, width = plan.rows[0][1][1], max(c[1][1] - c[1][0] for c in plan.cols)
    program = compile_stream(fcn.net, height, width)
    dtype, device = _dtype_device(fcn)

    def run() -> None:
        strips = (torch.zeros(1, 3, min(plan.strip, height - y), width, dtype=dtype, device=device)
                  for y in range(0, height, plan.strip))
        for _ in stream_rows(program, strips):
            pass

    return _peak(run, device)


def _dtype_device(fcn: FullyConvNet) -> tuple[torch.dtype, torch.device]:
    param = next(iter(fcn.parameters()), None)
    return (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))


def _peak(run: Callable[[], Any], device: torch.device) -> int:
    """The larger of the tensor meter's peak and the rise of the process's peak resident memory while
    ``run()`` runs (see :func:`activation_bytes`)."""
    meter = _AllocationMeter()
    with torch.inference_mode(), meter:
        out = run()  # the graph itself: a measurement is not one of the network's forward passes
        del out
    return max(meter.peak, _resident_peak(run) if device.type == "cpu" else 0)


def _resident_peak(run: Callable[[], Any]) -> int:
    """Bytes the process's peak resident memory rises by while ``run()`` runs; 0 where Linux's peak reset is
    not available."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(key)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        start = status("VmRSS")
        with torch.inference_mode():
            out = run()
            del out
        return max(status("VmHWM") - start, 0)
    except OSError:
        return 0


_COST: "weakref.WeakKeyDictionary[FullyConvNet, tuple[float, float]]" = weakref.WeakKeyDictionary()


def _cost(fcn: FullyConvNet) -> tuple[float, float]:
    """``(floor, per_pixel)``: a pass on ``s x s`` pixels takes at most ``max(floor, per_pixel * s * s)`` bytes.

    Measured once per network, at a small input (where fixed costs dominate: the floor) and at one ten
    strides wider than the receptive field (where the per-pixel cost dominates; its ratio of bytes to
    pixels is an upper bound for larger inputs, since the fixed part only shrinks in proportion).
    """
    if fcn not in _COST:
        g = fcn.geometry
        small = max(g.min_input_size(), g.receptive_field)
        large = _probe_side(g)
        floor = activation_bytes(fcn, small, small)
        _COST[fcn] = (float(floor), activation_bytes(fcn, large, large) / (large * large))
    return _COST[fcn]


def _probe_side(g: Any) -> int:
    """The side of the larger input the memory is measured at: ten strides past the receptive field."""
    return max(g.min_input_size(), g.receptive_field) + 10 * g.stride


def _fits(fcn: FullyConvNet, height: int, width: int, budget: float) -> bool:
    floor, per_pixel = _cost(fcn)
    return max(floor, per_pixel * height * width) <= budget


def batch_fits(fcn: FullyConvNet, height: int, width: int, max_memory: int = limits.DEFAULT_MAX_MEMORY) -> int:
    """How many ``height x width`` inputs one forward pass may hold within ``max_memory`` bytes (at least 1:
    one input over the budget runs alone, in tiles). The per-pixel cost is measured once per network
    (as for tiling); a batch of ``n`` costs ``n`` times one input's."""
    floor, per_pixel = _cost(fcn)
    return max(1, int(max_memory // max(floor, per_pixel * height * width)))


# Streaming: the input pixels one strip aims at (measured fastest on 2 cores: 0.2 to 0.5 MP; fewer
# pixels make more sweeps, more make layers that no longer stay in cache), and the fewest rows a strip
# holds, in strides (each windowed layer recomputes a row or so next to each cut: few rows make that a
# large share of the deep layers' work).
STRIP_PIXELS = 1 << 18
MIN_STRIP_STRIDES = 2

_STREAMS: "weakref.WeakKeyDictionary[FullyConvNet, Optional[str]]" = weakref.WeakKeyDictionary()


def stream_refusal(fcn: FullyConvNet) -> Optional[str]:
    """Why ``fcn`` cannot be streamed (:mod:`convify.stream`), or None when it can. Checked once per network."""
    if fcn not in _STREAMS:
        g = fcn.geometry
        if not g.local:
            _STREAMS[fcn] = "it has global context"
        else:
            side = max(g.min_input_size(), g.receptive_field) + 2 * g.stride
            try:
                compile_stream(fcn.net, side, side)
                _STREAMS[fcn] = None
            except NotStreamable as e:
                _STREAMS[fcn] = str(e)
    return _STREAMS[fcn]


def plan_tiles(fcn: FullyConvNet, height: int, width: int, max_memory: int = limits.DEFAULT_MAX_MEMORY,
               tile_cells: Optional[int] = None, strip: Optional[int] = None,
               band_cells: Optional[int] = None, stream: bool = True) -> TilePlan:
    """Plan how a ``height x width`` input is run within ``max_memory`` bytes.

    One pass when the image is small (or the network has global context and the image fits); else the
    image is streamed (bands of the width, strips of rows: nothing recomputed along the height) when the
    network's graph streams, and cut into square crops when it does not.

    Args:
        fcn: the converted network.
        height, width: the input, in pixels (after any resizing and padding).
        max_memory: the budget for one forward pass's tensors, in bytes (weights are not counted).
        tile_cells: force crops of this many cells a side (for tests and benchmarks).
        strip, band_cells: force streaming, ``strip`` input rows at a time in bands of ``band_cells`` map
            columns (None: the whole width), for tests and benchmarks.
        stream: False never streams (crops only, as for a network whose graph does not stream).

    Raises:
        LimitError: the image is too small for the network; the network has global context and the whole
            image does not fit the budget (naming the layers and the way out); or even one cell's crop does
            not fit the budget.
    """
    g = fcn.geometry
    map_size = g.output_size(height, width)
    if min(map_size) < 1:
        raise LimitError(f"the input is {width}x{height} px; the network needs at least {g.min_input_size()} px "
                         "a side")
    if tile_cells is not None:
        if tile_cells < max(map_size) and not g.local:
            raise LimitError("this network has layers that see the whole image "
                             f"({', '.join(g.global_context[:3])}), so it cannot be tiled exactly")
        return _crops(g, height, width, map_size, tile_cells)
    if strip is not None:
        if stream_refusal(fcn):
            raise LimitError(f"this network cannot be streamed: {stream_refusal(fcn)}")
        return _stream_plan(g, height, width, map_size, strip, band_cells or map_size[1])
    if height * width <= _probe_side(g) ** 2:
        # Smaller than what measuring would run: one pass costs no more than the measurement itself.
        return _crops(g, height, width, map_size, max(map_size))
    floor, per_pixel = _cost(fcn)
    if not g.local:
        if _fits(fcn, height, width, max_memory):
            return _crops(g, height, width, map_size, max(map_size))
        shown = ", ".join(g.global_context[:3]) + (", ..." if len(g.global_context) > 3 else "")
        need = max(floor, per_pixel * height * width) / 2 ** 30
        raise LimitError(
            f"this network has layers that see the whole image ({shown}), so it cannot be tiled exactly, "
            f"and a {width}x{height} px pass needs about {need:.1f} GB, over the {max_memory / 2 ** 30:.1f} "
            "GB budget; raise --max-memory (max_memory=) or lower --size")
    least = max(floor, per_pixel * (g.receptive_field + g.stride) ** 2)
    if least > max_memory:
        raise LimitError(f"the memory budget of {max_memory / 2 ** 30:.2f} GB does not fit even one cell's "
                         f"crop ({g.receptive_field} px, about {least / 2 ** 30:.2f} GB); raise --max-memory")
    pixels = max_memory / per_pixel  # input pixels one pass may hold
    whole_fits = _fits(fcn, height, width, max_memory)
    if stream and stream_refusal(fcn) is None and (height * width > 2 * STRIP_PIXELS or not whole_fits):
        least_rows = MIN_STRIP_STRIDES * g.stride
        slack = least_rows  # rows the layers keep between strips, and the cut rows they recompute
        if width * (least_rows + slack) <= pixels:  # whole rows fit: no band, nothing recomputed
            rows = max(least_rows, min(STRIP_PIXELS // width, int(pixels // width) - slack))
            return _stream_plan(g, height, width, map_size, min(rows, height), map_size[1])
        band = pixels / (least_rows + slack)  # pixels wide, context included
        cells = int((band - g.stride - g.receptive_field) // g.stride) + 1
        if cells >= 1:
            return _stream_plan(g, height, width, map_size, least_rows, cells)
    if whole_fits:
        return _crops(g, height, width, map_size, max(map_size))
    side = math.sqrt(pixels) - g.stride  # a crop may start up to a stride early
    return _crops(g, height, width, map_size, max(1, int((side - g.receptive_field) // g.stride) + 1))


def _crops(g: Any, height: int, width: int, map_size: tuple[int, int], cells: int) -> TilePlan:
    return TilePlan(tuple(g.tiles(height, cells, axis=0)), tuple(g.tiles(width, cells, axis=1)), map_size, cells)


def _stream_plan(g: Any, height: int, width: int, map_size: tuple[int, int], strip: int, band_cells: int) -> TilePlan:
    if strip < 1 or band_cells < 1:
        raise ValueError("strip and band_cells must be at least 1")
    return TilePlan((((0, map_size[0]), (0, height)),), tuple(g.tiles(width, band_cells, axis=1)), map_size, band_cells,
                    strip)


def iter_tiles(fcn: FullyConvNet, read: Reader, plan: TilePlan) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Run the network crop by crop (or band by band, streamed); yield ``(row0, col0, block)`` with ``block``
    ``(C, h, w)`` raw scores for whole-map cells ``[row0:row0+h, col0:col0+w]``. The blocks cover the map
    once: crops row of crops by row; streamed, band by band, top to bottom."""
    if plan.strip:
        yield from _iter_streamed(fcn, read, plan)
        return
    stride = fcn.geometry.stride
    with torch.inference_mode():
        for (r0, r1), (y0, y1) in plan.rows:
            for (c0, c1), (x0, x1) in plan.cols:
                out = fcn(read(x0, y0, x1, y1))
                maps = main_map(out)
                i0, j0 = r0 - y0 // stride, c0 - x0 // stride
                yield r0, c0, maps[0, :, i0:i0 + r1 - r0, j0:j0 + c1 - c0].float().cpu()
                del out, maps


# Streamed rows are handed on in blocks of at most this many values (rows gathered up to it), so that a
# map store is not rewritten for every row or two a strip finishes.
_BLOCK_VALUES = 1 << 23


def _iter_streamed(fcn: FullyConvNet, read: Reader, plan: TilePlan) -> Iterator[tuple[int, int, torch.Tensor]]:
    stride, height = fcn.geometry.stride, plan.rows[0][1][1]
    programs: dict[int, Program] = {}
    with torch.inference_mode():
        for (c0, c1), (x0, x1) in plan.cols:
            if x1 - x0 not in programs:
                programs[x1 - x0] = compile_stream(fcn.net, height, x1 - x0)
            strips = (read(x0, y, x1, min(height, y + plan.strip)) for y in range(0, height, plan.strip))
            j0 = c0 - x0 // stride
            held: list[torch.Tensor] = []
            first = 0
            for row, block in stream_rows(programs[x1 - x0], strips):
                if not held:
                    first = row
                held.append(block[0, :, :, j0:j0 + c1 - c0].float().cpu())
                if sum(b.numel() for b in held) >= _BLOCK_VALUES - held[-1].numel():
                    yield first, c0, torch.cat(held, dim=1)
                    held = []
            if held:
                yield first, c0, torch.cat(held, dim=1)


def tiled_map(fcn: FullyConvNet, x: torch.Tensor, max_memory: int = limits.DEFAULT_MAX_MEMORY,
              tile_cells: Optional[int] = None, strip: Optional[int] = None,
              band_cells: Optional[int] = None, stream: bool = True) -> torch.Tensor:
    """The network's map of ``x`` (``(1, 3, H, W)``, normalised), as :func:`plan_tiles` plans it: ``(C, H', W')``.

    Equal to ``fcn(x)[0]`` (the same cells, the same values up to float rounding of a different
    summation order inside the convolution kernels), with memory bounded by ``max_memory`` for the
    network's tensors plus the map itself. ``tile_cells``, ``strip``, ``band_cells``, ``stream``: see
    :func:`plan_tiles`.
    """
    _, _, height, width = x.shape
    plan = plan_tiles(fcn, height, width, max_memory, tile_cells, strip, band_cells, stream)
    if plan.whole:  # one pass over the whole input, pixels the map does not need included
        with torch.inference_mode():
            out = fcn(x)
        return main_map(out)[0].float().cpu()
    result: Optional[torch.Tensor] = None
    for r0, c0, block in iter_tiles(fcn, lambda x0, y0, x1, y1: x[:, :, y0:y1, x0:x1], plan):
        if result is None:
            result = torch.empty(block.shape[0], *plan.map_size)
        result[:, r0:r0 + block.shape[1], c0:c0 + block.shape[2]] = block
    return result
