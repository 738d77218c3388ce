"""Rewrite a CNN classifier into an exact fully-convolutional network.

:func:`convert` is a pipeline over the model's torch.fx graph (see :mod:`convify.tracing`), each step a function
with one job:

1. **passes** (:data:`_PASSES`, in order), each ``(graph, example) -> rewrites``: library layers traced as one call
   become convify layers (TensorFlow "SAME" padding, space-to-depth); operations outside the table of
   :mod:`convify.ops` are refused (attention as attention, naming the layer); upsampling the geometry cannot place
   is refused; adaptive pools that are identities at the native size are removed, those that divide evenly made
   fixed, fixed pools over the whole map made stride 1. A new rule is a new pass (or a table entry).
2. **follow the map** (:func:`_follow_the_map`): the graph runs at the native size ``(S, S)``, with the height
   grown and with the width grown; a tensor dimension whose size follows the height is a *height dimension*,
   likewise for width, so no rule per layer type is needed to know where the feature map is.
3. **rewrite the head** (:class:`_HeadRewrite`): nodes whose output has a height and a width (the *body*, plus
   shape arithmetic, constants and *global context* such as a squeeze-and-excitation pool) are copied unchanged.
   Where the map leaves the body (the *boundary*: a global pool, a flatten of a ``C x K x K`` map, an attention
   pool) it becomes a stride-1 pool of the native map's size, a ``K x K`` convolution with the flattening
   ``Linear``'s weights (:class:`~convify.layers.WindowLinear`) or the attention pool on every window; every head
   operation after it is rewritten to work per position by the rule its table entry names (``Op.head``,
   :data:`_HEAD_RULES`): ``Linear`` -> 1x1 convolution, ``BatchNorm1d`` -> ``BatchNorm2d``, ``LayerNorm`` over the
   channels at each position, ``Softmax`` over the channel dimension...; dropout is gone (eval mode).
4. **check**: original and converted run on the same native-size input and must agree to
   ``torch.testing.assert_close`` tolerances, or :class:`~convify.errors.ConversionError` names the first layer
   that differs. The geometry (:mod:`convify.geometry`) is read off the result.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import limits
from .errors import ConversionError, LimitError
from .fcn import FullyConvNet, ModelMeta, Rewrite
from .geometry import analyse_geometry, upsampling
from .library import (attention_pool_windows, cond_conv_layers, is_attention_pool, same_padding_layers,
                      space_to_depth_layers)
from .layers import PointwiseConv2d, WindowLinear
from .ops import argument, cast, op_for, op_name, unsupported_nodes
from .tracing import (Layout, eliminate_dead_code, example_input, fetch_attr, node_arg, node_label, pair, probe_layouts,
                      run_graph, shape_of, trace, unused_name)

__all__ = ["convert"]

_log = logging.getLogger(__name__)


def convert(
    model: nn.Module,
    input_size: Optional[int] = None,
    *,
    arch: Optional[str] = None,
    classes: Optional[Sequence[str]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    check: bool = True,
) -> FullyConvNet:
    """Turn a CNN classifier into a :class:`FullyConvNet` that gives class score maps on any image size.

    The caller's model is never changed (weights, modules, training flag): convify converts a copy.

    Args:
        model: any ``nn.Module`` classifier taking ``(N, 3, H, W)`` images.
        input_size: the native (training) input size ``S`` in pixels; at ``S x S`` the converted network
            gives a 1x1 map equal to the original output. Default: the model's timm ``pretrained_cfg``
            input size if it has one, else 224.
        arch: the architecture's name, kept as metadata (``"torchvision:vgg16"``).
        classes: class names, kept as metadata.
        mean, std: the preprocessing the model expects; default: timm's ``pretrained_cfg`` or ImageNet's.
        check: compare the converted network with the original at the native size (default ``True``).

    Returns:
        A :class:`FullyConvNet` in eval mode: ``fcn(x)`` maps ``(N, 3, H, W)`` to ``(N, classes, H', W')``
        (a tuple of such maps for multi-output heads), with ``fcn.geometry`` telling where each cell lies.

    Raises:
        ConversionError: the model cannot be traced or made fully convolutional (the message says why),
            or the converted network does not equal the original (the message names the first layer
            that differs).

    Examples::

        >>> fcn = convify.convert(torchvision.models.vgg16(), input_size=224)
        >>> fcn(torch.randn(1, 3, 384, 384)).shape
        torch.Size([1, 1000, 6, 6])
        >>> fcn.geometry.stride
        32
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"convert() takes an nn.Module, got {type(model).__name__}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if input_size is None:
        input_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ConversionError(f"input_size must be a positive number of pixels, got {input_size!r}")
    if input_size > limits.MAX_INPUT_SIZE:
        raise LimitError(f"input_size {input_size} is more than the {limits.MAX_INPUT_SIZE} px convify allows "
                         "(convify.limits.MAX_INPUT_SIZE); give the size the model was trained at")
    meta = ModelMeta(
        arch=arch,
        input_size=input_size,
        mean=tuple(float(v) for v in (mean or cfg.get("mean") or (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in (std or cfg.get("std") or (0.229, 0.224, 0.225))),
        classes=list(classes) if classes is not None else None,
    )
    original = copy.deepcopy(model).eval()
    example = example_input(original, input_size, input_size)
    traced = trace(original, example)
    rewrites: list[Rewrite] = []
    for graph_pass in _PASSES:
        rewrites += graph_pass(traced, example)
    layouts = _follow_the_map(traced, example)
    net, head_rewrites = _HeadRewrite(traced, layouts, input_size).run()
    rewrites += head_rewrites
    geometry = analyse_geometry(net, input_size, example)
    fcn = FullyConvNet(net, geometry, meta, rewrites)
    if check:
        fcn.check = _check_equal(original, traced, net, example)
    return fcn


# --------------------------------------------------------------------------------------------------
# The rewrite


@dataclass
class _HeadValue:
    """A head tensor in the converted graph.

    The original was ``shape`` (at the native size); the converted tensor has the same dimensions plus
    the map's: either two new trailing dimensions (``inserted``, the original was a vector per image) or
    the original's two singleton dimensions grown into the map (``inserted=False``, e.g. after a keepdim
    pool). ``spatial`` gives the map's height and width dimensions in the converted tensor.
    """

    shape: tuple[int, ...]
    inserted: bool
    spatial: tuple[int, int]


class _HeadRewrite:
    """The fully-convolutional graph built from a traced classifier whose feature map has been followed
    (``layouts``): the body copied, the boundary (global pool, flatten, attention pool) and every head operation
    rewritten per position by its rule (:data:`_HEAD_RULES`, chosen by ``Op.head`` in :mod:`convify.ops`)."""

    def __init__(self, traced: fx.GraphModule, layouts: dict[fx.Node, Layout], input_size: int) -> None:
        self.traced, self.layouts, self.size = traced, layouts, input_size
        self.rewrites: list[Rewrite] = []
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.head: dict[fx.Node, _HeadValue] = {}
        self.flattened: dict[fx.Node, fx.Node] = {}
        self.new_modules: dict[str, nn.Module] = {}

    # -- building ----------------------------------------------------------------------------------

    def run(self) -> tuple[fx.GraphModule, list[Rewrite]]:
        """Build the fully-convolutional GraphModule and the list of rewrites made."""
        gm, layouts = self.traced, self.layouts
        depends = _depends_on_input(gm)
        reaches_map = _reaches_spatial(gm, layouts)
        for node in gm.graph.nodes:
            if node.op == "output":
                self.graph.output(self._output(node.args[0]))
                continue
            layout = layouts[node]
            in_head = (depends[node] and layout.is_tensor and not layout.spatial and not reaches_map[node]) \
                or any(n in self.head or n in self.flattened for n in node.all_input_nodes)
            if not in_head:
                self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
                continue
            spatial_inputs = [n for n in node.all_input_nodes if layouts[n].spatial]
            if spatial_inputs:
                self._boundary(node, spatial_inputs, layouts)
            else:
                self._head(node, layouts)
        eliminate_dead_code(self.graph)
        self.graph.lint()
        return self._graph_module(), self.rewrites

    def _graph_module(self) -> fx.GraphModule:
        root: dict[str, Any] = {}
        for node in self.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                new = self.new_modules.get(node.target)
                root[node.target] = new if new is not None else fetch_attr(self.traced, node.target)
        net = fx.GraphModule(root, self.graph, class_name="FullyConvGraph")
        return net.eval()

    def _add_module(self, base: str, module: nn.Module, replaces: tuple[str, ...] = ()) -> str:
        """Register a module the converted graph calls; ``base`` is its name unless that is taken.

        ``replaces``: targets of the original graph this module stands in for (their names are free).
        """
        taken = set(self.new_modules) | {
            n.target for n in self.traced.graph.nodes
            if n.op in ("call_module", "get_attr") and n.target not in replaces and n.target != base
        }
        target, i = base, 1
        while any(t == target or t.startswith(target + ".") or target.startswith(t + ".") for t in taken):
            i += 1
            target = f"{base}_{i}"
        self.new_modules[target] = module
        return target

    # -- boundary: the global pool or the flatten --------------------------------------------------

    def _boundary(self, node: fx.Node, spatial_inputs: list[fx.Node], layouts: dict[fx.Node, Layout]) -> None:
        gm = self.traced
        name = op_name(gm, node)
        src = spatial_inputs[0]
        src_layout, out_layout = layouts[src], layouts[node]
        label = _describe_node(gm, node)
        op = op_for(gm, node)
        if len(spatial_inputs) == 1 and op is not None and op.pool and out_layout.known and not out_layout.flattened:
            self._global_pool(node, src, src_layout, out_layout, op.pool)
            return
        if len(spatial_inputs) == 1 and is_attention_pool(gm, node):
            self._attention_pool(node, src, src_layout, out_layout)
            return
        if len(spatial_inputs) == 1 and name in ("flatten", "view", "reshape") and out_layout.shape is not None:
            n, features = out_layout.shape[0], math.prod(src_layout.shape[1:])
            if len(out_layout.shape) == 2 and out_layout.shape == (n, features) and len(src_layout.shape) == 4:
                self.flattened[node] = src
                return
            raise ConversionError(
                f"'{node_label(node)}' reshapes the feature map {tuple(src_layout.shape)} into "
                f"{tuple(out_layout.shape)}, a sequence of tokens rather than one vector; token-mixing "
                "models (ViT, Swin, attention heads) cannot be made fully convolutional"
            )
        raise ConversionError(
            f"'{node_label(node)}' ({label}) turns the feature map into something that is not a "
            "global pool nor a flattened vector; convify cannot express it per position"
        )

    def _attention_pool(self, node: fx.Node, src: fx.Node, src_layout: Layout, out_layout: Layout) -> None:
        """An attention-pooling head over the whole native map becomes the same head on every window of that size
        (:class:`~convify.layers.WindowAttentionPool2d`): a vector per position, as a global pool's."""
        module = self.traced.get_submodule(node.target)
        h, w = src_layout.shape[src_layout.hdims[0]], src_layout.shape[src_layout.wdims[0]]
        if node.kwargs or len(node.args) != 1 or out_layout.shape is None or len(out_layout.shape) != 2:
            raise ConversionError(f"'{node.target}' ({type(module).__name__}) is called in a way convify cannot "
                                  "rewrite (pre_logits, or a map out); as the head of a classifier it converts")
        layer = attention_pool_windows(module, (h, w))
        x = self._to_nchw(self.env[src], src_layout.hdims[0], src_layout.wdims[0], src_layout.channel_dim)
        self.env[node] = self.graph.call_module(self._add_module(node.target, layer, (node.target,)), (x,))
        self.head[node] = _HeadValue(out_layout.shape, inserted=True, spatial=(2, 3))
        self.rewrites.append(Rewrite(node.target, f"{type(module).__name__} over the {h}x{w} map",
                                     f"WindowAttentionPool2d({layer.extra_repr()}) on every {h}x{w} window"))

    def _global_pool(self, node: fx.Node, src: fx.Node, src_layout: Layout, out_layout: Layout,
                     kind: str) -> None:
        gm = self.traced
        name = op_name(gm, node)
        h, w = src_layout.shape[src_layout.hdims[0]], src_layout.shape[src_layout.wdims[0]]
        c = src_layout.channel_dim
        out_shape = out_layout.shape
        if name in ("mean", "amax"):
            dims = node_arg(node, 1, "dim")
            dims = {d % len(src_layout.shape) for d in ([dims] if isinstance(dims, int) else dims)}
            if dims != {src_layout.hdims[0], src_layout.wdims[0]}:
                raise ConversionError(f"'{node_label(node)}' reduces over dims {sorted(dims)}, not the map's "
                                      "height and width; convify cannot express it per position")
        elif name in ("avg_pool2d", "max_pool2d"):
            if out_shape[2:] != (1, 1) or _pool_kernel(gm, node) != (h, w) or _pool_padding(gm, node) != (0, 0):
                raise ConversionError(f"'{node_label(node)}' ({_describe_node(gm, node)}) pools a {h}x{w} map "
                                      "to 1x1 with a window that is not the whole map; convify cannot express it")
        elif out_shape[2:] != (1, 1):
            raise ConversionError(f"'{node_label(node)}' ({_describe_node(gm, node)}) is not a global pool")
        x = self._to_nchw(self.env[src], src_layout.hdims[0], src_layout.wdims[0], c)
        label = _describe_node(gm, node)
        target_base = node_label(node)
        if (h, w) == (1, 1):
            new = x
            self.rewrites.append(Rewrite(target_base, label, f"removed (the map is 1x1 at {self.size} px)"))
        else:
            pool = nn.AvgPool2d((h, w), stride=1) if kind == "avg" else nn.MaxPool2d((h, w), stride=1)
            new = self.graph.call_module(self._add_module(target_base, pool), (x,))
            self.rewrites.append(Rewrite(target_base, label, _describe_module(pool)))
        self.env[node] = new
        if len(out_shape) == 4 and c == 1:
            self.head[node] = _HeadValue(out_shape, inserted=False, spatial=(2, 3))
        elif len(out_shape) == 2:
            self.head[node] = _HeadValue(out_shape, inserted=True, spatial=(2, 3))
        else:
            raise ConversionError(f"'{node_label(node)}' pools into shape {out_shape}; expected (N, C) or (N, C, 1, 1)")

    def _to_nchw(self, x: fx.Node, hdim: int, wdim: int, cdim: int) -> fx.Node:
        order = (0, cdim, hdim, wdim)
        if order == (0, 1, 2, 3):
            return x
        return self.graph.call_method("permute", (x, order))

    def _flattened_linear(self, node: fx.Node, flat: fx.Node, layouts: dict[fx.Node, Layout]) -> None:
        """``Linear`` over a flattened ``C x K x K`` map -> ``Conv2d(C, out, K)`` in the model's flatten order."""
        src = self.flattened[flat]
        layout = layouts[src]
        hdim, wdim, cdim = layout.hdims[0], layout.wdims[0], layout.channel_dim
        weight, bias, target_base = self._linear_params(node)
        replaced = self._replaced if node.op != "call_module" else ()
        out_features = weight.shape[0]
        sizes = layout.shape[1:]
        if weight.shape[1] != math.prod(sizes):
            raise ConversionError(f"'{node_label(node)}' expects {weight.shape[1]} inputs but the flattened map "
                                  f"has {math.prod(sizes)}")
        # weight columns follow the flatten order of dims (1, 2, 3) of `src`; reorder them to (C, H, W)
        kernel = weight.detach().reshape(out_features, *sizes).permute(0, cdim, hdim, wdim)
        conv = WindowLinear(kernel.shape[1], out_features, tuple(kernel.shape[2:]), bias=bias is not None)
        conv = conv.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            if bias is not None:
                conv.bias.copy_(bias.detach())
        x = self._to_nchw(self.env[src], hdim, wdim, cdim)
        self.env[node] = self.graph.call_module(self._add_module(target_base, conv, replaced), (x,))
        self.head[node] = _HeadValue((layout.shape[0], out_features), inserted=True, spatial=(2, 3))
        self.rewrites.append(Rewrite(target_base, f"Linear({weight.shape[1]} -> {out_features})",
                                     _describe_module(conv)))

    def _linear_params(self, node: fx.Node) -> tuple[torch.Tensor, Optional[torch.Tensor], str]:
        gm = self.traced
        if node.op == "call_module":
            linear = gm.get_submodule(node.target)
            return linear.weight, linear.bias, node.target
        weight_node, bias_node = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
        if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
            raise ConversionError(f"'{node.name}' is a linear whose weight is computed, not a parameter")
        bias = None
        if isinstance(bias_node, fx.Node):
            if bias_node.op != "get_attr":
                raise ConversionError(f"'{node.name}' is a linear whose bias is computed, not a parameter")
            bias = fetch_attr(gm, bias_node.target)
        owner = weight_node.target.rpartition(".")[0] or node.name
        self._replaced = (weight_node.target,) + ((bias_node.target,) if bias is not None else ())
        return fetch_attr(gm, weight_node.target), bias, owner

    # -- head: per-position equivalents -----------------------------------------------------------

    def _head(self, node: fx.Node, layouts: dict[fx.Node, Layout]) -> None:
        gm = self.traced
        name = op_name(gm, node)
        flat_inputs = [n for n in node.all_input_nodes if n in self.flattened]
        if flat_inputs:
            if name != "linear" or node.args[0] is not flat_inputs[0] or len(flat_inputs) > 1:
                raise ConversionError(
                    f"'{node_label(node)}' ({_describe_node(gm, node)}) consumes the flattened feature map; "
                    "only a Linear layer can follow a flatten to be made convolutional (token-mixing or "
                    "attention heads cannot)"
                )
            self._flattened_linear(node, flat_inputs[0], layouts)
            return
        inputs = [n for n in node.all_input_nodes if n in self.head]
        if not inputs:  # shape arithmetic or constants that only the head uses
            self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
            return
        value = self.head[inputs[0]]
        out_shape = layouts[node].shape
        if name in ("size", "dim", "getattr") and out_shape is None:  # shape queries: harmless, kept
            self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
            return
        op = op_for(gm, node)
        rule = _HEAD_RULES.get(op.head) if op is not None and op.head else None
        if rule is None or not rule(self, node, value, inputs, out_shape):
            raise ConversionError(
                f"head operation '{node_label(node)}' ({_describe_node(gm, node)}) on a "
                f"{'vector' if value.inserted else 'pooled map'} of shape {value.shape} has no per-position "
                "equivalent in convify"
            )

    def _copy(self, node: fx.Node, value: _HeadValue, out_shape: Optional[tuple[int, ...]],
              args: Optional[tuple] = None, kwargs: Optional[dict] = None) -> bool:
        """Copy ``node`` into the new graph (with optional new args), keeping ``value``'s map layout."""
        mapped_args = fx.node.map_arg(node.args if args is None else args, lambda n: self.env[n])
        mapped_kwargs = fx.node.map_arg(node.kwargs if kwargs is None else kwargs, lambda n: self.env[n])
        self.env[node] = self.graph.create_node(node.op, node.target, mapped_args, mapped_kwargs, node.name)
        self.head[node] = _HeadValue(out_shape if out_shape is not None else value.shape, value.inserted,
                                     value.spatial)
        return True

    def _output(self, result: Any) -> Any:
        """Map the model's output structure to the converted one: every head tensor as an NCHW map."""
        if isinstance(result, fx.Node):
            new, value = self.env[result], self.head.get(result)
            if value is None:
                return new
            if value.inserted and len(value.shape) == 2:
                return new
            if not value.inserted and len(value.shape) == 4:
                c = ({1, 2, 3} - set(value.spatial)).pop()
                return self._to_nchw(new, value.spatial[0], value.spatial[1], c)
            raise ConversionError(f"the output '{result.name}' has shape {value.shape}; expected (N, classes)")
        if isinstance(result, (tuple, list)):
            return type(result)(self._output(r) for r in result)
        if isinstance(result, dict):
            return {k: self._output(v) for k, v in result.items()}
        return result


def _norm_dim(dim: int, value: _HeadValue) -> int:
    return dim % len(value.shape)


def _rule_elementwise(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    if len(inputs) != 1:
        return False
    if op_name(self.traced, node) in ("prelu", "batch_norm") and 1 in value.spatial:
        return False  # these act along dim 1, which must stay the feature dimension
    return self._copy(node, value, out_shape)


def _rule_binary(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    values = [self.head[n] for n in inputs]
    if any(v.inserted != value.inserted or v.spatial != value.spatial for v in values):
        return False
    args = list(node.args)
    if value.inserted:  # a constant tensor broadcast against (N, F) needs trailing (1, 1) for the map
        for i, arg in enumerate(args):
            if isinstance(arg, fx.Node) and arg not in self.head:
                shape = self.layouts[arg].shape
                if shape is None:
                    continue
                if len(shape) > len(value.shape):
                    return False
                args[i] = _Const(self.graph.call_method("reshape", (self.env[arg], (*shape, 1, 1))))
    mapped = tuple(a.node if isinstance(a, _Const) else fx.node.map_arg(a, lambda n: self.env[n]) for a in args)
    kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
    self.env[node] = self.graph.create_node(node.op, node.target, mapped, kwargs, node.name)
    self.head[node] = _HeadValue(out_shape or value.shape, value.inserted, value.spatial)
    return True


@dataclass
class _Const:
    node: fx.Node


def _rule_to_vector(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    """flatten/view/reshape/squeeze of a pooled map or a vector into ``(N, F)``: nothing to do on a map."""
    if out_shape is None or len(out_shape) != 2 or math.prod(value.shape) != math.prod(out_shape):
        return False
    new = self.env[inputs[0]]
    if not value.inserted:
        others = [d for d in range(1, len(value.shape)) if d not in value.spatial]
        if len(others) != 1 or value.shape[others[0]] != out_shape[1]:
            return False
        new = self._to_nchw(new, value.spatial[0], value.spatial[1], others[0])
    self.env[node] = new
    self.head[node] = _HeadValue(out_shape, inserted=True, spatial=(2, 3))
    return True


def _rule_linear(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    last = len(value.shape) - 1
    if not value.inserted and last not in value.spatial:  # channels-last map: Linear acts per position
        return self._copy(node, value, out_shape)
    if not value.inserted or len(value.shape) != 2 or node.args[0] is not inputs[0] or len(inputs) != 1:
        return False
    weight, bias, target_base = self._linear_params(node)
    replaced = self._replaced if node.op != "call_module" else ()
    conv = PointwiseConv2d(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight.device, weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.detach().reshape(conv.weight.shape))
        if bias is not None:
            conv.bias.copy_(bias.detach())
    self.env[node] = self.graph.call_module(self._add_module(target_base, conv, replaced), (self.env[inputs[0]],))
    self.head[node] = _HeadValue(out_shape or (value.shape[0], weight.shape[0]), True, (2, 3))
    self.rewrites.append(Rewrite(target_base, f"Linear({weight.shape[1]} -> {weight.shape[0]})",
                                 _describe_module(conv)))
    return True


def _rule_module_swap(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    """BatchNorm1d -> BatchNorm2d on vectors; a 1x1 Conv2d/BatchNorm2d on a pooled map stays."""
    if node.op != "call_module" or len(inputs) != 1:
        return False
    module = self.traced.get_submodule(node.target)
    if isinstance(module, nn.BatchNorm1d) and value.inserted and len(value.shape) == 2:
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats).to(_device_of(module)).eval()
        bn.load_state_dict(module.state_dict())
        self.env[node] = self.graph.call_module(self._add_module(node.target, bn), (self.env[inputs[0]],))
        self.head[node] = _HeadValue(value.shape, True, (2, 3))
        self.rewrites.append(Rewrite(node.target, _describe_module(module), _describe_module(bn)))
        return True
    if value.inserted or value.spatial != (2, 3):
        return False
    if isinstance(module, nn.BatchNorm2d):
        return self._copy(node, value, out_shape)
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.padding in ((0, 0), 0):
        if module.stride != (1, 1):
            conv = copy.deepcopy(module)
            conv.stride = (1, 1)
            self.env[node] = self.graph.call_module(self._add_module(node.target, conv), (self.env[inputs[0]],))
            self.head[node] = _HeadValue(out_shape, False, (2, 3))
            return True
        return self._copy(node, value, out_shape)
    return False


def _rule_layer_norm(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    if len(inputs) != 1 or node.args[0] is not inputs[0]:
        return False
    last = len(value.shape) - 1
    if not value.inserted and last not in value.spatial:  # normalises channels-last: per position already
        return self._copy(node, value, out_shape)
    if not value.inserted or len(value.shape) != 2:
        return False
    x = self.graph.call_method("permute", (self.env[inputs[0]], (0, 2, 3, 1)))
    args = (x,) + tuple(fx.node.map_arg(node.args[1:], lambda n: self.env[n]))
    normed = self.graph.create_node(node.op, node.target, args, fx.node.map_arg(node.kwargs, lambda n: self.env[n]))
    self.env[node] = self.graph.call_method("permute", (normed, (0, 3, 1, 2)))
    self.head[node] = _HeadValue(value.shape, True, (2, 3))
    self.rewrites.append(Rewrite(node_label(node), "LayerNorm over features", "LayerNorm over channels per position"))
    return True


def _rule_dim(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    """softmax/log_softmax/normalize/cat/chunk/split over a feature dimension: same dim, made positive."""
    gm = self.traced
    name = op_name(gm, node)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        dim = module.dim if module.dim is not None else 1
        new_dim = _norm_dim(dim, value)
        if new_dim in (0,) or (not value.inserted and new_dim in value.spatial):
            return False
        if new_dim != dim:
            module = type(module)(dim=new_dim)
            self.env[node] = self.graph.call_module(self._add_module(node.target, module), (self.env[inputs[0]],))
            self.head[node] = _HeadValue(out_shape or value.shape, value.inserted, value.spatial)
            return True
        return self._copy(node, value, out_shape)
    position, default = op_for(gm, node).dim
    dim = node_arg(node, position, "dim", default)
    if dim is None or not isinstance(dim, int):
        return False
    new_dim = _norm_dim(dim, value)
    if new_dim == 0 or (not value.inserted and new_dim in value.spatial):
        return False
    if name == "cat" and any(self.head.get(n) is None or self.head[n].inserted != value.inserted
                             for n in node.args[0]):
        return False
    args, kwargs = list(node.args), dict(node.kwargs)
    if "dim" in kwargs or len(args) <= position:
        kwargs["dim"] = new_dim
    else:
        args[position] = new_dim
    shape = out_shape if out_shape is not None else value.shape
    return self._copy(node, value, shape, tuple(args), kwargs)


def _rule_getitem(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    """One tensor out of a tuple of head tensors (chunk/split/multi-output), or a slice of features."""
    if self.layouts[node.args[0]].shape is None:  # the parent is a tuple: the element keeps its layout
        return out_shape is not None and len(out_shape) == len(value.shape) and self._copy(node, value, out_shape)
    items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(not isinstance(i, slice) for i in items) or len(items) > 2:
        return False  # an integer index or a slice of the map's dimensions
    return self._copy(node, value, out_shape)


def _rule_permute(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    """Reordering a pooled map's dimensions (channels-last norms): the map's dimensions move along."""
    if value.inserted or len(inputs) != 1 or out_shape is None:
        return False
    name = op_name(self.traced, node)
    rest = node.args[1:] if len(node.args) > 1 else tuple(node.kwargs.values())
    if name == "transpose":
        a, b = (_norm_dim(d, value) for d in rest[:2])
        order = list(range(len(value.shape)))
        order[a], order[b] = order[b], order[a]
    else:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        order = [_norm_dim(d, value) for d in dims]
    if sorted(order) != list(range(len(value.shape))) or order[0] != 0:
        return False
    self._copy(node, value, out_shape)
    self.head[node].spatial = (order.index(value.spatial[0]), order.index(value.spatial[1]))
    return True


def _rule_reduce(self: _HeadRewrite, node: fx.Node, value: _HeadValue, inputs: list, out_shape) -> bool:
    """mean/var/std/norm over feature dimensions (an RMS or layer norm written out after the pool): the same
    dimensions, made positive; reducing the batch or the map's dimensions has no per-position form."""
    op = op_for(self.traced, node)
    if len(inputs) != 1 or len(node.args) > op.reduces + 1 or out_shape is None and op.pieces is None:
        return False  # arguments past dim by position (unbiased, keepdim) are not read
    dims = argument(node.args, node.kwargs, op.reduces, ("dim",))
    listed = [dims] if isinstance(dims, int) else dims
    if not isinstance(listed, (tuple, list)) or not listed or not all(isinstance(d, int) for d in listed):
        return False  # None: every dimension
    new = sorted({_norm_dim(d, value) for d in listed})
    if 0 in new or (not value.inserted and set(new) & set(value.spatial)):
        return False
    args, kwargs = list(node.args), dict(node.kwargs)
    if "dim" in kwargs or len(args) <= op.reduces:
        kwargs["dim"] = new[0] if isinstance(dims, int) else tuple(new)
    else:
        args[op.reduces] = new[0] if isinstance(dims, int) else tuple(new)
    self._copy(node, value, out_shape, tuple(args), kwargs)
    if not kwargs.get("keepdim", False) and out_shape is not None:  # the reduced dimensions are gone
        spatial = (len(out_shape), len(out_shape) + 1) if value.inserted else \
            tuple(s - sum(d < s for d in new) for s in value.spatial)
        self.head[node].spatial = spatial  # type: ignore[assignment]
    return True


# The rule for each kind of head rewrite; which operations are of which kind is in convify.ops (Op.head).
_HEAD_RULES = {
    "reduce": _rule_reduce,
    "elementwise": _rule_elementwise, "binary": _rule_binary, "to_vector": _rule_to_vector, "dim": _rule_dim,
    "linear": _rule_linear, "module": _rule_module_swap, "layer_norm": _rule_layer_norm,
    "getitem": _rule_getitem, "permute": _rule_permute,
}


# --------------------------------------------------------------------------------------------------
# Passes over the traced graph, in order (_PASSES); each takes the graph and an input at the native size, changes
# the graph in place and returns the rewrites it made, or raises ConversionError saying why the model cannot convert.


def _follow_the_map(gm: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, Layout]:
    """Where the feature map is: each node's layout (:func:`convify.tracing.probe_layouts`) from runs at the native
    size and at grown sizes.

    Raises:
        ConversionError: a node fails at the native size, no node's output follows the input's size, or one folds
            the map into the batch (window partitioning, as in Swin).
    """
    size = example.shape[-1]
    native = run_graph(gm, example, keep=shape_of)
    for node in gm.graph.nodes:
        if node not in native and node.op != "output":
            raise ConversionError(f"node '{node.name}' ({op_name(gm, node)}) fails at the native size "
                                  f"{size}x{size}; check input_size")
    layouts = probe_layouts(gm, size, native)
    if not any(layout.spatial for layout in layouts.values()):
        raise ConversionError("the model has no spatial feature map (no layer output follows the input size)")
    for node, layout in layouts.items():
        if layout.known and 0 in layout.hdims + layout.wdims:
            raise ConversionError(
                f"'{node_label(node)}' ({_describe_node(gm, node)}) folds the feature map into the batch "
                "dimension (window partitioning, as in Swin); attention and token-mixing models cannot be "
                "made fully convolutional"
            )
    return layouts


def _fixed_pools(gm: fx.GraphModule, example: torch.Tensor) -> list[Rewrite]:
    """Remove adaptive pools that are identities at the native size; fix those that divide evenly; make fixed
    pools over the whole map stride 1.

    VGG's ``AdaptiveAvgPool2d(7)`` on a 7x7 map does nothing at 224 px but would squash a larger map back to
    7x7; removing it lets the map grow. Global pools (output 1x1) are left for the head rewrite.
    """
    size = example.shape[-1]
    native = run_graph(gm, example, keep=shape_of)
    rewrites: list[Rewrite] = []
    for node in list(gm.graph.nodes):
        name = op_name(gm, node)
        if name in ("avg_pool2d", "max_pool2d") and node in native:
            rewrites += _densify_whole_map_pool(gm, node, name, native)
            continue
        if name not in ("adaptive_avg_pool2d", "adaptive_max_pool2d") or node not in native:
            continue
        src, out = native.get(node.args[0]), native[node]
        if src is None or out is None or len(src) != 4 or out[2:] == (1, 1):
            continue
        label = _describe_node(gm, node)
        if src == out:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            rewrites.append(Rewrite(node_label(node), label, f"removed (identity at {size} px)"))
            continue
        if src[2] % out[2] or src[3] % out[3]:
            raise ConversionError(
                f"{label} at '{node_label(node)}' resizes a {src[2]}x{src[3]} map to {out[2]}x{out[3]}, "
                "which no fixed pool does; convert at an input size where the map is a multiple of "
                f"{out[2]}x{out[3]} (check input_size)"
            )
        kernel = (src[2] // out[2], src[3] // out[3])
        pool = (nn.AvgPool2d if name == "adaptive_avg_pool2d" else nn.MaxPool2d)(kernel, kernel)
        rewrites.append(_swap_pool(gm, node, pool))
    gm.graph.lint()
    gm.recompile()
    return rewrites


def _densify_whole_map_pool(gm: fx.GraphModule, node: fx.Node, name: str, native: dict[fx.Node, Any]) -> list[Rewrite]:
    """A fixed pool whose window is the whole map at the native size (``AvgPool2d(7)`` in old ResNets) is a global
    pool: make it stride 1, so larger maps are pooled at every position."""
    src, out = native.get(node.args[0]), native[node]
    if src is None or out is None or len(src) != 4 or out[2:] != (1, 1):
        return []
    kernel = _pool_kernel(gm, node)
    if kernel != tuple(src[2:]) or _pool_padding(gm, node) != (0, 0) or kernel == (1, 1):
        return []
    if _feeds_windowed_op(gm, node):  # a body pool that happens to cover a tiny native map
        return []
    pool_class = nn.AvgPool2d if name == "avg_pool2d" else nn.MaxPool2d
    return [_swap_pool(gm, node, pool_class(kernel, stride=1))]


def _swap_pool(gm: fx.GraphModule, node: fx.Node, pool: nn.Module) -> Rewrite:
    """Replace a pool node of the traced graph by ``pool`` (under the same module path), and say so."""
    before = _describe_node(gm, node)
    with gm.graph.inserting_before(node):
        target = node.target if node.op == "call_module" else unused_name(gm, node.name)
        gm.add_submodule(target, pool)
        new = gm.graph.call_module(target, (node.args[0],))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return Rewrite(node_label(node), before, _describe_module(pool))



def _method_spellings(gm: fx.GraphModule, example: torch.Tensor) -> list[Rewrite]:
    """Tensor methods whose meaning depends on their arguments, made the call the table knows for that meaning:
    ``x.to(dtype)`` (EvoNorm's statistics in float32 and back) a call of :func:`convify.ops.cast`, which takes a
    floating dtype only (``Tensor.to`` could move a map to a device a file names); ``x.max(y)``/``x.min(y)`` of
    two tensors ``torch.maximum``/``torch.minimum`` (with a dimension they are reductions, and stay unknown)."""
    values: Optional[dict[fx.Node, Any]] = None

    def value(arg: Any) -> Any:
        nonlocal values
        if not isinstance(arg, fx.Node):
            return arg
        values = values if values is not None else run_graph(gm, example)
        return values.get(arg)

    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "to" and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
            node.args, node.kwargs = (node.args[0], node.kwargs["dtype"]), {}  # x.to(dtype=...) (FilterResponseNorm)
        if node.op != "call_method" or len(node.args) != 2 or node.kwargs:
            continue  # other forms stay unknown, and are refused
        if node.target == "to" and isinstance(value(node.args[1]), torch.dtype) and value(node.args[1]).is_floating_point:
            function: Any = cast
        elif node.target in ("max", "min") and isinstance(value(node.args[1]), torch.Tensor):
            function = torch.maximum if node.target == "max" else torch.minimum
        else:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(function, node.args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return []


def _refuse_unknown_operations(gm: fx.GraphModule, example: torch.Tensor) -> list[Rewrite]:
    """Every operation must be one convify can describe, save and load (the table in :mod:`convify.ops`).

    An unknown operation that is attention (:func:`_attention_layer`) is refused as attention, naming the layer.
    """
    unknown = [(node, what) for node, what in unsupported_nodes(gm) if not is_attention_pool(gm, node)]
    if not unknown:
        return []
    # attention anywhere is the reason, even past an unknown operation before it (EdgeNeXt's positional encoding)
    for node, what in unknown:
        layer = _attention_layer(gm, node)
        if "attention" in what.lower() or layer is not None:
            break
    else:
        node, what = unknown[0]
        layer = next(filter(None, (_attention_layer(gm, n, named_only=True) for n in gm.graph.nodes
                                   if not is_attention_pool(gm, n))), None)
        if layer is not None:  # an unknown operation outside it (MobileViT-v2's unfolding), attention inside
            raise ConversionError(f"the model holds attention ({layer}), and '{node_label(node)}' ({what}) is an "
                                  "operation convify does not support; attention mixes positions by weights computed "
                                  "from the image, which no convolution expresses")
        raise ConversionError(f"'{node_label(node)}' ({what}) is an operation convify does not support; models "
                              "built from torch.nn layers and standard tensor functions convert")
    where = f"{layer} computes '{node_label(node)}' ({what}), which" if layer else f"'{node_label(node)}' ({what})"
    raise ConversionError(f"{where} is attention (or token mixing): it mixes positions by weights computed from the "
                          "image, which no convolution expresses; attention models (BotNet, HaloNet, LambdaNet, ViT, "
                          "Swin) cannot be made fully convolutional")


def _refuse_resizing(gm: fx.GraphModule, example: torch.Tensor) -> list[Rewrite]:
    """Every upsampling must be one the geometry can place (:func:`convify.geometry.upsampling` says why not),
    checked before the map is followed: a resize to a fixed size would otherwise look like the end of the body."""
    for node in gm.graph.nodes:
        if op_name(gm, node) == "upsample":
            upsampling(gm.get_submodule(node.target) if node.op == "call_module" else None, node.args, node.kwargs,
                       f"'{node_label(node)}' ({_describe_node(gm, node)})")
    return []


# Products of two tensors: attention's queries times keys and weights times values.
_PRODUCTS = {"matmul", "bmm", "einsum", "baddbmm", "scaled_dot_product_attention"}


def _attention_layer(gm: fx.GraphModule, node: fx.Node, named_only: bool = False) -> Optional[str]:
    """``'path' (Class)`` of the attention layer an unknown operation belongs to, or None if it is not attention.

    It is attention when a layer around it (torch.fx's ``nn_module_stack``) is named for attention
    (``...Attn``, ``...Attention``, ``Lambda...``), or (unless ``named_only``) when it multiplies two tensors
    computed from the image (not a weight): the innermost layer around it is then named.
    """
    layers = []
    for path, kind in (node.meta.get("nn_module_stack") or {}).values():
        layers.append((str(path), kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]))
    for path, name in reversed(layers):
        lower = name.lower()
        if "attn" in lower or "attention" in lower or lower.startswith("lambda"):
            return f"'{path}' ({name})"
    if named_only:
        return None
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    computed = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and a.op != "get_attr"]
    if target.strip("_") in _PRODUCTS and len(computed) >= 2:
        return f"'{layers[-1][0]}' ({layers[-1][1]})" if layers else f"'{node.name}'"
    return None


# The passes convert() runs over the traced graph, in this order, before it follows the map and rewrites the head.
_PASSES = (
    same_padding_layers,         # library "SAME" padding -> SamePad2d, for the actual input's size
    space_to_depth_layers,       # library space-to-depth -> SpaceToDepth, a window the geometry places
    cond_conv_layers,            # library CondConv -> CondConv2d (and its "SAME" padding a SamePad2d)
    _method_spellings,           # x.to(dtype) -> ops.cast (floating dtypes only); x.max(y) -> torch.maximum
    _refuse_unknown_operations,  # everything left is in convify.ops' table (attention refused as such)
    _refuse_resizing,            # upsampling the geometry cannot place (to a size, by a fraction)
    _fixed_pools,                # adaptive pools made fixed or removed; whole-map pools made sliding
)


# --------------------------------------------------------------------------------------------------
# Graph helpers


def _feeds_windowed_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a pool or a convolution wider than 1x1 reads, directly or not, what ``node`` computes."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        name = op_name(gm, user)
        if "pool" in name or (name == "conv2d" and (user.op != "call_module"  # functional: kernel unknown here
                                                    or gm.get_submodule(user.target).kernel_size != (1, 1))):
            return True
        stack.extend(user.users)
    return False


def _depends_on_input(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    depends: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        depends[node] = node.op == "placeholder" or any(depends[n] for n in node.all_input_nodes)
    return depends


def _reaches_spatial(gm: fx.GraphModule, layouts: dict[fx.Node, Layout]) -> dict[fx.Node, bool]:
    """Whether a node's value flows (through any path) into a spatial node: global context, not head."""
    reaches: dict[fx.Node, bool] = {}
    for node in reversed(list(gm.graph.nodes)):
        reaches[node] = any((layouts.get(u) is not None and layouts[u].spatial) or reaches.get(u, False)
                            for u in node.users)
    return reaches


def _pool_kernel(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    if node.op == "call_module":
        return pair(gm.get_submodule(node.target).kernel_size)
    return pair(node_arg(node, 1, "kernel_size"))


def _pool_padding(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    if node.op == "call_module":
        return pair(gm.get_submodule(node.target).padding)
    return pair(node_arg(node, 3, "padding", 0))


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.state_dict().values()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return _describe_module(gm.get_submodule(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _describe_module(module: nn.Module) -> str:
    """A short description: ``Conv2d(512 -> 4096, 7x7)``, ``AvgPool2d(7x7, stride 1)``."""
    if isinstance(module, nn.Conv2d):
        k = "x".join(str(v) for v in module.kernel_size)
        return f"Conv2d({module.in_channels} -> {module.out_channels}, {k})"
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features} -> {module.out_features})"
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        k, s = pair(module.kernel_size), pair(module.stride)
        return f"{type(module).__name__}({k[0]}x{k[1]}, stride {s[0] if s[0] == s[1] else s})"
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return f"{type(module).__name__}({module.output_size})"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return f"{type(module).__name__}({module.num_features})"
    return repr(module).replace("\n", " ")


# --------------------------------------------------------------------------------------------------
# The exactness check


def _flatten_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten_outputs(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten_outputs(v)]
    if hasattr(value, "_fields"):
        return [t for v in value for t in _flatten_outputs(v)]
    return []


@torch.no_grad()
def _check_equal(original: nn.Module, traced: fx.GraphModule, net: fx.GraphModule, example: torch.Tensor) -> dict:
    """Run original and converted at the native size; raise ConversionError unless every output matches.

    Outputs are compared with ``torch.testing.assert_close`` defaults. A rewrite changes the order in which
    floating-point sums are taken (a 1x1 convolution is not the same kernel as a matrix product), so in a
    badly scaled network (random weights, activations in the hundreds) float32 results can differ by more
    than the defaults allow while the maths is exact. Only then the check is repeated in float64, where
    such rounding vanishes; a real error does not.

    Returns:
        ``{"dtype": dtype compared in, "max_abs_diff": largest float32 difference, "max_abs_diff_float64":
        largest float64 difference or None}``.
    """
    x = torch.cat([example, torch.flip(example, dims=(3,))])  # batch of 2: catches batch mixing
    worst, ok = _compare(original(x), net(x))
    report = {"dtype": str(x.dtype).removeprefix("torch."), "max_abs_diff": worst, "max_abs_diff_float64": None}
    if ok:
        return report
    if x.dtype != torch.float64:
        original, net, x = copy.deepcopy(original).double(), copy.deepcopy(net).double(), x.double()
        worst64, ok = _compare(original(x), net(x))
        report.update(dtype="float64", max_abs_diff_float64=worst64)
        if ok:
            _log.info("float32 outputs differ by %.3g (rounding); float64 outputs by %.3g", worst, worst64)
            return report
    if x.dtype != example.dtype:  # compared in float64: localise there too (copied only now, on failure)
        traced = copy.deepcopy(traced).double()
    layer = _first_difference(traced, net, x)
    diff64 = report["max_abs_diff_float64"]
    in_float64 = "" if diff64 is None else f", {diff64:.3g} in float64"
    raise ConversionError(f"the converted network differs from the original at the native size (max abs diff "
                          f"{worst:.3g}{in_float64}); first layer that differs: {layer}")


def _compare(expected_out: Any, actual_out: Any) -> tuple[float, bool]:
    """Largest absolute difference between outputs (maps squeezed to vectors), and whether all are close."""
    expected, actual = _flatten_outputs(expected_out), _flatten_outputs(actual_out)
    if len(expected) != len(actual) or not expected:
        raise ConversionError(f"the converted network gives {len(actual)} outputs, the original {len(expected)}")
    worst, ok = 0.0, True
    for e, a in zip(expected, actual):
        if a.dim() != 4 or a.shape[2:] != (1, 1) or a.shape[:2] != e.reshape(e.shape[0], -1).shape:
            raise ConversionError(
                f"the converted network gives a {tuple(a.shape)} map at the native size, expected a 1x1 map "
                f"matching the original's {tuple(e.shape)}"
            )
        a = a.reshape(e.shape)
        if a.numel():
            worst = max(worst, (a.double() - e.double()).abs().max().item())
        try:
            torch.testing.assert_close(a, e)
        except AssertionError:
            ok = False
    return worst, ok


def _first_difference(traced: fx.GraphModule, net: fx.GraphModule, x: torch.Tensor) -> str:
    """The first node, in graph order, whose value differs between the traced original and the converted."""
    original_values = run_graph(traced, x)
    converted = {node.name: node for node in net.graph.nodes}
    converted_values = run_graph(net, x)
    for node in traced.graph.nodes:
        twin = converted.get(node.name)
        if twin is None or node not in original_values or twin not in converted_values:
            continue
        e, a = original_values[node], converted_values[twin]
        if not isinstance(e, torch.Tensor) or not isinstance(a, torch.Tensor) or e.numel() != a.numel():
            continue
        try:
            torch.testing.assert_close(a.reshape(e.shape), e)
        except AssertionError:
            return f"'{node_label(node)}' ({_describe_node(traced, node)})"
    return "none of the shared layers (the difference is in the rewritten head)"
