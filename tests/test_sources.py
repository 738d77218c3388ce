"""convify.sources: region reads equal slices of what was written, read only the tiles they touch, padded views
equal numpy.pad, thumbnails are bounded, and hostile TIFFs end in one ImageError/LimitError line."""
from __future__ import annotations

import io
import logging
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from convify import limits
from convify.errors import ConvifyError, ImageError, LimitError
from convify.sources import ArraySource, SlideSource, TiffSource, open_source, padded, read_ahead, thumbnail

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("zarr")

H, W = 300, 400


@pytest.fixture(autouse=True)
def _quiet_tifffile():
    """tifffile logs its complaints about broken files; the tests look at the exceptions instead."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _rects(rng: np.random.Generator, width: int, height: int, n: int):
    for _ in range(n):
        x0, x1 = sorted(rng.choice(width + 1, 2, replace=False))
        y0, y1 = sorted(rng.choice(height + 1, 2, replace=False))
        yield int(x0), int(y0), int(x1), int(y1)


def _assert_reads_equal(source, expected: np.ndarray, n: int = 150, seed: int = 1) -> None:
    assert (source.width, source.height) == (expected.shape[1], expected.shape[0])
    for x0, y0, x1, y1 in _rects(np.random.default_rng(seed), source.width, source.height, n):
        got = source.read(x0, y0, x1, y1)
        assert got.dtype == np.uint8 and got.shape == (y1 - y0, x1 - x0, 3)
        np.testing.assert_array_equal(got, expected[y0:y1, x0:x1])
    np.testing.assert_array_equal(source.read(0, 0, source.width, source.height), expected)


# --------------------------------------------------------------------------------------------------
# TIFF layouts


LAYOUTS = {
    "tiled-zlib": dict(tile=(64, 64), compression="zlib"),
    "tiled-raw": dict(tile=(48, 80)),
    "bigtiff-tiled": dict(tile=(64, 64), compression="zlib", bigtiff=True),
    "strips-zlib": dict(rowsperstrip=16, compression="zlib"),
    "contiguous": dict(),  # one uncompressed strip: memory-mapped
    "planar-separate": dict(tile=(64, 64), planarconfig="separate", compression="zlib"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tiff_reads_equal_the_written_array(tmp_path, image, layout):
    options = dict(LAYOUTS[layout])
    data = np.moveaxis(image, 2, 0) if options.get("planarconfig") == "separate" else image
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, data, photometric="rgb", **options)
    with open_source(path) as source:
        assert isinstance(source, TiffSource)
        _assert_reads_equal(source, image)


def _write_pyramid(path, image, *, subifds: bool) -> list[np.ndarray]:
    levels = [image, image[::2, ::2], image[::4, ::4]]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(levels[0], tile=(64, 64), photometric="rgb", compression="zlib", subifds=2 if subifds else None)
        for level in levels[1:]:
            tif.write(level, tile=(64, 64), photometric="rgb", compression="zlib", subfiletype=1)
    return levels


@pytest.mark.parametrize("subifds", [True, False], ids=["subifds", "main-chain"])
def test_tiff_pyramid_levels_and_scale(tmp_path, image, subifds):
    path = tmp_path / "pyramid.tif"
    levels = _write_pyramid(path, image, subifds=subifds)
    for level, expected in enumerate(levels):
        with TiffSource(path, level=level) as source:
            assert source.levels == 3 and source.level == level
            assert source.downsample == pytest.approx(2 ** level, rel=0.02)
            _assert_reads_equal(source, expected, n=40, seed=level)
    # scale: closest downsample by ratio, ties to the finer level; nothing resampled
    for scale, level in [(1.0, 0), (1.4, 0), (1.5, 1), (2.8, 1), (2.9, 2), (4.0, 2), (100.0, 2), (0.01, 0)]:
        with TiffSource(path, scale=scale) as source:
            assert source.level == level, scale
    with pytest.raises(ImageError, match="3 pyramid level"):
        open_source(path, level=3)
    with pytest.raises(ValueError, match="not both"):
        open_source(path, level=1, scale=2.0)
    with pytest.raises(ValueError):
        open_source(path, scale=0)


def test_ome_tiff_series(tmp_path, image):
    path = tmp_path / "image.ome.tif"
    tifffile.imwrite(path, image, photometric="rgb", tile=(64, 64), compression="zlib", metadata={"axes": "YXS"})
    with open_source(path) as source:
        _assert_reads_equal(source, image, n=30)


def test_reads_outside_or_empty_are_value_errors(tmp_path, image):
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, image, photometric="rgb", tile=(64, 64))
    with open_source(path) as source:
        for rect in [(0, 0, 0, 1), (5, 5, 4, 6), (-1, 0, 5, 5), (0, 0, W + 1, 5), (0, 0, 5, H + 1)]:
            with pytest.raises(ValueError, match="outside"):
                source.read(*rect)


# --------------------------------------------------------------------------------------------------
# A read touches only the tiles it overlaps


def test_a_read_decodes_only_the_tiles_it_overlaps(tmp_path, monkeypatch):
    from tifffile.zarr import ZarrTiffStore

    big = np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, big, photometric="rgb", tile=(64, 64), compression="zlib")
    requested: list[tuple[str, int]] = []
    original = ZarrTiffStore.get

    async def counting_get(self, key, prototype, byte_range=None):
        value = await original(self, key, prototype, byte_range)
        if value is not None and not key.endswith((".zarray", ".zattrs", ".zgroup", "zarr.json")):
            requested.append((key, len(value.to_bytes())))
        return value

    monkeypatch.setattr(ZarrTiffStore, "get", counting_get)
    with open_source(path) as source:
        requested.clear()
        got = source.read(130, 250, 230, 350)  # x 130..229 -> tile columns 2, 3; y 250..349 -> tile rows 3..5
    np.testing.assert_array_equal(got, big[250:350, 130:230])
    tiles = sorted(tuple(int(i) for i in key.replace("/", ".").split(".")[-3:-1]) for key, _ in requested)
    assert tiles == [(r, c) for r in (3, 4, 5) for c in (2, 3)]
    assert all(size == 64 * 64 * 3 for _, size in requested)
    assert sum(size for _, size in requested) == 6 * 64 * 64 * 3 < big.nbytes / 40  # 73,728 of 3,145,728 bytes


# --------------------------------------------------------------------------------------------------
# Pixel formats


def _write(tmp_path, data, name="image.tif", **options):
    path = tmp_path / name
    tifffile.imwrite(path, data, tile=(32, 32), compression="zlib", **options)
    return path


def _read_all(path) -> np.ndarray:
    with open_source(path) as source:
        return source.read(0, 0, source.width, source.height)


def test_greyscale_and_miniswhite_become_three_channels(tmp_path, image):
    grey = image[:, :, 0]
    np.testing.assert_array_equal(_read_all(_write(tmp_path, grey, photometric="minisblack")),
                                  np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(_read_all(_write(tmp_path, grey, "w.tif", photometric="miniswhite")),
                                  np.repeat(255 - grey[:, :, None], 3, axis=2))


def test_sixteen_bit_is_scaled_to_eight(tmp_path):
    values = np.random.default_rng(3).integers(0, 65536, (64, 96, 3), dtype=np.uint16)
    got = _read_all(_write(tmp_path, values, photometric="rgb"))
    expected = np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)  # as engine._to_rgb
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_alpha_is_composited_on_white_like_load_image(tmp_path):
    from convify.engine import load_image

    rgba = np.random.default_rng(4).integers(0, 256, (64, 96, 4), dtype=np.uint8)
    got = _read_all(_write(tmp_path, rgba, photometric="rgb", extrasamples=["unassalpha"]))
    png = tmp_path / "same.png"
    Image.fromarray(rgba, "RGBA").save(png)
    assert np.abs(got.astype(int) - np.asarray(load_image(png)).astype(int)).max() <= 1


def test_palette_goes_through_the_colour_map(tmp_path):
    rng = np.random.default_rng(5)
    indices = rng.integers(0, 256, (64, 96), dtype=np.uint8)
    cmap = rng.integers(0, 256, (3, 256), dtype=np.uint16) * 257
    got = _read_all(_write(tmp_path, indices, photometric="palette", colormap=cmap))
    np.testing.assert_array_equal(got, (cmap // 257).T.astype(np.uint8)[indices])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_tag_is_applied_like_exif_transpose(tmp_path, image, orientation):
    path = _write(tmp_path, image, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    methods = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
               7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
    upright = Image.fromarray(image)
    if orientation in methods:
        upright = upright.transpose(methods[orientation])
    with open_source(path) as source:
        _assert_reads_equal(source, np.asarray(upright), n=25, seed=orientation)


@pytest.mark.parametrize("data, options, message", [
    (np.zeros((32, 32, 3), np.float32), dict(photometric="rgb"), "float32"),
    (np.zeros((32, 32, 3), np.uint32), dict(photometric="rgb"), "uint32"),
    (np.zeros((32, 32, 4), np.uint8), dict(photometric="separated"), "SEPARATED"),
    (np.zeros((32, 32, 5), np.uint8), dict(photometric="rgb", extrasamples=[0, 0]), "5 samples"),
])
def test_unsupported_pixel_formats_are_one_line_image_errors(tmp_path, data, options, message):
    with pytest.raises(ImageError, match=message) as caught:
        open_source(_write(tmp_path, data, **options))
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Photos, arrays, slides


def test_photos_arrays_and_pil_images_are_array_sources(tmp_path, image):
    png = tmp_path / "photo.png"
    Image.fromarray(image).save(png)
    for given_ in (png, str(png), Image.fromarray(image), image):
        with open_source(given_) as source:
            assert isinstance(source, ArraySource)
            _assert_reads_equal(source, image, n=20)
    with pytest.raises(ImageError, match="only level 0"):
        open_source(png, level=1)
    with open_source(png, scale=8.0) as source:
        assert source.width == W
    with pytest.raises(ImageError, match="no such image"):
        open_source(tmp_path / "missing.tif")
    with pytest.raises(ImageError, match="uint8"):
        open_source(image.astype(np.float32))


def test_photo_exif_orientation_through_load_image(tmp_path, image):
    jpeg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[274] = 6
    Image.fromarray(image).save(jpeg, exif=exif, quality=95)
    with open_source(jpeg) as source:
        assert (source.width, source.height) == (H, W)


def test_slide_extension_without_openslide_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "scan.svs"
    path.write_bytes(b"not really a slide")
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(ImageError, match=r"pip install convify\[slides\]"):
        open_source(path)


def test_openslide_reads_equal_the_written_pyramid(tmp_path, image):
    pytest.importorskip("openslide")
    path = tmp_path / "pyramid.tif"
    big = np.random.default_rng(6).integers(0, 256, (512, 768, 3), dtype=np.uint8)
    levels = _write_pyramid(path, big, subifds=False)
    for level, expected in enumerate(levels):
        with SlideSource(path, level=level) as slide:
            assert slide.levels == 3 and slide.downsample == 2 ** level
            _assert_reads_equal(slide, expected, n=30, seed=level)
    with SlideSource(path, scale=3.0) as slide:
        assert slide.level == 2
    with open_source(path) as source:  # a generic tiled TIFF stays with tifffile (exact, convify's own bounds)
        assert isinstance(source, TiffSource)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageError) as caught:
        open_source(broken)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Padded views


class _Recording:
    """A source that records the rectangles it is asked for."""

    def __init__(self, array: np.ndarray) -> None:
        self.inner = ArraySource(array)
        self.width, self.height = self.inner.width, self.inner.height
        self.reads: list[tuple[int, int, int, int]] = []

    def read(self, x0, y0, x1, y1):
        self.reads.append((x0, y0, x1, y1))
        return self.inner.read(x0, y0, x1, y1)

    def close(self):
        pass


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
@pytest.mark.parametrize("shape, pads", [((30, 40), (7, 5, 9, 11)), ((5, 7), (23, 17, 31, 2)), ((1, 1), (3, 2, 0, 4)),
                                         ((30, 40), (0, 0, 0, 0))])
def test_padded_equals_numpy_pad(mode, shape, pads):
    array = np.random.default_rng(7).integers(0, 256, (*shape, 3), dtype=np.uint8)
    left, top, right, bottom = pads
    expected = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="reflect" if mode == "reflect" else "constant")
    source = _Recording(array)
    view = padded(source, left, top, right, bottom, mode=mode)
    assert (view.width, view.height) == (expected.shape[1], expected.shape[0])
    rng = np.random.default_rng(8)
    corners = [(0, 0, left + 2, top + 2), (view.width - right - 1, view.height - bottom - 1, view.width, view.height),
               (0, 0, max(left, 1), max(top, 1)), (0, 0, view.width, view.height)]
    for x0, y0, x1, y1 in corners + list(_rects(rng, view.width, view.height, 200)):
        x1, y1 = min(x1, view.width), min(y1, view.height)
        source.reads.clear()
        np.testing.assert_array_equal(view.read(x0, y0, x1, y1), expected[y0:y1, x0:x1])
        assert len(source.reads) <= 1
        for bx0, by0, bx1, by1 in source.reads:  # bounded: never more than the read asks for, per axis
            assert bx1 - bx0 <= min(x1 - x0, array.shape[1]) and by1 - by0 <= min(y1 - y0, array.shape[0])
        if mode == "zeros" and (x1 <= left or y1 <= top or x0 >= left + shape[1] or y0 >= top + shape[0]):
            assert source.reads == []  # entirely in the zero border: nothing read


def test_padded_rejects_bad_arguments(image):
    with pytest.raises(ValueError):
        padded(ArraySource(image), -1, 0, 0, 0)
    with pytest.raises(ValueError):
        padded(ArraySource(image), 1, 1, 1, 1, mode="edge")


# --------------------------------------------------------------------------------------------------
# Thumbnails


def _smooth(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like image: smooth gradients with a little noise."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).normal(0, 8, (height, width, 3))
    base = np.stack([x / width * 255, y / height * 255, (np.sin(x / 37.0) + np.cos(y / 23.0) + 2) * 60], axis=2)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_thumbnail_size_closeness_and_bounded_reads():
    array = _smooth(1500, 5000, 9)
    source = _Recording(array)
    thumb = thumbnail(source, 300)
    assert thumb.size == (300, 90) and thumb.mode == "RGB"
    reference = np.asarray(Image.fromarray(array).resize(thumb.size, Image.Resampling.BOX)).astype(int)
    assert np.abs(np.asarray(thumb).astype(int) - reference).mean() < 1.0
    assert max((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in source.reads) <= 2048 * 2048
    assert len(source.reads) > 1  # made block by block, never the whole image in one read
    # an exact factor is an exact box mean
    exact = np.asarray(thumbnail(ArraySource(array[:1000, :2000]), 200)).astype(int)
    means = array[:1000, :2000].reshape(100, 10, 200, 10, 3).mean(axis=(1, 3))
    assert np.abs(exact - np.floor(means + 0.5)).max() == 0
    # never enlarged
    assert thumbnail(ArraySource(array[:10, :20]), 500).size == (20, 10)


def test_thumbnail_of_a_pyramid_reads_the_coarsest_level_large_enough(tmp_path, monkeypatch, image):
    path = tmp_path / "pyramid.tif"
    _write_pyramid(path, image, subifds=True)
    levels_read: list[int] = []
    original = TiffSource.read

    def recording(self, *rect):
        levels_read.append(self.level)
        return original(self, *rect)

    monkeypatch.setattr(TiffSource, "read", recording)
    with open_source(path) as source:
        assert thumbnail(source, 90).size == (90, 68)
        assert set(levels_read) == {2}  # 100x75 is the coarsest level >= 90x68
        levels_read.clear()
        assert thumbnail(source, 150).size == (150, 112)
        assert set(levels_read) == {1}


# --------------------------------------------------------------------------------------------------
# Hostile TIFFs


def _tiff_bytes(**options) -> bytes:
    buffer = io.BytesIO()
    data = np.random.default_rng(10).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    tifffile.imwrite(buffer, data, photometric="rgb", **options)
    return buffer.getvalue()


def _patch(data: bytes, code: int, value: int) -> bytes:
    """The classic TIFF with tag ``code`` of its first page rewritten as one LONG ``value``."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        offset = tif.pages[0].tags[code].offset
    return data[:offset] + struct.pack("<HHII", code, 4, 1, value) + data[offset + 12:]


