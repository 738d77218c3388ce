"""Writing output files so that no failure, interruption or stranger's path can damage what is on disk.

Every file convify writes (converted networks, heatmap overlays, summaries, raw maps) goes through
:func:`write_atomic` / :func:`write_files`:

- the data is written to a temporary file beside the target, flushed and fsynced, then renamed over it:
  a reader (or a crash, or ``kill -9``) sees the old file or the complete new one, never half of one;
- the file gets the permissions the process umask gives (``0o666 & ~umask``), like ``open(path, "w")``
  (the temporary file starts at 0600);
- SIGTERM, SIGHUP (and SIGINT where it is left at the OS default) during the write remove the temporary
  file before the process dies as the signal asks (Python's own Ctrl-C, KeyboardInterrupt, is cleaned up
  like any other exception);
- a temporary file left by a run that could not clean up (SIGKILL, power loss) is named
  ``.NAME.<pid>.<random>.tmp``; the next write to the same target removes those whose process is gone;
- any OSError (unwritable directory, full disk, a path that is a directory) becomes one
  :class:`~convify.errors.OutputError` line, and nothing is left behind;
- :func:`check_not_inputs` refuses an output that is one of the run's inputs (by resolved path or same
  file on disk, so symlinks and hard links count), whatever ``force`` says.
"""
from __future__ import annotations

import errno
import io
import os
import re
import signal
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional, Sequence, Union

from .errors import OutputError

__all__ = ["write_atomic", "write_files", "check_not_inputs", "InputIndex", "ensure_directory", "temp_pattern",
           "WriteError"]

PathLike = Union[str, os.PathLike]
Writer = Callable[[BinaryIO], Any]

# Signals whose default action kills the process without running Python code: while a write is under
# way they are caught, the temporary files removed, and the signal delivered again with its old handling.
_FATAL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))
# When this module was imported: a temporary file carrying this process's pid but older than this was
# left by an earlier process that had the same pid (pids are reused; in containers, often the same one).
_STARTED = time.time()
_UMASK_LOCK = threading.Lock()


class WriteError(OutputError, OSError):
    """A file cannot be written (permissions, full disk, ...): an :class:`OutputError` with a one-line message,
    and still an ``OSError``, so code that caught OSError around a save keeps working."""


def write_atomic(path: PathLike, write: Writer) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place.

    Args:
        path: the target file; its directory must exist.
        write: writes the whole content to the binary file object it is given.

    Raises:
        WriteError: (an OutputError and an OSError) the file cannot be written (permissions, full disk, ...);
            nothing is left behind.
        Anything ``write`` raises for other reasons, after the temporary file is removed.
    """
    write_files([(Path(path), write)])


def write_files(items: Sequence[tuple[PathLike, Writer]]) -> list[Path]:
    """Write several files all-or-nothing: every temporary file is written before any is renamed.

    A failure while writing (a full disk at the third file) leaves every target as it was. Only the renames
    themselves, which do not allocate, come after the point of no return.

    Returns:
        The targets, in order.

    Raises:
        WriteError: a file cannot be written; nothing is left behind.
    """
    targets = [Path(p) for p, _ in items]
    temps: list[Path] = []
    mode = 0o666 & ~_umask()
    with _signals_remove(temps):
        try:
            for target, (_, write) in zip(targets, items):
                _remove_stale(target)
                temps.append(_write_temp(target, write, mode))
            for target, temp in zip(targets, temps):
                try:
                    os.replace(temp, target)
                except OSError as e:
                    e._convify_target = target  # type: ignore[attr-defined]
                    raise
        except BaseException as e:
            for temp in temps:
                _unlink(temp)
            recorded = getattr(e, "_convify_oserror", None)
            if isinstance(e, OSError) or recorded is not None:
                cause = e if isinstance(e, OSError) else recorded
                target = getattr(e, "_convify_target", targets[0])
                raise WriteError(f"cannot write {target}: {_reason(cause)}") from None
            raise
    return targets


def _write_temp(target: Path, write: Writer, mode: int) -> Path:
    """One temporary file beside ``target``, written, flushed to disk and given ``mode``."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        e._convify_target = target  # type: ignore[attr-defined]
        raise
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as raw:
            recording = _RecordingFile(raw)
            try:
                write(recording)  # type: ignore[arg-type]
                raw.flush()
                os.fsync(raw.fileno())
            except BaseException as e:
                # torch.save turns a failed write into a RuntimeError that has lost the errno: say what
                # really happened when the file object saw an OSError
                if recording.error is not None and not isinstance(e, OSError):
                    e._convify_oserror = recording.error  # type: ignore[attr-defined]
                e._convify_target = target  # type: ignore[attr-defined]
                raise
        os.chmod(temp, mode)
    except BaseException:
        _unlink(temp)
        raise
    return temp


