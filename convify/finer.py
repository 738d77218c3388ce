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
window that hung over the map's end).

Squeeze-and-excitation (MobileNetV3, EfficientNet): a global average pool whose ``(N, C, 1, 1)`` summary
passes through per-position layers (1x1 convolutions, activations) and multiplies the map back in. After a
removed subsampling with ratio ``r`` (the layer's original input stride over its finer one), the map
interleaves ``r x r`` phases: ``x[:, :, a::r, b::r]`` is the original network on the image shifted by
``(a, b)`` finer strides, and the original pooled each of them over itself alone. Such a pool becomes
:class:`~convify.layers.PhaseAvgPool2d` (``(N, C, H, W) -> (N, C, H, W)``, each position its phase's mean),
the layers after it run per position on that map of summaries, and ``scale * x`` multiplies position
``(i, j)`` by phase ``(i % r, j % r)``'s summary. Pools before the first removed subsampling are unchanged.
The network keeps ``geometry.local`` False: its cells still see the whole image. Refused, with the reason:
other global context (GroupNorm over the map, circular padding, max pools over the map, unknown layers), and
a pool after the cut whose summary goes through anything but per-position layers (a flatten and a
``Linear``, a view) before it meets the map.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from .errors import ConversionError, ConvifyError
from .fcn import FullyConvNet, Rewrite, main_map
from .geometry import Geometry, window_of
from .layers import FinerPool2d, PhaseAvgPool2d, PointwiseConv2d
from .ops import argument, module_op
from .serialize import Ref, StoredGraph, _module_spec, fake_run, graph_from_data, graph_to_data, step_refs, substitute

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
        fcn: a converted network (from :func:`convify.convert` or a file): ``(N, 3, H, W) -> (N, K, H', W')``.
        stride: the new stride in pixels: the network's divided by a power of 2 (16 or 8 for VGG16).

    Returns:
        A new :class:`FullyConvNet` (the original is untouched), ``(N, 3, H, W) -> (N, K, H'', W'')`` with
        ``(H'', W'') = geometry.output_size(H, W)``: cells ``stride`` px apart; every
        ``fcn.geometry.stride // stride``-th cell (from the first) is the original's. Costs :func:`finer_cost`
        times the positions after the first removed subsampling. Squeeze-and-excitation pools after it
        average each phase of the finer map apart (:class:`~convify.layers.PhaseAvgPool2d`); the geometry
        keeps saying that the network has global context.

    Raises:
        ConvifyError: the stride is not the network's divided by a power of 2.
        ConversionError: the network has global context other than squeeze-and-excitation average pools, or
            such a pool after the removed subsampling feeds something that is not per position; a layer
            convify cannot dilate (a pool written as a function call, a ceil-mode pool at the removed
            subsampling); or the check fails.
    """
    _check_stride(fcn, stride)
    g = fcn.geometry
    if stride == g.stride:
        return fcn
    if g.upsamples:
        raise ConversionError("this network upsamples inside its body (as HRNet fuses its branches); convify cannot "
                              f"make such a network finer (use its own stride, {g.stride})")
    if g.size_dependent:
        raise ConversionError("this network pads by the size of the map each layer meets (TensorFlow 'SAME' "
                              "padding), which a finer stride would change; convify cannot make it finer "
                              f"(use its own stride, {g.stride})")
    description, tensors = graph_to_data(fcn.net)
    description = copy.deepcopy(description)
    try:
        steps, _, values, image = fake_run(fcn.net, g.window, g.window)
        # a second size tells the maps (they grow) from the summaries of global pools (they do not)
        grown = values if g.local else fake_run(fcn.net, g.window + g.stride, g.window + 2 * g.stride)[2]
    except Exception as e:  # noqa: BLE001 - the network runs at its native size; anything else is a bug
        raise ConversionError(f"cannot run the network at its native size: {e}") from None
    pools = _context_pools(fcn.net, g, steps, values, grown, image)
    names = [n["name"] for n in description["nodes"] if n["op"] != "output"]
    if names != [s.name for s in steps]:
        raise ConversionError("the network's description and its steps disagree")
    jumps: dict[int, int] = {}
    phased: dict[int, int] = {}  # pool after the first removed subsampling -> its phases per axis
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
        if index in pools:
            jumps[index] = jump
            if jump > stride:
                phased[index] = jump // stride
            continue
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
    _check_summaries(fcn.net, steps, values, grown, phased, stride)
    rewrites += [_phase_pool(fcn.net, steps, index, r, description, tensors) for index, r in phased.items()]
    net = graph_from_data(description, tensors)
    geometry = _finer_geometry(g, stride)
    finer = FullyConvNet(net, geometry, fcn.meta, [*fcn.rewrites, *rewrites], fcn.check)
    _check(fcn, finer)
    return finer


# --------------------------------------------------------------------------------------------------
# Squeeze-and-excitation: global average pools, per phase past the removed subsampling


def _grows(native: Any, grown: Any) -> bool:
    """Whether a step's value is a map: a tensor whose shape follows the input's size."""
    return isinstance(native, torch.Tensor) and isinstance(grown, torch.Tensor) and native.shape != grown.shape


def _is_summary(native: Any, grown: Any) -> bool:
    """Whether a value is an ``(N, C, 1, 1)`` summary at both sizes (what a phase pool's map can stand for)."""
    return not _grows(native, grown) and isinstance(native, torch.Tensor) and native.ndim == 4 \
        and tuple(native.shape[2:]) == (1, 1)


def _layer_name(net: nn.Module, step: Any) -> str:
    """A step as the geometry names it: the layer's path, else the node's name."""
    return step.call if step.kind == "call_module" else step.name


def _op_name(net: nn.Module, step: Any) -> str:
    if step.kind == "call_module":
        return type(net.get_submodule(step.call)).__name__
    return step.op.name if step.op is not None else str(step.call)


def _context_pools(net: nn.Module, g: Geometry, steps: list, values: list, grown: list, image: set) -> set[int]:
    """The steps that give the network global context, all of them squeeze-and-excitation average pools.

    A step that reads a map (a value that grows with the input) and gives a tensor that does not is a summary
    of the whole map; it must average the map to one value per channel (:func:`_averages_map`). A
    :class:`~convify.layers.PhaseAvgPool2d` (a network made finer before) is one too.

    Raises:
        ConversionError: the geometry names other global context, or a summary is not an average.
    """
    if g.local:
        return set()
    pools: set[int] = set()
    explained: set[str] = set()
    other: list[str] = []
    for index, step in enumerate(steps):
        if index not in image or step.kind not in ("call_module", "call_function", "call_method"):
            continue
        if not isinstance(values[index], torch.Tensor):  # a shape read off a map (the geometry may name it)
            explained.update((step.name, _layer_name(net, step)))
            continue
        if step.kind == "call_module" and isinstance(net.get_submodule(step.call), PhaseAvgPool2d):
            pools.add(index)
        elif _grows(values[index], grown[index]) or not any(_grows(values[i], grown[i]) for i in step_refs(step)):
            continue
        elif _averages_map(net, step, values, grown):
            pools.add(index)
        else:
            other.append(_layer_name(net, step))
            continue
        explained.update((step.name, _layer_name(net, step)))  # a function call made a layer has both
    refused = list(dict.fromkeys([*(n for n in g.global_context if n not in explained), *other]))
    if refused:
        raise ConversionError(f"this network has layers that see the whole map ({', '.join(refused[:3])}): "
                              "at a finer stride they would pool over the finer map and change every cell, so "
                              "convify does not refine it (only squeeze-and-excitation average pools are made "
                              "finer, phase by phase)")
    return pools


def _averages_map(net: nn.Module, step: Any, values: list, grown: list) -> bool:
    """Whether a step averages an ``(N, C, H, W)`` map over ``H`` and ``W``: ``nn.AdaptiveAvgPool2d(1)``,
    ``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))`` (``keepdim`` or not: what follows is checked)."""
    source = argument(step.args, step.kwargs, 0, ("input",))
    if not isinstance(source, Ref):
        return False
    native, big = values[source.index], grown[source.index]
    if not (_grows(native, big) and native.ndim == 4 and native.shape[:2] == big.shape[:2]
            and native.shape[2] != big.shape[2] and native.shape[3] != big.shape[3]):
        return False  # a map, channels first: only its last two dimensions follow the input
    if step.kind == "call_module":
        module = net.get_submodule(step.call)
        return type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1), [1, 1])
    name = step.op.name if step.op is not None else None
    if name == "adaptive_avg_pool2d":
        return len(step.args) + len(step.kwargs) == 2 \
            and argument(step.args, step.kwargs, 1, ("output_size",)) in (1, (1, 1), [1, 1])
    if name == "mean":
        dims = argument(step.args, step.kwargs, 1, ("dim",))
        dims = (dims,) if isinstance(dims, int) else dims
        return isinstance(dims, (tuple, list)) and len(dims) == 2 \
            and all(isinstance(d, int) and not isinstance(d, bool) and -4 <= d < 4 for d in dims) \
            and {d % 4 for d in dims} == {2, 3} and step.kwargs.get("dtype") is None and len(step.args) <= 3
    return False


def _per_position(net: nn.Module, step: Any) -> bool:
    """Whether a step computes each position from that position alone, whatever the map's size: a 1x1
    convolution at stride 1, a batch norm, an activation, arithmetic."""
    if step.kind == "call_module":
        module = net.get_submodule(step.call)
        if isinstance(module, nn.Conv2d):
            return tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1) \
                and (isinstance(module.padding, str) or tuple(module.padding) == (0, 0))
        op = module_op(module)
        return op is not None and (op.head == "elementwise" or op.name == "batch_norm2d")
    return step.kind in ("call_function", "call_method") and step.op is not None \
        and step.op.head in ("elementwise", "binary") and step.op.name != "flip"


