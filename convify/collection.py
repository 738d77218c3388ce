"""A run over a collection of images: finding them, where their outputs go, what is already done, the results table.

- :func:`find_images`: files, directories (walked recursively, hidden entries and the output directory
  skipped, symlinked directories not followed), globs and manifest files (one path a line) -> image paths;
- :func:`output_stems`: each image's outputs mirror its place in the input tree under the output directory
  (``a/x.jpg`` and ``b/x.jpg`` -> ``OUT/a/x.*`` and ``OUT/b/x.*``), relative to the inputs' common root, so no
  output lies outside the output directory;
- :func:`output_state`: whether an image's outputs exist complete (the run skips it), in part (an
  interrupted run or other options: refused without ``--force``) or not at all;
- :func:`summary_row`, :func:`write_table`: one row per image (path, status, sizes, top classes with their
  peak scores, cells and boxes) in a Parquet file (and/or CSV), so a collection can be searched and joined
  without opening per-image JSON. An image skipped as done gets its row from its own JSON summary.

Manifests, directories and JSON summaries come from strangers: each is read within a bound
(:data:`MAX_IMAGES` paths, :data:`MAX_MANIFEST_BYTES`, :data:`MAX_SUMMARY_BYTES`) and every failure is one
:class:`~convify.errors.ConvifyError` line.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from .errors import ConvifyError, OutputExistsError
from .outputs import ensure_directory, write_files
from .text import one_line

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGES", "Found", "find_images", "output_stems", "output_state", "summary_row",
           "failure_row", "write_table", "TABLE_COLUMNS"]

# What a directory walk picks up when no --ext is given: the formats engine.load_image reads, TIFFs and slides.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".ico",
                    ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
MAX_IMAGES = 1_000_000  # paths one run takes from its arguments, directories and manifests
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_PATH_CHARS = 4096
MAX_SUMMARY_BYTES = 16 * 1024 * 1024
MAX_TABLE_CLASSES = 1000  # classes a row lists (top-k and asked), whatever a summary file holds
_GLOB_CHARS = set("*?[")


@dataclass
class Found:
    """The images a run's arguments name (in order, each once), the roots their outputs mirror, and where the
    arguments search (so a run can refuse to write where a later run would read its outputs as images)."""

    images: list[Path]
    roots: list[Path]
    searched: list[Path]  # directories walked and glob prefixes
    extensions: frozenset[str]
    excluded: Optional[Path] = None

    def would_find(self, path: Union[str, os.PathLike]) -> bool:
        """Whether the same arguments, run again, would take ``path`` as an image (the output directory is
        skipped where it lies strictly below a searched directory)."""
        path = Path(os.path.abspath(path))
        if path.suffix.lower() not in self.extensions:
            return False
        excluded = Path(os.path.abspath(self.excluded)) if self.excluded is not None else None
        for root in self.searched:
            root = Path(os.path.abspath(root))
            skipped = excluded is not None and excluded != root and _within(excluded, root) and _within(path, excluded)
            if _within(path, root) and not skipped:
                return True
        return False


def _within(path: Path, directory: Path) -> bool:
    try:
        return os.path.commonpath([path, directory]) == str(directory)
    except ValueError:  # different drives
        return False


def find_images(arguments: Sequence[Union[str, os.PathLike]], manifests: Sequence[Union[str, os.PathLike]] = (),
                extensions: Optional[Sequence[str]] = None, exclude: Optional[Union[str, os.PathLike]] = None,
                ) -> Found:
    """The images a run's arguments name, in order, each once.

    Args:
        arguments: files (kept even if missing: each image's failure is its own), directories (walked
            recursively, in sorted order), or globs (``photos/**/*.jpg``; ``**`` crosses directories; one that
            matches nothing is kept as a path, which fails as a missing image).
        manifests: text files naming one image a line (relative paths from the manifest's directory; blank
            lines and lines starting with ``#`` skipped).
        extensions: what a directory walk or glob keeps (``jpg``, ``.PNG``: any case); None:
            :data:`IMAGE_EXTENSIONS`.
        exclude: a directory never walked into (the output directory, so a second run does not read the
            first run's overlays as images).

    Raises:
        ConvifyError: a manifest cannot be read, or more than :data:`MAX_IMAGES` paths.
    """
    wanted = _extensions(extensions)
    skip = _identity(exclude) if exclude is not None else None
    found: list[Path] = []
    roots: list[Path] = []
    searched: list[Path] = []
    for argument in arguments:
        text = os.fspath(argument)
        path = Path(text)
        if path.is_dir():
            roots.append(path)
            searched.append(path)
            found.extend(_walk(path, wanted, skip))
        elif not path.exists() and _GLOB_CHARS & set(text):
            prefix = _static_prefix(text)
            matches = _recursive_glob(text, prefix) if "**" in text else sorted(glob.glob(text))
            inner = skip if skip is not None and _identity(prefix) != skip else None  # as a walk skips it
            kept = [Path(m) for m in matches if Path(m).is_file() and Path(m).suffix.lower() in wanted
                    and not _inside(Path(m), inner)]
            found.extend(kept or [path])  # nothing matches: the image's own failure ("no such image")
            roots.append(prefix)
            searched.append(prefix)
        else:
            found.append(path)
        _check_count(found)
    for manifest in manifests:
        found.extend(read_manifest(manifest))
        _check_count(found)
    seen: set[str] = set()
    unique = []
    for path in found:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return Found(unique, roots, searched, frozenset(wanted), None if exclude is None else Path(exclude))


def _recursive_glob(pattern: str, prefix: Path) -> list[str]:
    """Files matching a ``**`` glob, found by a walk of its static prefix that follows no symlinked directory
    (``glob.glob(recursive=True)`` does: a link to ``.`` repeats every file forty times, two make it run for ever).
    ``**`` matches any number of directories, ``*`` and ``?`` stay inside one name, hidden names are skipped."""
    rest = Path(pattern).parts[len(prefix.parts):]
    regex = re.compile(_glob_regex(rest))
    matches = []
    for directory, subdirectories, files in os.walk(prefix, followlinks=False):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            relative = os.path.relpath(os.path.join(directory, name), prefix)
            if regex.fullmatch(relative.replace(os.sep, "/")):
                matches.append(os.path.join(directory, name))
                if len(matches) > MAX_IMAGES:
                    raise ConvifyError(f"{pattern!r} matches more than {MAX_IMAGES:,} files; split the run")
    return sorted(matches)  # as sorted(glob.glob(...)) orders the other patterns


def _glob_regex(parts: Sequence[str]) -> str:
    """A regex for ``/``-joined relative paths from glob parts: ``**`` any directories (none included), ``*``
    any characters but ``/``, ``?`` one of them, ``[...]`` a set (``[!...]`` its complement)."""
    pieces = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            pieces.append(".*" if last else "(?:[^/]+/)*")
            continue
        out, k = [], 0
        while k < len(part):
            char = part[k]
            end = part.find("]", k + 2) if char == "[" else -1
            if char == "*":
                out.append("[^/]*")
            elif char == "?":
                out.append("[^/]")
            elif end != -1:
                body = part[k + 1:end]
                negate = body.startswith("!")
                out.append("[" + ("^/" if negate else "") + re.escape(body[1:] if negate else body) + "]")
                k = end
            else:
                out.append(re.escape(char))
            k += 1
        pieces.append("".join(out) + ("" if last else "/"))
    return "".join(pieces)


def _static_prefix(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard: ``photos/2024/**/*.jpg`` -> ``photos/2024``."""
    parts = Path(pattern).parts
    fixed = [p for p in iter(parts)]
    for i, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            fixed = list(parts[:i])
            break
    return Path(*fixed) if fixed else Path(".")


def _check_count(found: list[Path]) -> None:
    if len(found) > MAX_IMAGES:
        raise ConvifyError(f"more than {MAX_IMAGES:,} images in one run; split the run (several manifests or "
                           "directories, one run each)")


def _extensions(extensions: Optional[Sequence[str]]) -> set[str]:
    if extensions is None:
        return set(IMAGE_EXTENSIONS)
    wanted = {"." + e.strip().lower().lstrip(".") for e in extensions if e.strip().lstrip(".")}
    if not wanted or any(not e[1:].isalnum() or len(e) > 16 for e in wanted):
        raise ConvifyError(f"extensions must be names like jpg or png; got {', '.join(map(str, extensions))[:80]!r}")
    return wanted


def _identity(path: Union[str, os.PathLike]) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _inside(path: Path, skip: Optional[tuple[int, int]]) -> bool:
    """Whether ``path`` lies in the directory ``skip`` identifies (by device and inode: links count)."""
    if skip is None:
        return False
    return any(_identity(parent) == skip for parent in Path(os.path.abspath(path)).parents)


def _walk(root: Path, wanted: set[str], skip: Optional[tuple[int, int]]) -> Iterable[Path]:
    """Files below ``root`` with a wanted extension, sorted, hidden names skipped, symlinked directories not
    followed (no loops), the ``skip`` directory not entered."""
    count = 0
    for directory, subdirectories, files in os.walk(root, followlinks=False):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".")
                                   and (skip is None or _identity(os.path.join(directory, d)) != skip))
        for name in sorted(files):
            if name.startswith(".") or Path(name).suffix.lower() not in wanted:
                continue
            count += 1
            if count > MAX_IMAGES:
                raise ConvifyError(f"{root} holds more than {MAX_IMAGES:,} images; split the run (one run per "
                                   "subdirectory)")
            yield Path(directory) / name


