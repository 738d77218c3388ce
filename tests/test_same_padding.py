"""TensorFlow "SAME" padding (timm's ``tf_*`` models): padding computed for the actual input, cells that move with it.

The references are independent of convify's code: timm's own modules run at each size (its dynamic padding),
the least padding found by search, the gradient of a cell (where it reaches in the image), and whole-image passes.
"""
import math

import pytest
import timm
import torch
from timm.layers import create_conv2d, create_pool2d
from timm.layers.padding import pad_same
from torch import nn

import convify
from hostile import assert_crafted_layer_refused
from convify.finer import finer_stride
from convify.layers import SamePad2d, same_padding
from convify.tiling import tiled_map

NATIVE = 64
# sizes where the padding of some layer differs from the native size's (odd, and every residue mod the stride)
SIZES = [(64, 64), (65, 71), (66, 67), (79, 80), (97, 90)]


class TFSame(nn.Module):
    """timm's dynamic "SAME" layers: Conv2dSame (3x3 and 5x5 at stride 2, 2x2 at stride 1), MaxPool2dSame, a 1x1
    convolution at stride 2 (whose window is narrower than its stride: a negative total clipped at 0)."""

    def __init__(self, linear: bool = False) -> None:
        super().__init__()
        self.stem = create_conv2d(3, 8, 3, stride=2, padding="same")
        self.even = create_conv2d(8, 8, 2, stride=1, padding="same")
        self.dw = create_conv2d(8, 8, 5, stride=2, padding="same", depthwise=True)
        self.pool = create_pool2d("avg" if linear else "max", 3, stride=2, padding="same")
        self.pw = create_conv2d(8, 12, 1, stride=2, padding="same")
        self.act = nn.Identity() if linear else nn.ReLU()
        self.head = nn.Linear(12, 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.act(self.even(x))
        return self.pw(self.pool(self.act(self.dw(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _windows(features: torch.Tensor, window: int, head) -> torch.Tensor:
    """The head applied to every ``window x window`` window of ``features``: ``(N, C, H, W) -> (N, K, H', W')``."""
    rows, cols = features.shape[2] - window + 1, features.shape[3] - window + 1
    cells = [[head(features[:, :, i:i + window, j:j + window]) for j in range(cols)] for i in range(rows)]
    return torch.stack([torch.stack(row, -1) for row in cells], -2)


@pytest.fixture(scope="module")
def net() -> tuple[nn.Module, convify.FullyConvNet]:
    torch.manual_seed(0)
    model = TFSame().eval()
    return model, convify.convert(model, input_size=NATIVE)


def test_same_padding_is_the_least_padding_that_gives_ceil_n_over_stride_outputs() -> None:
    for n in range(1, 40):
        for k in range(1, 7):
            for s in range(1, 5):
                for d in (1, 2):
                    span = d * (k - 1) + 1
                    outputs = lambda total: (n + total - span) // s + 1 if n + total >= span else 0  # noqa: E731
                    least = next(t for t in range(0, span + s) if outputs(t) >= math.ceil(n / s))
                    before, after = same_padding(n, k, s, d)
                    assert (before + after, before) == (least, least // 2), (n, k, s, d)


@pytest.mark.parametrize("kernel, stride, dilation, value", [(3, 2, 1, 0.0), (5, 2, 1, 0.0), (1, 2, 1, 0.0),
                                                             (2, 1, 1, 0.0), (3, 2, 2, -math.inf), ((3, 5), (2, 1), 1, 0.0)])
def test_same_pad_layer_equals_timms_pad_same_at_every_size(kernel, stride, dilation, value) -> None:
    layer = SamePad2d(kernel, stride, dilation, value)
    k, s, d = (v if isinstance(v, tuple) else (v, v) for v in (kernel, stride, dilation))
    for h in range(5, 14):
        for w in (7, 8, 9, 10):
            x = torch.randn(1, 2, h, w)
            torch.testing.assert_close(layer(x), pad_same(x, k, s, d, value=value), rtol=0, atol=0)


def test_the_converter_makes_each_dynamic_pad_a_layer_and_is_exact_at_the_native_size(net) -> None:
    model, fcn = net
    layers = [m for m in fcn.net.modules() if isinstance(m, SamePad2d)]
    assert len(layers) == 5  # stem, even, dw, pool, pw: one per dynamic "SAME" call
    assert sum("SAME" in r.before for r in fcn.rewrites) == 5
    assert fcn.check["max_abs_diff"] < 1e-5
    assert fcn.geometry.size_dependent and fcn.geometry.stride == 16


@pytest.mark.parametrize("size", SIZES)
def test_maps_equal_the_original_layers_at_sizes_where_the_padding_changes(net, size) -> None:
    """Each cell is the original head on its window of the original body's features, the body padding as timm
    pads at this size: a frozen native padding would shift the grid at odd sizes and differ everywhere."""
    model, fcn = net
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = _windows(model.features(x), NATIVE // 16, lambda f: model.head(f.mean((2, 3))))
        actual = fcn(x)
    assert tuple(actual.shape[2:]) == fcn.geometry.output_size(*size)
    torch.testing.assert_close(actual, expected)


def test_a_real_tf_model_equals_its_own_layers_at_odd_sizes() -> None:
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=5).eval()
    fcn = convify.convert(model, input_size=224)
    assert fcn.geometry.size_dependent and fcn.check["max_abs_diff"] < 1e-4
    for size in ((225, 257), (230, 231)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = _windows(model.forward_features(x), 7, model.forward_head)
            torch.testing.assert_close(fcn(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (65, 66), (67, 70), (73, 64)])
def test_receptive_fields_are_where_the_gradient_reaches_at_each_size(size) -> None:
    """A linear net: every pixel of a receptive field moves the cell. The boxes move with the input's size."""
    torch.manual_seed(1)
    fcn = convify.convert(TFSame(linear=True).eval(), input_size=NATIVE)
    g = fcn.geometry
    rows, cols = g.output_size(*size)
    for i, j in {(0, 0), (rows - 1, cols - 1), (rows // 2, 0)}:
        x = torch.randn(1, 3, *size, requires_grad=True)
        fcn(x)[0, 0, i, j].backward()
        reached = x.grad[0].abs().sum(0) > 0
        ys, xs = reached.any(1).nonzero()[:, 0], reached.any(0).nonzero()[:, 0]
        x0, y0, x1, y1 = g.rf_box(i, j, size)
        assert (int(ys[0]), int(ys[-1]) + 1) == (max(y0, 0), min(y1, size[0])), (size, i, j)
        assert (int(xs[0]), int(xs[-1]) + 1) == (max(x0, 0), min(x1, size[1])), (size, i, j)
        # the nominal window keeps its place inside the receptive field
        assert (x0 - g.cell_box(i, j, size)[0], y0 - g.cell_box(i, j, size)[1]) == (g.rf_offset - g.offset,) * 2
    assert g.axis_offsets(NATIVE) == (g.offset, g.rf_offset) == (0, g.rf_offset)
    assert {g.axis_offsets(n)[1] for n in range(64, 80)} != {g.rf_offset}  # they do move
    with pytest.raises(ValueError, match="pass size"):
        g.cell_box(0, 0)


def test_crops_line_up_with_the_whole_image_only_at_its_length_modulo_the_stride(net) -> None:
    """A crop one stride in, as long as the image minus a stride, gives the whole map's cells one column over
    (its interior ones exactly); a crop a pixel shorter pads differently, and its cells differ."""
    model, fcn = net
    g = fcn.geometry
    x = torch.randn(1, 3, 70, 150)
    with torch.no_grad():
        whole = fcn(x)
        aligned, shifted = fcn(x[..., 16:]), fcn(x[..., 16:149])
    first, last = g.exact_cells(16, 150, 150, axis=1)
    assert last - first >= 2
    torch.testing.assert_close(aligned[..., first - 1:last - 1], whole[..., first:last])
    assert not torch.allclose(shifted[..., first - 1:last - 2], whole[..., first:last - 1], atol=1e-3)
    with pytest.raises(ValueError, match="modulo the stride"):
        g.exact_cells(16, 149, 150, axis=1)


@pytest.mark.parametrize("size", [(97, 90), (130, 201)])
def test_tiled_runs_equal_the_whole_image(net, size) -> None:
    model, fcn = net
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        whole = fcn(x)[0]
        tiled = tiled_map(fcn, x, max_memory=200_000)
    torch.testing.assert_close(tiled, whole)
    for axis, length in enumerate(size):
        for _, (start, end) in g_tiles(fcn.geometry, length, axis):
            assert (length - (end - start)) % 16 == 0


def g_tiles(g, length: int, axis: int):
    return g.tiles(length, 1, axis)


def test_a_finer_stride_is_refused_with_the_reason(net) -> None:
    with pytest.raises(convify.ConversionError, match="SAME"):
        finer_stride(net[1], 8)


def test_save_load_and_onnx_export_keep_the_padding_rule(net, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    model, fcn = net
    back = convify.load(fcn.save(tmp_path / "tf.fcn.pt"))
    assert back.geometry == fcn.geometry
    onnx = fcn.export_onnx(tmp_path / "tf.onnx", check_sizes=[(64, 64), (65, 71), (79, 80), (97, 90), (128, 81)])
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = fcn(x)
        torch.testing.assert_close(back(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]),
                                   expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field, value", [("kernel_size", 0), ("kernel_size", 10 ** 9), ("stride", [1, 2, 3]),
                                          ("stride", True), ("dilation", "1; import os"), ("value", "nan"),
                                          ("value", float("nan")), ("kernel_size", "__import__('os')")])
def test_a_crafted_same_pad_layer_in_a_file_is_refused(net, tmp_path, field, value) -> None:
    assert_crafted_layer_refused(net[1], tmp_path, lambda spec: spec["class"] == "SamePad2d", field, value, NATIVE)


@pytest.mark.parametrize("edit", [lambda l: l.update(kernel=[0, 3]), lambda l: l.update(stride=[2]),
                                  lambda l: l.pop("dilation"), lambda l: l.update(pad_before=[0, 0]),
                                  lambda l: l.update(stride=[10 ** 12, 2])])
def test_a_crafted_same_pad_geometry_layer_is_refused(net, tmp_path, edit) -> None:
    from test_fcn import _edit_header

    path = net[1].save(tmp_path / "tf.fcn.pt")

    def change(header: dict) -> None:
        edit(next(layer for layer in header["geometry"]["layers"] if layer["op"] == "same_pad"))

    with pytest.raises(convify.ModelLoadError):
        convify.load(_edit_header(path, change, tmp_path / "evil.fcn.pt"))
