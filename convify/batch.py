"""Many images through one network: prepared in worker processes, run in batched forward passes.

``heatmaps(images)`` yields one :class:`~convify.engine.HeatmapResult` per image, in order, or a
:class:`Failure` for an image that could not be done (unreadable, too small, out of memory): one bad image
never stops the others.

How the work is cut, the same way on one machine and on a Ray cluster (:mod:`convify.ray`), so that the two
give bit-identical maps:

1. images are read, resized, normalised and padded (:func:`prepare_item`) in DataLoader worker processes
   while the network runs in the main one;
2. they are taken in *windows* of consecutive images (``window`` of them, default four batches);
3. inside a window, images whose prepared inputs have the same size are run together, in their order, at
   most ``batch_size`` to a pass and no more than fit ``max_memory`` (:func:`plan_groups`); an image too
   large for the budget alone runs in exact tiles (:func:`convify.tiling.tiled_map`).

A window's results depend only on its images and the settings, never on timing or on which machine's turn
it was: a convolution's last bits can depend on how many images share its pass (oneDNN picks its kernel by
batch size), so fixing the batches fixes the bits.

Memory stays bounded: the DataLoader prefetches at most ``2 * workers`` images, and one window's inputs and
results are held at a time.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from . import limits
from .devices import DeviceLike, check_precision, resolve_device
from .engine import (ImageLike, ModelLike, PAD_MODES, HeatmapResult, Prepared, _as_network, _fused,
                     load_image, make_result, prepare, run_network)
from .errors import ConvifyError, failure_line
from .fcn import FullyConvNet
from .tiling import batch_fits

__all__ = ["heatmaps", "Failure", "Ready", "RunSettings", "prepare_item", "plan_groups", "run_window",
           "default_batch_size", "default_workers"]


@dataclass(frozen=True)
class Failure:
    """An image that could not be done: ``message`` is one line saying why (and what to do)."""

    index: int
    source: str
    message: str
    detail: str = field(default="", repr=False, compare=False)  # the traceback, for --debug


@dataclass(frozen=True)
class Ready:
    """An image read and prepared for the network (``prepared`` is None for a fused run, which prepares
    each scale itself)."""

    index: int
    source: Optional[str]
    picture: Image.Image
    prepared: Optional[Prepared]


@dataclass(frozen=True)
class RunSettings:
    """How every image of a run is prepared and run (see :func:`convify.engine.heatmap` for each)."""

    size: Union[int, str, None] = "auto"
    max_pixels: int = limits.MAX_PIXELS
    max_memory: int = limits.DEFAULT_MAX_MEMORY
    pad: Optional[str] = "reflect"
    scales: Optional[tuple[float, ...]] = None
    flip: bool = False
    precision: str = "float32"
    batch_size: int = 1
    window: int = 0  # images per window; 0: four batches

    @property
    def fused(self) -> bool:
        return self.scales is not None or self.flip

    @property
    def window_size(self) -> int:
        return self.window or 4 * self.batch_size


class _Spec:
    """What :func:`~convify.engine.prepare` reads of a network (its metadata and geometry), without its
    weights: sent to worker processes instead of the network."""

    def __init__(self, fcn: FullyConvNet) -> None:
        self.meta, self.geometry = fcn.meta, fcn.geometry


def prepare_item(index: int, image: ImageLike, spec: Any, settings: RunSettings) -> Union[Ready, Failure]:
    """Read and prepare one image (in a worker process, or a Ray task); any failure becomes a :class:`Failure`."""
    source = str(image) if isinstance(image, (str, os.PathLike)) else None
    try:
        picture = load_image(image)
        prepared = None if settings.fused else prepare(picture, spec, settings.size, settings.max_pixels,
                                                       settings.pad)
        return Ready(index, source, picture, prepared)
    except Exception as e:
        return Failure(index, source or f"image {index}", failure_line(e), traceback.format_exc())


def plan_groups(shapes: Sequence[Optional[tuple[int, ...]]], batch_size: int,
                capacity: Callable[[tuple[int, ...]], int]) -> list[list[int]]:
    """Positions of a window's images grouped into forward passes.

    Args:
        shapes: each image's prepared input shape, None for one that is not run in a batch (failed, fused).
        batch_size: the most images in one pass.
        capacity: how many inputs of a shape fit one pass's memory.

    Returns:
        Groups of positions, each of one shape, in order of their first position, positions in order;
        every position whose shape is not None appears once.
    """
    groups: list[list[int]] = []
    open_group: dict[tuple[int, ...], list[int]] = {}
    for position, shape in enumerate(shapes):
        if shape is None:
            continue
        group = open_group.get(shape)
        if group is None or len(group) >= max(1, min(batch_size, capacity(shape))):
            group = open_group[shape] = []
            groups.append(group)
        group.append(position)
    return groups


def run_window(fcn: FullyConvNet, items: Sequence[Union[Ready, Failure]],
               settings: RunSettings) -> list[Union[HeatmapResult, Failure]]:
    """One window's results, in the order of ``items``: each same-size group in one pass (:func:`plan_groups`).

    A pass that fails (out of memory, a non-finite score) is run again image by image, so that only the images
    that fail alone are failures.
    """
    out: list[Union[HeatmapResult, Failure, None]] = [item if isinstance(item, Failure) else None for item in items]
    if settings.fused:
        for position, item in enumerate(items):
            if isinstance(item, Ready):
                out[position] = _guarded(item, lambda item=item: _fused(
                    item.picture, fcn, settings.size, settings.max_pixels, settings.max_memory, settings.pad,
                    tuple(settings.scales or (1,)), settings.flip, item.source, settings.precision))
        return out  # type: ignore[return-value]
    shapes = [tuple(item.prepared.x.shape[2:]) if isinstance(item, Ready) else None for item in items]
    groups = plan_groups(shapes, settings.batch_size,
                         lambda shape: batch_fits(fcn, shape[0], shape[1], settings.max_memory))
    for group in groups:
        ready = [items[p] for p in group]
        together = _run_together(fcn, ready, settings) if len(ready) > 1 else None
        for k, (position, item) in enumerate(zip(group, ready)):
            out[position] = together[k] if together is not None else \
                _guarded(item, lambda item=item: _single(fcn, item, settings))
    return out  # type: ignore[return-value]


def _run_together(fcn: FullyConvNet, ready: Sequence[Ready],
                  settings: RunSettings) -> Optional[list[Union[HeatmapResult, Failure]]]:
    """Same-size images in one pass: their results (each its own failure if its result cannot be made), or None
    when the pass itself fails (out of memory, a non-finite score): then each image runs alone."""
    try:
        logits = run_network(fcn, torch.cat([item.prepared.x for item in ready]), settings.max_memory,
                             settings.precision, shown=(ready[0].prepared.width, ready[0].prepared.height))
    except ConvifyError:
        return None
    return [_guarded(item, lambda k=k, item=item: make_result(item.picture, logits[k], fcn, item.prepared,
                                                              item.source, settings.precision))
            for k, item in enumerate(ready)]


def _single(fcn: FullyConvNet, item: Ready, settings: RunSettings) -> HeatmapResult:
    prepared = item.prepared
    logits = run_network(fcn, prepared.x, settings.max_memory, settings.precision,
                         shown=(prepared.width, prepared.height))
    return make_result(item.picture, logits, fcn, prepared, item.source, settings.precision)


def _guarded(item: Ready, make: Callable[[], HeatmapResult]) -> Union[HeatmapResult, Failure]:
    try:
        return make()
    except Exception as e:
        return Failure(item.index, item.source or f"image {item.index}", failure_line(e), traceback.format_exc())


class _Prepared(torch.utils.data.Dataset):
    """The images of a run, each read and prepared on access (in a DataLoader worker)."""

    def __init__(self, images: Sequence[ImageLike], spec: _Spec, settings: RunSettings) -> None:
        self.images, self.spec, self.settings = images, spec, settings

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Union[Ready, Failure]:
        return prepare_item(index, self.images[index], self.spec, self.settings)


def _as_is(item: Any) -> Any:
    return item


def _one_thread(_: int) -> None:
    """A worker decodes one image at a time: its torch ops stay on one thread, leaving the cores to the network."""
    torch.set_num_threads(1)


def default_workers() -> int:
    """Worker processes that prepare images: half the cores (at least 1, at most 8): the network uses the rest."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def default_batch_size(fcn: FullyConvNet) -> int:
    """Images per forward pass when not asked: 1 on a CPU (measured on 2 cores: a batch of 8 448 px images
    runs EfficientNet-Lite0 at 0.6x the images per second of one at a time: the activations leave the
    cache), 16 on an accelerator (where one image does not fill the device)."""
    return 1 if resolve_device(None, fcn).type == "cpu" else 16


