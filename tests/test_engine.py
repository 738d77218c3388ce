"""convify.heatmap and its results: the real default model on real photos, cells placed in original upright
pixels through resizes and EXIF rotations, image loading, the size policy, one forward pass per image, class
names, saving, and logits/probabilities checked against the network run by hand.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convify
from convify import ConvifyError, OutputExistsError
from convify.engine import resolve_class
from convify.models import default_network
import errno
import io
import os
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from convify import ImageError, LimitError, OutputError, limits
from convify.engine import _target_size
from hostile import png_declaring

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat
ESPRESSO = 967
EXIF_ORIENTATION = 0x0112
# The stored pixels for each EXIF orientation: the upright picture transposed by the inverse of what
# ImageOps.exif_transpose applies when reading (2, 3, 4, 5, 7 are their own inverses; 6 and 8 swap).
STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
GREY = (128, 128, 128)  # redness 128 - 64 - 64 = 0
SCENE_SIZE = (203, 151)  # (W, H): odd on purpose, and not a multiple of the stride
SQUARE_AT = (77, 45)  # the red square's top-left corner in upright pixels: not on the 4 px cell lattice


def unpadded(*args, **kwargs):
    """heatmap without padding: every window inside the image (the geometry these tests check)."""
    return convify.heatmap(*args, pad="none", **kwargs)


# --------------------------------------------------------------------------------------------------
# Hand-made networks and images


class Redness(nn.Module):
    """Scores "how red is this 32 px window": mean of R - G/2 - B/2 over the window, times +gain / -gain.

    At 32 px: 1x1 conv (redness) -> avg pool 4 (8x8) -> global pool -> Linear(1 -> 2). Converted, the map
    has stride 4 and cell (i, j) is exactly the window [4j, 4j + 32) x [4i, 4i + 32).
    """

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.redness = nn.Conv2d(3, 1, 1, bias=False)
        self.pool = nn.AvgPool2d(4)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.redness.weight.copy_(torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[gain], [-gain]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gap(self.pool(self.redness(x))).flatten(1))


def red_network(gain: float = 2.0, mean: Sequence[float] = (0.0, 0.0, 0.0),
                std: Sequence[float] = (1.0, 1.0, 1.0)) -> convify.FullyConvNet:
    """The converted Redness net. A gain of 2 keeps probabilities below 0.99, so cells never tie at 1.0."""
    return convify.convert(Redness(gain), input_size=32, classes=["red", "not red"], mean=mean, std=std)


@pytest.fixture(scope="module")
def red_net() -> convify.FullyConvNet:
    return red_network()


@pytest.fixture(scope="module")
def lite0() -> convify.FullyConvNet:
    """The real default model (EfficientNet-Lite0, ImageNet weights), converted once for this module."""
    return default_network()


def scene(side: int, x: int = SQUARE_AT[0], y: int = SQUARE_AT[1], size: tuple[int, int] = SCENE_SIZE
          ) -> Image.Image:
    """A grey upright picture with a pure red ``side`` x ``side`` square whose top-left corner is (x, y)."""
    picture = Image.new("RGB", size, GREY)
    picture.paste((255, 0, 0), (x, y, x + side, y + side))
    return picture


def save_with_orientation(upright: Image.Image, path: Path, orientation: int, **options) -> Path:
    """Store ``upright`` rotated/flipped with an EXIF Orientation tag, so that a viewer shows it upright."""
    stored = upright.transpose(STORE_FOR_ORIENTATION[orientation]) if orientation != 1 else upright
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    stored.save(path, exif=exif, **options)
    return path


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def expected_boxes(geometry: convify.Geometry, map_size: Sequence[int], original: tuple[int, int],
                   resized: tuple[int, int]) -> torch.Tensor:
    """``geometry.cell_box`` of every cell times original/resized, computed here in float64 then float32."""
    sx, sy = original[0] / resized[0], original[1] / resized[1]
    rows = []
    for i in range(map_size[0]):
        row = []
        for j in range(map_size[1]):
            x0, y0, x1, y1 = geometry.cell_box(i, j)
            row.append([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).float()


def box_center(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def fraction_inside(box: Sequence[float], width: int, height: int) -> float:
    x0, y0, x1, y1 = box
    inner = max(0.0, min(x1, width) - max(x0, 0.0)) * max(0.0, min(y1, height) - max(y0, 0.0))
    return inner / ((x1 - x0) * (y1 - y0))


# --------------------------------------------------------------------------------------------------
# The real model on real photos


def test_default_model_is_efficientnet_lite0_with_imagenet_names(lite0):
    assert lite0.meta.arch == "timm:efficientnet_lite0"
    assert len(lite0.meta.classes) == 1000
    assert lite0.meta.classes[ESPRESSO] == "espresso"
    assert lite0.meta.classes[282] == "tiger cat"
    assert (lite0.meta.mean, lite0.meta.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert (lite0.geometry.window, lite0.geometry.stride) == (224, 32)


@pytest.fixture(scope="module")
def chelsea(lite0) -> convify.HeatmapResult:
    return convify.heatmap(SAMPLES / "chelsea.jpg", model=lite0)


def test_chelsea_has_a_cat_class_in_the_top_3(chelsea):
    top = chelsea.top(3)
    assert [p.index for p in top] == sorted((p.index for p in top), key=lambda c: -float(chelsea.probs[c].max()))
    assert any(p.index in CAT_CLASSES for p in top), [p.name for p in top]


def test_coffee_is_espresso(lite0):
    best = convify.heatmap(SAMPLES / "coffee.jpg", model=lite0).top(1)[0]
    assert (best.index, best.name) == (ESPRESSO, "espresso")


def test_cat_and_coffee_peaks_lie_on_their_own_halves(lite0):
    result = convify.heatmap(SAMPLES / "cat_and_coffee.jpg", model=lite0)
    assert result.image.size == (901, 300)
    espresso = result.prediction("espresso")
    cat = max((result.prediction(c) for c in CAT_CLASSES), key=lambda p: p.score)
    espresso_x, _ = box_center(espresso.box)
    cat_x, _ = box_center(cat.box)
    assert espresso_x >= 451, espresso
    assert 510 <= espresso_x <= 810, espresso  # on the cup itself (samples/README.md)
    assert cat_x < 451, cat
    for p in (espresso, cat):
        assert fraction_inside(p.box, 901, 300) >= 0.75, p
        # the Prediction is the map's own cell and box
        assert p.box == tuple(float(v) for v in result.boxes[p.cell])
        assert p.score == float(result.probs[p.index][p.cell])


# --------------------------------------------------------------------------------------------------
# Alignment: a hand-made "redness" network finds a red square where it is, in original upright pixels


@pytest.mark.parametrize(
    "size,side,orientation,suffix",
    [
        (None, 32, 6, ".png"),  # the image's own pixels
        (302, 16, 6, ".png"),  # 151 -> 302: exactly 2x; the square is one window at the network's scale
        (200, 24, 8, ".png"),  # 151 -> 200, 203 -> 269: different, non-integer scales per axis
        ("auto", 76, 8, ".png"),  # 151 -> 64 (2 windows): shrunk 2.36x
        (302, 16, 8, ".jpg"),  # lossy, with EXIF in the JPEG's APP1
    ],
)
def test_red_square_is_found_where_it_is_in_original_upright_pixels(red_net, tmp_path, size, side,
                                                                    orientation, suffix):
    # The square is as big as one window once resized, so the best cell's window is the square itself.
    upright = scene(side)
    options = {"quality": 95} if suffix == ".jpg" else {}
    path = save_with_orientation(upright, tmp_path / f"scene{suffix}", orientation, **options)
    assert Image.open(path).size == SCENE_SIZE[::-1]  # stored sideways

    result = unpadded(path, model=red_net, size=size)

    assert result.image.size == SCENE_SIZE
    width, height = result.input_size
    shorter = {None: 151, 302: 302, 200: 200, "auto": 64}[size]
    assert height == shorter and width == round(203 * shorter / 151)
    sx, sy = result.scale
    assert (sx, sy) == (203 / width, 151 / height)
    g = red_net.geometry
    assert (g.stride, g.window, g.offset) == (4, 32, 0)

    peak = result.prediction("red")
    x0, y0 = SQUARE_AT
    square = (x0, y0, x0 + side, y0 + side)
    tolerance = (g.stride * sx, g.stride * sy, g.stride * sx, g.stride * sy)  # one stride, in original pixels
    for got, want, tol in zip(peak.box, square, tolerance):
        assert abs(got - want) <= tol, (peak.box, square, tolerance)
    assert peak.score > 0.9  # sigmoid(2 * 2 * redness): most of the window is red

    # Every cell's box is geometry.cell_box scaled by original/resized, exactly; centres are their middles.
    want_boxes = expected_boxes(g, result.logits.shape[1:], SCENE_SIZE, result.input_size)
    assert result.logits.shape[1:] == g.output_size(height, width)
    torch.testing.assert_close(result.boxes, want_boxes, rtol=0, atol=0)
    torch.testing.assert_close(result.centers[..., 0], (result.boxes[..., 0] + result.boxes[..., 2]) / 2)
    torch.testing.assert_close(result.centers[..., 1], (result.boxes[..., 1] + result.boxes[..., 3]) / 2)


def test_a_pil_image_with_exif_orientation_gives_the_same_result_as_its_file(red_net, tmp_path):
    path = save_with_orientation(scene(16), tmp_path / "scene.png", 6)
    from_file = convify.heatmap(path, model=red_net, size=302)
    from_pil = convify.heatmap(Image.open(path), model=red_net, size=302)
    from_upright = convify.heatmap(scene(16), model=red_net, size=302)
    for other in (from_pil, from_upright):
        torch.testing.assert_close(other.logits, from_file.logits, rtol=0, atol=0)
        torch.testing.assert_close(other.boxes, from_file.boxes, rtol=0, atol=0)
    assert from_file.source == str(path) and from_pil.source is None


def test_red_score_is_the_mean_redness_of_the_cell_window(red_net):
    """At size=None each cell's logit is exactly 2 x (red fraction of its window); check a few by hand."""
    result = unpadded(scene(32, x=80, y=44), model=red_net, size=None)  # on the 4 px lattice
    red = result.logits[0]
    assert result.prediction("red").cell == (11, 20)
    assert result.prediction("red").box == (80.0, 44.0, 112.0, 76.0)
    torch.testing.assert_close(red[11, 20], torch.tensor(2.0))
    torch.testing.assert_close(red[11, 21], torch.tensor(2.0 * 28 / 32))  # 4 columns of grey
    torch.testing.assert_close(red[12, 19], torch.tensor(2.0 * 28 / 32 * 28 / 32))
    torch.testing.assert_close(red[0, 0], torch.tensor(0.0))
    torch.testing.assert_close(result.logits[1], -result.logits[0])


