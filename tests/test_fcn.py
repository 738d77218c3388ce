"""Saving and loading converted networks: round trips, files that load without the model's code, files that
must be refused without running anything, and saves that never leave a broken or overwritten file behind.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn

import convify
from convify import ConvifyError, LimitError, ModelLoadError, OutputExistsError
from convify.cli import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
fcn_module = importlib.import_module("convify.fcn")
NUM_CLASSES = 5
CLASSES = ["cat", "dog", "owl", "fox", "elk"]
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.15)


# --------------------------------------------------------------------------------------------------
# Models


class PrivateNet(nn.Module):
    """A model class that exists only in this test file: branches, a pad, a chunk, a cat and a two-layer head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(4, 4, 1)
        self.fc1 = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, NUM_CLASSES)
        with torch.no_grad():  # non-trivial running statistics survive the file
            self.stem[1].running_mean.uniform_(-0.5, 0.5)
            self.stem[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(F.pad(x, (1, 2, 1, 2)))                 # (N, 8, H', W')
        a, b = x.chunk(2, dim=1)                              # 2 x (N, 4, H', W')
        x = torch.cat([F.relu(self.left(x)), self.right(b) * torch.sigmoid(a)], dim=1)  # (N, 12, H', W')
        v = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)     # (N, 12)
        return self.fc2(F.gelu(self.norm(self.fc1(v))))