def _open_and_read(path) -> None:
    with open_source(path) as source:
        source.read(0, 0, min(source.width, 64), min(source.height, 64))


def test_absurd_declared_dimensions_are_refused(tmp_path):
    path = tmp_path / "bomb.tif"
    path.write_bytes(_patch(_patch(_tiff_bytes(tile=(64, 64), compression="zlib"), 256, 400_000), 257, 400_000))
    with pytest.raises(LimitError, match="MAX_REGION_SOURCE_PIXELS") as caught:
        open_source(path)
    assert "\n" not in str(caught.value) and 400_000 ** 2 > limits.MAX_REGION_SOURCE_PIXELS


def test_absurd_tile_size_is_refused(tmp_path):
    path = tmp_path / "tile.tif"
    path.write_bytes(_patch(_patch(_tiff_bytes(tile=(64, 64), compression="zlib"), 322, 16384), 323, 16384))
    with pytest.raises(LimitError, match="MAX_TIFF_CHUNK_PIXELS"):
        open_source(path)


@pytest.mark.parametrize("cut", [20, 200, 2000, 20000])
def test_truncated_tiffs_are_one_line_image_errors(tmp_path, cut):
    path = tmp_path / "cut.tif"
    path.write_bytes(_tiff_bytes(tile=(32, 32), compression="zlib")[:cut])
    with pytest.raises(ImageError) as caught:
        _open_and_read(path)
        with open_source(path) as source:  # the first rows may survive; the whole image cannot
            source.read(0, 0, source.width, source.height)
    assert "\n" not in str(caught.value)


