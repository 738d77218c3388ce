"""Helpers the hostile-input tests share: crafted files and a child process with capped memory."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def png_declaring(width: int, height: int) -> bytes:
    """A tiny 1-bit PNG whose IHDR (with a valid CRC) declares ``width x height``: a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("1", (8, 8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert data[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + data[33:]


_BOUNDED_CHILD = textwrap.dedent("""
    import json, resource, sys
    from click.testing import CliRunner
    from convify.cli import cli
    import convify.models, torchvision
    # What the imports take (torch alone maps ~1 GB, ~3.6 GB with CUDA builds), plus 1.5 GiB to work in.
    size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    limit = size + 3 * 2 ** 29
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # the cap bites: 2 GiB more cannot be had
        bytearray(2 ** 31)
        results = [[None, "the memory limit did not hold", None]]
    except MemoryError:
        results = []
    for args in json.loads(sys.argv[1]):
        result = CliRunner().invoke(cli, args)
        failed = result.exception is not None and not isinstance(result.exception, SystemExit)
        results.append([result.exit_code, result.output, type(result.exception).__name__ if failed else None])
    print(json.dumps(results))
""")


def bounded_cli(runs: list[list[str]]) -> list[tuple[int, str, Any]]:
    """Run ``convify ARGS`` for each ARGS in one child process whose address space is capped a little
    above what its imports take; returns (exit code, output, unexpected exception name) per run."""
    import resource

    def cap() -> None:  # a hard ceiling even before the child tightens it
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2 ** 30, 8 * 2 ** 30))

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", _BOUNDED_CHILD, json.dumps(runs)], capture_output=True,
                          text=True, timeout=300, preexec_fn=cap, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    return [tuple(r) for r in json.loads(done.stdout.strip().splitlines()[-1])]




def assert_crafted_layer_refused(fcn: Any, tmp_path: Path, pick: Any, field: str, value: Any, side: int,
                                 errors: tuple = ()) -> None:
    """Save ``fcn``, set argument ``field`` of one layer in the file's header to ``value`` (as an attacker would),
    and check that loading it and running it on a ``side x side`` image is one ModelLoadError (at load, or at the
    first run for a string that torch's constructor takes apart), and that no other file appears.

    ``pick``: the layer's path in the file, or a predicate on its ``{"class", "kwargs"}`` description.
    ``errors``: other refusals that are right too (a LimitError for a size over a bound).
    """
    import pytest
    import torch

    import convify
    from test_fcn import _edit_header

    def edit(header: dict) -> None:
        modules = header["graph"]["modules"]
        spec = modules[pick] if isinstance(pick, str) else next(s for s in modules.values() if pick(s))
        spec["kwargs"][field] = value

    before = set(tmp_path.iterdir())
    saved = fcn.save(tmp_path / "layer.fcn.pt")
    evil = _edit_header(saved, edit, tmp_path / "evil.fcn.pt")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a string argument that ran as code could only write here
    try:
        with pytest.raises((convify.ModelLoadError, *errors)):
            convify.load(evil)(torch.randn(1, 3, side, side))
    finally:
        os.chdir(cwd)
    assert set(tmp_path.iterdir()) == before | {saved, evil}