def test_prediction_picks_the_best_cell_when_probabilities_round_to_one():
    fcn = red_network(gain=10.0)  # logits +-10 x redness: 1 - p is ~1e-8, below float32's resolution at 1
    result = unpadded(scene(32, x=79, y=44), model=fcn, size=None)
    exact = torch.softmax(result.logits.double(), dim=0)[0]
    best = divmod(int(torch.argmax(exact)), exact.shape[1])
    # window [80, 112) holds 31 red columns, window [76, 108) only 29: cell (11, 20) is the peak
    assert best == (11, 20)
    assert float(exact[11, 20]) > float(exact[11, 19])
    assert result.prediction("red").cell == best  # got (11, 19): both probabilities are 1.0 in float32


# --------------------------------------------------------------------------------------------------
# load_image


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_load_image_applies_exif_orientation(tmp_path, orientation):
    upright = scene(20, x=10, y=30, size=(61, 43))
    upright.putpixel((0, 0), (0, 0, 255))  # a blue top-left corner: flips show too
    path = save_with_orientation(upright, tmp_path / "o.png", orientation)
    loaded = convify.load_image(path)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(pixels(loaded), pixels(upright))
    # and from an already opened PIL image
    np.testing.assert_array_equal(pixels(convify.load_image(Image.open(path))), pixels(upright))