class TwoHeads(nn.Module):
    """A head with two outputs: the converted network returns a tuple of maps."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2))
        self.cls = nn.Linear(8, NUM_CLASSES)
        self.box = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.features(x).mean([2, 3])
        return self.cls(v).softmax(dim=1), torch.sigmoid(self.box(v))


def _torchvision(name: str) -> nn.Module:
    return torchvision.models.get_model(name, num_classes=NUM_CLASSES).eval()


# name -> (build, native input size, a non-native input (H, W))
MODELS: dict[str, tuple[Callable[[], nn.Module], int, tuple[int, int]]] = {
    "resnet18": (lambda: _torchvision("resnet18"), 224, (288, 320)),
    "squeezenet1_1": (lambda: _torchvision("squeezenet1_1"), 224, (288, 320)),
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small"), 224, (288, 320)),
    "private": (lambda: PrivateNet().eval(), 32, (45, 70)),
    "two_heads": (lambda: TwoHeads().eval(), 24, (40, 57)),
}


def _image(height: int, width: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def _run(net: nn.Module, x: torch.Tensor) -> Any:
    with torch.inference_mode():
        return net(x)


def _as_list(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _convert(model: nn.Module, size: int, name: str) -> convify.FullyConvNet:
    return convify.convert(model, input_size=size, arch=f"test:{name}", classes=CLASSES, mean=MEAN, std=STD)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_fcn() -> convify.FullyConvNet:
    """A cheap converted network whose files the refusal tests edit."""
    torch.manual_seed(0)
    return _convert(PrivateNet().eval(), 32, "private")


@pytest.fixture
def saved(tmp_path: Path, small_fcn: convify.FullyConvNet) -> Path:
    return small_fcn.save(tmp_path / "net.convify")


def _normalised_layers(geometry: convify.Geometry) -> list[dict]:
    """The layer table with lists and tuples alike, for comparing across a file."""
    return json.loads(json.dumps(list(geometry.layers)))


def _edit_header(path: Path, edit: Callable[[dict], Any], out: Path) -> Path:
    """Rewrite the JSON header of a saved file (as an attacker would) and save it to ``out``."""
    payload = torch.load(path, weights_only=True)
    header = json.loads(payload["convify"])
    edit(header)
    payload["convify"] = json.dumps(header)
    torch.save(payload, out)
    return out


def _first(header: dict, op: str) -> dict:
    return next(n for n in header["graph"]["nodes"] if n["op"] == op)


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_keeps_outputs_meta_rewrites_and_check(tmp_path: Path, name: str) -> None:
    build, size, (height, width) = MODELS[name]
    model = build()
    fcn = _convert(model, size, name)
    path = fcn.save(tmp_path / f"{name}.convify")
    assert path == tmp_path / f"{name}.convify" and path.is_file()

    loaded = convify.load(path)
    assert isinstance(loaded, convify.FullyConvNet) and not loaded.training
    # a non-native, non-square input: bit-for-bit the same maps
    x = _image(height, width)
    before, after = _as_list(_run(fcn, x)), _as_list(_run(loaded, x))
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert a.shape[2:] == loaded.output_size(height, width) and min(a.shape[2:]) >= 2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # at the native size the loaded network still equals the original classifier
    x = _image(size, size)
    expected = _run(model, x)
    for e, a in zip(_as_list(expected), _as_list(_run(loaded, x))):
        torch.testing.assert_close(a[..., 0, 0], e)

    assert loaded.meta == fcn.meta
    assert loaded.meta == convify.ModelMeta(arch=f"test:{name}", input_size=size, mean=MEAN, std=STD, classes=CLASSES)
    assert loaded.classes == CLASSES
    assert loaded.rewrites == fcn.rewrites and len(loaded.rewrites) >= 1
    assert [str(r) for r in loaded.rewrites] == [str(r) for r in fcn.rewrites]
    assert loaded.check == fcn.check and loaded.check["max_abs_diff"] is not None
    # every geometry field survives
    for f in fields(convify.Geometry):
        if f.name != "layers":
            assert getattr(loaded.geometry, f.name) == getattr(fcn.geometry, f.name), f.name
    assert _normalised_layers(loaded.geometry) == _normalised_layers(fcn.geometry)
    for h, w in [(size, size), (size - 1, size + 7), (height, width), (2 * size + 3, size)]:
        assert loaded.output_size(h, w) == fcn.output_size(h, w)
    # the same layers, parameters and buffers
    assert sorted((n, type(m).__name__) for n, m in loaded.net.named_modules() if n) == \
        sorted((n, type(m).__name__) for n, m in fcn.net.named_modules() if n)
    state, loaded_state = fcn.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        torch.testing.assert_close(loaded_state[key], state[key], rtol=0, atol=0)


def test_the_default_model_saves_and_loads(tmp_path: Path) -> None:
    """Its graph makes and frees many small tensors: the loader's dry run once took a new result for a freed
    weight (same storage key) and refused the file as one that writes into its weights."""
    from convify.models import default_network

    fcn = default_network()
    loaded = convify.load(fcn.save(tmp_path / "default.fcn.pt"))
    x = _image(256, 300)
    for _ in range(3):  # each shape's dry run, and the runs after it
        torch.testing.assert_close(_run(loaded, x), _run(fcn, x), rtol=0, atol=0)


def test_loaded_geometry_equals_the_converted_geometry(tmp_path: Path, small_fcn: convify.FullyConvNet) -> None:
    loaded = convify.load(small_fcn.save(tmp_path / "net.convify"))
    assert loaded.geometry == small_fcn.geometry


def test_save_creates_missing_folders_and_loads_onto_cpu(tmp_path: Path, small_fcn: convify.FullyConvNet) -> None:
    path = small_fcn.save(str(tmp_path / "a" / "b" / "net.convify"))
    assert path == tmp_path / "a" / "b" / "net.convify"
    loaded = convify.load(str(path), map_location="cpu")
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    x = _image(40, 33)
    torch.testing.assert_close(_run(loaded, x), _run(small_fcn, x), rtol=0, atol=0)


def test_a_loaded_network_saves_again_to_the_same_contents(tmp_path: Path, small_fcn: convify.FullyConvNet) -> None:
    first = small_fcn.save(tmp_path / "first.convify")
    second = convify.load(first).save(tmp_path / "second.convify")
    a, b = torch.load(first, weights_only=True), torch.load(second, weights_only=True)
    header_a, header_b = json.loads(a["convify"]), json.loads(b["convify"])
    assert header_a == header_b
    assert a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        torch.testing.assert_close(b["tensors"][key], a["tensors"][key], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# A file is loaded without the model's code


_CHILD = """
import importlib.util, json, sys
import torch
import convify
assert importlib.util.find_spec("test_fcn") is None, "the test module must not be importable here"
fcn = convify.load(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
with torch.inference_mode():
    out = fcn(x)
print(json.dumps({
    "type": type(fcn).__name__,
    "shape": list(out.shape),
    "values": out.flatten().tolist(),
    "geometry": fcn.geometry.to_dict(),
    "meta": {"arch": fcn.meta.arch, "input_size": fcn.meta.input_size, "mean": list(fcn.meta.mean),
             "std": list(fcn.meta.std), "classes": fcn.meta.classes},
    "rewrites": [str(r) for r in fcn.rewrites],
    "modules": sorted(type(m).__module__ + "." + type(m).__name__ for m in fcn.modules()),
}))
"""


def test_a_file_loads_in_a_process_without_the_model_class(tmp_path: Path, small_fcn: convify.FullyConvNet) -> None:
    path = small_fcn.save(tmp_path / "private.convify")
    x = _image(45, 70, batch=1)
    torch.save(x, tmp_path / "x.pt")
    path_entries = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path_entries), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "x.pt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout.strip().splitlines()[-1])

    expected = _run(small_fcn, x)
    assert child["type"] == "FullyConvNet"
    assert tuple(child["shape"]) == tuple(expected.shape) == (1, NUM_CLASSES, *small_fcn.output_size(45, 70))
    torch.testing.assert_close(torch.tensor(child["values"]).reshape(expected.shape), expected, rtol=0, atol=0)
    assert child["geometry"] == json.loads(json.dumps(small_fcn.geometry.to_dict()))
    assert child["meta"] == {"arch": "test:private", "input_size": 32, "mean": list(MEAN), "std": list(STD),
                             "classes": CLASSES}
    assert child["rewrites"] == [str(r) for r in small_fcn.rewrites]
    assert not any("PrivateNet" in m or "test_fcn" in m for m in child["modules"])


# --------------------------------------------------------------------------------------------------
# Loading runs no code from the file


@pytest.mark.parametrize("target", ["posix.system", "builtins.eval", "builtins.exec", "os.system",
                                    "subprocess.check_output", "torch.load", "builtins.__import__"])
def test_an_operation_outside_the_allowlist_is_refused(tmp_path: Path, saved: Path, target: str) -> None:
    def edit(header: dict) -> None:
        _first(header, "call_function")["target"] = target

    path = _edit_header(saved, edit, tmp_path / "evil.convify")
    with pytest.raises(ModelLoadError, match=f"operation '{target}'.*does not allow"):
        convify.load(path)


@pytest.mark.parametrize("method", ["__reduce__", "register_forward_hook", "numpy", "tolist", "__class__"])
def test_a_tensor_method_outside_the_allowlist_is_refused(tmp_path: Path, saved: Path, method: str) -> None:
    def edit(header: dict) -> None:
        nodes = header["graph"]["nodes"]
        first = _first(header, "call_function")
        nodes[nodes.index(first)] = {**first, "op": "call_method", "target": method}

    path = _edit_header(saved, edit, tmp_path / "evil.convify")
    with pytest.raises(ModelLoadError, match=f"tensor method '{method}'.*does not allow"):
        convify.load(path)


@pytest.mark.parametrize("cls", ["Sequential", "Module", "Dropout", "system", "torch.nn.Conv2d", "GraphModule",
                                 "FullyConvNet"])
def test_a_layer_class_outside_the_allowlist_is_refused(tmp_path: Path, saved: Path, cls: str) -> None:
    def edit(header: dict) -> None:
        spec = next(iter(header["graph"]["modules"].values()))
        spec["class"] = cls

    path = _edit_header(saved, edit, tmp_path / "evil.convify")
    with pytest.raises(ModelLoadError, match=f"layer type '{cls}'.*does not\\s+allow"):
        convify.load(path)


def test_a_graph_operation_kind_outside_the_allowlist_is_refused(tmp_path: Path, saved: Path) -> None:
    def edit(header: dict) -> None:
        _first(header, "call_function")["op"] = "root"

    with pytest.raises(ModelLoadError, match="graph operation 'root'"):
        convify.load(_edit_header(saved, edit, tmp_path / "evil.convify"))


@pytest.mark.parametrize("kind", ["dtype", "memory_format"])
def test_a_constant_naming_a_torch_function_is_refused(tmp_path: Path, saved: Path, kind: str) -> None:
    def edit(header: dict) -> None:
        _first(header, "call_function")["kwargs"] = {"dict": [["x", {kind: "load"}]]}

    with pytest.raises(ModelLoadError, match=f"unknown {kind} 'load'"):
        convify.load(_edit_header(saved, edit, tmp_path / "evil.convify"))


class _CreatesMarker:
    """Unpickling this creates a file: what a malicious file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("where", ["whole", "header", "tensors"])
def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, saved: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    evil = _CreatesMarker(marker)
    if where == "whole":
        torch.save(evil, tmp_path / "evil.convify")
    else:  # a genuine file with one pickled object smuggled in
        payload = torch.load(saved, weights_only=True)
        if where == "header":
            payload["convify"] = evil
        else:
            payload["tensors"]["stem.0.weight"] = evil
        torch.save(payload, tmp_path / "evil.convify")
    assert not marker.exists()
    with pytest.raises(ModelLoadError, match="is not a convify file"):
        convify.load(tmp_path / "evil.convify")
    assert not marker.exists()


def test_a_plain_pickle_file_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=2))
    with pytest.raises(ModelLoadError, match="is not a convify file"):
        convify.load(path)
    assert not marker.exists()


