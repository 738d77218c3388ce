"""A converted network as data: a graph description from an allowlist, plus tensors.

A saved file never holds code. The graph is JSON: every node's operation is looked up by name in the
tables below (torch.nn module classes, functions, tensor methods), every argument is a plain value, and
every weight is a tensor in a dict read by ``torch.load(..., weights_only=True)``. A file that names
anything else is refused, so loading one runs nothing from it.
"""
from __future__ import annotations

import builtins
import inspect
import json
import keyword
import operator
import re
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import ConvifyError, ModelLoadError
from .layers import PointwiseConv2d
from .tracing import fetch_attr

__all__ = ["graph_to_data", "graph_from_data", "unsupported_node"]

_MODULES: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in (
    nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d,
    nn.ReflectionPad2d, nn.ReplicationPad2d, nn.Flatten, nn.Identity,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh, nn.PReLU, nn.Softmax, nn.LogSoftmax,
    PointwiseConv2d,
)}

_FUNCTIONS_LIST: tuple[Callable, ...] = (
    operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv,
    operator.floordiv, operator.getitem, operator.neg, operator.eq, builtins.getattr,
    torch.cat, torch.stack, torch.flatten, torch.permute, torch.transpose, torch.reshape, torch.squeeze,
    torch.unsqueeze, torch.add, torch.sub, torch.mul, torch.div, torch.sigmoid, torch.tanh, torch.relu,
    torch.exp, torch.clamp, torch.mean, torch.amax, torch.sum, torch.chunk, torch.split, torch.softmax,
    torch.log_softmax, torch.narrow, torch.maximum, torch.minimum,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.mish, F.leaky_relu,
    F.elu, F.selu, F.celu, F.softplus, F.hardtanh, F.softmax, F.log_softmax, F.normalize, F.batch_norm,
    F.layer_norm, F.group_norm, F.linear, F.conv2d, F.pad, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.local_response_norm,
)


def _key(function: Callable) -> str:
    return f"{getattr(function, '__module__', None) or ''}.{getattr(function, '__name__', repr(function))}"


_FUNCTIONS: dict[str, Callable] = {_key(f): f for f in _FUNCTIONS_LIST}

_METHODS = frozenset({
    "size", "dim", "view", "reshape", "flatten", "permute", "transpose", "contiguous", "mean", "amax", "sum",
    "mul", "mul_", "add", "add_", "sub", "div", "sigmoid", "sigmoid_", "relu", "relu_", "tanh", "softmax",
    "log_softmax", "chunk", "split", "unsqueeze", "squeeze", "expand_as", "expand", "clamp", "clamp_", "exp",
    "pow", "sqrt", "narrow", "float", "clone", "neg", "hardswish", "hardsigmoid", "flip",
})

_SKIP_INIT_ARGS = {"self", "device", "dtype"}


def _module_spec(module: nn.Module, target: str) -> dict[str, Any]:
    """``{"class": name, "kwargs": {...}}``: enough to rebuild the module before loading its state_dict."""
    cls = type(module)
    if _MODULES.get(cls.__name__) is not cls:
        raise ConvifyError(f"cannot save layer '{target}' of type {cls.__module__}.{cls.__name__}: only "
                           "torch.nn layers convify knows can be saved")
    kwargs = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in _SKIP_INIT_ARGS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name == "bias":  # a Parameter (or None) on the module, a bool to __init__
            kwargs[name] = getattr(module, "bias", None) is not None
        elif hasattr(module, name):
            kwargs[name] = _encode(getattr(module, name))
        elif param.default is inspect.Parameter.empty:
            raise ConvifyError(f"cannot save layer '{target}': its argument '{name}' is not an attribute")
    return {"class": cls.__name__, "kwargs": kwargs}