@torch.inference_mode()
def heatmaps(images: Iterable[ImageLike], model: ModelLike = None, *, batch_size: Optional[int] = None,
             workers: Optional[int] = None, size: Union[int, str, None] = "auto",
             max_pixels: int = limits.MAX_PIXELS, max_memory: int = limits.DEFAULT_MAX_MEMORY,
             pad: Optional[str] = "reflect", stride: Optional[int] = None,
             scales: Optional[Sequence[float]] = None, flip: bool = False, device: DeviceLike = None,
             precision: Optional[str] = None, window: int = 0) -> Iterator[Union[HeatmapResult, Failure]]:
    """Class score maps for many images: one result per image, in order, from batched forward passes.

    Args:
        images: paths, PIL images or tensors (see :func:`convify.engine.load_image`).
        batch_size: the most images in one forward pass (None: :func:`default_batch_size`); images are batched
            with others of the same prepared size in their window (module docs), as many as ``max_memory`` holds.
        workers: processes that read and prepare images while the network runs (None: :func:`default_workers`;
            0: in this process).
        window: images grouped at a time (0: four batches).
        size, max_pixels, max_memory, pad, stride, scales, flip, device, precision: as for
            :func:`convify.engine.heatmap` (a fused run, ``scales``/``flip``, runs each image on its own).

    Yields:
        A :class:`~convify.engine.HeatmapResult` per image, or a :class:`Failure` (with a one-line message)
        for an image that could not be done.

    Raises:
        ConvifyError: a bad argument or model (before any image is read).

    Example::

        >>> for result in convify.heatmaps(Path("photos").glob("*.jpg"), batch_size=8):
        ...     print(result.source, result.top(1)[0].name)
    """
    if pad not in PAD_MODES:
        raise ConvifyError(f"pad must be one of {', '.join(str(m) for m in PAD_MODES)}; got {pad!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("workers", workers, 0), ("window", window, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 4096):
            raise ConvifyError(f"{name} must be a whole number from {low} to 4096; got {value!r}")
    fcn = _as_network(model, stride, device)
    settings = RunSettings(size, max_pixels, max_memory, pad, tuple(scales) if scales is not None else None, flip,
                           check_precision(resolve_device(None, fcn), precision),
                           batch_size or default_batch_size(fcn), window)
    images = list(images)
    workers = default_workers() if workers is None else workers
    workers = min(workers, max(0, len(images) - 1))  # one image: read here, no process started for it
    loader = torch.utils.data.DataLoader(_Prepared(images, _Spec(fcn), settings), batch_size=None,
                                         num_workers=workers, collate_fn=_as_is,
                                         worker_init_fn=_one_thread if workers else None)
    window_items: list[Union[Ready, Failure]] = []
    for item in loader:
        window_items.append(item)
        if len(window_items) == settings.window_size:
            yield from run_window(fcn, window_items, settings)
            window_items = []
    if window_items:
        yield from run_window(fcn, window_items, settings)

