"""Where each cell of a score map lies in the input image: stride, window, receptive field, map sizes.

The geometry of a fully-convolutional network is arithmetic over its windowed layers (convolutions,
pools, pads). :func:`analyse_geometry` reads those layers off the converted graph once; a
:class:`Geometry` then answers every question with integers and no tensors.

Two windows describe a cell ``(i, j)`` (row ``i``, column ``j`` of ``map[..., i, j]``):

- the **nominal window** (:meth:`Geometry.cell_box`): the ``window x window`` square, ``window`` being the
  native input size, at ``(offset + j * stride, offset + i * stride)``. The cell is the classifier's answer
  for that square: exactly so for a network without padding (it equals the original run on that crop),
  approximately for padded networks (VGG, ResNet), whose layers near a crop's border would see zeros
  where the big image has real pixels.
- the **receptive field** (:meth:`Geometry.rf_box`): every input pixel that can influence the cell. It is
  larger than the window for padded networks (VGG16: 404 px for a 224 px window) and may reach outside
  the image, into the padding.

A body with *global context* (squeeze-and-excitation, global attention pools inside the network)
lets every pixel of the image touch every cell: ``local`` is then False, and cells are the classifier's
answer for their window *given the whole image as context*.

Two kinds of layer make the arithmetic depend on more than the layers:

- ``"same_pad"`` layers (TensorFlow "SAME" padding) pad before by a rule of the size they meet, so where cells
  lie depends on the input's size (:attr:`Geometry.size_dependent`; :meth:`Geometry.cell_box` then takes it).
- ``"upsample"`` layers (HRNet's fused branches) make spans fractions of a pixel inside the network; the
  receptive field is then the least whole-pixel bound around them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any, Optional

import torch
import torch.fx as fx

from . import limits
from .errors import ConversionError, ConvifyError
from .layers import overhang, same_padding
from .ops import argument, op_for, op_name, reduces_per_position
from .tracing import Layout, fetch_attr, is_shape_query, node_arg, pair, probe_layouts, walk_inputs

__all__ = ["Geometry", "analyse_geometry", "window_of", "padding_mode", "upsampling"]


@dataclass(frozen=True)
class Geometry:
    """The geometry of a converted network's score maps, in input pixels.

    Attributes:
        stride: distance in pixels between neighbouring cells (32 for VGG16 and ResNets).
        window: the nominal window of a cell: the native input size (224).
        offset: where cell (0, 0)'s nominal window starts (0: it is the top-left ``window`` square).
        receptive_field: the true receptive field of one cell, in pixels.
        rf_offset: where cell (0, 0)'s receptive field starts (negative when it reaches into padding).
        local: False when layers inside the body see the whole image (see ``global_context``).
        global_context: the layers that give every cell a view of the whole image.
        padded: whether any layer pads its input (then cells only approximate isolated crops).
        layers: the windowed layers as data, for :meth:`output_size`: each has an ``op`` of ``"input"``,
            ``"window"`` (kernel/stride/padding/dilation per axis) or ``"same"`` (size unchanged) and the
            indices of its ``inputs``; the last one is the output.
    """

    stride: int
    window: int
    offset: int
    receptive_field: int
    rf_offset: int
    local: bool = True
    global_context: tuple[str, ...] = ()
    padded: bool = False
    layers: tuple[dict, ...] = field(default=(), repr=False)

    # -- cells -----------------------------------------------------------------------------------

    def cell_box(self, i: int, j: int, size: Optional[tuple[int, int]] = None) -> tuple[int, int, int, int]:
        """The nominal window of cell ``map[..., i, j]`` as ``(x0, y0, x1, y1)`` input pixels (x1, y1 exclusive).

        ``size``: the input's ``(height, width)``; needed only when :attr:`size_dependent`.
        """
        (y_offset, _), (x_offset, _) = self._offsets(size)
        x0, y0 = x_offset + j * self.stride, y_offset + i * self.stride
        return (x0, y0, x0 + self.window, y0 + self.window)

    def rf_box(self, i: int, j: int, size: Optional[tuple[int, int]] = None) -> tuple[int, int, int, int]:
        """The receptive field of cell ``(i, j)`` as ``(x0, y0, x1, y1)`` (exclusive end; may leave the image).

        ``size``: the input's ``(height, width)``; needed only when :attr:`size_dependent`.
        """
        (_, y_rf), (_, x_rf) = self._offsets(size)
        x0, y0 = x_rf + j * self.stride, y_rf + i * self.stride
        return (x0, y0, x0 + self.receptive_field, y0 + self.receptive_field)

    def cell_center(self, i: int, j: int, size: Optional[tuple[int, int]] = None) -> tuple[float, float]:
        """The centre ``(x, y)`` of cell ``(i, j)``'s window, in continuous pixel coordinates."""
        x0, y0, x1, y1 = self.cell_box(i, j, size)
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    @cached_property  # read at every cell box: the layers are scanned once (a frozen dataclass's __dict__ holds it)
    def size_dependent(self) -> bool:
        """Whether where cells lie depends on the input's size: a layer pads by a rule of the size it meets
        (TensorFlow's "SAME" padding, ``"same_pad"`` layers). Then :meth:`cell_box` and :meth:`rf_box` need
        the input's size, and :attr:`offset` and :attr:`rf_offset` are those of the native size."""
        return any(layer["op"] == "same_pad" for layer in self.layers)

    @cached_property
    def upsamples(self) -> bool:
        """Whether the network upsamples inside (``"upsample"`` layers: HRNet's fused branches). It then runs only
        at input sizes where the fused branches agree in size (the native size plus whole strides always do)."""
        return any(layer["op"] == "upsample" for layer in self.layers)

    def axis_offsets(self, length: int, axis: int = 0) -> tuple[int, int]:
        """``(offset, rf_offset)`` along one axis (0: rows, 1: columns) for an input ``length`` px long.

        For a size-independent geometry these are :attr:`offset` and :attr:`rf_offset`. Where layers pad by
        the size they meet, the first cell's receptive field starts where the padding at this length puts it,
        and its nominal window moves with it (the window is ``offset`` px from the receptive field's start at
        the native size, where cell (0, 0) is the whole input).
        """
        if not self.size_dependent:
            return self.offset, self.rf_offset
        rf_offset = self._walk(length, axis)[1]
        return self.offset + rf_offset - self._walk(self.window, axis)[1], rf_offset

    def _offsets(self, size: Optional[tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int]]:
        if size is None:
            if self.size_dependent:
                raise ValueError("this network pads by the size of the input (TensorFlow 'SAME' padding), so where "
                                 "its cells lie depends on the image's size: pass size=(height, width)")
            return (self.offset, self.rf_offset), (self.offset, self.rf_offset)
        return self.axis_offsets(int(size[0]), 0), self.axis_offsets(int(size[1]), 1)

    # -- spans: the questions tiling asks, along one axis (0: rows, 1: columns) --------------------

    def input_span(self, first: int, last: int, length: Optional[int] = None, axis: int = 0) -> tuple[int, int]:
        """The input pixels ``[start, end)`` along one axis that cells ``first .. last - 1`` read: the union of
        their receptive fields (it may reach outside the image, into padding). ``length``: the axis's length in
        pixels, needed only when :attr:`size_dependent`."""
        rf_offset = self._rf_offset(length, axis)
        return (rf_offset + first * self.stride, rf_offset + (last - 1) * self.stride + self.receptive_field)

    def exact_cells(self, start: int, end: int, length: int, axis: int = 0) -> tuple[int, int]:
        """Which cells a crop computes exactly as the whole image does, along one axis.

        For a crop ``[start, end)`` of an axis ``length`` pixels long, with ``start`` a multiple of the
        stride (so every layer's grid lines up with the whole image's), cell ``k`` of the whole map equals
        cell ``k - start // stride`` of the crop's map when its receptive field lies inside the crop, or
        leaves it only where the crop reaches the image's own edge (where both see the same padding).
        Where layers pad by the size they meet (:attr:`size_dependent`), the grids line up only when the crop
        is also as long as the axis modulo the stride: then every layer meets a map of the same length modulo
        its own stride, and pads the same before it.

        Returns:
            ``(first, last)``: whole-map cells ``first .. last - 1`` (``first >= last`` when there are none).

        Raises:
            ValueError: ``start`` is not a multiple of the stride, the crop is not inside the axis, or (for a
                size-dependent geometry) its length differs from the axis's by other than whole strides.
        """
        if start % self.stride or not 0 <= start < end <= length:
            raise ValueError(f"crop [{start}, {end}) of an axis of {length} px must start on the stride grid "
                             f"({self.stride} px) and lie inside it")
        if self.size_dependent and (length - (end - start)) % self.stride:
            raise ValueError(f"crop [{start}, {end}) of an axis of {length} px must be as long as the axis modulo "
                             f"the stride ({self.stride} px): this network pads by the size of its input")
        whole = self._axis_size(length, axis)
        rf_offset = self._rf_offset(length, axis)
        first = 0 if start == 0 else -((rf_offset - start) // self.stride)  # ceil((start - rf_offset) / s)
        last = whole if end == length else (end - rf_offset - self.receptive_field) // self.stride + 1
        return max(first, 0), min(last, whole)

    def cover_padding(self, length: int, axis: int = 0) -> tuple[int, int]:
        """The padding ``(before, after)`` that lets the map of an axis ``length`` px long cover all of it.

        Without padding every cell's window lies inside the image, so no cell is centred within
        ``(window - stride) / 2`` px of an edge. Padded, the first cell's centre lies at most half a stride
        inside the start (``before = ceil(offset + (window - stride) / 2)``, at least 0) and ``after`` is the
        least padding that puts the last centre at most half a stride inside the end: every pixel of the
        axis is then within half a stride of a cell's centre. (For a size-dependent geometry ``offset`` is
        the one at the padded length.)
        """
        before = max(0, math.ceil(self.offset + (self.window - self.stride) / 2))
        after, most = 0, before + self.receptive_field + self.window
        while before <= most:
            padded = length + before + after
            offset = self.axis_offsets(padded, axis)[0]
            cells = self._axis_size(padded, axis)
            if offset + self.window / 2 - before > self.stride / 2:  # padding moved the cells in (size-dependent)
                before, after = before + 1, 0
                continue
            if cells >= 1 and offset + (cells - 1) * self.stride + self.window / 2 - before + self.stride / 2 >= length:
                return before, after
            after += 1
        raise ConvifyError(f"no padding lets this network's map cover an axis of {length} px")

    def tiles(self, length: int, cells: int, axis: int = 0) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Split one axis into crops that together give every cell of the whole map exactly once.

        Args:
            length: the axis's length in pixels.
            cells: how many map cells each crop should give (the last may give fewer).
            axis: 0 for rows, 1 for columns (they differ only where layers pad by the size they meet).

        Returns:
            ``[((first, last), (start, end)), ...]``: whole-map cells ``first .. last - 1`` come from the crop
            ``[start, end)`` of the input, whose own map holds them from index ``first - start // stride``.
        """
        whole = self._axis_size(length, axis)
        plan = []
        for first in range(0, whole, max(cells, 1)):
            last = min(whole, first + max(cells, 1))
            need_start, need_end = self.input_span(first, last, length, axis)
            start = max(0, need_start) // self.stride * self.stride
            end = min(length, need_end)
            if self.size_dependent or self._axis_size(end - start, axis) < 1:
                # as long as the axis modulo the stride: every layer meets the same remainders as on the whole axis,
                # so it pads the same (exact_cells) and fused branches agree in size (HRNet) where the whole's do
                end = min(length, end + (length - (end - start)) % self.stride)
            exact = self.exact_cells(start, end, length, axis)
            if exact[0] > first or exact[1] < last:  # cannot happen for a consistent geometry
                raise ConvifyError(f"the crop [{start}, {end}) does not give cells {first}..{last - 1} exactly")
            plan.append(((first, last), (start, end)))
        return plan

    def _rf_offset(self, length: Optional[int], axis: int) -> int:
        if length is None:
            return self._offsets(None)[axis][1]
        return self.axis_offsets(length, axis)[1]

    # -- sizes -----------------------------------------------------------------------------------

    def output_size(self, height: int, width: Optional[int] = None) -> tuple[int, int]:
        """The map size ``(H', W')`` for an input of ``height x width`` pixels (``(0, 0)`` if too small)."""
        width = height if width is None else width
        return (self._axis_size(height, 0), self._axis_size(width, 1))

    def min_input_size(self) -> int:
        """The smallest square input that gives at least a 1x1 map.

        Raises:
            ConvifyError: no input up to ``limits.MAX_SIDE`` pixels gives a map (a damaged geometry).
        """
        lo, hi = 1, max(self.window, 1)
        while self._axis_size(hi, 0) < 1:
            if hi > limits.MAX_SIDE:
                raise ConvifyError(f"no input up to {limits.MAX_SIDE} px gives this network a map")
            hi *= 2
        while lo < hi:
            mid = (lo + hi) // 2
            if self._axis_size(mid, 0) >= 1:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _axis_size(self, n: int, axis: int) -> int:
        return self._walk(n, axis)[0]

    def _walk(self, n: int, axis: int) -> tuple[int, int]:
        """The output's length along ``axis`` for an input ``n`` px long (0 if too small), and where the first
        cell's receptive field starts (the layers' padding before, in input pixels).

        Remembered (4096 answers) in the instance's ``__dict__``, not a field (not saved, not compared): the
        geometry is frozen, so the answers never change, and cover_padding and a map's cell boxes ask for the same
        lengths many times (about 170 walks of EfficientNet's 200 layers for one 448 px image otherwise)."""
        walks = self.__dict__.setdefault("_walks", {})
        key = (n, axis)
        if key not in walks:
            if len(walks) >= 4096:
                walks.clear()
            walks[key] = self._walk_layers(n, axis)
        return walks[key]

    def _walk_layers(self, n: int, axis: int) -> tuple[int, int]:
        sizes: list[int] = []
        starts: list[int] = []
        jumps: list[int] = []
        for layer in self.layers:
            if layer["op"] == "input":
                sizes.append(n), starts.append(0), jumps.append(1)
                continue
            inputs = [sizes[k] for k in layer["inputs"]]
            start, jump = min(starts[k] for k in layer["inputs"]), jumps[layer["inputs"][0]]
            if min(inputs) < 1 or len(set(inputs)) > 1:  # too small, or branches that cannot be merged
                sizes.append(0), starts.append(start), jumps.append(jump)
                continue
            size = inputs[0]
            if layer["op"] == "window":
                k, s, before, after, d = (layer[key][axis] for key in _WINDOW_KEYS)
                ceil_stride = layer.get("ceil_stride", (0, 0))[axis]
                extra = overhang(size, k, before, d, ceil_stride) if ceil_stride else 0
                size, start, jump = _window_out(size + extra, k, s, before, after, d, layer["ceil_mode"]), \
                    start - before * jump, jump * s
            elif layer["op"] == "same_pad":
                before, after = same_padding(size, *(layer[key][axis] for key in _SAME_KEYS))
                size, start = size + before + after, start - before * jump
            elif layer["op"] == "upsample":
                r = layer["scale"][axis]
                span = _upsampled(_Span(jump, start, start), r, layer["mode"])
                size, start, jump = size * r, span.start, span.jump
            sizes.append(size), starts.append(start), jumps.append(jump)
        return (max(sizes[-1], 0), math.floor(starts[-1])) if sizes else (n, 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for saving); :meth:`from_dict` reverses it."""
        data = asdict(self)
        data["global_context"] = list(self.global_context)
        data["layers"] = [dict(layer) for layer in self.layers]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "Geometry":
        """The geometry :meth:`to_dict` described, every field typed and range-checked.

        Raises:
            ValueError: naming the first field that is missing, of the wrong type or out of range.
        """
        if not isinstance(data, dict) or set(data) != _FIELDS:
            raise ValueError(f"geometry must have exactly the fields {', '.join(sorted(_FIELDS))}")
        big = limits.MAX_INPUT_SIZE * 64
        values = {
            "stride": _bounded(data, "stride", 1, limits.MAX_INPUT_SIZE),
            "window": _bounded(data, "window", 1, limits.MAX_INPUT_SIZE),
            "offset": _bounded(data, "offset", -big, big),
            "receptive_field": _bounded(data, "receptive_field", 1, big),
            "rf_offset": _bounded(data, "rf_offset", -big, big),
            "local": _flag(data, "local"), "padded": _flag(data, "padded"),
        }
        context = data["global_context"]
        if not isinstance(context, (list, tuple)) or len(context) > limits.MAX_GRAPH_NODES or \
                not all(isinstance(c, str) and len(c) <= 200 for c in context):
            raise ValueError("geometry.global_context must be a list of layer names")
        layers = data["layers"]
        if not isinstance(layers, (list, tuple)) or len(layers) > limits.MAX_GRAPH_NODES:
            raise ValueError("geometry.layers must be a list")
        checked = tuple(_layer(layer, index, big) for index, layer in enumerate(layers))
        total = 1
        for layer in checked:
            total *= math.prod(layer.get("scale", (1, 1)))
            if total > _MAX_UPSAMPLING ** 2:
                raise ValueError(f"geometry.layers upsample by more than {_MAX_UPSAMPLING} per axis in all")
        return cls(**values, global_context=tuple(context), layers=checked)


_FIELDS = {"stride", "window", "offset", "receptive_field", "rf_offset", "local", "global_context", "padded",
           "layers"}
_WINDOW_KEYS = ("kernel", "stride", "pad_before", "pad_after", "dilation")
_SAME_KEYS = ("kernel", "stride", "dilation")  # a "same_pad" layer: the window op's it pads for


def _bounded(data: dict, key: str, lo: int, hi: int, where: str = "geometry") -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{where}.{key} must be an integer from {lo} to {hi}, not {str(value)[:40]}")
    return value


def _flag(data: dict, key: str) -> bool:
    if not isinstance(data.get(key), bool):
        raise ValueError(f"geometry.{key} must be true or false")
    return data[key]


def _layer(layer: Any, index: int, big: int) -> dict:
    """One checked entry of ``Geometry.layers`` (pairs as tuples); inputs must come before it."""
    where = f"geometry.layers[{index}]"
    if not isinstance(layer, dict) or layer.get("op") not in ("input", "window", "same", "same_pad", "upsample"):
        raise ValueError(f"{where} must have an op of input, window, same, same_pad or upsample")
    keys = {"op", "inputs"} | (set(_WINDOW_KEYS) | {"ceil_mode"} if layer["op"] == "window" else
                               set(_SAME_KEYS) if layer["op"] == "same_pad" else
                               {"scale", "mode"} if layer["op"] == "upsample" else set())
    if layer.get("op") == "window" and "ceil_stride" in layer:  # a finer stride's pool (convify.finer)
        keys.add("ceil_stride")
    inputs = layer.get("inputs")
    if set(layer) != keys or not isinstance(inputs, (list, tuple)) or (layer["op"] == "input") != (index == 0) \
            or (index > 0 and not inputs) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                     and 0 <= i < index for i in inputs):
        raise ValueError(f"{where} must name its inputs among the layers before it")
    checked: dict[str, Any] = {"op": layer["op"], "inputs": tuple(inputs)}
    if layer["op"] == "window":
        for key in _WINDOW_KEYS + (("ceil_stride",) if "ceil_stride" in layer else ()):
            pair_ = layer[key]
            lo = 0 if key.startswith("pad") or key == "ceil_stride" else 1
            if not isinstance(pair_, (list, tuple)) or len(pair_) != 2:
                raise ValueError(f"{where}.{key} must be a pair of integers")
            checked[key] = tuple(_bounded({key: v}, key, lo, big, where) for v in pair_)
        if not isinstance(layer["ceil_mode"], bool):
            raise ValueError(f"{where}.ceil_mode must be true or false")
        checked["ceil_mode"] = layer["ceil_mode"]
    if layer["op"] == "same_pad":
        for key in _SAME_KEYS:
            pair_ = layer[key]
            if not isinstance(pair_, (list, tuple)) or len(pair_) != 2:
                raise ValueError(f"{where}.{key} must be a pair of integers")
            checked[key] = tuple(_bounded({key: v}, key, 1, big, where) for v in pair_)
    if layer["op"] == "upsample":
        if not isinstance(layer["scale"], (list, tuple)) or len(layer["scale"]) != 2:
            raise ValueError(f"{where}.scale must be a pair of integers")
        checked["scale"] = tuple(_bounded({"scale": v}, "scale", 1, _MAX_UPSAMPLING, where) for v in layer["scale"])
        if layer["mode"] not in ("nearest", "bilinear"):
            raise ValueError(f"{where}.mode must be nearest or bilinear")
        checked["mode"] = layer["mode"]
    return checked


def _window_out(n: int, k: int, s: int, before: int, after: int, d: int, ceil_mode: bool) -> int:
    """Output length of a window op (PyTorch's rule, ceil_mode included)."""
    span = n + before + after - d * (k - 1) - 1
    out = (math.ceil(span / s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + before:  # the last window must start inside the input
        out -= 1
    return max(out, 0)


# --------------------------------------------------------------------------------------------------
# Reading the geometry off a graph

@dataclass(frozen=True)
class _Span:
    """Cell ``k`` of a layer sees input pixels ``[start + k * jump, end + k * jump]`` along one axis (fractions of a
    pixel after upsampling; the receptive field is then the least whole-pixel span around them)."""

    jump: Fraction
    start: Fraction
    end: Fraction


def analyse_geometry(net: fx.GraphModule, input_size: int, example: torch.Tensor) -> Geometry:
    """Read the geometry of a fully-convolutional graph.

    Args:
        net: the converted graph: ``(N, 3, H, W) -> (N, C, H', W')``, a 1x1 map at ``input_size``.
        input_size: the native input size (the nominal window).
        example: an input at the native size, for shapes.

    Raises:
        ConversionError: a layer changes the map's size in a way convify cannot describe, branches at
            different strides are merged, or the two axes differ.
    """
    layouts = probe_layouts(net, input_size)
    spans: dict[fx.Node, tuple[_Span, _Span]] = {}
    index: dict[fx.Node, int] = {}
    layers: list[dict] = []
    global_context: list[str] = []
    padded = False
    for node in net.graph.nodes:
        layout = layouts.get(node)
        if node.op == "placeholder" and not layers:
            index[node] = 0
            layers.append({"op": "input", "inputs": ()})
            spans[node] = (_Span(1, 0, 0), _Span(1, 0, 0))
            continue
        splits_map = layout is not None and not layout.is_tensor and getattr(op_for(net, node), "pieces", None) is not None \
            and any(n in spans for n in node.all_input_nodes)  # a tuple of maps
        if (layout is None or not layout.spatial) and not splits_map and node.op != "output":
            continue
        mapped = [n for n in node.all_input_nodes if n in spans]
        if node.op == "output":
            spans_out = [spans[n] for n in _flat_nodes(node.args[0]) if n in spans]
            if not spans_out or any(s != spans_out[0] for s in spans_out):
                raise ConversionError("the converted network's outputs do not share one geometry")
            final = spans_out[0]
            index[node] = len(layers)
            layers.append({"op": "same", "inputs": tuple([index[n] for n in _flat_nodes(node.args[0]) if n in index][:1])})
            break
        if not mapped:  # a map-sized value made of no map: a constant, or a summary of the whole image expanded
            if _depends(node, spans):  # (EvoNorm's group std expanded to the map: global context)
                global_context.append(_context_name(net, node, spans))
            continue
        for n in node.all_input_nodes:  # a pooled summary of the whole map, multiplied back in (SE)
            if n not in spans and layouts.get(n) is not None and layouts[n].is_tensor and _depends(n, spans):
                global_context.append(_context_name(net, n, spans))
        name = op_name(net, node)
        if name == "same_pad2d":
            module = net.get_submodule(node.target)
            src_layout = layouts[mapped[0]]
            native = (src_layout.shape[src_layout.hdims[0]], src_layout.shape[src_layout.wdims[0]])
            left, right, top, bottom = module.padding(*native)
            padded = True
            src = spans[mapped[0]]
            spans[node] = (_apply(src[0], 1, 1, top, bottom, 1, 0), _apply(src[1], 1, 1, left, right, 1, 0))
            layers.append({"op": "same_pad", "inputs": (index[mapped[0]],), "kernel": module.kernel_size,
                           "stride": module.stride, "dilation": module.dilation})
            index[node] = len(layers) - 1
            continue
        if name == "upsample":
            (rh, rw), mode = upsampling(net.get_submodule(node.target) if node.op == "call_module" else None,
                                        node.args, node.kwargs, f"'{node.name}'")
            src = spans[mapped[0]]
            spans[node] = (_upsampled(src[0], rh, mode), _upsampled(src[1], rw, mode))
            padded |= mode == "bilinear"  # its edge rows repeat, as a replicate pad would
            layers.append({"op": "upsample", "inputs": (index[mapped[0]],), "scale": (rh, rw), "mode": mode})
            index[node] = len(layers) - 1
            continue
        params = _window_params(net, node, layouts)
        if params is not None and padding_mode(name, net.get_submodule(node.target) if node.op == "call_module"
                                               else None, node.args, node.kwargs) == "circular":
            global_context.append(node.name)  # the far edge wraps around into every edge cell
        if params is not None:
            (h, w) = params
            padded |= any(p[2] or p[3] for p in params) or _hangs_over(layouts, mapped[0], params)
            src = spans[mapped[0]]
            spans[node] = (_apply(src[0], *h), _apply(src[1], *w))
            layers.append({"op": "window", "inputs": (index[mapped[0]],),
                           **{key: (h[i], w[i]) for i, key in enumerate(("kernel", "stride", "pad_before",
                                                                          "pad_after", "dilation"))},
                           "ceil_mode": bool(h[5])})
        else:
            if not splits_map and not _same_size(layouts, node, mapped):
                raise ConversionError(f"'{node.name}' ({name}) changes the map's size in a way convify cannot "
                                      "describe (only convolutions, pools and pads may)")
            op = op_for(net, node)
            source = layouts[mapped[0]]
            if not (op is not None and op.local) and not (name == "layer_norm" and _norm_is_local(net, node, layout)) \
                    and not reduces_per_position(op, node.args, node.kwargs, len(source.shape),
                                                 (source.hdims[0], source.wdims[0])):
                global_context.append(node.name)  # normalises over the map (GroupNorm...) or unknown
            spans[node] = _merge(node, [spans[n] for n in mapped])
            layers.append({"op": "same", "inputs": tuple(index[n] for n in mapped)})
        index[node] = len(layers) - 1
    else:
        raise ConversionError("the converted network has no output")
    (hy, hx) = final
    if hy != hx:
        raise ConversionError(f"the network's geometry differs between height and width ({hy} vs {hx}); "
                              "convify supports square geometry only")
    if hy.jump != int(hy.jump):
        raise ConversionError(f"the network's cells are {hy.jump} px apart, not a whole number of pixels")
    start, end = math.floor(hy.start), math.ceil(hy.end)  # a bound where upsampling made them fractions
    return Geometry(
        stride=int(hy.jump), window=input_size, offset=0, receptive_field=end - start + 1, rf_offset=start,
        local=not global_context, global_context=tuple(dict.fromkeys(global_context)), padded=padded,
        layers=tuple(layers),
    )


def _flat_nodes(value: Any) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (tuple, list)):
        return [n for v in value for n in _flat_nodes(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _flat_nodes(v)]
    return []


def _depends(node: fx.Node, spans: dict) -> bool:
    """Whether ``node`` is computed from the image's values (as opposed to constants, or constants broadcast to the
    map's shape: ``weight.expand_as(x)`` reads only ``x``'s size)."""
    return any(n in spans for n in walk_inputs(node, stop=lambda n: n in spans or is_shape_query(n)))


def _context_name(net: fx.GraphModule, node: fx.Node, spans: dict) -> str:
    """The pool at the start of a global-context branch (the node that reads the map), by module path."""
    for n in walk_inputs(node):
        if any(m in spans for m in n.all_input_nodes):
            return n.target if n.op == "call_module" else n.name
    return node.name


def _hangs_over(layouts: dict[fx.Node, Layout], src: fx.Node, params: tuple) -> bool:
    """Whether a ceil_mode window hangs past its input at the native size (implicit padding)."""
    layout = layouts[src]
    for (k, s, before, after, d, ceil_mode), dim in zip(params, (layout.hdims[0], layout.wdims[0])):
        n = layout.shape[dim]
        out = _window_out(n, k, s, before, after, d, bool(ceil_mode))
        if ceil_mode and out and (out - 1) * s + d * (k - 1) + 1 > n + before + after:
            return True
    return False


def _apply(src: _Span, k: int, s: int, before: int, after: int, d: int, ceil_mode: int) -> _Span:
    return _Span(src.jump * s, src.start - before * src.jump, src.end + (d * (k - 1) - before) * src.jump)


def _upsampled(src: _Span, r: int, mode: str) -> _Span:
    """The span after upsampling by ``r``: output cell ``p`` reads input cell ``floor(p / r)`` (nearest), or
    ``floor((p + 0.5) / r - 0.5)`` and the next (bilinear); bounded by a span linear in ``p`` (``jump / r`` apart),
    up to ``(r - 1) / r`` input cells wider than the cells that reach it."""
    jump = Fraction(src.jump) / r
    if mode == "nearest":
        return _Span(jump, src.start - (r - 1) * jump, src.end)
    return _Span(jump, src.start + (Fraction(1, 2) - Fraction(3, 2) * r) * jump,
                 src.end + (Fraction(1, 2) + Fraction(r, 2)) * jump)


def upsampling(module: Optional[torch.nn.Module], args: tuple, kwargs: dict, where: str) -> tuple[tuple[int, int], str]:
    """``((rh, rw), mode)`` of an upsampling layer or ``F.interpolate`` call that convify can place: a whole scale
    factor per axis, ``"nearest"`` (or ``"nearest-exact"``, the same at whole factors) or ``"bilinear"`` without
    ``align_corners``. Those are translation-equivariant: the image moved by a cell of the input moves the output
    by ``r`` cells.

    Raises:
        ConversionError: naming ``where`` and the reason: a target size (fixed, or another map's: its ratio
            changes with the input's size), a fractional factor, ``align_corners`` or another mode.
    """
    if module is not None:
        size, scale, mode = module.size, module.scale_factor, module.mode
        corners = getattr(module, "align_corners", None)
    else:
        size, scale = argument(args, kwargs, 1, ("size",)), argument(args, kwargs, 2, ("scale_factor",))
        mode, corners = argument(args, kwargs, 3, ("mode",), "nearest"), argument(args, kwargs, 4, ("align_corners",))
    if size is not None:
        raise ConversionError(f"{where} resizes the map to a target size, whose ratio to the map changes with the "
                              "input's size: not translation-equivariant, so no fully-convolutional network equals it "
                              "(upsampling by a fixed scale factor converts)")
    factors = scale if isinstance(scale, (tuple, list)) else (scale, scale)
    if len(factors) != 2 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 1 and f == int(f)
                                    and f <= _MAX_UPSAMPLING for f in factors):
        raise ConversionError(f"{where} resizes the map by {scale}; convify places upsampling by whole factors "
                              f"(1 to {_MAX_UPSAMPLING}) only")
    if mode in ("nearest", "nearest-exact"):
        mode = "nearest"
    elif mode != "bilinear" or corners:
        raise ConversionError(f"{where} upsamples with mode {str(mode)[:20]!r}"
                              f"{' and align_corners' if corners else ''}; convify places nearest and bilinear "
                              "(align_corners=False) upsampling")
    return (int(factors[0]), int(factors[1])), mode


# The largest scale factor of one upsampling, and of all of them together (a geometry from a file is bounded).
_MAX_UPSAMPLING = 64


def _merge(node: fx.Node, spans: list[tuple[_Span, _Span]]) -> tuple[_Span, _Span]:
    merged = []
    for axis in (0, 1):
        jumps = {s[axis].jump for s in spans}
        if len(jumps) > 1:
            raise ConversionError(f"'{node.name}' merges maps at different strides {sorted(jumps)}; "
                                  "convify cannot place its cells")
        merged.append(_Span(jumps.pop(), min(s[axis].start for s in spans), max(s[axis].end for s in spans)))
    return merged[0], merged[1]


def _same_size(layouts: dict[fx.Node, Layout], node: fx.Node, inputs: list[fx.Node]) -> bool:
    """Whether the node's map has the same height and width as its inputs' (in all three probes)."""
    out = layouts[node]
    size = (out.shape[out.hdims[0]], out.shape[out.wdims[0]])
    return all((layouts[n].shape[layouts[n].hdims[0]], layouts[n].shape[layouts[n].wdims[0]]) == size
               for n in inputs if layouts[n].spatial)  # a tuple of maps (chunk) was checked where it was split


def _norm_is_local(net: fx.GraphModule, node: fx.Node, layout: Layout) -> bool:
    """A LayerNorm is local when it normalises only over dimensions that are not the map's."""
    if node.op == "call_module":
        shape = fetch_attr(net, node.target).normalized_shape
    else:
        shape = node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else None)
    count = len(shape) if isinstance(shape, (tuple, list)) else 1
    normalised = set(range(len(layout.shape) - count, len(layout.shape)))
    return not normalised & {layout.hdims[0], layout.wdims[0]}


def _window_params(net: fx.GraphModule, node: fx.Node, layouts: dict[fx.Node, Layout]):
    """Per-axis ``(kernel, stride, pad_before, pad_after, dilation, ceil_mode)`` of a windowed node, else None."""
    name = op_name(net, node)
    module = net.get_submodule(node.target) if node.op == "call_module" else None
    kernel = None
    if name == "conv2d" and module is None:
        weight = node_arg(node, 1, "weight")
        if not (isinstance(weight, fx.Node) and weight in layouts):
            return None
        kernel = tuple(layouts[weight].shape[2:])
    if name == "pad" and layouts[node].wdims[0] != len(layouts[node].shape) - 1:
        return None  # a channels-last map: the pad's last pair is not the width
    return window_of(name, module, node.args, node.kwargs, kernel)


def window_of(name: str, module: Optional[torch.nn.Module], args: tuple, kwargs: dict,
              kernel: Optional[tuple[int, int]] = None):
    """Per-axis ``(kernel, stride, pad_before, pad_after, dilation, ceil_mode)`` of a windowed operation.

    The one place that reads a window off a layer (``module``) or off a call's arguments (``args``,
    ``kwargs``, the map first): the geometry reads graphs with it, streaming (:mod:`convify.stream`) reads
    running steps. ``kernel`` is a functional convolution's ``(kh, kw)`` where its weight argument is not a
    tensor (a graph node); otherwise it is read off the weight.
    Returns None for an operation that is not a window convify can describe (a pad of more than the
    map's two dimensions).
    """
    def arg(position: int, key: str, default: Any = None) -> Any:
        return argument(args, kwargs, position, (key,), default)

    if name == "cond_conv2d":
        k, s, d, p = module.kernel_size, module.stride, module.dilation, module.padding
        return tuple((k[a], s[a], p[a], p[a], d[a], 0) for a in (0, 1))
    if name == "conv2d":
        if module is not None:
            k, s, d, p = module.kernel_size, module.stride, module.dilation, module.padding
        else:
            weight = arg(1, "weight")
            kernel = kernel if kernel is not None else \
                tuple(weight.shape[2:]) if isinstance(weight, torch.Tensor) else None
            if kernel is None:
                return None
            k, s, p, d = kernel, arg(3, "stride", 1), arg(4, "padding", 0), arg(5, "dilation", 1)
        k, s, d = pair(k), pair(s), pair(d)
        if p == "same":
            totals = [d[a] * (k[a] - 1) for a in (0, 1)]
            pads = [(t // 2, t - t // 2) for t in totals]
        else:
            p = (0, 0) if p == "valid" else pair(p)
            pads = [(p[0], p[0]), (p[1], p[1])]
        return tuple((k[a], s[a], pads[a][0], pads[a][1], d[a], 0) for a in (0, 1))
    if name in ("max_pool2d", "avg_pool2d", "finer_pool2d"):
        if module is not None:
            k, s, p = module.kernel_size, module.stride, module.padding
            d = getattr(module, "dilation", 1)
            ceil = getattr(module, "ceil_mode", False)  # FinerPool2d pads its own overhang (ceil_stride)
        else:
            k = arg(1, "kernel_size")
            s = arg(2, "stride") or k
            p = arg(3, "padding", 0)
            d = arg(4, "dilation", 1) if name == "max_pool2d" else 1
            ceil = arg(5 if name == "max_pool2d" else 4, "ceil_mode", False)
        k, s, p, d = pair(k), pair(s or k), pair(p), pair(d)
        return tuple((k[a], s[a], p[a], p[a], d[a], int(bool(ceil))) for a in (0, 1))
    if name == "window_attention_pool2d":
        (kh, kw) = module.window
        return ((kh, 1, 0, 0, 1, 0), (kw, 1, 0, 0, 1, 0))
    if name == "space_to_depth":
        b = module.block_size
        return ((b, b, 0, 0, 1, 0), (b, b, 0, 0, 1, 0))
    if name == "pad":
        pads = tuple(module.padding if module is not None else arg(1, "pad"))
        if len(pads) > 4:
            return None  # pads more than the map's two dimensions
        left, right, top, bottom = pads + (0,) * (4 - len(pads))
        return ((1, 1, top, bottom, 1, 0), (1, 1, left, right, 1, 0))
    return None


def padding_mode(name: str, module: Optional[torch.nn.Module], args: tuple, kwargs: dict) -> str:
    """How a windowed operation pads: ``"zeros"`` (or another constant), ``"reflect"``, ``"replicate"`` or
    ``"circular"`` (which wraps the far edge of the map around: every cell near an edge sees the other)."""
    if module is not None:
        if isinstance(module, torch.nn.ReflectionPad2d):
            return "reflect"
        if isinstance(module, torch.nn.ReplicationPad2d):
            return "replicate"
        return str(getattr(module, "padding_mode", "zeros"))
    if name == "pad":
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        return mode if isinstance(mode, str) else "constant"
    return "zeros"
