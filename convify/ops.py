"""What convify knows about each operation, in one table.

Every operation a converted network may contain has one :class:`Op` entry here: its spellings (the
``torch.nn`` layer classes, functions and tensor methods that compute it), how it acts on a feature map
(``local``: each position from that position alone; ``window``: it moves the geometry), and how the
converter rewrites it when it meets it in the classifier head (``head``, ``dim``, ``pool``).

The converter's allowlist, the geometry, the saved-file format and the loader all read this table:

- :func:`op_name` gives a node its canonical name (``nn.ReLU``, ``F.relu``, ``torch.relu`` and
  ``x.relu()`` are all ``"relu"``);
- :func:`unsupported_node` is the converter's allowlist: a graph may hold only operations listed here;
- :func:`function_key` / :func:`resolve_function`, :func:`resolve_method` and :func:`module_class` are how a
  saved graph names operations and how the loader turns those names back into callables. Nothing else is
  ever called: a function or method that is not in the table cannot be named by a file.

Some spellings are *guarded*: ``getattr`` reads only a few shape attributes of a tensor, ``getitem`` only
indexes tensors, tuples and lists of what operations return, and operators take only tensors and numbers.
A file therefore cannot walk from a tensor to ``__class__``, ``__globals__`` or ``builtins``.

Adding an operation is one entry in :data:`_TABLE`.
"""
from __future__ import annotations

import builtins
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .layers import (CondConv2d, FinerPool2d, PhaseAvgPool2d, PointwiseConv2d, SamePad2d, SpaceToDepth,
                     WindowAttentionPool2d, WindowLinear)

__all__ = ["Op", "OPS", "op_name", "op_for", "unsupported_node", "function_key", "resolve_function",
           "function_op", "resolve_method", "module_class", "module_classes", "module_op", "argument", "TENSOR_ATTRIBUTES",
           "reduces_per_position", "unsupported_nodes", "cast"]


@dataclass(frozen=True)
class Op:
    """One operation and everything convify knows about it.

    Attributes:
        name: the canonical name, shared by all spellings (``"relu"``).
        modules: ``torch.nn`` layer classes that compute it.
        functions: functions that compute it (``torch``, ``torch.nn.functional``, ``operator``).
        methods: tensor method names that compute it (in-place forms included: ``"relu_"``).
        local: applied to a feature map, it computes each position from that position alone (geometry:
            an operation that is neither local nor windowed gives cells a view of the whole image).
        window: it slides a window over the map (convolutions, pools, pads): it moves the geometry.
        head: how the converter rewrites it in the classifier head, per position: ``"elementwise"``,
            ``"binary"``, ``"to_vector"``, ``"dim"``, ``"linear"``, ``"module"``, ``"layer_norm"``,
            ``"getitem"``, ``"permute"``, ``"reduce"`` (rules in :mod:`convify.convert`); None: it has no head
            rewrite.
        dim: for ``head="dim"``: the position of the ``dim`` argument and its default.
        pool: ``"avg"`` or ``"max"`` when, at the end of the body, it is a global pool.
        shape_query: it reads a shape (``x.size()``), not values.
        pieces: for operations that return several tensors, how many, from the call's arguments
            ``(tensor, *args)`` and keywords, before it runs (so a file cannot ask for 10**7 views).
        reduces: for reductions (mean, var, norm...), the position of their ``dim`` argument: over dimensions
            that spare the map's (the channels: RMS and layer norms written out) they act per position.
    """

    name: str
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    local: bool = False
    window: bool = False
    head: Optional[str] = None
    dim: Optional[tuple[int, Optional[int]]] = None
    pool: Optional[str] = None
    shape_query: bool = False
    pieces: Optional[Callable[[tuple, dict], int]] = None
    reduces: Optional[int] = None


# Tensor attributes a graph may read with getattr (fx records ``x.shape`` that way).
TENSOR_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})


