"""convify bench: what it measures is what it says (the FLOP ratio against a count by hand), and the command."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import convify
from convify.bench import bench, format_rows
from convify.cli import cli
from convify.finer import finer_stride


class OneConv(nn.Module):
    """conv 4x4 stride 2 (3 -> 8), global mean, Linear(8 -> 5): FLOPs countable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def _conv_flops(side: int) -> int:
    positions = ((side - 4) // 2 + 1) ** 2
    return positions * 2 * 4 * 4 * 3 * 8


def test_the_flop_ratio_is_the_crops_work_over_the_dense_work() -> None:
    torch.manual_seed(0)
    model = OneConv().eval()
    fcn = convify.convert(model, 20)  # a 9x9 map of 8 channels; the head: stride-1 9x9 mean, then a 1x1 layer
    row, end_to_end = bench("one-conv", fcn, model, sizes=[36], repeat=1)
    assert end_to_end.what == "heatmap" and end_to_end.seconds > 0 and end_to_end.reference_seconds > 0
    cells = fcn.output_size(36, 36)[0] ** 2
    assert row.cells == cells == 81 and row.reference == "81 crops"
    crop = _conv_flops(20) + 2 * 8 * 5  # the conv, then Linear(8 -> 5) once (torch counts no mean)
    dense = _conv_flops(36) + cells * 2 * 8 * 5  # the conv over the image, the 1x1 layer at every cell
    assert row.flop_ratio == pytest.approx(cells * crop / dense)
    assert row.efficiency == pytest.approx(row.speedup / row.flop_ratio)
    assert row.seconds > 0 and row.reference_seconds > 0 and row.peak_bytes > 0
    # at the native size there is one crop and the same work
    native, _ = bench("one-conv", fcn, model, sizes=[20], repeat=1)
    assert native.cells == 1 and native.flop_ratio == pytest.approx(1.0)


def test_finer_strides_are_timed_against_shift_and_stitch() -> None:
    torch.manual_seed(0)
    model = OneConv().eval()
    fcn = convify.convert(model, 20)
    rows = bench("one-conv", fcn, None, sizes=[40], strides=[1], repeat=1)
    assert [r.what for r in rows] == ["dense", "heatmap", "stride 1"]
    assert rows[2].reference == "shift-and-stitch (4 passes)"
    assert rows[2].cells == finer_stride(fcn, 1).output_size(40, 40)[0] ** 2
    lines = format_rows(rows)
    assert len(lines) == 4 and "speed-up" in lines[0] and "stride 1" in lines[3]


def test_the_bench_command(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = convify.convert(OneConv().eval(), 20).save(tmp_path / "one.fcn.pt")
    runner = CliRunner()
    done = runner.invoke(cli, ["bench", str(path), "--size", "40", "--size", "28", "--stride", "1", "--repeat", "1",
                               "--threads", "1"])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert lines[0].startswith("torch ") and "1 threads" in lines[0] and "FLOP ratio" in lines[1]
    assert sum(" dense " in line for line in lines) == 2 and sum("stride 1" in line for line in lines) == 2
    assert sum(" heatmap " in line for line in lines) == 2
    small = runner.invoke(cli, ["bench", str(path), "--size", "8"])
    assert small.exit_code == 1 and "smaller than the network's" in small.output and "Traceback" not in small.output
    unknown = runner.invoke(cli, ["bench", "no_such_architecture_xyz"])
    assert unknown.exit_code == 1 and "Traceback" not in unknown.output


def test_throughput_times_the_pipeline_against_the_same_batches_bare(tmp_path: Path) -> None:
    """convify bench --folder: one row per batch size, the bare forward run on the batches heatmaps() runs."""
    from convify.bench import generated_images, throughput
    from test_cli import tiny_network

    fcn = tiny_network()
    (tmp_path / "in").mkdir()
    images = generated_images(tmp_path / "in", 5, 96, 64)
    rows = throughput("tiny", fcn, images, batch_sizes=(1, 2), workers=0, repeat=1)
    assert [(r.batch_size, r.images, r.workers) for r in rows] == [(1, 5, 0), (2, 5, 0)]
    assert all(r.bare > 0 and r.pipeline > 0 and r.written > 0 for r in rows)
    model = fcn.save(tmp_path / "tiny.fcn.pt")
    result = CliRunner().invoke(cli, ["bench", str(model), "--folder", str(tmp_path / "in"), "--batch-size", "2",
                                      "--workers", "0", "--repeat", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:6] == ["model", "images", "batch", "workers", "bare", "img/s"]
    assert lines[2].split()[1:4] == ["5", "2", "0"] and lines[2].split()[6].endswith("x")
