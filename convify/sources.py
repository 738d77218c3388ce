"""Reading images of any size region by region: photos, (Big/OME-)TIFFs and whole-slide images.

A :class:`RegionSource` is an image the tiler never holds whole: it has a ``width`` and ``height`` in its own
pixels and answers ``read(x0, y0, x1, y1)`` with the ``(y1 - y0, x1 - x0, 3)`` uint8 RGB pixels of that
rectangle. :func:`open_source` picks the reader:

- ordinary photos (PNG, JPEG, WebP, BMP, ... through :func:`convify.engine.load_image`, with its format
  allowlist and size limits), PIL images, tensors and ``(H, W, 3)`` uint8 arrays: :class:`ArraySource`, in memory;
- TIFF, BigTIFF and OME-TIFF, tiled or in strips, pyramids included: :class:`TiffSource`, which reads through
  tifffile's zarr store and decodes only the tiles or strips a read touches (uncompressed contiguous data is
  memory-mapped instead);
- whole-slide formats (``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, ``.vms``, ``.vmu``, ``.bif``, ``.svslide``, and
  vendor TIFFs that tifffile flags as Aperio, Hamamatsu, Leica, Ventana or Philips): :class:`SlideSource`
  through OpenSlide (``pip install convify[slides]``). A generic tiled TIFF that OpenSlide could also open goes
  to :class:`TiffSource`: it is exact for every pixel format below and bounded by convify's own checks.

Pyramid levels: ``level=0`` is full resolution. ``scale=4.0`` picks the stored level whose downsample is
closest to 4 *by ratio* (``|log(downsample / scale)|``; ties go to the finer level). Nothing is resampled: the
caller gets the level's own pixels and reads its ``downsample`` to place them.

TIFF pixels become RGB the way :func:`convify.engine.load_image` makes them: greyscale is repeated into three
channels (``MINISWHITE`` inverted), palettes go through the colour map, alpha is composited on white, 16-bit
samples are scaled to 8 bits (``v / 65535 * 255``, rounded). Separate planes are read plane by plane. A TIFF
``Orientation`` tag is honoured (the source's pixels are upright, as a photo's are after EXIF). Anything else
(float, 32-bit, CMYK, more than four samples) is refused with an :class:`~convify.errors.ImageError`.

Everything a file declares is bounded before a pixel is decoded: at most
:data:`convify.limits.MAX_REGION_SOURCE_PIXELS` pixels at level 0 and at most
:data:`convify.limits.MAX_TIFF_CHUNK_PIXELS` per tile or strip. Whatever tifffile, zarr or OpenSlide raise
while opening or reading a stranger's file becomes one :class:`~convify.errors.ImageError` line.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
from PIL import Image

from . import limits
from .errors import ConvifyError, ImageError, LimitError
from .text import one_line

__all__ = ["RegionSource", "ArraySource", "TiffSource", "SlideSource", "open_source", "padded", "thumbnail",
           "read_ahead",
           "SLIDE_EXTENSIONS"]

# Files OpenSlide reads and tifffile does not read as one image (MIRAX and VMS are several files).
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
# Source pixels along each side of one block :func:`thumbnail` reads at a time (4 MP: 12 MB of RGB).
_THUMB_BLOCK = 2048
_SLIDES_HINT = "pip install convify[slides]"
_TIFF_HINT = "pip install convify[tiff] (or convify[slides])"


@runtime_checkable
class RegionSource(Protocol):
    """An image read rectangle by rectangle; ``width`` and ``height`` are in its own (upright) pixels."""

    width: int
    height: int

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The rectangle ``[x0, x1) x [y0, y1)`` as ``(y1 - y0, x1 - x0, 3)`` uint8 RGB.

        Raises:
            ValueError: the rectangle is empty or not inside ``[0, width) x [0, height)``.
            ImageError: the file cannot be read there.
        """
        ...

    def close(self) -> None:
        """Release the file (a no-op for in-memory sources)."""
        ...


# --------------------------------------------------------------------------------------------------
# Opening


