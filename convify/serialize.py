"""A converted network as data, and the small interpreter that runs it again.

Saving (:func:`graph_to_data`) describes the converted ``torch.fx`` graph as JSON-able data: one entry per
node naming its operation as a string from the table in :mod:`convify.ops`, its arguments as plain values
(numbers, strings, nested lists, references to earlier nodes by name), and each layer by class name and
constructor arguments. The weights are a flat dict of tensors.

Loading (:func:`graph_from_data`) never generates or executes Python source (``torch.fx`` would: it
pastes names into code it ``exec``\\ s). It checks the description against a schema, builds each layer on
the ``meta`` device (so a layer that declares 3,000,000 channels allocates nothing), requires every layer's
weights to be exactly the tensors the file holds, and returns a :class:`StoredGraph`: a module whose
``forward`` walks the stored steps and calls only what the table allows (layers it built, functions by
name, tensor methods on tensors).
"""
from __future__ import annotations

import copy
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from . import limits, ops
from .errors import ConvifyError, LimitError, ModelLoadError
from .tracing import fetch_attr

__all__ = ["graph_to_data", "graph_from_data", "StoredGraph", "graph_steps", "Step", "Ref", "run_step", "substitute",
           "fake_run", "step_refs"]

_SKIP_INIT_ARGS = {"self", "device", "dtype"}
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
# Bounds on what a description may contain (beyond convify.limits): nesting of arguments, items in one
# node's arguments, length of a string argument, and size of an integer argument. Integers bound what a
# graph can ask for by itself (``x.expand(10**12, ...)``, a pad of 10**9 pixels).
_MAX_DEPTH = 8
_MAX_ITEMS = 10_000
_MAX_STRING = 100
_MAX_INT = 1 << 24
_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
# A layer or tensor path: dot-separated parts as nn.Module names them (identifiers, Sequential's digits,
# torchvision RegNet's "block1-0"). Never pasted into source; still, nothing else is a name.
_PART = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}"
_PATH = re.compile(rf"{_PART}(\.{_PART}){{0,31}}")


# --------------------------------------------------------------------------------------------------
# Saving


def _module_spec(module: nn.Module, target: str) -> dict[str, Any]:
    """``{"class": name, "kwargs": {...}}``: enough to rebuild the module before loading its state_dict."""
    cls = type(module)
    if ops.module_class(cls.__name__) is not cls:
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