def _tensor_getattr(obj: Any, name: Any) -> Any:
    """``getattr`` limited to a tensor's shape attributes."""
    if not isinstance(obj, torch.Tensor) or name not in TENSOR_ATTRIBUTES:
        raise TypeError(f"getattr({type(obj).__name__}, {str(name)[:40]!r}) is not allowed in a converted network")
    return getattr(obj, name)


def cast(x: Any, dtype: Any) -> Any:
    """``x.to(dtype)`` for a tensor and a floating dtype only: what a converted graph calls for ``Tensor.to`` (a
    file cannot name a device or anything else there). EvoNorm computes its statistics in float32 so."""
    if not isinstance(x, torch.Tensor) or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"cast of {type(x).__name__} to {str(dtype)[:40]} is not allowed in a converted network")
    return x.to(dtype)


def _is_index(index: Any) -> bool:
    if isinstance(index, tuple):
        return all(_is_index(i) for i in index)
    return index is None or index is Ellipsis or isinstance(index, (int, slice, torch.Tensor))


def _safe_getitem(obj: Any, index: Any) -> Any:
    """``obj[index]`` for tensors, shapes, and the tuples/lists that operations return."""
    if not isinstance(obj, (torch.Tensor, tuple, list, torch.Size)) or not _is_index(index):
        raise TypeError(f"indexing a {type(obj).__name__} with {type(index).__name__} is not allowed in a "
                        "converted network")
    return obj[index]


def _is_operand(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, numbers.Number)) and not isinstance(value, complex)


# Python integers a graph may compute: a shape is an int64 in torch, and squaring a number 40 times
# (``s * s``, node after node) must not build a many-GB integer.
_INT_RANGE = 1 << 63


def _numeric(op: Callable) -> Callable:
    """An operator limited to tensors and real numbers (no strings or lists: ``"a" * 10**12``), whose
    integer results stay within int64."""

    def call(*args: Any) -> Any:
        if not all(_is_operand(a) for a in args):
            raise TypeError(f"{op.__name__} of {', '.join(type(a).__name__ for a in args)} is not allowed in a "
                            "converted network")
        result = op(*args)
        if isinstance(result, int) and not -_INT_RANGE <= result < _INT_RANGE:
            raise OverflowError(f"{op.__name__} gives an integer beyond int64 in a converted network")
        return result

    call.__name__ = call.__qualname__ = op.__name__
    call.__module__ = "convify.ops"
    return call


def _int_power(base: Any, exponent: Any) -> Any:
    """``base ** exponent``, refused before it runs when both are integers and the result would leave int64
    (``(2**24) ** (2**24)`` is a 50 MB integer that takes minutes to compute)."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0 \
            and exponent * (abs(base).bit_length() - 1) > 63:
        raise OverflowError("pow gives an integer beyond int64 in a converted network")
    return operator.pow(base, exponent)


_int_power.__name__ = _int_power.__qualname__ = "pow"


def argument(args: tuple, kwargs: dict, position: int, names: tuple[str, ...], default: Any = None) -> Any:
    """A call's argument by any of its keyword ``names``, else at ``position``, else ``default``."""
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[position] if len(args) > position else default


def _dim_size(args: tuple, kwargs: dict, position: int) -> int:
    tensor, dim = args[0] if args else kwargs.get("input"), argument(args, kwargs, position, ("dim",), 0)
    if not isinstance(tensor, torch.Tensor) or not isinstance(dim, int) or not -tensor.ndim <= dim < max(1, tensor.ndim):
        return 1  # the call itself will refuse it
    return tensor.shape[dim] if tensor.ndim else 1


def _chunk_pieces(args: tuple, kwargs: dict) -> int:
    chunks = argument(args, kwargs, 1, ("chunks",), 1)
    return min(chunks, _dim_size(args, kwargs, 2)) if isinstance(chunks, int) else 1


