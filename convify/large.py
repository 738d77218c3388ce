"""Heatmaps of images larger than memory: read by region, computed in exact tiles, written as they come.

:func:`large_heatmap` is :func:`convify.heatmap` for a whole-slide image or a 20000 x 20000 TIFF. Nothing
is ever held whole: the image is read crop by crop through :mod:`convify.sources` (only the crop being
computed is decoded), each crop runs under the memory budget (:mod:`convify.tiling`, equal to the
whole-image pass), the map is streamed to a chunked zarr store (:mod:`convify.mapstore`: the asked classes'
scores, every cell's top-k classes, each class's best cell), and the overlays are drawn on a thumbnail of a
bounded size (:func:`convify.render.overlay_large`).

The image is not resized: it runs at its own pixels, at a pyramid ``level``, or at the level closest to a
downsample ``scale`` (no resampling). Padding makes the map cover the whole image, as in :func:`heatmap`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from . import limits
from .devices import DeviceLike, autocast, check_finite, check_precision, resolve_device
from .engine import ModelLike, PAD_MODES, _as_network, _png, _slug, clip_box, normalise_pixels, padding, resolve_class
from .errors import ConvifyError, OutputExistsError
from .fcn import FullyConvNet, main_map
from .outputs import check_not_inputs, write_files

__all__ = ["LargeResult", "large_heatmap", "is_large", "DEFAULT_OVERLAY_SIDE"]

# The long side of the overlays of a large image, in pixels (``overlay_side=``, ``--overlay-size``).
DEFAULT_OVERLAY_SIDE = 4096


@dataclass
class LargeResult:
    """What :func:`large_heatmap` wrote and found.

    Attributes:
        store: the zarr map store (open it with :func:`convify.mapstore.open_map`).
        files: every file written (the store, overlays, the JSON summary).
        image_size: ``(width, height)`` of the image at the level read.
        map_size: ``(H', W')``.
        top: the best classes over the whole image: ``{"index", "name", "probability", "logit", "cell",
            "box", "box_in_image"}`` each, best first.
        passes: how many forward passes the network ran: crops, or strips over all bands when streamed.
        streamed: whether the image was streamed (:mod:`convify.stream`) rather than cut into crops.
    """

    store: Path
    files: list[Path]
    image_size: tuple[int, int]
    map_size: tuple[int, int]
    top: list[dict[str, Any]]
    passes: int
    streamed: bool = False


def _reader(fcn: FullyConvNet, source: Any, pads: Sequence[int], mode: str, ahead: bool = False) -> Any:
    """Crop reader for the tiler: ``(x0, y0, x1, y1)`` in padded pixels -> ``(1, 3, h, w)`` normalised input.

    ``ahead``: the reads are a streamed band's strips: serve them from taller reads (:func:`read_ahead`).
    """
    from .sources import padded, read_ahead

    if ahead:
        source = read_ahead(source)

    param = next(iter(fcn.parameters()), None)
    left, top, right, bottom = pads
    view = padded(source, left, top, right, bottom, mode="reflect") if mode == "reflect" else source

    def normalised(pixels: np.ndarray) -> torch.Tensor:
        x = normalise_pixels(pixels, fcn.meta.mean, fcn.meta.std)  # as engine's: the same values
        return x if param is None else x.to(device=param.device, dtype=param.dtype)

    def read(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
        if mode == "reflect" or not any(pads):
            return normalised(view.read(x0, y0, x1, y1))
        # zeros: the network's own padding value (0 after normalisation), around what the image has
        ix0, iy0 = max(x0 - left, 0), max(y0 - top, 0)
        ix1, iy1 = min(x1 - left, source.width), min(y1 - top, source.height)
        if ix0 >= ix1 or iy0 >= iy1:
            return torch.zeros(1, 3, y1 - y0, x1 - x0) if param is None else \
                torch.zeros(1, 3, y1 - y0, x1 - x0, device=param.device, dtype=param.dtype)
        inner = normalised(source.read(ix0, iy0, ix1, iy1))
        return torch.nn.functional.pad(inner, (ix0 + left - x0, x1 - (ix1 + left), iy0 + top - y0,
                                               y1 - (iy1 + top)))

    return read


def large_heatmap(image: Union[str, os.PathLike], output: Union[str, os.PathLike], model: ModelLike = None, *,
                  level: Optional[int] = None, scale: Optional[float] = None, pad: Optional[str] = "reflect",
                  queries: Sequence[Union[str, int]] = (), top_k: int = 5, all_classes: bool = False,
                  max_memory: int = limits.DEFAULT_MAX_MEMORY, overlay_side: int = DEFAULT_OVERLAY_SIDE,
                  formats: Sequence[str] = ("png", "json"), force: bool = False,
                  stem: Optional[str] = None, stride: Optional[int] = None, device: DeviceLike = None,
                  precision: Optional[str] = None) -> LargeResult:
    """Class maps of an image of any size, in bounded memory, streamed to ``output/STEM.zarr``.

    Args:
        image: a path: a TIFF/BigTIFF/OME-TIFF (read lazily), a whole-slide file (``convify[slides]``), or a
            photo (decoded by Pillow, within :data:`~convify.limits.MAX_IMAGE_PIXELS`).
        output: the directory written to.
        model: as for :func:`convify.heatmap`.
        level, scale: the pyramid level, or a downsample factor (the closest level; no resampling).
        pad: ``"reflect"`` (default), ``"zeros"`` or ``"none"``, as for :func:`convify.heatmap`.
        queries: classes (names or indices) whose scores are stored whole and drawn; none: the ``top_k``
            best classes are drawn from the per-cell top-k (a class is drawn where it is among a cell's best).
        top_k: classes kept per cell, and drawn when no class is asked for.
        all_classes: store every class's scores (refused above :data:`~convify.limits.MAX_STORE_BYTES`).
        max_memory: the budget for the network's tensors (strips or crops are sized to fit it).
        overlay_side: the long side of the overlays, in pixels.
        formats: ``png`` (overlays) and ``json`` (summary) besides the store, which is always written.
        force: replace existing outputs (never an input).
        stem: the outputs' name stem (default: the image's).
        stride, device, precision: a finer output stride, where and in what precision the network runs (see
            :func:`convify.engine.heatmap`); a block with a non-finite score stops the run (nothing is kept).

    Returns:
        A :class:`LargeResult`.

    Raises:
        ConvifyError: the image cannot be read (ImageError), a bound is exceeded (LimitError: budget,
            store size), outputs exist (OutputExistsError) or cannot be written (OutputError).
    """
    from .mapstore import MapWriter, open_map
    from .render import overlay_large
    from .sources import open_source, thumbnail
    from .tiling import iter_tiles, plan_tiles

    if pad not in PAD_MODES:
        raise ConvifyError(f"pad must be one of {', '.join(str(m) for m in PAD_MODES)}; got {pad!r}")
    unknown = set(formats) - {"png", "json"}
    if unknown:
        raise ConvifyError(f"unknown format(s) {', '.join(sorted(unknown))}; a large image writes png and json "
                           "besides its map store")
    fcn = _as_network(model, stride, device)
    precision = check_precision(resolve_device(None, fcn), precision)
    g = fcn.geometry
    out_dir = Path(output)
    stem = stem or Path(image).stem
    check_not_inputs([out_dir / f"{stem}.json"], [image])  # before any work, not after it
    if "json" in formats and (out_dir / f"{stem}.json").exists() and not force:
        raise OutputExistsError(f"{out_dir / f'{stem}.json'} already exists; use --force (force=True) to overwrite it")
    source = open_source(image, level=level, scale=scale)
    try:
        width, height = source.width, source.height
        pads = padding(g, width, height, pad)
        left, top, right, bottom = pads
        plan = plan_tiles(fcn, height + top + bottom, width + left + right, max_memory)
        classes = list(fcn.meta.classes or [])
        num_classes = _num_classes(fcn)
        if len(classes) != num_classes:
            classes = [f"class {i}" for i in range(num_classes)]
        kept = list(dict.fromkeys(resolve_class(classes, q) for q in queries))
        ran = (height + top + bottom, width + left + right)  # the network's input: (height, width)
        cell0 = g.cell_box(0, 0, ran)
        center0 = ((cell0[0] + cell0[2]) / 2 - left, (cell0[1] + cell0[3]) / 2 - top)
        attrs = {"image": str(image), "image_size": [width, height], "level": level, "scale": scale,
                 "model": fcn.meta.arch, "precision": precision, "pad": list(pads), "geometry": g.to_dict(),
                 "cell_offset": [cell0[0], cell0[1]],
                 "cell_box": "x0 = cell_offset[0] + col * stride - pad[0], y0 = cell_offset[1] + row * stride - "
                             "pad[1], x1 = x0 + window, y1 = y0 + window (image pixels at this level)"}
        store_path = out_dir / f"{stem}.zarr"
        with MapWriter(store_path, map_size=plan.map_size, num_classes=num_classes, classes=classes, keep=kept,
                       top_k=top_k, all_classes=all_classes, attrs=attrs, force=force, inputs=[image]) as writer:
            with autocast(resolve_device(None, fcn), precision):
                for r0, c0, block in iter_tiles(fcn, _reader(fcn, source, pads, pad or "none", bool(plan.strip)),
                                                plan):
                    check_finite(block, precision)
                    writer.write(r0, c0, block)
        store = open_map(store_path)
        best = store.class_max()
        order = [int(i) for i in np.argsort(-best.log_prob, kind="stable")[:max(top_k, len(kept), 1)]]

        def box(cell: Sequence[int]) -> tuple[float, float, float, float]:
            x0, y0, x1, y1 = g.cell_box(int(cell[0]), int(cell[1]), ran)
            return (x0 - left, y0 - top, x1 - left, y1 - top)

        def describe(index: int) -> dict[str, Any]:
            b = box(best.cell[index])
            return {"index": index, "name": classes[index], "probability": float(best.prob[index]),
                    "logit": float(best.logit[index]), "cell": [int(v) for v in best.cell[index]],
                    "box": list(b), "box_in_image": list(clip_box(b, (width, height)))}

        top_classes = [describe(i) for i in order[:top_k]]
        planned: list[tuple[Path, Any]] = []
        if "png" in formats:
            picture = thumbnail(source, overlay_side)
            drawn = kept or order[:min(top_k, limits.MAX_GRID_PANELS)]
            # cells closer than a thumbnail pixel are pooled (max) while the store is read, a strip of rows at
            # a time: memory follows the thumbnail, not the map
            factor = max(1, math.ceil(max(width, height) / max(picture.size) / g.stride - 1e-9))
            pooled = pooled_maps(store, drawn, factor)
            first = (center0[0] + (factor - 1) / 2 * g.stride, center0[1] + (factor - 1) / 2 * g.stride)
            for index, values in zip(drawn, pooled):
                name = _slug(classes[index])
                drawing = overlay_large(picture, values, image_size=(width, height), geometry_center0=first,
                                        step=(g.stride * factor, g.stride * factor), label=classes[index],
                                        max_side=overlay_side, reduce="max")
                planned.append((out_dir / f"{stem}.{name}_{index}.png", _png(drawing)))
        if "json" in formats:
            summary = {"image": str(image), "image_size": [width, height], "level": level, "scale": scale,
                       "model": fcn.meta.arch, "precision": precision, "map_size": list(plan.map_size),
                       "store": str(store_path),
                       "passes": plan.count, "streamed": bool(plan.strip), "pad": list(pads),
                       "geometry": {"stride": g.stride, "window": g.window, "offset": g.offset,
                                    "cell_offset": [cell0[0], cell0[1]],
                                    "receptive_field": g.receptive_field, "local": g.local},
                       "top": top_classes, "classes": [describe(i) for i in kept]}
            planned.append((out_dir / f"{stem}.json", json.dumps(summary, indent=2).encode()))
        check_not_inputs([p for p, _ in planned], [image])  # even with force
        existing = [p for p, _ in planned if p.exists()]
        if existing and not force:
            raise OutputExistsError(f"{existing[0]} already exists; use --force (force=True) to overwrite it")
        written = write_files([(p, lambda f, data=data: f.write(data)) for p, data in planned])
    finally:
        source.close()
    return LargeResult(store_path, [store_path, *written], (width, height), plan.map_size, top_classes, plan.count,
                       bool(plan.strip))


def pooled_maps(store: Any, indices: Sequence[int], factor: int, strip: int = 256) -> list[np.ndarray]:
    """Each class's probability map, max-pooled by ``factor`` cells a side, read a strip of rows at a time.

    A class the store kept whole is read exactly; otherwise it is taken from the per-cell top-k (where the
    class is among a cell's best; 0 elsewhere). Memory: the pooled maps plus one strip of the store.

    Returns:
        One ``(ceil(H' / factor), ceil(W' / factor))`` float32 array per index.
    """
    rows, cols = store.map_size
    kept = set(store.kept) | (set(range(store.num_classes)) if store.all_classes else set())
    out_rows, out_cols = -(-rows // factor), -(-cols // factor)
    pooled = [np.zeros((out_rows, out_cols), np.float32) for _ in indices]
    step = max(factor, strip // factor * factor)
    for r0 in range(0, rows, step):
        window = slice(r0, min(rows, r0 + step))
        top = None if all(i in kept for i in indices) else store.top_k(rows=window)
        for out, index in zip(pooled, indices):
            if index in kept:
                values = store.probs(index, rows=window)
            else:
                values = np.where(top[0] == index, top[1], 0.0).max(axis=-1).astype(np.float32)
            h, w = values.shape
            padded = np.zeros((-(-h // factor) * factor, out_cols * factor), np.float32)
            padded[:h, :w] = values
            block = padded.reshape(-1, factor, out_cols, factor).max(axis=(1, 3))
            out[r0 // factor:r0 // factor + block.shape[0]] = block
    return pooled


def is_large(image: Any, size: Union[int, str, None], max_pixels: int = limits.MAX_PIXELS,
             level: Optional[int] = None, scale: Optional[float] = None) -> bool:
    """Whether ``convify heatmap`` takes the streamed path for ``image``: a pyramid level or scale was asked
    for, or the image is read by region (TIFF, slide) and, at its own pixels (``size`` None), has more
    than ``max_pixels``. Photos Pillow decodes whole take the ordinary path."""
    if level is not None or scale is not None:
        return True
    if size is not None or not isinstance(image, (str, os.PathLike)):
        return False
    from .sources import SLIDE_EXTENSIONS, _is_tiff, open_source

    path = Path(image)
    if not path.is_file() or not (path.suffix.lower() in SLIDE_EXTENSIONS or _is_tiff(path)):
        return False
    source = open_source(path)
    try:
        return source.width * source.height > max_pixels
    finally:
        source.close()


def _num_classes(fcn: FullyConvNet) -> int:
    """The network's number of output channels, from a pass at its smallest input."""
    side = fcn.geometry.min_input_size()
    param = next(iter(fcn.parameters()), None)
    x = torch.zeros(1, 3, side, side) if param is None else torch.zeros(1, 3, side, side, dtype=param.dtype,
                                                                         device=param.device)
    with torch.inference_mode():
        out = fcn(x)
    return int(main_map(out).shape[1])
