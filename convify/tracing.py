"""Tracing a model into a torch.fx graph, and running graphs node by node.

convify works on the model's real ``forward``: ``torch.fx`` records every call, so functional code
(``F.relu``, ``x.mean([2, 3])``, ``torch.flatten``, ``x.view(x.size(0), -1)``) is seen like any layer.
Modules from ``torch.nn`` stay single nodes (fx's default); everything else is traced through.

Shape-dependent Python control flow (``if x.shape[-1] < 7: ...``, as in timm's VGG head) cannot be
traced symbolically. convify's tracer answers such questions by evaluating the graph so far on an
example input at the native size, so the trace follows the branch the model takes there.
"""
from __future__ import annotations

import keyword
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.fx as fx
from torch import nn

from .errors import ConversionError

__all__ = ["trace", "check_names", "run_graph", "fetch_attr", "Layout", "probe_layouts", "example_input", "shape_of",
           "walk_inputs", "node_arg", "pair", "library_leaves", "LIBRARY_LEAVES", "is_shape_query",
           "eliminate_dead_code", "unused_name", "node_label"]


class _ConcreteTracer(fx.Tracer):
    """An fx tracer that resolves data-dependent ``bool(proxy)`` by running on an example input."""

    def __init__(self, example: torch.Tensor) -> None:
        leaves = library_leaves()
        super().__init__(autowrap_functions=tuple(f for f in leaves if not isinstance(f, type)))
        self._leaf_classes = tuple(c for c in leaves if isinstance(c, type))
        self._example = example
        self._evaluating = False

    def trace(self, root: Any, concrete_args: Optional[dict] = None) -> fx.Graph:
        """fx's trace, with a map's ``device`` read as the example's (``torch.autocast(device_type=x.device.type)``
        in EfficientViT needs a string, not a proxy): a model converts on one device."""
        original_getattr = fx.Proxy.__getattr__
        tracer, device = self, self._example.device

        def getattr_(proxy: fx.Proxy, name: str) -> Any:
            if name == "device" and proxy.tracer is tracer:
                return device
            return original_getattr(proxy, name)

        fx.Proxy.__getattr__ = getattr_  # type: ignore[method-assign]
        try:
            return super().trace(root, concrete_args)
        finally:
            fx.Proxy.__getattr__ = original_getattr  # type: ignore[method-assign]

    def to_bool(self, obj: fx.Proxy) -> bool:
        if _reads_values(obj.node):
            raise ConversionError(
                f"the model's forward branches on tensor values (at '{obj.node.name}'), so no single graph "
                "equals it; only branches on shapes can be converted"
            )
        return bool(self._evaluate(obj.node))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_classes) or super().is_leaf_module(m, module_qualified_name)

    # While evaluating, module calls and attribute reads are real, not recorded.
    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _evaluate(self, target: fx.Node) -> Any:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in self.graph.nodes:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node is target:
                break
        graph.output(env[target])
        _check_graph_names(graph)
        self._evaluating = True
        try:
            with torch.no_grad():
                return fx.GraphModule(self.root, graph)(self._example)
        finally:
            self._evaluating = False


# Library code traced as one call each, not through its Python, which a pass of the converter replaces by a convify
# layer: ``(module, name) -> what it computes``. Looked up only where the library is already imported (a model of it
# is being traced). timm's ``pad_same`` pads by TensorFlow's "SAME" rule from the map's size at run time (the size
# arithmetic inside it must not be frozen); its ``SpaceToDepth`` is TResNet's stem (views that fold 4x4 blocks); its
# ``AttentionPool2d`` is CLIP's ResNets' head (the head rewrite applies it to every window of the map); its
# ``CondConv2d`` mixes experts' kernels per image (a matrix product with its weights, the batch folded into channels).
LIBRARY_LEAVES: dict[tuple[str, str], str] = {
    ("timm.layers.padding", "pad_same"): "same_pad",
    ("timm.models.layers.padding", "pad_same"): "same_pad",
    ("timm.layers.space_to_depth", "SpaceToDepth"): "space_to_depth",
    ("timm.models.layers.space_to_depth", "SpaceToDepth"): "space_to_depth",
    ("timm.layers.attention_pool2d", "AttentionPool2d"): "attention_pool",
    ("timm.layers", "AttentionPool2d"): "attention_pool",
    ("timm.layers.cond_conv2d", "CondConv2d"): "cond_conv",
}


