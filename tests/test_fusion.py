"""Multi-scale and flip fusion (``heatmap(scales=, flip=)``): maps placed by their geometry, mirrored back cell by
cell, probabilities averaged on one grid."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

import convify
from convify import ConvifyError
from convify.cli import cli


class Symmetric(nn.Module):
    """Padding-free (each cell is the classifier on its window) and mirror-symmetric (every kernel equals its
    mirror image, and at 18 px every strided window is placed symmetrically): on a mirrored 18 px crop it
    gives what it gives on the crop."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 5)
        self.b = nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            for conv in (self.a, self.b):
                conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(F.relu(self.a(x)), 2)
        return self.fc(F.relu(self.b(x)).mean((2, 3)))


class RedDetector(nn.Module):
    """Class 0 scores red light, class 1 its absence: the peak of class 0 is where the red square is."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 1, 5)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.a.weight.zero_()
            self.a.weight[0, 0] = 1.0 / 25
            self.a.weight[0, 1:] = -1.0 / 50
            self.a.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[4.0], [-4.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.a(x)), 2)
        return self.fc(F.avg_pool2d(x, 2).mean((2, 3)))


def _net(model: nn.Module, size: int) -> convify.FullyConvNet:
    torch.manual_seed(0)
    return convify.convert(model.eval(), size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_a_mirrored_map_is_placed_back_cell_by_cell() -> None:
    """Each mirrored-back cell equals the network on the crop of the original image at its box: the grid is
    not symmetric (83 - 18 px is not a multiple of the stride), so reversing the columns would be wrong."""
    torch.manual_seed(0)
    net = _net(Symmetric(), 18)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8), "RGB")
    fused = convify.heatmap(picture, net, size=None, pad="none", flip=True)
    plain, back = fused.parts
    assert (83 - 18) % net.geometry.stride and not torch.equal(back.boxes, plain.boxes)
    for i in range(back.logits.shape[1]):
        for j in range(back.logits.shape[2]):
            x0, y0, x1, y1 = (int(v) for v in back.boxes[i, j])
            crop = convify.heatmap(picture.crop((x0, y0, x1, y1)), net, size=None, pad="none")
            torch.testing.assert_close(back.logits[:, i, j], crop.logits[:, 0, 0], rtol=1e-5, atol=1e-5)


def test_one_scale_without_flip_is_the_plain_map() -> None:
    net = _net(Symmetric(), 18)
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8), "RGB")
    plain = convify.heatmap(picture, net, size=None, pad="none")
    fused = convify.heatmap(picture, net, size=None, pad="none", scales=(1,))
    torch.testing.assert_close(fused.probs, plain.probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.boxes, plain.boxes)
    assert fused.fusion == {"scales": [1], "flip": False} and len(fused.parts) == 1


@pytest.mark.parametrize("pad", ["reflect", "none"])
def test_a_known_peak_stays_in_place_across_scales_and_flips(pad: str) -> None:
    net = _net(RedDetector(), 16)
    pixels = np.zeros((90, 120, 3), np.uint8)
    pixels[25:37, 20:32, 0] = 255  # a red square centred at (26, 31), left of the centre line
    picture = Image.fromarray(pixels, "RGB")
    fused = convify.heatmap(picture, net, size=None, pad=pad, scales=(1, 1.5, 2), flip=True)
    assert len(fused.parts) == 6 and fused.fusion == {"scales": [1, 1.5, 2], "flip": True}
    for result in (fused, *fused.parts):
        x0, y0, x1, y1 = result.prediction(0).box
        assert x0 <= 26 <= x1 and y0 <= 31 <= y1, (result.fusion, result.boxes.shape)
    # the fused grid is the finest one (scale 2) and its image-level prediction is its cells' average
    assert fused.logits.shape == fused.parts[4].logits.shape
    torch.testing.assert_close(fused.image_probs(), fused.probs.mean(dim=(1, 2)))
    assert abs(float(fused.probs.sum(0).mean()) - 1) < 1e-5


def test_bad_scales_and_the_command_line(tmp_path: Path) -> None:
    net = _net(RedDetector(), 16)
    picture = Image.new("RGB", (60, 50), (200, 10, 10))
    for bad in ((), (0,), (-1,), (10,), ("1",), tuple([1.0] * 9)):
        with pytest.raises(ConvifyError, match="scales must be"):
            convify.heatmap(picture, net, size=None, scales=bad)
    model = net.save(tmp_path / "net.fcn.pt")
    picture.save(tmp_path / "a.png")
    runner = CliRunner()
    ok = runner.invoke(cli, ["heatmap", str(tmp_path / "a.png"), "--model", str(model), "--size", "none",
                             "--scales", "1,1.5", "--flip", "-o", str(tmp_path), "--format", "json,png"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads((tmp_path / "a.json").read_text())
    assert summary["fusion"] == {"scales": [1.0, 1.5], "flip": True}
    assert (tmp_path / "a.heatmap.png").is_file()
    bad = runner.invoke(cli, ["heatmap", str(tmp_path / "a.png"), "--model", str(model), "--scales", "1,x"])
    assert bad.exit_code == 2 and "comma-separated factors" in bad.output