def _check_summaries(net: nn.Module, steps: list, values: list, grown: list, phased: dict[int, int],
                     stride: int) -> None:
    """The pools past the removed subsampling (``phased``) feed only per-position layers until their summary
    meets a map of their own input's size in a binary operation (``scale * x``).

    Made finer, a pool gives a map of summaries, ``(N, C, H, W)``, where it gave ``(N, C, 1, 1)``: what follows
    it must compute each position alone (each from its own phase's summary) and keep ``(N, C, 1, 1)`` at the
    native size, and the map it meets must have the pool's input's size and phases.

    Raises:
        ConversionError: naming the first layer that breaks this.
    """
    # summary step -> (phases, the pool's input size at both runs, the pool's name)
    origin: dict[int, tuple[int, tuple, str]] = {}

    def refuse(step: Any, pool: str, why: str) -> ConversionError:
        return ConversionError(
            f"'{_layer_name(net, step)}' ({_op_name(net, step)}) {why} the squeeze-and-excitation pool '{pool}'. "
            f"At stride {stride} that pool averages each phase of the finer map apart and gives a map of "
            "summaries, which only per-position layers (1x1 convolutions, activations, arithmetic on "
            "(N, C, 1, 1) summaries) may carry to where it multiplies the map of its own input's size; convify "
            "does not refine this network")

    for index, step in enumerate(steps):
        if index in phased and not _grows(values[index], grown[index]):  # a PhaseAvgPool2d's are maps already
            source = argument(step.args, step.kwargs, 0, ("input",)).index
            size = (tuple(values[source].shape[2:]), tuple(grown[source].shape[2:]))
            origin[index] = (phased[index], size, _layer_name(net, step))
            continue
        reads = [i for i in step_refs(step) if i in origin]
        if not reads:
            continue
        pool = origin[reads[0]][2]
        if len({origin[i][:2] for i in reads}) > 1:
            raise refuse(step, pool, "mixes summaries of maps of other sizes or strides, among them")
        size = origin[reads[0]][1]
        if not _grows(values[index], grown[index]) and not _per_position(net, step):
            raise refuse(step, pool, "follows")
        vector = next((values[i] for i in reads if not _is_summary(values[i], grown[i])), None)
        if vector is not None:
            raise refuse(step, pool, f"reads {tuple(vector.shape)}, not an (N, C, 1, 1) summary, from")
        if _grows(values[index], grown[index]):  # where the summary meets the map: scale * x
            maps = [i for i in step_refs(step) if _grows(values[i], grown[i])]
            if not (step.kind in ("call_function", "call_method") and step.op is not None
                    and step.op.head == "binary"
                    and all(values[i].ndim == 4 and (tuple(values[i].shape[2:]), tuple(grown[i].shape[2:])) == size
                            for i in maps)):
                raise refuse(step, pool, "is not an elementwise product (or sum) with a map of the size of the "
                                         "input of")
            continue
        if not _is_summary(values[index], grown[index]):
            value = values[index]
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise refuse(step, pool, f"gives {shape}, not an (N, C, 1, 1) summary, after")
        origin[index] = origin[reads[0]]