def test_a_placeholder_target_cannot_run_code_at_load(tmp_path: Path, saved: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the injected code creates ./pwned

    def edit(header: dict) -> None:
        _first(header, "placeholder")["target"] = "x=open('pwned', 'w')"

    path = _edit_header(saved, edit, tmp_path / "evil.convify")
    with pytest.raises(ModelLoadError, match="names a input .x=open.*not a plain name"):
        convify.load(path)
    assert not (tmp_path / "pwned").exists(), "loading the file ran code from it"


def _rename_layer(saved: Path, old: str, new: str, out: Path) -> Path:
    """Rename layer ``old`` (and its weights) to ``new`` in a saved file."""
    payload = torch.load(saved, weights_only=True)
    header = json.loads(payload["convify"])
    header["graph"]["modules"][new] = header["graph"]["modules"].pop(old)
    for node in header["graph"]["nodes"]:
        if node["op"] == "call_module" and node["target"] == old:
            node["target"] = new
    payload["tensors"] = {(new + k[len(old):] if k.startswith(old + ".") else k): v
                          for k, v in payload["tensors"].items()}
    payload["convify"] = json.dumps(header)
    torch.save(payload, out)
    return out


@pytest.mark.parametrize("evil", [
    'fc2") and open("pwned", "w") and getattr(self, "fc2',  # breaks out of fx's getattr(self, "...")
    "fc2\nimport os",
    "__class__",        # nn.Module's own attributes cannot be shadowed
    "forward",
    "training",
])
def test_a_layer_name_cannot_inject_code_or_shadow_attributes(tmp_path: Path, saved: Path,
                                                              monkeypatch: pytest.MonkeyPatch, evil: str) -> None:
    monkeypatch.chdir(tmp_path)  # the injected code creates ./pwned
    path = _rename_layer(saved, "right", evil, tmp_path / "evil.convify")
    with pytest.raises(ModelLoadError, match="not a plain name|paths clash"):
        convify.load(path)
    assert not (tmp_path / "pwned").exists(), "loading the network ran code from the file"


def test_layer_names_torch_makes_load_back_and_run_equal(tmp_path: Path) -> None:
    """nn.Sequential's digits and torchvision RegNet's 'block1-0' are names torch makes: they load back."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
    body.add_module("block1-0", nn.Conv2d(8, 8, 3, padding=1))
    model = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES)).eval()
    fcn = convify.convert(model, 32)
    loaded = convify.load(fcn.save(tmp_path / "seq.convify"))
    assert "0.block1-0" in dict(loaded.net.named_modules())
    x = _image(53, 41)
    torch.testing.assert_close(_run(loaded, x), _run(fcn, x), rtol=0, atol=0)
    with torch.inference_mode():
        expected = model(x[..., :32, :32])
    torch.testing.assert_close(_run(loaded, x[..., :32, :32])[..., 0, 0], expected)


def _graph_file(saved: Path, out: Path, nodes: list[dict], modules: Any = None, output: Any = None,
                tensors: Any = None) -> Path:
    """A file whose graph is ``x`` then ``nodes``, returning ``output`` (else the last of them)."""
    def edit(header: dict) -> None:
        first = _first(header, "placeholder")
        last = output if output is not None else {"node": nodes[-1]["name"]}
        header["graph"]["nodes"] = [first, *nodes, {"name": "output", "op": "output", "target": "output",
                                                    "args": {"tuple": [last]}, "kwargs": {"dict": []}}]
        header["graph"]["modules"] = modules or {}

    payload = torch.load(saved, weights_only=True)
    payload["tensors"] = tensors or {}
    torch.save(payload, out)
    return _edit_header(out, edit, out)


def _call(name: str, op: str, target: str, *args: Any, **kwargs: Any) -> dict:
    return {"name": name, "op": op, "target": target, "args": {"tuple": list(args)},
            "kwargs": {"dict": [[k, v] for k, v in kwargs.items()]}}


_X = {"node": "x"}


@pytest.mark.parametrize("nodes", [
    # x.__class__.__reduce_ex__ ... __globals__["__builtins__"]["exec"]: the walk the issue reported
    [_call("a", "call_function", "builtins.getattr", _X, "__class__"),
     _call("b", "call_function", "builtins.getattr", {"node": "a"}, "__init__"),
     _call("c", "call_function", "builtins.getattr", {"node": "b"}, "__globals__"),
     _call("d", "call_function", "_operator.getitem", {"node": "c"}, "__builtins__")],
    [_call("a", "call_function", "builtins.getattr", _X, "_version")],
    [_call("a", "call_function", "builtins.getattr", "text", "shape")],
    [_call("a", "call_function", "_operator.getitem", "open", 0)],
    [_call("a", "call_method", "size", "a string")],
    [_call("a", "call_method", "__getattribute__", _X, "__class__")],
    [_call("a", "call_function", "builtins.exec", "open('pwned', 'w')")],
    [_call("a", "call_function", "torch.load", "pwned")],
    [_call("a", "call_method", "register_forward_hook", _X, 1)],
    [_call("a", "get_attr", "__class__.__init__.__globals__")],
], ids=["getattr-chain", "private-attribute", "getattr-of-constant", "getitem-of-constant",
        "method-of-constant", "getattribute", "exec", "torch-load", "hook", "get-attr-path"])
def test_a_graph_cannot_reach_python_from_the_input(tmp_path: Path, saved: Path, monkeypatch: pytest.MonkeyPatch,
                                                   nodes: list[dict]) -> None:
    monkeypatch.chdir(tmp_path)
    path = _graph_file(saved, tmp_path / "evil.convify", nodes)
    with pytest.raises(ModelLoadError):
        convify.load(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("nodes", [
    [_call("a", "call_function", "_operator.mul", "a", 10 ** 12)],        # a string times 10**12
    [_call("a", "call_function", "_operator.add", [1], [2])],             # lists are not operands
    [_call("a", "call_function", "convify.ops.cast", _X, "cuda")],        # a cast moves no map to a device
    [_call("a", "call_function", "convify.ops.cast", _X, {"dtype": "int64"})],  # nor makes it integers
])
def test_operators_take_tensors_and_numbers_only(tmp_path: Path, saved: Path, nodes: list[dict]) -> None:
    path = _graph_file(saved, tmp_path / "evil.convify", nodes)
    try:
        net = convify.load(path)
    except ModelLoadError:
        return
    with pytest.raises(ModelLoadError, match="not allowed in a converted network"):  # found by the dry run
        _run(net, _image(32, 32))


def test_a_layer_declaring_more_channels_than_its_weights_allocates_nothing(tmp_path: Path, saved: Path) -> None:
    """A tiny file declaring Conv2d(8 -> 3,000,000) is refused before any layer is built for real."""
    def edit(header: dict) -> None:
        header["graph"]["modules"]["left"]["kwargs"]["out_channels"] = 3_000_000

    with pytest.raises(ModelLoadError, match=r"'left' \(Conv2d\) declares 'weight' of shape \(3000000, 8, 3, 3\)"):
        convify.load(_edit_header(saved, edit, tmp_path / "big.convify"))


@pytest.mark.parametrize("field, value", [("stride", "1; import os"), ("kernel_size", ["3", 3]),
                                          ("padding", "__import__('os').system('x')"), ("dilation", "11")])
def test_a_string_where_a_layer_takes_numbers_is_refused_at_load(tmp_path: Path, saved: Path, field: str,
                                                                 value: object) -> None:
    """torch's constructors take a string apart into characters where a size belongs; the loader refuses it
    before any layer is built (a string is allowed only where the argument is one: padding_mode, "same")."""
    def edit(header: dict) -> None:
        header["graph"]["modules"]["left"]["kwargs"][field] = value

    with pytest.raises(ModelLoadError, match=f"'left' \\(Conv2d\\) has a string for its argument '{field}'"):
        convify.load(_edit_header(saved, edit, tmp_path / "strings.convify"))


def test_string_arguments_that_are_strings_load(tmp_path: Path, saved: Path) -> None:
    def edit(header: dict) -> None:
        header["graph"]["modules"]["left"]["kwargs"].update(padding="same", padding_mode="reflect")

    net = convify.load(_edit_header(saved, edit, tmp_path / "same.convify"))
    conv = net.net.get_submodule("left")
    assert (conv.padding, conv.padding_mode) == ("same", "reflect")


@pytest.mark.parametrize("tamper, message", [
    (lambda t: t.__setitem__("fc2.weight", torch.zeros(1).expand(NUM_CLASSES, 16)), "zero stride"),
    (lambda t: t.__setitem__("fc2.weight", torch.zeros(20).as_strided((NUM_CLASSES, 16), (1, 1))),
     "claims 80 elements but its storage holds 20"),
    (lambda t: t["fc2.weight"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
    (lambda t: t["stem.1.running_var"].__setitem__(0, float("inf")), "NaN or Inf"),
    (lambda t: t.__setitem__("extra", torch.zeros(3)), "belongs to no layer"),
])
def test_tensors_that_lie_or_are_not_finite_are_refused(tmp_path: Path, saved: Path, tamper: Callable,
                                                        message: str) -> None:
    payload = torch.load(saved, weights_only=True)
    tamper(payload["tensors"])
    torch.save(payload, tmp_path / "bad.convify")
    with pytest.raises(ModelLoadError, match=message):
        convify.load(tmp_path / "bad.convify")


@pytest.mark.parametrize("edit, field", [
    (lambda h: h["geometry"].update(stride=0), "geometry.stride"),
    (lambda h: h["geometry"].update(stride=10 ** 30), "geometry.stride"),
    (lambda h: h["geometry"].update(window="224"), "geometry.window"),
    (lambda h: h["geometry"]["layers"][1].update(stride=[0, 0]), r"geometry.layers\[1\].stride"),
    (lambda h: h["geometry"]["layers"][1].update(inputs=[5]), r"geometry.layers\[1\]"),
    (lambda h: h["geometry"].update(local="yes"), "geometry.local"),
    (lambda h: h["meta"].update(input_size=10 ** 12), "meta.input_size"),
    (lambda h: h["meta"].update(std=[0, 1, 1]), "meta.std"),
    (lambda h: h["meta"].update(mean=[1, 2]), "meta.mean"),
    (lambda h: h["meta"].update(mean=[10 ** 400, 0, 0]), "meta.mean"),
    (lambda h: h["meta"].update(classes=[1, 2, 3]), r"meta.classes"),
    (lambda h: h["meta"].update(classes=["x"] * 200_000), "meta.classes"),
    (lambda h: h["meta"].update(arch=["list"]), "meta.arch"),
    (lambda h: h.update(rewrites=[[1, 2, 3]]), "rewrites"),
    (lambda h: h.update(check={"max_abs_diff": "small", "max_abs_diff_float64": None}), "check.max_abs_diff"),
    (lambda h: h.update(extra=1), "the header must have exactly"),
])
def test_every_header_field_is_typed_and_range_checked(tmp_path: Path, saved: Path, edit: Callable,
                                                       field: str) -> None:
    with pytest.raises(ModelLoadError, match=field):
        convify.load(_edit_header(saved, edit, tmp_path / "bad.convify"))


def test_argument_integers_are_bounded(tmp_path: Path, saved: Path) -> None:
    """``x.expand(10**12, ...)`` or a pad of 10**9 px: integers in a graph are bounded at load."""
    nodes = [_call("a", "call_function", "torch.nn.functional.pad", _X, {"tuple": [10 ** 9, 0, 0, 0]})]
    with pytest.raises(ModelLoadError, match="integer argument 1000000000"):
        convify.load(_graph_file(saved, tmp_path / "pad.convify", nodes))


def _ref(name: str) -> dict:
    return {"node": name}


def _pads_kept_alive(count: int) -> list[dict]:
    """``count`` pads of ~100 MB each (each within the bound), a 1-pixel view of each kept to the end."""
    nodes = []
    for i in range(count):
        nodes += [_call(f"p{i}", "call_function", "torch.nn.functional.pad", _X, [0, 2000, 0, 2000]),
                  _call(f"v{i}", "call_function", "_operator.getitem", _ref(f"p{i}"),
                        {"tuple": [{"ellipsis": True}, {"slice": [0, 1, None]}]})]
    return nodes


_SQUARES = [_call("s0", "call_method", "size", _X, 2)] + [
    _call(f"s{i + 1}", "call_function", "_operator.mul", _ref(f"s{i}"), _ref(f"s{i}")) for i in range(40)]


@pytest.mark.parametrize("nodes, modules, output, error", [
    # 40,000 copies of the input as a view (0 bytes), then made real: 3.9 GB from a 24 KB input
    ([_call("u", "call_method", "unsqueeze", _X, 0), _call("e", "call_method", "expand", _ref("u"), 40000, -1, -1, -1, -1),
      _call("c", "call_method", "contiguous", _ref("e"))], None, None, "MAX_ACTIVATION_RATIO"),
    ([_call("p", "call_function", "torch.nn.functional.pad", _X, [0, 20000, 0, 8000])], None, None,
     "MAX_ACTIVATION_RATIO"),
    ([_call("p", "call_module", "pad", _X)], {"pad": {"class": "ZeroPad2d", "kwargs": {"padding": 20000}}}, None,
     "MAX_ACTIVATION_RATIO"),
    ([_call("a", "call_function", "torch.cat", [_X] * 5000),
      _call("b", "call_function", "torch.cat", [_ref("a")] * 5000)], None, None, "MAX_ACTIVATION_RATIO"),
    # each pad is freed, but a view of it keeps its storage: counted by storage, not by view
    (_pads_kept_alive(5), None, {"tuple": [_ref(f"v{i}") for i in range(5)]}, "MAX_ACTIVATION_RATIO"),
    # one element viewed 2**24 times, split into 2**24 tensors (Python objects: ~8 GB)
    ([_call("r", "call_method", "reshape", _X, -1),
      _call("o", "call_function", "_operator.getitem", _ref("r"), {"slice": [0, 1, None]}),
      _call("e", "call_method", "expand", _ref("o"), 1 << 24), _call("s", "call_method", "split", _ref("e"), 1)],
     None, None, "MAX_PIECES"),
    # 32 squared 40 times: a 2**45-bit integer
    (_SQUARES, None, None, "beyond int64"),
    # (2**24) ** (2**24): a 50 MB integer that takes minutes, refused before it is computed
    ([_call("a", "call_function", "_operator.pow", 1 << 24, 1 << 24)], None, None, "beyond int64"),
    # upsampling (now in the table) by 4000: 16 million times the input
    ([_call("u", "call_function", "torch.nn.functional.interpolate", _X, scale_factor=4000.0)], None, None,
     "MAX_ACTIVATION_RATIO"),
    ([_call("u", "call_module", "up", _X)], {"up": {"class": "Upsample", "kwargs": {"scale_factor": 4000.0}}}, None,
     "MAX_ACTIVATION_RATIO"),
], ids=["expand-contiguous", "pad", "pad-layer", "cat-of-cats", "views-keep-storage", "split", "int-squares",
        "int-power", "interpolate", "upsample-layer"])
def test_a_graph_cannot_allocate_without_a_bound(tmp_path: Path, saved: Path, nodes: list[dict], modules: Any,
                                                 output: Any, error: str) -> None:
    """Small integers in a graph asking for GBs are refused by a dry run on the meta device, before the
    real run allocates anything (test_bombs.py runs these under a memory cap)."""
    net = convify.load(_graph_file(saved, tmp_path / "bomb.convify", nodes, modules, output))
    with pytest.raises((LimitError, ModelLoadError), match=error):
        _run(net, _image(32, 32))


_WEIGHT = torch.tensor([-1.0, 2.0, 3.0])


@pytest.mark.parametrize("nodes, modules", [
    ([_call("a", "call_method", "mul_", _X, 0.0)], None),                                    # the caller's input
    ([_call("v", "call_method", "view", _X, -1), _call("a", "call_method", "relu_", _ref("v"))], None),  # via a view
    ([_call("c", "call_method", "contiguous", _X), _call("a", "call_function", "_operator.iadd", _ref("c"), 1.0)],
     None),
    ([_call("w", "get_attr", "w"), _call("a", "call_method", "mul_", _ref("w"), 2.0)], None),  # weights drift
    ([_call("w", "get_attr", "w"), _call("a", "call_module", "act", _ref("w"))],
     {"act": {"class": "ReLU", "kwargs": {"inplace": True}}}),
    ([_call("w", "get_attr", "w"), _call("a", "call_function", "torch.nn.functional.relu", _ref("w"), inplace=True)],
     None),
    ([_call("w", "get_attr", "w"), _call("a", "call_function", "torch.add", _ref("w"), 1.0, out=_ref("w"))], None),
    ([_call("w", "get_attr", "w"),   # updates its running statistics at every run
      _call("a", "call_function", "torch.nn.functional.batch_norm", _X, _ref("w"), _ref("w"), training=True)], None),
], ids=["mul_-input", "relu_-view", "iadd", "mul_-weight", "inplace-layer", "inplace-function", "out", "bn-training"])
def test_a_graph_cannot_write_into_its_input_or_weights(tmp_path: Path, saved: Path, nodes: list[dict],
                                                        modules: Any) -> None:
    reads_w = any(n["op"] == "get_attr" for n in nodes)
    path = _graph_file(saved, tmp_path / "writes.convify", nodes, modules, tensors={"w": _WEIGHT.clone()} if reads_w
                       else None)
    x = _image(32, 32)
    before = x.clone()
    try:
        net = convify.load(path)
    except ModelLoadError as e:
        assert "in training mode" in str(e)
        return
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="writes into its input or its weights"):
            _run(net, x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    if reads_w:
        torch.testing.assert_close(net.net.w, _WEIGHT, rtol=0, atol=0)


def test_a_graph_that_fails_at_run_time_is_one_clear_error(tmp_path: Path, saved: Path) -> None:
    """Not ``unexpected RuntimeError``: the file's graph is at fault, and the message says where."""
    path = _graph_file(saved, tmp_path / "fails.convify", [_call("a", "call_method", "view", _X, 7, 7)])
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 40)).save(image)
    result = CliRunner().invoke(cli, ["heatmap", str(image), "--model", str(path), "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert re.search(r"the converted network fails at node 'a' on a 1x3x\d+x\d+ input: shape '\[7, 7\]' is invalid",
                     result.output), result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------------
# Files that are not convify files, or are damaged


def test_a_plain_state_dict_is_not_a_convify_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torchvision.models.squeezenet1_1(num_classes=NUM_CLASSES).state_dict(), path)
    with pytest.raises(ModelLoadError, match="is not a convify file; convert a model first"):
        convify.load(path)


