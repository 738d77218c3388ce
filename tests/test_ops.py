"""The operation table: one entry per operation, read by the converter, the geometry, the saver and the loader."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from convify import ops


def test_every_spelling_belongs_to_exactly_one_operation() -> None:
    seen: dict[object, str] = {}
    for op in ops.OPS.values():
        for spelling in (*op.modules, *op.functions, *(f"method:{m}" for m in op.methods)):
            assert spelling not in seen, f"{spelling} is in both {seen[spelling]} and {op.name}"
            seen[spelling] = op.name


@pytest.mark.parametrize("make, name", [
    (lambda x: F.relu(x), "relu"), (lambda x: torch.relu(x), "relu"), (lambda x: x.relu(), "relu"),
    (lambda x: x.relu_(), "relu"), (lambda x: x + 1, "add"), (lambda x: torch.add(x, 1), "add"),
    (lambda x: x.add(1), "add"), (lambda x: x * 2, "mul"), (lambda x: x.mean([2, 3]), "mean"),
    (lambda x: torch.flatten(x, 1), "flatten"), (lambda x: x[:, :2], "getitem"),
    (lambda x: F.adaptive_avg_pool2d(x, 1), "adaptive_avg_pool2d"),
])
def test_op_name_is_the_same_for_every_spelling(make, name: str) -> None:
    class M(nn.Module):
        def forward(self, x):
            return make(x)

    gm = fx.symbolic_trace(M())
    node = next(n for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    assert ops.op_name(gm, node) == name
    assert ops.op_for(gm, node) is ops.OPS[name]


def test_module_spellings_share_names_with_functions() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)))
    names = [ops.op_name(gm, n) for n in gm.graph.nodes if n.op == "call_module"]
    assert names == ["relu", "adaptive_avg_pool2d", "flatten", "linear"]


def test_saved_names_resolve_back_to_what_the_graph_may_call() -> None:
    for op in ops.OPS.values():
        for function in op.functions:
            assert ops.resolve_function(ops.function_key(function)) is function
        for method in op.methods:
            assert ops.resolve_method(method) is op
        for cls in op.modules:
            assert ops.module_class(cls.__name__) is cls
    # the builtins fx records are saved under their own names and come back guarded
    assert ops.function_key(operator.add) == "_operator.add"
    assert ops.resolve_function("_operator.add") is not operator.add
    for name in ("builtins.eval", "builtins.exec", "os.system", "torch.load", "builtins.__import__",
                 "torch.save", "torch.from_file", "builtins.open"):
        assert ops.resolve_function(name) is None
    for method in ("__class__", "__reduce_ex__", "numpy", "tolist", "register_hook", "storage", "data_ptr"):
        assert ops.resolve_method(method) is None


def test_guarded_builtins_refuse_everything_but_tensors_and_numbers() -> None:
    getattr_ = ops.resolve_function("builtins.getattr")
    getitem = ops.resolve_function("_operator.getitem")
    mul = ops.resolve_function("_operator.mul")
    x = torch.zeros(2, 3)
    assert getattr_(x, "shape") == (2, 3)
    assert getitem(x.shape, 1) == 3 and getitem((x, x), 0) is x
    torch.testing.assert_close(mul(x + 1, 2.0), torch.full((2, 3), 2.0))
    for call in (lambda: getattr_(x, "__class__"), lambda: getattr_("text", "shape"),
                 lambda: getitem({"a": 1}, "a"), lambda: getitem("text", 0), lambda: getitem(x, "a"),
                 lambda: mul("a", 10 ** 12), lambda: mul([1], 3)):
        with pytest.raises(TypeError, match="not allowed in a converted network"):
            call()


def test_the_converter_refuses_what_the_table_lacks() -> None:
    class Abs(nn.Module):
        def forward(self, x):
            return torch.abs(x)

    gm = fx.symbolic_trace(Abs())
    node, what = ops.unsupported_node(gm)
    assert node.target is torch.abs and what == "torch.abs"