def library_leaves(kind: Optional[str] = None) -> dict[Any, str]:
    """The functions and layer classes of :data:`LIBRARY_LEAVES` whose libraries are imported (of ``kind`` only,
    if given), each with what it computes."""
    found: dict[Any, str] = {}
    for (module_name, name), what in LIBRARY_LEAVES.items():
        value = getattr(sys.modules.get(module_name), name, None)
        if callable(value) and (kind is None or what == kind):
            found.setdefault(value, what)
    return found


def walk_inputs(node: fx.Node, stop: Callable[[fx.Node], bool] = lambda n: False) -> Iterator[fx.Node]:
    """``node`` and everything it is computed from, depth-first, each once; nodes where ``stop`` is True
    are yielded but their inputs are not followed."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        if not stop(n):
            stack.extend(n.all_input_nodes)


def is_shape_query(n: fx.Node) -> bool:
    """A read of a tensor's metadata, not its values: its shape, or its dtype or device (``x.device.type != "meta"``
    in EfficientViT)."""
    return (n.op == "call_method" and n.target in ("size", "dim")) or (
        n.op == "call_function" and n.target is getattr and len(n.args) > 1
        and n.args[1] in ("shape", "ndim", "dtype", "device", "is_cuda"))


def _reads_values(node: fx.Node) -> bool:
    """Whether ``node`` depends on the input's values, not just its shape (``x.shape``, ``x.size()``)."""
    return any(n.op == "placeholder" for n in walk_inputs(node, stop=is_shape_query))


def node_arg(node: fx.Node, position: int, name: str, default: Any = None) -> Any:
    """A call's argument, given by keyword or by position."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else default


def pair(v: Any) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# What nn.Module itself produces as a layer, parameter or buffer name: a Python identifier, or a digit
# string (nn.Sequential, nn.ModuleList). torch.fx pastes these names into the source it generates and
# exec()s, so a name that is anything else (a quote, a newline, code) must never reach it.
_MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def check_names(model: nn.Module) -> None:
    """Refuse a model whose layer, parameter or buffer names are not plain names.

    Names come from the model's file when it was unpickled; torch.fx writes them into Python source, so
    this runs before any tracing.

    Raises:
        ConversionError: naming the first offending name (escaped) and its place in the model.
    """
    def bad(kind: str, owner: str, name: object) -> ConversionError:
        where = f" in '{owner}'" if owner else ""
        return ConversionError(f"the model has a {kind} named {ascii(str(name))[:80]}{where}, which is not a plain "
                               "Python name as torch.nn makes them; convify refuses it (a crafted file?)")

    for owner, module in model.named_modules():
        # fx also names a tensor kept as a plain attribute by its key in the layer's __dict__
        attributes = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
        for kind, table in (("layer", module._modules), ("parameter", module._parameters),
                            ("buffer", module._buffers), ("tensor attribute", attributes)):
            for name in table:
                if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name) or keyword.iskeyword(name):
                    raise bad(kind, owner, name)


def _check_graph_names(graph: fx.Graph) -> None:
    """Refuse a traced graph holding a name that fx's code generation would paste unescaped.

    :func:`check_names` covers where names come from in a model; this covers what reaches the source
    whatever its origin: attribute and layer paths, method names and keyword names.

    Raises:
        ConversionError: naming the first offending name (escaped).
    """
    for node in graph.nodes:
        names: list[Any] = list(node.kwargs)
        if node.op in ("get_attr", "call_module"):
            names += node.target.split(".") if isinstance(node.target, str) else [node.target]
        elif node.op == "call_method":
            names.append(node.target)
        for name in names:
            if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name) or keyword.iskeyword(name):
                raise ConversionError(f"the traced model uses the name {ascii(str(name))[:80]} (node '{node.name}'), "
                                      "which is not a plain Python name as torch.nn makes them; convify refuses "
                                      "it (a crafted file?)")


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) into a GraphModule, with evaluation-time no-ops removed.

    Dropout, ``nn.Identity``, stochastic depth in eval mode and ``torch._assert`` checks are dropped, so
    every node left computes something.

    Args:
        model: the classifier, already in eval mode (convify traces a private copy).
        example: an input at the native size, ``(N, 3, H, W)``, used only to resolve control flow.

    Raises:
        ConversionError: the model cannot be traced.
    """
    check_names(model)
    tracer = _ConcreteTracer(example)
    try:
        graph = tracer.trace(model)
    except ConversionError:
        raise
    except Exception as e:  # fx raises many types; the user needs the message, not the type
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx ({msg}); see the README's \"Limits\" for "
            "models whose forward torch.fx cannot follow"
        ) from None
    _check_graph_names(graph)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    _remove_eval_noops(gm)
    return gm


