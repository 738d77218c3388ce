"""Exact tiling: maps computed crop by crop equal the whole-image pass, for every kind of geometry."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convify
from convify import LimitError
from convify.tiling import activation_bytes, iter_tiles, plan_bytes, plan_tiles, stream_refusal, tiled_map
from test_geometry import PaddingFree

NUM_CLASSES = 7


class CeilPools(nn.Module):
    """ceil_mode pools whose last window hangs past the map, a reflect pad and a padded strided conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, padding_mode="zeros")
        self.pool2 = nn.AvgPool2d(3, 2, ceil_mode=True, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(F.pad(x, (2, 1, 2, 1), mode="reflect"))))
        x = self.pool2(F.relu(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Squeeze(nn.Module):
    """Squeeze-and-excitation: a pooled summary of the whole map multiplies back in (global context)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.gate = nn.Linear(8, 8)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = x * torch.sigmoid(self.gate(x.mean([2, 3])))[:, :, None, None]
        return self.fc(x.mean([2, 3]))


def _torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, num_classes=NUM_CLASSES).eval()


def _whole(fcn: convify.FullyConvNet, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return fcn(x)[0]


@pytest.fixture(scope="module")
def vgg16() -> convify.FullyConvNet:
    return convify.convert(_torchvision("vgg16"), 224, check=False)


@pytest.fixture(scope="module")
def resnet50() -> convify.FullyConvNet:
    return convify.convert(_torchvision("resnet50"), 224, check=False)


@pytest.mark.parametrize("net", ["vgg16", "resnet50"])
@pytest.mark.parametrize("size", [(301, 263), (256, 352)])
def test_tiled_equals_whole_on_padded_nets(request: pytest.FixtureRequest, net: str, size: tuple[int, int]) -> None:
    fcn = request.getfixturevalue(net)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    whole = _whole(fcn, x)
    rows, cols = fcn.output_size(*size)
    for cells in (1, 2):  # one-cell crops: every cell of the map is a seam
        plan = plan_tiles(fcn, *size, tile_cells=cells)
        assert plan.count == -(-rows // cells) * -(-cols // cells) > 1
        torch.testing.assert_close(tiled_map(fcn, x, tile_cells=cells), whole, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("model, size", [(PaddingFree(), 24), (CeilPools(), 32)], ids=["padding-free", "ceil-mode"])
@pytest.mark.parametrize("shape", [(97, 61), (64, 131), (45, 45)])
def test_tiled_equals_whole_on_small_nets(model: nn.Module, size: int, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    fcn = convify.convert(model.eval(), size)
    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(2))
    whole = _whole(fcn, x)
    for cells in (1, 2, 3, 5):
        torch.testing.assert_close(tiled_map(fcn, x, tile_cells=cells), whole, rtol=1e-5, atol=1e-5)


def test_every_crop_matches_the_whole_map_where_geometry_says_it_is_exact() -> None:
    """The reference is the whole-image pass itself: each crop's exact cells, shifted by start // stride."""
    torch.manual_seed(0)
    fcn = convify.convert(CeilPools().eval(), 32)
    g = fcn.geometry
    x = torch.randn(1, 3, 90, 90, generator=torch.Generator().manual_seed(3))
    whole = _whole(fcn, x)
    for start in range(0, 60, g.stride):
        for end in range(start + 40, 91, 7):
            first, last = g.exact_cells(start, end, 90)
            if first >= last:
                continue
            crop = _whole(fcn, x[:, :, :, start:end])
            shift = start // g.stride
            torch.testing.assert_close(crop[:, :, first - shift:last - shift], whole[:, :, first:last])


def test_a_loaded_network_tiles_the_same(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fcn = convify.convert(CeilPools().eval(), 32)
    loaded = convify.load(fcn.save(tmp_path / "net.fcn.pt"))
    x = torch.randn(1, 3, 77, 101, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(tiled_map(loaded, x, tile_cells=2), _whole(fcn, x), rtol=1e-5, atol=1e-5)


def test_global_context_is_never_tiled_silently() -> None:
    torch.manual_seed(0)
    fcn = convify.convert(Squeeze().eval(), 32)
    assert not fcn.geometry.local
    x = torch.randn(1, 3, 96, 96)
    with pytest.raises(LimitError, match="see the whole image.*cannot be tiled exactly"):
        tiled_map(fcn, x, tile_cells=1)
    # it runs whole when the whole image fits the budget
    torch.testing.assert_close(tiled_map(fcn, x), _whole(fcn, x))
    # and is refused with the way out when it does not
    with pytest.raises(LimitError, match="see the whole image.*raise --max-memory"):
        tiled_map(fcn, x, max_memory=1000)


def test_the_budget_chooses_crops_that_fit_it(vgg16: convify.FullyConvNet) -> None:
    budget = 500 * 2 ** 20
    plan = plan_tiles(vgg16, 1200, 900, max_memory=budget, stream=False)
    assert not plan.whole and not plan.strip and plan.tile_cells >= 1
    assert plan_bytes(vgg16, plan) <= budget
    # a crop one cell larger would not fit: the budget is used, not wasted
    side = vgg16.geometry.receptive_field + (plan.tile_cells + 1) * vgg16.geometry.stride
    assert activation_bytes(vgg16, side, side) > budget * 0.8
    assert plan_tiles(vgg16, 300, 300, max_memory=budget).whole
    with pytest.raises(LimitError, match="does not fit even one cell's crop"):
        plan_tiles(vgg16, 1200, 900, max_memory=100 * 2 ** 20)


def test_the_budget_bounds_a_streamed_run(vgg16: convify.FullyConvNet) -> None:
    """Streamed, the measured peak of the widest band, strips and the rows layers keep included, fits."""
    budget = 500 * 2 ** 20
    plan = plan_tiles(vgg16, 1200, 900, max_memory=budget)
    assert plan.strip and len(plan.cols) == 1  # whole rows fit: one band, nothing recomputed
    assert plan_bytes(vgg16, plan) <= budget


# -- streaming: every layer's rows computed once -------------------------------------------------------


class ChannelsLast(nn.Module):
    """A ConvNeXt-style norm over channels through permutes: local, but its graph does not stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class InPlaceOnShared(nn.Module):
    """An in-place ReLU on a map that a convolution also reads: rows it keeps would be overwritten."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        z = self.b(y)
        return self.fc((z + F.relu(y, inplace=True)).mean((2, 3)))


class Circular(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("net", ["vgg16", "resnet50"])
@pytest.mark.parametrize("size", [(301, 263), (256, 352)])
def test_streamed_equals_whole_on_padded_nets(request: pytest.FixtureRequest, net: str,
                                              size: tuple[int, int]) -> None:
    fcn = request.getfixturevalue(net)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    whole = _whole(fcn, x)
    for strip, band in ((1, None), (37, 2), (64, 1)):  # one row at a time; narrow bands: seams everywhere
        streamed = tiled_map(fcn, x, strip=strip, band_cells=band)
        torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("model, size", [(PaddingFree(), 24), (CeilPools(), 32)], ids=["padding-free", "ceil-mode"])
@pytest.mark.parametrize("shape", [(97, 61), (64, 131), (45, 45)])
def test_streamed_equals_whole_on_small_nets(model: nn.Module, size: int, shape: tuple[int, int]) -> None:
    """CeilPools: ceil-mode pools hanging past the map, a reflect pad (rows copied across the top and bottom
    edges), a padded avg pool."""
    torch.manual_seed(0)
    fcn = convify.convert(model.eval(), size)
    assert stream_refusal(fcn) is None
    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(2))
    whole = _whole(fcn, x)
    for strip in (1, 2, 3, 5, 16, 1000):
        for band in (None, 1, 3):
            torch.testing.assert_close(tiled_map(fcn, x, strip=strip, band_cells=band), whole, rtol=1e-5, atol=1e-5)


def test_streaming_reads_each_row_of_a_band_once_and_a_strip_at_a_time() -> None:
    """No row is recomputed along the height: each band's reads are consecutive strips, disjoint."""
    torch.manual_seed(0)
    fcn = convify.convert(CeilPools().eval(), 32)
    x = torch.randn(1, 3, 150, 120, generator=torch.Generator().manual_seed(6))
    plan = plan_tiles(fcn, 150, 120, strip=9, band_cells=4)
    reads: list[tuple[int, int, int, int]] = []

    def read(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
        reads.append((x0, y0, x1, y1))
        return x[:, :, y0:y1, x0:x1]

    blocks = list(iter_tiles(fcn, read, plan))
    for (_, (x0, x1)) in plan.cols:
        rows = [(y0, y1) for a, y0, b, y1 in reads if (a, b) == (x0, x1)]
        assert rows == [(y, min(150, y + 9)) for y in range(0, 150, 9)]
    result = torch.empty(NUM_CLASSES, *plan.map_size)
    for r0, c0, block in blocks:
        result[:, r0:r0 + block.shape[1], c0:c0 + block.shape[2]] = block
    torch.testing.assert_close(result, _whole(fcn, x), rtol=1e-5, atol=1e-5)


def test_a_loaded_network_streams_the_same(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fcn = convify.convert(CeilPools().eval(), 32)
    loaded = convify.load(fcn.save(tmp_path / "net.fcn.pt"))
    assert stream_refusal(loaded) is None
    x = torch.randn(1, 3, 77, 101, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(tiled_map(loaded, x, strip=5, band_cells=3), _whole(fcn, x), rtol=1e-5, atol=1e-5)


def test_circular_padding_is_global_context() -> None:
    """A circular pad wraps the far edge into every edge cell: not local, so never tiled or streamed."""
    torch.manual_seed(0)
    fcn = convify.convert(Circular().eval(), 32)
    assert not fcn.geometry.local and "conv" in fcn.geometry.global_context
    x = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(9))
    with pytest.raises(LimitError, match="see the whole image"):
        tiled_map(fcn, x, tile_cells=1)
    with pytest.raises(LimitError, match="cannot be streamed: it has global context"):
        tiled_map(fcn, x, strip=8)


@pytest.mark.parametrize("model, reason", [(ChannelsLast(), "permute"), (InPlaceOnShared(), "in place")],
                         ids=["permute", "in-place"])
def test_graphs_that_do_not_stream_say_why_and_fall_back_to_crops(model: nn.Module, reason: str) -> None:
    torch.manual_seed(0)
    fcn = convify.convert(model.eval(), 32)
    assert reason in (stream_refusal(fcn) or "")
    with pytest.raises(LimitError, match="cannot be streamed"):
        plan_tiles(fcn, 200, 200, strip=8)
    x = torch.randn(1, 3, 1000, 700, generator=torch.Generator().manual_seed(7))
    budget = 4 * activation_bytes(fcn, 200, 200)
    plan = plan_tiles(fcn, 1000, 700, max_memory=budget)
    assert not plan.strip and plan.count > 1  # crops
    torch.testing.assert_close(tiled_map(fcn, x, max_memory=budget), _whole(fcn, x), rtol=1e-5, atol=1e-5)


def test_an_image_too_wide_for_one_strip_is_streamed_in_bands() -> None:
    torch.manual_seed(0)
    fcn = convify.convert(CeilPools().eval(), 32)
    x = torch.randn(1, 3, 700, 1500, generator=torch.Generator().manual_seed(8))
    from convify.tiling import _cost

    floor, per_pixel = _cost(fcn)
    budget = int(max(floor * 1.5, per_pixel * 1500 * 24))  # under whole rows of 2 x 2 strides (32 rows)
    plan = plan_tiles(fcn, 700, 1500, max_memory=budget)
    assert plan.strip and len(plan.cols) > 1
    assert plan_bytes(fcn, plan) <= budget
    torch.testing.assert_close(tiled_map(fcn, x, max_memory=budget), _whole(fcn, x), rtol=1e-5, atol=1e-5)


def test_heatmap_tiles_an_image_over_its_budget_and_gives_the_same_map(vgg16: convify.FullyConvNet) -> None:
    from PIL import Image
    import numpy as np

    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (900, 1100, 3), dtype=np.uint8), "RGB")
    whole = convify.heatmap(picture, vgg16, size=None, pad="none")
    budget = 500 * 2 ** 20
    assert not plan_tiles(vgg16, 900, 1100, max_memory=budget).whole
    tiled = convify.heatmap(picture, vgg16, size=None, pad="none", max_memory=budget)
    torch.testing.assert_close(tiled.logits, whole.logits, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tiled.boxes, whole.boxes)


def test_max_memory_on_the_command_line(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image
    from convify.cli import cli

    torch.manual_seed(0)
    model = convify.convert(PaddingFree().eval(), 24).save(tmp_path / "net.fcn.pt")
    Image.new("RGB", (120, 90), (10, 200, 30)).save(tmp_path / "a.png")
    runner = CliRunner()
    ok = runner.invoke(cli, ["heatmap", str(tmp_path / "a.png"), "--model", str(model), "--size", "none",
                             "--max-memory", "1G", "-o", str(tmp_path), "--format", "json"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["heatmap", str(tmp_path / "a.png"), "--model", str(model), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "is not an amount of memory" in bad.output
