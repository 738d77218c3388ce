"""Where a network runs and in what precision: ``device=`` / ``--device`` and ``precision=`` / ``--precision``.

- **device**: ``"cpu"``, ``"cuda"`` (``"cuda:1"``), ``"mps"`` or a ``torch.device``; None: where the network's
  weights already are. A network is copied to the device once (cached per network and device): the module a
  caller passed is never moved.
- **precision**: ``"float32"`` (the default: the converted network's own arithmetic, checked against the
  original), ``"bfloat16"`` (CPU and GPU) or ``"float16"`` (GPU). The reduced ones run under
  ``torch.autocast`` (convolutions and matrix products in the low precision, reductions and softmax-like ops
  in float32, as PyTorch's autocast lists say); the map comes back as float32. They change the scores:
  ``convify bench --precision`` measures by how much (top-1 agreement per cell, largest logit difference), and
  a map with a non-finite score is refused (:func:`check_finite`), never returned.

Opt-in only: convify never lowers the precision by itself.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Iterator, Optional, Union

import torch

from .errors import ConvifyError
from .fcn import FullyConvNet

__all__ = ["PRECISIONS", "resolve_device", "resolve_precision", "check_precision", "on_device", "autocast",
           "check_finite"]

# precision name -> (autocast dtype or None for none, the devices it is offered on, aliases)
PRECISIONS: dict[str, tuple[Optional[torch.dtype], tuple[str, ...], tuple[str, ...]]] = {
    "float32": (None, ("cpu", "cuda", "mps"), ("fp32",)),
    "bfloat16": (torch.bfloat16, ("cpu", "cuda", "mps"), ("bf16",)),
    "float16": (torch.float16, ("cuda", "mps"), ("fp16", "half")),
}

DeviceLike = Union[str, torch.device, None]

_COPIES: "weakref.WeakKeyDictionary[FullyConvNet, dict[str, FullyConvNet]]" = weakref.WeakKeyDictionary()


def resolve_precision(precision: Optional[str]) -> str:
    """The canonical name (``"bf16"`` -> ``"bfloat16"``); None is ``"float32"``.

    Raises:
        ConvifyError: an unknown name.
    """
    if precision is None:
        return "float32"
    if isinstance(precision, str):
        for name, (_, _, aliases) in PRECISIONS.items():
            if precision.lower() == name or precision.lower() in aliases:
                return name
    raise ConvifyError(f"precision must be one of {', '.join(PRECISIONS)} (or bf16, fp16); got {precision!r:.40}")


def resolve_device(device: DeviceLike, fcn: Optional[FullyConvNet] = None) -> torch.device:
    """The ``torch.device`` for ``device`` (None: where ``fcn``'s weights are, else the CPU).

    Raises:
        ConvifyError: a name torch does not know, or a device this machine does not have.
    """
    if device is None:
        param = next(iter(fcn.parameters()), None) if fcn is not None else None
        return param.device if param is not None else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConvifyError(f"unknown device {str(device)!r:.40}; use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConvifyError("CUDA is not available here (torch.cuda.is_available() is False: no NVIDIA GPU, or a "
                               "CPU-only torch build); use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConvifyError(f"there is no {resolved} (this machine has {torch.cuda.device_count()} CUDA devices)")
    elif resolved.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConvifyError("MPS is not available here (it needs an Apple-silicon Mac and a torch built with it); "
                               "use --device cpu")
    elif resolved.type != "cpu":
        raise ConvifyError(f"convify runs on cpu, cuda or mps; got {str(device)!r:.40}")
    return resolved


def on_device(fcn: FullyConvNet, device: DeviceLike) -> FullyConvNet:
    """``fcn`` on ``device``: itself if it is there already, else a copy made once and cached."""
    target = resolve_device(device, fcn)
    if resolve_device(None, fcn) == target:
        return fcn
    copies = _COPIES.setdefault(fcn, {})
    key = str(target)
    if key not in copies:
        copies[key] = copy.deepcopy(fcn).to(target).eval()
    return copies[key]


def check_precision(device: torch.device, precision: Optional[str]) -> str:
    """The canonical name of ``precision`` (see :func:`resolve_precision`), if ``device`` offers it.

    Raises:
        ConvifyError: an unknown precision, or one not offered on that device (float16 on the CPU).
    """
    name = resolve_precision(precision)
    devices = PRECISIONS[name][1]
    if device.type not in devices:
        raise ConvifyError(f"{name} is for {' and '.join(devices)} devices, not {device.type}"
                           + ("; on the CPU use bfloat16" if device.type == "cpu" else ""))
    return name


@contextlib.contextmanager
def autocast(device: torch.device, precision: Optional[str]) -> Iterator[None]:
    """Run the block in ``precision`` on ``device`` (float32: unchanged).

    Raises:
        ConvifyError: as :func:`check_precision`.
    """
    dtype = PRECISIONS[check_precision(device, precision)][0]
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def check_finite(scores: torch.Tensor, precision: str) -> None:
    """Refuse a map with a NaN or infinite score, saying how many and what to do.

    Raises:
        ConvifyError: some score is not finite.
    """
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        what = "the network's weights or input" if precision == "float32" else \
            f"{precision} overflowed or lost the scores: run in float32 (leave out --precision)"
        raise ConvifyError(f"{bad} of {scores.numel()} scores are not finite (NaN or infinity); {what}")
