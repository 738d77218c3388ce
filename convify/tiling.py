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
from .fcn import FullyConvNet

__all__ = ["TilePlan", "plan_tiles", "activation_bytes", "iter_tiles", "tiled_map"]

# Crop reader: (x0, y0, x1, y1) in input pixels -> (1, 3, y1 - y0, x1 - x0) network input.
Reader = Callable[[int, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class TilePlan:
    """How an image is cut into crops.

    Attributes:
        rows, cols: per axis, ``((first, last), (start, end))``: map cells ``first .. last - 1`` come from input
            pixels ``[start, end)`` (see :meth:`Geometry.tiles`).
        map_size: ``(H', W')`` of the whole map.
        tile_cells: cells per crop side (the last crop of an axis may have fewer).
        whole: True when one crop is the whole image.
    """

    rows: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    cols: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    map_size: tuple[int, int]
    tile_cells: int

    @property
    def whole(self) -> bool:
        return len(self.rows) == 1 and len(self.cols) == 1

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

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
    param = next(iter(fcn.parameters()), None)
    x = torch.zeros(1, 3, height, width, dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    meter = _AllocationMeter()
    with torch.inference_mode(), meter:
        out = fcn.net(x)  # the graph itself: a measurement is not one of the network's forward passes
        del out
    counted = meter.peak + x.numel() * x.element_size()
    return max(counted, _resident_peak(lambda: fcn.net(x)) if x.device.type == "cpu" else 0)


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


def plan_tiles(fcn: FullyConvNet, height: int, width: int, max_memory: int = limits.DEFAULT_MAX_MEMORY,
               tile_cells: Optional[int] = None) -> TilePlan:
    """Cut a ``height x width`` input into crops whose forward passes fit ``max_memory`` bytes.

    Args:
        fcn: the converted network.
        height, width: the input, in pixels (after any resizing and padding).
        max_memory: the budget for one forward pass's tensors, in bytes (weights are not counted).
        tile_cells: force this many cells per crop side (for tests and benchmarks); None chooses from the
            budget: the whole image when it fits, else the largest square crop that does.

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
    if tile_cells is None and height * width <= _probe_side(g) ** 2:
        # Smaller than what measuring would run: one pass costs no more than the measurement itself.
        return TilePlan(tuple(g.tiles(height, max(map_size))), tuple(g.tiles(width, max(map_size))), map_size,
                        max(map_size))
    floor, per_pixel = _cost(fcn)
    if tile_cells is None:
        if _fits(fcn, height, width, max_memory):
            tile_cells = max(map_size)
        else:
            if not g.local:
                shown = ", ".join(g.global_context[:3]) + (", ..." if len(g.global_context) > 3 else "")
                need = max(floor, per_pixel * height * width) / 2 ** 30
                raise LimitError(
                    f"this network has layers that see the whole image ({shown}), so it cannot be tiled exactly, "
                    f"and a {width}x{height} px pass needs about {need:.1f} GB, over the {max_memory / 2 ** 30:.1f} "
                    "GB budget; raise --max-memory (max_memory=) or lower --size")
            side = math.sqrt(max_memory / per_pixel) - g.stride  # a crop may start up to a stride early
            tile_cells = int((side - g.receptive_field) // g.stride) + 1 if floor <= max_memory else 0
            if tile_cells < 1:
                least = max(floor, per_pixel * (g.receptive_field + g.stride) ** 2) / 2 ** 30
                raise LimitError(f"the memory budget of {max_memory / 2 ** 30:.2f} GB does not fit even one cell's "
                                 f"crop ({g.receptive_field} px, about {least:.2f} GB); raise --max-memory")
    elif tile_cells < max(map_size) and not g.local:
        raise LimitError("this network has layers that see the whole image "
                         f"({', '.join(g.global_context[:3])}), so it cannot be tiled exactly")
    return TilePlan(tuple(g.tiles(height, tile_cells)), tuple(g.tiles(width, tile_cells)), map_size, tile_cells)


def iter_tiles(fcn: FullyConvNet, read: Reader, plan: TilePlan) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Run the network crop by crop; yield ``(row0, col0, block)`` with ``block`` ``(C, h, w)`` raw scores for
    whole-map cells ``[row0:row0+h, col0:col0+w]``. The blocks cover the map once, row of crops by row."""
    stride = fcn.geometry.stride
    with torch.inference_mode():
        for (r0, r1), (y0, y1) in plan.rows:
            for (c0, c1), (x0, x1) in plan.cols:
                out = fcn(read(x0, y0, x1, y1))
                maps = out[0] if isinstance(out, (tuple, list)) else out
                i0, j0 = r0 - y0 // stride, c0 - x0 // stride
                yield r0, c0, maps[0, :, i0:i0 + r1 - r0, j0:j0 + c1 - c0].float().cpu()
                del out, maps


def tiled_map(fcn: FullyConvNet, x: torch.Tensor, max_memory: int = limits.DEFAULT_MAX_MEMORY,
              tile_cells: Optional[int] = None) -> torch.Tensor:
    """The network's map of ``x`` (``(1, 3, H, W)``, normalised), computed crop by crop: ``(C, H', W')``.

    Equal to ``fcn(x)[0]`` (the same cells, the same values up to float rounding of a different
    summation order inside the convolution kernels), with memory bounded by ``max_memory`` for the
    network's tensors plus the map itself.
    """
    _, _, height, width = x.shape
    plan = plan_tiles(fcn, height, width, max_memory, tile_cells)
    if plan.whole:  # one pass over the whole input, pixels the map does not need included
        with torch.inference_mode():
            out = fcn(x)
        return (out[0] if isinstance(out, (tuple, list)) else out)[0].float().cpu()
    result: Optional[torch.Tensor] = None
    for r0, c0, block in iter_tiles(fcn, lambda x0, y0, x1, y1: x[:, :, y0:y1, x0:x1], plan):
        if result is None:
            result = torch.empty(block.shape[0], *plan.map_size)
        result[:, r0:r0 + block.shape[1], c0:c0 + block.shape[2]] = block
    return result