def test_load_image_applies_exif_orientation_to_jpeg(tmp_path):
    upright = scene(40, x=100, y=20)
    path = save_with_orientation(upright, tmp_path / "o.jpg", 8, quality=95)
    loaded = convify.load_image(path)
    assert loaded.size == SCENE_SIZE
    red = pixels(loaded).astype(int)
    redness = red[..., 0] - (red[..., 1] + red[..., 2]) / 2
    ys, xs = np.nonzero(redness > 128)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (100, 139, 20, 59)


def test_load_image_composites_transparency_on_white():
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128], [200, 0, 0, 64]]], dtype=np.uint8)
    loaded = convify.load_image(Image.fromarray(rgba, "RGBA"))
    assert loaded.mode == "RGB"
    got = pixels(loaded)
    assert got[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert got[0, 1].tolist() == [10, 20, 30]  # opaque -> unchanged
    alpha = 128 / 255
    assert got[0, 2].tolist() == [round(255 * (1 - alpha))] * 3  # half black over white
    alpha = 64 / 255
    np.testing.assert_allclose(got[0, 3], [200 * alpha + 255 * (1 - alpha), 255 * (1 - alpha), 255 * (1 - alpha)],
                               atol=1)
    la = Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8), "LA")
    assert pixels(convify.load_image(la)).tolist() == [[[255, 255, 255], [10, 10, 10]]]


def test_load_image_palette_with_transparency(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2])
    assert pixels(convify.load_image(palette)).tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]
    palette.save(tmp_path / "p.png", transparency=1)
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert pixels(convify.load_image(tmp_path / "p.png")).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]
    # an RGB PNG with a transparent colour (tRNS)
    rgb = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8))
    rgb.save(tmp_path / "t.png", transparency=(1, 2, 3))
    assert pixels(convify.load_image(tmp_path / "t.png")).tolist() == [[[255, 255, 255], [4, 5, 6]]]


def test_load_image_greyscale_png_with_transparent_value_becomes_white(tmp_path):
    grey = Image.fromarray(np.array([[7, 9]], dtype=np.uint8), "L")
    grey.save(tmp_path / "lt.png", transparency=7)
    reopened = Image.open(tmp_path / "lt.png")
    assert (reopened.mode, reopened.info.get("transparency")) == ("L", 7)
    assert pixels(convify.load_image(tmp_path / "lt.png")).tolist() == [[[255, 255, 255], [9, 9, 9]]]


