"""Space-to-depth stems (TResNet, timm's ``SpaceToDepth``): a window of the block at a stride of the block."""
import pytest
import torch
from timm.layers import SpaceToDepth as TimmSpaceToDepth
from torch import nn

import convify
from hostile import assert_crafted_layer_refused
from convify.layers import SpaceToDepth
from convify.tiling import plan_tiles, tiled_map


class Stem(nn.Module):
    """timm's space-to-depth, then convolutions without padding: cells equal the original on their crops."""

    def __init__(self) -> None:
        super().__init__()
        self.s2d = TimmSpaceToDepth()
        self.conv = nn.Conv2d(48, 8, 3)
        self.down = nn.Conv2d(8, 16, 2, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.down(torch.relu(self.conv(self.s2d(x)))).mean((2, 3)))


def test_the_layer_folds_blocks_as_timm_does_and_leaves_partial_blocks_out() -> None:
    layer, timm_layer = SpaceToDepth(4), TimmSpaceToDepth(4)
    for h, w in ((8, 8), (12, 20), (4, 32)):
        x = torch.randn(2, 3, h, w)
        torch.testing.assert_close(layer(x), timm_layer(x), rtol=0, atol=0)
    x = torch.randn(1, 3, 15, 22)  # 3 rows and 2 columns past the last whole block
    torch.testing.assert_close(layer(x), timm_layer(x[:, :, :12, :20]), rtol=0, atol=0)


@pytest.fixture(scope="module")
def net() -> tuple[nn.Module, convify.FullyConvNet]:
    torch.manual_seed(0)
    model = Stem().eval()
    return model, convify.convert(model, input_size=40)


def test_cells_equal_the_original_on_their_crops(net) -> None:
    model, fcn = net
    g = fcn.geometry
    assert g.stride == 8 and not g.padded and g.receptive_field == g.window == 40
    assert any("SpaceToDepth" in r.before for r in fcn.rewrites)
    x = torch.randn(1, 3, 83, 101)  # not whole blocks: the last rows and columns belong to no cell
    with torch.no_grad():
        maps = fcn(x)
        assert tuple(maps.shape[2:]) == g.output_size(83, 101) == (6, 8)
        for i in range(maps.shape[2]):
            for j in range(maps.shape[3]):
                x0, y0, x1, y1 = g.cell_box(i, j)
                torch.testing.assert_close(maps[0, :, i, j], model(x[:, :, y0:y1, x0:x1])[0])


def test_streamed_and_tiled_runs_equal_the_whole_image(net, tmp_path) -> None:
    model, fcn = net
    x = torch.randn(1, 3, 203, 187)
    assert plan_tiles(fcn, 203, 187, 200_000).strip  # streamed, in two bands
    with torch.no_grad():
        whole = fcn(x)[0]
        torch.testing.assert_close(tiled_map(fcn, x, max_memory=200_000), whole)
        torch.testing.assert_close(convify.load(fcn.save(tmp_path / "s2d.fcn.pt"))(x)[0], whole, rtol=0, atol=0)


@pytest.mark.parametrize("value", [0, 10 ** 6, True, "4; import os", [4, 4], 2.5])
def test_a_crafted_space_to_depth_layer_is_refused(net, tmp_path, value) -> None:
    assert_crafted_layer_refused(net[1], tmp_path, "s2d", "block_size", value, 40)


def test_onnx_export_equals_torch(net, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    net[1].export_onnx(tmp_path / "s2d.onnx")  # checked with onnxruntime at five sizes before it is kept