def open_source(path_or_image: Any, *, level: Optional[int] = None, scale: Optional[float] = None) -> RegionSource:
    """Any image as a :class:`RegionSource`, read lazily where the format allows it.

    Args:
        path_or_image: a path (photo, TIFF/BigTIFF/OME-TIFF, whole-slide file), a PIL image, a tensor
            accepted by :func:`convify.engine.load_image`, or an ``(H, W, 3)`` uint8 array.
        level: the pyramid level to read (0 = full resolution).
        scale: a downsample factor instead of a level: the level whose downsample is closest to it by ratio
            (ties: the finer level). Images without a pyramid have only level 0.

    Returns:
        A source whose ``read(x0, y0, x1, y1)`` gives ``(y1 - y0, x1 - x0, 3)`` uint8 RGB. Close it when done
        (sources are also context managers).

    Raises:
        ValueError: both ``level`` and ``scale`` given, or ``scale <= 0`` / ``level < 0``.
        ImageError: the file is missing, unreadable, in an unsupported pixel format, broken, has no such
            level, or needs OpenSlide (``pip install convify[slides]``) which is not installed.
        LimitError: the file declares more pixels than :data:`~convify.limits.MAX_REGION_SOURCE_PIXELS`, or
            tiles larger than :data:`~convify.limits.MAX_TIFF_CHUNK_PIXELS`.
    """
    if level is not None and scale is not None:
        raise ValueError("give a pyramid level or a scale, not both")
    if level is not None and (isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0):
        raise ValueError(f"level must be an int >= 0; got {level!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number; got {scale!r}")
    if isinstance(path_or_image, np.ndarray):
        return _single_level(ArraySource(path_or_image), level)
    if not isinstance(path_or_image, (str, os.PathLike)):
        from .engine import load_image

        return _single_level(ArraySource(np.asarray(load_image(path_or_image))), level)
    path = Path(path_or_image)
    if path.suffix.lower() in SLIDE_EXTENSIONS:
        return SlideSource(path, level=level, scale=scale)
    if _is_tiff(path):
        return _open_tiff(path, level, scale)
    from .engine import load_image

    return _single_level(ArraySource(np.asarray(load_image(path))), level)


def _single_level(source: "ArraySource", level: Optional[int]) -> "ArraySource":
    if level not in (None, 0):
        raise ImageError(f"this image has no pyramid: only level 0 exists, level {level} was asked")
    return source


def _is_tiff(path: Path) -> bool:
    """Whether the file starts like a TIFF or BigTIFF (the extension is not trusted either way)."""
    from .engine import _open_file

    handle = _open_file(path)  # missing, directory, FIFO, device: one ImageError line
    try:
        return handle.read(4) in _TIFF_MAGIC
    except OSError as e:
        raise ImageError(f"cannot read {path} ({one_line(e)})") from None
    finally:
        handle.close()


def _open_tiff(path: Path, level: Optional[int], scale: Optional[float]) -> RegionSource:
    """A TIFF: a vendor slide through OpenSlide when it is installed, otherwise (and for generic TIFFs)
    :class:`TiffSource`."""
    source = TiffSource(path, level=level, scale=scale)
    if source._vendor_slide:
        try:
            import openslide  # noqa: F401
        except ImportError:
            return source  # tifffile reads SVS/NDPI/SCN/BIF pyramids too (JPEG tiles need imagecodecs)
        source.close()
        return SlideSource(path, level=level, scale=scale)
    return source


def _choose_level(downsamples: Sequence[float], level: Optional[int], scale: Optional[float], name: str) -> int:
    """The level asked for, or the one whose downsample is closest to ``scale`` by ratio (ties: finer)."""
    if level is not None:
        if level >= len(downsamples):
            raise ImageError(f"{name} has {len(downsamples)} pyramid level(s) (0-{len(downsamples) - 1}); "
                             f"level {level} was asked")
        return int(level)
    if scale is None:
        return 0
    distances = [abs(math.log(max(d, 1e-12) / scale)) for d in downsamples]
    return min(range(len(downsamples)), key=lambda i: (round(distances[i], 9), i))


# --------------------------------------------------------------------------------------------------
# In memory