_SEED_FILES = [_tiff_bytes(tile=(32, 32), compression="zlib"), _tiff_bytes(rowsperstrip=16),
               _tiff_bytes(tile=(32, 32), bigtiff=True)]


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(which=st.integers(0, len(_SEED_FILES) - 1),
       edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(8, 60_000)))
def test_fuzzed_tiffs_raise_only_convify_errors(tmp_path_factory, which, edits, cut):
    data = bytearray(_SEED_FILES[which])
    for position, value in edits:  # the header, the first IFD and its tags live in the first few hundred bytes
        data[position % len(data)] = value
    path = tmp_path_factory.mktemp("fuzz") / "fuzzed.tif"
    path.write_bytes(bytes(data[:cut]))
    try:
        _open_and_read(path)
    except ConvifyError as e:
        assert isinstance(e, (ImageError, LimitError)) and "\n" not in str(e)


def test_read_ahead_serves_any_read_as_the_source_does() -> None:
    """Consecutive strips come from one taller read; any other read (another band, rows above, the bottom)
    still gives exactly the source's pixels, and the block held never exceeds its byte bound."""
    pixels = np.random.default_rng(3).integers(0, 256, (97, 61, 3), dtype=np.uint8)
    calls: list[tuple[int, int, int, int]] = []

    class Counting(ArraySource):
        def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
            calls.append((x0, y0, x1, y1))
            return super().read(x0, y0, x1, y1)

    view = read_ahead(Counting(pixels), rows=30, max_bytes=3 * 61 * 20)
    for y in range(0, 97, 7):  # full-width strips: 20 rows a read (the byte bound), not 30
        np.testing.assert_array_equal(view.read(0, y, 61, min(97, y + 7)), pixels[y:y + 7])
    assert all(y1 - y0 <= 20 for _, y0, _, y1 in calls) and len(calls) < len(range(0, 97, 7))
    rng = np.random.default_rng(4)
    for _ in range(50):
        x0, y0 = int(rng.integers(0, 60)), int(rng.integers(0, 96))
        x1, y1 = int(rng.integers(x0 + 1, 62)), int(rng.integers(y0 + 1, 98))
        np.testing.assert_array_equal(view.read(x0, y0, x1, y1), pixels[y0:y1, x0:x1])
    with pytest.raises(ValueError, match="outside"):
        view.read(0, 90, 61, 98)  # past the bottom: refused as the source refuses it
