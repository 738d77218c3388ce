"""Score maps of huge images on disk: written block by block as they are computed, never held whole.

A 100,000 px slide gives a VGG16 a 3000 x 3000 cell map; its 1000 class scores are 36 GB in float32. What
people look at is much smaller: the classes they asked for, the best few classes of each cell, and each
class's best score anywhere. :class:`MapWriter` keeps exactly that, streamed into a zarr (v3) store:

==========================  ======================  =========  =================================================
array                       shape                   dtype      what
==========================  ======================  =========  =================================================
``top_k_indices``           ``(H', W', k)``         int32      each cell's k best classes, best first
``top_k_probs``             ``(H', W', k)``         float32    their softmax probabilities (over all C classes)
``log_sum_exp``             ``(H', W')``            float64    each cell's ``logsumexp`` of all C logits, so that
                                                               ``p = exp(logit - log_sum_exp)`` for any kept class
``logits_<c>``              ``(H', W')``            float32    raw scores of each kept class ``c`` (``keep=``)
``class_max_log_prob``      ``(C,)``                float64    each class's best log-probability over all cells
``class_max_prob``          ``(C,)``                float32    ... as a probability
``class_max_logit``         ``(C,)``                float32    each class's best raw score over all cells
``class_max_cell``          ``(C, 2)``              int32      ``(row, col)`` of the best log-probability
``all_logits``              ``(C, H', W')``         float32    every score, only with ``all_classes=True``
==========================  ======================  =========  =================================================

The softmax is computed per cell in float64, like :class:`~convify.engine.HeatmapResult` does, so classes at
``p ~ 1`` keep their order; top-k is taken on the logits (the same order as the probabilities, without
rounding). The group's attributes hold the caller's JSON-able metadata (geometry, image size, model...) and
what the store knows: ``format``, ``format_version``, ``map_size``, ``num_classes``, ``classes``, ``top_k``,
``kept``, ``all_classes``, ``chunk``.

Writing is atomic, like :mod:`convify.outputs` does for files: the store is built in a temporary directory
beside the target (``.NAME.<pid>.<random>.tmp``) and renamed into place by :meth:`MapWriter.close`; an
exception (or, inside ``with``, SIGTERM/SIGHUP/SIGINT) removes it, and one left by a killed process is removed
by the next writer of the same path. Memory while writing is one block (plus float64 work space for a strip of
it, at most :data:`_STRIP_ELEMENTS` values) and the chunks zarr is encoding, whatever the map size.

:func:`open_map` reads a store back, and treats it as a stranger's: every metadata file, shape, dtype, codec and
chunk file size is checked before zarr touches a chunk, and every failure is one :class:`MapStoreError` line.

Needs ``zarr>=3`` (``pip install 'convify[store]'``; zarr 3 needs Python 3.11).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from . import limits
from .errors import LimitError, MapStoreError, OutputError, OutputExistsError
from .outputs import (_FATAL_SIGNALS, _STARTED, WriteError, _alive, _Interrupted, _raise_interrupted, _reason,
                      _restore, _umask, check_not_inputs, ensure_directory, temp_pattern)

__all__ = ["MapWriter", "MapStore", "ClassMaxima", "open_map", "FORMAT", "FORMAT_VERSION"]

PathLike = Union[str, os.PathLike]

FORMAT = "convify-map"
FORMAT_VERSION = 1
# Keys of the group attributes the store owns; the caller's ``attrs`` may not use them.
_STORE_KEYS = ("format", "format_version", "map_size", "num_classes", "classes", "top_k", "kept", "all_classes",
               "chunk")
# float64 values the softmax of one strip of a block may hold at once (32 MB): a (1000, 128, 128) block is
# done 32 rows at a time.
_STRIP_ELEMENTS = 4 * 1024 * 1024
# Chunk side bounds for writing (a chunk of 16 cells is all file-system overhead; 4096^2 float32 is 64 MB).
_MIN_CHUNK, _MAX_CHUNK = 16, 4096
# Reading a stranger's store: the most one chunk may decode to, and the most a chunk file may exceed that by
# (no codec we allow expands data by more than a small fraction).
_MAX_CHUNK_BYTES = 64 * 1024 * 1024
_CODECS = frozenset({"bytes", "zstd", "gzip", "blosc", "crc32c", "transpose"})


class ClassMaxima(NamedTuple):
    """Each class's best cell over the whole map, all ``(C,)`` except ``cell`` ``(C, 2)`` as ``(row, col)``."""

    prob: np.ndarray
    logit: np.ndarray
    log_prob: np.ndarray
    cell: np.ndarray


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise MapStoreError("score-map stores need zarr>=3: pip install 'convify[store]'") from None
    if int(str(zarr.__version__).split(".")[0]) < 3:
        raise MapStoreError(f"score-map stores need zarr>=3 (found {zarr.__version__}): "
                            "pip install 'convify[store]'")
    return zarr


