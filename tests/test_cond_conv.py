"""CondConv (timm's CondConv2d, the *efficientnet_cc_* models): each image's own mix of experts' kernels."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import CondConv2d as TimmCondConv2d
from torch import nn

import convify
from convify.layers import CondConv2d
from hostile import assert_crafted_layer_refused


class Routed(nn.Module):
    """A body whose middle convolution is a CondConv routed by a global pool (as timm's CondConvResidual)."""

    def __init__(self, padding: str = "", groups: int = 1) -> None:
        super().__init__()
        out = 12 if groups == 1 else 8
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.routing = nn.Linear(8, 3)
        self.cond = TimmCondConv2d(8, out, 3, stride=2, padding=padding, groups=groups, bias=True, num_experts=3)
        self.fc = nn.Linear(out, 5)
        with torch.no_grad():
            self.cond.bias.normal_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        routing = torch.sigmoid(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        return torch.relu(self.cond(x, routing))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module", params=[("", 1), ("same", 1), ("", 8)], ids=["conv", "tf-same", "depthwise"])
def net(request) -> tuple[nn.Module, convify.FullyConvNet]:
    torch.manual_seed(0)
    model = Routed(*request.param).eval()
    return model, convify.convert(model, input_size=32)


def test_converts_exactly_as_global_context(net) -> None:
    model, fcn = net
    assert fcn.check["max_abs_diff"] < 1e-5 and not fcn.geometry.local and fcn.geometry.stride == 4
    assert [type(m) for m in fcn.modules() if isinstance(m, CondConv2d)] == [CondConv2d]
    assert fcn.geometry.size_dependent == model.cond.dynamic_padding  # tf "SAME": a SamePad2d in front


def test_maps_equal_the_original_layers_at_larger_sizes_and_batches(net, tmp_path) -> None:
    """Each cell is the original head on its window of the original body's map; each image routes its own kernels."""
    model, fcn = net
    x = torch.randn(3, 3, 49, 57)
    with torch.no_grad():
        features = model.features(x)
        expected = F.avg_pool2d(features, 8, stride=1)
        expected = model.fc(expected.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        maps = fcn(x)
        torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fcn(x[1:2]), maps[1:2], rtol=1e-4, atol=1e-5)  # not mixed across the batch
        torch.testing.assert_close(convify.load(fcn.save(tmp_path / "cc.fcn.pt"))(x), maps, rtol=0, atol=0)


@pytest.mark.parametrize("field, value", [("num_experts", 0), ("num_experts", 10 ** 7), ("kernel_size", 10 ** 6),
                                          ("padding", -1), ("groups", 5), ("stride", "1; import os"),
                                          ("bias", "yes")])
def test_a_crafted_cond_conv_in_a_file_is_refused(net, tmp_path, field, value) -> None:
    assert_crafted_layer_refused(net[1], tmp_path, "cond", field, value, 32)


def test_onnx_export_equals_torch(net, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    net[1].export_onnx(tmp_path / "cc.onnx")  # one convolution per expert, mixed: checked at five sizes
