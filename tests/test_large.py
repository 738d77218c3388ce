"""Images larger than memory: read by region, computed in exact tiles, streamed to a map store; the result
equals the in-memory heatmap of the same pixels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

import convify
from convify import sources
from convify.cli import cli
from convify.large import is_large, large_heatmap
from convify.mapstore import open_map
from convify.tiling import plan_tiles

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]


class Small(nn.Module):
    """Stride 8, padded convolutions and a ceil-mode pool: every kind of border the tiles must get right."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(F.relu(self.pool(F.relu(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


@pytest.fixture(scope="module")
def small() -> convify.FullyConvNet:
    torch.manual_seed(0)
    return convify.convert(Small().eval(), 32, classes=CLASSES, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, Path]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (301, 389, 3), dtype=np.uint8)
    pixels[40:90, 250:330] = (250, 20, 20)  # something for the classes to find
    path = tmp_path_factory.mktemp("large") / "big.tif"
    tifffile.imwrite(path, pixels, tile=(64, 64), photometric="rgb")
    return pixels, path


@pytest.mark.parametrize("pad", ["reflect", "zeros", "none"])
def test_streamed_map_equals_the_in_memory_heatmap(tmp_path: Path, small: convify.FullyConvNet,
                                                   picture: tuple[np.ndarray, Path], pad: str) -> None:
    pixels, path = picture
    budget = 700_000  # forces many crops (this net takes ~28 bytes a pixel)
    result = large_heatmap(path, tmp_path, small, pad=pad, queries=["cat", 4], top_k=3, max_memory=budget)
    reference = convify.heatmap(Image.fromarray(pixels), small, size=None, pad=pad)
    assert result.passes > 4
    assert result.map_size == tuple(reference.logits.shape[1:])
    store = open_map(result.store)
    for index in (2, 4):
        torch.testing.assert_close(torch.from_numpy(store.logits(index)), reference.logits[index],
                                   rtol=1e-5, atol=1e-5)
    indices, probs = store.top_k()
    expected = torch.topk(reference.probs, 3, dim=0)
    torch.testing.assert_close(torch.from_numpy(probs).permute(2, 0, 1), expected.values, rtol=1e-5, atol=1e-6)
    assert (torch.from_numpy(indices).permute(2, 0, 1).long() == expected.indices).float().mean() > 0.99
    summary = json.loads((tmp_path / "big.json").read_text())
    assert summary["top"][0]["name"] == reference.top(1)[0].name
    assert summary["top"][0]["cell"] == list(reference.top(1)[0].cell)
    assert summary["pad"] == list(reference.pad) and summary["passes"] == result.passes
    pngs = sorted(p.name for p in tmp_path.glob("big.*.png"))
    assert pngs == ["big.cat_2.png", "big.eel_4.png"]
    assert max(Image.open(tmp_path / pngs[0]).size) <= 4096