def _store_bytes(cells: int, num_classes: int, k: int, kept: int, all_classes: bool) -> int:
    """Uncompressed bytes of a store's arrays."""
    per_cell = k * (4 + 4) + 8 + 4 * kept + (4 * num_classes if all_classes else 0)
    return cells * per_cell + num_classes * (8 + 4 + 4 + 8)


def _array_specs(map_size: tuple[int, int], num_classes: int, k: int, kept: Sequence[int], all_classes: bool,
                 chunk: int) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...], Any]]:
    """name -> (shape, dtype, chunks, fill value) of every array of a store."""
    rows, cols = map_size
    cr, cc = min(chunk, rows), min(chunk, cols)
    specs: dict[str, tuple[tuple[int, ...], str, tuple[int, ...], Any]] = {
        "top_k_indices": ((rows, cols, k), "int32", (cr, cc, k), -1),
        "top_k_probs": ((rows, cols, k), "float32", (cr, cc, k), float("nan")),
        "log_sum_exp": ((rows, cols), "float64", (cr, cc), float("nan")),
        "class_max_log_prob": ((num_classes,), "float64", (num_classes,), float("nan")),
        "class_max_prob": ((num_classes,), "float32", (num_classes,), float("nan")),
        "class_max_logit": ((num_classes,), "float32", (num_classes,), float("nan")),
        "class_max_cell": ((num_classes, 2), "int32", (num_classes, 2), -1),
    }
    for c in kept:
        specs[f"logits_{c}"] = ((rows, cols), "float32", (cr, cc), float("nan"))
    if all_classes:
        specs["all_logits"] = ((num_classes, rows, cols), "float32", (1, cr, cc), float("nan"))
    return specs


# --------------------------------------------------------------------------------------------------
# Writing