def graph_to_data(net: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Describe a converted network as JSON-able data and a flat dict of tensors.

    Args:
        net: the ``torch.fx.GraphModule`` that :func:`convify.convert` made, or a :class:`StoredGraph`.

    Raises:
        ConvifyError: the graph uses an operation outside the table in :mod:`convify.ops`.
    """
    tensors = {name: t.detach().clone() for name, t in net.state_dict().items()}
    if isinstance(net, StoredGraph):
        return net.description, tensors
    nodes, modules = [], {}
    for node in net.graph.nodes:
        target: Any = node.target
        if node.op == "call_function":
            target = ops.function_key(node.target)
            if ops.op_for(net, node) is None:
                raise ConvifyError(f"cannot save: operation {target} (node '{node.name}') is not one convify "
                                   "knows to be safe")
        elif node.op == "call_method" and ops.resolve_method(node.target) is None:
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
    return {"nodes": nodes, "modules": modules}, tensors


# --------------------------------------------------------------------------------------------------
# The interpreter


@dataclass(frozen=True)
class _Ref:
    """A reference to the value of step ``index`` inside a step's arguments."""

    index: int


@dataclass
class _Step:
    """One node: ``kind`` is the fx op; ``call`` the function, method name, layer or tensor path."""

    name: str
    kind: str
    call: Any
    args: tuple
    kwargs: dict
    frees: tuple[int, ...] = ()  # values no later step reads: dropped after this one
    op: Optional[ops.Op] = None  # the table entry of a function or method


def _substitute(value: Any, env: list) -> Any:
    if isinstance(value, _Ref):
        return env[value.index]
    if isinstance(value, tuple):
        return tuple(_substitute(v, env) for v in value)
    if isinstance(value, list):
        return [_substitute(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_substitute(value.start, env), _substitute(value.stop, env), _substitute(value.step, env))
    return value


# public names for the modules that walk a graph themselves (convify.stream)
Step, Ref, substitute = _Step, _Ref, _substitute


def graph_steps(net: nn.Module) -> tuple[list[_Step], Any]:
    """The steps a converted network runs, in order, and its output as references into them.

    Works on the ``torch.fx.GraphModule`` that :func:`convify.convert` made and on a :class:`StoredGraph`
    alike: a step's arguments hold :class:`Ref` where they read an earlier step's value; run one with
    :func:`run_step`.
    """
    if isinstance(net, StoredGraph):
        return list(net._steps), net._output
    index: dict[fx.Node, int] = {}
    steps: list[_Step] = []
    for node in net.graph.nodes:
        def ref(n: fx.Node) -> _Ref:
            return _Ref(index[n])

        if node.op == "output":
            return steps, fx.node.map_arg(node.args[0], ref)
        index[node] = len(steps)
        steps.append(_Step(node.name, node.op, node.target, fx.node.map_arg(node.args, ref),
                           fx.node.map_arg(node.kwargs, ref), op=ops.op_for(net, node)))
    raise ConvifyError("the converted network has no output")


def run_step(net: nn.Module, step: _Step, args: tuple, kwargs: dict) -> Any:
    """Run one step of :func:`graph_steps` on argument values (references already replaced)."""
    if step.kind == "call_module":
        return net.get_submodule(step.call)(*args, **kwargs)
    if step.kind == "call_function":
        return step.call(*args, **kwargs)
    if step.kind == "call_method":
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"step '{step.name}' calls .{step.call}() on something that is not a tensor")
        return getattr(args[0], step.call)(*args[1:], **kwargs)
    if step.kind == "get_attr":
        return fetch_attr(net, step.call)
    raise ConvifyError(f"step '{step.name}' of kind {step.kind} cannot be run on its own")


def fake_run(net: nn.Module, height: int, width: int, needed: Optional[set[int]] = None) \
        -> tuple[list[_Step], Any, list[Any], set[int]]:
    """Run a converted network's steps on fake tensors: shapes and real constants, no memory, no arithmetic.

    Args:
        net: a converted network (see :func:`graph_steps`).
        height, width: the ``(1, 3, height, width)`` input.
        needed: run only these steps (the others' values stay None).

    Returns:
        ``(steps, output, values, image)``: the steps, the output (references into them), each step's value
        (fake tensors for what the image feeds), and the indices of the steps that read the image.

    Raises:
        Whatever a step raises at this size (the caller says what it means).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    steps, output = graph_steps(net)
    param = next(iter(net.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    values: list[Any] = [None] * len(steps)
    image: set[int] = set()
    with FakeTensorMode(allow_non_fake_inputs=True) as fake, torch.inference_mode():
        for index, step in enumerate(steps):
            if needed is not None and index not in needed:
                continue
            if step.kind == "placeholder":
                values[index] = fake.from_tensor(torch.empty(1, 3, height, width, dtype=dtype))
                image.add(index)
                continue
            values[index] = run_step(net, step, _substitute(step.args, values), _substitute(step.kwargs, values))
            if any(i in image for i in step_refs(step)):
                image.add(index)
    return steps, output, values, image


def step_refs(step: _Step) -> list[int]:
    """The indices of the earlier steps a step reads."""
    found: list[int] = []

    def walk(value: Any) -> None:
        if isinstance(value, _Ref):
            found.append(value.index)
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, slice):
            walk((value.start, value.stop, value.step))

    walk((step.args, step.kwargs))
    return found


class StoredGraph(nn.Module):
    """A converted network rebuilt from a file: ``(N, 3, H, W) -> (N, classes, H', W')`` (or a tuple of maps).

    Its layers sit at the paths the file names (``features.0``), so ``state_dict()`` keys are the
    original's. ``forward`` runs the stored steps in order and calls nothing but the layers built at load,
    functions and tensor methods from :mod:`convify.ops`; no Python source is generated.

    Attributes:
        description: the graph as the file describes it (saved again unchanged by :func:`graph_to_data`).
    """

    def __init__(self, description: dict[str, Any], steps: list[_Step], output: Any,
                 meta_layers: Optional[dict[str, nn.Module]] = None) -> None:
        super().__init__()
        self.description = description
        self._steps = steps
        self._output = output
        # The layers again, on the meta device (no weights): the dry run before a real one calls them.
        self._meta_layers = dict(meta_layers or {})
        self._checked: set[tuple] = set()  # input shapes and dtypes whose dry run passed

    def forward(self, x: torch.Tensor) -> Any:
        """Run the graph on ``x``, ``(N, 3, H, W)``.

        The first run at each input shape is preceded by a dry run on the ``meta`` device, which allocates
        nothing and refuses a graph that would hold more than :data:`convify.limits.MAX_ACTIVATION_RATIO`
        times the input's bytes, return over :data:`convify.limits.MAX_PIECES` tensors from one step, or
        write into its input or its weights.

        Raises:
            LimitError: the graph would need more memory than the limits allow at this input size.
            ModelLoadError: the graph writes into its input or weights, or fails at this input size.
        """
        self.check_input(x)
        return self._run(x, self._call)

    def check_input(self, x: torch.Tensor) -> None:
        """The dry run of :meth:`forward` for an input of ``x``'s shape and dtype (``x`` may be on ``meta``),
        once per shape: code that runs the steps itself (:mod:`convify.stream`) calls it first.

        Raises:
            LimitError, ModelLoadError: as :meth:`forward`.
        """
        key = (tuple(x.shape), x.dtype)
        if key not in self._checked:
            self._dry_run(x)
            if len(self._checked) > 256:
                self._checked.clear()
            self._checked.add(key)

    def _call(self, step: _Step, args: tuple, kwargs: dict) -> Any:
        if step.kind == "call_module":
            return self.get_submodule(step.call)(*args, **kwargs)
        return fetch_attr(self, step.call)  # get_attr

    def _run(self, x: torch.Tensor, call: Any, dry: Optional["_DryRun"] = None) -> Any:
        """Walk the steps; ``call`` runs layers and reads tensors; ``dry`` checks each step of a dry run."""
        env: list[Any] = [None] * len(self._steps)
        for index, step in enumerate(self._steps):
            if step.kind == "placeholder":
                value = x
            else:
                args, kwargs = _substitute(step.args, env), _substitute(step.kwargs, env)
                versions = dry.check_call(step, args, kwargs) if dry is not None else ()
                if step.kind == "call_function":
                    value = step.call(*args, **kwargs)
                elif step.kind == "call_method":
                    if not args or not isinstance(args[0], torch.Tensor):
                        raise TypeError(f"step '{step.name}' calls .{step.call}() on a "
                                        f"{type(args[0]).__name__ if args else 'nothing'}, not a tensor")
                    value = getattr(args[0], step.call)(*args[1:], **kwargs)
                else:
                    value = call(step, args, kwargs)
                if any(t._version != v for t, v in versions):
                    raise ModelLoadError(f"node '{step.name}' of the converted network writes into its input or "
                                         "its weights; the file is crafted or damaged")
            env[index] = value
            if dry is not None:
                dry.after(index, step, value)
            for freed in step.frees:
                env[freed] = None
        return _substitute(self._output, env)

    def _dry_run(self, x: torch.Tensor) -> None:
        """Run the graph on a ``meta`` copy of ``x``: shapes and sizes without data (see :meth:`forward`)."""
        check = _DryRun(x, self._steps)

        def call(step: _Step, args: tuple, kwargs: dict) -> Any:
            if step.kind == "call_module":
                return self._meta_layers[step.call](*args, **kwargs)
            found = fetch_attr(self, step.call)  # get_attr: the file's tensor, as an empty meta tensor
            return check.protect(torch.empty_strided(found.shape, found.stride(), dtype=found.dtype, device="meta"))

        with torch.inference_mode(False), torch.no_grad():  # version counters: in-place writes are seen
            try:
                meta = check.protect(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta"))
                self._run(meta, call, check)
            except ConvifyError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever the step raised, it is the file's fault
                raise ModelLoadError(f"the converted network fails at node '{check.at}' on a "
                                     f"{'x'.join(map(str, x.shape))} input: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _tensors(value: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and depth < _MAX_DEPTH + 2:
        return [t for v in value for t in _tensors(v, depth + 1)]
    if isinstance(value, dict) and depth < _MAX_DEPTH + 2:
        return [t for v in value.values() for t in _tensors(v, depth + 1)]
    return []


class _DryRun:
    """Bookkeeping of a dry run: the bytes alive (each storage once), the input and weights (which no step
    may write into), and the step running (for messages)."""

    def __init__(self, x: torch.Tensor, steps: list[_Step]) -> None:
        self.shape = "x".join(map(str, x.shape))
        self.limit = max(limits.MAX_ACTIVATION_RATIO * x.numel() * x.element_size(), limits.MIN_ACTIVATION_BYTES)
        self.steps = steps
        self.at = steps[0].name if steps else ""
        self.protected: set[int] = set()  # storages of the input and the file's tensors
        # ... kept alive until the run ends: a freed storage's key can be reused by a step's new result,
        # which would then look like a write into a protected tensor
        self._kept: list[torch.Tensor] = []
        self.storages: dict[int, list[int]] = {}  # storage -> [bytes, values holding it]
        self.held: dict[int, list[int]] = {}  # step index -> storages its value holds
        self.alive = 0

    @staticmethod
    def _key(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage()._cdata

    def protect(self, tensor: torch.Tensor) -> torch.Tensor:
        self.protected.add(self._key(tensor))
        self._kept.append(tensor)
        return tensor

    def _too_much(self, what: str, size: int) -> LimitError:
        return LimitError(f"the converted network would hold {what} of {size / 2 ** 30:.1f} GiB at node '{self.at}' "
                          f"on a {self.shape} input, over {limits.MAX_ACTIVATION_RATIO}x the input's bytes "
                          "(convify.limits.MAX_ACTIVATION_RATIO); the file is crafted or damaged")

    def check_call(self, step: _Step, args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, int]]:
        """Before a step: bound the tensors it returns; note the versions of the protected tensors it gets."""
        self.at = step.name
        if step.op is not None and step.op.pieces is not None:
            pieces = step.op.pieces(args, kwargs)
            if pieces > limits.MAX_PIECES:
                raise LimitError(f"node '{step.name}' of the converted network would return {pieces} tensors; "
                                 f"convify allows {limits.MAX_PIECES} (convify.limits.MAX_PIECES); the file is "
                                 "crafted or damaged")
        return [(t, t._version) for t in _tensors((args, kwargs)) if self._key(t) in self.protected]

    def after(self, index: int, step: _Step, value: Any) -> None:
        """After a step: count what its value holds, release what the step frees."""
        keys = []
        for tensor in _tensors(value):
            size = tensor.numel() * tensor.element_size()
            if size > self.limit:
                raise self._too_much("a tensor", size)
            key = self._key(tensor)
            if key in self.protected:
                continue
            entry = self.storages.setdefault(key, [tensor.untyped_storage().nbytes(), 0])
            if entry[1] == 0:
                self.alive += entry[0]
            entry[1] += 1
            keys.append(key)
        if self.alive > self.limit:
            raise self._too_much("results", self.alive)
        self.held[index] = keys
        for freed in step.frees:
            for key in self.held.pop(freed, ()):
                entry = self.storages[key]
                entry[1] -= 1
                if entry[1] == 0:
                    self.alive -= entry[0]
                    del self.storages[key]


# --------------------------------------------------------------------------------------------------
# Loading: schema checks, then the interpreter


def _corrupt(message: str) -> ModelLoadError:
    return ModelLoadError(f"converted file is corrupt: {message}")


def _check_name(value: Any, pattern: re.Pattern, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ModelLoadError(f"converted file names a {what} {ascii(str(value))[:60]}, which is not a plain name; "
                             "it was not written by convify")
    return value


class _Decoder:
    """Turns a node's stored arguments into values, counting items and checking every leaf."""

    def __init__(self, names: dict[str, int], where: str) -> None:
        self.names, self.where, self.items = names, where, 0

    def __call__(self, value: Any, depth: int = 0) -> Any:
        self.items += 1
        if depth > _MAX_DEPTH or self.items > _MAX_ITEMS:
            raise _corrupt(f"{self.where} has arguments nested or sized beyond what convify writes")
        if value is None or isinstance(value, (bool, float)):
            if isinstance(value, float) and math.isnan(value):
                raise _corrupt(f"{self.where} has a NaN argument")
            return value
        if isinstance(value, int):
            if abs(value) > _MAX_INT:
                raise _corrupt(f"{self.where} has the integer argument {value}, beyond {_MAX_INT}")
            return value
        if isinstance(value, str):
            if len(value) > _MAX_STRING:
                raise _corrupt(f"{self.where} has a string argument of {len(value)} characters")
            return value
        if isinstance(value, list):
            return [self(v, depth + 1) for v in value]
        if not isinstance(value, dict) or len(value) != 1:
            raise _corrupt(f"{self.where} has an unexpected argument {ascii(value)[:60]}")
        (kind, payload), = value.items()
        if kind == "node":
            if not isinstance(payload, str) or payload not in self.names:
                raise _corrupt(f"{self.where} uses node {ascii(payload)[:60]} before it is defined")
            return _Ref(self.names[payload])
        if kind in ("tuple", "dict", "slice") and not isinstance(payload, list):
            raise _corrupt(f"{self.where} has a {kind} argument that is not a list")
        if kind == "tuple":
            return tuple(self(v, depth + 1) for v in payload)
        if kind == "dict":
            if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in payload):
                raise _corrupt(f"{self.where} has a malformed dict argument")
            return {_check_name(k, _NODE_NAME, "keyword"): self(v, depth + 1) for k, v in payload}
        if kind == "slice":
            if len(payload) != 3:
                raise _corrupt(f"{self.where} has a malformed slice argument")
            return slice(*(self(v, depth + 1) for v in payload))
        if kind == "ellipsis":
            return Ellipsis
        if kind in ("dtype", "memory_format"):
            found = getattr(torch, payload, None) if isinstance(payload, str) and _NODE_NAME.fullmatch(payload) \
                else None
            if not isinstance(found, (torch.dtype, torch.memory_format)):
                raise _corrupt(f"{self.where} has an unknown {kind} {ascii(payload)[:40]}")
            return found
        raise _corrupt(f"{self.where} has an unknown argument kind {ascii(kind)[:40]}")