def _encode(value: Any) -> Any:
    """A JSON-able form of an fx argument; fx.Nodes become ``{"node": name}``."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, torch.Size)):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ConvifyError(f"cannot save an argument of type {type(value).__name__} ({value!r})")


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ModelLoadError(f"converted file is corrupt: unexpected argument {value!r}")
    (kind, payload), = value.items()
    if kind == "node":
        if payload not in nodes:
            raise ModelLoadError(f"converted file is corrupt: node '{payload}' used before it is defined")
        return nodes[payload]
    if kind == "tuple":
        return tuple(_decode(v, nodes) for v in payload)
    if kind == "dict":
        return {_decode(k, nodes): _decode(v, nodes) for k, v in payload}
    if kind == "slice":
        return slice(*(_decode(v, nodes) for v in payload))
    if kind == "ellipsis":
        return Ellipsis
    if kind in ("dtype", "memory_format"):
        result = getattr(torch, str(payload), None)
        if not isinstance(result, (torch.dtype, torch.memory_format)):
            raise ModelLoadError(f"converted file is corrupt: unknown {kind} {payload!r}")
        return result
    raise ModelLoadError(f"converted file is corrupt: unknown argument kind {kind!r}")


def unsupported_node(net: fx.GraphModule) -> Optional[tuple[fx.Node, str]]:
    """The first node whose operation is outside the allowlist, with a description of it; else None."""
    for node in net.graph.nodes:
        if node.op == "call_function" and _FUNCTIONS.get(_key(node.target)) is not node.target:
            return node, _key(node.target)
        if node.op == "call_method" and node.target not in _METHODS:
            return node, f"Tensor.{node.target}"
        if node.op == "call_module":
            cls = type(net.get_submodule(node.target))
            if _MODULES.get(cls.__name__) is not cls:
                return node, f"{cls.__module__}.{cls.__name__}"
    return None


def graph_to_data(net: fx.GraphModule) -> tuple[str, dict[str, torch.Tensor]]:
    """Describe ``net`` as a JSON string and a flat dict of tensors.

    Raises:
        ConvifyError: the graph uses an operation outside the allowlist.
    """
    nodes, modules = [], {}
    tensors = {name: t.detach().clone() for name, t in net.state_dict().items()}
    for node in net.graph.nodes:
        target: Any = node.target
        if node.op == "call_function":
            target = _key(node.target)
            if _FUNCTIONS.get(target) is not node.target:
                raise ConvifyError(f"cannot save: operation {target} (node '{node.name}') is not one convify "
                                   "knows to be safe")
        elif node.op == "call_method" and node.target not in _METHODS:
            raise ConvifyError(f"cannot save: tensor method .{node.target}() (node '{node.name}') is not one "
                               "convify knows to be safe")
        elif node.op == "call_module":
            modules[node.target] = _module_spec(net.get_submodule(node.target), node.target)
        elif node.op == "get_attr" and node.target not in tensors:
            value = fetch_attr(net, node.target)
            if not isinstance(value, torch.Tensor):
                raise ConvifyError(f"cannot save: attribute '{node.target}' is a {type(value).__name__}")
            tensors[node.target] = value.detach().clone()
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode(node.args), "kwargs": _encode(node.kwargs)})
    return json.dumps({"nodes": nodes, "modules": modules}), tensors


# fx writes node names, placeholder names, keyword names and attribute paths into Python source that it
# exec()s; a file may only use names that cannot be anything but names.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _check_name(value: Any, pattern: re.Pattern, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value) or keyword.iskeyword(value):
        raise ModelLoadError(f"converted file names a {what} {str(value)[:40]!r}, which is not a plain name; "
                             "it was not written by convify")
    return value


def _check_kwargs(kwargs: Any) -> dict:
    if not isinstance(kwargs, dict):
        raise ModelLoadError("converted file is corrupt: keyword arguments are not a mapping")
    for key in kwargs:
        _check_name(key, _NAME, "keyword argument")
    return kwargs


def graph_from_data(description: str, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule described by :func:`graph_to_data`; only allowlisted operations.

    Raises:
        ModelLoadError: the description names anything outside the allowlist, or is inconsistent.
    """
    try:
        data = json.loads(description)
        node_list, module_specs = data["nodes"], data["modules"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"converted file is corrupt: {e}") from None
    root: dict[str, Any] = {}
    for target, spec in module_specs.items():
        _check_name(target, _PATH, "layer")
        cls = _MODULES.get(spec.get("class"))
        if cls is None:
            raise ModelLoadError(f"converted file names layer type {spec.get('class')!r}, which convify does "
                                 "not allow; it was not written by convify")
        kwargs = {k: _decode(v, {}) for k, v in _check_kwargs(spec.get("kwargs", {})).items()}
        try:
            root[target] = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"converted file is corrupt: cannot build {cls.__name__}({kwargs}): {e}") from None
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in node_list:
        op, target, name = entry["op"], entry["target"], _check_name(entry["name"], _NAME, "node")
        args, kwargs = _decode(entry["args"], nodes), _check_kwargs(_decode(entry["kwargs"], nodes))
        if not isinstance(args, (list, tuple)):
            raise ModelLoadError(f"converted file is corrupt: node '{name}' has arguments {args!r}")
        if op == "call_function":
            if target not in _FUNCTIONS:
                raise ModelLoadError(f"converted file uses operation {target!r}, which convify does not allow")
            target = _FUNCTIONS[target]
        elif op == "call_method":
            if target not in _METHODS:
                raise ModelLoadError(f"converted file uses tensor method {target!r}, which convify does not allow")
        elif op == "placeholder":
            _check_name(target, _NAME, "input")
        elif op == "call_module":
            if target not in root:
                raise ModelLoadError(f"converted file is corrupt: layer '{target}' is not described")
        elif op == "get_attr":
            _check_name(target, _PATH, "tensor")
            if target not in tensors:
                raise ModelLoadError(f"converted file is corrupt: tensor '{target}' is missing")
            root[target] = tensors[target]
        elif op == "output":
            graph.output(args[0])
            continue
        else:
            raise ModelLoadError(f"converted file uses graph operation {op!r}, which convify does not allow")
        nodes[name] = graph.create_node(op, target, tuple(args), dict(kwargs), name)
    try:
        graph.lint()
        net = fx.GraphModule(root, graph, class_name="FullyConvGraph")
        module_state = {k: v for k, v in tensors.items() if k in net.state_dict()}
        net.load_state_dict(module_state, strict=True)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"converted file is corrupt: {str(e).splitlines()[0]}") from None
    return net.eval()