def read_manifest(manifest: Union[str, os.PathLike]) -> list[Path]:
    """The paths a manifest names, one a line, relative ones from the manifest's directory.

    Raises:
        ConvifyError: the manifest is missing, too large, not UTF-8 text, or has a line that is not a path.
    """
    path = Path(manifest)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ConvifyError(f"cannot read manifest {path}: {e.strerror or type(e).__name__}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ConvifyError(f"manifest {path} is larger than {MAX_MANIFEST_BYTES // 2 ** 20} MB; split it")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConvifyError(f"manifest {path} is not UTF-8 text (byte {e.start}); write one path a line") from None
    paths = []
    for number, line in enumerate(io.StringIO(text, newline=None), 1):  # \n, \r\n or \r: as an editor counts
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\x00" in line or len(line) > MAX_PATH_CHARS:
            raise ConvifyError(f"manifest {path}, line {number}: not a path (a NUL byte, or longer than "
                               f"{MAX_PATH_CHARS} characters)")
        paths.append(path.parent / line)
        if len(paths) > MAX_IMAGES:
            raise ConvifyError(f"manifest {path} names more than {MAX_IMAGES:,} images; split it")
    return paths


def output_stems(images: Sequence[Path], roots: Sequence[Path] = ()) -> list[Path]:
    """Each image's output stem relative to the output directory: its directory relative to the common root
    of the inputs (the ``roots`` given and the images' own directories), and its name without extension.

    ``["a/x.jpg", "b/x.jpg"]`` -> ``["a/x", "b/x"]``; ``["photo.jpg"]`` -> ``["photo"]``; a directory ``d``
    holding ``d/s/x.jpg`` -> ``["s/x"]``. A stem never has ``..`` or an absolute part.
    """
    if not images:
        return []
    absolute = [Path(os.path.abspath(p)) for p in images]  # normalised: "sub/.." is "." (a directory, which fails)
    parents = [str(a.parent) for a in absolute] + [os.path.abspath(r) for r in roots]
    try:
        common = os.path.commonpath(parents)
    except ValueError:  # different drives
        raise ConvifyError("the images lie on different drives; run each drive's images separately") from None
    return [Path(os.path.relpath(a.parent, common)) / (a.stem or "image") for a in absolute]


def colliding(stems: Sequence[Path]) -> dict[int, int]:
    """``{later: earlier}`` for images whose output stems are the same (case-insensitively: ``x.jpg`` and
    ``X.png`` collide on a case-insensitive disk) as an earlier image's."""
    first: dict[str, int] = {}
    clashes = {}
    for i, stem in enumerate(stems):
        key = os.path.normpath(str(stem)).casefold()
        if key in first:
            clashes[i] = first[key]
        else:
            first[key] = i
    return clashes


def output_state(files: Sequence[Path]) -> str:
    """``"complete"`` (every file exists), ``"partial"`` or ``"missing"``."""
    present = [_exists(f) for f in files]
    return "complete" if all(present) else "partial" if any(present) else "missing"


def _exists(path: Path) -> bool:
    """``path.exists()``, False where the name cannot exist (too long: Python 3.11 raises ENAMETOOLONG): the
    image then runs and its write fails with one line."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# The results table

# (name, pyarrow type, meaning): one row per image. Lists run over the image's top classes, best first.
TABLE_COLUMNS = (
    ("path", "string", "the image, as given or found"),
    ("status", "string", "done, skipped (its outputs existed: the row comes from its JSON) or failed"),
    ("error", "string", "why it failed (one line), else null"),
    ("outputs", "string", "its output stem under the output directory"),
    ("image_width", "int64", "the image's width in pixels"),
    ("image_height", "int64", "its height"),
    ("map_rows", "int64", "the score map's rows"),
    ("map_cols", "int64", "its columns"),
    ("top_index", "list<int64>", "the best classes' indices, best first"),
    ("top_class", "list<string>", "their names"),
    ("top_probability", "list<double>", "their peak probability (the best cell's softmax)"),
    ("top_logit", "list<double>", "the logit at that cell"),
    ("top_cell", "list<list<int64>>", "the peak cell (row, column)"),
    ("top_box", "list<list<double>>", "the peak cell's window (x0, y0, x1, y1) in the image's pixels, clipped to it"),
    ("asked_index", "list<int64>", "the classes asked for (--class), in the order asked"),
    ("asked_class", "list<string>", "their names"),
    ("asked_probability", "list<double>", "their peak probability"),
    ("asked_logit", "list<double>", "the logit at that cell"),
    ("asked_cell", "list<list<int64>>", "their peak cell (row, column)"),
    ("asked_box", "list<list<double>>", "its window in the image's pixels, clipped to it"),
)


def summary_row(path: Union[str, Path], stem: Union[str, Path, None], status: str, summary: dict[str, Any],
                k: int) -> dict[str, Any]:
    """A table row from an image's summary (:meth:`HeatmapResult.summary`, a streamed run's, or a JSON file's).

    Raises:
        ConvifyError: the summary does not have the shape convify writes (a damaged or foreign JSON file).
    """
    try:
        width, height = (_int(v) for v in summary["image_size"])
        rows, cols = (_int(v) for v in summary["map_size"])
        row = _empty_row(path, stem, status)
        row.update(image_width=width, image_height=height, map_rows=rows, map_cols=cols)
        for prefix, predictions in (("top", summary["top"][:k]), ("asked", summary.get("classes") or [])):
            if predictions or prefix == "top":
                row.update(_peaks(prefix, predictions[:MAX_TABLE_CLASSES]))
        return row
    except ConvifyError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        raise ConvifyError("its summary is not one convify wrote (missing or wrong fields)") from None


def _peaks(prefix: str, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {f"{prefix}_index": [_int(p["index"]) for p in predictions],
            f"{prefix}_class": [_str(p["name"]) for p in predictions],
            f"{prefix}_probability": [_float(p["probability"]) for p in predictions],
            f"{prefix}_logit": [_float(p["logit"]) for p in predictions],
            f"{prefix}_cell": [[_int(v) for v in p["cell"]][:2] for p in predictions],
            f"{prefix}_box": [[_float(v) for v in p["box_in_image"]][:4] for p in predictions]}


def failure_row(path: Union[str, Path], stem: Union[str, Path, None], message: str) -> dict[str, Any]:
    row = _empty_row(path, stem, "failed")
    row["error"] = message
    return row


def skipped_row(path: Union[str, Path], stem: Union[str, Path, None], summary_file: Optional[Path],
                k: int) -> dict[str, Any]:
    """The row of an image skipped as done: from its JSON summary when there is one (read within a bound),
    else only its path (the run did not write JSON)."""
    if summary_file is None or not summary_file.is_file():
        return _empty_row(path, stem, "skipped")
    try:
        with open(summary_file, "rb") as f:
            data = f.read(MAX_SUMMARY_BYTES + 1)
        if len(data) > MAX_SUMMARY_BYTES:
            raise ConvifyError(f"larger than {MAX_SUMMARY_BYTES // 2 ** 20} MB")
        return summary_row(path, stem, "skipped", json.loads(data), k)
    except (OSError, ValueError, RecursionError, ConvifyError) as e:
        row = _empty_row(path, stem, "skipped")
        reason = one_line(getattr(e, "strerror", None) or e)  # an OSError's reason without its path
        row["error"] = f"its outputs exist but its summary {summary_file.name} cannot be read ({reason})"
        return row


def _empty_row(path: Union[str, Path], stem: Union[str, Path, None], status: str) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name, _, _ in TABLE_COLUMNS}
    row.update(path=os.fspath(path), status=status, outputs=None if stem is None else os.fspath(stem))
    return row


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2 ** 62:
        raise ValueError(value)
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    try:
        return float(value)
    except OverflowError:  # an integer of 400 digits
        raise ValueError(value) from None


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(value)
    return value[:1000]


def write_table(rows: Sequence[dict[str, Any]], path: Union[str, os.PathLike], force: bool = False) -> Path:
    """Write the results table to ``path``: Parquet (``.parquet``) or CSV (``.csv``, lists as JSON text), atomically.

    A table convify wrote before (a resumed run's) is replaced; any other existing file only with ``force``.

    Raises:
        ConvifyError: the extension is neither, or pyarrow is missing for Parquet.
        OutputExistsError: the file exists, is not a convify table, and ``force`` is False.
        OutputError: the file cannot be written.
    """
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".parquet", ".csv"):
        raise ConvifyError(f"a results table is .parquet or .csv; got {path.name!r}")
    if path.exists() and not force and not _is_our_table(path, kind):
        raise OutputExistsError(f"{path} already exists and is not a convify results table; use --force to "
                                "overwrite it")
    rows = [{key: _text(value) for key, value in row.items()} for row in rows]
    data = _parquet(rows) if kind == ".parquet" else _csv(rows)
    ensure_directory(path.parent)
    write_files([(path, lambda f: f.write(data))])
    return path


def _text(value: Any) -> Any:
    """Strings made valid UTF-8: a lone surrogate (a file name that is not UTF-8, a ``\\udcff`` in a JSON) is
    written as its escape, ``\\udcff``, instead of stopping the table at the end of the run."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


_TABLE_MARK = b"convify.results"


def _arrow_schema() -> Any:
    pa = _pyarrow()
    types = {"string": pa.string(), "int64": pa.int64(), "list<int64>": pa.list_(pa.int64()),
             "list<string>": pa.list_(pa.string()), "list<double>": pa.list_(pa.float64()),
             "list<list<int64>>": pa.list_(pa.list_(pa.int64())), "list<list<double>>": pa.list_(pa.list_(pa.float64()))}
    return pa.schema([pa.field(name, types[kind]) for name, kind, _ in TABLE_COLUMNS],
                     metadata={_TABLE_MARK: json.dumps({name: meaning for name, _, meaning in TABLE_COLUMNS})})


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise ConvifyError("writing Parquet needs pyarrow: pip install pyarrow (or write a .csv table)") from None
    return pyarrow


def _parquet(rows: Sequence[dict[str, Any]]) -> bytes:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows), schema=_arrow_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


_CSV_HEADER = [name for name, _, _ in TABLE_COLUMNS]


def _csv(rows: Sequence[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180: a CR or LF inside a cell is quoted
    writer.writerow(_CSV_HEADER)
    for row in rows:
        writer.writerow([_csv_cell(row[name]) for name in _CSV_HEADER])
    return buffer.getvalue().encode("utf-8")


def _csv_cell(value: Any) -> str:
    """A value as CSV text: lists as JSON; a string a spreadsheet would run as a formula (``=``, ``+``, ``-``,
    ``@``, tab, CR: a class name from a stranger's model file) gets a leading ``'``, as OWASP advises."""
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value, allow_nan=False) if _finite(value) else json.dumps(value)
    if not isinstance(value, str):
        return str(value)
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _finite(value: Any) -> bool:
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _is_our_table(path: Path, kind: str) -> bool:
    """Whether ``path`` is a results table convify wrote (its Parquet schema's mark, or the CSV header)."""
    try:
        if kind == ".csv":
            with open(path, encoding="utf-8", errors="replace") as f:
                return next(csv.reader([f.readline(1 << 16)]), []) == _CSV_HEADER
        import pyarrow.parquet as pq

        return _TABLE_MARK in (pq.read_schema(path).metadata or {})
    except Exception:  # unreadable, not Parquet, pyarrow missing: not ours
        return False
