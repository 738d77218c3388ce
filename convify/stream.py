"""Row streaming: a converted network run on a tall image a strip of rows at a time, no row computed twice.

Crops (:mod:`convify.tiling`) recompute the context around every crop: with VGG16's 404 px receptive field
and the crops a 2 GB budget allows, that is a third to a half more work. Streaming recomputes nothing.
The image enters as strips of rows, top to bottom; every layer computes the rows of its output that the
rows it has seen allow, and keeps only the rows its consumers will need again (a 3x3 convolution keeps
two). Memory follows the strip's width and height, not the image's height, and the map's rows come out
in order, *equal* to the whole-image pass.

Each windowed layer (convolution, pool, pad) is called unchanged on a slice of its input that starts on
its stride grid, so its own padding, dilation and ``ceil_mode`` stay in force at the image's true top and
bottom edges; the few output rows a slice computes next to a cut (where the layer pads what is really
image) are dropped. Layers that act per position (activations, batch norm, sums of branches, channel
concatenation and splits) run on the rows all their inputs have.

A graph streams when every step is one of those (:func:`compile_stream` says which step is not):
reshapes, permutes, shape queries and operations along the map's height do not, and tiling falls back
to crops for them. Networks with global context never reach here (their cells see the whole image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .geometry import padding_mode, window_of
from .ops import argument
from .serialize import Ref, StoredGraph, fake_run, graph_steps, run_step, step_refs
from .serialize import substitute as _substitute

__all__ = ["Program", "compile_stream", "stream_rows", "NotStreamable"]

# Local operations that move or mix the map's dimensions, or act along one: they do not stream.
_NOT_PER_ROW = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze", "permute", "transpose", "narrow",
                          "expand", "stack", "flip", "linear"})
_IN_PLACE_FUNCTIONS = frozenset({"iadd", "imul"})


class NotStreamable(Exception):
    """A graph holds a step that cannot run a strip of rows at a time (the message names it)."""


@dataclass
class _Node:
    """One step of a streamed graph.

    kind: ``"input"``, ``"const"`` (computed once, from no image rows), ``"window"`` (a window along
    the rows: ``(kernel, stride, pad_before, pad_after, dilation, mirrors)``, ``mirrors`` when its padding
    copies rows of the map: reflect or replicate) or ``"rows"`` (row ``r`` from rows ``r`` of its inputs).
    ``height``: rows of its full output. ``sources``: the steps whose rows it reads.
    """

    index: int
    step: Any
    kind: str
    height: int = 0
    sources: tuple[int, ...] = ()
    window: Optional[tuple[int, int, int, int, int, bool]] = None
    consumers: list[int] = field(default_factory=list)


@dataclass
class Program:
    """A converted network compiled for streaming an input ``height`` rows tall and ``width`` wide."""

    net: nn.Module
    nodes: list[_Node]
    output: int  # the node whose rows are the (first) score map
    height: int
    width: int
    last_reader: dict[int, int]  # node -> the last node (in order) that reads it
    consts: tuple[int, ...]  # the constant steps streamed steps read, computed once per run

    @property
    def map_height(self) -> int:
        return self.nodes[self.output].height


def _is_image(value: Any, image: set[int]) -> bool:
    if isinstance(value, Ref):
        return value.index in image
    if isinstance(value, (tuple, list)):
        return any(_is_image(v, image) for v in value)
    if isinstance(value, dict):
        return any(_is_image(v, image) for v in value.values())
    if isinstance(value, slice):
        return any(_is_image(v, image) for v in (value.start, value.stop, value.step))
    return False


def _maps(value: Any) -> list[torch.Tensor]:
    """The tensors of a step's value (a map, or the tuple a split returns)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _maps(v)]
    return []


def _op_of(net: nn.Module, step: Any) -> Any:
    from .ops import module_op

    return module_op(net.get_submodule(step.call)) if step.kind == "call_module" else step.op