class MapWriter:
    """Streams a ``(C, H', W')`` score map to a zarr store on disk, block by block, in bounded memory.

    Args:
        path: the store (a directory) to create; its parent is created if needed.
        map_size: ``(H', W')`` cells of the whole map.
        num_classes: ``C``, the scores per cell.
        classes: the ``C`` class names (default ``"class 0"``, ...).
        keep: class indices whose raw scores are stored whole, ``(H', W')`` each.
        top_k: how many best classes to keep per cell (at most ``C``).
        all_classes: store every score ``(C, H', W')`` too (refused past ``max_bytes``).
        chunk: the side of a stored chunk, in cells.
        attrs: JSON-able metadata saved with the map (geometry, image size, model...).
        force: replace an existing store at ``path`` (never a directory that is not one).
        inputs: files this run reads; ``path`` is never one of them (whatever ``force`` says).
        max_bytes: the most the store may take before compression (default
            :data:`convify.limits.MAX_STORE_BYTES`).

    Use as a context manager (``with MapWriter(...) as w: w.write(...)``): leaving the block closes the store,
    an exception aborts it, and while inside, SIGTERM/SIGHUP/SIGINT remove the temporary store before the
    process dies. Without ``with``, call :meth:`close` (or :meth:`abort`).

    Raises:
        MapStoreError: bad arguments, or zarr>=3 is not installed.
        LimitError: the store would exceed ``max_bytes``.
        OutputExistsError: ``path`` exists and ``force`` is False.
        OutputError: ``path`` is an input, is something other than a map store, or cannot be written.
    """

    def __init__(self, path: PathLike, *, map_size: tuple[int, int], num_classes: int,
                 classes: Optional[Sequence[str]] = None, keep: Sequence[int] = (), top_k: int = 5,
                 all_classes: bool = False, chunk: int = 256, attrs: Optional[dict[str, Any]] = None,
                 force: bool = False, inputs: Sequence[Optional[PathLike]] = (),
                 max_bytes: int = limits.MAX_STORE_BYTES) -> None:
        zarr = _zarr()
        self.path = Path(path)
        self.map_size = _check_map_size(map_size)
        self.num_classes = _check_int("num_classes", num_classes, 1, limits.MAX_CLASSES)
        self.classes = _check_classes(classes, self.num_classes)
        self.keep = _check_keep(keep, self.num_classes)
        self.k = min(_check_int("top_k", top_k, 1, limits.MAX_CLASSES), self.num_classes)
        self.all_classes = bool(all_classes)
        self.chunk = _check_int("chunk", chunk, _MIN_CHUNK, _MAX_CHUNK)
        rows, cols = self.map_size
        size = _store_bytes(rows * cols, self.num_classes, self.k, len(self.keep), self.all_classes)
        if size > max_bytes:
            raise LimitError(f"the map store would take {size / 1e9:.1f} GB before compression, more than the "
                             f"{max_bytes / 1e9:.1f} GB allowed (max_bytes=, convify.limits.MAX_STORE_BYTES); "
                             "keep fewer classes, or leave all_classes off")
        stored = {"format": FORMAT, "format_version": FORMAT_VERSION, "map_size": list(self.map_size),
                  "num_classes": self.num_classes, "classes": self.classes, "top_k": self.k, "kept": list(self.keep),
                  "all_classes": self.all_classes, "chunk": self.chunk}
        group_attrs = {**_check_attrs(attrs), **stored}

        check_not_inputs([self.path], inputs)
        _check_target(self.path, force)
        self._force = force
        ensure_directory(self.path.parent)
        _remove_stale(self.path)
        try:
            temp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.{os.getpid()}.", suffix=".tmp",
                                         dir=self.path.parent))
        except OSError as e:
            raise WriteError(f"cannot write {self.path}: {_reason(e)}") from None
        self._temp: Optional[Path] = temp
        self._cleanup = weakref.finalize(self, _rmtree, temp)  # a writer dropped unclosed leaves nothing
        self._signals: dict[int, Any] = {}
        try:
            group = zarr.open_group(store=str(temp), mode="w", zarr_format=3, attributes=group_attrs)
            self._arrays = {}
            for name, (shape, dtype, chunks, fill) in _array_specs(self.map_size, self.num_classes, self.k,
                                                                   self.keep, self.all_classes, self.chunk).items():
                self._arrays[name] = group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                                                        fill_value=fill)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise WriteError(f"cannot write {self.path}: {_reason(e)}") from None
            raise
        # per-class best over the blocks so far (float64 log-probabilities; ties go to the first cell in
        # raster order, whatever order the blocks come in)
        self._best_log_prob = torch.full((self.num_classes,), -math.inf, dtype=torch.float64)
        self._best_cell = torch.full((self.num_classes,), rows * cols, dtype=torch.int64)
        self._best_logit = torch.full((self.num_classes,), -math.inf, dtype=torch.float32)
        # the blocks written into each chunk not yet complete (exact overlap checks, small), and cells written
        self._pending: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
        self._filled: dict[tuple[int, int], int] = {}
        self._written = 0
        self._work = torch.empty(0, dtype=torch.float64)

    # -- context manager ------------------------------------------------------------------------

    def __enter__(self) -> "MapWriter":
        if threading.current_thread() is threading.main_thread():
            for signum in _FATAL_SIGNALS:
                try:
                    if signal.getsignal(signum) == signal.SIG_DFL:
                        self._signals[signum] = signal.signal(signum, _raise_interrupted)
                except (ValueError, OSError):  # not allowed here (embedded interpreter, ...)
                    pass
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        try:
            if exc is None:
                self.close()
                return
            self.abort()
            if isinstance(exc, _Interrupted):
                self._restore_signals()
                os.kill(os.getpid(), exc.signum)  # the default action: the process ends here
                raise SystemExit(128 + exc.signum) from None
        except _Interrupted as interrupted:  # a signal while closing
            self.abort()
            self._restore_signals()
            os.kill(os.getpid(), interrupted.signum)
            raise SystemExit(128 + interrupted.signum) from None
        finally:
            self._restore_signals()

    def _restore_signals(self) -> None:
        _restore(self._signals)
        self._signals = {}

    # -- writing --------------------------------------------------------------------------------

    @torch.inference_mode()
    def write(self, row0: int, col0: int, logits: Union[torch.Tensor, np.ndarray]) -> None:
        """Store the scores of cells ``[row0:row0+h, col0:col0+w]``.

        Blocks may come in any order and need not align with chunks; they must not overlap.

        Args:
            row0, col0: the block's first cell in the whole map.
            logits: ``(C, h, w)`` raw scores (any float dtype, any device; kept as float32).

        Raises:
            MapStoreError: the writer is closed, the block has the wrong shape, leaves the map or overlaps a block
                already written (the writer stays usable); or the block holds NaN or +infinite scores (the
                temporary store is removed: the map can never be complete).
            OutputError: the store cannot be written (full disk, ...); the temporary store is removed.
        """
        if self._temp is None:
            raise MapStoreError(f"the map store {self.path} is already closed or aborted")
        block = _check_block(logits, self.num_classes)
        _, h, w = block.shape
        rows, cols = self.map_size
        row0 = _check_int("row0", row0, 0, rows - 1)
        col0 = _check_int("col0", col0, 0, cols - 1)
        if row0 + h > rows or col0 + w > cols:
            raise MapStoreError(f"block of {h}x{w} cells at ({row0}, {col0}) leaves the {rows}x{cols} map")
        self._claim(row0, col0, row0 + h, col0 + w)
        top_idx = np.empty((h, w, self.k), dtype=np.int32)
        top_prob = np.empty((h, w, self.k), dtype=np.float32)
        lse = np.empty((h, w), dtype=np.float64)
        strip = max(1, _STRIP_ELEMENTS // (self.num_classes * w))
        work = self._work_space(self.num_classes * min(strip, h) * w, w)
        for s0 in range(0, h, strip):
            part = block[:, s0:s0 + strip]  # (C, s, w)
            s = part.shape[1]
            log_probs = work[: part.numel()].view(part.shape).copy_(part)  # (C, s, w) float64, no new pages
            part_lse = torch.logsumexp(log_probs, dim=0)  # (s, w)
            if not bool(torch.isfinite(part_lse).all()):  # a NaN or +inf score, or every class at -inf
                self.abort()  # the map can never be complete now
                raise MapStoreError(f"block at ({row0}, {col0}) holds NaN or infinite scores; the network's "
                                    f"output is broken, not keeping {self.path}")
            log_probs -= part_lse
            values, indices = torch.topk(part, self.k, dim=0)  # (k, s, w), on the logits: no rounding ties
            top_idx[s0:s0 + s] = indices.permute(1, 2, 0).numpy()
            top_prob[s0:s0 + s] = (values.double() - part_lse).exp().float().permute(1, 2, 0).numpy()
            lse[s0:s0 + s] = part_lse.numpy()
            self._update_best(log_probs.reshape(self.num_classes, -1), part, row0 + s0, col0, w)
            del log_probs, part_lse, values, indices
        region = (slice(row0, row0 + h), slice(col0, col0 + w))
        try:
            self._arrays["top_k_indices"][region] = top_idx
            self._arrays["top_k_probs"][region] = top_prob
            self._arrays["log_sum_exp"][region] = lse
            for c in self.keep:
                self._arrays[f"logits_{c}"][region] = block[c].numpy()
            if self.all_classes:
                self._arrays["all_logits"][(slice(None), *region)] = block.numpy()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise WriteError(f"cannot write {self.path}: {_reason(e)}") from None
            raise

    def _work_space(self, elements: int, width: int) -> torch.Tensor:
        """A float64 buffer of at least ``elements``, kept between blocks: fresh pages for every strip cost
        more than the softmax itself. Sized for any strip up to the budget at once (narrower edge blocks take
        taller strips), so it is allocated once."""
        if self._work.numel() < elements:
            rows, cols = self.map_size
            size = min(max(_STRIP_ELEMENTS, self.num_classes * width), self.num_classes * rows * cols)
            self._work = torch.empty(max(size, elements), dtype=torch.float64)
        return self._work

    def _claim(self, r0: int, c0: int, r1: int, c1: int) -> None:
        """Record the block in every chunk it touches; refuse one that overlaps a block already written."""
        rows, cols = self.map_size
        n = self.chunk
        touched = []
        for cr in range(r0 // n, (r1 - 1) // n + 1):
            for cc in range(c0 // n, (c1 - 1) // n + 1):
                area = (min(rows, (cr + 1) * n) - cr * n) * (min(cols, (cc + 1) * n) - cc * n)
                if self._filled.get((cr, cc), 0) >= area:
                    raise MapStoreError(f"block at ({r0}, {c0}) overlaps cells already written")
                for b in self._pending.get((cr, cc), ()):
                    if r0 < b[2] and b[0] < r1 and c0 < b[3] and b[1] < c1:
                        raise MapStoreError(f"block at ({r0}, {c0}) overlaps the block at ({b[0]}, {b[1]})")
                touched.append(((cr, cc), area))
        for key, area in touched:
            cr, cc = key
            inter = ((min(r1, (cr + 1) * n) - max(r0, cr * n)) * (min(c1, (cc + 1) * n) - max(c0, cc * n)))
            filled = self._filled.get(key, 0) + inter
            if filled >= area:  # complete: nothing can overlap it any more
                self._pending.pop(key, None)
            else:
                self._pending.setdefault(key, []).append((r0, c0, r1, c1))
            self._filled[key] = filled
        self._written += (r1 - r0) * (c1 - c0)

    def _update_best(self, log_probs: torch.Tensor, logits: torch.Tensor, row0: int, col0: int, w: int) -> None:
        """Merge a strip's per-class best into the running ones. ``log_probs`` ``(C, s*w)`` float64,
        ``logits`` ``(C, s, w)``; the strip's first cell is ``(row0, col0)`` and it is ``w`` cells wide."""
        best, arg = log_probs.max(dim=1)  # (C,)
        r, c = arg // w + row0, arg % w + col0
        cell = r * self.map_size[1] + c
        better = (best > self._best_log_prob) | ((best == self._best_log_prob) & (cell < self._best_cell))
        self._best_log_prob = torch.where(better, best, self._best_log_prob)
        self._best_cell = torch.where(better, cell, self._best_cell)
        self._best_logit = torch.maximum(self._best_logit, logits.amax(dim=(1, 2)))

    # -- finishing ------------------------------------------------------------------------------

    def close(self) -> Path:
        """Write the per-class maxima and move the complete store to ``path``.

        Returns:
            ``path``.

        Raises:
            MapStoreError: some cells were never written (the store is removed: a map with holes is not kept).
            OutputExistsError: ``path`` appeared meanwhile and ``force`` is False (the store is removed).
            OutputError: the store cannot be written or moved into place (the store is removed).
        """
        if self._temp is None:
            raise MapStoreError(f"the map store {self.path} is already closed or aborted")
        rows, cols = self.map_size
        try:
            if self._written != rows * cols:
                raise MapStoreError(f"the map is incomplete: {self._written:,} of {rows * cols:,} cells written; "
                                    f"not keeping {self.path}")
            cells = self._best_cell.numpy()
            self._arrays["class_max_log_prob"][:] = self._best_log_prob.numpy()
            self._arrays["class_max_prob"][:] = self._best_log_prob.exp().float().numpy()
            self._arrays["class_max_logit"][:] = self._best_logit.numpy()
            self._arrays["class_max_cell"][:] = np.stack([cells // cols, cells % cols], axis=1).astype(np.int32)
            temp = self._temp
            _sync_tree(temp)
            os.chmod(temp, 0o777 & ~_umask())
            _check_target(self.path, self._force)
            _move_into_place(temp, self.path)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise WriteError(f"cannot write {self.path}: {_reason(e)}") from None
            raise
        self._temp = None
        self._cleanup.detach()
        return self.path

    def abort(self) -> None:
        """Remove the temporary store; ``path`` is left as it was. Safe to call more than once."""
        temp, self._temp = self._temp, None
        if temp is not None:
            _rmtree(temp)
            self._cleanup.detach()


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MapStoreError(f"{name} must be an integer, not {type(value).__name__}")
    if not low <= int(value) <= high:
        raise MapStoreError(f"{name} must be in [{low}, {high}], not {int(value)}")
    return int(value)


def _check_map_size(map_size: Any) -> tuple[int, int]:
    if not isinstance(map_size, (tuple, list)) or len(map_size) != 2:
        raise MapStoreError(f"map_size must be (rows, cols), not {map_size!r}"[:200])
    return (_check_int("map rows", map_size[0], 1, 2**31 - 1), _check_int("map cols", map_size[1], 1, 2**31 - 1))


def _check_classes(classes: Optional[Sequence[str]], num_classes: int) -> list[str]:
    if classes is None:
        return [f"class {i}" for i in range(num_classes)]
    names = list(classes)
    if len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise MapStoreError(f"classes must be {num_classes} names (strings), got {len(names)} items")
    return names


def _check_keep(keep: Sequence[int], num_classes: int) -> tuple[int, ...]:
    kept = tuple(_check_int("a kept class", c, 0, num_classes - 1) for c in keep)
    return tuple(dict.fromkeys(kept))


def _check_attrs(attrs: Optional[dict[str, Any]]) -> dict[str, Any]:
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        raise MapStoreError(f"attrs must be a dict, not {type(attrs).__name__}")
    clash = sorted(set(attrs) & set(_STORE_KEYS))
    if clash:
        raise MapStoreError(f"attrs may not set {', '.join(clash)}: the store writes those itself")
    try:
        text = json.dumps(attrs, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise MapStoreError(f"attrs must be JSON-able (str keys; numbers, strings, lists, dicts): {e}") from None
    if len(text) > limits.MAX_HEADER_BYTES // 2:
        raise LimitError(f"attrs take {len(text):,} bytes as JSON, more than {limits.MAX_HEADER_BYTES // 2:,}")
    return json.loads(text)  # a copy, in the form it will be read back


def _check_block(logits: Union[torch.Tensor, np.ndarray], num_classes: int) -> torch.Tensor:
    """``(C, h, w)`` scores as a float32 CPU tensor (not copied if they are one: a slice of a bigger tensor is
    fine, every step below reads strided)."""
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if not isinstance(logits, torch.Tensor):
        raise MapStoreError(f"logits must be a tensor, not {type(logits).__name__}")
    if logits.dim() != 3 or logits.shape[0] != num_classes or logits.shape[1] < 1 or logits.shape[2] < 1:
        raise MapStoreError(f"logits must be (C={num_classes}, h, w), not {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise MapStoreError(f"logits must be floating point, not {logits.dtype}")
    return logits.detach().to("cpu", torch.float32)  # a view of the caller's block when it is one already


def _check_target(path: Path, force: bool) -> None:
    """Refuse to replace what is at ``path`` unless ``force``, and never anything but a map store."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_reason(e)}") from None
    if not force:
        raise OutputExistsError(f"{path} already exists; use --force (force=True) to overwrite it")
    if stat.S_ISDIR(info.st_mode) and not _is_map_store(path):
        raise OutputError(f"{path} is a directory that is not a convify map store; refusing to replace it even "
                          "with --force: choose another output")


def _is_map_store(path: Path) -> bool:
    try:
        meta = _read_json(path / "zarr.json", path)
    except MapStoreError:
        return False
    return isinstance(meta.get("attributes"), dict) and meta["attributes"].get("format") == FORMAT


def _move_into_place(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target``; an existing store or file there is first moved aside, then removed (a
    reader sees the old store, nothing, or the new one; never a mix)."""
    aside: Optional[Path] = None
    if os.path.lexists(target):
        aside = Path(tempfile.mktemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
        os.rename(target, aside)
    try:
        os.rename(temp, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    if aside is not None:
        _rmtree(aside)


def _sync_tree(root: Path) -> None:
    """fsync every file and directory of the store, so that the rename never publishes unwritten chunks."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _rmtree(path: Path) -> None:
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)
    except OSError:
        pass


def _remove_stale(target: Path) -> None:
    """Remove temporary stores of ``target`` whose writer is gone (see :func:`convify.outputs.write_files`)."""
    if os.name != "posix":
        return
    pattern = temp_pattern(target)
    try:
        names = [n for n in os.listdir(target.parent) if pattern.fullmatch(n)]
    except OSError:
        return
    for name in names:
        path = target.parent / name
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode):
            continue  # files are convify.outputs' to clean
        pid = int(pattern.fullmatch(name).group(1))  # type: ignore[union-attr]
        stale = info.st_mtime < _STARTED if pid == os.getpid() else not _alive(pid)
        if stale:
            _rmtree(path)


# --------------------------------------------------------------------------------------------------
# Reading


class MapStore:
    """A map store on disk, checked and opened by :func:`open_map`. Arrays are read when asked for.

    Attributes:
        path: the store.
        map_size: ``(H', W')``.
        num_classes, classes: ``C`` and the class names.
        k: classes kept per cell.
        kept: the classes whose scores are stored whole.
        all_classes: whether every class's scores are stored.
        attrs: every group attribute (the caller's metadata and the store's own keys).
    """

    def __init__(self, path: Path, group: Any, attrs: dict[str, Any]) -> None:
        self.path = path
        self._group = group
        self.attrs = attrs
        self.map_size: tuple[int, int] = tuple(attrs["map_size"])  # type: ignore[assignment]
        self.num_classes: int = attrs["num_classes"]
        self.classes: list[str] = list(attrs["classes"])
        self.k: int = attrs["top_k"]
        self.kept: tuple[int, ...] = tuple(attrs["kept"])
        self.all_classes: bool = attrs["all_classes"]

    def __repr__(self) -> str:
        return (f"MapStore({str(self.path)!r}, map_size={self.map_size}, num_classes={self.num_classes}, "
                f"k={self.k}, kept={self.kept}, all_classes={self.all_classes})")

    def logits(self, index: int, rows: Optional[slice] = None, cols: Optional[slice] = None) -> np.ndarray:
        """``(h, w)`` float32 raw scores of class ``index`` over ``[rows, cols]`` (default: the whole map).

        Raises:
            MapStoreError: the class is neither kept nor stored with ``all_classes``, or cannot be read.
        """
        index = self._class(index)
        region = self._region(rows, cols)
        if index in self.kept:
            return self._read(f"logits_{index}", region)
        if self.all_classes:
            return self._read("all_logits", (index, *region))
        raise MapStoreError(f"class {index} ({self.classes[index]}) was not kept in {self.path}: kept are "
                            f"{list(self.kept) or 'none'}; write with keep=[...] or all_classes=True")

    def probs(self, index: int, rows: Optional[slice] = None, cols: Optional[slice] = None) -> np.ndarray:
        """``(h, w)`` float32 softmax probability of class ``index`` (kept, or all classes stored)."""
        logits = self.logits(index, rows, cols)
        lse = self._read("log_sum_exp", self._region(rows, cols))
        return np.exp(logits.astype(np.float64) - lse).astype(np.float32)

    def top_k(self, rows: Optional[slice] = None, cols: Optional[slice] = None) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's ``k`` best classes: indices ``(h, w, k)`` int32 and probabilities ``(h, w, k)`` float32,
        best first."""
        region = self._region(rows, cols)
        indices = self._read("top_k_indices", region)
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.num_classes):
            raise MapStoreError(f"{self.path} is damaged: top_k_indices holds class indices outside "
                                f"[0, {self.num_classes})")
        return indices, self._read("top_k_probs", region)

    def class_max(self) -> ClassMaxima:
        """Each class's best over all cells: probability, logit, float64 log-probability ``(C,)`` and the cell
        ``(C, 2)`` where the probability peaks."""
        cell = self._read("class_max_cell", (slice(None), slice(None)))
        if cell.size and (cell.min() < 0 or cell[:, 0].max() >= self.map_size[0]
                          or cell[:, 1].max() >= self.map_size[1]):
            raise MapStoreError(f"{self.path} is damaged: class_max_cell holds cells outside the map")
        return ClassMaxima(self._read("class_max_prob", slice(None)), self._read("class_max_logit", slice(None)),
                           self._read("class_max_log_prob", slice(None)), cell)

    def _class(self, index: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise MapStoreError(f"a class index must be an integer, not {type(index).__name__}")
        if not 0 <= int(index) < self.num_classes:
            raise MapStoreError(f"class index {int(index)} is outside [0, {self.num_classes})")
        return int(index)

    def _region(self, rows: Optional[slice], cols: Optional[slice]) -> tuple[slice, slice]:
        out = []
        for name, s, n in (("rows", rows, self.map_size[0]), ("cols", cols, self.map_size[1])):
            s = slice(None) if s is None else s
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise MapStoreError(f"{name} must be a slice with step 1, not {s!r}")
            start, stop, _ = s.indices(n)
            out.append(slice(start, max(start, stop)))
        return out[0], out[1]

    def _read(self, name: str, region: Any) -> np.ndarray:
        try:
            return np.asarray(self._group[name][region])
        except MemoryError:
            raise MapStoreError(f"cannot read {name} from {self.path}: out of memory") from None
        except Exception as e:  # a damaged chunk: any codec's complaint, one line
            text = str(e).strip().splitlines()
            raise MapStoreError(f"cannot read {name} from {self.path} (a damaged store?): "
                                f"{text[0][:200] if text else type(e).__name__}") from None


def open_map(path: PathLike, *, max_bytes: int = limits.MAX_STORE_BYTES) -> MapStore:
    """Open a map store written by :class:`MapWriter`, after checking it as a stranger's file.

    Checked before zarr reads anything: the tree holds only regular files and directories (no links, pipes or
    devices), only the arrays this format has, each with the shape, dtype, chunking and codecs the attributes
    imply (codecs from a short allowlist: nothing that unpickles), chunk files no larger than their chunk,
    metadata files at most :data:`convify.limits.MAX_HEADER_BYTES`, and a declared size within ``max_bytes``.

    Raises:
        MapStoreError: not a store, not a convify map, or damaged; one line.
        LimitError: the store declares more than ``max_bytes``.
    """
    zarr = _zarr()
    root = Path(path)
    if not root.is_dir():
        raise MapStoreError(f"{root} is not a map store (not a directory)")
    meta = _read_json(root / "zarr.json", root)
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group" or not isinstance(meta.get("attributes"),
                                                                                           dict):
        raise MapStoreError(f"{root} is not a convify map store (not a zarr v3 group)")
    attrs = meta["attributes"]
    if attrs.get("format") != FORMAT:
        raise MapStoreError(f"{root} is not a convify map store (format {str(attrs.get('format'))[:40]!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise MapStoreError(f"{root} is a convify map store of version {str(attrs.get('format_version'))[:20]}, "
                            f"this convify reads version {FORMAT_VERSION}")
    try:
        map_size = _check_map_size(attrs.get("map_size"))
        num_classes = _check_int("num_classes", attrs.get("num_classes"), 1, limits.MAX_CLASSES)
        _check_classes(attrs.get("classes"), num_classes)
        k = _check_int("top_k", attrs.get("top_k"), 1, num_classes)
        kept = attrs.get("kept")
        if not isinstance(kept, list):
            raise MapStoreError("kept must be a list")
        kept_set = _check_keep(kept, num_classes)
        if len(kept_set) != len(kept):
            raise MapStoreError("kept lists a class twice")
        if not isinstance(attrs.get("all_classes"), bool):
            raise MapStoreError("all_classes must be true or false")
        chunk = _check_int("chunk", attrs.get("chunk"), 1, _MAX_CHUNK)
    except MapStoreError as e:
        raise MapStoreError(f"{root} is damaged: {e}") from None
    size = _store_bytes(map_size[0] * map_size[1], num_classes, k, len(kept), attrs["all_classes"])
    if size > max_bytes:
        raise LimitError(f"{root} declares {size / 1e9:.1f} GB of maps, more than the {max_bytes / 1e9:.1f} GB "
                         "allowed (max_bytes=, convify.limits.MAX_STORE_BYTES)")
    specs = _array_specs(map_size, num_classes, k, kept_set, attrs["all_classes"], chunk)
    chunk_bytes = {name: _check_array(root, name, shape, dtype) for name, (shape, dtype, _, _) in specs.items()}
    _check_tree(root, chunk_bytes)
    try:
        group = zarr.open_group(store=str(root), mode="r", zarr_format=3)
    except Exception as e:
        raise MapStoreError(f"cannot open {root} as a zarr store: {str(e).splitlines()[0][:200] if str(e) else e!r}"
                            ) from None
    return MapStore(root, group, attrs)


def _read_json(file: Path, root: Path) -> dict[str, Any]:
    """A metadata file of the store, read only if it is a regular file of bounded size."""
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        raise MapStoreError(f"{root} is not a map store (no {file.relative_to(root)})") from None
    except OSError as e:
        raise MapStoreError(f"cannot read {file}: {_reason(e)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise MapStoreError(f"{root} is damaged: {file.relative_to(root)} is not a regular file")
    if info.st_size > limits.MAX_HEADER_BYTES:
        raise MapStoreError(f"{root} is damaged: {file.relative_to(root)} takes {info.st_size:,} bytes, more than "
                            f"{limits.MAX_HEADER_BYTES:,}")
    try:
        with open(file, "rb") as f:
            meta = json.loads(f.read(limits.MAX_HEADER_BYTES + 1))
    except (OSError, ValueError, RecursionError) as e:
        raise MapStoreError(f"{root} is damaged: {file.relative_to(root)} is not JSON "
                            f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise MapStoreError(f"{root} is damaged: {file.relative_to(root)} is not a JSON object")
    return meta


def _check_array(root: Path, name: str, shape: tuple[int, ...], dtype: str) -> int:
    """Check one array's metadata against what the attributes imply; returns the bytes of one chunk."""
    meta = _read_json(root / name / "zarr.json", root)

    def bad(what: str) -> MapStoreError:
        return MapStoreError(f"{root} is damaged: array {name} {what}")

    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise bad("is not a zarr v3 array")
    if meta.get("shape") != list(shape):
        raise bad(f"has shape {str(meta.get('shape'))[:60]}, expected {list(shape)}")
    if meta.get("data_type") != dtype:
        raise bad(f"has data type {str(meta.get('data_type'))[:40]}, expected {dtype}")
    grid = meta.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
    if (not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(chunks, list)
            or len(chunks) != len(shape)
            or not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 2**31 for c in chunks)):
        raise bad("has an unsupported chunk grid")
    nbytes = math.prod(chunks) * np.dtype(dtype).itemsize
    if nbytes > _MAX_CHUNK_BYTES:
        raise bad(f"has chunks of {nbytes:,} bytes, more than {_MAX_CHUNK_BYTES:,}")
    encoding = meta.get("chunk_key_encoding")
    if not isinstance(encoding, dict) or encoding.get("name") != "default":
        raise bad("has an unsupported chunk key encoding")
    codecs = meta.get("codecs")
    if (not isinstance(codecs, list) or not codecs
            or not all(isinstance(c, dict) and c.get("name") in _CODECS for c in codecs)
            or sum(c.get("name") == "bytes" for c in codecs) != 1):
        raise bad("uses codecs outside " + ", ".join(sorted(_CODECS)))
    if meta.get("storage_transformers") not in (None, []):
        raise bad("uses storage transformers")
    return nbytes


def _check_tree(root: Path, chunk_bytes: dict[str, int]) -> None:
    """Only the expected arrays, made of directories and regular files, no file larger than its chunk could
    encode to, and no more files than the arrays have chunks (so this walk itself is bounded)."""
    allowed = {"zarr.json", *chunk_bytes}
    try:
        top = sorted(os.listdir(root))
    except OSError as e:
        raise MapStoreError(f"cannot read {root}: {_reason(e)}") from None
    unexpected = [n for n in top if n not in allowed]
    if unexpected:
        raise MapStoreError(f"{root} is damaged: unexpected entry {unexpected[0][:80]!r}")
    for name, nbytes in chunk_bytes.items():
        meta = _read_json(root / name / "zarr.json", root)
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        budget = math.prod(-(-s // c) for s, c in zip(shape, chunks)) + len(shape) * 1024 + 16
        largest = nbytes + nbytes // 64 + 4096
        for directory, dirs, files in os.walk(root / name):
            for entry in dirs + files:
                budget -= 1
                if budget < 0:
                    raise MapStoreError(f"{root} is damaged: array {name} has more files than chunks")
                full = os.path.join(directory, entry)
                try:
                    info = os.lstat(full)
                except OSError as e:
                    raise MapStoreError(f"cannot read {full}: {_reason(e)}") from None
                if stat.S_ISDIR(info.st_mode):
                    continue
                if not stat.S_ISREG(info.st_mode):
                    raise MapStoreError(f"{root} is damaged: {os.path.relpath(full, root)} is a link or special "
                                        "file, not a regular file")
                if entry != "zarr.json" and info.st_size > largest:
                    raise MapStoreError(f"{root} is damaged: {os.path.relpath(full, root)} takes "
                                        f"{info.st_size:,} bytes, more than its chunk can encode to")