class _Closing:
    """A source as a context manager: leaving the block closes it."""

    def close(self) -> None:  # overridden by every source
        raise NotImplementedError

    def __enter__(self) -> "_Closing":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ArraySource(_Closing):
    """An ``(H, W, 3)`` uint8 RGB array (an upright photo from :func:`convify.engine.load_image`) as a source."""

    downsample = 1.0

    def __init__(self, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            shape = getattr(array, "shape", None)
            raise ImageError(f"an image array must be (H, W, 3) uint8 RGB; got shape {shape} "
                             f"dtype {getattr(array, 'dtype', type(array).__name__)}")
        if array.shape[0] < 1 or array.shape[1] < 1:
            raise ImageError(f"an image array must not be empty; got shape {array.shape}")
        self._array = array
        self.height, self.width = int(array.shape[0]), int(array.shape[1])

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, 3)`` uint8: a copy of that rectangle of the array."""
        _check_rect(self, x0, y0, x1, y1)
        return np.array(self._array[y0:y1, x0:x1], copy=True)

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"ArraySource({self.width}x{self.height})"


# --------------------------------------------------------------------------------------------------
# TIFF through tifffile


class TiffSource(_Closing):
    """A TIFF/BigTIFF/OME-TIFF (first series), read lazily: a read decodes only the tiles/strips it touches.

    Attributes:
        width, height: the chosen level's size in upright pixels.
        level: the chosen pyramid level; ``levels`` how many the series has.
        downsample: level-0 size / this level's size (mean of both axes).
    """

    def __init__(self, path: Union[str, os.PathLike], *, level: Optional[int] = None,
                 scale: Optional[float] = None) -> None:
        from .engine import _open_file

        self._name = str(path)
        self._handle = _open_file(Path(path))
        self._tiff: Any = None
        try:
            self._guard("open", lambda: self._open(level, scale))
        except BaseException:
            self.close()
            raise

    def _open(self, level: Optional[int], scale: Optional[float]) -> None:
        try:
            import tifffile
            import zarr  # noqa: F401 - tifffile.aszarr needs it
        except ImportError as e:
            raise ImageError(f"{self._name} is a TIFF; reading it region by region needs tifffile and zarr "
                             f"({one_line(e)}): {_TIFF_HINT}") from None
        tiff = self._tiff = tifffile.TiffFile(self._handle, name=Path(self._name).name)
        if not tiff.series:
            raise ImageError(f"{self._name} holds no image")
        series = tiff.series[0]
        self._vendor_slide = bool(tiff.is_svs or tiff.is_ndpi or tiff.is_scn or tiff.is_bif or tiff.is_philips)
        levels = series.levels
        self.levels = len(levels)
        full = _YX(series, self._name)
        if full.pixels > limits.MAX_REGION_SOURCE_PIXELS:
            raise LimitError(f"{self._name} declares {full.width}x{full.height} = {full.pixels:,} pixels, more "
                             f"than limits.MAX_REGION_SOURCE_PIXELS ({limits.MAX_REGION_SOURCE_PIXELS:,}); "
                             "not reading it")
        shapes = [_YX(s, self._name) for s in levels]
        downsamples = [(full.width / s.width + full.height / s.height) / 2 for s in shapes]
        self.level = _choose_level(downsamples, level, scale, self._name)
        self.downsample = float(downsamples[self.level])
        self._layout = shapes[self.level]
        self._pixels = _TiffPixels(tiff, levels[self.level], self._layout, self._name)
        self._data = self._pixels.array(series, self.level, self._name)
        self._orient = _Orientation(series.keyframe, self._layout.width, self._layout.height)
        self.width, self.height = self._orient.width, self._orient.height

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, 3)`` uint8 RGB of that upright rectangle, decoding only the chunks it touches."""
        _check_rect(self, x0, y0, x1, y1)
        if self._tiff is None:
            raise ImageError(f"{self._name} is closed")
        (sx0, sy0, sx1, sy1) = self._orient.stored_rect(x0, y0, x1, y1)
        raw = self._guard("read", lambda: np.asarray(self._data[self._layout.index(sx0, sy0, sx1, sy1)]))
        return self._orient.upright(self._pixels.to_rgb(self._layout.to_hwc(raw)))

    def _guard(self, what: str, work: Callable[[], Any]) -> Any:
        """Run ``work``; a stranger's file may make tifffile/zarr raise anything: one ImageError line."""
        try:
            return work()
        except ConvifyError:
            raise
        except MemoryError:
            raise ImageError(f"cannot {what} {self._name}: out of memory") from None
        except Exception as e:
            raise ImageError(f"cannot {what} {self._name} as a TIFF ({one_line(e)})") from None

    def _coarser(self, width: int, height: int) -> RegionSource:
        """The coarsest level of this file still at least ``width x height`` in this level's frame (for
        :func:`thumbnail`); ``self`` when no coarser level is large enough. The caller closes what it gets."""
        if self.levels <= 1 or self._tiff is None:
            return self
        best = self
        for lvl in range(self.level + 1, self.levels):
            candidate = TiffSource(self._name, level=lvl)
            if candidate.width >= width and candidate.height >= height:
                if best is not self:
                    best.close()
                best = candidate
            else:
                candidate.close()
                break
        return best

    def close(self) -> None:
        """Close the file."""
        self._data = None
        if self._tiff is not None:
            try:
                self._tiff.close()
            except Exception:
                pass
            self._tiff = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TiffSource({self._name!r}, level={getattr(self, 'level', '?')}, {getattr(self, 'width', '?')}x" \
               f"{getattr(self, 'height', '?')})"


