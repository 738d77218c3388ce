"""The converted network: an ``nn.Module`` with its geometry and metadata, saved as plain data."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from . import limits
from .checkpoint import check_tensors, read_data_file
from .errors import LimitError, ModelLoadError, OutputExistsError
from .geometry import Geometry
from .outputs import write_atomic
from .serialize import graph_from_data, graph_to_data

__all__ = ["FullyConvNet", "ModelMeta", "Rewrite", "load", "is_convify_file", "main_map"]

FORMAT = "convify.fcn"
VERSION = 1


@dataclass
class ModelMeta:
    """What convify knows about a model besides its weights.

    Attributes:
        arch: the source architecture (``"torchvision:vgg16"``), or None if unknown.
        input_size: the native square input size in pixels.
        mean, std: per-channel normalisation of RGB images in ``[0, 1]``.
        classes: class names (index -> name), or None if unknown.
    """

    arch: Optional[str]
    input_size: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    classes: Optional[list[str]] = None


class Rewrite(NamedTuple):
    """One change convert made: ``classifier.0  Linear(25088 -> 4096)  ->  Conv2d(512 -> 4096, 7x7)``."""

    layer: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.layer}  {self.before}  ->  {self.after}"


class FullyConvNet(nn.Module):
    """A classifier rewritten to give class score maps: ``(N, 3, H, W) -> (N, classes, H', W')``.

    Made by :func:`convify.convert`, read back by :func:`convify.load`. At the native input size the map
    is 1x1 and equals the original model's output; on larger images cell ``map[..., i, j]`` scores the
    window ``geometry.cell_box(i, j)``. Models whose head returns several outputs return a tuple of maps.

    Attributes:
        net: the rewritten graph: a ``torch.fx.GraphModule`` from convert, a :class:`~convify.serialize.StoredGraph` from a file.
        geometry: where every cell lies (:class:`~convify.geometry.Geometry`).
        meta: architecture, native input size, preprocessing and class names (:class:`ModelMeta`).
        rewrites: what convert changed, layer by layer.
        check: how the conversion was checked against the original at the native size (None if it was not):
            ``{"dtype": ..., "max_abs_diff": float32 difference, "max_abs_diff_float64": ... or None}``.
    """

    def __init__(self, net: nn.Module, geometry: Geometry, meta: ModelMeta,
                 rewrites: Optional[list[Rewrite]] = None, check: Optional[dict] = None) -> None:
        super().__init__()
        self.net = net
        self.geometry = geometry
        self.meta = meta
        self.rewrites = list(rewrites or [])
        self.check = check
        self.eval()

    def forward(self, x: torch.Tensor) -> Any:
        """``x``: ``(N, 3, H, W)`` normalised images -> ``(N, classes, H', W')`` score maps (raw logits)."""
        return self.net(x)

    @property
    def classes(self) -> Optional[list[str]]:
        return self.meta.classes

    def output_size(self, height: int, width: Optional[int] = None) -> tuple[int, int]:
        """The map size for an input of ``height x width`` pixels (see :class:`Geometry`)."""
        return self.geometry.output_size(height, width)

    def save(self, path: Union[str, os.PathLike], force: bool = False) -> Path:
        """Write the network, geometry and metadata to ``path`` as data (no pickled code).

        The file is written next to ``path`` first and renamed into place, so a failure leaves nothing
        half-written.

        Raises:
            OutputExistsError: ``path`` exists and ``force`` is False.
            ConvifyError: the graph uses an operation that cannot be saved.
        """
        path = Path(path)
        if path.exists() and not force:
            raise OutputExistsError(f"{path} already exists; use --force (force=True) to overwrite it")
        description, tensors = graph_to_data(self.net)
        header = {
            "format": FORMAT, "version": VERSION, "graph": description,
            "geometry": self.geometry.to_dict(), "meta": asdict(self.meta),
            "rewrites": [list(r) for r in self.rewrites], "check": self.check,
        }
        payload = {"convify": json.dumps(header), "tensors": tensors}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(payload, f))
        return path

    def export_onnx(self, path: Union[str, os.PathLike], *, opset: Optional[int] = None,
                    check_sizes: Optional[list] = None, force: bool = False) -> Path:
        """Write the network as an ONNX model, checked with onnxruntime first (:func:`convify.export.export_onnx`)."""
        from .export import export_onnx

        return export_onnx(self, path, opset=opset, check_sizes=check_sizes, force=force)


def main_map(out: Any) -> torch.Tensor:
    """The main map of a network's output: the output itself, or the first of a head's several outputs."""
    return out[0] if isinstance(out, (tuple, list)) else out


def is_convify_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a file written by :meth:`FullyConvNet.save` (read safely, weights_only).

    The file is memory-mapped, so asking about a large model reads its header, not its weights.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any file torch cannot read is simply not ours
        return False
    return isinstance(payload, dict) and isinstance(payload.get("convify"), str)


def load(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> FullyConvNet:
    """Read a file written by :meth:`FullyConvNet.save`. Runs no code from the file.

    The file is read with ``torch.load(..., weights_only=True)``; its header is checked field by field
    (types, ranges, counts, layer sizes against the tensors present) before anything is built, and the
    network is rebuilt by :func:`convify.serialize.graph_from_data`, which interprets the stored graph with
    operations from :mod:`convify.ops` alone (no generated source). It loads without the original model's
    classes.

    Raises:
        ModelLoadError: the file does not exist, is not a convify file, breaks the schema (the message
            names the field), or names an operation convify does not allow.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such file: {path}")
    try:
        payload = read_data_file(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path} is not a convify file ({str(e).removeprefix(str(path)).lstrip(' :')}); "
                             "convert a model first with `convify convert`") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("convify"), str) \
            or not isinstance(payload.get("tensors"), dict):
        raise ModelLoadError(f"{path} is not a convify file; convert a model first with `convify convert`")
    try:
        return _from_payload(payload, str(path)).to(map_location)
    except LimitError as e:
        raise LimitError(_prefixed(path, e)) from None
    except _NotOurs:
        raise ModelLoadError(f"{path} is not a convify file; convert a model first with `convify convert`") from None
    except ModelLoadError as e:
        raise ModelLoadError(f"{path} {e}" if str(e).startswith("was ") else _prefixed(path, e)) from None
    except (ValueError, OverflowError, RecursionError) as e:  # the schema's messages name the field
        raise ModelLoadError(f"{path} is a corrupt convify file: {str(e)[:300]}") from None
    except MemoryError:
        raise ModelLoadError(f"out of memory loading {path}") from None


