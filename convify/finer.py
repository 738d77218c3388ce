"""Finer output strides, exactly: the last subsampling removed and every layer after it dilated (a trous).

A converted VGG16 gives one cell every 32 px. For one every 16 px, the last layer that subsamples (VGG16's
``pool5``, ResNet-50's ``layer4.0`` convolutions) runs at stride 1, and every windowed layer after it
(convolutions, pools, pads, the KxK head) is dilated by 2, its padding doubled: it reads the same inputs as
before, now spread two positions apart. The map then holds the stride-32 map at its even positions, and
between them the same classifier at windows shifted by 16 px (Holschneider's a trous algorithm, as in
DeepLab and OverFeat's dense evaluation). Stride 8 removes the last two subsamplings, and so on.

The cost is said up front (:func:`finer_cost`): every layer after the first removed subsampling computes
``(32 / stride) ** 2`` times the positions (4x for stride 16, 16x for stride 8).

Exactness: :func:`finer_stride` runs the finer network and checks that its cells at every
``(stride_old / stride)``-th position equal the original map, and that its map size is what the geometry
says. Average pools after the removed stride, and a ceil-mode pool whose subsampling is removed, become
:class:`~convify.layers.FinerPool2d` (PyTorch's average pool has no dilation; the ceil-mode pool keeps the
window that hung over the map's end). Networks with global context (squeeze-and-excitation) are refused:
their pools would average over the finer map and change every cell.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from .errors import ConversionError, ConvifyError
from .fcn import FullyConvNet, Rewrite
from .geometry import Geometry, window_of
from .layers import FinerPool2d, PointwiseConv2d
from .serialize import _module_spec, fake_run, graph_from_data, graph_to_data, step_refs, substitute

__all__ = ["finer_stride", "finer_cost"]


def finer_cost(fcn: FullyConvNet, stride: int) -> int:
    """How many times the positions every layer after the first removed subsampling computes at ``stride``."""
    _check_stride(fcn, stride)
    return (fcn.geometry.stride // stride) ** 2


def _check_stride(fcn: FullyConvNet, stride: int) -> None:
    coarse = fcn.geometry.stride
    if not isinstance(stride, int) or stride < 1 or coarse % stride or (coarse // stride) & (coarse // stride - 1):
        raise ConvifyError(f"the stride must be this network's stride ({coarse}) divided by a power of 2 "
                           f"({', '.join(str(coarse >> i) for i in range(coarse.bit_length()) if coarse >> i)}); "
                           f"got {stride}")


def _axis(jump: int, k: int, s: int, before: int, after: int, d: int, ceil: int, target: int,
          where: str) -> tuple[int, int, int, int, int, int]:
    """One axis of one windowed layer at the finer stride:
    ``(kernel, stride, pad_before, pad_after, dilation, ceil_stride)``.

    ``jump``: the layer's input stride in the original network (pixels between its input positions).
    ``ceil_stride``: the ceil-mode subsampling the layer keeps the overhanging window of (0: none).
    """
    fine_in = min(jump, target)
    fine_out = min(jump * s, target)
    if jump % fine_in or fine_out % fine_in:
        raise ConversionError(f"'{where}' subsamples by {s} at stride {jump}; convify cannot make the stride "
                              f"{target} from it")
    m, s2 = jump // fine_in, fine_out // fine_in
    if ceil and s2 != s and m > 1:
        raise ConversionError(f"'{where}' is a ceil-mode pool past the first subsampling the stride {target} "
                              "removes; convify cannot place its overhanging window on the finer map")
    return (k, s2, before * m, after * m, d * m if k > 1 else d,  # a 1-tap window has no spread to dilate
            s if ceil and s2 != s else 0)


def finer_stride(fcn: FullyConvNet, stride: int) -> FullyConvNet:
    """The network with a finer output stride: its subsamplings past ``stride`` removed, what follows dilated.

    Args:
        fcn: a converted network (from :func:`convify.convert` or a file).
        stride: the new stride in pixels: the network's divided by a power of 2 (16 or 8 for VGG16).

    Returns:
        A new :class:`FullyConvNet` (the original is untouched) whose map has cells ``stride`` px apart; every
        ``fcn.geometry.stride // stride``-th cell (from the first) is the original's. Costs
        :func:`finer_cost` times the positions after the first removed subsampling.

    Raises:
        ConvifyError: the stride is not the network's divided by a power of 2.
        ConversionError: the network has global context, a layer convify cannot dilate (a pool written as a
            function call, a ceil-mode pool at the removed subsampling), or the check fails.
    """
    _check_stride(fcn, stride)
    g = fcn.geometry
    if stride == g.stride:
        return fcn
    if not g.local:
        raise ConversionError(f"this network has layers that see the whole map ({', '.join(g.global_context[:3])}): "
                              "at a finer stride they would pool over the finer map and change every cell, so "
                              "convify does not refine it")
    description, tensors = graph_to_data(fcn.net)
    description = copy.deepcopy(description)
    try:
        steps, _, values, image = fake_run(fcn.net, g.window, g.window)
    except Exception as e:  # noqa: BLE001 - the network runs at its native size; anything else is a bug
        raise ConversionError(f"cannot run the network at its native size: {e}") from None
    names = [n["name"] for n in description["nodes"] if n["op"] != "output"]
    if names != [s.name for s in steps]:
        raise ConversionError("the network's description and its steps disagree")
    jumps: dict[int, int] = {}
    rewrites: list[Rewrite] = []
    for index, step in enumerate(steps):
        if index not in image:
            continue
        if step.kind == "placeholder":
            jumps[index] = 1
            continue
        sources = {jumps[i] for i in step_refs(step) if i in jumps}
        if len(sources) != 1:
            raise ConversionError(f"'{step.name}' merges maps at different strides {sorted(sources)}")
        jump = sources.pop()
        params = _window(fcn.net, step, values)
        if params is None:
            jumps[index] = jump
            continue
        new = tuple(_axis(jump, *axis, target=stride, where=step.name) for axis in params)
        jumps[index] = jump * params[0][1]
        if all(n[:5] == p[:5] and not n[5] for n, p in zip(new, params)):
            continue
        if step.kind != "call_module":
            raise ConversionError(f"'{step.name}' is a windowed function call; a finer stride needs it as a layer "
                                  "(convify dilates layers only)")
        module = fcn.net.get_submodule(step.call)
        changed = _dilated(module, new, step.call)
        description["modules"][step.call] = _module_spec(changed, step.call)
        rewrites.append(Rewrite(step.call, _brief(params), _brief(new)))
    net = graph_from_data(description, tensors)
    geometry = _finer_geometry(g, stride)
    finer = FullyConvNet(net, geometry, fcn.meta, [*fcn.rewrites, *rewrites], fcn.check)
    _check(fcn, finer)
    return finer


def _window(net: nn.Module, step: Any, values: list) -> Optional[tuple]:
    """Per-axis window of a step (see :func:`convify.geometry.window_of`), or None for other steps."""
    from .ops import module_op

    module = net.get_submodule(step.call) if step.kind == "call_module" else None
    op = module_op(module) if module is not None else step.op
    if op is None or not op.window:
        return None
    params = window_of(op.name, module, substitute(step.args, values), substitute(step.kwargs, values))
    if params is None:
        raise ConversionError(f"'{step.name}' ({op.name}) is a window convify cannot describe")
    return params


def _brief(params: tuple) -> str:
    (k, s, pb, _, d, *_), (kw, _, pw, _, dw, *_) = params[0], params[1]
    return f"kernel {k}x{kw}, stride {s}, padding {pb}x{pw}, dilation {d}x{dw}"


def _dilated(module: nn.Module, new: tuple, path: str) -> nn.Module:
    """A copy of a windowed layer with the finer stride's per-axis ``(kernel, stride, before, after, dilation)``."""
    (_, sh, ph, ah, dh, ch), (_, sw, pw, aw, dw, cw) = new  # height, width
    if isinstance(module, PointwiseConv2d):
        raise ConversionError(f"'{path}' is a 1x1 layer that subsamples; convify cannot make it finer")
    changed = copy.copy(module)  # shares the weights; the attributes set below are its own
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)):
        changed.padding = (pw, aw, ph, ah)
        return changed
    if ph != ah or pw != aw:
        raise ConversionError(f"'{path}' pads unevenly; convify cannot dilate it")
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str) and module.padding == "same" and \
                any((d * (k - 1)) % 2 for k, d in zip(module.kernel_size, module.dilation)):
            raise ConversionError(f"'{path}' pads 'same' around an even kernel; convify cannot dilate it")
        changed.stride, changed.dilation = (sh, sw), (dh, dw)
        if not isinstance(module.padding, str):
            changed.padding = (ph, pw)
        changed._reversed_padding_repeated_twice = [pw, pw, ph, ph]
        return changed
    if isinstance(module, nn.MaxPool2d) and not (ch or cw) and (dh, dw) == (1, 1):
        changed.stride, changed.padding, changed.dilation, changed.ceil_mode = (sh, sw), (ph, pw), (dh, dw), False
        return changed
    if isinstance(module, nn.AvgPool2d) and not (ch or cw) and (dh, dw) == (1, 1):
        changed.stride, changed.padding, changed.ceil_mode = (sh, sw), (ph, pw), False
        return changed
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, FinerPool2d)):  # dilated, or keeping an overhang
        mode = module.mode if isinstance(module, FinerPool2d) else "max" if isinstance(module, nn.MaxPool2d) else "avg"
        if isinstance(module, nn.MaxPool2d) and getattr(module, "return_indices", False):
            raise ConversionError(f"'{path}' returns indices; convify cannot dilate it")
        return FinerPool2d(mode, module.kernel_size, (sh, sw), (ph, pw), (dh, dw), (ch, cw),
                           getattr(module, "count_include_pad", True), getattr(module, "divisor_override", None))
    raise ConversionError(f"'{path}' ({type(module).__name__}) is a window convify cannot dilate")