@pytest.mark.parametrize("content", [b"\x00" * 10, os.urandom(4096), b"PK\x03\x04 not really a zip"])
def test_random_bytes_are_not_a_convify_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "noise.convify"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="is not a convify file"):
        convify.load(path)


def test_an_empty_file_is_not_a_convify_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.convify"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a convify file"):
        convify.load(path)


@pytest.mark.parametrize("payload", [
    [1, 2, 3],
    {"convify": "{}", "tensors": {}},
    {"convify": json.dumps({"format": "something.else", "version": 1}), "tensors": {}},
    {"convify": b"bytes", "tensors": {}},
    {"tensors": {}},
])
def test_other_torch_files_are_not_convify_files(tmp_path: Path, payload: Any) -> None:
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(ModelLoadError, match="is not a convify file"):
        convify.load(path)


def test_a_file_from_another_format_version_is_refused(tmp_path: Path, saved: Path) -> None:
    def edit(header: dict) -> None:
        header["version"] = 99

    with pytest.raises(ModelLoadError, match="another version of convify.*convert the model again"):
        convify.load(_edit_header(saved, edit, tmp_path / "future.convify"))


@pytest.mark.parametrize("edit", [
    lambda h: h.pop("meta"),
    lambda h: h.pop("geometry"),
    lambda h: h["meta"].update(colour="blue"),
    lambda h: h["geometry"].update(stride=None, nonsense=1),
    lambda h: h["graph"].pop("nodes"),
    lambda h: _first(h, "call_module").update(target="nowhere"),
    lambda h: h["graph"]["nodes"].reverse(),
    lambda h: _first(h, "call_function").update(args={"weird": 1}),
], ids=["no-meta", "no-geometry", "meta-key", "geometry-key", "no-nodes", "undescribed-layer", "reversed",
        "argument-kind"])