def _prefixed(path: Path, error: Exception) -> str:
    return str(error) if str(error).startswith(str(path)) else f"{path}: {error}"


class _NotOurs(Exception):
    """The file is a torch file, but no convify file."""


_HEADER_FIELDS = {"format", "version", "graph", "geometry", "meta", "rewrites", "check"}


def _from_payload(payload: dict, source: str) -> FullyConvNet:
    """Check a loaded file's header and tensors against the schema, then build the network."""
    text = payload["convify"]
    if len(text) > limits.MAX_HEADER_BYTES:
        raise ModelLoadError(f"the header is {len(text)} bytes; convify reads at most {limits.MAX_HEADER_BYTES} "
                             "(convify.limits.MAX_HEADER_BYTES)")
    header = json.loads(text)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _NotOurs()
    if header.get("version") != VERSION:
        raise ModelLoadError(f"was written by another version of convify (format "
                             f"{ascii(header.get('version'))[:20]}); convert the model again")
    if set(header) != _HEADER_FIELDS:
        raise ValueError(f"the header must have exactly the fields {', '.join(sorted(_HEADER_FIELDS))}")
    tensors = _checked_tensors(payload["tensors"], source)
    meta = _meta_from(header["meta"])
    geometry = Geometry.from_dict(header["geometry"])
    if geometry.window != meta.input_size:
        raise ValueError(f"geometry.window {geometry.window} is not meta.input_size {meta.input_size}")
    rewrites = _rewrites_from(header["rewrites"])
    check = _check_from(header["check"])
    net = graph_from_data(header["graph"], tensors)
    return FullyConvNet(net, geometry, meta, rewrites, check)


def _checked_tensors(tensors: dict, source: str) -> dict[str, torch.Tensor]:
    """The file's tensors, each a plain tensor that owns the storage its shape claims, all finite, bounded."""
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise ValueError("tensors must map names to tensors")
    check_tensors(tensors, source)
    return tensors


def _number(value: Any, where: str, positive: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value) > 1e300 \
            or not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{where} must be a finite{' positive' if positive else ''} number")
    return float(value)


def _text(value: Any, where: str, limit: int = 1000) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{where} must be a string of at most {limit} characters")
    return value


def _meta_from(data: Any) -> ModelMeta:
    fields = {"arch", "input_size", "mean", "std", "classes"}
    if not isinstance(data, dict) or set(data) != fields:
        raise ValueError(f"meta must have exactly the fields {', '.join(sorted(fields))}")
    size = data["input_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= limits.MAX_INPUT_SIZE:
        raise ValueError(f"meta.input_size must be an integer from 1 to {limits.MAX_INPUT_SIZE}")
    stats = {}
    for key in ("mean", "std"):
        values = data[key]
        if not isinstance(values, list) or len(values) != 3:
            raise ValueError(f"meta.{key} must be three numbers (R, G, B)")
        stats[key] = tuple(_number(v, f"meta.{key}", positive=key == "std") for v in values)
    classes = data["classes"]
    if classes is not None:
        if not isinstance(classes, list) or len(classes) > limits.MAX_CLASSES:
            raise ValueError(f"meta.classes must be a list of at most {limits.MAX_CLASSES} names")
        classes = [_text(c, "meta.classes[...]") for c in classes]
    arch = None if data["arch"] is None else _text(data["arch"], "meta.arch", 200)
    return ModelMeta(arch, size, stats["mean"], stats["std"], classes)


def _rewrites_from(data: Any) -> list[Rewrite]:
    if not isinstance(data, list) or len(data) > limits.MAX_GRAPH_NODES:
        raise ValueError("rewrites must be a list")
    rewrites = []
    for entry in data:
        if not isinstance(entry, list) or len(entry) != 3:
            raise ValueError("each rewrite must be [layer, before, after]")
        rewrites.append(Rewrite(*(_text(v, "rewrites[...]") for v in entry)))
    return rewrites


def _check_from(data: Any) -> Optional[dict]:
    if data is None:
        return None
    if not isinstance(data, dict) or not {"max_abs_diff", "max_abs_diff_float64"} <= set(data) \
            or not set(data) <= {"dtype", "max_abs_diff", "max_abs_diff_float64"}:
        raise ValueError("check must be null or hold max_abs_diff and max_abs_diff_float64")
    check = {"max_abs_diff": _number(data["max_abs_diff"], "check.max_abs_diff")}
    check["max_abs_diff_float64"] = None if data["max_abs_diff_float64"] is None else \
        _number(data["max_abs_diff_float64"], "check.max_abs_diff_float64")
    if "dtype" in data:
        check["dtype"] = _text(data["dtype"], "check.dtype", 40)
    return check
