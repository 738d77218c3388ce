"""Attention-pooling heads (CLIP's ResNets, timm's AttentionPool2d): the original head on every window of the map.

The reference is the original head module itself, run on each window of the original body's map.
"""
import pytest
import torch
from timm.layers import AttentionPool2d
from torch import nn

import convify
from hostile import assert_crafted_layer_refused
from convify.finer import finer_stride
from convify.layers import WindowAttentionPool2d
from convify.tiling import tiled_map


class AttnPoolNet(nn.Module):
    """A convolutional body (stride 4, a 6x6 map at 24 px) and an attention-pool head, maybe a Linear after it."""

    def __init__(self, feat_size: int = 6, linear_after: bool = False, **pool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        pool.setdefault("out_features", 0 if linear_after else 5)
        self.head = AttentionPool2d(16, feat_size=feat_size, num_heads=2, **pool)
        with torch.no_grad():  # a visible class token and biases (timm starts them at zero)
            for p in self.head.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.fc = nn.Linear(16, 5) if linear_after else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.body(x)))


VARIANTS = {
    "qkv": {}, "separate": {"qkv_separate": True}, "class-token": {"class_token": True},
    "resampled-pos": {"feat_size": 4}, "linear-after": {"linear_after": True},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def net(request) -> tuple[nn.Module, convify.FullyConvNet]:
    torch.manual_seed(0)
    model = AttnPoolNet(**VARIANTS[request.param]).eval()
    return model, convify.convert(model, input_size=24)


def test_exact_at_the_native_size_and_a_window_in_the_geometry(net) -> None:
    model, fcn = net
    g = fcn.geometry
    assert fcn.check["max_abs_diff"] < 1e-5
    assert g.local and g.stride == 4 and [m.window for m in fcn.modules() if isinstance(m, WindowAttentionPool2d)] \
        == [(6, 6)]
    assert any("WindowAttentionPool2d" in r.after for r in fcn.rewrites)


def test_each_cell_is_the_original_head_on_its_window_of_the_map(net) -> None:
    model, fcn = net
    x = torch.randn(2, 3, 44, 52)
    with torch.no_grad():
        features = model.body(x)  # (2, 16, 11, 13)
        maps = fcn(x)
        assert tuple(maps.shape[2:]) == fcn.geometry.output_size(44, 52) == (6, 8)
        for i in range(maps.shape[2]):
            for j in range(maps.shape[3]):
                expected = model.fc(model.head(features[:, :, i:i + 6, j:j + 6]))
                torch.testing.assert_close(maps[:, :, i, j], expected, rtol=1e-4, atol=1e-5)


def test_tiles_save_load_and_many_windows_in_chunks(net, tmp_path, monkeypatch) -> None:
    model, fcn = net
    x = torch.randn(1, 3, 140, 120)
    with torch.no_grad():
        whole = fcn(x)
        monkeypatch.setattr(WindowAttentionPool2d, "POSITIONS_PER_CHUNK", 7)  # many chunks of windows
        torch.testing.assert_close(fcn(x), whole)
        torch.testing.assert_close(tiled_map(fcn, x, max_memory=300_000), whole[0])
        torch.testing.assert_close(convify.load(fcn.save(tmp_path / "ap.fcn.pt"))(x), whole, rtol=0, atol=0)
    with pytest.raises(convify.ConversionError):
        finer_stride(fcn, 2)


@pytest.mark.parametrize("field, value", [("window", 10 ** 6), ("num_heads", 0), ("num_heads", 3),
                                          ("out_features", -1), ("class_token", "yes"), ("embed_dim", 10 ** 9),
                                          ("in_features", "16; import os"), ("window", [6, 6, 6])])
def test_a_crafted_attention_pool_in_a_file_is_refused(tmp_path, field, value) -> None:
    torch.manual_seed(0)
    assert_crafted_layer_refused(convify.convert(AttnPoolNet().eval(), input_size=24), tmp_path, "head", field, value, 24)


@pytest.mark.parametrize("variant", ["qkv", "class-token"])
def test_onnx_export_equals_torch(variant, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    fcn = convify.convert(AttnPoolNet(feat_size=4, **VARIANTS[variant]).eval(), input_size=16)  # 4x4 windows
    fcn.export_onnx(tmp_path / "ap.onnx")  # checked with onnxruntime at five sizes before it is kept
