"""convify.convert: exact equivalence at the native size, map sizes, rewrites, refusals."""
import copy
import importlib

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convify
from hostile import assert_crafted_layer_refused
from convify import ConversionError
from convify.layers import PointwiseConv2d, WindowLinear

TORCHVISION_ZOO = [
    "alexnet", "vgg11_bn", "vgg16", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
    "squeezenet1_0", "squeezenet1_1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5",
    "shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
    "googlenet", "inception_v3", "convnext_tiny",
]
FLATTENING_HEADS = {"alexnet", "vgg11_bn", "vgg16"}  # a Linear over the flattened map: WindowLinear
TIMM_ZOO = ["resnet18", "efficientnet_lite0", "mobilenetv3_large_100", "convnext_atto", "vgg11", "convnextv2_atto",
            "nf_regnet_b1", "convnext_zepto_rms", "tf_efficientnet_lite0", "hrnet_w18_small"]
WHOLE_STRIDES = {"hrnet_w18_small"}  # runs at multiples of its stride only, as the original does
NUM_CLASSES = 7
convert_module = importlib.import_module("convify.convert")


def build(source: str, name: str) -> tuple[nn.Module, int]:
    """A randomly initialised classifier with NUM_CLASSES outputs, and its native input size."""
    if source == "timm":
        return timm.create_model(name, num_classes=NUM_CLASSES).eval(), 224
    kwargs = {"num_classes": NUM_CLASSES}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(name, **kwargs).eval(), 299 if name == "inception_v3" else 224


def assert_equivalent(model: nn.Module, fcn: convify.FullyConvNet, x: torch.Tensor) -> None:
    """The 1x1 map equals the model's output (float32 defaults; float64 where convert found float32 rounding)."""
    with torch.no_grad():
        expected, actual = model(x), fcn(x)
    assert actual.shape == (*expected.shape, 1, 1)
    if fcn.check["dtype"] == "float64":  # a badly scaled random network: compare the maths in float64
        with torch.no_grad():
            expected = copy.deepcopy(model).double()(x.double())
            actual = copy.deepcopy(fcn).double()(x.double())
    torch.testing.assert_close(actual[..., 0, 0], expected)


