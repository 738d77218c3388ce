"""Finer output strides: the stride-32 map at every other cell, and between them the classifier at shifted windows.

The references are independent of the code under test: the original (coarse) network's own map, and the
original network run on the image shifted by the finer stride (equal on cells whose receptive field lies
inside both images, where neither sees padding the other does not).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import convify
from convify import ConversionError, ConvifyError
from convify.finer import finer_cost, finer_stride
from convify.layers import PhaseAvgPool2d
from convify.tiling import stream_refusal, tiled_map
from test_fcn import _edit_header
from test_tiling import Squeeze

NUM_CLASSES = 5


class PaddedNet(nn.Module):
    """Padded convolutions and max pools, stride 8: the shape of VGG, small."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 3 * 3, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


class AvgInside(nn.Module):
    """An average pool *is* a removed subsampling (padded, padding not counted) and another one comes after it,
    dilated; a residual branch subsamples with a strided 1x1 convolution beside a strided 3x3 one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.a = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(8, 8, 1, stride=2)
        self.smooth = nn.AvgPool2d(3, stride=1, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.stem(x)))
        x = F.relu(self.a(x)) + self.skip(x)
        return self.fc(self.smooth(x).mean((2, 3)))


class CeilAtTheEnd(nn.Module):
    """A ceil-mode pool as the last subsampling: at the finer stride it keeps its window hanging over the end
    (which image sizes make it hang over depends on their length: the test sizes cover both)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(F.relu(self.conv(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as torchvision writes it: pool, 1x1 conv, ReLU, 1x1 conv, sigmoid, multiply."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, 4, 1)
        self.fc2 = nn.Conv2d(4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))


class TinySE(nn.Module):
    """Stride 4 with squeeze-and-excitation on both sides of each subsampling: ``se0`` between the two strided
    convolutions, ``se1`` after them, then two more written as calls (``F.adaptive_avg_pool2d(x, 1)``, and
    ``x.mean((2, 3), keepdim=True)`` with arithmetic on the summary before it multiplies the map back in).
    Stride 2 cuts at ``down`` (``se0`` before the cut, unchanged); stride 1 also at ``stem``. Native size 32:
    the map before the mean is 8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.se0 = SqueezeExcite(8)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.se1 = SqueezeExcite(12)
        self.conv = nn.Conv2d(12, 12, 3, padding=1)
        self.fc1 = nn.Conv2d(12, 4, 1)
        self.fc2 = nn.Conv2d(4, 12, 1)
        self.fc = nn.Linear(12, NUM_CLASSES)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """From ``down``'s output to the map the head averages."""
        x = F.relu(self.conv(self.se1(F.relu(x))))
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x + x * torch.sigmoid(x.mean((2, 3), keepdim=True) * 2.0 - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.se0(F.relu(self.stem(x))))
        return self.fc(self.tail(x).mean((2, 3)))


def _run(fcn: convify.FullyConvNet, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = fcn(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_against_shifted_inputs(coarse: convify.FullyConvNet, fine: convify.FullyConvNet, x: torch.Tensor) -> int:
    """Compare every cell of the fine map with the coarse network on the input shifted by its phase.

    Cell ``(r * i + a, r * j + b)`` of the fine map is the classifier at the window shifted by ``(a, b)``
    fine strides: the coarse network's cell ``(i, j)`` on ``x[..., a * s:, b * s:]``. Cells whose receptive
    field leaves the shifted image are skipped (the shifted image pads where the whole one has pixels).
    Returns the number of cells compared.
    """
    g, s = coarse.geometry, fine.geometry.stride
    r = g.stride // s
    whole = _run(fine, x)
    compared = 0
    for a in range(r):
        for b in range(r):
            shifted = x[:, :, a * s:, b * s:]
            ref = _run(coarse, shifted)
            height, width = shifted.shape[2:]
            for i in range(ref.shape[2]):
                for j in range(ref.shape[3]):
                    x0, y0, x1, y1 = g.rf_box(i, j)
                    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                        continue
                    torch.testing.assert_close(whole[:, :, r * i + a, r * j + b], ref[:, :, i, j],
                                               rtol=1e-4, atol=1e-5)
                    compared += 1
    return compared


def _small(model: nn.Module, size: int) -> convify.FullyConvNet:
    torch.manual_seed(0)
    return convify.convert(model.eval(), size)


@pytest.mark.parametrize("model, size", [(PaddedNet(), 24), (AvgInside(), 32), (CeilAtTheEnd(), 32)],
                         ids=["padded", "avg-pools", "ceil-mode"])
@pytest.mark.parametrize("shape", [(97, 83), (64, 130), (66, 67)])
def test_every_cell_is_the_classifier_at_its_shifted_window(model: nn.Module, size: int,
                                                            shape: tuple[int, int]) -> None:
    coarse = _small(model, size)
    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(1))
    strides = (2,) if isinstance(model, CeilAtTheEnd) else (coarse.geometry.stride // 2, coarse.geometry.stride // 4)
    for stride in strides:
        fine = finer_stride(coarse, stride)
        r = coarse.geometry.stride // stride
        assert fine.geometry.stride == stride and finer_cost(coarse, stride) == r * r
        out = _run(fine, x)
        assert tuple(out.shape[2:]) == fine.output_size(*shape)
        torch.testing.assert_close(out[:, :, ::r, ::r], _run(coarse, x), rtol=1e-4, atol=1e-5)
        assert _check_against_shifted_inputs(coarse, fine, x) >= 8


@pytest.mark.parametrize("name, stride", [("vgg16", 16), ("resnet50", 16), ("vgg16", 8)])
def test_zoo_networks_at_finer_strides(name: str, stride: int) -> None:
    torch.manual_seed(0)
    coarse = convify.convert(torchvision.models.get_model(name, num_classes=NUM_CLASSES).eval(), 224, check=False)
    fine = finer_stride(coarse, stride)
    r = 32 // stride
    x = torch.randn(1, 3, 288, 320, generator=torch.Generator().manual_seed(2))
    out = _run(fine, x)
    assert tuple(out.shape[2:]) == fine.output_size(288, 320)
    torch.testing.assert_close(out[:, :, ::r, ::r], _run(coarse, x), rtol=1e-4, atol=1e-4)
    # the cells between: the coarse network on the image shifted by the finer stride, where that one's
    # receptive field is all image (VGG16: 404 px; a 500 px image has a few such cells)
    if name == "vgg16" and stride == 16:
        big = torch.randn(1, 3, 500, 500, generator=torch.Generator().manual_seed(3))
        assert _check_against_shifted_inputs(coarse, fine, big) >= 4


def test_geometry_of_the_finer_map() -> None:
    coarse = _small(PaddedNet(), 24)
    fine = finer_stride(coarse, 4)
    g, f = coarse.geometry, fine.geometry
    assert (f.window, f.offset, f.receptive_field, f.rf_offset) == (g.window, g.offset, g.receptive_field, g.rf_offset)
    assert f.cell_box(2, 4) == g.cell_box(1, 2) and f.cell_box(1, 1)[:2] == (g.offset + 4, g.offset + 4)
    for shape in [(24, 24), (25, 31), (40, 57), (101, 64)]:
        x = torch.zeros(1, 3, *shape)
        assert tuple(_run(fine, x).shape[2:]) == f.output_size(*shape)


def test_finer_networks_save_load_and_stream(tmp_path: Path) -> None:
    coarse = _small(AvgInside(), 32)
    fine = finer_stride(coarse, 4)
    loaded = convify.load(fine.save(tmp_path / "fine.fcn.pt"))
    assert loaded.geometry == fine.geometry
    x = torch.randn(1, 3, 90, 77, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_run(loaded, x), _run(fine, x), rtol=0, atol=0)
    # a loaded network refines too, to the same network
    again = finer_stride(convify.load(coarse.save(tmp_path / "coarse.fcn.pt")), 4)
    torch.testing.assert_close(_run(again, x), _run(fine, x), rtol=0, atol=0)
    # and a finer network streams exactly, dilated average pools included
    torch.testing.assert_close(tiled_map(fine, x, strip=3, band_cells=4), _run(fine, x)[0], rtol=1e-5, atol=1e-5)
    # a ceil-mode overhang depends on the map's length: not streamed, but crops are exact
    ceil = finer_stride(_small(CeilAtTheEnd(), 32), 2)
    assert "overhang" in (stream_refusal(ceil) or "")
    loaded = convify.load(ceil.save(tmp_path / "ceil.fcn.pt"))
    assert loaded.geometry == ceil.geometry
    torch.testing.assert_close(tiled_map(loaded, x, tile_cells=3), _run(ceil, x)[0], rtol=1e-5, atol=1e-5)


def test_what_cannot_be_made_finer_is_refused_with_the_reason() -> None:
    with pytest.raises(ConversionError, match="'gate' \\(Linear\\) follows the squeeze-and-excitation pool 'mean'"):
        finer_stride(_small(Squeeze(), 32), 1)  # its summary goes through a flatten-like mean and a Linear
    with pytest.raises(ConversionError, match="'pool' is a ceil-mode pool past the first subsampling"):
        finer_stride(_small(CeilAtTheEnd(), 32), 1)
    coarse = _small(PaddedNet(), 24)
    for bad in (3, 16, 0, 6):
        with pytest.raises(ConvifyError, match="divided by a power of 2"):
            finer_stride(coarse, bad)
    assert finer_stride(coarse, 8) is coarse


def test_heatmap_and_the_command_line_take_a_stride(tmp_path: Path) -> None:
    import json

    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from convify.cli import cli

    coarse = _small(PaddedNet(), 24)
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (70, 90, 3), dtype=np.uint8), "RGB")
    a = convify.heatmap(picture, coarse, size=None, pad="none")
    b = convify.heatmap(picture, coarse, size=None, pad="none", stride=4)
    assert b.geometry.stride == 4 and tuple(b.logits.shape[1:]) == b.geometry.output_size(70, 90)
    torch.testing.assert_close(b.logits[:, ::2, ::2], a.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.boxes[::2, ::2], a.boxes)  # the same windows, in image pixels
    torch.testing.assert_close(b.boxes[1, 1] - b.boxes[0, 0], torch.tensor([4.0, 4.0, 4.0, 4.0], dtype=b.boxes.dtype))

    model = coarse.save(tmp_path / "net.fcn.pt")
    picture.save(tmp_path / "a.png")
    runner = CliRunner()
    ok = runner.invoke(cli, ["heatmap", str(tmp_path / "a.png"), "--model", str(model), "--size", "none",
                             "--pad", "none", "--stride", "2", "-o", str(tmp_path), "--format", "json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads((tmp_path / "a.json").read_text())
    assert summary["geometry"]["stride"] == 2 and summary["map_size"] == list(
        finer_stride(coarse, 2).output_size(70, 90))
    bad = runner.invoke(cli, ["heatmap", str(tmp_path / "a.png"), "--model", str(model), "--stride", "3",
                              "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "divided by a power of 2" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def _finer_pool(header: dict) -> dict:
    return next(spec for spec in header["graph"]["modules"].values() if spec["class"] == "FinerPool2d")


@pytest.mark.parametrize("attack", [
    lambda h: _finer_pool(h)["kwargs"].update(mode="__import__('os').system('true')"),
    lambda h: _finer_pool(h)["kwargs"].update(kernel_size={"tuple": [0, 0]}),
    lambda h: _finer_pool(h)["kwargs"].update(dilation={"tuple": [1 << 30, 1]}),
    lambda h: _finer_pool(h)["kwargs"].update(ceil_stride={"tuple": [-2, 1]}),
    lambda h: next(layer for layer in h["geometry"]["layers"] if "ceil_stride" in layer).update(ceil_stride=[-1, 2]),
    lambda h: next(layer for layer in h["geometry"]["layers"] if "ceil_stride" in layer).update(ceil_stride="2"),
    lambda h: next(layer for layer in h["geometry"]["layers"] if layer["op"] == "window").update(ceil_stride=[1, 1],
                                                                                                 extra=[5, 5]),
], ids=["mode-code", "zero-kernel", "huge-dilation", "negative-ceil", "geometry-negative", "geometry-string",
        "geometry-extra-key"])
def test_crafted_finer_layers_in_a_file_are_refused(tmp_path: Path, attack) -> None:
    """The layers finer strides add are part of the file format: a crafted one is one clear ModelLoadError (or
    a LimitError when it would allocate too much), never code, never a traceback from deep inside torch."""
    fine = finer_stride(_small(CeilAtTheEnd(), 32), 2)
    path = _edit_header(fine.save(tmp_path / "fine.fcn.pt"), attack, tmp_path / "evil.fcn.pt")
    with pytest.raises((convify.ModelLoadError, convify.LimitError)):
        loaded = convify.load(path)
        with torch.inference_mode():
            loaded(torch.zeros(1, 3, 64, 64))


# ---- squeeze-and-excitation: pooled per phase ----------------------------------------------------------


def _phase_means(x: torch.Tensor, phases: tuple[int, int]) -> torch.Tensor:
    """The naive reference: every position, the mean of the positions of its phase."""
    (rh, rw), out = phases, torch.empty_like(x)
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            out[:, :, i, j] = x[:, :, i % rh::rh, j % rw::rw].mean((2, 3))
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 11), w=st.integers(1, 11),
       phases=st.one_of(st.integers(1, 14), st.tuples(st.integers(1, 14), st.integers(1, 14))),
       seed=st.integers(0, 2 ** 16))
def test_phase_pool_is_the_mean_of_each_phase(n: int, c: int, h: int, w: int, phases, seed: int) -> None:
    """Against a loop over positions, phases larger than the map included (each row or column its own)."""
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pair = phases if isinstance(phases, tuple) else (phases, phases)
    out = PhaseAvgPool2d(phases)(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _phase_means(x, pair))
    if pair == (1, 1) or (h == 1 and w == 1):  # one phase: the global average pool, broadcast
        torch.testing.assert_close(out, F.adaptive_avg_pool2d(x, 1).expand_as(x))


def test_phase_pool_arguments_and_devices() -> None:
    assert PhaseAvgPool2d(3).phases == (3, 3) and PhaseAvgPool2d([2, 5]).phases == (2, 5)
    for bad in (0, -1, 10 ** 9, PhaseAvgPool2d.MAX_PHASES + 1, True, 2.0, "2", [2, 2, 2], (2,), (2, "2"), None):
        with pytest.raises(ValueError, match="phases must be an integer"):
            PhaseAvgPool2d(bad)
    with torch.device("meta"):  # the loader's dry run
        assert PhaseAvgPool2d(2)(torch.empty(2, 3, 7, 5)).shape == (2, 3, 7, 5)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float16)
    assert PhaseAvgPool2d(2)(x).dtype == torch.float16
    # a layer after it may work in place, also where it has a single phase
    assert torch.relu_(PhaseAvgPool2d(4)(torch.randn(1, 2, 1, 1))).shape == (1, 2, 1, 1)


def test_squeeze_excitation_is_pooled_per_phase_after_the_cut() -> None:
    """The pools before the cut stay global pools; after it they average 2x2 (stride 2) or 4x4 (stride 1)
    phases; the geometry still says the network has global context; the cells at the original positions are
    the original's. (tests/test_finer_stitch.py checks every cell against shift-and-stitch.)"""
    coarse = _small(TinySE(), 32)
    assert not coarse.geometry.local
    x = torch.randn(1, 3, 70, 83, generator=torch.Generator().manual_seed(6))
    for stride, layers in [(2, {"se0.pool": None, "se1.pool": (2, 2), "adaptive_avg_pool2d": (2, 2),
                                "mean": (2, 2)}),
                           (1, {"se0.pool": (2, 2), "se1.pool": (4, 4), "adaptive_avg_pool2d": (4, 4),
                                "mean": (4, 4)})]:
        fine = finer_stride(coarse, stride)
        r = 4 // stride
        for path, phases in layers.items():
            layer = fine.net.get_submodule(path)
            assert (layer.phases if isinstance(layer, PhaseAvgPool2d) else None) == phases, path
        assert fine.geometry.global_context == coarse.geometry.global_context and not fine.geometry.local
        assert sum("PhaseAvgPool2d" in str(rewrite) for rewrite in fine.rewrites) == sum(map(bool, layers.values()))
        out = _run(fine, x)
        assert tuple(out.shape[2:]) == fine.output_size(70, 83)
        torch.testing.assert_close(out[:, :, ::r, ::r], _run(coarse, x), rtol=1e-4, atol=1e-5)
    # made finer twice: the phases multiply, to the same network
    twice = finer_stride(finer_stride(coarse, 2), 1)
    assert twice.net.get_submodule("se1.pool").phases == (4, 4)
    torch.testing.assert_close(_run(twice, x), _run(finer_stride(coarse, 1), x), rtol=1e-6, atol=1e-6)


def test_finer_squeeze_excitation_networks_save_and_load(tmp_path: Path) -> None:
    coarse = _small(TinySE(), 32)
    fine = finer_stride(coarse, 1)
    loaded = convify.load(fine.save(tmp_path / "fine.fcn.pt"))
    assert loaded.geometry == fine.geometry and loaded.rewrites == fine.rewrites
    assert isinstance(loaded.net.get_submodule("mean"), PhaseAvgPool2d)  # a call made a layer
    assert loaded.net.get_submodule("se1.pool").phases == (4, 4)
    x = torch.randn(1, 3, 61, 90, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_run(loaded, x), _run(fine, x), rtol=0, atol=0)
    # a loaded coarse network refines to the same network; a loaded finer one refines further
    again = finer_stride(convify.load(coarse.save(tmp_path / "coarse.fcn.pt")), 1)
    torch.testing.assert_close(_run(again, x), _run(fine, x), rtol=0, atol=0)
    half = convify.load(finer_stride(coarse, 2).save(tmp_path / "half.fcn.pt"))
    torch.testing.assert_close(_run(finer_stride(half, 1), x), _run(fine, x), rtol=1e-6, atol=1e-6)
    # global context: never tiled into pieces
    assert "global context" in (stream_refusal(loaded) or "")


def _phase_pool_spec(header: dict) -> dict:
    return next(spec for spec in header["graph"]["modules"].values() if spec["class"] == "PhaseAvgPool2d")


@pytest.mark.parametrize("phases", [0, -2, 10 ** 9, PhaseAvgPool2d.MAX_PHASES + 1, True, 2.5, "2",
                                    "__import__('os').system('touch pwned')", [2, 2, 2], {"tuple": [2, 2, 2]},
                                    {"tuple": [0, 2]}, {"tuple": [2, {"tuple": [2, 2]}]}, None, {"dict": []}],
                         ids=["zero", "negative", "huge", "over-max", "bool", "float", "string", "code", "list-of-3",
                              "tuple-of-3", "zero-in-pair", "nested", "none", "dict"])
def test_crafted_phase_pools_in_a_file_are_refused(tmp_path: Path, phases, monkeypatch) -> None:
    """A PhaseAvgPool2d's ``phases`` from a file is hostile input: one clean ModelLoadError, nothing run."""
    monkeypatch.chdir(tmp_path)
    fine = finer_stride(_small(TinySE(), 32), 2)
    path = _edit_header(fine.save(tmp_path / "fine.fcn.pt"),
                        lambda h: _phase_pool_spec(h)["kwargs"].update(phases=phases), tmp_path / "evil.fcn.pt")
    with pytest.raises(convify.ModelLoadError, match="PhaseAvgPool2d|beyond|argument"):
        convify.load(path)
    assert not (tmp_path / "pwned").exists()


class _AfterTheCut(nn.Module):
    """A strided stem (the cut at stride 1), then ``middle``, then a global-average-pool head."""

    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.middle = middle
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.middle(F.relu(self.stem(x))).mean((2, 3)))


class _SpatialGate(nn.Module):
    """A summary through a 3x3 convolution: at a finer stride it would read the other phases' summaries."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.mix(self.pool(x)))


class _MaxGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(F.adaptive_max_pool2d(x, 1))


class _ViewGate(nn.Module):
    """A summary through a flatten and a Linear (as timm's older SE blocks): not per position."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(self.pool(x).flatten(1))).view(x.shape[0], 8, 1, 1)


@pytest.mark.parametrize("middle, message", [
    (nn.GroupNorm(2, 8), "see the whole map \\(middle\\)"),
    (nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), "see the whole map \\(middle\\)"),
    (_MaxGate(), "see the whole map \\(adaptive_max_pool2d\\)"),
    (nn.Sequential(SqueezeExcite(8), nn.GroupNorm(2, 8)), "see the whole map \\(middle.1\\)"),
    (_SpatialGate(), "'middle.mix' \\(Conv2d\\) follows the squeeze-and-excitation pool 'middle.pool'"),
    (_ViewGate(), "'flatten' \\(flatten\\) follows the squeeze-and-excitation pool 'middle.pool'"),
], ids=["group-norm", "circular-padding", "max-pool-gate", "se-and-group-norm", "3x3-conv-gate", "linear-gate"])
def test_other_global_context_is_still_refused(middle: nn.Module, message: str) -> None:
    """Global context after the cut that is not a squeeze-and-excitation average pool feeding per-position
    layers: refused at a finer stride, with the layer's name; the coarse network converts as before."""
    coarse = _small(_AfterTheCut(middle), 16)
    assert not coarse.geometry.local
    with pytest.raises(ConversionError, match=message):
        finer_stride(coarse, 1)
    assert finer_stride(_small(_AfterTheCut(SqueezeExcite(8)), 16), 1).geometry.stride == 1
