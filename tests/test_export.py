"""ONNX export (convify.export, FullyConvNet.export_onnx, convify export): onnxruntime equals torch at several
sizes for zoo models, finer strides and the layers whose sizes depend on the input; the metadata; refusals that
leave nothing on disk; the command's lines and exit codes."""
from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from torch import nn

import convify
import convify.export as export_module
from convify import ConversionError, ConvifyError, OutputExistsError
from convify.cli import cli
from convify.export import METADATA_KEYS, export_onnx
from convify.finer import finer_stride
from convify.fcn import FullyConvNet
from convify.geometry import Geometry
from convify.layers import FinerPool2d, PhaseAvgPool2d, WindowLinear, overhang
from test_finer import CeilAtTheEnd, TinySE

NUM_CLASSES = 5


# --------------------------------------------------------------------------------------------------
# Helpers


def _calibrated(model: nn.Module, size: int) -> nn.Module:
    """Batch-norm statistics from a random batch, so a random network's scores are neither 1e-12 nor 1e12."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    if norms:
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, size, size))
    return model.eval()


def _zoo(source: str, name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        model = timm.create_model(name, num_classes=NUM_CLASSES)
    else:
        kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        model = torchvision.models.get_model(name, num_classes=NUM_CLASSES, **kwargs)
    if name == "alexnet":  # AlexNet's flattening head, thin: a WindowLinear of 6x6 windows without 240 MB
        model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 16), nn.ReLU(),
                                         nn.Linear(16, NUM_CLASSES))
    return _calibrated(model, size)


def _run_onnx(path: Path, x: torch.Tensor) -> list[torch.Tensor]:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {"image": x.numpy()})]


def _assert_onnx_equals_torch(fcn: FullyConvNet, path: Path, shape: tuple[int, int, int, int]) -> None:
    """An independent look at the written file: onnxruntime's map is torch's at a size the export did not check."""
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = fcn(x)
    (actual,) = _run_onnx(path, x)
    assert actual.shape == expected.shape == (shape[0], NUM_CLASSES, *fcn.geometry.output_size(*shape[2:]))
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def _metadata(path: Path) -> dict[str, object]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in model.metadata_props}


class Tiny(nn.Module):
    """Stride 4, a ceil-mode max pool (as a layer) and a ceil-mode average pool (as a call), a global mean head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv(x)))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, 1, ceil_mode=True, count_include_pad=False)
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def plain() -> FullyConvNet:
    """No layer with size-dependent Python: what follows it decides whether the export works."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, NUM_CLASSES))
    return convify.convert(body.eval(), 16)


@pytest.fixture(scope="module")
def tiny() -> FullyConvNet:
    torch.manual_seed(0)
    return convify.convert(Tiny().eval(), 24, arch="test:tiny", classes=[f"c{i}" for i in range(NUM_CLASSES)])


# --------------------------------------------------------------------------------------------------
# Zoo models: onnxruntime equals torch


# One model per pitfall, the fastest of each kind (an export takes 4 to 10 s here; GoogLeNet, DenseNet,
# Inception-v3, timm's EfficientNet-Lite0 and TResNet export too, and take longer).
ZOO = [
    ("torchvision", "alexnet", 224),  # a flattening head: WindowLinear, its form picked by map size
    ("torchvision", "squeezenet1_1", 64),  # ceil-mode max pools
    ("torchvision", "resnet18", 64),  # a global average pool, now a stride-1 AvgPool2d of the native map
    ("torchvision", "efficientnet_b0", 64),  # squeeze-and-excitation: adaptive_avg_pool2d(1) at any size
    ("timm", "convnext_atto", 64),  # LayerNorm2d's permutes; a 1x1 map torch.export cannot trace by itself
    ("torchvision", "mobilenet_v3_small", 64),  # hardswish, hardsigmoid-gated SE
    ("torchvision", "shufflenet_v2_x0_5", 64),  # channel shuffle: views and transposes of the map
    ("torchvision", "regnet_x_400mf", 64),  # grouped convolutions
    ("torchvision", "mnasnet0_5", 64),  # a mean over the map as its pool
    ("timm", "tf_mobilenetv3_small_minimal_100", 64),  # TensorFlow "SAME" padding: sizes torch.export can follow
    ("timm", "convnext_zepto_rms", 64),  # an RMS norm written out (mean of squares, rsqrt) over the channels
    ("timm", "hrnet_w18_small", 64),  # upsampled branches fused: runs at the native size plus whole strides
]
WHOLE_STRIDES = {"hrnet_w18_small"}


@pytest.mark.parametrize("source,name,size", ZOO, ids=[f"{s}:{n}" for s, n, _ in ZOO])
def test_zoo_onnxruntime_equals_torch_at_several_sizes(tmp_path: Path, source: str, name: str, size: int) -> None:
    fcn = convify.convert(_zoo(source, name, size), size, check=False)
    path = fcn.export_onnx(tmp_path / "model.onnx")  # checked at native, larger, non-square, odd, smallest
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no temporary file left beside it
    _assert_onnx_equals_torch(fcn, path, (2, 3, size + 64, size + 96) if name in WHOLE_STRIDES else
                              (2, 3, size + 40, size + 9))
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["scores"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", 3] and all(isinstance(d, str) for d in dims[2:])
    assert dims == ["batch", 3, "height", "width"] if name not in WHOLE_STRIDES else \
        dims[2].replace(" ", "").startswith("32*height_cells") and "width_cells" in dims[3]
    if name == "alexnet":  # torch ran the unfold form at every size checked, the file the convolution
        head = next(m for m in fcn.modules() if isinstance(m, WindowLinear))
        assert head.form_for(1, 6, 6) == "unfold"
        assert any(node.op_type == "Conv" and node.input[1].endswith("classifier.1.weight") for node in graph.node)


def test_default_check_sizes_cover_native_larger_non_square_odd_and_smallest(tiny: FullyConvNet) -> None:
    sizes = export_module.default_check_sizes(tiny)
    n = tiny.meta.input_size
    assert sizes[0] == (1, n, n)
    assert any(h == w > n for _, h, w in sizes)  # larger square
    assert any(h != w for _, h, w in sizes)  # non-square
    assert any(h % 2 and w % 2 for _, h, w in sizes)  # odd
    assert any(b > 1 for b, _, _ in sizes)  # a batch
    smallest = tiny.geometry.min_input_size()
    assert smallest < n and (1, smallest, smallest) in sizes  # the smallest input that gives a map


# --------------------------------------------------------------------------------------------------
# The layers whose sizes depend on the input


def test_ceil_mode_pools_as_layers_and_calls_match_at_every_remainder(tiny: FullyConvNet, tmp_path: Path) -> None:
    sizes = [24 + i for i in range(8)] + [(25, 30), (2, 31, 27), (tiny.geometry.min_input_size(), 33)]
    path = export_onnx(tiny, tmp_path / "tiny.onnx", check_sizes=sizes)
    for h, w in itertools.product((24, 29, 38), (26, 31)):
        _assert_onnx_equals_torch(tiny, path, (1, 3, h, w))


def test_ceil_mode_rewrite_equals_pytorch_pools(one_thread) -> None:
    """The floor-mode pools the export uses for ceil-mode ones give PyTorch's windows and averages, also where
    the last window would start in the padding (kernel 2, stride 3) and PyTorch drops it."""
    for k, s, p, d, n in itertools.product((2, 3), (1, 2, 3), (0, 1), (1, 2), range(4, 12)):
        if n + 2 * p < d * (k - 1) + 1:
            continue
        x = torch.randn(1, 2, n, n + 3)
        layers = [nn.MaxPool2d(k, s, p, d, ceil_mode=True)]
        if d == 1:
            layers += [nn.AvgPool2d(k, s, p, ceil_mode=True, count_include_pad=c) for c in (True, False)]
        for layer in layers:
            rewritten = export_module._ceil_mode_pool(None, layer, (x,), {})
            torch.testing.assert_close(export_module._finer_pool(rewritten, x), layer(x), msg=str(layer))


def test_overhang_closed_form_equals_the_layers_rule() -> None:
    for k, p, d, s, n in itertools.product(range(1, 8), range(0, 4), range(1, 4), range(1, 9), range(1, 80)):
        if p <= k // 2 and n + 2 * p >= d * (k - 1) + 1:
            assert export_module._overhang(n, k, p, d, s) == overhang(n, k, p, d, s), (n, k, p, d, s)


def test_finer_pool_and_phase_pool_export_forms_equal_the_layers(one_thread) -> None:
    for k, p, d, r, n in itertools.product((2, 3), (0, 1), (1, 2), (2, 4), range(4, 12)):
        if n + 2 * p < d * (k - 1) + 1:
            continue
        x = torch.randn(1, 2, n, n + 1)
        for mode, counted in (("max", True), ("avg", True), ("avg", False)):
            pool = FinerPool2d(mode, k, 1, p, d, ceil_stride=r, count_include_pad=counted)
            torch.testing.assert_close(export_module._finer_pool(pool, x), pool(x), equal_nan=True)
    for phases, (h, w) in itertools.product([1, 2, (3, 2), 4], [(1, 1), (2, 3), (7, 5), (9, 12)]):
        x = torch.randn(2, 3, h, w)
        torch.testing.assert_close(export_module._phase_avg_pool(PhaseAvgPool2d(phases), x), PhaseAvgPool2d(phases)(x))


@pytest.mark.parametrize("model,size,stride", [(TinySE(), 32, 1), (CeilAtTheEnd(), 32, 2)],
                         ids=["phase-pools", "ceil-overhang"])
def test_finer_stride_networks_export_and_match(tmp_path: Path, model: nn.Module, size: int, stride: int) -> None:
    torch.manual_seed(0)
    fine = finer_stride(convify.convert(model.eval(), size), stride)
    kinds = {type(m) for m in fine.modules()}
    assert (PhaseAvgPool2d in kinds) if isinstance(model, TinySE) else \
        any(isinstance(m, FinerPool2d) and any(m.ceil_stride) for m in fine.modules())
    sizes = [size, (size + 1, size + 2), (size + 3, size + 5), (size + 6, size + 7), (2, size + 9, size + 4)]
    path = export_onnx(fine, tmp_path / "fine.onnx", check_sizes=sizes)
    _assert_onnx_equals_torch(fine, path, (1, 3, size + 45, size + 22))


def test_finer_zoo_network_exports_and_matches(tmp_path: Path) -> None:
    fcn = convify.convert(_zoo("torchvision", "resnet18", 64), 64, check=False)
    fine = finer_stride(fcn, 16)
    path = fine.export_onnx(tmp_path / "resnet18_s16.onnx")
    _assert_onnx_equals_torch(fine, path, (1, 3, 101, 77))
    assert _metadata(path)["geometry"]["stride"] == 16


class TwoHeads(nn.Module):
    """A head with two outputs: the file has two score maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.a, self.b = nn.Linear(8, NUM_CLASSES), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = F.relu(self.conv(x)).mean((2, 3))
        return self.a(pooled), self.b(pooled)


