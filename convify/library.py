"""Library layers traced as one call each (:data:`convify.tracing.LIBRARY_LEAVES`), and the convify layers that
replace them: passes of the converter (:data:`convify.convert._PASSES`), each ``(graph, example) -> rewrites``.

- timm's ``pad_same`` (TensorFlow "SAME" padding, every ``tf_*`` model) -> :class:`~convify.layers.SamePad2d`;
- timm's ``SpaceToDepth`` (TResNet's stem) -> :class:`~convify.layers.SpaceToDepth`;
- timm's ``CondConv2d`` (the ``*efficientnet_cc_*`` models) -> :class:`~convify.layers.CondConv2d`;
- timm's ``AttentionPool2d`` (CLIP's ResNets' head) -> :class:`~convify.layers.WindowAttentionPool2d`, made by the
  head rewrite where the map leaves the body (:func:`attention_pool_windows`).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from .errors import ConversionError
from .fcn import Rewrite
from .layers import CondConv2d, SamePad2d, SpaceToDepth, WindowAttentionPool2d
from .tracing import eliminate_dead_code, library_leaves, node_label, run_graph, unused_name

__all__ = ["same_padding_layers", "space_to_depth_layers", "cond_conv_layers", "is_attention_pool",
           "attention_pool_windows"]


def same_padding_layers(gm: fx.GraphModule, example: torch.Tensor) -> list[Rewrite]:
    """Make every traced call of a TensorFlow "SAME" padding function a :class:`~convify.layers.SamePad2d` layer.

    timm's ``pad_same(x, kernel_size, stride, dilation, value)`` (traced as one call, see
    :data:`convify.tracing.LIBRARY_LEAVES`) pads by the size of the map it meets; the layer does the
    same for every input, where the native size's constant padding would be wrong at other sizes. Its window
    arguments may be computed in the graph (``weight.shape[-2:]``): they are read off a run at the native size.

    Returns:
        The rewrites made, one per call.
    """
    functions = library_leaves("same_pad")
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in functions]
    values: Optional[dict[fx.Node, Any]] = None
    rewrites = []
    for node in nodes:
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except TypeError as e:
            raise ConversionError(f"'{node_label(node)}' calls {node.target.__name__} with arguments convify cannot "
                                  f"read ({e})") from None
        bound.apply_defaults()
        x, *window = bound.arguments.values()
        computed: list[fx.Node] = []
        fx.node.map_arg(window, computed.append)
        if computed:
            values = values if values is not None else run_graph(gm, example)
            window = [fx.node.map_arg(v, lambda n: values.get(n)) for v in window]
        try:
            kernel, stride, dilation, value = (tuple(int(a) for a in v) if isinstance(v, (tuple, list, torch.Size))
                                               else v for v in window[:4])
            layer = SamePad2d(kernel, stride, dilation, float(value))
        except (TypeError, ValueError) as e:
            raise ConversionError(f"'{node_label(node)}' pads 'SAME' with arguments convify cannot use "
                                  f"({str(e).splitlines()[0][:80]})") from None
        owner = next(reversed(node.meta.get("nn_module_stack") or {"": ("", None)}.values()))[0]
        target = unused_name(gm, f"{owner.replace('.', '_')}_same_pad" if owner else "same_pad")
        gm.add_submodule(target, layer)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (x,))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewrites.append(Rewrite(target, f"{node.target.__module__}.{node.target.__name__} (TensorFlow 'SAME' padding)",
                                f"SamePad2d({layer.extra_repr()})"))
    if nodes:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return rewrites


def _library_layer_calls(gm: fx.GraphModule, kind: str) -> list[tuple[fx.Node, nn.Module]]:
    """``(node, layer)`` for every call of a library layer of ``kind`` (a layer class of
    :data:`convify.tracing.LIBRARY_LEAVES`), listed before a pass changes the graph."""
    classes = tuple(library_leaves(kind))
    calls = [(node, gm.get_submodule(node.target)) for node in gm.graph.nodes if node.op == "call_module"]
    return [(node, layer) for node, layer in calls if isinstance(layer, classes)]


def space_to_depth_layers(gm: fx.GraphModule, example: torch.Tensor) -> list[Rewrite]:
    """Make every library space-to-depth layer (timm's ``SpaceToDepth``, TResNet's stem, traced as one call) a
    :class:`~convify.layers.SpaceToDepth`, which folds blocks the same way and is a window the geometry places."""
    rewrites = []
    for node, old in _library_layer_calls(gm, "space_to_depth"):
        block = getattr(old, "bs", getattr(old, "block_size", None))
        try:
            layer = SpaceToDepth(block)
        except ValueError as e:
            raise ConversionError(f"'{node.target}' ({type(old).__name__}): {e}") from None
        gm.add_submodule(node.target, layer)  # the same path, now convify's layer
        rewrites.append(Rewrite(node.target, f"{type(old).__module__}.{type(old).__name__}", repr(layer)))
    if rewrites:
        gm.recompile()
    return rewrites


def cond_conv_layers(gm: fx.GraphModule, example: torch.Tensor) -> list[Rewrite]:
    """Make every library CondConv layer (timm's ``CondConv2d``, traced as one call) convify's
    :class:`~convify.layers.CondConv2d`: the same arithmetic, a window the geometry places; TensorFlow "SAME"
    padding (the ``tf_`` models) as a :class:`~convify.layers.SamePad2d` in front of it."""
    rewrites = []
    for node, old in _library_layer_calls(gm, "cond_conv"):
        try:
            layer = CondConv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride,
                               0 if old.dynamic_padding else old.padding, old.dilation, old.groups,
                               old.bias is not None, old.num_experts)
        except (AttributeError, ValueError) as e:
            raise ConversionError(f"'{node.target}' ({type(old).__name__}): {e}") from None
        with torch.no_grad():
            layer.weight.copy_(old.weight)
            if old.bias is not None:
                layer.bias.copy_(old.bias)
        gm.add_submodule(node.target, layer.to(old.weight.device, old.weight.dtype).eval())
        if old.dynamic_padding:
            pad = SamePad2d(old.kernel_size, old.stride, old.dilation)
            target = unused_name(gm, node.target.replace(".", "_") + "_same_pad")
            gm.add_submodule(target, pad)
            with gm.graph.inserting_before(node):
                padded = gm.graph.call_module(target, (node.args[0],))
            node.args = (padded, *node.args[1:])
        rewrites.append(Rewrite(node.target, f"{type(old).__module__}.{type(old).__name__}", repr(layer)))
    if rewrites:
        gm.recompile()
    return rewrites


def is_attention_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` calls a library attention-pooling head (traced as one call: tracing.LIBRARY_LEAVES)."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), tuple(library_leaves("attention_pool")))


def attention_pool_windows(module: nn.Module, native: tuple[int, int]) -> WindowAttentionPool2d:
    """timm's ``AttentionPool2d`` (CLIP's ResNets' head) as a :class:`~convify.layers.WindowAttentionPool2d` over
    windows of ``native``, the map's ``(h, w)`` at the native input size; its positional embedding as the original
    uses it there (resampled by timm when the map is not its ``feat_size``).

    Raises:
        ConversionError: a form the layer does not compute (no token pooling).
    """
    if getattr(module, "pool_type", "token") != "token":
        raise ConversionError(f"{type(module).__name__} without token pooling gives a map, not a vector; convify "
                              "converts it as a classifier's head only")
    from timm.layers import resample_abs_pos_embed

    with torch.no_grad():
        pos = resample_abs_pos_embed(module.pos_embed.unsqueeze(0), native, old_size=module.feat_size,
                                     num_prefix_tokens=1)[0]
        if module.qkv is not None:
            weight = module.qkv.weight
            bias = module.qkv.bias if module.qkv.bias is not None else weight.new_zeros(weight.shape[0])
        else:
            weight = torch.cat([module.q.weight, module.k.weight, module.v.weight])
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                              for m in (module.q, module.k, module.v)])
        proj = module.proj if isinstance(module.proj, nn.Linear) else None
        layer = WindowAttentionPool2d(module.in_features, module.embed_dim, proj.out_features if proj else 0,
                                      module.num_heads, native, class_token=module.cls_token is not None)
        layer.qkv_weight.copy_(weight), layer.qkv_bias.copy_(bias), layer.pos.copy_(pos)
        if module.cls_token is not None:
            layer.cls.copy_(module.cls_token.reshape(-1))
        if proj is not None:
            layer.proj_weight.copy_(proj.weight)
            layer.proj_bias.copy_(proj.bias if proj.bias is not None else torch.zeros_like(layer.proj_bias))
    return layer.to(weight.device, weight.dtype).eval()