def test_a_damaged_header_is_a_load_error(tmp_path: Path, saved: Path, edit: Callable[[dict], Any]) -> None:
    with pytest.raises(ModelLoadError, match="corrupt|not described|before it is defined|unexpected argument"):
        convify.load(_edit_header(saved, edit, tmp_path / "damaged.convify"))


def test_a_missing_tensor_is_a_load_error(tmp_path: Path, saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    del payload["tensors"]["fc2.weight"]
    torch.save(payload, tmp_path / "damaged.convify")
    with pytest.raises(ModelLoadError, match="corrupt"):
        convify.load(tmp_path / "damaged.convify")


def _set(mapping: dict, key: str, value: Any) -> None:
    mapping[key] = value


_ESCAPES = "fcn.load and serialize.graph_from_data/_decode catch only ValueError/KeyError/TypeError around parts " \
    "of the parsing: a header of the wrong shape escapes as AttributeError/TypeError/KeyError/IndexError"


@pytest.mark.parametrize("edit", [
    pytest.param(None, id="header-is-a-list"),
    pytest.param(lambda h: _set(h["geometry"], "layers", [5]), id="geometry-layer-not-an-object"),
    pytest.param(lambda h: _set(h["graph"], "modules", []), id="modules-not-an-object"),
    pytest.param(lambda h: h["graph"]["modules"].update({k: "Conv2d" for k in h["graph"]["modules"]}),
                 id="layer-spec-not-an-object"),
    pytest.param(lambda h: h["graph"]["nodes"].append("x"), id="node-not-an-object"),
    pytest.param(lambda h: _first(h, "call_module").pop("op"), id="node-without-op"),
    pytest.param(lambda h: _set(_first(h, "call_module"), "args", 5), id="args-not-a-list"),
    pytest.param(lambda h: _set(_first(h, "call_module"), "args", {"tuple": 5}), id="tuple-not-a-list"),
    pytest.param(lambda h: _set(_first(h, "output"), "args", {"tuple": []}), id="output-without-value"),
])
def test_a_header_of_the_wrong_shape_is_a_load_error(tmp_path: Path, saved: Path,
                                                     edit: Callable[[dict], Any]) -> None:
    payload = torch.load(saved, weights_only=True)
    if edit is None:
        payload["convify"] = "[1, 2]"
    else:
        header = json.loads(payload["convify"])
        edit(header)
        payload["convify"] = json.dumps(header)
    torch.save(payload, tmp_path / "damaged.convify")
    with pytest.raises(ModelLoadError):
        convify.load(tmp_path / "damaged.convify")


def test_a_missing_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        convify.load(tmp_path / "nothing.convify")
    with pytest.raises(ModelLoadError, match="no such file"):
        convify.load(tmp_path)  # a folder is not a file


# --------------------------------------------------------------------------------------------------
# Saving


def test_save_refuses_to_overwrite_unless_forced(tmp_path: Path, small_fcn: convify.FullyConvNet) -> None:
    path = tmp_path / "net.convify"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="already exists.*force"):
        small_fcn.save(path)
    with pytest.raises(OutputExistsError):
        small_fcn.save(str(path), force=False)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.convify"]

    assert small_fcn.save(path, force=True) == path
    assert path.read_bytes() != b"precious"
    x = _image(32, 32)
    torch.testing.assert_close(_run(convify.load(path), x), _run(small_fcn, x), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.convify"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_save_leaves_no_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_fcn: convify.FullyConvNet, error: BaseException,
    existing: bool,
) -> None:
    path = tmp_path / "net.convify"
    if existing:
        path.write_bytes(b"old")

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"half a file")
        raise error

    monkeypatch.setattr(fcn_module.torch, "save", failing_save)
    with pytest.raises(type(error)):
        small_fcn.save(path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["net.convify"] if existing else [])
    if existing:
        assert path.read_bytes() == b"old"


