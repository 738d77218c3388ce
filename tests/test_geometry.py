"""Geometry is arithmetic, and the arithmetic must match real runs: map sizes, the smallest input, receptive
fields and cell boxes, checked against forward passes, gradients and closed-form numbers.
"""
from __future__ import annotations

import copy
import json
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convify
from convify import Geometry

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

NUM_CLASSES = 5
Converted = Callable[[str], convify.FullyConvNet]


# --------------------------------------------------------------------------------------------------
# Hand-built networks


class PaddingFree(nn.Module):
    """No padding anywhere. 38 px: conv5 -> 34, pool2 -> 17, conv3/2 -> 8, conv3 -> 6, global mean (6x6 at stride 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(6, 8, 3, stride=2),
                                  nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean([2, 3]))


class AsymmetricPad(nn.Module):
    """A pad of ``(left, right, top, bottom) = (a, b, a, b)`` then conv3, avg pool 2, conv3/2 padding 1, global mean.

    Only average pools and no ReLU, so with positive weights every pixel of the receptive field gets a gradient.
    """

    def __init__(self, before: int, after: int, functional: bool = False) -> None:
        super().__init__()
        self.pads = (before, after, before, after)
        self.pad = None if functional else nn.ZeroPad2d(self.pads)
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pads) if self.pad is None else self.pad(x)
        return self.fc(self.conv2(self.pool(self.conv1(x))).mean([2, 3]))

    def reference_size(self, n: int, native: int) -> int:
        """The map length for ``n`` input pixels, in closed form (0: no map)."""
        def body(n: int) -> int:
            n = n + sum(self.pads[:2]) - 2    # pad, conv3
            n = n // 2                        # avg pool 2
            return (n + 2 - 3) // 2 + 1       # conv3/2, padding 1
        head = body(native)                   # the global mean becomes a head x head pool
        return max(body(n) - head + 1, 0) if n + sum(self.pads[:2]) >= 3 and body(n) >= 1 else 0


class SamePadding(nn.Module):
    """``padding="same"`` with an even kernel: PyTorch pads 1 before and 2 after (total 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 4, padding="same")
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.avg_pool2d(self.conv2(self.conv1(x)), 2).mean([2, 3]))


class TinyCeil(nn.Module):
    """conv3/2 then a ceil_mode max pool 3/2: at 5 px the pool sees a 2x2 map and still gives 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fc = nn.Linear(4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).mean([2, 3]))


class CeilOverhang(nn.Module):
    """No padding, but at 16 px the ceil_mode pool's last window hangs one pixel past the map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fc = nn.Linear(4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(F.relu(self.conv(x))).mean([2, 3]))


def _torchvision(name: str) -> nn.Module:
    kwargs = {"num_classes": NUM_CLASSES}
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(name, **kwargs).eval()


# --------------------------------------------------------------------------------------------------
# Converted networks, each converted once per module

_BUILDERS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # small native sizes keep the dozen forward passes per network cheap; the geometry is the same arithmetic
    "resnet18@64": (lambda: _torchvision("resnet18"), 64),                # stride-2 padded convs, padded max pool
    "squeezenet1_1@64": (lambda: _torchvision("squeezenet1_1"), 64),      # ceil_mode max pools
    "googlenet@64": (lambda: _torchvision("googlenet"), 64),              # ceil_mode pools, inception branches
    "mobilenet_v3_small@64": (lambda: _torchvision("mobilenet_v3_small"), 64),  # depthwise, squeeze-excitation
    "padding_free@38": (lambda: PaddingFree().eval(), 38),
    "zero_pad_1_2@20": (lambda: AsymmetricPad(1, 2).eval(), 20),
    "f_pad_2_1@21": (lambda: AsymmetricPad(2, 1, functional=True).eval(), 21),
    "same_even_kernel@18": (lambda: SamePadding().eval(), 18),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted() -> Converted:
    """``converted(key)``: the network of ``_BUILDERS[key]`` converted at its native size, once per module."""
    cache: dict[str, convify.FullyConvNet] = {}

    def get(key: str) -> convify.FullyConvNet:
        if key not in cache:
            build, size = _BUILDERS[key]
            torch.manual_seed(0)
            cache[key] = convify.convert(build(), input_size=size, check=False)
        return cache[key]

    return get