@pytest.mark.parametrize("source,name", [("torchvision", n) for n in TORCHVISION_ZOO] + [("timm", n) for n in TIMM_ZOO])
def test_zoo_equals_original_at_native_size_and_maps_follow_geometry(source, name):
    model, size = build(source, name)
    fcn = convify.convert(model, input_size=size)
    assert not fcn.training
    assert_equivalent(model, fcn, torch.randn(1, 3, size, size))
    # a larger, non-square input: the map has the size the geometry predicts (HRNet fuses branches whose sizes
    # agree only at whole strides: there, the geometry says a size that does not run gives no map)
    height, width = (size + 64, size + 96) if name in WHOLE_STRIDES else (size + 40, size + 96)
    if name in WHOLE_STRIDES:
        assert min(fcn.geometry.output_size(size + 40, size + 96)) == 0
    heads = [m for m in fcn.net.modules() if isinstance(m, (WindowLinear, PointwiseConv2d))]
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0]))) for m in heads]
    with torch.no_grad():
        maps = fcn(torch.randn(1, 3, height, width))
    for hook in hooks:
        hook.remove()
    assert tuple(maps.shape[2:]) == fcn.geometry.output_size(height, width)
    assert maps.shape[:2] == (1, NUM_CLASSES)
    # every form of the head's layers gives the KxK (or 1x1) convolution's numbers on the map they saw
    assert any(isinstance(m, WindowLinear) for m in heads) == (name in FLATTENING_HEADS)
    assert len(seen) == len(heads)  # each ran once
    with torch.no_grad():
        for layer, features in seen:
            expected = F.conv2d(features, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
            forms = {form: layer.compute(features, form) for form in WindowLinear.FORMS} \
                if isinstance(layer, WindowLinear) else {"matmul": layer(features)}
            for form, out in forms.items():
                torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{form}: {m}")


def test_vgg16_at_384_gives_6x6_at_stride_32():
    fcn = convify.convert(torchvision.models.vgg16(), input_size=224)
    with torch.no_grad():
        maps = fcn(torch.randn(1, 3, 384, 384))
    assert maps.shape == (1, 1000, 6, 6)
    g = fcn.geometry
    assert (g.stride, g.window, g.offset) == (32, 224, 0)
    assert g.receptive_field == 212 + 6 * 32  # conv body's 212 px, then the 7x7 conv at stride 32
    assert g.cell_box(5, 2) == (64, 160, 288, 384)
    rewrites = [str(r) for r in fcn.rewrites]
    assert "classifier.0  Linear(25088 -> 4096)  ->  Conv2d(512 -> 4096, 7x7)" in rewrites
    assert "classifier.3  Linear(4096 -> 4096)  ->  Conv2d(4096 -> 4096, 1x1)" in rewrites
    assert "avgpool  AdaptiveAvgPool2d((7, 7))  ->  removed (identity at 224 px)" in rewrites


def test_resnet50_at_288_gives_3x3_with_a_stride_1_pool():
    fcn = convify.convert(torchvision.models.resnet50(num_classes=NUM_CLASSES), input_size=224)
    with torch.no_grad():
        assert fcn(torch.randn(2, 3, 288, 288)).shape == (2, NUM_CLASSES, 3, 3)
    assert "avgpool  AdaptiveAvgPool2d((1, 1))  ->  AvgPool2d(7x7, stride 1)" in [str(r) for r in fcn.rewrites]
    assert isinstance(fcn.net.get_submodule("avgpool"), nn.AvgPool2d)


# --------------------------------------------------------------------------------------------------
# A padding-free network: every cell equals the original classifier on the crop at cell_box


class ValidNet(nn.Module):
    """No padding anywhere; a channels-last flatten (permute then reshape) feeding a Linear head."""

    def __init__(self, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2),          # 36 -> 34 -> 17
            nn.Conv2d(8, 12, 3, stride=2), nn.ReLU(),                # 17 -> 8
            nn.AvgPool2d(2),                                         # 8 -> 4
        )
        self.fc1 = nn.Linear(12 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        x = self.body(x)
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        x = x.reshape(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class ValidPoolNet(nn.Module):
    """No padding; a global average pool then Linear."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean([2, 3]))


class ChannelNorms(nn.Module):
    """Norms written out over the channels, as timm's RmsNorm2d and LayerNorm2d are: an RMS norm
    (``mean(x**2, 1)``, ``rsqrt``), a layer norm (``var_mean``) and a std in the body, an RMS norm (``square``,
    ``mean`` over the last dimension) and ``var`` in the head. No padding: cells are the original on crops."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 5, stride=2), nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.a(x)
        x = x * torch.rsqrt(torch.mean(x.pow(2), dim=1, keepdim=True) + 1e-5)
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        x = self.b((x - mean) * torch.rsqrt(var + 1e-5))
        x = x / (x.std(dim=(1,), keepdim=True) + 1.0)
        v = x.mean((2, 3))
        v = v * torch.rsqrt(torch.square(v).mean(-1, keepdim=True) + 1e-5)
        return self.fc(v) + torch.var(v, dim=1, keepdim=True)


@pytest.mark.parametrize("model,size", [(ValidNet(), 36), (ValidNet(channels_last=False), 36), (ValidPoolNet(), 33),
                                        (ChannelNorms(), 33)])
def test_padding_free_cells_equal_the_original_on_their_crops(model, size):
    model.eval()
    fcn = convify.convert(model, input_size=size)
    g = fcn.geometry
    assert not g.padded and g.local
    assert g.receptive_field == g.window  # nothing outside the window can reach a cell
    x = torch.randn(1, 3, size + 3 * g.stride + 5, size + 4 * g.stride + 2)
    with torch.no_grad():
        maps = fcn(x)
        assert tuple(maps.shape[2:]) == g.output_size(x.shape[2], x.shape[3])
        assert maps.shape[2] >= 4 and maps.shape[3] >= 5
        for i in range(maps.shape[2]):
            for j in range(maps.shape[3]):
                x0, y0, x1, y1 = g.cell_box(i, j)
                assert g.rf_box(i, j) == (x0, y0, x1, y1)
                torch.testing.assert_close(maps[0, :, i, j], model(x[:, :, y0:y1, x0:x1])[0])


def test_geometry_of_a_padding_free_net_is_closed_form():
    g = convify.convert(ValidNet().eval(), input_size=36).geometry
    # conv3 (1) -> pool2 (2) -> conv3/2 (4) -> pool2 (8) -> 4x4 head conv at stride 8
    assert g.stride == 8
    assert g.min_input_size() == 36
    assert g.output_size(35) == (0, 0)
    assert g.output_size(36 + 8) == (2, 2)


# --------------------------------------------------------------------------------------------------
# Custom heads


class BatchNormHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 6), nn.LogSoftmax(dim=-1),
        )
        with torch.no_grad():  # non-trivial running statistics
            self.classifier[2].running_mean.uniform_(-1, 1)
            self.classifier[2].running_var.uniform_(0.5, 2)
            self.classifier[2].weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class TwoOutputHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.cls = nn.Linear(16, 5)
        self.box = nn.Linear(16, 4)

    def forward(self, x):
        v = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.cls(v).softmax(dim=1), torch.sigmoid(self.box(v))


