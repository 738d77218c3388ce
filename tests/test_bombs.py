"""Resource bombs through every entry of the command line, in a child process whose memory is capped: each
ends in one `Error:` line (or a usage error), never a MemoryError traceback or the machine's memory.

Checkpoint bombs (expanded views, storages claiming 40 GB, ...) are in test_checkpoint.py; these are the
images, converted files and options.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn

import convify
from hostile import bounded_cli, png_declaring


def _tiny_converted(path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    return convify.convert(model, 32).save(path)


def _declaring_wide_conv(saved: Path, out: Path) -> Path:
    """A converted file whose first conv declares 3,000,000 output channels (its weights are the small ones)."""
    payload = torch.load(saved, weights_only=True)
    header = json.loads(payload["convify"])
    header["graph"]["modules"]["0"]["kwargs"]["out_channels"] = 3_000_000
    payload["convify"] = json.dumps(header)
    torch.save(payload, out)
    return out


def _graph_bomb(saved: Path, out: Path, nodes: list[list]) -> Path:
    """A converted file that runs ``nodes`` ([name, op, target, *args], ``x`` the input) before its own."""
    payload = torch.load(saved, weights_only=True)
    header = json.loads(payload["convify"])
    graph = header["graph"]["nodes"]
    extra = [{"name": n[0], "op": n[1], "target": n[2], "args": {"tuple": list(n[3:])}, "kwargs": {"dict": []}}
             for n in nodes]
    header["graph"]["nodes"] = graph[:1] + extra + graph[1:]
    payload["convify"] = json.dumps(header).replace('{"node": "x"}', json.dumps({"node": graph[0]["name"]}))
    torch.save(payload, out)
    return out


def test_image_file_and_option_bombs_fail_cleanly_under_a_memory_limit(tmp_path: Path) -> None:
    model = _tiny_converted(tmp_path / "tiny.fcn.pt")
    wide = _declaring_wide_conv(model, tmp_path / "wide.fcn.pt")
    x = {"node": "x"}
    # small integers asking for GBs at run time: 40,000 copies of the input made real, a 20,000 px pad
    copies = _graph_bomb(model, tmp_path / "copies.fcn.pt", [["e", "call_method", "expand", x, 40000, -1, -1, -1],
                                                              ["c", "call_method", "contiguous", {"node": "e"}]])
    padded = _graph_bomb(model, tmp_path / "padded.fcn.pt",
                         [["p", "call_function", "torch.nn.functional.pad", x, [0, 20000, 0, 20000]]])
    (tmp_path / "bomb.png").write_bytes(png_declaring(40000, 40000))   # 1.6 GP declared in ~100 bytes
    Image.new("RGB", (40000, 4)).save(tmp_path / "strip.png")           # a 560-byte strip: 9 GB when resized
    Image.new("RGB", (64, 48)).save(tmp_path / "ok.png")
    out = str(tmp_path / "out")
    runs = [
        ["info", str(wide)],
        ["heatmap", str(tmp_path / "ok.png"), "--model", str(wide), "-o", out],
        ["heatmap", str(tmp_path / "ok.png"), "--model", str(copies), "-o", out],
        ["heatmap", str(tmp_path / "ok.png"), "--model", str(padded), "-o", out],
        ["heatmap", str(tmp_path / "bomb.png"), "--model", str(model), "-o", out],
        ["heatmap", str(tmp_path / "strip.png"), "--model", str(model), "-o", out],
        ["heatmap", str(tmp_path / "strip.png"), "--model", str(model), "--size", "none", "-o", out],
        ["heatmap", str(tmp_path / "ok.png"), "--model", str(model), "--size", "16384", "-o", out],
        ["heatmap", str(tmp_path / "ok.png"), "--model", str(model), "--size", "100000", "-o", out],
        ["convert", "squeezenet1_1", "--input-size", str(10 ** 12), "-o", str(tmp_path / "big.fcn.pt")],
    ]
    results = bounded_cli(runs)
    assert len(results) == len(runs), results
    for (code, output, unexpected), args in zip(results, runs):
        errors = [line for line in output.splitlines() if line.startswith("Error: ")]
        assert unexpected is None and "Traceback" not in output and "unexpected" not in output, (args, output)
        assert code in (1, 2), (args, output)
        assert len(errors) >= 1 and "out of memory" not in output.lower() or code == 2, (args, output)
    # the top-k bomb is no error at all: it is clamped to the classes there are
    code, output, _ = bounded_cli([["heatmap", str(tmp_path / "ok.png"), "--model", str(model), "--top-k",
                                    str(10 ** 20), "--force", "-o", out]])[0]
    assert code == 0 and output.count("peak cell") == 5, output
    assert not (tmp_path / "big.fcn.pt").exists()
