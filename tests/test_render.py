"""convify.render: cell values placed at their cells' centres (not stretched over the image), the no-data band,
overlays, colour maps against matplotlib, and grids.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from convify.geometry import Geometry
from convify.render import NO_DATA_GREY, colorize, grid, overlay, place_map


def lattice(rows: int, cols: int, first: Sequence[float], step: Sequence[float]) -> torch.Tensor:
    """``(rows, cols, 2)`` centres ``(x, y)``: the first at ``first``, then every ``step``."""
    i, j = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    return torch.stack([first[0] + j * step[0], first[1] + i * step[1]], dim=-1).float()


def geometry_centers(g: Geometry, rows: int, cols: int) -> torch.Tensor:
    return torch.tensor([[g.cell_center(i, j) for j in range(cols)] for i in range(rows)], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# place_map


def test_values_sit_exactly_at_their_cell_centres():
    # Centres on pixel centres (x.5), a step of 7 x 5 px; (cols - 1) and (rows - 1) powers of two, so the
    # sampling arithmetic is exact in float32.
    rows, cols, first, step = 3, 5, (10.5, 7.5), (7.0, 5.0)
    values = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols) * 1.37 - 3
    placed, inside = place_map(values, lattice(rows, cols, first, step), step, (60, 30))
    assert placed.shape == inside.shape == (30, 60)
    for i in range(rows):
        for j in range(cols):
            x, y = int(first[0] + j * step[0]), int(first[1] + i * step[1])  # the pixel whose centre it is
            assert placed[y, x].item() == values[i, j].item(), (i, j)
            assert inside[y, x]


def test_values_at_centres_on_an_uneven_map():
    rows, cols, first, step = 4, 7, (3.5, 6.5), (6.0, 9.0)
    values = torch.randn(rows, cols)
    placed, _ = place_map(values, lattice(rows, cols, first, step), step, (50, 45))
    at_centres = torch.stack([placed[int(first[1] + i * step[1]), int(first[0] + j * step[0])]
                              for i in range(rows) for j in range(cols)]).reshape(rows, cols)
    torch.testing.assert_close(at_centres, values)


def test_between_centres_values_are_linear_interpolations():
    rows, cols, first, step = 3, 5, (10.5, 7.5), (7.0, 5.0)
    values = torch.randn(rows, cols)
    placed, _ = place_map(values, lattice(rows, cols, first, step), step, (60, 30))
    # along row 1 (y = 12), from the centre of cell (1, 2) at x = 24 to that of (1, 3) at x = 31
    y, x0 = 12, 24
    for k in range(8):
        t = k / 7
        want = (1 - t) * values[1, 2] + t * values[1, 3]
        torch.testing.assert_close(placed[y, x0 + k], want)
    # bilinear among four centres: pixel (27, 14) has its centre (27.5, 14.5) at t = 3/7 from x = 24.5 and
    # s = 2/5 from y = 12.5
    t, s = 3 / 7, 2 / 5
    want = ((1 - t) * (1 - s) * values[1, 2] + t * (1 - s) * values[1, 3] + (1 - t) * s * values[2, 2]
            + t * s * values[2, 3])
    torch.testing.assert_close(placed[12 + 2, 24 + 3], want)


def test_inside_mask_is_the_band_of_half_a_step_around_the_outer_centres():
    # A 224 px window at stride 32, scale 1 (the engine's centres): cell (0, 0)'s centre is at 112.0 and
    # its square covers [96, 128); the last of 5 columns is centred at 240 and its square ends at 256.
    g = Geometry(stride=32, window=224, offset=0, receptive_field=224, rf_offset=0)
    rows, cols = 3, 5
    centers = geometry_centers(g, rows, cols)
    assert centers[0, 0].tolist() == [112.0, 112.0] and centers[-1, -1].tolist() == [240.0, 176.0]
    width, height = 224 + 4 * 32 + 10, 224 + 2 * 32 + 6
    _, inside = place_map(torch.rand(rows, cols), centers, (32, 32), (width, height))
    columns = inside.any(dim=0)
    lines = inside.any(dim=1)
    assert not columns[95] and columns[96] and columns[255] and not columns[256]
    assert not lines[95] and lines[96] and lines[191] and not lines[192]
    assert columns.nonzero().flatten().tolist() == list(range(96, 256))  # 5 squares of 32 px
    assert lines.nonzero().flatten().tolist() == list(range(96, 192))  # 3 squares of 32 px
    # it is a rectangle: every row of the band has exactly the band's columns
    assert torch.equal(inside[96:192], columns[None].expand(96, -1))
    assert not inside[:96].any() and not inside[192:].any()


def test_a_single_cell_map_is_constant_inside_its_square():
    centers = torch.tensor([[[20.0, 15.0]]])  # its square: [15, 25) x [10, 20)
    placed, inside = place_map(torch.tensor([[0.7]]), centers, (10.0, 10.0), (40, 30))
    assert inside.nonzero()[:, 1].unique().tolist() == list(range(15, 25))
    assert inside.nonzero()[:, 0].unique().tolist() == list(range(10, 20))
    assert int(inside.sum()) == 100
    torch.testing.assert_close(placed[inside], torch.full((100,), 0.7))


def test_placed_peak_is_at_the_hot_cell_centre_not_where_stretching_puts_it():
    """The classic misalignment: stretching the map over the image puts cell (0, 0)'s heat in the corner."""
    # A 225 px window at stride 32 (centres on pixel centres: 112.5 + 32 j), 5 x 5 cells on 353 x 353 px.
    g = Geometry(stride=32, window=225, offset=0, receptive_field=225, rf_offset=0)
    rows = cols = 5
    size = 225 + 4 * 32
    centers = geometry_centers(g, rows, cols)
    values = torch.zeros(rows, cols)
    values[0, 0] = 1.0
    placed, inside = place_map(values, centers, (32, 32), (size, size))
    stretched = F.interpolate(values[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]

    cx = cy = 112  # the pixel whose centre is cell (0, 0)'s centre
    assert placed[cy, cx].item() == 1.0  # ours: the full value exactly where the cell looked
    assert stretched[cy, cx].item() == 0.0  # stretched: nothing there at all
    # Ours decreases moving from the centre towards the other cells; the heat ends at the centre.
    row = placed[cy]
    assert (row[cx + 1: cx + 32] < row[cx: cx + 31]).all()
    assert row[cx + 32].item() == 0.0  # the next cell's centre
    hottest = (placed == 1.0) & inside
    ys, xs = hottest.nonzero(as_tuple=True)
    assert (int(xs.max()), int(ys.max())) == (cx, cy)
    # Stretched: the peak's plateau ends at the first stretched cell's centre, 353 / 5 / 2 ~ 35 px from the
    # corner: more than two strides away from where the cell's window actually is.
    stretched_peak = (stretched == stretched.max()).nonzero(as_tuple=True)
    sx, sy = int(stretched_peak[1].max()), int(stretched_peak[0].max())
    assert (sx, sy) != (cx, cy)
    assert cx - sx > 2 * 32 and cy - sy > 2 * 32
    assert (sx, sy) == (34, 34)


# --------------------------------------------------------------------------------------------------
# colorize


@pytest.mark.parametrize("cmap", ["inferno", "viridis", "gray"])
def test_colorize_uses_matplotlib_colormaps(cmap):
    values = np.linspace(-0.25, 1.25, 301).reshape(7, 43)
    got = colorize(values, cmap)
    assert got.shape == (7, 43, 3) and got.dtype == np.uint8
    reference = colormaps[cmap](np.clip(values, 0, 1))[..., :3] * 255  # matplotlib's own colours, 0..255
    np.testing.assert_allclose(got.astype(np.float64), reference, atol=0.5 + 1e-9)
    # the ends of the scale, and beyond them (clipped)
    top = np.asarray(colormaps[cmap](1.0)[:3]) * 255
    np.testing.assert_allclose(colorize(np.array([1.0, 5.0]), cmap), [top, top], atol=0.5 + 1e-9)


def test_colorize_maps_vmin_vmax_to_the_ends():
    inferno = colormaps["inferno"]
    values = np.array([2.0, 3.0, 4.0, 1.0, 9.0])
    got = colorize(values, "inferno", vmin=2.0, vmax=4.0)
    want = inferno(np.array([0.0, 0.5, 1.0, 0.0, 1.0]))[:, :3] * 255
    np.testing.assert_allclose(got.astype(np.float64), want, atol=0.5 + 1e-9)
    assert got[0].tolist() == [0, 0, 4]  # inferno's first colour, rounded
    assert got[2].tolist() == got[4].tolist()


# --------------------------------------------------------------------------------------------------
# overlay


def noise_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_overlay_size_mode_and_no_data_is_grey():
    g = Geometry(stride=32, window=224, offset=0, receptive_field=224, rf_offset=0)
    rows, cols = 3, 5
    width, height = 224 + 4 * 32 + 10, 224 + 2 * 32 + 6
    photo = noise_photo(width, height)
    before = np.asarray(photo).copy()
    values = torch.rand(rows, cols) * 0.5
    values[1, 2] = 0.9  # the peak (whose square is outlined) in the middle, away from the no-data band
    centers = geometry_centers(g, rows, cols)
    out = overlay(photo, values, centers, (32, 32), label="noise")
    assert out.mode == "RGB" and out.width == width and out.height > height  # the legend strip below
    assert overlay(photo, values, centers, (32, 32), legend=False).size == (width, height)
    np.testing.assert_array_equal(np.asarray(photo), before)  # the photo is not drawn on

    drawn = np.asarray(out)[:height].astype(int)
    _, inside = place_map(values, centers, (32, 32), (width, height))
    no_data = ~inside.numpy()
    assert no_data.sum() > 0.5 * width * height
    grey = drawn[no_data]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()  # no colour at all
    hatch = drawn[no_data][:, 0] == 200
    assert 0.05 < hatch.mean() < 0.4  # diagonal lines, 2 px in every 12
    # not hatched: the photo's brightness pulled towards NO_DATA_GREY
    plain = ~hatch
    brightness = before[no_data][plain].astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(grey[plain][:, 0], brightness * 0.35 + NO_DATA_GREY * 0.65, atol=1.0)
    # inside the band the photo is coloured
    coloured = drawn[inside.numpy()]
    assert (coloured[:, 0] != coloured[:, 2]).mean() > 0.9


def test_overlay_hot_cell_is_closer_to_the_top_colour_than_a_cold_cell():
    step = (16.0, 16.0)
    centers = lattice(4, 4, (20.5, 20.5), step)
    values = torch.full((4, 4), 0.05)
    values[2, 1] = 0.9
    photo = Image.new("RGB", (80, 80), (90, 110, 130))
    out = np.asarray(overlay(photo, values, centers, step, legend=False, box=(0, 0, 0, 0))).astype(float)
    top = np.asarray(colormaps["inferno"](1.0)[:3]) * 255
    hot = out[int(20.5 + 2 * 16), int(20.5 + 1 * 16)]  # (row, column) of cell (2, 1)'s centre
    cold = out[int(20.5 + 0 * 16), int(20.5 + 3 * 16)]
    assert np.linalg.norm(hot - top) < np.linalg.norm(cold - top) - 50
    # at the peak (vmax = the map's peak), the colour is 0.6 top colour + 0.4 photo
    np.testing.assert_allclose(hot, 0.6 * top + 0.4 * np.array([90, 110, 130]), atol=1.0)


def test_overlay_outlines_the_peak_cell_square():
    step = (16.0, 16.0)
    centers = lattice(4, 4, (24.0, 24.0), step)
    values = torch.zeros(4, 4)
    values[1, 2] = 1.0
    photo = Image.new("RGB", (96, 96), (0, 0, 0))
    out = np.asarray(overlay(photo, values, centers, step, legend=False))
    # cell (1, 2)'s centre is (56, 40): its square is [48, 64) x [32, 48)
    assert out[32, 56].tolist() == [0, 255, 255] and out[40, 48].tolist() == [0, 255, 255]
    assert out[40, 56].tolist() != [0, 255, 255]


# --------------------------------------------------------------------------------------------------
# grid


def test_grid_tiles_images_with_gaps():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    sizes = [(30, 20), (10, 25), (40, 5), (7, 7)]
    images = [Image.new("RGB", s, c) for s, c in zip(sizes, colours)]
    tiled = grid(images, columns=3, gap=8)
    cell_w, cell_h = 40, 25
    assert tiled.size == (3 * cell_w + 2 * 8, 2 * cell_h + 8)
    array = np.asarray(tiled)
    for n, (image, colour) in enumerate(zip(images, colours)):
        r, c = divmod(n, 3)
        x0, y0 = c * (cell_w + 8), r * (cell_h + 8)
        block = array[y0: y0 + image.height, x0: x0 + image.width]
        assert (block == colour).all()
    assert (array[:, cell_w: cell_w + 8] == 255).all()  # the first gap column is white
    assert (array[0, 30:40] == 255).all()  # a narrower image leaves its cell white


def test_grid_with_fewer_images_than_columns_and_no_images():
    images = [Image.new("RGB", (10, 12), (1, 2, 3))] * 2
    assert grid(images, columns=3, gap=8).size == (2 * 10 + 8, 12)
    assert grid(images[:1]).size == (10, 12)
    assert grid(images * 3, columns=2, gap=0).size == (20, 36)
    with pytest.raises(ValueError):
        grid([])


# --------------------------------------------------------------------------------------------------
# overlay_large: huge images drawn on a thumbnail

from convify.render import DEFAULT_MAX_SIDE, overlay_large  # noqa: E402

# A 6000 x 4000 photo under a 224 px window at stride 32: cell (0, 0) centred at (112, 112), 181 x 119 cells.
BIG, FIRST, STEP = (6000, 4000), (112.0, 112.0), (32.0, 32.0)
BIG_MAP = ((BIG[1] - 224) // 32 + 1, (BIG[0] - 224) // 32 + 1)


def hottest(image: Image.Image, cold: Image.Image) -> tuple[int, int]:
    """``(x, y)`` of the pixel that changed most from the drawing of an all-zero map."""
    change = np.abs(np.asarray(image).astype(float) - np.asarray(cold).astype(float)).sum(axis=2)
    y, x = np.unravel_index(np.argmax(change), change.shape)
    return int(x), int(y)


@pytest.mark.parametrize("thumb", [(1500, 1000), (1000, 667), (600, 400), (301, 217), (150, 100)])
@pytest.mark.parametrize("cell", [(50, 120), (3, 170), (117, 1)])  # not on the edge: an edge cell owns a plateau
def test_large_overlay_puts_the_peak_at_the_cell_centre_scaled_to_the_thumbnail(thumb, cell):
    values = torch.zeros(BIG_MAP)
    values[cell] = 1.0
    photo = Image.new("RGB", thumb, (90, 90, 90))
    options = dict(image_size=BIG, geometry_center0=FIRST, step=STEP, legend=False, box=(0, 0, 0, 0), vmax=1.0,
                   reduce="max")
    out = overlay_large(photo, values, **options)
    assert out.size == thumb
    tx, ty = thumb[0] / BIG[0], thumb[1] / BIG[1]
    want = ((FIRST[0] + cell[1] * STEP[0]) * tx, (FIRST[1] + cell[0] * STEP[1]) * ty)  # continuous coordinates
    x, y = hottest(out, overlay_large(photo, torch.zeros(BIG_MAP), **options))
    assert abs(x + 0.5 - want[0]) <= 1.5 and abs(y + 0.5 - want[1]) <= 1.5, ((x, y), want)


def test_large_overlay_is_the_full_overlay_shrunk():
    # A photo small enough to draw both ways: the thumbnail's overlay against the full one shrunk to its size.
    width, height, first, step = 1200, 800, (112.0, 112.0), (32.0, 32.0)
    rows, cols = (height - 224) // 32 + 1, (width - 224) // 32 + 1
    yy, xx = np.mgrid[0:height, 0:width]
    photo = Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.uint8))
    i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    values = torch.sigmoid(torch.sin(i / 3.0) + torch.cos(j / 4.0))  # smooth, so resampling barely matters
    full = overlay(photo, values, lattice(rows, cols, first, step), step, legend=False, box=(0, 0, 0, 0))
    for scale in (2, 3, 4):
        size = (width // scale, height // scale)
        small = overlay_large(photo.resize(size, Image.Resampling.BOX), values, image_size=(width, height),
                              geometry_center0=first, step=step, legend=False, box=(0, 0, 0, 0))
        shrunk = full.resize(size, Image.Resampling.BOX)
        a, b = np.asarray(small).astype(float), np.asarray(shrunk).astype(float)
        # inside the cells' squares, away from the no-data band (hatching is drawn at each image's own scale)
        margin = 128 // scale
        diff = np.abs(a - b)[margin:-margin, margin:-margin]
        assert diff.mean() < 1.5 and np.percentile(diff, 99) < 12, (scale, diff.mean())
        # the no-data band is grey in both
        band_a, band_b = a[: 80 // scale, : 80 // scale], b[: 80 // scale, : 80 // scale]
        assert abs(band_a.mean() - band_b.mean()) < 12


def test_large_overlay_output_is_bounded_by_max_side():
    values = torch.rand(BIG_MAP)
    photo = Image.new("RGB", (3000, 2000), (40, 80, 120))  # a too large "thumbnail"
    out = overlay_large(photo, values, image_size=BIG, geometry_center0=FIRST, step=STEP, max_side=1024,
                        label="cat")
    assert out.width == 1024 and 683 <= out.height <= 683 + 100  # the legend strip below
    assert max(overlay_large(Image.new("RGB", (5000, 100)), torch.rand(2, 150), image_size=(50000, 1000),
                             geometry_center0=(112, 112), step=(320, 320), legend=False).size) == DEFAULT_MAX_SIDE


def test_large_overlay_pools_cells_closer_than_a_pixel():
    # 4000 x 4000 cells on a 500 px thumbnail: 8 cells a pixel. One hot cell: "max" keeps it at full strength,
    # "mean" shows what shrinking the full overlay would (1/64 of it).
    values = torch.zeros(4000, 4000)
    values[2000, 1000] = 1.0
    photo = Image.new("RGB", (500, 500), (90, 90, 90))
    options = dict(image_size=(128_000, 128_000), geometry_center0=(16.0, 16.0), step=(32.0, 32.0), legend=False,
                   box=(0, 0, 0, 0), vmax=1.0)
    hot = overlay_large(photo, values, reduce="max", **options)
    x, y = hottest(hot, overlay_large(photo, torch.zeros(4000, 4000), reduce="max", **options))
    assert abs(x + 0.5 - 1000 * 32 / 256) <= 1.5 and abs(y + 0.5 - 2000 * 32 / 256) <= 1.5
    mean = np.asarray(overlay_large(photo, values, reduce="mean", **options)).astype(float)
    assert np.abs(mean - np.asarray(hot).astype(float)).max() > 50  # diluted


@pytest.mark.parametrize("options, message", [
    (dict(image_size=(0, 10)), "positive"),
    (dict(step=(0, 32)), "positive"),
    (dict(reduce="median"), "reduce must be"),
    (dict(values=np.zeros(5)), r"values must be \(H', W'\)"),
])
def test_large_overlay_bad_arguments(options, message):
    arguments = dict(values=np.zeros((3, 3)), image_size=(100, 100), geometry_center0=(16, 16), step=(32, 32))
    arguments.update(options)
    with pytest.raises(ValueError, match=message):
        overlay_large(Image.new("RGB", (50, 50)), **arguments)