def compile_stream(net: nn.Module, height: int, width: int) -> Program:
    """Check that ``net`` streams and plan it for a ``(1, 3, height, width)`` input.

    Shapes come from one pass on fake tensors (:func:`~convify.serialize.fake_run`); a :class:`StoredGraph`
    also gets the dry run it would get before a whole pass of that size.

    Raises:
        NotStreamable: naming the first step that cannot stream, and why.
    """
    steps, output = graph_steps(net)
    if isinstance(net, StoredGraph):
        param = next(iter(net.parameters()), None)
        net.check_input(torch.empty(1, 3, height, width, device="meta",
                                    dtype=param.dtype if param is not None else torch.float32))
    first = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(first, Ref):
        raise NotStreamable("the network's output is not a step's value")
    needed = _needed(steps, first.index)
    try:
        steps, _, env, image = fake_run(net, height, width, needed)
    except Exception as e:  # noqa: BLE001 - a whole pass would fail the same way, with its own error
        text = str(e).strip().splitlines()
        raise NotStreamable(f"the network fails on a {width}x{height} input: "
                            f"{text[0][:160] if text else type(e).__name__}") from None
    nodes: list[_Node] = []
    for index, step in enumerate(steps):
        if step.kind == "placeholder" and index in image:
            nodes.append(_Node(index, step, "input", height))
        elif index not in image or index not in needed:
            nodes.append(_Node(index, step, "const"))
        else:
            nodes.append(_classify(net, index, step, _substitute(step.args, env), _substitute(step.kwargs, env),
                                   env[index], env, image))
    for node in nodes:
        for source in node.sources:
            nodes[source].consumers.append(node.index)
    last_reader = {source: node.index for node in nodes for source in node.sources}
    _check_in_place(nodes, net)
    consts: set[int] = set()
    todo = [i for n in nodes if n.kind in ("window", "rows") for i in step_refs(n.step)]
    while todo:
        i = todo.pop()
        if nodes[i].kind == "const" and i not in consts:
            consts.add(i)
            todo.extend(step_refs(nodes[i].step))
    return Program(net, nodes, first.index, height, width, last_reader, tuple(sorted(consts)))


def _needed(steps: list, output: int) -> set[int]:
    """The steps the first output depends on."""
    needed, todo = set(), [output]
    while todo:
        index = todo.pop()
        if index not in needed:
            needed.add(index)
            todo.extend(step_refs(steps[index]))
    return needed


def _height_of(value: Any, name: str) -> int:
    maps = _maps(value)
    if not maps or any(t.ndim != 4 for t in maps) or len({t.shape[2] for t in maps}) > 1:
        raise NotStreamable(f"step '{name}' does not give (N, C, H, W) maps")
    return int(maps[0].shape[2])


def _classify(net: nn.Module, index: int, step: Any, args: tuple, kwargs: dict, value: Any, env: list,
              image: set[int]) -> _Node:
    """How one step that reads the image streams (see :class:`_Node`); ``image``: the steps that do."""
    name = step.name
    op = _op_of(net, step)
    if op is None:
        raise NotStreamable(f"step '{name}' is not an operation convify knows")
    refs = step_refs(step)
    sources = tuple(dict.fromkeys(i for i in refs if i in image))
    height = _height_of(value, name)
    if op.window:
        module = net.get_submodule(step.call) if step.kind == "call_module" else None
        first = step.args[0] if step.args else None
        if not isinstance(first, Ref) or _is_image((step.args[1:], step.kwargs), image):
            raise NotStreamable(f"step '{name}' ({op.name}) reads the image through more than its first argument")
        params = window_of(op.name, module, args, kwargs)
        if params is None:
            raise NotStreamable(f"step '{name}' ({op.name}) is not a window convify can describe")
        k, s, before, after, d, ceil = params[0]
        if before < 0 or after < 0:
            raise NotStreamable(f"step '{name}' crops the map")
        source_height = _height_of(env[first.index], name)
        expected = _out_rows(source_height, k, s, before, after, d, bool(ceil))
        if expected != height:
            raise NotStreamable(f"step '{name}' gives {height} rows where its window gives {expected}")
        if any(getattr(module, "ceil_stride", (0, 0))):
            raise NotStreamable(f"step '{name}' keeps a ceil-mode overhang that depends on the map's length")
        mode = padding_mode(op.name, module, args, kwargs)
        if mode == "circular":
            raise NotStreamable(f"step '{name}' pads circularly (the bottom row next to the top)")
        return _Node(index, step, "window", height, (first.index,),
                     (k, s, before, after, d, mode in ("reflect", "replicate")))
    if not op.local or op.name in _NOT_PER_ROW or op.shape_query:
        raise NotStreamable(f"step '{name}' ({op.name}) does not act row by row")
    if op.name == "getitem":
        subject, item = args[0], args[1] if len(args) > 1 else None
        if isinstance(subject, torch.Tensor) and not _channel_index(item):
            raise NotStreamable(f"step '{name}' indexes a map along more than its channels")
    if op.dim is not None and op.name not in ("getitem",):
        position, default = op.dim
        dim = argument(args, kwargs, position, ("dim",), default)
        if dim not in (1, -3):
            raise NotStreamable(f"step '{name}' ({op.name}) acts along dimension {dim}, not the channels")
    if op.name == "batch_norm" and argument(args, kwargs, 5, ("training",), False):
        raise NotStreamable(f"step '{name}' normalises with batch statistics")
    if step.kind == "call_module" and net.get_submodule(step.call).training and op.name.startswith("batch_norm"):
        raise NotStreamable(f"step '{name}' normalises with batch statistics")
    for i in sources:
        if _height_of(env[i], name) != height:
            raise NotStreamable(f"step '{name}' ({op.name}) merges maps of different heights")
    for constant in _maps([env[i] for i in refs if i not in image]):
        if constant.ndim >= 2 and constant.shape[-2] != 1:
            raise NotStreamable(f"step '{name}' ({op.name}) reads a constant that varies along the rows")
    return _Node(index, step, "rows", height, sources)