class _Abs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


def test_a_graph_that_cannot_be_saved_is_refused_before_writing(tmp_path: Path,
                                                                small_fcn: convify.FullyConvNet) -> None:
    net = convify.FullyConvNet(fx.symbolic_trace(_Abs()), small_fcn.geometry, small_fcn.meta)
    with pytest.raises(ConvifyError, match="cannot save: operation torch.abs"):
        net.save(tmp_path / "abs.convify")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# The file is data


def _plain(value: Any) -> bool:
    """Whether a loaded value holds nothing but strings, numbers, containers and tensors."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, torch.Tensor))


def test_the_file_is_data_that_weights_only_loads(tmp_path: Path, small_fcn: convify.FullyConvNet) -> None:
    path = small_fcn.save(tmp_path / "net.convify")
    registered = torch.serialization.get_safe_globals()  # torch and torchvision register some on import
    torch.serialization.clear_safe_globals()
    try:  # the bare weights_only allowlist: tensors, containers, strings, numbers
        payload = torch.load(path, weights_only=True)
    finally:
        torch.serialization.add_safe_globals(registered)
    assert {repr(g) for g in torch.serialization.get_safe_globals()} == {repr(g) for g in registered}
    assert set(payload) == {"convify", "tensors"} and _plain(payload)
    assert all(type(t) is torch.Tensor for t in payload["tensors"].values())  # no Parameters, no subclasses
    header = json.loads(payload["convify"])
    assert header["format"] == "convify.fcn" and header["version"] == 1
    assert set(header) >= {"graph", "geometry", "meta", "rewrites", "check"}
    state = small_fcn.net.state_dict()
    assert set(state) <= set(payload["tensors"])
    for key, value in state.items():
        torch.testing.assert_close(payload["tensors"][key], value, rtol=0, atol=0)
    # every operation the file names is a plain string from the allowlist the loader checks
    for node in header["graph"]["nodes"]:
        assert isinstance(node["target"], str)


# --------------------------------------------------------------------------------------------------
# Fuzzing: damaged and hostile files give ModelLoadError and nothing else


_FUZZ = settings(max_examples=int(os.environ.get("CONVIFY_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    torch.manual_seed(0)
    fcn = _convert(PrivateNet().eval(), 32, "private")
    return fcn.save(tmp_path_factory.mktemp("fuzz") / "net.convify").read_bytes()


def _load_or_refuse(path: Path) -> None:
    """Loading either works or raises ModelLoadError; anything else escapes and fails the test."""
    try:
        convify.load(path)
    except ModelLoadError:
        pass


@_FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_bytes_of_a_converted_file(tmp_path: Path, saved_bytes: bytes, edits: list) -> None:
    data = bytearray(saved_bytes)
    for where, value in edits:
        data[int(where * len(data))] = value
    path = tmp_path / "fuzzed.convify"
    path.write_bytes(bytes(data))
    _load_or_refuse(path)


@_FUZZ
@given(cut=st.floats(0, 1, exclude_max=True))
def test_fuzz_truncated_converted_files(tmp_path: Path, saved_bytes: bytes, cut: float) -> None:
    path = tmp_path / "cut.convify"
    path.write_bytes(saved_bytes[: int(cut * len(saved_bytes))])
    _load_or_refuse(path)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["x", "__class__", "conv2d", "Conv2d", "output", "node", "tuple"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["node", "tuple", "dict", "slice", "dtype", "op", "args", "kwargs", "name", "target", "class"]), inner,
        max_size=3),
    max_leaves=12)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, prefix + (i,))
    return found


@_FUZZ
@given(data=st.data())
def test_fuzz_the_header_structure(tmp_path: Path, saved_bytes: bytes, data: st.DataObject) -> None:
    """Any part of the JSON header replaced by any JSON value: refused cleanly, or loaded and checked."""
    source = tmp_path / "net.convify"
    source.write_bytes(saved_bytes)
    payload = torch.load(source, weights_only=True)
    header = json.loads(payload["convify"])
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(header) if p]
        path = data.draw(st.sampled_from(paths))
        owner = header
        for key in path[:-1]:
            owner = owner[key]
        owner[path[-1]] = data.draw(_JSON)
    payload["convify"] = json.dumps(header)
    torch.save(payload, tmp_path / "fuzzed.convify")
    _load_or_refuse(tmp_path / "fuzzed.convify")