def _real_size(fcn: nn.Module, height: int, width: int) -> Optional[tuple[int, int]]:
    """The map size a real run gives, or None when the network cannot run at that size."""
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height * 1000 + width))
    try:
        with torch.inference_mode():
            out = fcn(x)
    except RuntimeError:
        return None
    return tuple(out.shape[2:])


def _sizes(g: Geometry) -> list[tuple[int, int]]:
    """A dozen inputs around the native size: multiples of the stride or not, square or not, the smallest."""
    s, n, m = g.stride, g.window, g.min_input_size()
    return sorted({(m, m), (m + 1, m + 1), (n - 1, n - 1), (n, n), (n + 1, n + 1), (n + s // 2 + 1, n + s // 2 + 1),
                   (n + s - 1, n + s - 1), (n + s, n + s), (n + 2 * s + 3, n + 2 * s + 3), (n + 5, n + 2 * s),
                   (n + 3 * s - 1, n + 1), (m, n + s + 7)})


# --------------------------------------------------------------------------------------------------
# Map sizes and the smallest input


@pytest.mark.parametrize("key", list(_BUILDERS))
def test_output_size_matches_real_runs(key: str, converted: Converted) -> None:
    fcn = converted(key)
    g = fcn.geometry
    assert g.output_size(g.window) == (1, 1)
    for height, width in _sizes(g):
        expected = g.output_size(height, width)
        assert _real_size(fcn, height, width) == (expected if min(expected) >= 1 else None), (height, width)
        assert g.output_size(height, width) == fcn.output_size(height, width)
        assert g.output_size(height, width) == (g.output_size(height)[0], g.output_size(width)[1])


@pytest.mark.parametrize("key", ["squeezenet1_1@64", "padding_free@38", "zero_pad_1_2@20", "f_pad_2_1@21",
                                 "same_even_kernel@18"])
def test_output_size_matches_real_runs_at_every_size(key: str, converted: Converted) -> None:
    fcn = converted(key)
    g = fcn.geometry
    for height in range(g.min_input_size() - 2, g.window + 2 * g.stride + 2):  # every size: ceil, floor, pads
        width = height + 7
        expected = g.output_size(height, width)
        assert _real_size(fcn, height, width) == (expected if min(expected) >= 1 else None), (height, width)


@pytest.mark.parametrize("key", list(_BUILDERS))
def test_min_input_size_is_the_smallest_that_runs(key: str, converted: Converted) -> None:
    fcn = converted(key)
    g = fcn.geometry
    m = g.min_input_size()
    assert 1 <= m <= g.window
    assert g.output_size(m) >= (1, 1) and _real_size(fcn, m, m) == g.output_size(m)
    assert g.output_size(m - 1) == (0, 0)
    assert _real_size(fcn, m - 1, m - 1) is None  # the network cannot run there
    assert g.output_size(m - 1, m)[0] == 0 and g.output_size(m, m - 1)[1] == 0
    assert _real_size(fcn, m, m - 1) is None


def test_padding_free_sizes_are_closed_form(converted: Converted) -> None:
    g = converted("padding_free@38").geometry
    assert (g.stride, g.window, g.offset, g.min_input_size()) == (4, 38, 0, 38)
    for n in range(30, 80):  # one new cell every 4 px from 38 on
        expected = (n - 38) // 4 + 1 if n >= 38 else 0
        assert g.output_size(n, 2 * n) == (expected, (2 * n - 38) // 4 + 1 if 2 * n >= 38 else 0)


@pytest.mark.parametrize("key", ["zero_pad_1_2@20", "f_pad_2_1@21"])
def test_asymmetric_pad_sizes_are_closed_form(key: str, converted: Converted) -> None:
    build, native = _BUILDERS[key]
    model, g = build(), converted(key).geometry
    for n in range(1, 90):
        assert g.output_size(n)[0] == model.reference_size(n, native), n
    assert g.min_input_size() == min(n for n in range(1, 90) if model.reference_size(n, native) >= 1)


# --------------------------------------------------------------------------------------------------
# Receptive fields against gradients


def _positive(fcn: convify.FullyConvNet) -> nn.Module:
    """A float64 copy whose every weight is positive: no cancellation, so the gradient reaches the whole field."""
    net = copy.deepcopy(fcn).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.abs() + 0.01)
    return net


def _support(net: nn.Module, height: int, width: int, i: int, j: int) -> tuple[int, int, int, int]:
    """The box ``(x0, y0, x1, y1)`` of input pixels whose gradient for cell ``(i, j)`` is non-zero."""
    x = torch.rand(1, 3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    x.requires_grad_(True)
    net(x)[0, :, i, j].sum().backward()
    touched = x.grad[0].abs().sum(0) > 0  # (H, W)
    rows, cols = touched.any(1).nonzero().flatten(), touched.any(0).nonzero().flatten()
    box = (cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1)
    assert touched[box[1]:box[3], box[0]:box[2]].all(), "the field has holes"
    return box


def _clip(box: tuple[int, int, int, int], height: int, width: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))


# rf_offset: minus each pad before the map, times the layer's jump; receptive field: 1 + sum of (kernel - 1) * jump
@pytest.mark.parametrize("key,rf_offset,receptive_field", [
    # pad 1 | conv3 | avg pool 2 | conv3/2 pad 1 at jump 2 | 5x5 head pool at jump 4
    ("zero_pad_1_2@20", -1 - 1 * 2, 1 + 2 + 1 + 2 * 2 + 4 * 4),
    # pad 2 | conv3 | avg pool 2 | conv3/2 pad 1 at jump 2 | 6x6 head pool at jump 4
    ("f_pad_2_1@21", -2 - 1 * 2, 1 + 2 + 1 + 2 * 2 + 5 * 4),
    # conv4 "same" pads (1, 2) | conv3/2 | avg pool 2 at jump 2 | 4x4 head pool at jump 4
    ("same_even_kernel@18", -1, 1 + 3 + 2 + 1 * 2 + 3 * 4),
    # conv5 | avg pool 2 | conv3/2 at jump 2 | conv3 at jump 4 | 6x6 head pool at jump 4
    ("padding_free@38", 0, 1 + 4 + 1 + 2 * 2 + 2 * 4 + 5 * 4),
])
def test_receptive_field_is_where_the_gradient_reaches(key: str, rf_offset: int, receptive_field: int,
                                                      converted: Converted) -> None:
    fcn = converted(key)
    g = fcn.geometry
    assert (g.rf_offset, g.receptive_field) == (rf_offset, receptive_field)
    net = _positive(fcn)
    height, width = g.window + 3 * g.stride + 1, g.window + 4 * g.stride + 2
    rows, cols = g.output_size(height, width)
    assert rows >= 4 and cols >= 5
    for i, j in [(0, 0), (1, 2), (rows - 1, cols - 1), (rows // 2, 0), (0, cols - 1)]:
        assert _support(net, height, width, i, j) == _clip(g.rf_box(i, j), height, width), (i, j)


# --------------------------------------------------------------------------------------------------
# Closed-form numbers


class NarrowVGG16(nn.Module):
    """VGG16's layers (configuration "D": 13 3x3 convs with padding 1, 5 2x2 max pools, a 7x7 adaptive pool, a
    three-Linear head) with 8 channels instead of 64-512, so converting it at 224 px is cheap. Geometry depends on
    the layers only; tests/test_convert.py converts the full-width vgg16."""

    def __init__(self) -> None:
        super().__init__()
        cfg = [v if v == "M" else 8 for v in torchvision.models.vgg.cfgs["D"]]
        self.features = torchvision.models.vgg.make_layers(cfg)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(8 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.fixture(scope="module")
def vgg16_geometry() -> Geometry:
    model = NarrowVGG16().eval()
    assert [type(m) for m in model.features] == [type(m) for m in torchvision.models.vgg.make_layers(
        torchvision.models.vgg.cfgs["D"])]
    return convify.convert(model, input_size=224, check=False).geometry


def test_vgg16_receptive_field(vgg16_geometry: Geometry) -> None:
    g = vgg16_geometry
    # 13 3x3 convs with padding 1 and 5 2x2 pools: 212 px at stride 32, then the 7x7 head conv adds 6 * 32
    jumps = [1, 1, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]
    assert 1 + sum(2 * j for j in jumps) + sum(2 ** k for k in range(5)) == 212
    assert (g.stride, g.window, g.offset) == (32, 224, 0)
    assert g.receptive_field == 212 + 6 * 32 == 404
    assert g.rf_offset == -sum(jumps) == -90  # each conv's 1 px of padding, at its jump
    assert g.padded and g.local and g.global_context == ()
    assert g.min_input_size() == 224 and g.output_size(223) == (0, 0)
    assert g.output_size(384) == (6, 6) and g.output_size(255, 256) == (1, 2)


@pytest.fixture(scope="module")
def resnet18_geometry() -> Geometry:
    return convify.convert(_torchvision("resnet18"), input_size=224, check=False).geometry


def test_resnet18_receptive_field_and_boxes(resnet18_geometry: Geometry) -> None:
    g = resnet18_geometry
    assert (g.stride, g.window, g.offset) == (32, 224, 0)
    # conv1 7x7/2 (6), max pool 3x3/2 at 2 (4), 3x3 convs: 4 at 4, 1 at 4 + 3 at 8, 1 at 8 + 3 at 16, 1 at 16 + 3 at 32
    body = 1 + 6 + 2 * 2 + 2 * (4 * 4 + 4 + 3 * 8 + 8 + 3 * 16 + 16 + 3 * 32)
    assert body == 435
    assert g.receptive_field == 435 + 6 * 32 == 627  # the 7x7 average pool at stride 32
    assert g.rf_offset == -(3 + 1 * 2 + 4 * 4 + 4 + 3 * 8 + 8 + 3 * 16 + 16 + 3 * 32) == -217
    assert g.padded and g.local and g.global_context == ()

    assert g.cell_box(0, 0) == (0, 0, 224, 224)
    assert g.cell_box(1, 2) == (64, 32, 288, 256)
    assert g.cell_box(3, 0) == (0, 96, 224, 320)
    assert g.rf_box(0, 0) == (-217, -217, 410, 410)
    assert g.rf_box(1, 2) == (-217 + 64, -217 + 32, -217 + 64 + 627, -217 + 32 + 627)
    assert g.cell_center(0, 0) == (112.0, 112.0)
    assert g.cell_center(1, 2) == (176.0, 144.0)
    for i, j in [(0, 0), (2, 5), (7, 1)]:
        x0, y0, x1, y1 = g.cell_box(i, j)
        assert (x1 - x0, y1 - y0) == (224, 224) and (x0, y0) == (32 * j, 32 * i)
        rx0, ry0, rx1, ry1 = g.rf_box(i, j)
        assert (rx1 - rx0, ry1 - ry0) == (627, 627) and (rx0 - x0, ry0 - y0) == (-217, -217)
        assert g.cell_center(i, j) == ((x0 + x1) / 2, (y0 + y1) / 2)


def test_strides_and_flags_of_the_zoo(converted: Converted) -> None:
    assert converted("resnet18@64").geometry.stride == 32
    assert converted("squeezenet1_1@64").geometry.stride == 16
    assert converted("googlenet@64").geometry.stride == 32
    assert converted("mobilenet_v3_small@64").geometry.stride == 32
    free = converted("padding_free@38").geometry
    assert not free.padded and free.local and free.receptive_field == free.window == 38
    assert free.rf_box(2, 3) == free.cell_box(2, 3) == (12, 8, 50, 46)
    for key in ("resnet18@64", "squeezenet1_1@64", "zero_pad_1_2@20", "same_even_kernel@18"):
        assert converted(key).geometry.padded, key


def test_squeeze_excitation_pools_are_global_context(converted: Converted) -> None:
    model = _torchvision("mobilenet_v3_small")
    g = converted("mobilenet_v3_small@64").geometry
    se_pools = [f"{name}.avgpool" for name, module in model.named_modules()
                if isinstance(module, torchvision.ops.SqueezeExcitation)]
    assert len(se_pools) == 9
    assert not g.local
    assert list(g.global_context) == se_pools
    resnet = converted("resnet18@64").geometry
    assert resnet.local and resnet.global_context == ()


# --------------------------------------------------------------------------------------------------
# Geometry as data


@pytest.mark.parametrize("key", ["resnet18@64", "googlenet@64", "zero_pad_1_2@20"])
def test_to_dict_is_json_and_from_dict_answers_the_same(key: str, converted: Converted) -> None:
    g = converted(key).geometry
    data = json.loads(json.dumps(g.to_dict()))
    back = Geometry.from_dict(data)
    for name in ("stride", "window", "offset", "receptive_field", "rf_offset", "local", "global_context", "padded"):
        assert getattr(back, name) == getattr(g, name), name
    assert back.layers == Geometry.from_dict(back.to_dict()).layers  # stable after one trip
    assert Geometry.from_dict(back.to_dict()) == back
    for height, width in [(g.window, g.window), (g.window + 17, g.window + 40), (g.min_input_size() - 1,) * 2]:
        assert back.output_size(height, width) == g.output_size(height, width)
    assert back.min_input_size() == g.min_input_size()
    assert back.cell_box(2, 3) == g.cell_box(2, 3) and back.rf_box(2, 3) == g.rf_box(2, 3)


@pytest.mark.parametrize("key", ["padding_free@38"])
def test_to_dict_from_dict_round_trip_is_equal(key: str, converted: Converted) -> None:
    g = converted(key).geometry
    assert Geometry.from_dict(g.to_dict()) == g


def test_a_hand_written_geometry_answers_in_closed_form() -> None:
    g = Geometry(stride=8, window=40, offset=4, receptive_field=56, rf_offset=-4)
    assert g.cell_box(0, 0) == (4, 4, 44, 44)
    assert g.cell_box(2, 1) == (12, 20, 52, 60)
    assert g.rf_box(2, 1) == (4, 12, 60, 68)
    assert g.cell_center(2, 1) == (32.0, 40.0)
    assert g.output_size(100) == (100, 100)  # no layers: the identity
    assert Geometry.from_dict(g.to_dict()) == g


# --------------------------------------------------------------------------------------------------
# Geometries that once did not match real runs: ceil_mode on small maps, implicit padding

_CEIL = ("geometry._window_out returns 0 whenever n + pads < the dilated kernel, but in ceil_mode PyTorch still "
         "gives one window when the shortfall is under the stride (ceil(span / stride) + 1 = 1 for "
         "-stride < span < 0)")


def test_ceil_mode_pool_on_a_map_smaller_than_its_kernel() -> None:
    model = TinyCeil().eval()
    fcn = convify.convert(model, input_size=5)
    assert _real_size(fcn, 5, 5) == (1, 1)
    assert fcn.geometry.output_size(5) == (1, 1)  # the native size gives a 1x1 map
    assert fcn.geometry.min_input_size() == 5


def test_googlenet_at_32_px_runs_from_15_px() -> None:
    fcn = convify.convert(_torchvision("googlenet"), input_size=32, check=False)
    g = fcn.geometry
    for n in (15, 22, 30):
        assert _real_size(fcn, n, n) == (1, 1)
        assert g.output_size(n) == (1, 1), n
    assert _real_size(fcn, 14, 14) is None
    assert g.min_input_size() == 15


def _cells_against_crops(model: nn.Module, size: int) -> tuple[convify.Geometry, list[float]]:
    """Every cell of a larger map against the original classifier run on that cell's window (a crop)."""
    fcn = convify.convert(model, input_size=size)
    g = fcn.geometry
    x = torch.randn(1, 3, size + 2 * g.stride, size + 3 * g.stride, generator=torch.Generator().manual_seed(0))
    differences = []
    with torch.inference_mode():
        maps = fcn(x)
        for i in range(maps.shape[2]):
            for j in range(maps.shape[3]):
                x0, y0, x1, y1 = g.cell_box(i, j)
                differences.append(float((maps[0, :, i, j] - model(x[:, :, y0:y1, x0:x1])[0]).abs().max()))
    return g, differences


def test_padded_false_means_cells_equal_the_classifier_on_their_crops() -> None:
    g, differences = _cells_against_crops(PaddingFree().eval(), 24)
    assert not g.padded and len(differences) == 12
    assert max(differences) < 1e-5


def test_a_ceil_mode_overhang_is_padding_and_cells_then_differ_from_crops() -> None:
    """At the native size the last ceil-mode window hangs past the map, as padding would: the flag says so,
    and it matters: inside a larger image that window sees real pixels, so cells are not their crops."""
    g, differences = _cells_against_crops(CeilOverhang().eval(), 16)
    assert g.padded
    assert max(differences) > 1e-3