def test_batchnorm1d_layernorm_and_logsoftmax_heads_run_per_position():
    model = BatchNormHead().eval()
    fcn = convify.convert(model, input_size=32)
    assert_equivalent(model, fcn, torch.randn(3, 3, 32, 32))
    assert isinstance(fcn.net.get_submodule("classifier.2"), nn.BatchNorm2d)
    assert fcn.net.get_submodule("classifier.9").dim == 1
    # every cell is the head applied to that position's pooled features
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        maps = fcn(x)
        pooled = F.avg_pool2d(model.features(x), 8, stride=1)  # (1, 16, H', W')
        for i in range(maps.shape[2]):
            for j in range(maps.shape[3]):
                expected = model.classifier(pooled[:, :, i:i + 1, j:j + 1])
                torch.testing.assert_close(maps[:, :, i, j], expected)


def test_two_output_head_keeps_both_maps():
    model = TwoOutputHead().eval()
    fcn = convify.convert(model, input_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, actual = model(x), fcn(x)
    assert isinstance(actual, tuple) and len(actual) == 2
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a[..., 0, 0], e)
    with torch.no_grad():
        cls_map, box_map = fcn(torch.randn(1, 3, 64, 96))
    assert fcn.geometry.stride == 2 and fcn.geometry.output_size(64, 96) == (17, 33)
    assert cls_map.shape == (1, 5, 17, 33) and box_map.shape == (1, 4, 17, 33)
    torch.testing.assert_close(cls_map.sum(1), torch.ones(1, 17, 33))  # softmax over classes, per cell


# --------------------------------------------------------------------------------------------------
# Global context, refusals, the caller's model


def test_squeeze_excitation_converts_but_is_recorded_as_not_local():
    fcn = convify.convert(torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES))
    assert not fcn.geometry.local
    assert "features.1.block.1.avgpool" in fcn.geometry.global_context
    assert convify.convert(torchvision.models.resnet18(num_classes=NUM_CLASSES)).geometry.local


