"""Writing outputs: atomic replacement, permissions, cleanup after failures, signals and kills, refusals."""
from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from torch import nn

import convify
import convify.outputs as outputs
from convify.errors import OutputError
from convify.outputs import check_not_inputs, ensure_directory, temp_pattern, write_atomic, write_files

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def temps(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


class FullDisk(io.FileIO):
    """A file on a full disk: every write fails with ENOSPC."""

    def write(self, data):  # type: ignore[override]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch):
    monkeypatch.setattr(outputs.os, "fdopen", 
                        lambda fd, mode="r", *a, real=os.fdopen, **k:
                        FullDisk(fd, "wb") if "w" in mode else real(fd, mode, *a, **k))


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    write_atomic(target, lambda f: f.write(b"new contents"))
    assert target.read_bytes() == b"new contents"
    assert temps(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert outputs._umask() == umask
        write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
        write_files([(tmp_path / "b.bin", lambda f: f.write(b"y"))])
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == mode  # mkstemp alone would give 0600
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == mode


def test_full_disk_is_one_output_error_and_leaves_the_old_file(tmp_path, full_disk):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputError) as error:
        write_atomic(target, lambda f: f.write(b"new"))
    assert str(error.value) == f"cannot write {target}: no space left on the device"
    assert isinstance(error.value, OSError)  # as write_atomic raised before: callers catching OSError still work
    assert target.read_bytes() == b"old"
    assert temps(tmp_path) == []


def test_full_disk_under_torch_save_is_still_named(tmp_path, full_disk):
    """torch.save turns the failed write into a RuntimeError without the errno: the writer recovers it."""
    net = convify.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)), 8)
    with pytest.raises(OutputError, match=r"^cannot write .*net\.fcn\.pt: no space left on the device$"):
        net.save(tmp_path / "net.fcn.pt")
    assert os.listdir(tmp_path) == []


def test_other_exceptions_from_the_writer_pass_through_after_cleanup(tmp_path):
    target = tmp_path / "a.bin"

    def fail(f):
        f.write(b"half")
        raise KeyboardInterrupt  # Ctrl-C with Python's own handler

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, fail)
    assert os.listdir(tmp_path) == []


def test_write_files_is_all_or_nothing(tmp_path):
    first, second = tmp_path / "one.png", tmp_path / "two.json"
    second.write_bytes(b"old")

    def broken(f):
        f.write(b"partial")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OutputError, match=r"^cannot write .*two\.json: Input/output error$"):
        write_files([(first, lambda f: f.write(b"1")), (second, broken)])
    assert not first.exists() and second.read_bytes() == b"old"
    assert temps(tmp_path) == []


def test_unwritable_directory_simulated(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError) as error:
        write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert str(error.value) == f"cannot write {tmp_path / 'a.bin'}: Permission denied"


