"""Converted networks as ONNX files: dynamic batch, height and width, checked with onnxruntime before kept.

:func:`export_onnx` writes ``image (N, 3, H, W) -> scores (N, K, H', W')`` (``scores_0``, ``scores_1``, ...
for heads with several outputs) with the batch, height and width left free, and the network's geometry,
native size, preprocessing and class names in the model's ``metadata_props``. Before the file is kept,
onnxruntime runs it at several sizes (:func:`default_check_sizes`) and must give torch's maps; a file that
fails never appears.

The exporter is torch's ``torch.export``-based one (``torch.onnx.export(..., dynamo=True)``, with onnxscript),
not the TorchScript exporter (``dynamo=False``): that one is deprecated (a DeprecationWarning on every call
since torch 2.9) and records one trace, so shape arithmetic done in Python (a ceil-mode overhang, a phase
count, a head's form chosen by its map size) is frozen at the example's size without a word. ``torch.export``
traces with symbolic sizes, named with :class:`torch.export.Dim`, and refuses code that would fix or
constrain them (a branch on a remainder); what it keeps is size arithmetic carried into the graph.
``torch.export.export`` is called here and its program handed to ``torch.onnx.export``, which would
otherwise retry a refused export with a fixed or tied size of its own choosing (:func:`_traced`).

The graph is walked step by step (:class:`_ExportForm`), convify's layers whose Python depends on the input
size replaced by export forms that give the same maps in sizes torch.export can follow (no branch, ``min``
or slice on a size, no floor division of a negative number: ONNX's integer division truncates):

- :class:`~convify.layers.WindowLinear` picks its form by map size: exported as its ``"conv"`` form, right at
  every size (the check compares it with the form torch picks); :class:`~convify.layers.PointwiseConv2d` as
  the 1x1 convolution it is;
- ceil-mode max and average pools (SqueezeNet, GoogLeNet) and :class:`~convify.layers.FinerPool2d` with a
  ``ceil_stride``: floor-mode pools that pad the overhang (:func:`_overhang_plan`);
- :class:`~convify.layers.PhaseAvgPool2d`: phase counts summed from ones, phases picked by an index.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import itertools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import limits
from .errors import ConversionError, ConvifyError, OutputExistsError
from .layers import (CondConv2d, FinerPool2d, PhaseAvgPool2d, PointwiseConv2d, SamePad2d, SpaceToDepth,
                     WindowAttentionPool2d, WindowLinear)
from .ops import argument
from .outputs import ensure_directory, write_atomic
from .serialize import StoredGraph, graph_steps, run_step, substitute

__all__ = ["export_onnx", "default_check_sizes", "METADATA_KEYS", "MIN_OPSET", "RTOL", "ATOL"]

# torch's ONNX functions are written for opset 18; for older ones it converts, and may leave the model at 18.
MIN_OPSET = 18
# onnxruntime must give torch's maps within rtol, and atol times the largest |score| of torch's map.
RTOL = 1e-4
ATOL = 1e-4
# A protobuf message cannot exceed 2 GiB; larger models would need ONNX external data files.
_MAX_MODEL_BYTES = 2 ** 31 - 2 ** 24
# Every metadata value is a JSON text (json.loads reads each back).
METADATA_KEYS = ("convify_version", "arch", "input_size", "mean", "std", "classes", "geometry", "checked_sizes")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SIZE_REF = re.compile(r"L\['\w+'\]\.size\(\)\[([0-3])\]")  # how torch.export names an input's size
_AXES = {"0": "batch", "1": "channels", "2": "height", "3": "width"}


def export_onnx(fcn: Any, path: Union[str, os.PathLike], *, opset: Optional[int] = None,
                check_sizes: Optional[Sequence[Any]] = None, force: bool = False) -> Path:
    """Write ``fcn`` (a :class:`~convify.fcn.FullyConvNet`) to ``path`` as an ONNX model, checked first.

    The model maps ``image`` ``(N, 3, H, W)`` (normalised RGB, as ``fcn`` takes it) to ``scores``
    ``(N, K, H', W')``, with ``N``, ``H`` and ``W`` dynamic. ``metadata_props`` holds, each as a JSON text
    (:data:`METADATA_KEYS`): ``convify_version``, ``arch`` (null if unknown), ``input_size``, ``mean``,
    ``std``, ``classes`` (a list of strings, or null), ``geometry`` (:meth:`Geometry.to_dict`) and
    ``checked_sizes``. Class names are stored as JSON strings, never as code.

    The model is written to a temporary file beside ``path``, checked, and renamed into place: onnxruntime
    (CPUExecutionProvider) runs it at every size of ``check_sizes`` (default :func:`default_check_sizes`:
    native, larger square, non-square and odd sizes, one with a batch of 2) and its maps must equal
    ``fcn``'s within ``rtol`` :data:`RTOL` and ``atol`` :data:`ATOL` times the largest score.

    Args:
        fcn: the converted network (on any device; exported from a float32 CPU copy).
        path: the ``.onnx`` file to write; its directory is created.
        opset: the ONNX opset (default: torch's, 20 in torch 2.14); at least :data:`MIN_OPSET`.
        check_sizes: square sides, ``(height, width)`` or ``(batch, height, width)`` to check at (each must
            give a map); the native size is checked whatever they say.
        force: overwrite ``path`` if it exists.

    Returns:
        ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False.
        ConvifyError: onnx, onnxruntime or onnxscript is missing (``pip install convify[onnx]``), or an
            argument is out of range.
        ConversionError: the network cannot be exported (the message names the reason) or onnxruntime does
            not give torch's maps (it names the size and the difference); nothing is written then.
        OutputError: the file cannot be written.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; use --force (force=True) to overwrite it")
    onnx, ort = _libraries()
    opset = _checked_opset(opset, onnx)
    net = _cpu_float32(fcn)
    sizes = _checked_sizes(fcn, check_sizes)
    size_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    if size_bytes > _MAX_MODEL_BYTES:
        raise ConversionError(f"the network's weights take {size_bytes / 2 ** 30:.1f} GiB; an ONNX file holds at "
                              "most 2 GiB without external data files, which convify does not write")
    ensure_directory(path.parent)
    model = _exported(fcn, net, opset, onnx)
    _set_metadata(model, fcn, sizes)
    data = model.SerializeToString()

    def write_checked(file: Any) -> None:
        file.write(data)
        file.flush()
        _check(net, data, sizes, ort)  # what was just written; a failure removes the temporary file

    write_atomic(path, write_checked)
    return path


def default_check_sizes(fcn: Any) -> list[tuple[int, int, int]]:
    """The ``(batch, height, width)`` inputs :func:`export_onnx` checks by default, for native size ``n``:
    ``n x n``; ``(n + 64) x (n + 64)``; ``(n + 33) x (n + 71)`` with a batch of 2; ``(n + 17) x (n + 1)``;
    and the smallest input that gives a map, when it is below ``n``. The odd offsets leave every remainder
    a stride or a ceil-mode pool could depend on different from the native size's. A network that runs only at
    the native size plus whole strides (fused upsampled branches, HRNet) is checked at the next such sizes."""
    n, g = fcn.meta.input_size, fcn.geometry
    sizes = [(1, n, n), (1, n + 64, n + 64), (2, n + 33, n + 71), (1, n + 17, n + 1)]
    smallest = g.min_input_size()
    if smallest < n:
        sizes.append((1, smallest, smallest))
    if g.upsamples:  # it runs at the native size plus whole strides (HRNet): the next such sizes
        sizes = list(dict.fromkeys((b, h + (n - h) % g.stride, w + (n - w) % g.stride) for b, h, w in sizes))
    return sizes


# --------------------------------------------------------------------------------------------------
# Checking the arguments


def _libraries() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, with onnxscript (the exporter's) present too."""
    try:
        import onnx
        import onnxruntime

        importlib.import_module("onnxscript")  # torch's exporter needs it
    except ImportError as e:
        raise ConvifyError(f"ONNX export needs onnx, onnxruntime and onnxscript ({e.name} is missing): "
                           "pip install 'convify[onnx]'") from None
    return onnx, onnxruntime


def _checked_opset(opset: Optional[int], onnx: Any) -> Optional[int]:
    if opset is None:
        return None
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise ConvifyError(f"opset must be an integer from {MIN_OPSET} to {newest} (this onnx's newest); "
                           f"got {str(opset)[:20]}")
    return opset


def _checked_sizes(fcn: Any, sizes: Optional[Sequence[Any]]) -> list[tuple[int, int, int]]:
    """``(batch, height, width)`` triples from ``sizes`` (sides, pairs or triples), each giving a map."""
    if sizes is None:
        return default_check_sizes(fcn)
    sizes = list(sizes)
    if len(sizes) > 64:
        raise ConvifyError(f"check_sizes holds {len(sizes)} sizes; give at most 64")
    checked = []
    for size in sizes:
        entry = (size, size) if isinstance(size, int) else tuple(size)
        entry = entry if len(entry) == 3 else (1, *entry)
        if len(entry) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in entry) \
                or max(entry[1:]) > limits.MAX_SIDE or entry[0] > 64:
            raise ConvifyError(f"check sizes are sides, (height, width) or (batch, height, width) of positive "
                               f"integers (sides at most {limits.MAX_SIDE}, batch at most 64); got {str(size)[:40]}")
        if min(fcn.geometry.output_size(*entry[1:])) < 1:
            raise ConvifyError(f"a {entry[1]}x{entry[2]} input gives no map; the smallest input is "
                               f"{fcn.geometry.min_input_size()} px")
        checked.append(entry)
    n = fcn.meta.input_size
    if not any(entry[1:] == (n, n) for entry in checked):  # the 1x1 map, which the export cannot trace
        checked.insert(0, (1, n, n))
    return checked


def _cpu_float32(fcn: Any) -> nn.Module:
    """``fcn`` itself if its weights are float32 on the CPU and it is in eval mode, else such a copy."""
    tensors = list(fcn.parameters()) + list(fcn.buffers())
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors) \
            and not any(m.training for m in fcn.modules()):
        return fcn
    return copy.deepcopy(fcn).to("cpu", torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# Exporting


class _ExportForm(nn.Module):
    """The converted graph, run step by step with the export forms of convify's size-dependent layers.

    Works alike for a ``torch.fx.GraphModule`` from convert and a :class:`~convify.serialize.StoredGraph`
    from a file (whose forward would add a dry run per input size); runs no generated code.
    """

    def __init__(self, net: nn.Module, forms: bool = True) -> None:
        super().__init__()
        self.net = net
        self.forms = forms  # False: every layer's own forward (the float64 reference of the check)
        self._steps, self._output = graph_steps(net)

    def outputs(self) -> int:
        """How many maps the network returns."""
        return len(self._output) if isinstance(self._output, (tuple, list)) else 1

    def forward(self, x: torch.Tensor) -> Any:
        env: list[Any] = [None] * len(self._steps)
        for index, step in enumerate(self._steps):
            if step.kind == "placeholder":
                env[index] = x
                continue
            args, kwargs = substitute(step.args, env), substitute(step.kwargs, env)
            layer = self.net.get_submodule(step.call) if step.kind == "call_module" else None
            if not self.forms:
                env[index] = run_step(self.net, step, args, kwargs)
            elif isinstance(layer, WindowLinear):
                env[index] = layer.compute(*args, form="conv", **kwargs)
            elif isinstance(layer, PointwiseConv2d):
                env[index] = nn.Conv2d.forward(layer, *args, **kwargs)
            elif isinstance(layer, FinerPool2d) and any(layer.ceil_stride):
                env[index] = _finer_pool(layer, *args, **kwargs)
            elif (ceil := _ceil_mode_pool(step, layer, args, kwargs)) is not None:
                env[index] = _finer_pool(ceil, args[0] if args else kwargs["input"])
            elif isinstance(layer, PhaseAvgPool2d):
                env[index] = _phase_avg_pool(layer, *args, **kwargs)
            elif isinstance(layer, SamePad2d):
                env[index] = _same_pad(layer, *args, **kwargs)
            elif isinstance(layer, SpaceToDepth):
                env[index] = _space_to_depth(layer, *args, **kwargs)
            elif isinstance(layer, WindowAttentionPool2d):
                env[index] = _window_attention_pool(layer, *args, **kwargs)
            elif isinstance(layer, CondConv2d):
                env[index] = _cond_conv(layer, *args, **kwargs)
            else:
                env[index] = run_step(self.net, step, args, kwargs)
            for freed in step.frees:
                env[freed] = None
        return substitute(self._output, env)


def _overhang(n: Any, kernel: int, pad: int, dilation: int, stride: int) -> Any:
    """:func:`convify.layers.overhang` for a symbolic size ``n``, without branches or negative divisions.

    With ``span = n + 2 pad - dilation (kernel - 1) - 1`` (at least 0 wherever the pool has a window), the
    ceil-mode window past the last whole one hangs ``t = (-span) mod stride`` rows over, and PyTorch keeps it
    when it starts inside the input or its first padding, that is when ``t < q = dilation (kernel - 1) + 1 -
    pad``; ``[t < q] = (m - 1 + q - t) // m`` for ``m = max(stride, q) + 1`` (the numerator stays in
    ``[0, 2 m)``).
    """
    q = dilation * (kernel - 1) + 1 - pad
    if q <= 0:
        return 0
    span = n + 2 * pad - dilation * (kernel - 1) - 1
    t = (stride - span % stride) % stride
    m = max(stride, q) + 1
    return t * ((m - 1 + q - t) // m)


def _same_total(n: Any, kernel: int, stride: int, dilation: int) -> Any:
    """The total of :func:`convify.layers.same_padding` for a symbolic size ``n``, in terms torch.export can reason
    about: with ``out = (n + stride - 1) // stride`` (``ceil(n / stride)``) and ``span = dilation (kernel - 1) + 1``
    it is ``(out - 1) stride + span - n``, so the window op after it gives ``out`` exactly. Where ``span < stride``
    the total can be negative and is clipped at 0: with ``t = out stride - n`` in ``[0, stride)`` and
    ``c = stride - span``, ``(t - c) [t >= c]`` with ``[t >= c] = (t - c + stride) // stride`` (0 when ``c`` is
    ``stride - 1`` or more).
    """
    out = (n + stride - 1) // stride
    span = dilation * (kernel - 1) + 1
    if span >= stride:
        return (out - 1) * stride + span - n
    t, c = out * stride - n, stride - span
    if c >= stride - 1:  # t < stride: never more than c (a 1x1 window at stride 2 never pads)
        return 0
    return (t - c) * ((t - c + stride) // stride)


def _same_pad(layer: SamePad2d, x: torch.Tensor) -> torch.Tensor:
    """:class:`SamePad2d`'s forward with the padding of :func:`_same_total` (sizes torch.export can follow)."""
    pads = []
    for axis in (1, 0):  # F.pad takes the width's pair first
        total = _same_total(x.shape[2 + axis], layer.kernel_size[axis], layer.stride[axis], layer.dilation[axis])
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=layer.value)


def _cond_conv(layer: CondConv2d, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    """:class:`CondConv2d` as one convolution per expert, their maps mixed by each image's routing weights (the
    same sum: a convolution is linear in its kernel), so the batch is never folded into the groups."""
    kernels = layer.weight.view(layer.num_experts * layer.out_channels, layer.in_channels // layer.groups,
                                *layer.kernel_size)
    if layer.groups == 1:
        maps = F.conv2d(x, kernels, None, layer.stride, layer.padding, layer.dilation)  # (N, E * out, H', W')
    else:  # per expert: a grouped convolution cannot put the experts' kernels in one
        maps = torch.cat([F.conv2d(x, k, None, layer.stride, layer.padding, layer.dilation, layer.groups)
                          for k in kernels.split(layer.out_channels)], 1)
    maps = maps.view(x.shape[0], layer.num_experts, layer.out_channels, maps.shape[-2], maps.shape[-1])
    out = (maps * routing[:, :, None, None, None]).sum(1)
    if layer.bias is not None:
        out = out + torch.matmul(routing, layer.bias)[:, :, None, None]
    return out


def _space_to_depth(layer: SpaceToDepth, x: torch.Tensor) -> torch.Tensor:
    """:class:`SpaceToDepth` as a grouped convolution with one-hot kernels (a window at stride ``block``: it leaves
    partial blocks out with no slice of a size torch.export would have to guard), then its channel order."""
    b, c = layer.block_size, x.shape[1]
    taps = torch.eye(b * b, dtype=x.dtype, device=x.device).reshape(b * b, 1, b, b).repeat(c, 1, 1, 1)
    out = F.conv2d(x, taps, stride=b, groups=c)  # channel c * b * b + t
    order = torch.arange(c * b * b, device=x.device).reshape(c, b * b).t().reshape(-1)  # -> t * c + c'
    return out[:, order]


def _window_attention_pool(layer: WindowAttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """:class:`WindowAttentionPool2d` with each place of the window as a shifted slice of the key and value maps
    (no unfolding into a sequence, no attention kernel: sizes torch.export keeps dynamic, batch 1 included)."""
    (kh, kw), e, heads = layer.window, layer.embed_dim, layer.num_heads
    n, _, h, w = x.shape
    rows, cols, d = h - kh + 1, w - kw + 1, e // heads
    wq, wk, wv = layer.qkv_weight.split(e)
    bq, bk, bv = layer.qkv_bias.split(e)
    pos_k, pos_v = F.linear(layer.pos, wk, bk), F.linear(layer.pos, wv, bv)
    maps_k, maps_v = (F.conv2d(x, wt[:, :, None, None]) for wt in (wk, wv))
    if layer.class_token:  # the same first token for every window: (1, E, 1, 1), broadcast
        first = layer.cls + layer.pos[0]
        q0, k0, v0 = (F.linear(first, wt, bt).reshape(1, e, 1, 1) for wt, bt in ((wq, bq), (wk, bk), (wv, bv)))
    else:
        q0 = F.avg_pool2d(F.conv2d(x, wq[:, :, None, None]), (kh, kw), 1) + F.linear(layer.pos[0], wq, bq)[:, None, None]
        k0 = F.avg_pool2d(maps_k, (kh, kw), 1) + pos_k[0][:, None, None]
        v0 = F.avg_pool2d(maps_v, (kh, kw), 1) + pos_v[0][:, None, None]
    def split(t: torch.Tensor) -> torch.Tensor:  # (N or 1, E, R or 1, C or 1) -> (N or 1, heads, d, R or 1, C or 1)
        return t.reshape(t.shape[0], heads, d, t.shape[2], t.shape[3])

    query = split(q0) * d ** -0.5
    keys, values = [k0], [v0]
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        keys.append(maps_k[:, :, i:i + rows, j:j + cols] + pos_k[t + 1][:, None, None])
        values.append(maps_v[:, :, i:i + rows, j:j + cols] + pos_v[t + 1][:, None, None])
    scores = torch.stack([(query * split(k)).sum(2).expand(n, heads, rows, cols) if t == 0 else (query * split(k)).sum(2)
                          for t, k in enumerate(keys)], 2).softmax(2)
    out = sum(scores[:, :, t, None] * split(v) for t, v in enumerate(values))
    out = out.reshape(n, e, rows, cols)
    return F.conv2d(out, layer.proj_weight[:, :, None, None], layer.proj_bias) if layer.out_features else out


def _ceil_mode_pool(step: Any, layer: Optional[nn.Module], args: tuple, kwargs: dict) -> Optional[FinerPool2d]:
    """A ceil-mode max or average pool (a layer or a call) as the floor-mode :class:`FinerPool2d` that pads its
    overhang (``ceil_stride`` = its stride), or None for any other step.

    torch.export cannot prove the ceil-mode rule (the last window must start inside the input or its first
    padding) for every size, so it refuses a ceil-mode pool (SqueezeNet's, GoogLeNet's) under dynamic sizes;
    the padded floor-mode pool (:func:`_overhang_plan`) has the same windows, the same maps and no branch.
    """
    if layer is not None:
        if type(layer) not in (nn.MaxPool2d, nn.AvgPool2d) or not layer.ceil_mode \
                or getattr(layer, "return_indices", False):
            return None
        mode = "max" if isinstance(layer, nn.MaxPool2d) else "avg"
        kernel, stride, padding = layer.kernel_size, layer.stride, layer.padding
        dilation = layer.dilation if mode == "max" else 1
        count_pad = True if mode == "max" else layer.count_include_pad
        divisor = None if mode == "max" else layer.divisor_override
    elif step.kind == "call_function" and step.call in (F.max_pool2d, F.avg_pool2d):
        mode = "max" if step.call is F.max_pool2d else "avg"
        if not argument(args, kwargs, 5 if mode == "max" else 4, ("ceil_mode",), False) \
                or (mode == "max" and argument(args, kwargs, 6, ("return_indices",), False)):
            return None
        kernel = argument(args, kwargs, 1, ("kernel_size",))
        stride = argument(args, kwargs, 2, ("stride",))
        padding = argument(args, kwargs, 3, ("padding",), 0)
        dilation = argument(args, kwargs, 4, ("dilation",), 1) if mode == "max" else 1
        count_pad = True if mode == "max" else argument(args, kwargs, 5, ("count_include_pad",), True)
        divisor = None if mode == "max" else argument(args, kwargs, 6, ("divisor_override",))
    else:
        return None
    stride = stride or kernel  # None or () in a call: the kernel's size
    return FinerPool2d(mode, kernel, stride, padding, dilation, ceil_stride=stride, count_include_pad=count_pad,
                       divisor_override=divisor)


def _overhang_plan(pool: FinerPool2d, axis: int, n: Any) -> tuple[Any, Any]:
    """``(extra, length)``: what ``pool`` pads after the map along ``axis`` (size ``n``) for its ceil-mode
    overhang, and how many outputs to keep (None: all).

    When the window reaches past its padding by at least the ceil stride ``r`` (``q = dilation (kernel - 1)
    + 1 - pad >= r``: SqueezeNet's and GoogLeNet's pools, the finer networks'), PyTorch always keeps the
    window that hangs over, and the pool pads a plain ``r - 1``: a ceil-mode pool that keeps its stride
    ``r`` (:func:`_ceil_mode_pool`) then has exactly the ceil-mode windows; a finer pool (stride below
    ``r``) has a few more at the end, dropped by keeping the first ``(ceil(span / r) r) // stride + 1``.
    Plain numbers and floor divisions keep the sizes simple enough for torch.export to follow through
    concatenations and later pools. Otherwise (``q < r``), the overhang in :func:`_overhang`'s closed form.
    """
    kernel, pad, dilation, ceil = (pool.kernel_size[axis], pool.padding[axis], pool.dilation[axis],
                                   pool.ceil_stride[axis])
    q = dilation * (kernel - 1) + 1 - pad
    if not ceil or q <= 0:
        return 0, None
    if q < ceil:
        return _overhang(n, kernel, pad, dilation, ceil), None
    stride = pool.stride[axis]
    if stride == ceil:
        return ceil - 1, None
    span = n + 2 * pad - dilation * (kernel - 1) - 1
    return ceil - 1, ((span + ceil - 1) // ceil * ceil) // stride + 1


def _finer_pool(pool: FinerPool2d, x: torch.Tensor) -> torch.Tensor:
    """:class:`FinerPool2d`'s forward with a ``ceil_stride``, its overhang from :func:`_overhang_plan`."""
    (kh, kw), (ph, pw) = pool.kernel_size, pool.padding
    (eh, keep_h), (ew, keep_w) = (_overhang_plan(pool, a, n) for a, n in enumerate(x.shape[2:]))
    if pool.mode == "max":
        padded = F.pad(x, (pw, pw + ew, ph, ph + eh), value=float("-inf"))
        out = F.max_pool2d(padded, pool.kernel_size, pool.stride, 0, pool.dilation)
    else:
        channels = x.shape[1]
        out = F.conv2d(F.pad(x, (pw, pw + ew, ph, ph + eh)), x.new_ones(channels, 1, kh, kw), stride=pool.stride,
                       dilation=pool.dilation, groups=channels)
        if pool.divisor_override:
            out = out / pool.divisor_override
        else:  # the overhang is never counted, the padding as count_include_pad says (the layer's general case)
            counted = F.pad(x.new_ones(1, 1, *x.shape[2:]), (pw, pw, ph, ph), value=float(pool.count_include_pad))
            counted = F.pad(counted, (0, ew, 0, eh))
            out = out / F.conv2d(counted, x.new_ones(1, 1, kh, kw), stride=pool.stride, dilation=pool.dilation)
    for dim, keep in ((2, keep_h), (3, keep_w)):
        if keep is not None:  # an index, not a slice: a slice's end would need proving within the size
            out = out.index_select(dim, torch.arange(keep, device=out.device))
    return out


def _phase_avg_pool(pool: PhaseAvgPool2d, x: torch.Tensor) -> torch.Tensor:
    """:class:`PhaseAvgPool2d`'s forward in sizes torch.export can follow: the phase counts summed from ones
    (no ``min`` with the map's size: a phase past the map's end has a count of 0 and is never read), and each
    position given its phase's mean by an index (``arange(h) % r``), not by repeating and slicing."""
    n, c, h, w = x.shape
    rh, rw = pool.phases
    if rh == rw == 1:
        return F.adaptive_avg_pool2d(x, 1).expand(n, c, h, w).contiguous()
    rows, cols = (h + rh - 1) // rh, (w + rw - 1) // rw
    pads = (0, cols * rw - w, 0, rows * rh - h)
    sums = F.pad(x, pads).reshape(n, c, rows, rh, cols, rw).sum((2, 4))
    counts = F.pad(x.new_ones(1, 1, h, w), pads).reshape(1, 1, rows, rh, cols, rw).sum((2, 4))
    means = sums / counts.clamp(min=1)
    phase_h = torch.arange(h, device=x.device) % rh
    phase_w = torch.arange(w, device=x.device) % rw
    return means.index_select(2, phase_h).index_select(3, phase_w)


def _exported(fcn: Any, net: nn.Module, opset: Optional[int], onnx: Any) -> Any:
    """The ONNX ``ModelProto`` of ``net`` with dynamic batch, height and width."""
    n = fcn.meta.input_size
    form = _ExportForm(net.net).eval() if isinstance(net.net, (fx.GraphModule, StoredGraph)) else net.net
    count = form.outputs() if isinstance(form, _ExportForm) else _count_outputs(net, n)
    names = ["scores"] if count == 1 else [f"scores_{i}" for i in range(count)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notes on their internals are not the user's business
        exported = _traced(form, fcn.geometry, n)
        symbols = _axis_symbols(exported)
        try:
            program = torch.onnx.export(exported, (), None, dynamo=True, verbose=False,
                                        input_names=["image"], output_names=names, opset_version=opset)
            model = program.model_proto
        except Exception as e:  # noqa: BLE001 - onnxscript's dispatcher and passes raise many kinds
            raise ConversionError(f"cannot export to ONNX: {_reason(e)}") from None
    _name_axes(model, symbols)
    found = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and found != opset:
        raise ConversionError(f"cannot export to ONNX opset {opset}: torch's exporter made opset {found}")
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - onnx's ValidationError and protobuf errors
        raise ConversionError(f"the exported ONNX model is invalid: {_reason(e)}") from None
    return model


def _traced(form: nn.Module, geometry: Any, native: int) -> Any:
    """``torch.export`` of ``form`` with a dynamic batch, height and width (an ``ExportedProgram``).

    torch.export runs here, not inside ``torch.onnx.export``, which answers a size it cannot keep dynamic by
    retrying with whatever its error suggests: a fixed size, or one tied to a remainder, which is no longer
    this network. Here a guard on a remainder or a fixed size is refused with the guard as the reason.

    One kind of refinement is taken: a larger smallest size. torch's internals decide memory layouts (the
    convolution backend, contiguity) by whether a map's size is 1, which torch.export cannot leave open,
    so it may trace the general case (every map at least 2) only; the graph has no branch on it, and the
    check always runs the native size (a 1x1 map), by default the smallest input too.
    """
    height, width = _example_size(geometry, native)
    # a batch and sizes no check uses, remainders unlike the native size's, every map at least 2x2
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    smallest = geometry.min_input_size()
    dims = ({0: torch.export.Dim("batch", min=1, max=1 << 16),
             2: torch.export.Dim("height", min=smallest, max=limits.MAX_SIDE),
             3: torch.export.Dim("width", min=smallest, max=limits.MAX_SIDE)},)
    if geometry.upsamples:  # sizes the native one plus whole strides: height = stride * cells + remainder
        stride, rest = geometry.stride, native % geometry.stride
        cells = torch.export.Dim("cells", min=max(1, -(-(smallest - rest) // stride)),
                                 max=(limits.MAX_SIDE - rest) // stride)
        cells_w = torch.export.Dim("cells_w", min=cells.min, max=cells.max)
        dims = ({0: dims[0][0], 2: stride * cells + rest, 3: stride * cells_w + rest},)
    for attempt in range(3):
        try:
            with _size_oblivious():
                exported = torch.export.export(form, (example,), dynamic_shapes=dims, strict=False)
            break
        except Exception as e:  # noqa: BLE001 - torch.export raises many kinds; one line says which
            refined = _raised_minimum(e, dims) if attempt < 2 else None
            if refined is None:
                raise ConversionError(f"cannot export to ONNX: torch.export fails: {_reason(e)}") from None
            dims = refined
    return exported


def _example_size(geometry: Any, native: int) -> tuple[int, int]:
    """Odd sizes above the native one (when the network runs at odd sizes) whose maps are at least 3x2."""
    def first(start: int, cells: int) -> int:
        if geometry.upsamples:
            start += (native - start) % geometry.stride
        for size in range(start, min(start + 8 * geometry.stride, limits.MAX_SIDE) + 1,
                          geometry.stride if geometry.upsamples else 1):
            if geometry.output_size(size)[0] >= cells:
                return size
        return min(start, limits.MAX_SIDE)  # no such size: torch.export will say what fails

    return first(native + 2 * geometry.stride + 13, 3), first(native + geometry.stride + 7, 2)


def _raised_minimum(error: BaseException, dims: tuple) -> Optional[tuple]:
    """The dynamic shapes torch.export's error suggests, if all it suggests is a larger smallest size."""
    message = getattr(error, "msg", None) or str(error)
    if "Suggested fixes" not in message:
        return None
    try:
        refined = torch.export.dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes(message, dims)
    except Exception:  # noqa: BLE001 - a suggestion it cannot parse: no refinement
        return None
    for axis, dim in dims[0].items():
        new = refined[0].get(axis)
        if type(new) is not type(dim) or new.__name__ != dim.__name__ or new.max != dim.max or new.min < dim.min:
            return None  # a fixed size, a size tied to another, or a smaller largest size
    return refined


def _axis_symbols(exported: Any) -> dict[str, str]:
    """torch.export's symbol for the input's batch, height and width (``{"s77": "batch", ...}``), or a refusal
    if it fixed any of them to the example's value."""
    name = exported.graph_signature.user_inputs[0]
    shape = next(node for node in exported.graph.nodes if node.name == name).meta["val"].shape
    axes = (("batch", 0), ("height", 2), ("width", 3))
    fixed = [axis for axis, dim in axes if isinstance(shape[dim], int)]
    if fixed:
        raise ConversionError(f"cannot export to ONNX: torch.export fixed the {' and '.join(fixed)} of the input")
    symbols = {}
    for axis, dim in axes:  # a size of whole strides is an expression of one symbol: 32*s53 + 0 (height_cells)
        expression = str(shape[dim])
        found = set(re.findall(r"\b[A-Za-z_]\w*\b", expression))
        if len(found) == 1:
            symbols[found.pop()] = axis if re.fullmatch(r"[A-Za-z_]\w*", expression) else f"{axis}_cells"
    return symbols


def _name_axes(model: Any, symbols: dict[str, str]) -> None:
    """Name the dynamic sizes in the model's shapes ``batch``, ``height`` and ``width`` (torch.export's ``s77``,
    ``s53``...): the input becomes ``(batch, 3, height, width)``, the output ``(batch, K, ((height - 1)//32), ...)``."""
    if not symbols or not all(re.fullmatch(r"[A-Za-z_]\w*", s) for s in symbols):
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b")
    for value in itertools.chain(model.graph.input, model.graph.output, model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: symbols[m.group(1)], dim.dim_param)


def _count_outputs(net: nn.Module, size: int) -> int:
    """How many maps a network that is no graph convify made returns (it runs once at the native size)."""
    with torch.no_grad():
        outputs = net(torch.zeros(1, 3, size, size))
    return len(outputs) if isinstance(outputs, (tuple, list)) else 1


def _size_oblivious() -> Any:
    """torch.export's documented (experimental) switch against 0/1 specialisation, where this torch has it.

    Without it, torch's internals branch on whether a map's size is 1 (contiguity, broadcasting, reshapes)
    and the export refuses every size whose score map is 1x1, the native size among them. With it, the
    general case is traced; the check at the native size (a 1x1 map) and at the smallest size confirms it.
    """
    try:
        from torch.fx.experimental import _config
    except ImportError:  # pragma: no cover - every torch that has torch.export has it
        return contextlib.nullcontext()
    if not hasattr(_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return _config.patch(backed_size_oblivious=True)


def _reason(error: BaseException) -> str:
    """One line for an exception raised deep inside an exporter: the innermost cause's type and first line
    (and, for a size torch.export cannot keep dynamic, the guard that says why, its sizes named)."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    lines = [ln.strip() for ln in _ANSI.sub("", str(error)).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    detail = next((ln[2:] for ln in lines[1:] if ln.startswith("- ")), None)
    if text.startswith("Constraints violated") and detail:
        detail = _SIZE_REF.sub(lambda m: _AXES[m.group(1)], re.sub(r" = " + _SIZE_REF.pattern, "", detail))
        text = "the input's size cannot stay dynamic: " + detail[:1].lower() + detail[1:]
        return text[:400]
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _set_metadata(model: Any, fcn: Any, sizes: list[tuple[int, int, int]]) -> None:
    """The network's description, every value a JSON text (class names strings in it, never code)."""
    from . import __version__

    meta = fcn.meta
    values = {
        "convify_version": __version__,
        "arch": meta.arch,
        "input_size": meta.input_size,
        "mean": list(meta.mean),
        "std": list(meta.std),
        "classes": None if meta.classes is None else [str(c) for c in meta.classes],
        "geometry": fcn.geometry.to_dict(),
        "checked_sizes": [list(s) for s in sizes],
    }
    del model.metadata_props[:]
    for key in METADATA_KEYS:  # ensure_ascii: any string (even a lone surrogate) is valid UTF-8 JSON
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(values[key], ensure_ascii=True, allow_nan=False)
    model.doc_string = "convify fully-convolutional network: image (N, 3, H, W) normalised RGB -> scores " \
                       "(N, classes, H', W') raw logits; see metadata_props"


# --------------------------------------------------------------------------------------------------
# Checking the file


def _check(net: nn.Module, data: bytes, sizes: list[tuple[int, int, int]], ort: Any) -> None:
    """onnxruntime on the model's bytes against torch at every size, or a ConversionError naming the first
    size that differs and by how much.

    Where the maps differ by more than :data:`RTOL` / :data:`ATOL`, the network is run again in float64 (its
    own forward): a badly scaled network (random weights, often) rounds differently in every float32
    implementation, and onnxruntime then passes if it is as close to the float64 maps as torch's float32 is
    (within 4 times torch's own error, plus ``atol``).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its own errors come back as exceptions, said in our words
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base class
        raise ConversionError(f"onnxruntime cannot load the exported model: {_reason(e)}; not written") from None
    generator = torch.Generator().manual_seed(0)
    exact_net: Optional[nn.Module] = None
    for batch, height, width in sizes:
        where = f"{height}x{width}" + (f" (batch {batch})" if batch > 1 else "")
        x = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = _as_list(net(x))
        try:
            actual = [torch.from_numpy(a) for a in session.run(None, {"image": x.numpy()})]
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"onnxruntime fails on a {where} input: {_reason(e)}; not written") from None
        if len(actual) != len(expected):
            raise ConversionError(f"onnxruntime gives {len(actual)} outputs where torch gives {len(expected)}; "
                                  "not written")
        exact: Optional[list[torch.Tensor]] = None
        for index, (want, got) in enumerate(zip(expected, actual)):
            name = f"output {index} " if len(expected) > 1 else ""
            if got.shape != want.shape:
                raise ConversionError(f"onnxruntime gives {name}of shape {tuple(got.shape)} on a {where} input where "
                                      f"torch gives {tuple(want.shape)}; the export is wrong at this size: not written")
            scale = want.abs().max().item() if want.numel() else 0.0
            try:
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * scale)
                continue
            except AssertionError:
                pass
            if exact is None:  # float64 arbitrates between two float32 roundings
                if exact_net is None:
                    exact_net = _float64(net)
                with torch.no_grad():
                    exact = [t.double() for t in _as_list(exact_net(x.double()))]
            torch_error = (want.double() - exact[index]).abs().max().item()
            ort_error = (got.double() - exact[index]).abs().max().item()
            if ort_error <= 4 * torch_error + ATOL * scale:
                continue
            diff = (got.double() - want.double()).abs().max().item()
            raise ConversionError(f"onnxruntime differs from torch on a {where} input: max |difference| {diff:.3g} "
                                  f"{name}(scores up to {scale:.3g}; from the float64 maps: onnxruntime "
                                  f"{ort_error:.3g}, torch {torch_error:.3g}); the export is wrong at this size: "
                                  "not written")


def _float64(net: nn.Module) -> nn.Module:
    """A float64 copy of ``net`` that runs each layer's own forward (a loaded graph's dry run, whose shadow
    layers stay float32, is left out: it checks memory, not maths)."""
    graph = copy.deepcopy(net.net).double()
    if isinstance(graph, (fx.GraphModule, StoredGraph)):
        return _ExportForm(graph, forms=False).eval()
    return graph.eval()


def _as_list(outputs: Any) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