def test_convnext_v2s_global_response_norm_is_global_context_and_round_trips(tmp_path):
    """GRN divides by the L2 norm over H and W (``x.norm(dim=(1, 2))``): like SE, every cell sees the image."""
    model = timm.create_model("convnextv2_atto", num_classes=NUM_CLASSES).eval()
    fcn = convify.convert(model, input_size=224)
    assert not fcn.geometry.local and "norm" in fcn.geometry.global_context
    x = torch.randn(1, 3, 256, 288)
    loaded = convify.load(fcn.save(tmp_path / "v2.fcn.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fcn(x), rtol=0, atol=0)


class EfficientChannelAttention(nn.Module):
    """ECA-Net: a 1-D convolution across the pooled channel vector gates the channels (global context)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gate = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.gate(x.mean((2, 3)).view(x.shape[0], 1, -1)).sigmoid().view(x.shape[0], -1, 1, 1)
        return self.fc((x * y).mean((2, 3)))


class EvoNorms(nn.Module):
    """timm's EvoNorm-B0 (running variance expanded to the map, instance std), -S0 (group std expanded to the map)
    and FilterResponseNorm: statistics in float32, cast back with ``.to(x.dtype)`` or ``.to(dtype=...)``."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d

        self.conv1, self.norm1 = nn.Conv2d(3, 16, 3, stride=2), EvoNorm2dB0(16)
        self.conv2, self.norm2 = nn.Conv2d(16, 16, 3, stride=2), EvoNorm2dS0(16, group_size=8)
        self.frn = FilterResponseNormTlu2d(16)  # x.to(dtype=...), torch.maximum with a threshold
        self.fc = nn.Linear(16, 3)
        with torch.no_grad():
            self.norm1.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(self.frn(self.norm2(self.conv2(self.norm1(self.conv1(x))))).mean((2, 3)))


def test_evonorms_convert_as_global_context_and_round_trip(tmp_path):
    """The group and instance statistics see the whole map (global context); a constant expanded to the map's
    size is no map of its own; ``Tensor.to(dtype)`` is saved as ``convify.ops.cast``."""
    model = EvoNorms().eval()
    fcn = convify.convert(model, input_size=32)
    assert fcn.check["max_abs_diff"] < 1e-5 and not fcn.geometry.local and fcn.geometry.stride == 4
    assert any(getattr(node.target, "__name__", "") == "cast" for node in fcn.net.graph.nodes)
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        maps = fcn(x)
        assert tuple(maps.shape[2:]) == fcn.geometry.output_size(45, 61)
        torch.testing.assert_close(convify.load(fcn.save(tmp_path / "evo.fcn.pt"))(x), maps, rtol=0, atol=0)


def test_eca_channel_attention_converts_as_global_context(tmp_path):
    fcn = convify.convert(EfficientChannelAttention().eval(), input_size=32)
    assert fcn.check["max_abs_diff"] < 1e-6 and not fcn.geometry.local
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(convify.load(fcn.save(tmp_path / "eca.fcn.pt"))(x), fcn(x), rtol=0, atol=0)


@pytest.mark.parametrize("field, value", [("out_channels", 3_000_000), ("in_channels", 10 ** 12),
                                          ("kernel_size", 10 ** 9), ("padding_mode", "__import__('os').system('x')"),
                                          ("groups", 0), ("stride", "1; import os")])
def test_a_crafted_conv1d_in_a_file_is_refused(tmp_path, field, value):
    """The new conv1d layer read from a file is hostile input: a declared size its weights do not have, or an
    argument that is code, is one ModelLoadError (at load, or for a string argument, which torch's constructor
    takes apart into characters, at the first run), with nothing allocated and nothing run."""
    fcn = convify.convert(EfficientChannelAttention().eval(), input_size=32)
    assert_crafted_layer_refused(fcn, tmp_path, "gate", field, value, 32)


class SkipInitGain(nn.Module):
    """NF-Net's residual branch: ``out.mul_(gain)`` in place, its result unused (timm's skipinit_gain)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.branch = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.tensor(0.25))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv(x)
        out = self.branch(x)
        out.mul_(self.gain)
        return self.fc((out + x).mean((2, 3)))


def test_an_in_place_operation_whose_result_is_unused_is_kept():
    """Dropping ``out.mul_(gain)`` as dead code (fx's own rule) would change every output: dm_nfnet did."""
    model = SkipInitGain().eval()
    fcn = convify.convert(model, input_size=32)
    assert fcn.check["max_abs_diff"] < 1e-6
    assert any(node.target == "mul_" for node in fcn.net.graph.nodes)


def test_vit_is_refused_with_a_reason():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=3)
    with pytest.raises(ConversionError, match="attention"):
        convify.convert(vit, input_size=32)


def test_swin_is_refused():
    swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 1],
                                              window_size=[4, 4], num_classes=3)
    with pytest.raises(ConversionError, match="does not support|attention|token"):
        convify.convert(swin, input_size=64)