def test_several_outputs_are_several_score_maps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fcn = convify.convert(TwoHeads().eval(), 16)
    path = export_onnx(fcn, tmp_path / "two.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["scores_0", "scores_1"]
    x = torch.randn(2, 3, 29, 21)
    with torch.no_grad():
        expected = fcn(x)
    for got, want in zip(_run_onnx(path, x), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Metadata


HOSTILE_NAMES = ['say "hi"', "two\nlines", "__import__('os').system('touch PWNED')", "{\"json\": 1}", "\ud800lone"]


def test_metadata_round_trips_as_json_and_class_names_stay_strings(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    fcn = convify.convert(Tiny().eval(), 24, arch="test:tiny'\n", classes=HOSTILE_NAMES, mean=(0.5, 0.4, 0.3),
                          std=(0.25, 0.2, 0.15))
    monkeypatch.chdir(tmp_path)
    path = export_onnx(fcn, tmp_path / "meta.onnx", check_sizes=[24, (30, 27)])
    meta = _metadata(path)
    assert tuple(meta) == METADATA_KEYS
    assert meta["convify_version"] == convify.__version__
    assert meta["arch"] == "test:tiny'\n"
    assert meta["input_size"] == 24
    assert meta["mean"] == [0.5, 0.4, 0.3] and meta["std"] == [0.25, 0.2, 0.15]
    assert meta["classes"] == HOSTILE_NAMES
    assert Geometry.from_dict(meta["geometry"]) == fcn.geometry
    assert meta["checked_sizes"] == [[1, 24, 24], [1, 30, 27]]
    assert not (tmp_path / "PWNED").exists()
    raw = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert raw["classes"].isascii() and "\n" not in raw["classes"]  # escaped inside the JSON text


def test_unnamed_classes_and_unknown_arch_are_null_and_float64_exports_as_float32(tmp_path: Path) -> None:
    fcn = convify.convert(Tiny().eval(), 24).double()  # exported from a float32 copy; the network is left as it is
    path = export_onnx(fcn, tmp_path / "m.onnx", check_sizes=[24])
    meta = _metadata(path)
    assert meta["classes"] is None and meta["arch"] is None
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(p.dtype == torch.float64 for p in fcn.parameters())


# --------------------------------------------------------------------------------------------------
# Refusals: one line, nothing left on disk


def test_overwrite_refused_without_force(tiny: FullyConvNet, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="already exists"):
        export_onnx(tiny, path, check_sizes=[24])
    assert path.read_bytes() == b"keep me"
    export_onnx(tiny, path, check_sizes=[24], force=True)
    assert onnx.load(str(path)).graph.input[0].name == "image"


def test_a_failing_check_leaves_nothing(tiny: FullyConvNet, tmp_path: Path, monkeypatch) -> None:
    """An export form that is 1% off (the ceil-mode pools') is caught, even though the float64 maps, which judge
    rounding, are computed: they come from the layers' own forwards."""
    pool = export_module._finer_pool
    monkeypatch.setattr(export_module, "_finer_pool", lambda *args: pool(*args) * 1.01)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as caught:
        export_onnx(tiny, out / "m.onnx")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("onnxruntime differs from torch on a 24x24 input: max |difference|")
    assert message.endswith("the export is wrong at this size: not written")
    assert os.listdir(out) == []
    # nor does it touch a file it was allowed to replace
    kept = tmp_path / "kept.onnx"
    kept.write_bytes(b"old")
    with pytest.raises(ConversionError):
        export_onnx(tiny, kept, check_sizes=[24], force=True)  # (the native size only)
    assert kept.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["kept.onnx", "out"]


def test_float32_rounding_is_judged_against_float64(tiny: FullyConvNet, tmp_path: Path, monkeypatch) -> None:
    """With no float32 tolerance at all, every size goes to the float64 maps (of a loaded file's graph too), and
    onnxruntime, as close to them as torch's float32 is, passes."""
    monkeypatch.setattr(export_module, "RTOL", 0.0)
    monkeypatch.setattr(export_module, "ATOL", 0.0)
    loaded = convify.load(tiny.save(tmp_path / "tiny.fcn.pt"))
    export_onnx(loaded, tmp_path / "m.onnx", check_sizes=[24, (2, 37, 30)])
    assert (tmp_path / "m.onnx").is_file()


def test_an_exporter_error_is_one_line(tiny: FullyConvNet, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("\x1b[31mno ONNX function for aten::frobnicate\x1b[0m\nsecond line")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ConversionError, match=r"^cannot export to ONNX: RuntimeError: no ONNX function for "
                                              r"aten::frobnicate$"):
        export_onnx(tiny, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


class _Wrapped(nn.Module):
    """A converted graph with something ONNX export cannot keep after it."""

    def __init__(self, net: nn.Module, what: str) -> None:
        super().__init__()
        self.net, self.what = net, what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if self.what == "median":  # no ONNX function for it
            return y - y.median(dim=1, keepdim=True).values
        return y * 2 if x.shape[2] % 2 else y  # a branch on the size's remainder


@pytest.mark.parametrize("what,reason", [
    ("median", r"cannot export to ONNX: DispatchError: No ONNX function found for .*aten\.median"),
    ("branch", r"cannot export to ONNX: torch\.export fails: the input's size cannot stay dynamic: .*"
               r"guard \(height % 2\) != 0"),
], ids=["unsupported-op", "size-branch"])
def test_networks_that_cannot_export_say_why(plain: FullyConvNet, tmp_path: Path, what: str, reason: str) -> None:
    fcn = FullyConvNet(_Wrapped(plain.net, what), plain.geometry, plain.meta)
    with pytest.raises(ConversionError, match=reason) as caught:
        export_onnx(fcn, tmp_path / "m.onnx")
    assert "\n" not in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_missing_onnxruntime_says_what_to_install(tiny: FullyConvNet, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConvifyError, match=r"onnxruntime is missing.*pip install 'convify\[onnx\]'"):
        export_onnx(tiny, tmp_path / "m.onnx")


def test_opset(tiny: FullyConvNet, tmp_path: Path) -> None:
    path = export_onnx(tiny, tmp_path / "m.onnx", opset=18, check_sizes=[24])
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 18
    for bad in (5, 10 ** 6, "18", True):
        with pytest.raises(ConvifyError, match="opset must be an integer from 18"):
            export_onnx(tiny, tmp_path / "n.onnx", opset=bad)
    with pytest.raises(ConvifyError, match="gives no map"):
        export_onnx(tiny, tmp_path / "n.onnx", check_sizes=[3])
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


# --------------------------------------------------------------------------------------------------
# The command


def _invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_exports_a_converted_file(tiny: FullyConvNet, tmp_path: Path) -> None:
    source = tiny.save(tmp_path / "tiny.fcn.pt")
    out = tmp_path / "onnx" / "tiny.onnx"
    result = _invoke("export", source, "-o", out)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Exported test:tiny (stride 4 px, window 24 px) with dynamic batch, height and width"
    assert lines[1].startswith("Checked: onnxruntime equals torch at 24x24, 88x88, 57x95 (batch 2), 41x25, ")
    assert lines[2] == f"Wrote {out}"
    _assert_onnx_equals_torch(convify.load(source), out, (1, 3, 35, 29))
    # again: refused in one line, exit 1; then --force
    again = _invoke("export", source, "-o", out)
    assert again.exit_code == 1
    assert again.output.splitlines() == [f"Error: {out} already exists; use --force to overwrite it"]
    assert _invoke("export", source, "-o", out, "--force").exit_code == 0
    # the default output: beside MODEL
    assert _invoke("export", source).exit_code == 0 and (tmp_path / "tiny.onnx").is_file()


def test_cli_exports_a_finer_stride(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = convify.convert(TinySE().eval(), 32).save(tmp_path / "se.fcn.pt")
    result = _invoke("export", source, "-o", tmp_path / "se.onnx", "--stride", 2)
    assert result.exit_code == 0, result.output
    assert "(stride 2 px, window 32 px)" in result.output
    assert _metadata(tmp_path / "se.onnx")["geometry"]["stride"] == 2


@pytest.mark.parametrize("args,expected", [
    (["no_such_architecture_xyz"], "Error: unknown architecture"),
    (["missing/model.fcn.pt"], "Error: no such file: missing/model.fcn.pt"),
])
def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch, args: list, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke("export", *args, "-o", "out.onnx")
    assert result.exit_code == 1
    assert len(result.output.splitlines()) == 1 and result.output.startswith(expected), result.output
    assert "Traceback" not in result.output and os.listdir(tmp_path) == []


def test_cli_help_has_an_example() -> None:
    result = _invoke("export", "--help")
    assert result.exit_code == 0 and "Example:" in result.output and "convify[onnx]" in result.output