def _split_pieces(args: tuple, kwargs: dict) -> int:
    size = argument(args, kwargs, 1, ("split_size", "split_size_or_sections"), 1)
    if isinstance(size, (list, tuple)):
        return len(size)
    return -(-_dim_size(args, kwargs, 2) // size) if isinstance(size, int) and size > 0 else 1


def _elementwise(name: str, *, modules: tuple = (), functions: tuple = (), methods: tuple = ()) -> Op:
    return Op(name, modules, functions, methods, local=True, head="elementwise")


_TABLE: tuple[Op, ...] = (
    # -- windowed: they move the geometry ----------------------------------------------------------
    Op("conv2d", (nn.Conv2d, PointwiseConv2d, WindowLinear), (F.conv2d,), window=True, head="module"),
    Op("max_pool2d", (nn.MaxPool2d,), (F.max_pool2d,), window=True, pool="max"),
    Op("avg_pool2d", (nn.AvgPool2d,), (F.avg_pool2d,), window=True, pool="avg"),
    Op("finer_pool2d", (FinerPool2d,), window=True),
    # over a pooled channel vector (ECA's channel attention): not over the map, and not per position
    Op("conv1d", (nn.Conv1d,), (F.conv1d,)),
    # an attention-pooling head (CLIP's ResNets) applied to every window of the native map's size
    Op("window_attention_pool2d", (WindowAttentionPool2d,), window=True),
    # a convolution whose kernel is each image's mix of experts (CondConv), weighed by a second input
    Op("cond_conv2d", (CondConv2d,), window=True),
    # blocks folded into channels (TResNet's stem): a window of the block at a stride of the block
    Op("space_to_depth", (SpaceToDepth,), window=True),
    # upsampling by a whole factor (HRNet's fusion): the geometry places it (convify.geometry.upsampling)
    Op("upsample", (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), (F.interpolate,)),
    # TensorFlow "SAME" padding, by the size of the map it meets (timm's tf_* models): a pad that moves with it
    Op("same_pad2d", (SamePad2d,), window=True),
    Op("pad", (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d), (F.pad,), window=True),
    # -- global pools: the boundary between body and head ------------------------------------------
    Op("adaptive_avg_pool2d", (nn.AdaptiveAvgPool2d,), (F.adaptive_avg_pool2d,), pool="avg"),
    Op("adaptive_max_pool2d", (nn.AdaptiveMaxPool2d,), (F.adaptive_max_pool2d,), pool="max"),
    Op("mean", (), (torch.mean,), ("mean",), pool="avg", head="reduce", reduces=1),
    Op("amax", (), (torch.amax,), ("amax",), pool="max", head="reduce", reduces=1),
    Op("sum", (), (torch.sum,), ("sum",), head="reduce", reduces=1),
    # a vector norm; over the map's positions (ConvNeXt-V2's GRN) it is global context, like SE's pool
    Op("norm", (), (torch.norm, torch.linalg.vector_norm), ("norm",), head="reduce", reduces=2),
    # statistics of a norm written out (timm's RmsNorm2d, LayerNorm2d): over the channels, per position
    Op("var", (), (torch.var,), ("var",), head="reduce", reduces=1),
    Op("std", (), (torch.std,), ("std",), head="reduce", reduces=1),
    Op("var_mean", (), (torch.var_mean,), head="reduce", reduces=1, pieces=lambda args, kwargs: 2),
    # each phase of a finer map averaged apart (convify.finer): the map's size, but not per position
    Op("phase_avg_pool2d", (PhaseAvgPool2d,)),
    # -- per position ------------------------------------------------------------------------------
    Op("linear", (nn.Linear,), (F.linear,), local=True, head="linear"),
    Op("batch_norm2d", (nn.BatchNorm2d,), local=True, head="module"),
    Op("batch_norm1d", (nn.BatchNorm1d,), local=True, head="module"),
    Op("batch_norm", (), (F.batch_norm,), local=True, head="elementwise"),
    Op("layer_norm", (nn.LayerNorm,), (F.layer_norm,), head="layer_norm"),  # local when it spares the map's dims
    Op("group_norm", (nn.GroupNorm,), (F.group_norm,)),
    Op("local_response_norm", (nn.LocalResponseNorm,), (F.local_response_norm,), local=True),
    _elementwise("relu", modules=(nn.ReLU,), functions=(F.relu, torch.relu), methods=("relu", "relu_")),
    _elementwise("relu6", modules=(nn.ReLU6,), functions=(F.relu6,)),
    _elementwise("gelu", modules=(nn.GELU,), functions=(F.gelu,)),
    _elementwise("silu", modules=(nn.SiLU,), functions=(F.silu,)),
    _elementwise("hardswish", modules=(nn.Hardswish,), functions=(F.hardswish,), methods=("hardswish",)),
    _elementwise("hardsigmoid", modules=(nn.Hardsigmoid,), functions=(F.hardsigmoid,), methods=("hardsigmoid",)),
    _elementwise("sigmoid", modules=(nn.Sigmoid,), functions=(F.sigmoid, torch.sigmoid),
                 methods=("sigmoid", "sigmoid_")),
    _elementwise("tanh", modules=(nn.Tanh,), functions=(F.tanh, torch.tanh), methods=("tanh",)),
    _elementwise("mish", modules=(nn.Mish,), functions=(F.mish,)),
    _elementwise("leaky_relu", modules=(nn.LeakyReLU,), functions=(F.leaky_relu,)),
    _elementwise("elu", modules=(nn.ELU,), functions=(F.elu,)),
    _elementwise("selu", modules=(nn.SELU,), functions=(F.selu,)),
    _elementwise("celu", modules=(nn.CELU,), functions=(F.celu,)),
    _elementwise("softplus", modules=(nn.Softplus,), functions=(F.softplus,)),
    _elementwise("hardtanh", modules=(nn.Hardtanh,), functions=(F.hardtanh,)),
    _elementwise("prelu", modules=(nn.PReLU,)),
    _elementwise("identity", modules=(nn.Identity,)),
    _elementwise("exp", functions=(torch.exp,), methods=("exp",)),
    _elementwise("neg", functions=(_numeric(operator.neg),), methods=("neg",)),
    _elementwise("clamp", functions=(torch.clamp,), methods=("clamp", "clamp_")),
    _elementwise("sqrt", functions=(torch.sqrt,), methods=("sqrt", "sqrt_")),
    _elementwise("square", functions=(torch.square,), methods=("square",)),
    _elementwise("rsqrt", functions=(torch.rsqrt,), methods=("rsqrt",)),
    _elementwise("pow", functions=(_numeric(_int_power), torch.pow), methods=("pow",)),
    _elementwise("contiguous", methods=("contiguous",)),
    _elementwise("clone", methods=("clone",)),
    _elementwise("float", methods=("float",)),
    _elementwise("cast", functions=(cast,)),  # Tensor.to(dtype), made this call by the converter
    _elementwise("flip", methods=("flip",)),
    Op("add", (), (_numeric(operator.add), _numeric(operator.iadd), torch.add), ("add", "add_"), local=True,
       head="binary"),
    Op("sub", (), (_numeric(operator.sub), torch.sub), ("sub",), local=True, head="binary"),
    Op("mul", (), (_numeric(operator.mul), _numeric(operator.imul), torch.mul), ("mul", "mul_"), local=True,
       head="binary"),
    Op("div", (), (_numeric(operator.truediv), torch.div), ("div",), local=True, head="binary"),
    Op("floordiv", (), (_numeric(operator.floordiv),), local=True, head="binary"),
    Op("maximum", (), (torch.maximum,), local=True, head="binary"),
    Op("addcmul", (), (torch.addcmul,), ("addcmul",), local=True),  # input + value * a * b, broadcast
    Op("minimum", (), (torch.minimum,), local=True, head="binary"),
    Op("eq", (), (_numeric(operator.eq),), local=True),
    Op("softmax", (nn.Softmax,), (F.softmax, torch.softmax), ("softmax",), local=True, head="dim", dim=(1, None)),
    Op("log_softmax", (nn.LogSoftmax,), (F.log_softmax, torch.log_softmax), ("log_softmax",), local=True,
       head="dim", dim=(1, None)),
    Op("normalize", (), (F.normalize,), local=True, head="dim", dim=(2, 1)),
    Op("cat", (), (torch.cat,), local=True, head="dim", dim=(1, 0)),
    Op("chunk", (), (torch.chunk,), ("chunk",), local=True, head="dim", dim=(2, 0), pieces=_chunk_pieces),
    Op("split", (), (torch.split,), ("split",), local=True, head="dim", dim=(2, 0), pieces=_split_pieces),
    Op("stack", (), (torch.stack,), local=True),
    # -- moving dimensions around ------------------------------------------------------------------
    Op("flatten", (nn.Flatten,), (torch.flatten,), ("flatten",), local=True, head="to_vector"),
    Op("view", (), (), ("view",), local=True, head="to_vector"),
    Op("reshape", (), (torch.reshape,), ("reshape",), local=True, head="to_vector"),
    Op("reshape_as", (), (), ("reshape_as",), local=True),  # NF-Nets standardise their weights with it
    Op("squeeze", (), (torch.squeeze,), ("squeeze",), local=True, head="to_vector"),
    Op("unsqueeze", (), (torch.unsqueeze,), ("unsqueeze",), local=True),
    Op("permute", (), (torch.permute,), ("permute",), local=True, head="permute"),
    Op("transpose", (), (torch.transpose,), ("transpose",), local=True, head="permute"),
    Op("narrow", (), (torch.narrow,), ("narrow",), local=True),
    Op("expand", (), (), ("expand", "expand_as"), local=True),
    Op("getitem", (), (_safe_getitem,), local=True, head="getitem"),
    # -- shape queries ----------------------------------------------------------------------------
    Op("size", (), (), ("size",), shape_query=True),
    Op("dim", (), (), ("dim",), shape_query=True),
    Op("getattr", (), (_tensor_getattr,), shape_query=True),
)

OPS: dict[str, Op] = {op.name: op for op in _TABLE}

# What fx records when it traces a spelling -> what a converted graph calls instead. A guarded function
# stands in for the builtin it limits (fx records ``operator.add``; the graph calls the numeric form).
_GUARDED: dict[Callable, Callable] = {
    operator.add: OPS["add"].functions[0], operator.iadd: OPS["add"].functions[1],
    operator.sub: OPS["sub"].functions[0], operator.mul: OPS["mul"].functions[0],
    operator.imul: OPS["mul"].functions[1], operator.truediv: OPS["div"].functions[0],
    operator.floordiv: OPS["floordiv"].functions[0], operator.neg: OPS["neg"].functions[0],
    operator.eq: OPS["eq"].functions[0], operator.pow: OPS["pow"].functions[0], operator.getitem: _safe_getitem, builtins.getattr: _tensor_getattr,
}


def function_key(function: Callable) -> str:
    """The name a saved graph gives a function: ``"torch.nn.functional.relu"``, ``"_operator.add"``.

    A guarded function is saved under the name of the builtin it limits, so files stay readable by name.
    """
    for builtin, guarded in _GUARDED.items():
        if function is guarded:
            function = builtin
    return f"{getattr(function, '__module__', None) or ''}.{getattr(function, '__name__', repr(function))}"


_BY_FUNCTION: dict[str, tuple[Op, Callable]] = {}
_BY_METHOD: dict[str, Op] = {}
_BY_MODULE: dict[type, Op] = {}
for _op in _TABLE:
    for _f in _op.functions:
        _BY_FUNCTION[function_key(_f)] = (_op, _f)
    for _m in _op.methods:
        _BY_METHOD[_m] = _op
    for _cls in _op.modules:
        _BY_MODULE[_cls] = _op
_MODULES_BY_NAME: dict[str, type] = {cls.__name__: cls for cls in _BY_MODULE}


def resolve_function(key: str) -> Optional[Callable]:
    """The callable a saved graph may call under ``key`` (see :func:`function_key`); None if not allowed."""
    found = _BY_FUNCTION.get(key)
    return found[1] if found else None


def function_op(key: str) -> Optional[Op]:
    """The operation a saved graph's function ``key`` computes; None if not allowed."""
    found = _BY_FUNCTION.get(key)
    return found[0] if found else None


def resolve_method(name: str) -> Optional[Op]:
    """The operation a tensor method name computes; None if a graph may not call it."""
    return _BY_METHOD.get(name)


def module_class(name: str) -> Optional[type]:
    """The ``nn.Module`` class a saved graph may build under ``name``; None if not allowed."""
    return _MODULES_BY_NAME.get(name)


def module_classes() -> tuple[type, ...]:
    """Every layer class a converted network may contain."""
    return tuple(_BY_MODULE)


def module_op(module: nn.Module) -> Optional[Op]:
    """The table entry of what a layer computes, or None for layers convify does not know."""
    return _BY_MODULE.get(type(module))


def reduces_per_position(op: Optional[Op], args: tuple, kwargs: dict, ndim: int, spatial: tuple[int, int]) -> bool:
    """Whether a reduction (``op.reduces``) called with ``args``/``kwargs`` on an ``ndim`` tensor whose map
    dimensions are ``spatial`` reduces only other dimensions (the channels): then it acts per position."""
    if op is None or op.reduces is None:
        return False
    dims = argument(args, kwargs, op.reduces, ("dim",))
    dims = [dims] if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or \
            not all(isinstance(d, int) and not isinstance(d, bool) and -ndim <= d < ndim for d in dims):
        return False  # None: every dimension
    return not {d % ndim for d in dims} & {d % ndim for d in spatial}


def op_for(gm: Optional[nn.Module], node: fx.Node) -> Optional[Op]:
    """The table entry of what ``node`` computes, or None for operations convify does not know."""
    if node.op == "call_module":
        return _BY_MODULE.get(type(gm.get_submodule(node.target))) if gm is not None else None
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    if node.op == "call_function":
        found = _BY_FUNCTION.get(function_key(node.target))
        if found is not None and (found[1] is node.target or _GUARDED.get(node.target) is found[1]):
            return found[0]
    return None


def op_name(gm: nn.Module, node: fx.Node) -> str:
    """A short name for what a node computes, the same for every spelling of one operation.

    ``nn.ReLU``, ``F.relu``, ``torch.relu`` and ``x.relu()`` are all ``"relu"``; ``operator.add``,
    ``torch.add`` and ``x.add(y)`` are all ``"add"``. Operations outside the table keep their own name;
    placeholders, outputs and attributes return their op.
    """
    op = op_for(gm, node)
    if op is not None:
        return op.name
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def unsupported_node(gm: nn.Module) -> Optional[tuple[fx.Node, str]]:
    """The first node of ``gm`` whose operation is not in the table, with a description of it; else None."""
    return next(unsupported_nodes(gm), None)


def unsupported_nodes(gm: nn.Module) -> Iterator[tuple[fx.Node, str]]:
    """Every node of ``gm`` whose operation is not in the table, with a description of it, in graph order."""
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and op_for(gm, node) is None:
            if node.op == "call_module":
                cls = type(gm.get_submodule(node.target))
                yield node, f"{cls.__module__}.{cls.__name__}"
            elif node.op == "call_method":
                yield node, f"Tensor.{node.target}"
            else:
                yield node, function_key(node.target)