_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout, nn.Identity)
# Functions that are identities in eval mode, with the position of their `training` argument.
_DROPOUT_FUNCTIONS = {"dropout": 2, "dropout1d": 2, "dropout2d": 2, "dropout3d": 2, "alpha_dropout": 2,
                      "feature_alpha_dropout": 2, "stochastic_depth": 3}


def _remove_eval_noops(gm: fx.GraphModule) -> None:
    """Drop nodes that do nothing in eval mode, then dead code (shape checks feeding them)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (torch._assert, getattr(torch, "_check", None)):
            gm.graph.erase_node(node)
            continue
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        is_noop = node.op == "call_module" and isinstance(gm.get_submodule(node.target), _DROPOUT_MODULES)
        if node.op == "call_function" and name in _DROPOUT_FUNCTIONS:
            position = _DROPOUT_FUNCTIONS[name]
            training = node.kwargs.get("training", node.args[position] if len(node.args) > position else True)
            if training:
                raise ConversionError(
                    f"node '{node.name}' applies {name} even in eval mode; such a model is random, "
                    "so no conversion can equal it"
                )
            is_noop = True
        if is_noop:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    eliminate_dead_code(gm.graph)
    gm.recompile()


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Remove nodes whose values nobody uses, sparing in-place operations: ``x.mul_(gain)`` (NF-Net's skip-init
    gain) has no users but changes ``x``; fx's own ``eliminate_dead_code`` would drop it."""
    for node in reversed(list(graph.nodes)):
        in_place = (isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("_")) \
            or node.kwargs.get("inplace") is True or getattr(node.target, "__name__", "") in ("iadd", "imul")
        if not node.users and node.op not in ("output", "placeholder") and not in_place and not node.is_impure():
            graph.erase_node(node)


def unused_name(module: nn.Module, base: str) -> str:
    """``base``, or ``base_2``, ``base_3``...: the first that names no layer or attribute of ``module``."""
    names = {name for name, _ in module.named_modules()}
    target, i = base, 1
    while target in names or hasattr(module, target):
        i += 1
        target = f"{base}_{i}"
    return target


def node_label(node: fx.Node) -> str:
    """The module path for module calls, else the node's name."""
    return node.target if node.op == "call_module" else node.name