class _YX:
    """Where Y, X and the samples are in a tifffile series' axes, and how to index and reorder them."""

    def __init__(self, series: Any, name: str) -> None:
        axes, shape = str(series.axes), tuple(int(n) for n in series.shape)
        if len(axes) != len(shape) or "Y" not in axes or "X" not in axes:
            raise ImageError(f"{name}: the first series is not a 2-D image (axes {axes!r}, shape {shape})")
        self.axes, self.shape = axes, shape
        # Samples: 'S' (RGB(A) in one page); otherwise OME's 'C' of 3 or 4 uint8/16 planes is taken as RGB(A).
        channel = "S" if "S" in axes else ("C" if "C" in axes and shape[axes.index("C")] in (3, 4) else None)
        self.channel = channel
        self.samples = shape[axes.index(channel)] if channel else 1
        self.height, self.width = shape[axes.index("Y")], shape[axes.index("X")]
        self.pixels = self.width * self.height

    def index(self, x0: int, y0: int, x1: int, y1: int) -> tuple:
        """The selection of the stored rectangle: every other axis (pages, Z, T, ...) at its first index."""
        picks = {"Y": slice(y0, y1), "X": slice(x0, x1)}
        if self.channel:
            picks[self.channel] = slice(None)
        return tuple(picks.get(a, 0) for a in self.axes)

    def to_hwc(self, raw: np.ndarray) -> np.ndarray:
        """The selected block as ``(h, w, samples)``."""
        kept = [a for a in self.axes if a in ("Y", "X") or a == self.channel]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index(self.channel)] if self.channel else [])
        block = np.transpose(raw, order)
        return block if self.channel else block[:, :, None]


