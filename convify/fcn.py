"""The converted network: an ``nn.Module`` with its geometry and metadata, saved as plain data."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, NamedTuple, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from .errors import ModelLoadError, OutputExistsError
from .geometry import Geometry
from .outputs import write_atomic
from .serialize import graph_from_data, graph_to_data

__all__ = ["FullyConvNet", "ModelMeta", "Rewrite", "load", "is_convify_file"]

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
        net: the rewritten graph (a ``torch.fx.GraphModule``).
        geometry: where every cell lies (:class:`~convify.geometry.Geometry`).
        meta: architecture, native input size, preprocessing and class names (:class:`ModelMeta`).
        rewrites: what convert changed, layer by layer.
        check: how the conversion was checked against the original at the native size (None if it was not):
            ``{"dtype": ..., "max_abs_diff": float32 difference, "max_abs_diff_float64": ... or None}``.
    """

    def __init__(self, net: fx.GraphModule, geometry: Geometry, meta: ModelMeta,
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
            "format": FORMAT, "version": VERSION, "graph": json.loads(description),
            "geometry": self.geometry.to_dict(), "meta": asdict(self.meta),
            "rewrites": [list(r) for r in self.rewrites], "check": self.check,
        }
        payload = {"convify": json.dumps(header), "tensors": tensors}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(payload, f))
        return path


def is_convify_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a file written by :meth:`FullyConvNet.save` (read safely, weights_only).

    The file is memory-mapped, so asking about a large model reads its header, not its weights.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("convify"), str)


def load(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> FullyConvNet:
    """Read a file written by :meth:`FullyConvNet.save`. Runs no code from the file.

    The file is read with ``torch.load(..., weights_only=True)`` and its graph rebuilt from an allowlist of
    operations, so it loads without the original model's classes and refuses anything else.

    Raises:
        ModelLoadError: the file does not exist, is not a convify file, or names a disallowed operation.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such file: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(f"{path} is not a convify file ({reason}); "
                             "convert a model first with `convify convert`") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("convify"), str) \
            or not isinstance(payload.get("tensors"), dict):
        raise ModelLoadError(f"{path} is not a convify file; convert a model first with `convify convert`")
    try:
        header = json.loads(payload["convify"])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ModelLoadError(f"{path} is not a convify file; convert a model first with `convify convert`")
        if header.get("version") != VERSION:
            raise ModelLoadError(f"{path} was written by another version of convify (format "
                                 f"{header.get('version')}); convert the model again")
        meta = header["meta"]
        meta = ModelMeta(**{**meta, "mean": tuple(meta["mean"]), "std": tuple(meta["std"])})
        geometry = Geometry.from_dict(header["geometry"])
        rewrites = [Rewrite(*r) for r in header.get("rewrites", [])]
        graph = json.dumps(header["graph"])
        net = graph_from_data(graph, payload["tensors"])
    except ModelLoadError:
        raise
    except Exception as e:  # any other shape of header is damage: say so, whatever Python raised
        raise ModelLoadError(f"{path} is a corrupt convify file ({type(e).__name__}: {e})") from None
    return FullyConvNet(net, geometry, meta, rewrites, header.get("check"))