def fetch_attr(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for ``target == "a.b.c"``."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def run_graph(
    gm: fx.GraphModule,
    x: torch.Tensor,
    keep: Optional[Callable[[fx.Node, Any], Any]] = None,
) -> dict[fx.Node, Any]:
    """Run ``gm`` on ``x`` node by node, skipping nodes that fail and everything they feed.

    Args:
        gm: a graph with one tensor input.
        x: the input, ``(N, C, H, W)``.
        keep: maps ``(node, value)`` to what is recorded for the node (default: the value itself).
            Values are freed once their last user has run, so recording shapes keeps memory low.

    Returns:
        ``{node: keep(node, value)}`` for every node that ran; nodes that failed are absent.
    """
    interpreter = fx.Interpreter(gm)
    remaining_users = {node: len(node.users) for node in gm.graph.nodes}
    values: dict[fx.Node, Any] = {}
    recorded: dict[fx.Node, Any] = {}
    first_input = True
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                continue
            if node.op == "placeholder":
                if not first_input:
                    continue
                value, first_input = x, False
            else:
                inputs = node.all_input_nodes
                if any(n not in values for n in inputs):
                    continue
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                try:
                    value = getattr(interpreter, node.op)(node.target, args, kwargs)
                except Exception:
                    continue
            values[node] = value
            recorded[node] = keep(node, value) if keep else value
            for n in _unique(node.all_input_nodes):
                remaining_users[n] -= 1
                if remaining_users[n] <= 0:
                    values.pop(n, None)
    return recorded


def _unique(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    return list(dict.fromkeys(nodes))


@dataclass(frozen=True)
class Layout:
    """How a node's output relates to the input size.

    ``shape`` is the output shape at the native size (``None`` for non-tensors); ``hdims``/``wdims`` are the
    dimensions whose size changed when the input height/width grew; ``known`` is False when a probe
    failed at or before this node (typically the Linear after a flatten).
    """

    shape: Optional[tuple[int, ...]]
    hdims: tuple[int, ...] = ()
    wdims: tuple[int, ...] = ()
    known: bool = True

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    @property
    def spatial(self) -> bool:
        return (self.known and len(self.hdims) == 1 and len(self.wdims) == 1 and self.hdims != self.wdims
                and 0 not in self.hdims + self.wdims)

    @property
    def flattened(self) -> bool:
        return self.known and bool(set(self.hdims) & set(self.wdims))

    @property
    def channel_dim(self) -> int:
        """The one dimension of a 4-D spatial tensor that is neither batch, height nor width."""
        (c,) = {1, 2, 3} - {self.hdims[0], self.wdims[0]}
        return c


def shape_of(node: fx.Node, value: Any) -> Optional[tuple[int, ...]]:
    """The shape of a tensor value, ``None`` for anything else (a ``keep`` function for run_graph)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _changed(a: Optional[tuple[int, ...]], b: Optional[tuple[int, ...]]) -> tuple[int, ...]:
    if a is None or b is None or len(a) != len(b):
        return ()
    return tuple(d for d, (x, y) in enumerate(zip(a, b)) if x != y)


def example_input(model: nn.Module, height: int, width: int, batch: int = 1) -> torch.Tensor:
    """A deterministic random image batch ``(batch, 3, height, width)`` on the model's device and dtype."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, height, width, generator=generator).to(device=device, dtype=dtype)



PROBE_GROWTH = 64  # pixels added to the height (then the width) in the probes that find the map's dimensions


def probe_layouts(gm: fx.GraphModule, size: int, native: Optional[dict[fx.Node, Any]] = None) -> dict[fx.Node, Layout]:
    """Run ``gm`` at ``size x size``, with the height grown and with the width grown; compare shapes.

    Args:
        gm: a graph taking one image batch.
        size: the native input size.
        native: shapes already recorded at the native size (``run_graph(..., keep=shape_of)``), if any.

    Returns:
        A :class:`Layout` for every node that runs at the native size.
    """
    grow = PROBE_GROWTH
    if native is None:
        native = run_graph(gm, example_input(gm, size, size), keep=shape_of)
    taller = run_graph(gm, example_input(gm, size + grow, size), keep=shape_of)
    wider = run_graph(gm, example_input(gm, size, size + grow), keep=shape_of)
    return {
        node: Layout(shape, _changed(shape, taller.get(node)), _changed(shape, wider.get(node)),
                     node in taller and node in wider)
        for node, shape in native.items()
    }