class _RecordingFile(io.RawIOBase):
    """A binary file that passes everything to ``raw`` and remembers the first OSError it raised."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self.error: Optional[OSError] = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        try:
            return self._raw.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._raw.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:  # the caller owns the real file
        pass


def _reason(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    return (error.strerror or str(error) or type(error).__name__).splitlines()[0]


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# Permissions


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc), else under a lock."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it: set the strictest value for the instant
        old = os.umask(0o077)
        os.umask(old)
    return old


# --------------------------------------------------------------------------------------------------
# Stale temporary files


def temp_pattern(target: PathLike) -> re.Pattern:
    """The names of the temporary files of ``target``: ``.NAME.<pid>.<random>.tmp`` (group 1 is the pid)."""
    return re.compile(rf"\.{re.escape(Path(target).name)}\.([0-9]+)\.[A-Za-z0-9_]+\.tmp")


def _remove_stale(target: Path) -> None:
    """Remove ``target``'s temporary files whose writer is gone (killed before it could clean up).

    A file whose pid is alive is another writer's, at work now: it is kept. Our own pid counts as gone when
    the file is older than this process's import of convify (a previous process with the same pid).
    """
    if os.name != "posix":  # os.kill(pid, 0) is not a harmless probe elsewhere
        return
    pattern = temp_pattern(target)
    try:
        names = [n for n in os.listdir(target.parent) if n.startswith(f".{target.name}.") and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if not match:
            continue
        path = target.parent / name
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            stale = info.st_mtime < _STARTED
        else:
            stale = not _alive(pid)
        if stale:
            _unlink(path)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process we can ask about: leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


# --------------------------------------------------------------------------------------------------
# Signals


class _Interrupted(BaseException):
    """Raised by the temporary signal handler; carries the signal to deliver again after cleaning up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_remove(temps: list[Path]) -> Iterator[None]:
    """While writing: a fatal signal left at its default raises, the writer removes ``temps``, and the
    signal is then delivered again with the previous handling (the process dies of it, as it would have).

    Only in the main thread (the only one that may set handlers); handlers set by the application are left
    alone (they run as usual, and if they raise, the temporary files are removed like for any exception).
    """
    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _FATAL_SIGNALS:
            try:
                if signal.getsignal(signum) == signal.SIG_DFL:
                    installed[signum] = signal.signal(signum, _raise_interrupted)
            except (ValueError, OSError):  # not allowed here (embedded interpreter, ...)
                pass
    try:
        yield
    except _Interrupted as interrupted:
        for temp in temps:
            _unlink(temp)
        _restore(installed)
        installed = {}
        os.kill(os.getpid(), interrupted.signum)  # the default action: the process ends here
        raise SystemExit(128 + interrupted.signum) from None  # only if the signal did not end it
    finally:
        _restore(installed)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted(signum)


def _restore(installed: dict[int, Any]) -> None:
    for signum, previous in installed.items():
        try:
            signal.signal(signum, previous)
        except (ValueError, OSError):
            pass


# --------------------------------------------------------------------------------------------------
# Refusals


def check_not_inputs(outputs: Iterable[PathLike], inputs: Iterable[Optional[PathLike]]) -> None:
    """Refuse to write over any input of the run: same resolved path, or the same file on disk.

    Args:
        outputs: the files that would be written.
        inputs: the files the run reads (images, model, weights); None and names that are not files are
            skipped.

    Raises:
        OutputError: an output is an input (``force`` does not change this).
    """
    InputIndex(inputs).check(outputs)


class InputIndex:
    """The files a run reads, by resolved path and by device and inode (so symlinks and hard links count):
    asking whether an output is one of them costs one ``resolve`` and one ``stat``, however many inputs."""

    def __init__(self, inputs: Iterable[Optional[PathLike]]) -> None:
        self.by_path: dict[Path, Path] = {}
        self.by_inode: dict[tuple[int, int], Path] = {}
        for source in inputs:
            if source is None:
                continue
            path = Path(source)
            try:
                resolved, st = path.resolve(), os.stat(path)
            except (OSError, RuntimeError, ValueError):  # missing, unreadable, a symlink loop, a NUL in the name
                continue
            self.by_path.setdefault(resolved, path)
            self.by_inode.setdefault((st.st_dev, st.st_ino), path)

    def source_of(self, output: PathLike) -> Optional[Path]:
        """The input ``output`` is (as given), or None."""
        if not self.by_path:
            return None
        out = Path(output)
        try:
            found = self.by_path.get(out.resolve())
        except (OSError, RuntimeError, ValueError):
            return None
        if found is not None:
            return found
        try:
            st = os.stat(out)
        except (OSError, ValueError):
            return None
        return self.by_inode.get((st.st_dev, st.st_ino))

    def check(self, outputs: Iterable[PathLike]) -> None:
        """Raises OutputError if any output is an input."""
        for output in outputs:
            source = self.source_of(output)
            if source is not None:
                raise OutputError(f"{Path(output)} is an input of this run ({source}); refusing to overwrite it "
                                  "even with --force: choose another output")


def ensure_directory(directory: PathLike) -> Path:
    """Create ``directory`` (and its parents) if needed.

    Raises:
        OutputError: it cannot be created, or a file is in the way.
    """
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot write into {path}: it is a file, not a directory") from None
    except OSError as e:
        raise OutputError(f"cannot create the output directory {path}: {_reason(e)}") from None
    if not path.is_dir():
        raise OutputError(f"cannot write into {path}: it is not a directory")
    return path