@pytest.mark.parametrize("name, layer", [("botnet26t_256", "'stages.2.1.self_attn' (BottleneckAttn)"),
                                         ("halonet26t", "'stages.2.1.self_attn' (HaloAttn)"),
                                         ("lambda_resnet26t", "'stages.2.1.self_attn' (LambdaLayer)")])
def test_attention_in_the_body_is_refused_as_attention_naming_the_layer(name: str, layer: str) -> None:
    model = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    with pytest.raises(ConversionError) as refused:
        convify.convert(model, input_size=256, check=False)
    message = str(refused.value)
    assert message.startswith(layer + " computes ") and "is attention" in message, message


class Mixer(nn.Module):
    """Self-attention under a name that does not say so: queries times keys, softmax, times values."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)  # (N, C, HW) each
        weights = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (N, HW, HW)
        return (v @ weights.transpose(1, 2)).reshape(n, c, h, w)


class WeightProduct(nn.Module):
    """A product with a weight (a Linear written as ``@``): unsupported, but not attention."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.permute(0, 2, 3, 1) @ self.weight).permute(0, 3, 1, 2)


class UnknownThenMixer(nn.Module):
    """An unknown operation (a weight product) before attention: the reason given is the attention."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first, self.then = WeightProduct(channels), Mixer(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then(self.first(x))


class GatedAttention(nn.Module):
    """A layer named for attention, built only of operations convify knows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class UnknownBesideGate(nn.Module):
    """An unknown operation outside attention, attention of known operations after it (MobileViT-v2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first, self.then = WeightProduct(channels), GatedAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then(self.first(x))


@pytest.mark.parametrize("body, message", [
    (UnknownBesideGate, r"^the model holds attention \('body\.1\.then' \(GatedAttention\)\), and 'matmul' "),
    (Mixer, r"^'body\.1' \(Mixer\) computes 'matmul' \(_operator\.matmul\), which is attention \(or token mixing\): "
             r"it mixes positions"),
    (WeightProduct, r"^'matmul' \(_operator\.matmul\) is an operation convify does not support"),
    (UnknownThenMixer, r"^'body\.1\.then' \(Mixer\) computes 'matmul_\d' \(_operator\.matmul\), which is attention"),
])
def test_a_product_of_two_maps_is_attention_and_a_product_with_a_weight_is_not(body, message) -> None:
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), body(8)))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(8, 3))
    with pytest.raises(ConversionError, match=message):
        convify.convert(model.eval(), input_size=32, check=False)


class TokenMixingHead(nn.Module):
    """A head that mixes positions: a Linear over the flattened spatial positions of each channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.mix = nn.Linear(64, 2)

    def forward(self, x):
        return self.mix(self.conv(x).flatten(2)).flatten(1)


def test_a_head_that_mixes_positions_is_refused():
    with pytest.raises(ConversionError, match="token"):
        convify.convert(TokenMixingHead().eval(), input_size=32)


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.mean() > 0:  # depends on pixel values: no single graph equals this
            x = -x
        return self.fc(self.conv(x).mean([2, 3]))