def _phase_pool(net: nn.Module, steps: list, index: int, r: int, description: dict, tensors: dict) -> Rewrite:
    """Make the pool ``steps[index]`` a :class:`~convify.layers.PhaseAvgPool2d` of ``r x r`` phases in
    ``description`` (a function call becomes a layer at a new path); what convify says it changed."""
    step = steps[index]
    module = net.get_submodule(step.call) if step.kind == "call_module" else None
    if isinstance(module, PhaseAvgPool2d):  # made finer before: phases within phases
        phases = (module.phases[0] * r, module.phases[1] * r)
        if max(phases) > PhaseAvgPool2d.MAX_PHASES:
            raise ConversionError(f"'{step.call}' would average {phases[0]}x{phases[1]} phases; convify allows "
                                  f"{PhaseAvgPool2d.MAX_PHASES} per axis")
        description["modules"][step.call] = _module_spec(PhaseAvgPool2d(phases), step.call)
        return Rewrite(step.call, f"the mean of each of {module.phases[0]}x{module.phases[1]} phases",
                       f"the mean of each of {phases[0]}x{phases[1]} phases")
    after = f"PhaseAvgPool2d: the mean of each of {r}x{r} phases"
    if module is not None:
        description["modules"][step.call] = _module_spec(PhaseAvgPool2d(r), step.call)
        return Rewrite(step.call, f"{type(module).__name__}: the mean of the map", after)
    path = _free_path(description, tensors, step.name)
    description["modules"][path] = _module_spec(PhaseAvgPool2d(r), path)
    source = argument(step.args, step.kwargs, 0, ("input",))
    node = next(n for n in description["nodes"] if n["name"] == step.name)
    node.update(op="call_module", target=path, args={"tuple": [{"node": steps[source.index].name}]},
                kwargs={"dict": []})
    return Rewrite(path, f"{step.op.name if step.op is not None else step.call}: the mean of the map", after)


def _free_path(description: dict, tensors: dict, name: str) -> str:
    """A layer path for a function call made a layer: its node's name where no layer, tensor or attribute of
    the loaded network has it, else ``phase_pool_<k>``."""
    taken = {path.split(".")[0] for path in [*description["modules"], *tensors]}
    reserved = set(dir(StoredGraph)) | {"description", "training"}
    for candidate in [name, *(f"phase_pool_{k}" for k in range(len(taken) + 2))]:
        if len(candidate) <= 100 and not candidate.startswith("_") and candidate not in taken \
                and candidate not in reserved:
            return candidate
    raise AssertionError("unreachable: more candidates than taken names")


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
    a, b = main_map(a), main_map(b)
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
