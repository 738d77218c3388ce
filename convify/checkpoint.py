"""Reading checkpoint files: what ``torch.save`` or safetensors wrote, from a stranger or not.

:func:`read_checkpoint` is the one entry. A weights file is hostile input; it is read in this order,
and any failure is one :class:`~convify.errors.ModelLoadError` (or a
:class:`~convify.errors.LimitError` for a bound of :mod:`convify.limits`) with a one-line message:

1. The format comes from the bytes, never the suffix: safetensors, a torch.save zip, torch.save's
   pre-1.6 pickle format. TorchScript archives, plain pickles and anything else are refused.
2. Structure before content: a safetensors header is parsed and bounded (size, entries, dtypes, shapes,
   offsets) before a tensor is read; a zip's entries are counted, must be stored uncompressed and
   have their CRC-32 checked, in bounded chunks, before torch reads them (torch does not check them);
   a pickle's size is bounded and its globals are listed by reading its opcodes, never running them.
3. Unpickling is ``torch.load(weights_only=True)`` unless the caller trusts the file, whatever the
   environment says (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is hidden from torch for that call). The
   classes a file names are allowed only when they are layer classes (``nn.Module`` or ``Enum``
   subclasses) of ``torch.nn``, torchvision or timm, plus ``functools.partial`` and a few harmless
   builtins; a pre-1.6 file may hold a state_dict only.
4. Every tensor is checked before anyone computes with it: dense, on the CPU, no dimension repeated by a
   zero stride, no more elements than its storage holds, finite values; the layers of a whole model
   nest boundedly and without cycles, and their sizes agree with their weights; parameters and classes
   stay within :data:`~convify.limits.MAX_PARAMETERS` and :data:`~convify.limits.MAX_CLASSES`.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import json
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Optional, Union

import torch
from torch import nn

from convify import limits
from convify.errors import ConvifyError, LimitError, ModelLoadError

__all__ = ["read_checkpoint", "read_data_file", "check_tensors"]

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
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
# torch.save's legacy (pre-1.6, non-zip) format opens with this number, pickled.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
# What torch.load reads to turn weights_only=True into False behind its caller's back (torch < 2.6
# honoured it even when weights_only=True was passed); hidden from torch while convify loads.
_UNSAFE_LOAD_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# Entries of a torch.save zip besides one per storage (data.pkl, version, byteorder, ...).
_ZIP_EXTRA_ENTRIES = 16
# Bytes read at a time when checking a zip entry's CRC: memory stays bounded for any entry size.
_CRC_CHUNK = 1 << 20
# Element sizes of the safetensors dtypes (a dtype not listed is refused).
_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
_EXPECTED = "expected a file written by torch.save (a model or a state_dict) or a .safetensors file"


def read_checkpoint(
    path: Union[str, Path], source: Optional[str] = None, trust_pickle: bool = False
) -> Union[nn.Module, dict[str, torch.Tensor]]:
    """The model or the state_dict a weights file holds, read as hostile input (see the module docs).

    A file written by ``torch.save`` may hold a whole ``nn.Module`` or a state_dict (also nested under
    a ``"state_dict"``/``"model"`` key, with ``module.`` prefixes stripped); a ``.safetensors`` file
    holds a state_dict. The format is read from the file's first bytes, not its name.

    Args:
        path: the file.
        source: the file as the user named it, for messages; ``str(path)`` when None.
        trust_pickle: unpickle with ``weights_only=False``, which runs any code the file holds. The
            file's structure and tensors are checked all the same.

    Returns:
        The module (on the CPU, its mode as saved) or the state_dict (str -> tensor, on the CPU).

    Raises:
        ModelLoadError: the file is missing, unreadable or damaged (a CRC mismatch, a truncated entry),
            in no format convify reads (TorchScript, a plain pickle, ...), pickles a class outside the
            allowlist, holds neither a model nor a state_dict, or holds a malformed tensor (a zero
            stride, more elements than its storage, NaN or Inf values). Reading out of memory is one
            too. Never any other exception.
        LimitError: the file asks for more than :mod:`convify.limits` allows (tensors, pickle bytes,
            header bytes, parameters, classes, layer nesting).

    Example::

        >>> state = read_checkpoint("resnet18.pth")
        >>> state["fc.weight"].shape
        torch.Size([1000, 512])
    """
    path = Path(path)
    name = str(path) if source is None else source

    def read() -> Union[nn.Module, dict[str, torch.Tensor]]:
        found = _unwrap_checkpoint(_read_checkpoint(path, name, trust_pickle), name)
        check_tensors(found, name)
        return found

    return _guarded(path, name, read)


def read_data_file(path: Union[str, Path], source: Optional[str] = None) -> Any:
    """The plain data a ``torch.save`` zip holds (dicts, lists, strings, numbers, tensors), read as hostile input.

    For files convify writes itself (converted networks): the zip is checked as :func:`read_checkpoint`
    checks it (entries, sizes, CRC-32s), then unpickled with ``weights_only=True`` and no class allowed
    beyond torch's own. Tensors are not checked here: :func:`check_tensors` does that.

    Raises:
        ModelLoadError: the file is missing, not a torch.save zip, damaged, or pickles any class; reading
            it runs out of memory.
        LimitError: it has more entries or a larger pickle than :mod:`convify.limits` allows.
    """
    path = Path(path)
    name = str(path) if source is None else source

    def read() -> Any:
        if _file_format(path, name) != "zip":
            raise ModelLoadError(f"{name} is not a file torch.save writes today (a zip)")
        _check_zip(path, name)
        return _torch_load(path, name, weights_only=True)

    return _guarded(path, name, read)


def _guarded(path: Path, name: str, read: Any) -> Any:
    """``read()``, with every failure turned into one ConvifyError line (memory errors after unwinding)."""
    failure: Optional[ConvifyError] = None
    try:
        if not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file" if path.exists() else "missing"
            raise ModelLoadError(f"{name} is {what}; {_EXPECTED}")
        return read()
    except ConvifyError:
        raise
    except MemoryError:
        # Raised below, outside this block, so that the frames holding what was read are freed first.
        failure = ModelLoadError(f"out of memory while reading {name}: the file asks for more memory than "
                                 "is available; it is damaged or crafted, or too large for this machine")
    except RecursionError:
        failure = ModelLoadError(f"{name} nests objects too deeply to read; it is damaged or crafted")
    except OSError as e:
        raise ModelLoadError(f"cannot read {name}: {e.strerror or _first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - a damaged file makes zipfile/pickle/torch raise anything
        raise ModelLoadError(f"{name} is damaged or not a PyTorch file: {type(e).__name__}: "
                             f"{_first_line(e)}") from e
    raise failure


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (torch's messages run to paragraphs)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(error).__name__


# --- formats ---------------------------------------------------------------------------------


def _read_checkpoint(path: Path, source: str, trust_pickle: bool) -> Any:
    """Read whatever a weights file holds, refusing pickled code unless trusted.

    Args:
        path: the file.
        source: the file as the user named it, for messages.
        trust_pickle: unpickle with ``weights_only=False``.

    Returns:
        The object in the file (a module, a mapping, ...), on the CPU.

    Raises:
        ModelLoadError: the file is not a torch.save or safetensors file, is damaged, or names a
            global outside the allowlist and trust_pickle is False.
        LimitError: as the checks of each format raise.
    """
    kind = _file_format(path, source)
    if kind == "safetensors":
        return _read_safetensors(path, source)
    if kind == "zip":
        _check_zip(path, source)
    else:
        named = _legacy_globals(path, source, check_storages=not trust_pickle)
    if trust_pickle:
        return _torch_load(path, source, weights_only=False)
    allowed = _legacy_safe_globals(named, source) if kind == "legacy" else _zip_safe_globals(path, source)
    with torch.serialization.safe_globals(allowed):
        return _torch_load(path, source, weights_only=True)


def _file_format(path: Path, source: str) -> str:
    """"safetensors", "zip" (torch.save's format) or "legacy" (its pre-1.6 format), from the first bytes.

    Raises:
        ModelLoadError: the file is empty or in none of those formats.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ModelLoadError(f"{source} is empty; {_EXPECTED}")
    if _is_safetensors(head):
        return "safetensors"
    if head[:4] == b"PK\x03\x04":  # torch reads a zip only when it starts so (its _is_zipfile)
        return "zip"
    if head[:1] == pickle.PROTO:
        return "legacy"
    raise ModelLoadError(f"{source} is not a PyTorch file (it starts with {head[:8]!r}); {_EXPECTED}")


def _check_zip(path: Path, source: str) -> None:
    """Check a torch.save zip before torch reads it: its entries, their count, sizes and CRC-32s.

    torch's zip reader checks no CRC, so changed weights would load silently; here every entry is read
    through :mod:`zipfile`, which checks the CRC at the end of each entry, a chunk at a time.

    Raises:
        ModelLoadError: not a zip torch.save writes (TorchScript, no data.pkl, compressed, encrypted,
            duplicate or scattered entries), or damaged (truncated, CRC mismatch).
        LimitError: more entries than :data:`~convify.limits.MAX_TENSORS` allows, or a data.pkl over
            :data:`~convify.limits.MAX_PICKLE_BYTES`.
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"{source} is damaged: not a readable zip archive ({_first_line(e)})") from e
    with archive:
        entries = archive.infolist()
        if len(entries) > limits.MAX_TENSORS + _ZIP_EXTRA_ENTRIES:
            raise LimitError(f"{source} holds {len(entries)} zip entries; convify reads at most "
                             f"{limits.MAX_TENSORS} tensors (convify.limits.MAX_TENSORS)")
        names = [e.filename for e in entries]
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise ModelLoadError(
                f"{source} is a TorchScript archive; convify needs an eager model: "
                "save it with torch.save(model) or torch.save(model.state_dict())"
            )
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ModelLoadError(f"{source} is a zip archive that torch.save did not write; {_EXPECTED}")
        root = pickles[0][: -len("data.pkl")]
        if len(set(names)) != len(names) or any(not n.startswith(root) for n in names):
            raise ModelLoadError(f"{source} is a zip archive that torch.save did not write: duplicate or "
                                 f"scattered entries; {_EXPECTED}")
        for entry in entries:
            if entry.flag_bits & 0x1:
                raise ModelLoadError(f"{source} has an encrypted entry {entry.filename!r}; torch.save "
                                     "never encrypts")
            if entry.compress_type != zipfile.ZIP_STORED:
                raise ModelLoadError(f"{source} has a compressed entry {entry.filename!r}; torch.save "
                                     "stores entries uncompressed (was the file re-zipped?)")
            if entry.filename == pickles[0] and entry.file_size > limits.MAX_PICKLE_BYTES:
                raise LimitError(f"{source}: its pickle is {entry.file_size} bytes; convify reads at most "
                                 f"{limits.MAX_PICKLE_BYTES} (convify.limits.MAX_PICKLE_BYTES)")
        for entry in entries:
            _check_crc(archive, entry, source)


def _check_crc(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, source: str) -> None:
    """Read one zip entry to its end in chunks; zipfile compares the CRC-32 there.

    Raises:
        ModelLoadError: the CRC differs (the bytes were changed) or the entry is cut short.
    """
    try:
        with archive.open(entry) as stream:
            while stream.read(_CRC_CHUNK):
                pass
    except zipfile.BadZipFile as e:
        if "CRC" in str(e):
            raise ModelLoadError(f"{source} is damaged: CRC mismatch in entry {entry.filename!r} (its bytes "
                                 "were changed after torch.save wrote them)") from e
        raise ModelLoadError(f"{source} is damaged: entry {entry.filename!r}: {_first_line(e)}") from e
    except EOFError as e:
        raise ModelLoadError(f"{source} is damaged: entry {entry.filename!r} is cut short") from e


def _zip_safe_globals(path: Path, source: str) -> list[Any]:
    """The objects to allow for a weights_only load of a zip-format file.

    Raises:
        ModelLoadError: the file names a global that torch refuses by default and convify does
            not allow (the message names it), or the file is damaged.
    """
    # Only globals that torch itself would refuse are listed; their opcodes are read, not run.
    named = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed = []
    for name in sorted(named):
        obj = _allowed_global(name)
        if obj is None:
            raise _refused(source, name)
        allowed.append(obj)
    return allowed


def _legacy_safe_globals(named: set[str], source: str) -> list[Any]:
    """The objects to allow for a weights_only load of a legacy-format file (state_dicts only).

    Args:
        named: the globals its object pickle names (:func:`_legacy_globals`).
        source: the file as the user named it, for messages.

    Raises:
        ModelLoadError: the file holds a whole model, which this format pickles with its source
            code, so only a trusted (weights_only=False) load can read it; or it names a global that
            neither torch's weights_only loader nor convify allows (named in the message).
    """
    if _names_a_layer(named):
        raise ModelLoadError(
            f"{source} holds a whole model in torch.save's pre-1.6 format, which cannot be loaded "
            "safely; re-run with --trust-pickle if you trust this file, or save its state_dict"
        )
    from torch._weights_only_unpickler import _get_allowed_globals

    torch_allows = _get_allowed_globals()
    allowed = []
    for name in sorted(named):
        obj = _allowed_global(name)
        if obj is not None:
            allowed.append(obj)
        elif _python3_name(name) not in torch_allows:
            raise _refused(source, name)
    return allowed


def _names_a_layer(named: set[str]) -> bool:
    """Whether a pickle names a layer class (then it holds a whole model, not a state_dict)."""
    return any(isinstance(_allowed_global(n), type) for n in named if n not in _PICKLE_EXTRA)


@contextlib.contextmanager
def _safe_environment() -> Iterator[None]:
    """Hide ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` from torch.load for the duration of one load.

    torch.load reads it from ``os.environ`` at each call and, when set, may turn a weights_only load
    into a full unpickling that runs the file's code. convify's own loads decide that by
    ``trust_pickle`` alone.
    """
    saved = os.environ.pop(_UNSAFE_LOAD_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[_UNSAFE_LOAD_ENV] = saved


def _torch_load(path: Path, source: str, weights_only: bool) -> Any:
    """torch.load onto the CPU, turning its errors into one-line ModelLoadErrors."""
    try:
        with _safe_environment():
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=False)
    except pickle.UnpicklingError as e:
        match = _UNSUPPORTED_GLOBAL.search(str(e))
        if weights_only and match:
            raise _refused(source, match.group(1)) from e
        hint = "; re-run with --trust-pickle if you trust this file" if weights_only else ""
        raise ModelLoadError(f"cannot unpickle {source}: {_first_line(e)}{hint}") from e
    except (MemoryError, RecursionError, OSError):
        raise  # read_checkpoint words these
    except Exception as e:  # noqa: BLE001 - unpickling can raise anything; re-raised, chained
        if isinstance(e, RuntimeError) and "allocate" in str(e):  # torch's allocator failing
            raise MemoryError from e
        raise ModelLoadError(f"cannot load {source}: {type(e).__name__}: {_first_line(e)}") from e


def _refused(source: str, name: str) -> ModelLoadError:
    """The error for a pickle global outside the allowlist."""
    name = _python3_name(name)
    if name.split(".")[0] in _PICKLE_ROOTS:
        return ModelLoadError(
            f"{source} pickles {name}, which is not a torch.nn/torchvision/timm layer class; "
            "re-run with --trust-pickle if you trust this file"
        )
    return ModelLoadError(
        f"{source} pickles class {name} which is not part of torch/torchvision/timm; "
        "re-run with --trust-pickle if you trust this file"
    )


def _python3_name(name: str) -> str:
    """A pickle global as Python 3 imports it: protocol 2 writes ``__builtin__.eval`` for ``builtins.eval``."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{attr}" if module else name


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


class _Bounded:
    """A read-only view of a file that never reads past its end or a byte budget.

    pickletools reads the length an opcode claims at once (``f.read(n)``); clamping ``n`` to what is
    left turns a crafted length into a short read (an error) instead of a many-GB allocation.
    """

    def __init__(self, f: IO[bytes], end: int) -> None:
        self._f = f
        self.end = end

    def read(self, n: int = -1) -> bytes:
        left = max(self.end - self._f.tell(), 0)
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._f.readline(max(self.end - self._f.tell(), 0))

    def tell(self) -> int:
        return self._f.tell()


def _legacy_globals(path: Path, source: str, check_storages: bool) -> set[str]:
    """The globals named by the object pickle of a legacy (non-zip) torch.save file, unexecuted.

    That format is four pickles in a row (magic number, protocol, system info, the object) then raw
    storages; pickletools reads the opcodes without running any.

    Args:
        path: the file.
        source: the file as the user named it, for messages.
        check_storages: require every persistent record to be a storage whose size is a literal that
            the file can hold (:func:`_claimed_elements`). A state_dict's records all are; a whole
            model's also pickle its classes' source code, and only a trusted load reads those.

    Raises:
        ModelLoadError: not a torch.save file (a plain pickle), damaged, or a storage record claims
            more than the file holds.
        LimitError: the object pickle is over :data:`~convify.limits.MAX_PICKLE_BYTES`.
    """
    size = path.stat().st_size
    with open(path, "rb") as raw:
        f = _Bounded(raw, size)
        try:
            magic = [arg for op, arg, _ in pickletools.genops(f) if op.name in ("LONG1", "BININT")]
            if magic != [_LEGACY_MAGIC_NUMBER]:
                raise ModelLoadError(
                    f"{source} is a plain Python pickle, not a torch.save file; save it again with "
                    "torch.save(model) or torch.save(model.state_dict())"
                )
            for _ in range(2):  # protocol version, system info
                for _op in pickletools.genops(f):
                    pass
            f.end = min(size, f.tell() + limits.MAX_PICKLE_BYTES)
            named: set[str] = set()
            recent: list[tuple[str, Any]] = []
            claimed, odd = 0, False
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    named.add(str(arg).replace(" ", "."))
                elif op.name == "BINPERSID" and check_storages:
                    numel = _claimed_elements(recent)
                    odd = odd or numel is None
                    claimed += numel or 0
                    if claimed > size:
                        raise ModelLoadError(f"{source} is damaged: its storages claim {claimed} elements, more "
                                             f"than the file's {size} bytes hold")
                if op.name not in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                    recent = (recent + [(op.name, arg)])[-3:]
            if odd and not _names_a_layer(named):  # a whole model is refused, as such, by the caller
                raise ModelLoadError(f"{source} is damaged or crafted: a storage record is not as torch.save "
                                     "writes it")
            return named
        except ConvifyError:
            raise
        except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError, OverflowError) as e:
            if f.end < size and raw.tell() >= f.end:
                raise LimitError(f"{source}: its pickle is over {limits.MAX_PICKLE_BYTES} bytes; convify "
                                 "reads at most that (convify.limits.MAX_PICKLE_BYTES)") from e
            raise ModelLoadError(f"{source} is damaged or not a torch.save file: {_first_line(e)}") from e


def _claimed_elements(recent: list[tuple[str, Any]]) -> Optional[int]:
    """The number of elements a legacy storage record claims, from the opcodes before its BINPERSID.

    torch.save pickles each storage as ``('storage', StorageType, key, location, numel, None)``: a
    tuple that ends with a literal int and None (ints are never memoised). torch allocates that many
    elements before it reads any, so the claim is checked against the file's size first.

    Args:
        recent: the last three opcodes (name, argument) before BINPERSID, memo stores left out.

    Returns:
        The claim, or None when the record is not such a tuple.
    """
    ints = ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG")
    names = [name for name, _ in recent]
    if len(names) == 3 and names[0] in ints and names[1:] == ["NONE", "TUPLE"]:
        numel = recent[0][1]
        if isinstance(numel, int) and numel >= 0:
            return numel
    return None


def _is_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes are a safetensors header (u64 length, then a JSON object)."""
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _read_safetensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors file, its header checked first (safetensors comes with timm).

    Raises:
        ModelLoadError: safetensors is missing, or the header or the data is malformed.
        LimitError: as :func:`_check_safetensors_header` raises.
    """
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ModelLoadError(f"{source} is a safetensors file; pip install safetensors to read it") from e
    _check_safetensors_header(path, source)
    try:
        return load_file(str(path), device="cpu")
    except (MemoryError, OSError):
        raise  # read_checkpoint words these
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; chained
        raise ModelLoadError(f"cannot read {source}: {_first_line(e)}") from e


def _check_safetensors_header(path: Path, source: str) -> None:
    """Bound and check a safetensors header before the library reads any tensor.

    The header is ``u64 length`` then that many bytes of JSON: ``{name: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {...}}``; offsets count from the end of the header.

    Raises:
        ModelLoadError: the header is cut short, not JSON, or an entry's dtype, shape or offsets are
            malformed or outside the file.
        LimitError: the header is over :data:`~convify.limits.MAX_HEADER_BYTES`, or the entries over
            :data:`~convify.limits.MAX_TENSORS` or their elements over :data:`~convify.limits.MAX_PARAMETERS`.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > limits.MAX_HEADER_BYTES:
            raise LimitError(f"{source}: its safetensors header claims {length} bytes; convify reads at most "
                             f"{limits.MAX_HEADER_BYTES} (convify.limits.MAX_HEADER_BYTES)")
        if 8 + length > size:
            raise ModelLoadError(f"{source} is damaged: its safetensors header claims {length} bytes but the "
                                 f"file has {size}")
        text = f.read(length)
    damaged = f"{source} is damaged: its safetensors header is malformed"
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{damaged} ({_first_line(e)})") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{damaged} (not a JSON object)")
    header.pop("__metadata__", None)
    if len(header) > limits.MAX_TENSORS:
        raise LimitError(f"{source} holds {len(header)} tensors; convify reads at most {limits.MAX_TENSORS} "
                         "(convify.limits.MAX_TENSORS)")
    data = size - 8 - length
    total = 0
    for name, entry in header.items():
        where = f"{damaged} (entry {ascii(name)[:80]}"
        if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{where}: no known dtype)")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape) or len(shape) > 64:
            raise ModelLoadError(f"{where}: bad shape)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise ModelLoadError(f"{where}: bad data_offsets)")
        numel = 1
        for d in shape:
            numel *= d
        total += numel
        if total > limits.MAX_PARAMETERS:
            raise LimitError(f"{source} holds over {limits.MAX_PARAMETERS} weights; convify reads at most "
                             "that (convify.limits.MAX_PARAMETERS)")
        begin, end = offsets
        if not begin <= end <= data or end - begin != numel * _SAFETENSORS_DTYPES[entry["dtype"]]:
            raise ModelLoadError(f"{where}: its data_offsets do not fit its shape or the file)")


def _is_count(value: Any) -> bool:
    """Whether a JSON value is a non-negative integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- tensors ---------------------------------------------------------------------------------


def check_tensors(found: Union[nn.Module, Mapping[str, torch.Tensor]], source: str) -> None:
    """Check every tensor in a model or state_dict before anything computes with it.

    For a model: every parameter, buffer and tensor attribute of every layer, and the layers'
    nesting and sizes (:func:`_module_tensors`).

    Raises:
        ModelLoadError: a tensor is malformed (:func:`_check_tensor`), or a layer disagrees with its
            weights.
        LimitError: more tensors than :data:`~convify.limits.MAX_TENSORS`, more elements than
            :data:`~convify.limits.MAX_PARAMETERS`, more classes than :data:`~convify.limits.MAX_CLASSES`,
            or layers nested deeper than :data:`~convify.limits.MAX_MODULE_DEPTH`.
    """
    named = _module_tensors(found, source) if isinstance(found, nn.Module) else iter(found.items())
    total = 0
    seen: set[int] = set()
    for count, (name, tensor) in enumerate(named, start=1):
        if count > limits.MAX_TENSORS:
            raise LimitError(f"{source} holds over {limits.MAX_TENSORS} tensors; convify reads at most that "
                             "(convify.limits.MAX_TENSORS)")
        if id(tensor) in seen:  # a tensor shared by two layers is checked and counted once
            continue
        seen.add(id(tensor))
        _check_tensor(tensor, name, source)
        total += tensor.numel()
        if total > limits.MAX_PARAMETERS:
            raise LimitError(f"{source} holds over {limits.MAX_PARAMETERS} weights; convify reads at most "
                             "that (convify.limits.MAX_PARAMETERS)")


def _check_tensor(tensor: torch.Tensor, name: str, source: str) -> None:
    """Refuse a tensor that claims more than it holds, or holds NaN or Inf.

    Raises:
        ModelLoadError: the tensor is not dense and on the CPU; a dimension of size > 1 has stride 0
            (an expanded view: one stored row claiming millions); its shape, strides and offset reach
            past its storage or count more elements than the storage holds; or it has NaN/Inf values.
    """
    label = f"{source}: tensor {ascii(name)[:120]}"
    if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided \
            or tensor.device.type != "cpu" or tensor.is_quantized:
        raise ModelLoadError(f"{label} is not a dense CPU tensor ({type(tensor).__name__}, {tensor.layout}, "
                             f"{tensor.device}); convify reads plain weights only")
    shape, strides = tuple(tensor.shape), tensor.stride()
    if any(size > 1 and stride == 0 for size, stride in zip(shape, strides)):
        raise ModelLoadError(f"{label} of shape {shape} repeats its data with a zero stride {strides}, "
                             "an expanded view that is not real weights; the file is crafted or damaged")
    if tensor.numel() == 0:
        return
    itemsize = tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    reach = (tensor.storage_offset() + sum((s - 1) * st for s, st in zip(shape, strides)) + 1) * itemsize
    if reach > held or tensor.numel() * itemsize > held:
        raise ModelLoadError(f"{label} of shape {shape} claims {tensor.numel()} elements but its storage "
                             f"holds {held // itemsize}; the file is crafted or damaged")
    if (tensor.is_floating_point() or tensor.is_complex()) and not _all_finite(tensor):
        raise ModelLoadError(f"{label} holds NaN or Inf values; the weights are damaged")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite.

    A sum is finite only when every value is (NaN and Inf propagate), and summing is several times
    faster than ``isfinite``; only when the sum overflows are the values checked one by one, in slices
    of the first dimension so that the extra memory stays bounded.
    """
    with torch.no_grad():
        values = tensor.detach()
        if values.is_complex():
            values = torch.view_as_real(values)
        if bool(torch.isfinite(values.sum())):
            return True
        if values.dim() == 0:
            return False
        step = max(1, (1 << 24) // max(1, values[0].numel()))
        return all(bool(torch.isfinite(values[i : i + step]).all()) for i in range(0, values.shape[0], step))


def _module_tensors(model: nn.Module, source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a model with its dotted name, walking its layers without recursion.

    Layers are checked on the way: nesting depth, cycles (a layer inside itself), and that a Linear or
    Conv layer's sizes are its weight's and its number of outputs is within MAX_CLASSES.

    Raises:
        ModelLoadError: a layer contains itself, or its sizes disagree with its weight.
        LimitError: nesting deeper than MAX_MODULE_DEPTH, or a classifier over MAX_CLASSES outputs.
    """
    stack: list[tuple[str, nn.Module, tuple[int, ...]]] = [("", model, ())]
    done: set[int] = set()
    while stack:
        prefix, module, path = stack.pop()
        if id(module) in path:
            raise ModelLoadError(f"{source}: layer {ascii(prefix)[:120]} contains itself; the file is crafted")
        if len(path) > limits.MAX_MODULE_DEPTH:
            raise LimitError(f"{source}: its layers nest over {limits.MAX_MODULE_DEPTH} deep; convify reads at "
                             "most that (convify.limits.MAX_MODULE_DEPTH)")
        if id(module) in done:
            continue
        done.add(id(module))
        if not isinstance(module, nn.Module):
            raise ModelLoadError(f"{source}: layer {ascii(prefix)[:120]} is a {type(module).__name__}, not a "
                                 "layer; the file is crafted or damaged")
        _check_layer(module, prefix or type(module).__name__, source)
        dot = f"{prefix}." if prefix else ""
        tables = (module.__dict__.get("_parameters", {}), module.__dict__.get("_buffers", {}), module.__dict__)
        for table in tables:
            for key, value in list(table.items()):
                if isinstance(value, torch.Tensor):
                    yield f"{dot}{key}", value
        for key, child in module.__dict__.get("_modules", {}).items():
            if child is not None:
                stack.append((f"{dot}{key}", child, path + (id(module),)))


def _check_layer(module: nn.Module, name: str, source: str) -> None:
    """A Linear or Conv layer's declared sizes must be its weight's, and its outputs within MAX_CLASSES.

    Raises:
        ModelLoadError: the sizes disagree (they would mislead what convify reads from the structure).
        LimitError: more outputs than :data:`~convify.limits.MAX_CLASSES`.
    """
    declared = getattr(module, "num_classes", None)
    outputs: list[Any] = [declared] if isinstance(declared, int) else []
    weight = module.__dict__.get("_parameters", {}).get("weight")
    if isinstance(module, nn.Linear):
        outputs.append(module.out_features)
        expected: Optional[tuple[Any, ...]] = (module.out_features, module.in_features)
    elif isinstance(module, nn.modules.conv._ConvNd):
        outputs.append(module.out_channels)
        expected = None if module.transposed else (module.out_channels,)
    else:
        expected = None
    for value in outputs:
        if not isinstance(value, int) or value > limits.MAX_CLASSES:
            raise LimitError(f"{source}: layer {ascii(name)[:120]} has {value!r} outputs; convify reads at most "
                             f"{limits.MAX_CLASSES} classes (convify.limits.MAX_CLASSES)")
    if expected is not None and isinstance(weight, torch.Tensor) \
            and tuple(weight.shape[: len(expected)]) != expected:
        raise ModelLoadError(f"{source}: layer {ascii(name)[:120]} says {expected} but its weight has shape "
                             f"{tuple(weight.shape)}; the file is crafted or damaged")


# --- state_dicts -----------------------------------------------------------------------------


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
