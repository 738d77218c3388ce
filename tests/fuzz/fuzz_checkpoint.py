"""Long-running fuzzer for convify.checkpoint.read_checkpoint: only ConvifyError may ever come out.

Mutates the bytes of small valid files of every format convify reads (a torch.save zip of a state_dict
and of a whole model, a pre-1.6 file, a safetensors file), and the pickle inside a zip with its CRCs
recomputed (so the mutants get past the CRC check into torch's unpickler). Seeded: a failure prints
the seed and case that reproduce it, and the input is kept under --keep.

Usage::

    PYTHONPATH=. python tests/fuzz/fuzz_checkpoint.py 5000 [--seed 0] [--keep /tmp/fuzz-failures]

The test suite runs a bounded share of the same mutations (tests/test_checkpoint.py).
"""

from __future__ import annotations

import argparse
import io
import random
import signal
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from convify.checkpoint import read_checkpoint
from convify.errors import ConvifyError

# Seconds one case may take before it counts as a hang.
_CASE_SECONDS = 20


def _seeds(workdir: Path) -> dict[str, bytes]:
    """Small valid files of each format, as bytes."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4), "n": torch.tensor(3)}
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    files = {}
    for name, write in (
        ("zip", lambda p: torch.save(state, p)),
        ("model", lambda p: torch.save(model, p)),
        ("legacy", lambda p: torch.save(state, p, _use_new_zipfile_serialization=False)),
        ("safetensors", lambda p: save_file(state, str(p))),
    ):
        path = workdir / f"seed.{name}"
        write(path)
        files[name] = path.read_bytes()
    return files


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Flip, replace, insert or delete a few bytes; sometimes truncate or splice a copy of a region."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 8, 32))):
        if not b:
            break
        at = rng.randrange(len(b))
        op = rng.random()
        if op < 0.35:
            b[at] ^= 1 << rng.randrange(8)
        elif op < 0.6:
            b[at] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op < 0.7:  # an interesting integer (lengths, counts, offsets)
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice((0, 1, 2 ** (8 * width) - 1, 2 ** (8 * width - 1), rng.randrange(2 ** (8 * width))))
            b[at : at + width] = value.to_bytes(width, "little")
        elif op < 0.8:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op < 0.9:
            del b[at : at + rng.randrange(1, 9)]
        else:
            start = rng.randrange(len(b))
            b[at:at] = b[start : start + rng.randrange(1, 64)]
    if rng.random() < 0.05:
        b = b[: rng.randrange(len(b) + 1)]
    return bytes(b)


def _rezip(zip_bytes: bytes, rng: random.Random) -> bytes:
    """The zip with its data.pkl mutated and every CRC recomputed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = _mutate(data, rng)
            dst.writestr(info.filename, data)
    return out.getvalue()


def _timeout(signum: int, frame: object) -> None:
    raise TimeoutError(f"case took over {_CASE_SECONDS} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, help="how many mutants to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="directory to keep failing inputs in")
    args = parser.parse_args(argv)

    warnings.simplefilter("ignore")  # torch warns about odd pickle protocols in mutants
    signal.signal(signal.SIGALRM, _timeout)
    outcomes: Counter[str] = Counter()
    failures = 0
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        seeds = _seeds(workdir)
        kinds = [*seeds, "zip-pickle", "model-pickle"]
        for case in range(args.count):
            rng = random.Random(f"{args.seed}:{case}")
            kind = kinds[case % len(kinds)]
            if kind.endswith("-pickle"):
                data = _rezip(seeds[kind.split("-")[0]], rng)
            else:
                data = _mutate(seeds[kind], rng)
            path = workdir / f"case.{kind}"
            path.write_bytes(data)
            signal.alarm(_CASE_SECONDS)
            try:
                read_checkpoint(path)
                outcomes["loaded"] += 1
            except ConvifyError as e:
                outcomes[type(e).__name__] += 1
                if "\n" in str(e):
                    failures += 1
                    print(f"case {case} ({kind}, seed {args.seed}): multi-line message: {e!r}")
            except BaseException as e:  # noqa: BLE001 - anything else is what the fuzzer looks for
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures += 1
                outcomes[f"FAIL {type(e).__name__}"] += 1
                print(f"case {case} ({kind}, seed {args.seed}): {type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc(limit=3)
                if args.keep is not None:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    (args.keep / f"case{case}.{kind}").write_bytes(data)
            finally:
                signal.alarm(0)
    elapsed = time.monotonic() - start
    print(f"{args.count} cases in {elapsed:.1f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