def _channel_index(item: Any) -> bool:
    """``x[:, a:b]``-style indexing: a full slice over the batch, at most a slice over channels."""
    item = item if isinstance(item, tuple) else (item,)
    return (0 < len(item) <= 2 and item[0] == slice(None)
            and (len(item) == 1 or isinstance(item[1], slice)))


def _check_in_place(nodes: list[_Node], net: nn.Module) -> None:
    """An in-place step writes into rows its input keeps for later steps: only allowed on a value it alone reads."""
    for node in nodes:
        if node.kind != "rows":
            continue
        step = node.step
        in_place = (step.kind == "call_method" and str(step.call).endswith("_")) or \
            (step.kind == "call_function" and getattr(step.call, "__name__", "") in _IN_PLACE_FUNCTIONS) or \
            (step.kind == "call_module" and getattr(net.get_submodule(step.call), "inplace", False)) or \
            step.kwargs.get("inplace") is True
        if in_place and node.sources and len(nodes[node.sources[0]].consumers) > 1:
            raise NotStreamable(f"step '{step.name}' writes in place into a map other steps read")


def _out_rows(n: int, k: int, s: int, before: int, after: int, d: int, ceil_mode: bool) -> int:
    span = n + before + after - d * (k - 1) - 1
    out = (math.ceil(span / s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + before:
        out -= 1
    return max(out, 0)


def _rows(value: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` (dimension 2) of a map or of each map of a tuple."""
    if isinstance(value, torch.Tensor):
        return value[:, :, start:stop]
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, start, stop) for v in value)
    return value


def _join(kept: Any, new: Any) -> Any:
    if kept is None:
        return new
    if isinstance(new, torch.Tensor):
        return torch.cat([kept, new], dim=2)
    return type(new)(_join(k, n) for k, n in zip(kept, new))


def _copy_rows(value: Any, start: int) -> Any:
    """Rows from ``start`` on, copied (so the rest of the storage can be freed)."""
    if isinstance(value, torch.Tensor):
        return value[:, :, start:].clone()
    return type(value)(_copy_rows(v, start) for v in value)


class _State:
    """A node's rows held: ``value`` holds rows ``[lo, hi)`` of its full output; ``hi`` rows are done."""

    __slots__ = ("value", "lo", "hi")

    def __init__(self) -> None:
        self.value: Any = None
        self.lo = 0
        self.hi = 0


def stream_rows(program: Program, strips: Iterator[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """Run ``program`` on an input given as consecutive strips of rows; yield the map's rows as they finish.

    Args:
        program: from :func:`compile_stream`.
        strips: ``(1, 3, h, width)`` tensors, top to bottom, ``program.height`` rows in all.

    Yields:
        ``(row, block)``: ``block`` is ``(1, C, n, W')``, rows ``row .. row + n - 1`` of the (first) map.
    """
    nodes, net = program.nodes, program.net
    states = [_State() for _ in nodes]
    env: list[Any] = [None] * len(nodes)  # constants; a step's sources are put in for its call only
    for index in program.consts:
        step = nodes[index].step
        env[index] = run_step(net, step, _substitute(step.args, env), _substitute(step.kwargs, env))
    first, fed = next(n.index for n in nodes if n.kind == "input"), 0
    for strip in strips:
        if strip.shape[2] < 1 or fed + strip.shape[2] > program.height:
            raise ValueError(f"strips give more than the {program.height} rows the program was compiled for")
        source = states[first]
        source.value = _join(source.value, strip)
        source.hi += strip.shape[2]
        fed += strip.shape[2]
        yield from _advance(program, states, env)
    if fed != program.height:
        raise ValueError(f"strips gave {fed} rows; the program was compiled for {program.height}")


def _advance(program: Program, states: list[_State], env: list[Any]) -> Iterator[tuple[int, torch.Tensor]]:
    """One sweep: every node computes the rows its inputs now allow; yields the map's new rows."""
    nodes, net = program.nodes, program.net
    for node in nodes:
        if node.kind in ("window", "rows"):
            state = states[node.index]
            new = _window_step(net, node, nodes, states, env) if node.kind == "window" \
                else _rows_step(net, node, states, env)
            if new is not None:
                count = _maps(new)[0].shape[2]
                if node.index == program.output:
                    yield state.hi, new
                    state.lo = state.hi + count
                else:
                    state.value = _join(state.value, new)
                state.hi += count
            for source in node.sources:
                if program.last_reader.get(source) == node.index:
                    _trim(nodes, states, source)


def _next_needed(nodes: list[_Node], states: list[_State], reader: _Node, source: int) -> int:
    """The first row of ``source`` that ``reader`` will read from now on."""
    done = states[reader.index].hi
    if done >= reader.height:
        return nodes[source].height
    if reader.kind == "window":
        k, s, before, after, d, mirrors = reader.window
        start = done * s - before
        first = 0 if start <= 0 else start // s * s
        if mirrors:  # its slices are at least max(before, after) + 1 rows long: keep enough for the next
            first = min(first, max(0, (states[source].hi - s - max(before, after) - 1) // s * s))
        return first
    return done


def _trim(nodes: list[_Node], states: list[_State], source: int) -> None:
    """Drop the rows of ``source`` that no reader will read again."""
    state = states[source]
    keep = min(_next_needed(nodes, states, nodes[r], source) for r in nodes[source].consumers)
    if keep >= state.hi:
        state.value, state.lo = None, state.hi
    elif keep > state.lo:
        state.value, state.lo = _copy_rows(state.value, keep - state.lo), keep


def _window_step(net: nn.Module, node: _Node, nodes: list[_Node], states: list[_State], env: list) -> Any:
    """The output rows a window can now compute: its layer called on a slice of its input on its stride grid."""
    (source,) = node.sources
    src, full = states[source], nodes[source].height
    k, s, before, after, d, mirrors = node.window
    r0 = states[node.index].hi
    complete = src.hi == full
    r1 = node.height if complete else min(node.height, (src.hi - 1 + before - d * (k - 1)) // s + 1)
    if r1 <= r0:
        return None
    start = r0 * s - before
    c = 0 if start <= 0 else start // s * s
    b = full if complete else (r1 - 1) * s - before + d * (k - 1) + 1
    if mirrors:  # padding that copies rows of the slice needs more rows in it than it pads
        if b <= max(before, after) and not complete:
            return None
        c = min(c, max(0, (b - max(before, after) - 1) // s * s))
    if c < src.lo:
        raise RuntimeError(f"streaming lost rows of '{nodes[source].step.name}' (internal error)")
    env[source] = _rows(src.value, c - src.lo, b - src.lo)
    step = node.step
    try:
        out = run_step(net, step, _substitute(step.args, env), _substitute(step.kwargs, env))
    finally:
        env[source] = None
    first = r0 - c // s
    return _rows(out, first, first + r1 - r0)


def _rows_step(net: nn.Module, node: _Node, states: list[_State], env: list) -> Any:
    """The rows all of a per-position step's inputs have and it has not computed yet."""
    r0 = states[node.index].hi
    r1 = min(states[i].hi for i in node.sources)
    if r1 <= r0:
        return None
    for i in node.sources:
        env[i] = _rows(states[i].value, r0 - states[i].lo, r1 - states[i].lo)
    step = node.step
    try:
        return run_step(net, step, _substitute(step.args, env), _substitute(step.kwargs, env))
    finally:
        for i in node.sources:
            env[i] = None
