"""Reading checkpoint files: what ``torch.save`` or safetensors wrote, from a stranger or not.

:func:`read_checkpoint` is the one entry: it finds the format from the file's bytes, unpickles with
``torch.load(weights_only=True)`` unless the caller trusts the file, and returns the model or the
state_dict inside. The classes a pickled file names are allowed only when they are layer classes
(``nn.Module`` or ``Enum`` subclasses) of ``torch.nn``, torchvision or timm, plus ``functools.partial``
and a few harmless builtins; anything else needs ``trust_pickle=True``.
"""

from __future__ import annotations

import enum
import importlib
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from convify.errors import ModelLoadError

__all__ = ["read_checkpoint"]

# Training checkpoints often keep the model (or its state_dict) under one of these keys.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# nn.DataParallel and torch.compile prefix every key of the state_dicts they produce.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# What a pickled whole model may name: layer classes from these packages...
_PICKLE_PACKAGES = ("torch.nn.", "torchvision.", "timm.")
# ...except wrappers that start process groups,
_PICKLE_DENIED = ("torch.nn.parallel.",)
# ...and these, which build containers and never run code of the file's choosing.
_PICKLE_EXTRA = frozenset(
    {
        "collections.OrderedDict",
        "functools.partial",
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.range",
        "builtins.complex",
    }
)
_PICKLE_ROOTS = ("torch", "torchvision", "timm")
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
# torch.save's legacy (pre-1.6, non-zip) format opens with this number, pickled.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