def _finer_geometry(g: Geometry, stride: int) -> Geometry:
    """The geometry of the finer network: the same rule applied to ``g.layers``; windows and fields unchanged."""
    jumps: list[int] = []
    layers = []
    for index, layer in enumerate(g.layers):
        if layer["op"] == "input":
            jumps.append(1)
            layers.append(layer)
            continue
        jump = max(jumps[i] for i in layer["inputs"])
        if layer["op"] != "window":
            jumps.append(jump)
            layers.append(layer)
            continue
        axes = [tuple(layer[key][a] for key in ("kernel", "stride", "pad_before", "pad_after", "dilation"))
                + (int(layer["ceil_mode"]),) for a in (0, 1)]
        new = [_axis(jump, *axis, target=stride, where=f"geometry layer {index}") for axis in axes]
        jumps.append(jump * layer["stride"][0])
        keys = ("kernel", "stride", "pad_before", "pad_after", "dilation", "ceil_stride")
        changed = {**layer, **{key: (new[0][i], new[1][i]) for i, key in enumerate(keys)}}
        if new[0][5] or new[1][5]:
            changed["ceil_mode"] = False  # the layer pads its overhang itself (FinerPool2d)
        elif "ceil_stride" not in layer:
            del changed["ceil_stride"]
        layers.append(changed)
    return Geometry(stride=stride, window=g.window, offset=g.offset, receptive_field=g.receptive_field,
                    rf_offset=g.rf_offset, local=g.local, global_context=g.global_context, padded=g.padded,
                    layers=tuple(layers))


