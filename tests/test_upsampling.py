"""Upsampling by a whole factor inside the body (HRNet's branch fusion): placed by the geometry, exact everywhere.

References are independent of convify's code: the whole-image pass against the image moved by a stride, tiles
against the whole image, the gradient of a cell (the receptive field is a bound that holds it).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convify
from hostile import assert_crafted_layer_refused
from convify.finer import finer_stride
from convify.tiling import tiled_map

NATIVE = 48


class TwoBranches(nn.Module):
    """A stride-4 branch and a stride-8 branch upsampled back and added (HRNet's fusion), then down to stride 16."""

    def __init__(self, mode: str = "nearest", functional: bool = False, padding: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=padding)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=padding)
        self.up = nn.Upsample(scale_factor=2, mode=mode)
        self.functional, self.mode = functional, mode
        self.fuse = nn.Conv2d(8, 12, 3, stride=4, padding=padding)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = torch.relu(self.stem(x))
        low = torch.relu(self.down(high))
        low = F.interpolate(low, scale_factor=2.0, mode=self.mode) if self.functional else self.up(low)
        return self.fc(self.fuse(high + low).mean((2, 3)))


@pytest.fixture(scope="module", params=["nearest", "bilinear", "functional"])
def net(request) -> tuple[nn.Module, convify.FullyConvNet]:
    torch.manual_seed(0)
    mode = "nearest" if request.param == "functional" else request.param
    model = TwoBranches(mode, functional=request.param == "functional").eval()
    return model, convify.convert(model, input_size=NATIVE)


def test_converts_exactly_at_the_native_size_with_a_whole_stride(net) -> None:
    model, fcn = net
    g = fcn.geometry
    assert fcn.check["max_abs_diff"] < 1e-5 and g.stride == 16 and g.local
    assert [layer["scale"] for layer in g.layers if layer["op"] == "upsample"] == [(2, 2)]


def test_moving_the_image_by_a_stride_moves_the_map_by_a_cell(net) -> None:
    model, fcn = net
    g = fcn.geometry
    x = torch.randn(1, 3, 160, 176)
    with torch.no_grad():
        whole, moved = fcn(x), fcn(x[:, :, 16:, 32:])
    assert tuple(whole.shape[2:]) == g.output_size(160, 176)
    rows, cols = g.exact_cells(16, 160, 160, 0), g.exact_cells(32, 176, 176, 1)
    assert rows[1] - rows[0] >= 2 and cols[1] - cols[0] >= 2
    torch.testing.assert_close(moved[..., rows[0] - 1:rows[1] - 1, cols[0] - 2:cols[1] - 2],
                               whole[..., rows[0]:rows[1], cols[0]:cols[1]])


def test_tiles_equal_the_whole_image_and_each_runs(net) -> None:
    """At sizes that are not multiples of the stride, a crop of arbitrary length would not run (its branches would
    not agree in size): the tiles keep the whole axis's length modulo the stride."""
    model, fcn = net
    g = fcn.geometry
    height, width = [n for n in range(170, 400) if g.output_size(n)[0] and n % 16][::7][:2]
    x = torch.randn(1, 3, height, width)
    for axis, length in ((0, height), (1, width)):
        plan = g.tiles(length, 2, axis)
        assert len(plan) >= 3 and all(g.output_size(end - start)[0] for _, (start, end) in plan)
    with torch.no_grad():
        torch.testing.assert_close(tiled_map(fcn, x, max_memory=150_000), fcn(x)[0])


