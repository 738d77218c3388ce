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