def test_only_strips_of_a_band_are_read(tmp_path: Path, small: convify.FullyConvNet, picture: tuple[np.ndarray, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No read taller than a strip or the read-ahead, nor wider than a band: the image is never decoded whole;
    and consecutive strips are served from one read (each row of a band decoded once, edges aside)."""
    from convify import limits

    _, path = picture
    reads: list[tuple[int, int, int, int]] = []
    original = sources.TiffSource.read

    def counting(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        reads.append((x0, y0, x1, y1))
        return original(self, x0, y0, x1, y1)

    monkeypatch.setattr(sources.TiffSource, "read", counting)
    monkeypatch.setattr(limits, "READ_AHEAD_ROWS", 100)
    budget = 700_000
    result = large_heatmap(path, tmp_path, small, max_memory=budget, formats=("json",))
    pad = json.loads((tmp_path / "big.json").read_text())["pad"]
    plan = plan_tiles(small, 301 + pad[1] + pad[3], 389 + pad[0] + pad[2], max_memory=budget)
    assert plan.strip and result.streamed and result.passes == plan.count
    tallest = max(plan.strip, 100)
    band = max(c[1][1] - c[1][0] for c in plan.cols)
    assert max(y1 - y0 for _, y0, _, y1 in reads) <= tallest and max(x1 - x0 for x0, _, x1, _ in reads) <= band
    assert max((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in reads) < 301 * 389 / 2
    # one read per 100 rows of a band (one more where the reflected top edge is read first), not one per strip
    assert len(reads) <= len(plan.cols) * (-(-plan.rows[0][1][1] // tallest) + 1) < plan.count


def test_crops_read_only_their_regions(tmp_path: Path, small: convify.FullyConvNet,
                                       picture: tuple[np.ndarray, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A network whose graph does not stream is cut into crops, each read alone, none of them the whole image."""
    from convify import tiling

    _, path = picture
    areas: list[int] = []
    original = sources.TiffSource.read

    def counting(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        areas.append((x1 - x0) * (y1 - y0))
        return original(self, x0, y0, x1, y1)

    monkeypatch.setattr(sources.TiffSource, "read", counting)
    monkeypatch.setattr(tiling, "stream_refusal", lambda fcn: "as if it had a permute")
    budget = 700_000
    result = large_heatmap(path, tmp_path, small, max_memory=budget, formats=("json",))
    pad = json.loads((tmp_path / "big.json").read_text())["pad"]
    plan = plan_tiles(small, 301 + pad[1] + pad[3], 389 + pad[0] + pad[2], max_memory=budget)
    largest = max((r[1][1] - r[1][0]) * (c[1][1] - c[1][0]) for r in plan.rows for c in plan.cols)
    assert not plan.strip and not result.streamed
    assert len(areas) == result.passes == plan.count
    assert max(areas) <= largest < 301 * 389 / 2


def test_the_command_line_streams_big_images_and_says_so(tmp_path: Path, small: convify.FullyConvNet,
                                                         picture: tuple[np.ndarray, Path]) -> None:
    _, path = picture
    model = small.save(tmp_path / "small.fcn.pt")
    assert is_large(path, None, max_pixels=10_000) and not is_large(path, "auto", max_pixels=10_000)
    runner = CliRunner()
    args = ["heatmap", str(path), "--model", str(model), "--size", "none", "--max-pixels", "10000",
            "--max-memory", "1M", "-o", str(tmp_path / "out")]
    done = runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "strips):" in done.output and "out/big.zarr" in done.output
    assert (tmp_path / "out" / "big.zarr").is_dir() and (tmp_path / "out" / "big.json").is_file()
    again = runner.invoke(cli, args)  # done: skipped (its store and summary exist)
    assert again.exit_code == 0 and again.output.strip() == f"{path}: skipped, its outputs exist (--force redoes it)"
    (tmp_path / "out" / "big.json").unlink()  # the store without its summary: in part, not redone without --force
    again = runner.invoke(cli, args)
    assert again.exit_code == 1 and "big.zarr exists but" in again.output
    assert runner.invoke(cli, args + ["--force"]).exit_code == 0 and (tmp_path / "out" / "big.json").is_file()
    npy = runner.invoke(cli, args + ["--force", "--format", "npy"])
    assert npy.exit_code == 1 and "npy is not written for a streamed image" in npy.output


def test_overlays_pool_the_map_a_strip_at_a_time(tmp_path: Path, small: convify.FullyConvNet,
                                                 picture: tuple[np.ndarray, Path]) -> None:
    """Overlays read the store in strips and max-pool cells closer than a thumbnail pixel: the pooled maps
    equal a max-pool of the whole maps read at once."""
    from convify.large import pooled_maps

    _, path = picture
    result = large_heatmap(path, tmp_path, small, queries=["dog"], top_k=3, overlay_side=64)
    store = open_map(result.store)
    rows, cols = store.map_size
    indices, probs = store.top_k()
    for factor in (1, 3, 4):
        pooled = pooled_maps(store, [3, 0, 5], factor, strip=7)
        whole = [store.probs(3)] + [np.where(indices == c, probs, 0.0).max(axis=-1) for c in (0, 5)]
        for got, full in zip(pooled, whole):
            expected = F.max_pool2d(torch.from_numpy(np.asarray(full, np.float32))[None, None], factor,
                                    ceil_mode=True)[0, 0]
            torch.testing.assert_close(torch.from_numpy(got), expected)
    drawn = Image.open(tmp_path / "big.dog_3.png")
    assert max(drawn.size) <= 64 + 40  # the thumbnail plus its legend strip


def test_a_streamed_run_never_writes_over_its_image(tmp_path: Path, small: convify.FullyConvNet,
                                                    picture: tuple[np.ndarray, Path]) -> None:
    """A TIFF named like the summary (photo.json) in the output folder is refused, force or not."""
    from convify import OutputError

    pixels, _ = picture
    disguised = tmp_path / "photo.json"
    tifffile.imwrite(disguised, pixels, tile=(64, 64), photometric="rgb")
    before = disguised.read_bytes()
    with pytest.raises(OutputError, match="input"):
        large_heatmap(disguised, tmp_path, small, force=True, formats=("json",))
    assert disguised.read_bytes() == before