class BranchesOnDevice(nn.Module):
    """Branches on the map's device and dtype (EfficientViT's ``v.device.type != "meta"``): metadata, not values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, stride=2), nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.device.type != "meta" and x.dtype != torch.float16:
            x = x.relu()
        return self.fc(x.mean((2, 3)))


class AutocastOff(BranchesOnDevice):
    """EfficientViT's ``with torch.autocast(device_type=x.device.type, enabled=False)``: a string, not a proxy."""

    def forward(self, x):
        x = self.conv(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = torch.sigmoid(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("model", [BranchesOnDevice, AutocastOff])
def test_branches_on_device_and_dtype_follow_the_example(model):
    fcn = convify.convert(model().eval(), input_size=16)
    assert fcn.check["max_abs_diff"] < 1e-6
    assert any(node.target in ("relu", torch.sigmoid) or getattr(node.target, "__name__", "") == "sigmoid"
               for node in fcn.net.graph.nodes)


def test_branches_on_values_are_refused():
    with pytest.raises(ConversionError, match="branches on tensor values"):
        convify.convert(ValueBranch().eval(), input_size=16)


def test_input_size_too_small_is_refused():
    with pytest.raises(ConversionError, match="input_size"):
        convify.convert(ValidNet().eval(), input_size=8)


def test_non_module_is_refused():
    with pytest.raises(ConversionError, match="nn.Module"):
        convify.convert("resnet18")


def test_the_callers_model_is_not_changed():
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    fcn = convify.convert(model)
    assert model.training  # flag untouched
    assert repr(model) == structure
    assert isinstance(model.fc, nn.Linear) and isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.requires_grad for p in model.parameters())
    # and the converted network does not share the caller's parameters
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in fcn.parameters())


def test_a_wrong_rewrite_is_caught_and_the_first_differing_layer_named(monkeypatch):
    rule = convert_module._HEAD_RULES["linear"]

    def wrong_linear(self, node, value, inputs, out_shape):
        assert rule(self, node, value, inputs, out_shape)
        with torch.no_grad():
            for module in self.new_modules.values():
                if isinstance(module, nn.Conv2d):
                    module.weight.mul_(1.01)
        return True

    monkeypatch.setitem(convert_module._HEAD_RULES, "linear", wrong_linear)
    with pytest.raises(ConversionError, match=r"first layer that differs: 'classifier\.1'"):
        convify.convert(BatchNormHead().eval(), input_size=32)


class PoolHead(nn.Module):
    """A tiny body (8x8 map at 32 px) with one of the global-pool spellings convify rewrites."""

    def __init__(self, pool: str):
        super().__init__()
        self.pool = pool
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fixed = nn.AvgPool2d(8)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.body(x)
        if self.pool == "fixed_avg_pool":  # old-style ResNets: a fixed window that is the whole map
            x = self.fixed(x).flatten(1)
        elif self.pool == "adaptive_max":
            x = F.adaptive_max_pool2d(x, (1, 1)).view(x.size(0), -1)
        elif self.pool == "amax":
            x = x.amax(dim=(-2, -1))
        elif self.pool == "channels_last_mean":
            x = x.permute(0, 2, 3, 1).mean((1, 2))
        return self.fc(x)


@pytest.mark.parametrize("pool", ["fixed_avg_pool", "adaptive_max", "amax", "channels_last_mean"])
def test_every_global_pool_spelling_becomes_a_stride_1_pool(pool):
    model = PoolHead(pool).eval()
    fcn = convify.convert(model, input_size=32)
    assert_equivalent(model, fcn, torch.randn(2, 3, 32, 32))
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        maps = fcn(x)
        features = model.body(x)  # (1, 6, 12, 16): 5x9 windows of 8x8 at stride 1
        reduce = F.max_pool2d if pool in ("adaptive_max", "amax") else F.avg_pool2d
        expected = model.fc(reduce(features, 8, stride=1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert maps.shape == (1, 3, 5, 9) == (1, 3, *fcn.geometry.output_size(48, 64))
    torch.testing.assert_close(maps, expected)
    if pool == "fixed_avg_pool":
        assert "fixed  AvgPool2d(8x8, stride 8)  ->  AvgPool2d(8x8, stride 1)" in [str(r) for r in fcn.rewrites]


def test_an_input_size_beyond_the_limit_is_refused_before_any_work() -> None:
    from convify import LimitError, limits

    with pytest.raises(LimitError, match=f"more than the {limits.MAX_INPUT_SIZE} px"):
        convify.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 10 ** 12)