class _TiffPixels:
    """The pixel format of one level: checked once, then ``to_rgb`` per block."""

    def __init__(self, tiff: Any, series: Any, layout: _YX, name: str) -> None:
        import tifffile

        page = series.keyframe
        self._page, self._series, self._layout = page, series, layout
        dtype = np.dtype(series.dtype)
        if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise ImageError(f"{name}: {dtype} pixels are not supported (8- or 16-bit unsigned only)")
        self._top = 255 if dtype == np.uint8 else 65535
        photometric = int(page.photometric)
        P = tifffile.PHOTOMETRIC
        samples = layout.samples
        self._invert = photometric == P.MINISWHITE
        self._colormap: Optional[np.ndarray] = None
        if photometric == P.PALETTE:
            cmap = page.colormap
            if cmap is None or samples != 1 or np.asarray(cmap).ndim != 2 or np.asarray(cmap).shape[0] != 3:
                raise ImageError(f"{name}: a palette image without a usable colour map")
            cmap = np.asarray(cmap, dtype=np.float64)
            top = 65535.0 if cmap.max() > 255 else 255.0
            table = np.clip(cmap.T / top * 255.0 + 0.5, 0, 255).astype(np.uint8)  # (entries, 3)
            size = 256 if dtype == np.uint8 else 65536
            self._colormap = np.zeros((size, 3), np.uint8)
            self._colormap[: min(size, len(table))] = table[:size]
        elif photometric in (P.MINISBLACK, P.MINISWHITE):
            if samples not in (1, 2, 3, 4) or (samples in (3, 4) and layout.channel != "C"):
                raise ImageError(f"{name}: {samples} samples per pixel in a greyscale image are not supported")
        elif photometric == P.RGB or (photometric == P.YCBCR and int(page.compression) in _JPEG_FAMILY):
            if samples not in (3, 4):
                raise ImageError(f"{name}: an RGB image with {samples} samples per pixel is not supported")
        else:
            raise ImageError(f"{name}: photometric {tifffile.PHOTOMETRIC(photometric).name} is not supported "
                             "(RGB, greyscale or palette only)")

    def array(self, top: Any, level: int, name: str) -> Any:
        """What the level is read from: a memory map of uncompressed contiguous data, else a zarr array of
        ``top`` (the file's first series) at ``level``."""
        import zarr

        series, page = self._series, self._page
        if series.dataoffset is not None and int(page.compression) == 1 and page.is_memmappable:
            dtype = np.dtype(series.dtype).newbyteorder(page.parent.byteorder)
            handle = page.parent.filehandle
            return np.memmap(handle._fh, dtype=dtype, mode="r", offset=int(series.dataoffset), shape=series.shape)
        array = zarr.open(top.aszarr(level=level), mode="r")
        chunk = array.chunks
        layout = self._layout
        pixels = math.prod(c for a, c in zip(layout.axes, chunk) if a != layout.channel)
        if pixels > limits.MAX_TIFF_CHUNK_PIXELS:
            raise LimitError(f"{name} stores its pixels in chunks of {pixels:,} pixels ({'x'.join(map(str, chunk))}), "
                             f"more than limits.MAX_TIFF_CHUNK_PIXELS ({limits.MAX_TIFF_CHUNK_PIXELS:,}); "
                             "one read would decode all of that")
        return array

    def to_rgb(self, block: np.ndarray) -> np.ndarray:
        """``(h, w, samples)`` stored values -> ``(h, w, 3)`` uint8 RGB (alpha composited on white)."""
        if self._colormap is not None:
            return self._colormap[block[:, :, 0]]
        if self._top != 255:  # 16-bit: v / 65535 * 255, rounded (as engine._to_rgb does)
            block = ((block.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        else:
            block = block.astype(np.uint8, copy=False)
        samples = block.shape[2]
        colour = block[:, :, :3] if samples >= 3 else np.repeat(block[:, :, :1], 3, axis=2)
        if self._invert:
            colour = 255 - colour
        if samples in (2, 4):  # the last sample is alpha: composite on white
            alpha = block[:, :, -1:].astype(np.uint16)
            colour = ((colour.astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        return np.ascontiguousarray(colour)


_JPEG_FAMILY = (6, 7, 33003, 33005, 34712, 34892)  # OJPEG, JPEG, Aperio JPEG2000 (YCbCr/RGB), JPEG2000, lossy JPEG


class _Orientation:
    """A TIFF Orientation tag (1-8, as in EXIF) as coordinate maps between upright and stored pixels.

    ``upright = flip_y(flip_x(transpose?(stored)))``, matching PIL's ``ImageOps.exif_transpose``.
    """

    _OPS = {1: (False, False, False), 2: (False, True, False), 3: (False, True, True), 4: (False, False, True),
            5: (True, False, False), 6: (True, True, False), 7: (True, True, True), 8: (True, False, True)}

    def __init__(self, page: Any, stored_width: int, stored_height: int) -> None:
        tag = page.tags.get(274)  # Orientation
        try:
            value = int(tag.value) if tag is not None else 1
        except (TypeError, ValueError):
            value = 1
        self.transpose, self.flip_x, self.flip_y = self._OPS.get(value, self._OPS[1])
        self.width, self.height = ((stored_height, stored_width) if self.transpose else (stored_width, stored_height))

    def stored_rect(self, x0: int, y0: int, x1: int, y1: int) -> tuple[int, int, int, int]:
        """The stored rectangle whose pixels make the upright rectangle ``[x0, x1) x [y0, y1)``."""
        if self.flip_x:
            x0, x1 = self.width - x1, self.width - x0
        if self.flip_y:
            y0, y1 = self.height - y1, self.height - y0
        return (y0, x0, y1, x1) if self.transpose else (x0, y0, x1, y1)

    def upright(self, block: np.ndarray) -> np.ndarray:
        """The stored block ``(h, w, 3)`` turned upright."""
        if self.transpose:
            block = block.transpose(1, 0, 2)
        if self.flip_x:
            block = block[:, ::-1]
        if self.flip_y:
            block = block[::-1]
        return np.ascontiguousarray(block)


# --------------------------------------------------------------------------------------------------
# Whole-slide images through OpenSlide


class SlideSource(_Closing):
    """A whole-slide image read through OpenSlide (``pip install convify[slides]``) at one pyramid level.

    ``read`` asks OpenSlide for the level's own pixels (``read_region`` at level-0 coordinates
    ``x * downsample``); transparent areas (outside the scanned region) are composited on white. A level whose
    downsample is not an integer cannot be addressed exactly in level-0 pixels; OpenSlide then places reads to
    the nearest level-0 pixel.
    """

    def __init__(self, path: Union[str, os.PathLike], *, level: Optional[int] = None,
                 scale: Optional[float] = None) -> None:
        try:
            import openslide
        except ImportError:
            raise ImageError(f"{path} is a whole-slide image; reading it needs OpenSlide: "
                             f"{_SLIDES_HINT}") from None
        from .engine import _open_file

        self._name = str(path)
        _open_file(Path(path)).close()  # missing, directory, FIFO, device: one ImageError line
        self._slide: Any = None
        try:
            self._slide = openslide.OpenSlide(str(path))
            dims = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
            downsamples = [float(d) for d in self._slide.level_downsamples]
        except ConvifyError:
            raise
        except Exception as e:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError, ...
            self.close()
            raise ImageError(f"cannot read {path} as a whole-slide image ({one_line(e)})") from None
        if not dims:
            self.close()
            raise ImageError(f"{path} holds no image")
        w0, h0 = dims[0]
        if w0 * h0 > limits.MAX_REGION_SOURCE_PIXELS:
            self.close()
            raise LimitError(f"{path} declares {w0}x{h0} = {w0 * h0:,} pixels, more than "
                             f"limits.MAX_REGION_SOURCE_PIXELS ({limits.MAX_REGION_SOURCE_PIXELS:,}); not reading it")
        try:
            self.level = _choose_level(downsamples, level, scale, self._name)
        except BaseException:
            self.close()
            raise
        self.levels = len(dims)
        self.width, self.height = dims[self.level]
        self.downsample = downsamples[self.level]
        if self.width < 1 or self.height < 1:
            self.close()
            raise ImageError(f"{path} declares an empty image ({self.width}x{self.height} px)")

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, 3)`` uint8 RGB of that rectangle of the chosen level."""
        _check_rect(self, x0, y0, x1, y1)
        if self._slide is None:
            raise ImageError(f"{self._name} is closed")
        location = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))
        try:
            rgba = np.asarray(self._slide.read_region(location, self.level, (x1 - x0, y1 - y0)))
        except MemoryError:
            raise ImageError(f"cannot read {self._name}: out of memory") from None
        except Exception as e:
            raise ImageError(f"cannot read {self._name} as a whole-slide image ({one_line(e)})") from None
        alpha = rgba[:, :, 3:].astype(np.uint16)
        return ((rgba[:, :, :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)

    def _coarser(self, width: int, height: int) -> RegionSource:
        """The coarsest level still at least ``width x height`` (for :func:`thumbnail`); the caller closes it."""
        if self._slide is None:
            return self
        dims = self._slide.level_dimensions
        best = self.level
        for lvl in range(self.level + 1, len(dims)):
            if dims[lvl][0] >= width and dims[lvl][1] >= height:
                best = lvl
        return self if best == self.level else SlideSource(self._name, level=best)

    def close(self) -> None:
        """Close the slide."""
        if self._slide is not None:
            try:
                self._slide.close()
            except Exception:
                pass
            self._slide = None

    def __repr__(self) -> str:
        return f"SlideSource({self._name!r}, level={getattr(self, 'level', '?')})"


# --------------------------------------------------------------------------------------------------
# Padding


class _Padded(_Closing):
    """``source`` with a border; see :func:`padded`."""

    def __init__(self, source: RegionSource, left: int, top: int, right: int, bottom: int, mode: str) -> None:
        self.source, self.left, self.top, self.mode = source, left, top, mode
        self.width = source.width + left + right
        self.height = source.height + top + bottom
        self.downsample = getattr(source, "downsample", 1.0)

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, 3)`` uint8: the padded image's rectangle; one read of ``source`` at most."""
        _check_rect(self, x0, y0, x1, y1)
        xs = _source_index(np.arange(x0, x1) - self.left, self.source.width, self.mode)  # (w,), -1 = zero
        ys = _source_index(np.arange(y0, y1) - self.top, self.source.height, self.mode)  # (h,)
        out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        inside_x, inside_y = xs >= 0, ys >= 0
        if not inside_x.any() or not inside_y.any():
            return out  # entirely in a zero border: the source is not read
        bx0, bx1 = int(xs[inside_x].min()), int(xs[inside_x].max()) + 1
        by0, by1 = int(ys[inside_y].min()), int(ys[inside_y].max()) + 1
        block = self.source.read(bx0, by0, bx1, by1)  # the bounding box of the source pixels needed
        if self.mode == "reflect":
            return block[np.ix_(ys - by0, xs - bx0)]
        rows, cols = np.nonzero(inside_y)[0], np.nonzero(inside_x)[0]
        out[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] = block  # zeros: the inside is one rectangle
        return out

    def _coarser(self, width: int, height: int) -> RegionSource:
        return self

    def close(self) -> None:
        """Close the underlying source."""
        self.source.close()


class _ReadAhead(_Closing):
    """``source`` read in blocks of whole rows; see :func:`read_ahead`."""

    def __init__(self, source: RegionSource, rows: int, max_bytes: int) -> None:
        self.source, self.rows, self.max_bytes = source, rows, max_bytes
        self.width, self.height = source.width, source.height
        self.downsample = getattr(source, "downsample", 1.0)
        self._block: Optional[tuple[int, int, int, int, np.ndarray]] = None  # x0, x1, y0, y1, pixels

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, 3)`` uint8, from the block held when it has these rows and columns."""
        _check_rect(self, x0, y0, x1, y1)
        held = self._block
        if held is None or (held[0], held[1]) != (x0, x1) or not held[2] <= y0 < y1 <= held[3]:
            rows = max(y1 - y0, min(self.rows, self.max_bytes // max(1, 3 * (x1 - x0))))
            end = min(self.height, y0 + rows)
            self._block = None  # the old block is freed before the new one is read
            held = self._block = (x0, x1, y0, end, self.source.read(x0, y0, x1, end))
        return held[4][y0 - held[2]: y1 - held[2]]

    def _coarser(self, width: int, height: int) -> RegionSource:
        return self

    def close(self) -> None:
        """Close the underlying source."""
        self._block = None
        self.source.close()


def read_ahead(source: RegionSource, rows: Optional[int] = None, max_bytes: Optional[int] = None) -> RegionSource:
    """A view of ``source`` that serves consecutive strips of rows from one taller read.

    A read that the block held does not cover reads ``rows`` rows (default
    :data:`~convify.limits.READ_AHEAD_ROWS`) from its top (fewer at the image's
    bottom, or when ``rows`` rows of its width would exceed ``max_bytes`` of decoded pixels, default
    :data:`~convify.limits.READ_AHEAD_BYTES`; more when the
    read itself is taller). Streaming reads strips a few dozen rows tall; a tiled TIFF decodes whole tiles
    hundreds of rows tall, which this decodes once instead of once per strip.
    """
    return _ReadAhead(source, limits.READ_AHEAD_ROWS if rows is None else rows,
                      limits.READ_AHEAD_BYTES if max_bytes is None else max_bytes)


def padded(source: RegionSource, left: int, top: int, right: int, bottom: int,
           mode: str = "reflect") -> RegionSource:
    """A view of ``source`` with a border: ``(width + left + right) x (height + top + bottom)`` pixels.

    Pixel ``(x, y)`` of the view is the source's ``(x - left, y - top)``; outside the source it is

    - ``"reflect"``: the mirror image without repeating the edge (``numpy.pad(mode="reflect")``: ``-1 -> 1``),
      reflected again and again when the border is wider than the image, as numpy does;
    - ``"zeros"``: black.

    A read of the view reads the source once, with the bounding box of the source pixels it needs (never more
    pixels along an axis than the read asks for), or not at all when it lies entirely in a zero border; the
    rest is index arithmetic on whole arrays.

    Args:
        source: any :class:`RegionSource`; closing the view closes it.
        left, top, right, bottom: border widths in pixels, ``>= 0``.
        mode: ``"reflect"`` or ``"zeros"``.

    Raises:
        ValueError: a negative border or an unknown mode.
    """
    if mode not in ("reflect", "zeros"):
        raise ValueError(f"mode must be 'reflect' or 'zeros'; got {mode!r}")
    for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    return _Padded(source, int(left), int(top), int(right), int(bottom), mode)


def _source_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Source indices ``(k,)`` for padded-frame indices ``i`` (already shifted by the border): reflect folds
    them into ``[0, n)`` with period ``2 (n - 1)`` (numpy's reflect), zeros marks the outside with -1."""
    if mode == "zeros":
        return np.where((i >= 0) & (i < n), i, -1)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    m = np.mod(i, period)
    return np.where(m < n, m, period - m)


# --------------------------------------------------------------------------------------------------
# Thumbnails


def thumbnail(source: RegionSource, max_side: int) -> Image.Image:
    """The whole image, at most ``max_side`` pixels on its long side, made in bounded memory.

    The size keeps the aspect ratio (``round``ed, at least 1 px; never enlarged). For pyramids (TIFF levels,
    whole-slide levels) the coarsest level still at least that size is read; the level is then box-averaged
    block by block (at most ~4 MP of the source in memory at a time): output pixel ``(i, j)`` is the mean of
    source rows ``[floor(i H / h), floor((i + 1) H / h))`` and the same for columns. The image is never
    decoded whole.

    Args:
        source: any :class:`RegionSource`.
        max_side: the longest side of the result, ``>= 1``.

    Returns:
        An RGB PIL image.
    """
    if isinstance(max_side, bool) or not isinstance(max_side, (int, np.integer)) or max_side < 1:
        raise ValueError(f"max_side must be an int >= 1; got {max_side!r}")
    factor = min(1.0, max_side / max(source.width, source.height))
    out_w = max(1, min(source.width, round(source.width * factor)))
    out_h = max(1, min(source.height, round(source.height * factor)))
    coarser = getattr(source, "_coarser", None)
    level = coarser(out_w, out_h) if coarser is not None else source
    try:
        return Image.fromarray(_box_average(level, out_w, out_h), "RGB")
    finally:
        if level is not source:
            level.close()


def _box_average(source: RegionSource, out_w: int, out_h: int) -> np.ndarray:
    """``(out_h, out_w, 3)`` uint8: integer-boundary box means of ``source``, read in blocks."""
    W, H = source.width, source.height
    col_edges = (np.arange(out_w + 1, dtype=np.int64) * W) // out_w  # (out_w + 1,), strictly increasing
    row_edges = (np.arange(out_h + 1, dtype=np.int64) * H) // out_h
    out = np.empty((out_h, out_w, 3), np.uint8)
    # Bands of whole output rows: at most _THUMB_BLOCK source rows (unless one output row needs more) and a
    # bounded accumulator of output rows.
    max_rows = max(1, min(_THUMB_BLOCK, (64 * 2 ** 20) // (out_w * 3 * 8)))
    r = 0
    while r < out_h:
        r_end = r + 1
        while (r_end < out_h and r_end - r < max_rows
               and row_edges[r_end + 1] - row_edges[r] <= _THUMB_BLOCK):
            r_end += 1
        sums = np.zeros((r_end - r, out_w, 3), np.float64)
        y_start, y_stop = int(row_edges[r]), int(row_edges[r_end])
        for y0 in range(y_start, y_stop, _THUMB_BLOCK):
            y1 = min(y_stop, y0 + _THUMB_BLOCK)
            # output rows this block of source rows falls into, and where each starts inside the block
            band_rows = np.searchsorted(row_edges, np.arange(y0, y1), side="right") - 1 - r  # (y1 - y0,)
            row_starts = np.flatnonzero(np.r_[True, band_rows[1:] != band_rows[:-1]])
            for x0 in range(0, W, _THUMB_BLOCK):
                x1 = min(W, x0 + _THUMB_BLOCK)
                block = source.read(x0, y0, x1, y1)  # (y1 - y0, x1 - x0, 3) uint8
                cols = np.searchsorted(col_edges, np.arange(x0, x1), side="right") - 1
                col_starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
                # uint32 sums: a block holds at most 2048 * 2048 * 255 < 2 ** 32 per channel
                part = np.add.reduceat(np.add.reduceat(block, row_starts, axis=0, dtype=np.uint32),
                                       col_starts, axis=1, dtype=np.uint32)
                sums[np.ix_(band_rows[row_starts], cols[col_starts])] += part
        counts = np.diff(row_edges[r: r_end + 1])[:, None] * np.diff(col_edges)[None, :]  # (rows, out_w)
        out[r:r_end] = np.clip(sums / counts[:, :, None] + 0.5, 0, 255).astype(np.uint8)
        r = r_end
    return out


# --------------------------------------------------------------------------------------------------
# Helpers


def _check_rect(source: Any, x0: int, y0: int, x1: int, y1: int) -> None:
    """ValueError unless ``[x0, x1) x [y0, y1)`` is a non-empty rectangle inside the source."""
    if not (0 <= x0 < x1 <= source.width and 0 <= y0 < y1 <= source.height):
        raise ValueError(f"region ({x0}, {y0}, {x1}, {y1}) is empty or outside the "
                         f"{source.width}x{source.height} image")