def _check(coarse: FullyConvNet, finer: FullyConvNet) -> None:
    """Every ``r``-th cell of the finer map equals the original map, and the map sizes follow the geometry."""
    g, r = coarse.geometry, coarse.geometry.stride // finer.geometry.stride
    size = g.window + 2 * g.stride
    x = torch.randn(1, 3, size, size + g.stride // 2 + 1, generator=torch.Generator().manual_seed(0))
    param = next(iter(coarse.parameters()), None)
    if param is not None:
        x = x.to(param.device, param.dtype)
    with torch.inference_mode():
        a = coarse(x)
        try:
            b = finer(x)
        except Exception as e:  # noqa: BLE001 - a layer refusing its new arguments; say which
            raise ConversionError(f"the stride-{finer.geometry.stride} network fails: {str(e).splitlines()[0][:200]}"
                                  ) from None
    a = a[0] if isinstance(a, (tuple, list)) else a
    b = b[0] if isinstance(b, (tuple, list)) else b
    if tuple(b.shape[2:]) != finer.geometry.output_size(*x.shape[2:]):
        raise ConversionError(f"the stride-{finer.geometry.stride} map is {tuple(b.shape[2:])} on a "
                              f"{x.shape[3]}x{x.shape[2]} input; its geometry says "
                              f"{finer.geometry.output_size(*x.shape[2:])}")
    try:
        torch.testing.assert_close(b[:, :, ::r, ::r], a, rtol=1e-4, atol=1e-4 * max(1.0, float(a.abs().max())))
    except AssertionError as e:
        raise ConversionError(f"the stride-{finer.geometry.stride} map differs from the original's at the "
                              f"original cells: {str(e).splitlines()[2] if len(str(e).splitlines()) > 2 else e}"
                              ) from None