def _build_module(target: str, spec: Any, tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
    """Build one layer on the meta device, check its weights against the file's, then load them.

    Returns:
        The layer, and a copy of it left on the meta device (for :class:`StoredGraph`'s dry runs).
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs", {}), dict):
        raise _corrupt(f"layer '{target}' is not described by a class and arguments")
    cls = ops.module_class(spec.get("class")) if isinstance(spec.get("class"), str) else None
    if cls is None:
        raise ModelLoadError(f"converted file names layer type {ascii(spec.get('class'))[:60]}, which convify "
                             "does not allow; it was not written by convify")
    parameters = inspect.signature(cls.__init__).parameters
    allowed = set(parameters) - _SKIP_INIT_ARGS
    decode = _Decoder({}, f"layer '{target}'")
    kwargs = {}
    for key, value in spec.get("kwargs", {}).items():
        if key not in allowed:
            raise _corrupt(f"layer '{target}' ({cls.__name__}) has no argument {ascii(key)[:40]}")
        kwargs[key] = decode(value)
        if _has_string(kwargs[key]) and not _takes_string(parameters[key], kwargs[key]):
            # torch's constructors take a string apart into characters where a size belongs ("1; import os")
            raise _corrupt(f"layer '{target}' ({cls.__name__}) has a string for its argument {ascii(key)[:40]}, "
                           "which takes numbers")
    try:
        with torch.device("meta"):  # declares shapes, allocates nothing
            module = cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - constructors raise TypeError/ValueError/RuntimeError/...
        raise _corrupt(f"cannot build {cls.__name__} for layer '{target}': {str(e).splitlines()[0][:120]}") from None
    expected = module.state_dict()
    own = {k[len(target) + 1:]: v for k, v in tensors.items() if k.startswith(target + ".")}
    for key, value in expected.items():
        if key not in own:
            raise _corrupt(f"tensor '{target}.{key}' is missing")
        if tuple(own[key].shape) != tuple(value.shape):
            raise _corrupt(f"layer '{target}' ({cls.__name__}) declares '{key}' of shape {tuple(value.shape)}, "
                           f"but the file holds {tuple(own[key].shape)}")
    twin = copy.deepcopy(module).eval()
    module.load_state_dict({k: own[k] for k in expected}, strict=True, assign=True)
    return module.eval(), twin


def _has_string(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, (tuple, list)) and any(_has_string(v) for v in value))


def _takes_string(parameter: inspect.Parameter, value: Any) -> bool:
    """Whether a layer's constructor argument may be a string: one declared a string or whose default is one
    (``padding_mode``, ``mode``, ``approximate``), or a convolution's ``padding`` of ``"same"`` or ``"valid"``."""
    if parameter.name == "padding":
        return value in ("same", "valid")
    return isinstance(value, str) and (isinstance(parameter.default, str) or parameter.annotation in (str, "str"))


def _attach(root: nn.Module, path: str, value: Union[nn.Module, torch.Tensor]) -> None:
    """Put a layer or tensor at a dotted path under ``root``, making plain containers on the way."""
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(value, nn.Module):
        owner.add_module(leaf, value)
    else:
        owner.register_buffer(leaf, value)


def graph_from_data(description: Any, tensors: dict[str, torch.Tensor]) -> StoredGraph:
    """Rebuild the network :func:`graph_to_data` described; only operations from :mod:`convify.ops`.

    Args:
        description: the ``{"nodes": [...], "modules": {...}}`` data.
        tensors: every weight, by path; each must belong to a layer or be read by a ``get_attr`` node.

    Raises:
        ModelLoadError: the description breaks the schema (the message names the field), names anything
            outside the table, or does not match the tensors.
    """
    if not isinstance(description, dict) or not isinstance(description.get("nodes"), list) \
            or not isinstance(description.get("modules"), dict):
        raise _corrupt("the graph is not a list of nodes and a table of layers")
    node_list, module_specs = description["nodes"], description["modules"]
    if len(node_list) > limits.MAX_GRAPH_NODES or len(module_specs) > limits.MAX_GRAPH_NODES:
        raise ModelLoadError(f"converted file has {len(node_list)} nodes and {len(module_specs)} layers; convify "
                             f"reads at most {limits.MAX_GRAPH_NODES} (convify.limits.MAX_GRAPH_NODES)")
    for name in tensors:
        _check_name(name, _PATH, "tensor")
    root = nn.Module()
    meta_layers: dict[str, nn.Module] = {}
    try:
        for target, spec in module_specs.items():
            module, meta_layers[target] = _build_module(_check_name(target, _PATH, "layer"), spec, tensors)
            _attach(root, target, module)
    except (KeyError, AttributeError, TypeError) as e:  # a path that clashes with another or with nn.Module's own
        raise _corrupt(f"layer paths clash ({str(e)[:80]})") from None
    names: dict[str, int] = {}
    steps: list[_Step] = []
    output: Any = None
    used = {f"{t}.{k}" for t in module_specs for k in root.get_submodule(t).state_dict()}
    for position, entry in enumerate(node_list):
        if not isinstance(entry, dict) or set(entry) != {"name", "op", "target", "args", "kwargs"}:
            raise _corrupt(f"node {position} is not a name, op, target, args and kwargs")
        name = _check_name(entry["name"], _NODE_NAME, "node")
        op, target = entry["op"], entry["target"]
        if name in names:
            raise _corrupt(f"node '{name}' is defined twice")
        if op not in _OPS:
            raise ModelLoadError(f"converted file uses graph operation {ascii(op)[:40]}, which convify does not allow")
        if output is not None:
            raise _corrupt("nodes follow the output")
        decode = _Decoder(names, f"node '{name}'")
        args, kwargs = decode(entry["args"]), decode(entry["kwargs"])
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            raise _corrupt(f"node '{name}' has arguments {ascii(entry['args'])[:60]}")
        if op == "output":
            if len(args) != 1:
                raise _corrupt("the output node has no value")
            output = args[0]
            continue
        if op == "placeholder":
            if steps:
                raise _corrupt("the input is not the first node, or there are several inputs")
            _check_name(target, _NODE_NAME, "input")
            call: Any = None
        elif op == "call_function":
            call = ops.resolve_function(target) if isinstance(target, str) else None
            if call is None:
                raise ModelLoadError(f"converted file uses operation {ascii(target)[:60]}, which convify does not "
                                     "allow")
        elif op == "call_method":
            if not isinstance(target, str) or ops.resolve_method(target) is None:
                raise ModelLoadError(f"converted file uses tensor method {ascii(target)[:60]}, which convify does "
                                     "not allow")
            call = target
        elif op == "call_module":
            if not isinstance(target, str) or target not in module_specs:
                raise _corrupt(f"layer {ascii(target)[:60]} is not described")
            call = target
        else:  # get_attr
            _check_name(target, _PATH, "tensor")
            if target not in tensors:
                raise _corrupt(f"tensor '{target}' is missing")
            if target not in used:
                try:
                    _attach(root, target, tensors[target])
                except (KeyError, AttributeError, TypeError) as e:
                    raise _corrupt(f"tensor path '{target}' clashes ({str(e)[:80]})") from None
                used.add(target)
            call = target
        _check_operands(name, op, call, tuple(args), kwargs)
        names[name] = len(steps)
        table_op = ops.function_op(target) if op == "call_function" else \
            ops.resolve_method(target) if op == "call_method" else None
        steps.append(_Step(name, op, call, tuple(args), kwargs, op=table_op))
    if output is None or not steps or steps[0].kind != "placeholder":
        raise _corrupt("the graph has no input or no output")
    unused = sorted(set(tensors) - used)
    if unused:
        raise _corrupt(f"tensor '{unused[0]}' belongs to no layer of the graph")
    _plan_frees(steps, output)
    net = StoredGraph(description, steps, output, meta_layers)
    for name, child in root.named_children():
        net.add_module(name, child)
    for name, buffer in root.named_buffers(recurse=False):
        net.register_buffer(name, buffer)
    return net.eval()


def _check_operands(name: str, op: str, call: Any, args: tuple, kwargs: dict) -> None:
    """What the table guards at run time, checked at load where the file states it literally.

    A method is called on a node's value, never on a constant from the file; ``getattr`` names a tensor
    attribute from :data:`convify.ops.TENSOR_ATTRIBUTES`; indexing applies to a node's value; batch_norm
    runs in eval mode (in training mode it would rewrite its running statistics at every run, which the
    dry run on the meta device does not see).
    """
    if call is ops.resolve_function("torch.nn.functional.batch_norm") \
            and kwargs.get("training", args[5] if len(args) > 5 else False) is not False:
        raise ModelLoadError(f"converted file runs batch_norm in training mode at node '{name}', which changes "
                             "its weights at every run; convify does not allow it")
    if op == "call_method" or call in (ops.resolve_function("_operator.getitem"),
                                       ops.resolve_function("builtins.getattr")):
        if not args or not isinstance(args[0], _Ref):
            raise ModelLoadError(f"converted file applies node '{name}' to a constant, not to a computed value; "
                                 "convify does not allow it")
    if call is ops.resolve_function("builtins.getattr") and (len(args) != 2 or args[1] not in ops.TENSOR_ATTRIBUTES):
        raise ModelLoadError(f"converted file reads attribute {ascii(args[1:])[:60]} at node '{name}'; only "
                             f"{', '.join(sorted(ops.TENSOR_ATTRIBUTES))} of a tensor may be read")


def _refs(value: Any) -> list[int]:
    if isinstance(value, _Ref):
        return [value.index]
    if isinstance(value, (tuple, list)):
        return [i for v in value for i in _refs(v)]
    if isinstance(value, dict):
        return [i for v in value.values() for i in _refs(v)]
    if isinstance(value, slice):
        return _refs((value.start, value.stop, value.step))
    return []


def _plan_frees(steps: list[_Step], output: Any) -> None:
    """Mark on each step the values it is the last to read, so a forward keeps only live tensors."""
    last: dict[int, int] = {}
    for index, step in enumerate(steps):
        for ref in _refs((step.args, step.kwargs)):
            last[ref] = index
    kept = set(_refs(output))
    for index, step in enumerate(steps):
        step.frees = tuple(ref for ref, at in last.items() if at == index and ref not in kept)