def test_the_receptive_field_holds_every_pixel_that_reaches_a_cell(net) -> None:
    model, fcn = net
    g = fcn.geometry
    size = (144, 160)
    rows, cols = g.output_size(*size)
    for i, j in {(0, 0), (rows // 2, cols // 2), (rows - 1, cols - 1)}:
        x = torch.randn(1, 3, *size, requires_grad=True)
        fcn(x)[0, 0, i, j].backward()
        reached = x.grad[0].abs().sum(0) > 0
        ys, xs = reached.any(1).nonzero()[:, 0], reached.any(0).nonzero()[:, 0]
        x0, y0, x1, y1 = g.rf_box(i, j)
        assert max(y0, 0) <= int(ys[0]) and int(ys[-1]) < min(y1, size[0])
        assert max(x0, 0) <= int(xs[0]) and int(xs[-1]) < min(x1, size[1])
        # a bound, never wider than a cell of the coarser branch (8 px) more than the pixels that reach it
        if i and j and i < rows - 1 and j < cols - 1:
            assert int(ys[0]) - y0 <= 8 and int(xs[0]) - x0 <= 8


def test_save_load_keeps_the_maps_and_a_finer_stride_is_refused(net, tmp_path) -> None:
    model, fcn = net
    back = convify.load(fcn.save(tmp_path / "up.fcn.pt"))
    x = torch.randn(1, 3, 96, 112)
    with torch.no_grad():
        torch.testing.assert_close(back(x), fcn(x), rtol=0, atol=0)
    assert back.geometry == fcn.geometry
    with pytest.raises(convify.ConversionError, match="upsamples"):
        finer_stride(fcn, 8)


class Resize(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.kwargs = kwargs
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        kwargs = dict(self.kwargs)
        if kwargs.pop("like_input", False):
            kwargs["size"] = x.shape[-2:]
        return self.fc(F.interpolate(y, **kwargs).mean((2, 3)))


@pytest.mark.parametrize("kwargs, message", [
    ({"size": (20, 20)}, "target size"), ({"like_input": True}, "target size"),
    ({"scale_factor": 1.5}, "whole factors"), ({"scale_factor": 2, "mode": "bilinear", "align_corners": True},
                                               "align_corners"),
    ({"scale_factor": 2, "mode": "bicubic"}, "mode 'bicubic'"),
])
def test_resizing_that_is_not_translation_equivariant_is_refused_with_the_reason(kwargs, message) -> None:
    with pytest.raises(convify.ConversionError, match=message):
        convify.convert(Resize(**kwargs).eval(), input_size=32)


@pytest.mark.parametrize("field, value", [("scale_factor", 10 ** 6), ("scale_factor", "2; import os"),
                                          ("mode", "__import__('os').system('x')"), ("size", [10 ** 6, 10 ** 6])])
def test_a_crafted_upsampling_layer_in_a_file_is_refused(tmp_path, field, value) -> None:
    torch.manual_seed(0)
    fcn = convify.convert(TwoBranches().eval(), input_size=NATIVE)
    assert_crafted_layer_refused(fcn, tmp_path, "up", field, value, NATIVE, errors=(convify.LimitError,))


@pytest.mark.parametrize("edit", [lambda l: l.update(scale=[10 ** 6, 2]), lambda l: l.update(scale=[0, 2]),
                                  lambda l: l.update(mode="bicubic"), lambda l: l.pop("mode")])
def test_a_crafted_upsampling_geometry_layer_is_refused(tmp_path, edit) -> None:
    from test_fcn import _edit_header

    torch.manual_seed(0)
    path = convify.convert(TwoBranches().eval(), input_size=NATIVE).save(tmp_path / "up.fcn.pt")

    def change(header: dict) -> None:
        edit(next(layer for layer in header["geometry"]["layers"] if layer["op"] == "upsample"))

    with pytest.raises(convify.ModelLoadError):
        convify.load(_edit_header(path, change, tmp_path / "evil.fcn.pt"))


def test_many_upsamplings_in_a_crafted_geometry_are_bounded(tmp_path) -> None:
    from test_fcn import _edit_header

    torch.manual_seed(0)
    path = convify.convert(TwoBranches().eval(), input_size=NATIVE).save(tmp_path / "up.fcn.pt")

    def change(header: dict) -> None:
        layers = header["geometry"]["layers"]
        out = layers.pop()
        for _ in range(40):  # 64 ** 40 per axis
            layers.append({"op": "upsample", "inputs": [len(layers) - 1], "scale": [64, 64], "mode": "nearest"})
        out["inputs"] = [len(layers) - 1]
        layers.append(out)

    with pytest.raises(convify.ModelLoadError, match="upsample"):
        convify.load(_edit_header(path, change, tmp_path / "evil.fcn.pt"))


def test_heatmaps_pad_to_a_size_the_branches_merge_at_or_say_why_not(net) -> None:
    """HRNet-like networks run only where the fused branches' sizes agree; the original fails elsewhere too."""
    from PIL import Image

    model, fcn = net
    image = Image.fromarray(torch.randint(0, 255, (70, 90, 3), dtype=torch.uint8).numpy())
    assert min(fcn.geometry.output_size(70, 90)) == 0
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 70, 90))
    result = convify.heatmap(image, fcn, size=None)
    left, top, right, bottom = result.pad
    assert tuple(result.logits.shape[1:]) == fcn.geometry.output_size(70 + top + bottom, 90 + left + right) != (0, 0)
    with pytest.raises(convify.ImageError, match="branches merge maps"):
        convify.heatmap(image, fcn, size=None, pad="none")


def test_onnx_export_runs_at_the_native_size_plus_whole_strides(net, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from convify.export import default_check_sizes

    model, fcn = net
    sizes = default_check_sizes(fcn)
    assert all((h - NATIVE) % 16 == 0 and (w - NATIVE) % 16 == 0 for _, h, w in sizes) and len(sizes) >= 3
    path = fcn.export_onnx(tmp_path / "up.onnx")  # checked against torch at those sizes before it is kept
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, NATIVE + 5 * 16, NATIVE + 2 * 16)
    with torch.no_grad():
        expected = fcn(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