def read_checkpoint(
    path: Union[str, Path], source: Optional[str] = None, trust_pickle: bool = False
) -> Union[nn.Module, dict[str, torch.Tensor]]:
    """The model or the state_dict a weights file holds.

    A file written by ``torch.save`` may hold a whole ``nn.Module`` or a state_dict (also nested under
    a ``"state_dict"``/``"model"`` key, with ``module.`` prefixes stripped); a ``.safetensors`` file
    holds a state_dict.

    Args:
        path: the file.
        source: the file as the user named it, for messages; ``str(path)`` when None.
        trust_pickle: unpickle with ``weights_only=False``, which runs any code the file holds.

    Returns:
        The module (on the CPU) or the state_dict (str -> tensor, on the CPU).

    Raises:
        ModelLoadError: the file is unreadable, in no format convify reads, pickles a class outside
            the allowlist, or holds neither a model nor a state_dict.
    """
    path = Path(path)
    name = str(path) if source is None else source
    return _unwrap_checkpoint(_read_checkpoint(path, name, trust_pickle), name)


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (torch's messages run to paragraphs)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def _read_checkpoint(path: Path, source: str, trust_pickle: bool) -> Any:
    """Read whatever a weights file holds, refusing pickled code unless trusted.

    Args:
        path: the file.
        source: the file as the user named it, for messages.
        trust_pickle: unpickle with ``weights_only=False``.

    Returns:
        The object in the file (a module, a mapping, ...), on the CPU.

    Raises:
        ModelLoadError: the file is not a torch.save or safetensors file, or it names a global
            outside the allowlist and trust_pickle is False.
    """
    kind = _file_format(path, source)
    if kind == "safetensors":
        return _read_safetensors(path, source)
    if trust_pickle:
        return _torch_load(path, source, weights_only=False)
    allowed = _legacy_safe_globals(path, source) if kind == "legacy" else _zip_safe_globals(path, source)
    with torch.serialization.safe_globals(allowed):
        return _torch_load(path, source, weights_only=True)


def _file_format(path: Path, source: str) -> str:
    """"safetensors", "zip" (torch.save's format) or "legacy" (its pre-1.6 format), from the bytes.

    Raises:
        ModelLoadError: the file is empty, TorchScript, or none of those formats.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    expected = "expected a file written by torch.save (a model or a state_dict) or a .safetensors file"
    if not head:
        raise ModelLoadError(f"{source} is empty; {expected}")
    if _is_safetensors(head):
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("constants.pkl") for n in names):
            raise ModelLoadError(
                f"{source} is a TorchScript archive; convify needs an eager model: "
                "save it with torch.save(model) or torch.save(model.state_dict())"
            )
        if not any(n.endswith("data.pkl") for n in names):
            raise ModelLoadError(f"{source} is a zip archive that torch.save did not write; {expected}")
        return "zip"
    if head[:1] == pickle.PROTO:
        return "legacy"
    raise ModelLoadError(f"{source} is not a PyTorch file (it starts with {head[:8]!r}); {expected}")


def _zip_safe_globals(path: Path, source: str) -> list[Any]:
    """The objects to allow for a weights_only load of a zip-format file.

    Raises:
        ModelLoadError: the file names a global that torch refuses by default and convify does
            not allow (the message names it), or the file is damaged.
    """
    try:
        # Only globals that torch itself would refuse are listed.
        named = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise ModelLoadError(f"{source} is damaged or not a torch.save file: {_first_line(e)}") from e
    allowed = []
    for name in sorted(named):
        obj = _allowed_global(name)
        if obj is None:
            raise _refused(source, name)
        allowed.append(obj)
    return allowed


def _legacy_safe_globals(path: Path, source: str) -> list[Any]:
    """The objects to allow for a weights_only load of a legacy-format file (state_dicts only).

    Raises:
        ModelLoadError: the file holds a whole model, which this format pickles with its source
            code, so only a trusted (weights_only=False) load can read it.
    """
    named = _legacy_globals(path, source)
    if any(isinstance(_allowed_global(n), type) for n in named if n not in _PICKLE_EXTRA):
        raise ModelLoadError(
            f"{source} holds a whole model in torch.save's pre-1.6 format, which cannot be loaded "
            "safely; re-run with --trust-pickle if you trust this file, or save its state_dict"
        )
    # Anything else torch refuses is named by its error, which _torch_load turns into _refused.
    return [obj for obj in map(_allowed_global, sorted(named)) if obj is not None]


def _torch_load(path: Path, source: str, weights_only: bool) -> Any:
    """torch.load onto the CPU, turning its errors into one-line ModelLoadErrors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        match = _UNSUPPORTED_GLOBAL.search(str(e))
        if weights_only and match:
            raise _refused(source, match.group(1)) from e
        hint = "; re-run with --trust-pickle if you trust this file" if weights_only else ""
        raise ModelLoadError(f"cannot unpickle {source}: {_first_line(e)}{hint}") from e
    except Exception as e:  # noqa: BLE001 - unpickling can raise anything; re-raised, chained
        raise ModelLoadError(f"cannot load {source}: {_first_line(e)}") from e


def _refused(source: str, name: str) -> ModelLoadError:
    """The error for a pickle global outside the allowlist."""
    if name.split(".")[0] in _PICKLE_ROOTS:
        return ModelLoadError(
            f"{source} pickles {name}, which is not a torch.nn/torchvision/timm layer class; "
            "re-run with --trust-pickle if you trust this file"
        )
    return ModelLoadError(
        f"{source} pickles class {name} which is not part of torch/torchvision/timm; "
        "re-run with --trust-pickle if you trust this file"
    )


def _allowed_global(name: str) -> Optional[Any]:
    """The object a pickle global names, if convify lets a weights_only load use it; else None.

    Allowed: ``_PICKLE_EXTRA``, and ``nn.Module``/``Enum`` subclasses defined under
    ``_PICKLE_PACKAGES`` (not ``_PICKLE_DENIED``). Nothing is imported before the name's package is
    checked, and the object must live where the name says (no reaching through attributes).
    """
    if name in _PICKLE_EXTRA:
        return _import_global(name)
    if not name.startswith(_PICKLE_PACKAGES) or name.startswith(_PICKLE_DENIED):
        return None
    obj = _import_global(name)
    if not (isinstance(obj, type) and issubclass(obj, (nn.Module, enum.Enum))):
        return None
    if f"{obj.__module__}.{obj.__qualname__}" != name:
        return None
    return obj


def _import_global(name: str) -> Optional[Any]:
    """Import ``package.module.Name`` (or ``package.module.Outer.Inner``); None if it is not there."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def _legacy_globals(path: Path, source: str) -> set[str]:
    """The globals named by the object pickle of a legacy (non-zip) torch.save file, unexecuted.

    That format is four pickles in a row (magic number, protocol, system info, the object) then raw
    storages; pickletools reads the opcodes without running any.
    """
    try:
        with open(path, "rb") as f:
            magic = [arg for op, arg, _ in pickletools.genops(f) if op.name in ("LONG1", "BININT")]
            if magic != [_LEGACY_MAGIC_NUMBER]:
                raise ModelLoadError(
                    f"{source} is a plain Python pickle, not a torch.save file; save it again with "
                    "torch.save(model) or torch.save(model.state_dict())"
                )
            for _ in range(2):  # protocol version, system info
                for _op in pickletools.genops(f):
                    pass
            return {
                str(arg).replace(" ", ".")
                for op, arg, _ in pickletools.genops(f)
                if op.name in ("GLOBAL", "INST")
            }
    except (ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ModelLoadError(f"{source} is damaged or not a torch.save file: {_first_line(e)}") from e


def _is_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes are a safetensors header (u64 length, then a JSON object)."""
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _read_safetensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors file (safetensors comes with timm)."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ModelLoadError(f"{source} is a safetensors file; pip install safetensors to read it") from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; chained
        raise ModelLoadError(f"cannot read {source}: {_first_line(e)}") from e


def _is_state_dict(obj: Any) -> bool:
    """Whether obj is a non-empty mapping of str to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrap_checkpoint(obj: Any, source: str) -> Union[nn.Module, dict[str, torch.Tensor]]:
    """The model or state_dict inside what a file holds, looking one level into checkpoint dicts.

    Raises:
        ModelLoadError: neither a module nor a state_dict is there; the message says what was.
    """
    if isinstance(obj, nn.Module):
        return obj
    if _is_state_dict(obj):
        return _strip_wrapper_prefixes(obj)
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner
            if _is_state_dict(inner):
                return _strip_wrapper_prefixes(inner)
        keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
        raise ModelLoadError(
            f"{source} holds a dict (keys {keys}) with no model or state_dict in it; "
            "expected an nn.Module or a dict of tensors saved with torch.save"
        )
    raise ModelLoadError(
        f"{source} holds a {type(obj).__name__}, not a model; "
        "expected an nn.Module or a state_dict (a dict of tensors) saved with torch.save"
    )


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` / ``_orig_mod.`` prefixes that DataParallel and torch.compile add."""
    result = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in result):
                result = {k[len(prefix) :]: v for k, v in result.items()}
                changed = True
    return result