def test_load_image_16_bit_greyscale_scales_to_8_bits(tmp_path):
    values = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    want = [[[255] * 3, [128] * 3, [0] * 3, [1] * 3]]  # 32768 / 65535 * 255 = 127.5 -> 128
    assert pixels(convify.load_image(image)).tolist() == want
    image.save(tmp_path / "g16.png")  # a real 16-bit PNG file
    assert pixels(convify.load_image(tmp_path / "g16.png")).tolist() == want
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert pixels(convify.load_image(big_endian)).tolist() == want
    floats = Image.fromarray(np.array([[1.0, 0.5, 0.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert pixels(convify.load_image(floats)).tolist() == [[[255] * 3, [128] * 3, [0] * 3]]


@pytest.mark.parametrize("mode", ["P", "L", "CMYK", "1"])
def test_load_image_makes_rgb(mode):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).convert(mode)
    loaded = convify.load_image(source)
    assert (loaded.mode, loaded.size) == ("RGB", (13, 9))
    np.testing.assert_array_equal(pixels(loaded), pixels(source.convert("RGB")))
    if mode == "L":
        got = pixels(loaded)
        assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
        np.testing.assert_array_equal(got[..., 0], pixels(source))


def test_load_image_from_tensors():
    chw = torch.tensor([[[0.0, 1.0]], [[0.5, 0.2]], [[1.0, 0.0]]])  # (3, 1, 2) floats in [0, 1]
    assert pixels(convify.load_image(chw)).tolist() == [[[0, 128, 255], [255, 51, 0]]]
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)  # (H, W, 3) uint8
    loaded = convify.load_image(torch.from_numpy(hwc))
    assert loaded.size == (5, 4)
    np.testing.assert_array_equal(pixels(loaded), hwc)
    levels = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255  # (3, H, W) floats on the 8-bit grid: exact
    np.testing.assert_array_equal(pixels(convify.load_image(levels)), hwc)
    np.testing.assert_array_equal(pixels(convify.load_image(levels[None])), hwc)  # (1, 3, H, W)
    out_of_range = torch.tensor([[[-0.5, 1.5]]] * 3)
    assert pixels(convify.load_image(out_of_range)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    with pytest.raises(ConvifyError, match="channels"):
        convify.load_image(torch.rand(5, 6, 7))


def test_load_image_errors_are_one_line_convify_errors(red_net, tmp_path):
    with pytest.raises(ConvifyError) as missing:
        convify.load_image(tmp_path / "missing.jpg")
    assert str(missing.value) == f"no such image: {tmp_path / 'missing.jpg'}"
    (tmp_path / "notes.jpg").write_text("these are not pixels\n")
    with pytest.raises(ConvifyError) as not_image:
        convify.load_image(tmp_path / "notes.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((SAMPLES / "chelsea.jpg").read_bytes()[:3000])
    with pytest.raises(ConvifyError) as cut:
        convify.load_image(truncated)
    for error, path in ((not_image, "notes.jpg"), (cut, "truncated.jpg")):
        message = str(error.value)
        assert message.startswith(f"cannot read {tmp_path / path} as an image")
        assert "\n" not in message
    with pytest.raises(ConvifyError, match="no such image"):
        convify.heatmap(tmp_path / "missing.jpg", model=red_net)


# --------------------------------------------------------------------------------------------------
# Size policy


def test_size_auto_makes_the_shorter_side_two_windows(red_net):
    result = convify.heatmap(scene(16), model=red_net)  # size="auto"
    assert result.input_size == (round(203 * 64 / 151), 64) == (86, 64)
    assert result.scale == (203 / 86, 151 / 64)
    portrait = convify.heatmap(scene(16).transpose(Image.Transpose.ROTATE_90), model=red_net, size="auto")
    assert portrait.input_size == (64, 86)
    assert portrait.image.size == (151, 203)


@pytest.mark.parametrize("size", [32, 100, 151, 457])
def test_size_int_sets_the_shorter_side(red_net, size):
    result = unpadded(scene(16), model=red_net, size=size)
    assert result.input_size == (round(203 * size / 151), size)
    assert result.image.size == SCENE_SIZE
    torch.testing.assert_close(result.boxes, expected_boxes(red_net.geometry, result.logits.shape[1:],
                                                            SCENE_SIZE, result.input_size), rtol=0, atol=0)
    assert float(result.boxes[..., 2].max()) <= 203 + 1e-3  # a padding-free net's windows stay inside


def test_size_none_keeps_the_pixels(red_net):
    result = unpadded(scene(16), model=red_net, size=None)
    assert result.input_size == SCENE_SIZE
    assert result.scale == (1.0, 1.0)
    assert result.logits.shape == (2, *red_net.geometry.output_size(151, 203)) == (2, 30, 43)
    assert result.boxes[29, 42].tolist() == [168.0, 116.0, 200.0, 148.0]


def test_an_image_too_small_for_the_network_names_the_minimum(red_net):
    assert red_net.geometry.min_input_size() == 32
    with pytest.raises(ConvifyError, match=r"at least 32 px a side") as error:
        unpadded(scene(4, x=0, y=0, size=(40, 20)), model=red_net, size=None)
    assert "40x20" in str(error.value)
    with pytest.raises(ConvifyError, match=r"at least 32 px a side"):
        unpadded(scene(16), model=red_net, size=16)
    # exactly the minimum gives a single cell
    assert unpadded(scene(4, x=0, y=0, size=(32, 32)), model=red_net, size=None).logits.shape == (2, 1, 1)


@pytest.mark.parametrize("size", [0, -5, 1.5, "big", True])
def test_bad_sizes_are_refused(red_net, size):
    with pytest.raises(ConvifyError, match="size must be"):
        convify.heatmap(scene(16), model=red_net, size=size)


# --------------------------------------------------------------------------------------------------
# One forward pass


def test_one_forward_pass_per_image_and_none_after(red_net, tmp_path):
    calls = []
    handle = red_net.register_forward_hook(lambda module, args, output: calls.append(tuple(args[0].shape)))
    try:
        result = unpadded(scene(16), model=red_net, size=302)
        assert calls == [(1, 3, 302, 406)]
        for query in ("red", "not red", 0, 1, "RED", "not"):
            result.prediction(query)
            result.overlay(query)
        result.top(2)
        result.grid(2)
        result.summary()
        result.save(tmp_path, stem="once")
        assert len(calls) == 1
    finally:
        handle.remove()


def test_many_classes_from_one_pass_on_the_real_model(lite0):
    calls = []
    handle = lite0.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = convify.heatmap(SAMPLES / "coffee.jpg", model=lite0, size=224)
        for index in (ESPRESSO, 281, 504, 968, 0, 999):
            result.prediction(index)
        overlays = [result.overlay(index) for index in (ESPRESSO, 968, 504)]
    finally:
        handle.remove()
    assert calls == [1]
    assert all(o.width == 600 and o.height > 400 for o in overlays)


# --------------------------------------------------------------------------------------------------
# Class names


def test_resolve_class_by_index_digits_name_and_prefix(lite0):
    classes = lite0.meta.classes
    assert resolve_class(classes, 967) == 967
    assert resolve_class(classes, "967") == 967
    assert resolve_class(classes, " 967 ") == 967
    assert resolve_class(classes, "espresso") == 967
    assert resolve_class(classes, "ESPRESSO") == 967
    assert resolve_class(classes, "Tiger Cat") == 282
    assert resolve_class(classes, "tiger") == 292  # an exact name beats being a prefix of 'tiger cat'
    assert resolve_class(classes, "espresso m") == classes.index("espresso maker")
    assert resolve_class(classes, "goldfis") == classes.index("goldfish")


def test_resolve_class_errors(lite0):
    classes = lite0.meta.classes
    with pytest.raises(ConvifyError) as ambiguous:
        resolve_class(classes, "gold")
    message = str(ambiguous.value)
    for name in ("'goldfish'", "'goldfinch'", "'golden retriever'"):
        assert name in message
    assert "several classes" in message
    with pytest.raises(ConvifyError) as unknown:
        resolve_class(classes, "espreso")
    assert str(unknown.value).startswith("unknown class 'espreso'; did you mean 'espresso'")
    with pytest.raises(ConvifyError, match="unknown class 'zqxjv'; use an index or a name"):
        resolve_class(classes, "zqxjv")
    for index in (1000, -1, "1000"):
        with pytest.raises(ConvifyError, match="out of range: the model has 1000 classes"):
            resolve_class(classes, index)
    with pytest.raises(ConvifyError, match="ambiguous: indices 0, 2"):
        resolve_class(["crane", "heron", "Crane"], "crane")


def test_result_class_queries_use_the_same_rules(red_net):
    result = convify.heatmap(scene(16), model=red_net)
    assert [result.class_index(q) for q in ("red", "Not Red", "not", 1, "0")] == [0, 1, 1, 1, 0]
    with pytest.raises(ConvifyError, match="matches several classes"):
        result.prediction("")  # a prefix of both
    with pytest.raises(ConvifyError, match="out of range"):
        result.overlay(2)


# --------------------------------------------------------------------------------------------------
# Saving


@pytest.fixture(scope="module")
def red_result(red_net) -> convify.HeatmapResult:
    return convify.heatmap(scene(16), model=red_net, size=302)


def test_save_writes_the_named_files(red_result, tmp_path):
    written = red_result.save(tmp_path, stem="scene", k=2)
    assert written == [tmp_path / "scene.heatmap.png", tmp_path / "scene.json", tmp_path / "scene.logits.npy",
                       tmp_path / "scene.boxes.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporary files

    logits = np.load(tmp_path / "scene.logits.npy")
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, red_result.logits.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "scene.boxes.npy"), red_result.boxes.numpy())
    grid = Image.open(tmp_path / "scene.heatmap.png")
    np.testing.assert_array_equal(pixels(grid.convert("RGB")), pixels(red_result.grid(2)))

    summary = json.loads((tmp_path / "scene.json").read_text())
    assert summary["image_size"] == [203, 151]
    assert summary["input_size"] == [406, 302]
    assert summary["map_size"] == list(red_result.logits.shape[1:])
    assert summary["geometry"]["stride"] == 4 and summary["geometry"]["window"] == 32
    assert summary["geometry"]["scale_to_original"] == [0.5, 0.5]
    assert [t["name"] for t in summary["top"]] == ["red", "not red"]  # top max(k, 5), of 2 classes
    red = red_result.prediction("red")
    top = summary["top"][0]
    assert (top["index"], top["cell"]) == (0, list(red.cell))
    assert top["probability"] == pytest.approx(red.score, rel=1e-7)
    assert top["logit"] == pytest.approx(red.logit, rel=1e-7)
    assert top["box"] == [round(v, 2) for v in red.box]
    assert summary["classes"] == []


def test_save_per_query_png_and_source_stem(red_net, tmp_path):
    source = tmp_path / "photo.png"
    scene(16).save(source)
    result = convify.heatmap(source, model=red_net, size=302)
    out = tmp_path / "out" / "nested"  # created
    written = result.save(out, queries=["not red", "RED"], formats=["png", "json"])
    assert written == [out / "photo.not_red.png", out / "photo.red.png", out / "photo.json"]
    np.testing.assert_array_equal(pixels(Image.open(out / "photo.red.png").convert("RGB")),
                                  pixels(result.overlay("red")))
    summary = json.loads((out / "photo.json").read_text())
    assert summary["image"] == str(source)
    assert [c["name"] for c in summary["classes"]] == ["not red", "red"]
    assert summary["classes"][1]["cell"] == list(result.prediction("red").cell)
    assert result.save(tmp_path / "npy", formats=["npy"]) == [tmp_path / "npy" / "photo.logits.npy",
                                                              tmp_path / "npy" / "photo.boxes.npy"]
    with pytest.raises(ConvifyError, match="unknown format"):
        result.save(tmp_path, formats=["png", "gif"])


def test_save_never_overwrites_without_force(red_result, tmp_path):
    (tmp_path / "scene.json").write_text("precious")
    with pytest.raises(OutputExistsError, match="scene.json already exists"):
        red_result.save(tmp_path, stem="scene")
    assert [p.name for p in tmp_path.iterdir()] == ["scene.json"]  # nothing else written either
    assert (tmp_path / "scene.json").read_text() == "precious"

    written = red_result.save(tmp_path, stem="scene", force=True)
    assert json.loads((tmp_path / "scene.json").read_text())["input_size"] == [406, 302]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_save_writes_one_png_per_queried_class(tmp_path):
    fcn = convify.convert(Redness(2.0), input_size=32, classes=["red-ish", "red ish"], mean=(0, 0, 0),
                          std=(1, 1, 1))
    result = convify.heatmap(scene(16), model=fcn, size=302)
    written = result.save(tmp_path, stem="s", queries=["red-ish", "red ish"], formats=["png"])
    assert len(set(written)) == 2  # got [s.red_ish.png, s.red_ish.png]
    assert len(list(tmp_path.iterdir())) == 2


# --------------------------------------------------------------------------------------------------
# Logits and probabilities


def test_logits_are_the_raw_network_output_and_probs_their_softmax():
    mean, std = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)
    fcn = red_network(gain=3.0, mean=mean, std=std)
    levels = torch.randint(0, 256, (3, 45, 61)) / 255  # on the 8-bit grid, so load_image loses nothing
    result = unpadded(levels, model=fcn, size=None)
    assert result.input_size == (61, 45)
    with torch.no_grad():
        normalised = (levels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        expected = fcn(normalised[None])[0]
    assert result.logits.dtype == torch.float32
    torch.testing.assert_close(result.logits, expected)
    torch.testing.assert_close(result.probs, torch.softmax(expected, dim=0))
    torch.testing.assert_close(result.probs.sum(dim=0), torch.ones(result.logits.shape[1:]))
    assert result.classes == ["red", "not red"]


def test_probs_sum_to_one_per_cell_on_the_real_model(chelsea, lite0):
    assert chelsea.input_size == (round(451 * 448 / 300), 448)  # "auto": twice the 224 px window
    left, top, right, bottom = chelsea.pad  # reflect padding by default: cells reach the image's edges
    assert (left, top) == (96, 96) and (right, bottom) == lite0.geometry.cover_padding(673)[1:] + lite0.geometry.cover_padding(448)[1:]
    assert chelsea.logits.shape == (1000, *lite0.geometry.output_size(448 + top + bottom, 673 + left + right))
    torch.testing.assert_close(chelsea.probs.sum(dim=0), torch.ones(chelsea.logits.shape[1:]))
    torch.testing.assert_close(chelsea.probs, torch.softmax(chelsea.logits, dim=0))
    best = chelsea.prediction(ESPRESSO)
    assert best.logit == float(chelsea.logits[ESPRESSO][best.cell])
    assert best.score == float(chelsea.probs[ESPRESSO].max())


def test_classes_without_names_are_numbered():
    fcn = convify.convert(Redness(2.0), input_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    result = convify.heatmap(scene(16), model=fcn)
    assert result.classes == ["class 0", "class 1"]
    assert result.class_index("class 1") == 1


# --------------------------------------------------------------------------------------------------
# Hostile images, sizes and outputs




IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def encoded(fmt: str, size: tuple[int, int] = (24, 16), mode: str = "RGB", **options) -> bytes:
    """A small noisy image in ``fmt``, as bytes."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_hostile_files_are_one_line_image_errors(tmp_path):
    jpeg = encoded("JPEG", (64, 64))
    cases = {
        "dir.png": None,
        "broken.png": encoded("PNG")[:40] + b"\x00\x01\x02" + encoded("PNG")[43:],
        "cut.png": encoded("PNG")[:60],
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "empty.png": b"",
        "bomb.png": png_declaring(40000, 40000),
        "script.eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        "drawing.svg": b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
        "doc.pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\n",
    }
    for name, data in cases.items():
        if data is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    formats = "not a PNG, JPEG, WebP, TIFF, BMP, GIF, PPM or ICO file, or a damaged one"
    expected = {
        "dir.png": f"{tmp_path / 'dir.png'} is a directory, not an image",
        "broken.png": f"cannot read {tmp_path / 'broken.png'} as an image ({formats})",
        "cut.png": f"cannot read {tmp_path / 'cut.png'} as an image (image file is truncated)",
        "cut.jpg": f"cannot read {tmp_path / 'cut.jpg'} as an image (image file is truncated",
        "empty.png": f"cannot read {tmp_path / 'empty.png'} as an image ({formats})",
        "bomb.png": f"{tmp_path / 'bomb.png'} declares 1,600,000,000 pixels, more than the "
                    f"{Image.MAX_IMAGE_PIXELS:,} allowed; not decoding it (a decompression bomb?)",
        "script.eps": f"cannot read {tmp_path / 'script.eps'} as an image ({formats})",
        "drawing.svg": f"cannot read {tmp_path / 'drawing.svg'} as an image ({formats})",
        "doc.pdf": f"cannot read {tmp_path / 'doc.pdf'} as an image ({formats})",
        "pipe.png": f"{tmp_path / 'pipe.png'} is not a regular file (a pipe, device or socket); give an image file",
    }
    for name, message in expected.items():
        with pytest.raises(ImageError) as error:
            convify.load_image(tmp_path / name)
        assert str(error.value).startswith(message), name
        assert "\n" not in str(error.value)


def test_a_bomb_between_pillows_limit_and_convifys_is_refused_by_our_check(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the application turned Pillow's check off
    (tmp_path / "bomb.png").write_bytes(png_declaring(20000, 20000))
    with pytest.raises(ImageError) as error:
        convify.load_image(tmp_path / "bomb.png")
    assert str(error.value) == (f"{tmp_path / 'bomb.png'} declares 20000x20000 = 400,000,000 pixels, more than "
                                f"the {limits.MAX_IMAGE_PIXELS:,} allowed; not decoding it (a decompression bomb?)")


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    path.write_bytes(encoded("PNG"))
    real_open = os.open

    def refuse(name, *args, **kwargs):
        if Path(name) == path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ImageError) as error:
        convify.load_image(path)
    assert str(error.value) == f"cannot open {path}: permission denied"


@pytest.mark.skipif(IS_ROOT, reason="root reads a 0000 file anyway")
def test_unreadable_file_for_real(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(encoded("PNG"))
    path.chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        convify.load_image(path)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"quality": 80}),
                                          ("TIFF", {}), ("TIFF", {"compression": "tiff_deflate"}), ("GIF", {}),
                                          ("BMP", {}), ("PPM", {}), ("ICO", {"sizes": [(24, 16)]})])
def test_allowed_formats_load(tmp_path, fmt, options):
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(encoded(fmt, (24, 16), **options))
    assert convify.load_image(path).size == (24, 16)


FUZZ_SEEDS = {fmt: encoded(fmt, (12, 10), **options) for fmt, options in
              [("PNG", {}), ("JPEG", {"quality": 75}), ("WEBP", {"quality": 75}), ("TIFF", {}),
               ("GIF", {})]}


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(FUZZ_SEEDS)), data=st.data())
def test_fuzzed_image_files_only_ever_raise_image_error(tmp_path, monkeypatch, fmt, data):
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 4_000_000)  # keep the decoding of a mutated size quick
    raw = bytearray(FUZZ_SEEDS[fmt])
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw)), label="length")]
    path = tmp_path / f"fuzz.{fmt.lower()}"
    path.write_bytes(bytes(raw))
    try:
        image = convify.load_image(path)
    except ImageError as e:
        assert "\n" not in str(e)
    else:
        assert image.mode == "RGB"


def test_size_policy_is_bounded():
    window = 224
    # the 560-byte 40000x4 PNG: auto used to ask for 4,480,000 x 448 px; it is now capped, keeping the ratio
    (w, h), capped = _target_size(40000, 4, "auto", window)
    assert capped and (w, h) == (limits.MAX_SIDE, 1)
    (w, h), capped = _target_size(8000, 6000, "auto", window, max_pixels=100_000)
    assert capped and w * h <= 100_000 and abs(w / h - 4 / 3) < 0.01
    assert _target_size(600, 400, "auto", window) == ((672, 448), False)
    with pytest.raises(LimitError) as error:
        _target_size(40000, 4, 5000, window)
    assert str(error.value) == ("at size 5000 the image would be 50000000x5000 px, longer than the 16384 px a side "
                                "allowed (convify.limits.MAX_SIDE); lower --size or crop the image")
    with pytest.raises(LimitError) as error:
        _target_size(6000, 4000, None, window, max_pixels=1_000_000)
    assert str(error.value) == ("at its own size the image would be 6000x4000 = 24,000,000 pixels, more than the "
                                "1,000,000 allowed (--max-pixels, max_pixels=); pass a size (--size) or raise "
                                "--max-pixels")
    with pytest.raises(LimitError) as error:
        _target_size(600, 400, 100_000, window)
    assert str(error.value) == ("size 100000 px is more than the longest side allowed, 16384 px "
                                "(convify.limits.MAX_SIDE); lower --size")
    for bad in (0, -1, 2.5, True, "many"):
        with pytest.raises(ConvifyError, match="max_pixels must be"):
            _target_size(600, 400, "auto", window, max_pixels=bad)


def test_an_extremely_wide_image_is_refused_with_the_reason(red_net, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (40000, 4), (200, 10, 10)).save(path)
    assert path.stat().st_size < 1000
    with pytest.raises(ImageError) as error:
        convify.heatmap(path, model=red_net)
    assert str(error.value) == ("the image is 40000x4 px: scaled to fit the bounds on the network's input it is "
                                "16384x1 px, and the network needs at least 32 px a side (its aspect ratio is too "
                                "extreme: crop it)")


def test_max_pixels_caps_auto_and_refuses_an_explicit_size(red_net):
    result = convify.heatmap(scene(16), model=red_net, max_pixels=3000)
    assert result.input_size[0] * result.input_size[1] <= 3000 and result.input_size == (63, 47)
    with pytest.raises(LimitError, match=r"203x151 = 30,653 pixels, more than the 3,000 allowed"):
        convify.heatmap(scene(16), model=red_net, size=None, max_pixels=3000)


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:121] "
                                                                 "DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_in_the_forward_pass_is_a_limit_error(failure, monkeypatch):
    net = red_network()

    def explode(x):
        raise failure

    monkeypatch.setattr(net, "forward", explode)
    with pytest.raises(LimitError) as error:
        convify.heatmap(scene(16), model=net)
    assert str(error.value) == "out of memory running the network on 86x64 px (lower --size or --max-pixels)"
    monkeypatch.setattr(net, "forward", lambda x: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not disguised
        convify.heatmap(scene(16), model=net)


def test_top_k_larger_than_the_classes_and_the_grid_cap(red_net):
    result = convify.heatmap(scene(16), model=red_net)
    assert [p.name for p in result.top(10**20)] == [p.name for p in result.top(2)]
    many = convify.HeatmapResult(result.image, torch.randn(40, 3, 4), [f"c{i}" for i in range(40)],
                                 torch.zeros(3, 4, 4), torch.zeros(3, 4, 2), result.input_size, result.geometry)
    one = many.overlay(0)
    grid = many.grid(k=1000)
    columns, rows = 3, -(-limits.MAX_GRID_PANELS // 3)
    assert grid.size == (columns * one.width + 2 * 8, rows * one.height + (rows - 1) * 8)


def test_save_refuses_to_overwrite_its_own_image_even_with_force(red_net, tmp_path):
    path = tmp_path / "pic.json"  # a PNG with a misleading name: its summary would be pic.json
    scene(16).save(path, format="PNG")
    before = path.read_bytes()
    result = convify.heatmap(path, model=red_net)
    with pytest.raises(OutputError, match=r"pic\.json is an input of this run"):
        result.save(tmp_path, force=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["pic.json"]
    other = tmp_path / "a.json"  # another input of the batch, where this image's summary would go
    other.write_bytes(b"precious")
    with pytest.raises(OutputError, match=r"a\.json is an input of this run"):
        result.save(tmp_path, stem="a", force=True, inputs=[other])
    assert other.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "pic.json"]


def test_save_on_a_full_disk_writes_nothing(red_result, tmp_path, monkeypatch):
    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import convify.outputs

    monkeypatch.setattr(convify.outputs.os, "fdopen", 
                        lambda fd, mode="r", *a, real=os.fdopen, **k:
                        FullDisk(fd, "wb") if "w" in mode else real(fd, mode, *a, **k))
    with pytest.raises(OutputError, match=r"^cannot write .*: no space left on the device$"):
        red_result.save(tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


# --------------------------------------------------------------------------------------------------
# Padding: full coverage


@pytest.mark.parametrize("length", [32, 33, 57, 100, 131])
def test_padding_lets_cell_squares_cover_every_pixel(red_net, length):
    """Independent of the formula: the squares of side stride around the cell centres cover [0, length)."""
    g = red_net.geometry
    before, after = g.cover_padding(length)
    cells = g.output_size(length + before + after)[0]
    centres = [(g.cell_box(0, j)[0] + g.cell_box(0, j)[2]) / 2 - before for j in range(cells)]
    covered = np.zeros(length, bool)
    for c in centres:
        covered[max(0, math.floor(c - g.stride / 2)):max(0, math.ceil(c + g.stride / 2))] = True
    assert covered.all()
    assert centres[0] <= g.stride / 2 and centres[-1] >= length - g.stride / 2
    # and no less padding after does it
    if after:
        shorter = g.output_size(length + before + after - 1)[0]
        assert (g.cell_box(0, shorter - 1)[0] + g.cell_box(0, shorter - 1)[2]) / 2 - before + g.stride / 2 < length


@pytest.mark.parametrize("mode, numpy_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_padded_maps_equal_the_network_on_an_independently_padded_image(red_net, mode, numpy_mode):
    picture = scene(10, x=3, y=40, size=(70, 45))
    result = convify.heatmap(picture, model=red_net, size=None, pad=mode)
    left, top, right, bottom = result.pad
    assert (left, top) == red_net.geometry.cover_padding(70)[:1] + red_net.geometry.cover_padding(45)[:1]
    array = np.asarray(picture, dtype=np.float32) / 255  # red_net: mean 0, std 1
    padded = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode=numpy_mode)
    with torch.inference_mode():
        expected = red_net(torch.from_numpy(padded).permute(2, 0, 1)[None].contiguous())[0]
    torch.testing.assert_close(result.logits, expected)
    assert tuple(result.boxes[0, 0].tolist()) == (-left, -top, 32 - left, 32 - top)


def test_an_object_at_the_corner_is_found_there_only_when_padded(red_net):
    picture = scene(12, x=0, y=0, size=(96, 80))
    padded = convify.heatmap(picture, model=red_net, size=None).prediction("red")
    cx, cy = (padded.box[0] + padded.box[2]) / 2, (padded.box[1] + padded.box[3]) / 2
    assert cx < 12 and cy < 12  # the peak cell is centred on the red square
    plain = unpadded(picture, model=red_net, size=None).prediction("red")
    assert (plain.box[0] + plain.box[2]) / 2 >= 16  # without padding no cell is centred nearer the corner


def test_padding_leaves_nothing_hatched(red_net):
    result = convify.heatmap(scene(12), model=red_net, size=None)
    from convify.render import place_map

    _, inside = place_map(result.probs[0], result.centers, result._region_step(), result.image.size)
    assert bool(inside.all())
    _, inside = place_map(*(lambda r: (r.probs[0], r.centers, r._region_step(), r.image.size))(
        unpadded(scene(12), model=red_net, size=None)))
    assert not bool(inside.all())


def test_a_bad_pad_mode_is_refused(red_net):
    with pytest.raises(ConvifyError, match="pad must be one of"):
        convify.heatmap(scene(12), model=red_net, pad="mirror")