@pytest.mark.skipif(IS_ROOT, reason="root writes into a 0555 directory anyway")
def test_unwritable_directory_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="Permission denied"):
            write_atomic(locked / "a.bin", lambda f: f.write(b"x"))
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_ensure_directory_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="it is a file, not a directory"):
        ensure_directory(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot create the output directory"):
        ensure_directory(tmp_path / "file" / "sub")
    assert ensure_directory(tmp_path / "new" / "deep").is_dir()


def test_handlers_are_installed_during_the_write_and_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    write_atomic(tmp_path / "a", lambda f: seen.append(signal.getsignal(signal.SIGTERM)) or f.write(b"x"))
    assert signal.getsignal(signal.SIGTERM) is before
    if before == signal.SIG_DFL:
        assert seen[0] is outputs._raise_interrupted
    # from another thread nothing is installed, and the write works
    done = []
    thread = threading.Thread(target=lambda: done.append(write_atomic(tmp_path / "b", lambda f: f.write(b"y"))))
    thread.start()
    thread.join()
    assert done == [None] and (tmp_path / "b").read_bytes() == b"y"


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            "dead": f".a.bin.{dead.pid}.k3j_x9a1.tmp",
            "live": f".a.bin.{live.pid}.q8w2e7r1.tmp",
            "mine_old": f".a.bin.{os.getpid()}.zz11yy22.tmp",  # an earlier process that had our pid
            "mine_new": f".a.bin.{os.getpid()}.aa33bb44.tmp",  # another thread of ours, writing now
            "other_target": f".b.bin.{dead.pid}.cc55dd66.tmp",
            "not_ours": f".a.bin.{dead.pid}.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"junk")
        past = outputs._STARTED - 3600
        os.utime(tmp_path / names["mine_old"], (past, past))
        assert temp_pattern(tmp_path / "a.bin").fullmatch(names["dead"])
        write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
        left = set(temps(tmp_path))
        assert left == {names["live"], names["mine_new"], names["other_target"], names["not_ours"]}
    finally:
        live.kill()
        live.wait()


SLOW_WRITER = """
import sys, time
from convify.outputs import write_atomic

def slow(f):
    chunk = b"n" * (1 << 20)
    for i in range(int(sys.argv[2])):
        f.write(chunk)
        f.flush()
        if i == 2:
            print("writing", flush=True)
        time.sleep(0.02)

write_atomic(sys.argv[1], slow)
"""


def _start_writer(target: Path, megabytes: int = 60) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target), str(megabytes)], env=env,
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_writer_killed_mid_write_leaves_the_old_file_and_no_temporary_after_the_next_write(tmp_path):
    """SIGKILL and SIGTERM while 60 MB are being written: the target is the old file; SIGTERM removes its own
    temporary file, SIGKILL's is removed by the next write to the same target. A writer left alone writes
    the whole new file."""
    targets = {sig: tmp_path / f"{sig.name}.bin" for sig in (signal.SIGKILL, signal.SIGTERM)}
    for target in targets.values():
        target.write_bytes(b"old")
    complete = tmp_path / "complete.bin"
    writers = {sig: _start_writer(target) for sig, target in targets.items()}
    finisher = _start_writer(complete, megabytes=8)
    for sig, writer in writers.items():
        assert writer.stdout.readline().strip() == "writing"
        assert len(temps(tmp_path)) >= 1
        writer.send_signal(sig)
    for sig, writer in writers.items():
        assert writer.wait(timeout=30) == -sig
        writer.stdout.close()
        assert targets[sig].read_bytes() == b"old", sig
    assert finisher.wait(timeout=60) == 0
    finisher.stdout.close()
    assert complete.stat().st_size == 8 << 20
    left = temps(tmp_path)
    killed_pid = writers[signal.SIGKILL].pid
    assert left == [n for n in left if n.startswith(f".SIGKILL.bin.{killed_pid}.")] and len(left) == 1
    write_atomic(targets[signal.SIGKILL], lambda f: f.write(b"new"))
    assert temps(tmp_path) == []
    assert targets[signal.SIGKILL].read_bytes() == b"new"


# --------------------------------------------------------------------------------------------------
# Outputs that are inputs


def test_an_output_that_is_an_input_is_refused(tmp_path, monkeypatch):
    image = tmp_path / "pic.json"
    image.write_bytes(b"pixels")
    with pytest.raises(OutputError) as error:
        check_not_inputs([tmp_path / "pic.png", image], [image])
    assert str(error.value) == (f"{image} is an input of this run ({image}); refusing to overwrite it even with "
                                "--force: choose another output")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError):  # relative against absolute
        check_not_inputs([Path("pic.json")], [image])
    with pytest.raises(OutputError):
        check_not_inputs([tmp_path / "sub" / ".." / "pic.json"], ["pic.json"])
    link = tmp_path / "link.json"
    link.symlink_to(image)
    with pytest.raises(OutputError):  # through a symlink
        check_not_inputs([link], [image])
    hard = tmp_path / "hard.json"
    os.link(image, hard)
    with pytest.raises(OutputError):  # a hard link is the same file
        check_not_inputs([hard], [image])
    # different files, missing inputs and architecture names are fine
    check_not_inputs([tmp_path / "pic.png", tmp_path / "new.json"], [image, None, "resnet50", tmp_path / "missing"])
