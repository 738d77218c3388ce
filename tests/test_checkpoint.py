"""Hostile checkpoint files: convify.checkpoint.read_checkpoint and every entry that reaches it.

Each malicious payload touches a marker file if it ever runs; the tests assert that it never does and
that a one-line ConvifyError (the CLI: exit 1 and one ``Error:`` line) comes back instead. Offline,
random weights, small models.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torchvision.models.convnext import LayerNorm2d

from convify import checkpoint, limits
from convify.checkpoint import read_checkpoint
from convify.cli import cli
from convify.errors import ConversionError, ConvifyError, LimitError, ModelLoadError
from convify.models import load_model, network_for
from hostile import bounded_cli

ROOT = Path(__file__).resolve().parent.parent
UNSAFE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


# --- payloads: each touches MARKER if it runs --------------------------------------------------


def _reduce_payload(call: Callable[[str], tuple[Any, tuple[Any, ...]]]) -> Callable[[Path], Any]:
    """An object whose unpickling calls what ``call(marker)`` returns (``__reduce__``)."""

    def make(marker: Path) -> Any:
        class Payload:
            def __reduce__(self) -> Any:
                return call(str(marker))

        return Payload()

    return make


REDUCERS: dict[str, Callable[[Path], Any]] = {
    "os.system": _reduce_payload(lambda m: (os.system, (f"touch '{m}'",))),
    "eval": _reduce_payload(lambda m: (eval, (f"open({m!r}, 'w')",))),
    "exec": _reduce_payload(lambda m: (exec, (f"open({m!r}, 'w').close()",))),
    "subprocess.Popen": _reduce_payload(lambda m: (subprocess.Popen, (["touch", m],))),
    "open": _reduce_payload(lambda m: (open, (m, "w"))),
}


def _raw_pickle(marker: Path, how: str) -> bytes:
    """Protocol-2 pickles written opcode by opcode (what no __reduce__ class can express).

    - ``getattr``: ``getattr(__import__("os"), "system")("touch MARKER")``
    - ``import_module``: ``getattr(importlib.import_module("os"), "system")("touch MARKER")``
    - ``nested``: a state_dict-like dict whose value, inside a list, is ``os.system(...)``
    - ``stack_global``: protocol 4's STACK_GLOBAL, whose name no opcode scan sees as an argument
    """
    cmd = f"touch '{marker}'".encode()
    unicode = lambda s: b"X" + struct.pack("<I", len(s)) + s  # BINUNICODE
    call_system = {
        "getattr": b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(" + unicode(b"os") + b"tR" + unicode(b"system"),
        "import_module": b"cbuiltins\ngetattr\n(cimportlib\nimport_module\n(" + unicode(b"os") + b"tR"
                         + unicode(b"system"),
    }
    if how == "stack_global":
        short = lambda t: b"\x8c" + bytes([len(t)]) + t  # SHORT_BINUNICODE
        return b"\x80\x04" + short(b"posix") + short(b"system") + b"\x93" + short(cmd) + b"\x85R."
    if how == "nested":
        return b"\x80\x02}" + unicode(b"fc.weight") + b"]cposix\nsystem\n(" + unicode(cmd) + b"tRas."
    return b"\x80\x02" + call_system[how] + b"tR(" + unicode(cmd) + b"tR."


def _torch_zip(pkl: bytes, path: Path) -> None:
    """A zip laid out as torch.save writes it, with ``pkl`` as its data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def _legacy_raw(pkl: bytes, path: Path) -> None:
    """A pre-1.6 torch.save file whose object pickle is ``pkl``."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (checkpoint._LEGACY_MAGIC_NUMBER, 1001, {}))
    path.write_bytes(head + pkl + pickle.dumps([], protocol=2))


def _write_payload(name: str, container: str, fmt: str, marker: Path, path: Path) -> None:
    """Write a file carrying payload ``name`` inside ``container`` in format ``fmt``."""
    if name.startswith("raw:"):
        pkl = _raw_pickle(marker, name[4:])
        (_torch_zip if fmt == "zip" else _legacy_raw)(pkl, path)
        return
    evil = REDUCERS[name](marker)
    if container == "state_dict":
        obj: Any = {"fc.weight": torch.zeros(2, 3), "fc.bias": evil}
    elif container == "nested":
        obj = {"state_dict": OrderedDict(epoch=[{"x": (1, OrderedDict(y=[evil]))}])}
    else:  # whole model: a torchvision model with the payload as an attribute
        model = torchvision.models.squeezenet1_1(num_classes=3)
        model.extra = evil
        obj = model
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))


PAYLOADS = [
    *[(name, container) for name in REDUCERS for container in ("state_dict", "nested", "model")],
    ("raw:getattr", "-"),
    ("raw:import_module", "-"),
    ("raw:nested", "-"),
    ("raw:stack_global", "-"),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.new("RGB", (64, 48), (120, 30, 200)).save(path)
    return path


def _entries(path: Path, image: Path, out: Path) -> list[tuple[str, Callable[[], Any]]]:
    """Every way a user can hand convify a file: the Python API and each CLI command."""
    runner = CliRunner()
    p = str(path)
    return [
        ("read_checkpoint", lambda: read_checkpoint(p)),
        ("load_model", lambda: load_model(p)),
        ("load_model arch", lambda: load_model(p, arch="resnet18")),
        ("network_for model", lambda: network_for(p)),
        ("network_for weights", lambda: network_for("resnet18", weights=p)),
        ("convert", lambda: runner.invoke(cli, ["convert", p, "-o", str(out / "o.pt")])),
        ("convert arch", lambda: runner.invoke(cli, ["convert", p, "--arch", "resnet18", "-o", str(out / "o.pt")])),
        ("heatmap model", lambda: runner.invoke(cli, ["heatmap", str(image), "--model", p, "-o", str(out)])),
        ("heatmap weights", lambda: runner.invoke(cli, ["heatmap", str(image), "--model", "resnet18", "--weights",
                                                        p, "-o", str(out)])),
    ]


def _assert_refused(label: str, call: Callable[[], Any], error: type = ConvifyError) -> str:
    """Run one entry: a library call must raise ``error``; a CLI run must exit 1 with one Error line."""
    if label.startswith(("convert", "heatmap")):
        result = call()
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, (label, result.output, result.exception)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (label, result.output)
        assert "Traceback" not in result.output
        return lines[0]
    with pytest.raises(error) as e:
        call()
    message = str(e.value)
    assert "\n" not in message, (label, message)
    return message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize(("name", "container"), PAYLOADS)
@pytest.mark.parametrize("force_unsafe", [False, True], ids=["env-unset", "env-FORCE_NO_WEIGHTS_ONLY"])
def test_malicious_pickles_never_run_through_any_entry(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch, name: str, container: str, fmt: str,
    force_unsafe: bool,
) -> None:
    if force_unsafe:
        monkeypatch.setenv(UNSAFE_ENV, "1")
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _write_payload(name, container, fmt, marker, path)
    assert not marker.exists()

    for label, call in _entries(path, image, tmp_path):
        message = _assert_refused(label, call, ModelLoadError)
        assert "evil.pt" in message, (label, message)
        assert not marker.exists(), f"payload ran through {label}"
    assert os.environ.get(UNSAFE_ENV) == ("1" if force_unsafe else None)  # restored after each load


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize(("name", "container"), PAYLOADS)
def test_payloads_are_live_when_trusted(tmp_path: Path, name: str, container: str, fmt: str) -> None:
    """The payloads above do run when a file is trusted: the tests that refuse them are not vacuous."""
    import time
    import warnings

    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _write_payload(name, container, fmt, marker, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read_checkpoint(path, trust_pickle=True)
        except ModelLoadError:
            pass  # what ran returns no model; the marker is the point
    for _ in range(100):  # os.system and Popen run a child process
        if marker.exists():
            break
        time.sleep(0.05)
    assert marker.exists()


def test_refusal_names_the_global(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _write_payload("os.system", "state_dict", "zip", marker, path)
    with pytest.raises(ModelLoadError, match=r"pickles class (posix|os)\.system which is not part of torch"):
        read_checkpoint(path)


def test_env_var_is_hidden_from_torch_load_even_if_torch_honoured_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch < 2.6 let TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD override an explicit weights_only=True. Simulate
    # such a torch: convify must still unpickle weights-only.
    real_load = torch.load
    seen: list[bool] = []

    def old_torch_load(*args: Any, weights_only: Any = None, **kwargs: Any) -> Any:
        if os.environ.get(UNSAFE_ENV, "0").lower() in ("1", "y", "yes", "true"):
            weights_only = False
        seen.append(weights_only)
        return real_load(*args, weights_only=weights_only, **kwargs)

    monkeypatch.setattr(torch, "load", old_torch_load)
    monkeypatch.setenv(UNSAFE_ENV, "1")
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    # Suppose the opcode scan before torch.load missed the payload: torch.load alone must refuse it.
    monkeypatch.setattr(checkpoint, "_zip_safe_globals", lambda path, source: [])
    _write_payload("raw:nested", "-", "zip", marker, path)
    with pytest.raises(ModelLoadError):
        read_checkpoint(path)
    assert not marker.exists()
    assert seen == [True]
    assert os.environ[UNSAFE_ENV] == "1"

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    read_checkpoint(good)
    assert seen == [True, True]


# --- names that torch.fx would paste into source ------------------------------------------------


INJECTION = 'x"); __import__("os").system("touch {marker}") #'


def _injected_model(kind: str, marker: Path) -> nn.Module:
    """A torchvision model whose layer/parameter/buffer name is Python code."""
    name = INJECTION.format(marker=marker)
    if kind == "layer-resnet18":
        model = torchvision.models.resnet18(num_classes=3)
        model._modules = OrderedDict((name if k == "relu" else k, v) for k, v in model._modules.items())
        return model
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    if kind == "layer":
        model._modules = OrderedDict((name if k == "1" else k, v) for k, v in model._modules.items())
    elif kind == "parameter":
        conv = model[0]
        conv._parameters = OrderedDict((name if k == "bias" else k, v) for k, v in conv._parameters.items())
    elif kind == "tensor-attribute":  # fx names a tensor kept in a layer's __dict__ by its key there
        model = nn.Sequential(nn.Conv2d(3, 4, 3), LayerNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(4, 2))
        norm = model[1]
        weight = norm._parameters.pop("weight").detach()
        # the same tensor under two keys (a pickle's memo does that): forward reads the first, fx names
        # it by the second (split at dots, so the code has none); a condition runs before anything fails
        norm.__dict__["weight"] = weight
        norm.__dict__[f'x") if getattr(__import__("os"), "system")("touch {marker}") + 1 else getattr(self, "'] = weight
    else:  # buffer
        model[0].register_buffer("scale", torch.ones(1))
        buffers = model[0]._buffers
        model[0]._buffers = OrderedDict((name if k == "scale" else k, v) for k, v in buffers.items())
    return model.eval()


@pytest.mark.parametrize("kind", ["layer", "layer-resnet18", "parameter", "buffer", "tensor-attribute"])
def test_code_in_layer_names_never_runs(tmp_path: Path, image: Path, kind: str) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "names.pt"
    torch.save(_injected_model(kind, marker), path)
    runner = CliRunner()

    with pytest.raises(ConversionError, match="which is not a plain Python name"):
        network_for(str(path))
    for args in (["convert", str(path), "-o", str(tmp_path / "o.pt")],
                 ["heatmap", str(image), "--model", str(path), "-o", str(tmp_path)]):
        result = runner.invoke(cli, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, result.output
        assert lines[-1].startswith("Error: ") and "not a plain Python name" in lines[-1], result.output
        assert "Traceback" not in result.output
    assert not marker.exists()


# --- tensors that lie ---------------------------------------------------------------------------


def _squeezenet_state(**replace: torch.Tensor) -> dict[str, torch.Tensor]:
    state = torchvision.models.squeezenet1_1().state_dict()
    state.update(replace)
    return state


def _expanded_attack(path: Path, classes: int = 3_000_000) -> None:
    """The reported attack: a small state_dict whose classifier is a stride-0 view claiming millions."""
    torch.save(_squeezenet_state(**{
        "classifier.1.weight": torch.zeros(1, 512, 1, 1).expand(classes, 512, 1, 1),
        "classifier.1.bias": torch.zeros(1).expand(classes),
    }), path)


def test_expanded_classifier_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    path = tmp_path / "attack.pt"
    _expanded_attack(path)
    assert path.stat().st_size < 6_000_000
    with pytest.raises(ModelLoadError, match=r"tensor 'classifier.1.weight' of shape \(3000000, 512, 1, 1\) "
                                             r"repeats its data with a zero stride"):
        load_model(str(path), arch="squeezenet1_1")


def test_overlapping_strides_claiming_more_than_the_storage_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "alias.pt"
    weight = torch.zeros(1511).as_strided((1000, 512), (1, 1))  # 512,000 elements over 1,511 stored
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(1000)}, path)
    with pytest.raises(ModelLoadError, match=r"'fc.weight' of shape \(1000, 512\) claims 512000 elements but "
                                             r"its storage holds 1511"):
        read_checkpoint(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_by_name(tmp_path: Path, bad: float) -> None:
    weight = torch.zeros(10, 512, 1, 1)
    weight[3, 7] = bad
    path = tmp_path / "nan.pt"
    torch.save(_squeezenet_state(**{"classifier.1.weight": weight}), path)
    with pytest.raises(ModelLoadError, match=r"tensor 'classifier.1.weight' holds NaN or Inf values"):
        load_model(str(path), arch="squeezenet1_1")
    model = torchvision.models.squeezenet1_1(num_classes=10)
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = bad
    torch.save(model, path)
    with pytest.raises(ModelLoadError, match=r"tensor 'features.0.weight' holds NaN or Inf"):
        load_model(str(path))


def test_large_float16_values_whose_sum_overflows_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "half.pt"
    torch.save({"w": torch.full((100,), 60000.0, dtype=torch.float16)}, path)
    assert read_checkpoint(path)["w"].dtype == torch.float16


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_sparse_tensors_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "sparse.pt"
    torch.save({"w": torch.eye(3).to_sparse()}, path)
    with pytest.raises(ModelLoadError, match="is not a dense CPU tensor"):
        read_checkpoint(path)


def test_limits_on_parameters_tensors_and_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sd.pt"
    torch.save(_squeezenet_state(), path)
    monkeypatch.setattr(limits, "MAX_PARAMETERS", 1000)
    with pytest.raises(LimitError, match=r"over 1000 weights.*convify.limits.MAX_PARAMETERS"):
        read_checkpoint(path)
    monkeypatch.undo()

    monkeypatch.setattr(limits, "MAX_TENSORS", 10)
    with pytest.raises(LimitError, match=r"zip entries.*convify.limits.MAX_TENSORS"):
        read_checkpoint(path)
    monkeypatch.undo()

    monkeypatch.setattr(limits, "MAX_CLASSES", 5)
    torch.save(_squeezenet_state(**{"classifier.1.weight": torch.zeros(7, 512, 1, 1),
                                    "classifier.1.bias": torch.zeros(7)}), path)
    with pytest.raises(LimitError, match=r"classifier of 7 classes.*convify.limits.MAX_CLASSES"):
        load_model(str(path), arch="squeezenet1_1")
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(4, 7)), path)
    with pytest.raises(LimitError, match=r"layer '1' has 7 outputs.*MAX_CLASSES"):
        read_checkpoint(path)


def test_layers_must_agree_with_their_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model[1].out_features = 3_000_000  # a lie the structure would repeat to convify
    path = tmp_path / "lie.pt"
    torch.save(model, path)
    with pytest.raises(LimitError, match="has 3000000 outputs"):
        read_checkpoint(path)
    model[1].out_features = 3
    torch.save(model, path)
    with pytest.raises(ModelLoadError, match=r"layer '1' says \(3, 4\) but its weight has shape \(2, 4\)"):
        read_checkpoint(path)


def test_layer_cycles_and_deep_nesting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    model[1].add_module("loop", model)
    path = tmp_path / "cycle.pt"
    torch.save(model, path)
    with pytest.raises(ModelLoadError, match="contains itself"):
        read_checkpoint(path)

    deep: nn.Module = nn.Linear(2, 2)
    for _ in range(6):
        deep = nn.Sequential(deep)
    torch.save(deep, path)
    monkeypatch.setattr(limits, "MAX_MODULE_DEPTH", 4)
    with pytest.raises(LimitError, match="nest over 4 deep"):
        read_checkpoint(path)


def test_shared_layers_are_fine(tmp_path: Path) -> None:
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), relu, nn.Conv2d(3, 3, 1), relu)
    path = tmp_path / "shared.pt"
    torch.save(model, path)
    assert isinstance(read_checkpoint(path), nn.Sequential)


# --- damaged zips -------------------------------------------------------------------------------


def test_changed_weights_fail_the_crc(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    weights = torch.arange(64, dtype=torch.float32)
    torch.save({"w": weights}, path)
    data = bytearray(path.read_bytes())
    at = data.index(weights.numpy().tobytes())
    data[at + 40] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"is damaged: CRC mismatch in entry 'w/data/0'"):
        read_checkpoint(path)


def test_compressed_and_torchscript_zips_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "z.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/data/0", b"\0" * 10_000_000)  # a zip bomb in miniature
    with pytest.raises(ModelLoadError, match="compressed entry 'archive/data.pkl'"):
        read_checkpoint(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/constants.pkl", b"")
    with pytest.raises(ModelLoadError, match="is a TorchScript archive"):
        read_checkpoint(path)


@pytest.mark.parametrize("cut", [10, 200, -30, -1])
def test_truncated_files_give_one_line_errors(tmp_path: Path, cut: int) -> None:
    for fmt in ("zip", "legacy", "safetensors"):
        path = tmp_path / f"t.{fmt}"
        _valid(fmt, path)
        data = path.read_bytes()
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError) as e:
            read_checkpoint(path)
        assert "\n" not in str(e.value)


def test_errors_of_every_kind_become_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(3)}, path)
    for raised, expected in ((MemoryError(), "out of memory while reading"),
                             (RecursionError(), "nests objects too deeply"),
                             (PermissionError(13, "Permission denied"), "cannot read .*: Permission denied"),
                             (NotImplementedError("zip64"), "NotImplementedError: zip64"),
                             (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), "UnicodeDecodeError")):
        def fail(*args: Any, error: BaseException = raised, **kwargs: Any) -> Any:
            raise error

        monkeypatch.setattr(torch, "load", fail)
        with pytest.raises(ModelLoadError, match=expected) as e:
            read_checkpoint(path)
        assert "\n" not in str(e.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ModelLoadError, match="is not a regular file"):
        read_checkpoint(fifo)


# --- safetensors --------------------------------------------------------------------------------


def _safetensors(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@pytest.mark.parametrize(
    ("content", "error", "expected"),
    [
        (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), None, None),
        (_safetensors({}, length=limits.MAX_HEADER_BYTES + 1), LimitError, "MAX_HEADER_BYTES"),
        (_safetensors({}, length=10_000), ModelLoadError, "header claims 10000 bytes but the file has"),
        (_safetensors(b"{not json"), ModelLoadError, "header is malformed"),
        (_safetensors({"w": 5}), ModelLoadError, "header is malformed \\(entry 'w': no known dtype"),
        (_safetensors({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), ModelLoadError,
         "no known dtype"),
        (_safetensors({"w": {"dtype": "F32", "shape": [3_000_000, 512], "data_offsets": [0, 8]}}, b"\0" * 8),
         ModelLoadError, "data_offsets do not fit"),
        (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
         ModelLoadError, "data_offsets do not fit"),
        (_safetensors({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}), ModelLoadError, "bad shape"),
        (_safetensors({"w": {"dtype": "F32", "shape": [60_000, 60_000], "data_offsets": [0, 8]}}), LimitError,
         "MAX_PARAMETERS"),
        (_safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, struct.pack("<f", float("nan"))),
         ModelLoadError, "holds NaN or Inf"),
    ],
)
def test_safetensors_headers_are_checked_before_reading(
    tmp_path: Path, content: bytes, error: type | None, expected: str | None
) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    if error is None:
        assert read_checkpoint(path)["w"].shape == (2,)
        return
    with pytest.raises(error, match=expected):
        read_checkpoint(path)


# --- fuzzing ------------------------------------------------------------------------------------


def _valid(fmt: str, path: Path) -> None:
    """A small valid file of each format (a tiny state_dict)."""
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4), "n": torch.tensor(3)}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=(fmt == "zip"))


def _mutations(data: bytes, seed: int, count: int) -> list[bytes]:
    """Seeded mutants: flipped, replaced, inserted or deleted bytes, truncations."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4, 16))):
            at = rng.randrange(len(b))
            op = rng.random()
            if op < 0.4:
                b[at] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                b[at] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
            elif op < 0.85:
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
            else:
                del b[at : at + rng.randrange(1, 9)]
        if rng.random() < 0.1:
            b = b[: rng.randrange(len(b))]
        out.append(bytes(b))
    return out


def _rezip_with_pickle(zip_bytes: bytes, pkl: bytes) -> bytes:
    """The same torch.save zip with another data.pkl, CRCs recomputed (to reach torch's unpickler)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)
    return out.getvalue()


def _only_convify_errors(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    try:
        read_checkpoint(path)
    except ConvifyError as e:
        assert "\n" not in str(e)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about odd pickle protocols
@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_fuzz_mutated_files_raise_only_convify_errors(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"f.{fmt}"
    _valid(fmt, path)
    for mutant in _mutations(path.read_bytes(), seed=sum(map(ord, fmt)), count=150):
        _only_convify_errors(path, mutant)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzz_mutated_pickles_inside_valid_zips(tmp_path: Path) -> None:
    path = tmp_path / "f.pt"
    _valid("zip", path)
    original = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        pkl = z.read("f/data.pkl")
    for mutant in _mutations(pkl, seed=7, count=150):
        _only_convify_errors(path, _rezip_with_pickle(original, mutant))


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

if given is not None:

    @pytest.mark.filterwarnings("ignore::UserWarning")
    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(fmt=st.sampled_from(["zip", "legacy", "safetensors"]),
           edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
           keep=st.floats(0.05, 1.0))
    def test_hypothesis_edited_bytes_raise_only_convify_errors(
        tmp_path_factory: pytest.TempPathFactory, fmt: str, edits: list[tuple[float, int]], keep: float
    ) -> None:
        path = tmp_path_factory.mktemp("hyp") / f"h.{fmt}"
        _valid(fmt, path)
        data = bytearray(path.read_bytes())
        for where, value in edits:
            data[int(where * len(data))] = value
        _only_convify_errors(path, bytes(data[: max(1, int(len(data) * keep))]))


# --- memory bombs under an address-space limit -------------------------------------------------


def _bomb(kind: str, path: Path) -> None:
    if kind == "expanded classifier":
        _expanded_attack(path)
    elif kind == "legacy storage claiming 40 GB":
        torch.save({"w": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
        data = path.read_bytes()
        # The pickled storage record ('storage', FloatStorage, key, 'cpu', numel=4, None): claim 10**10.
        at = data.index(b"cpu")
        path.write_bytes(data[:at] + data[at:].replace(b"K\x04", b"\x8a\x05" + (10 ** 10).to_bytes(5, "little"), 1))
    elif kind == "zip storage claiming 40 GB":
        torch.save({"w": torch.zeros(4)}, path)
        with zipfile.ZipFile(path) as z:
            pkl = z.read(f"{path.stem}/data.pkl")
        assert b"K\x04" in pkl
        big = pkl.replace(b"K\x04", b"\x8a\x05" + (10 ** 10).to_bytes(5, "little"), 1)
        path.write_bytes(_rezip_with_pickle(path.read_bytes(), big))
    elif kind == "safetensors claiming 40 GB":
        path.write_bytes(_safetensors({"w": {"dtype": "F32", "shape": [10 ** 10],
                                             "data_offsets": [0, 4 * 10 ** 10]}}, b"\0" * 16))
    else:  # a pickle that asks for a 4 GB bytes object
        _torch_zip(b"\x80\x02B" + struct.pack("<I", 2 ** 32 - 1) + b"abc", path)


BOMBS = ["expanded classifier", "legacy storage claiming 40 GB", "zip storage claiming 40 GB",
         "safetensors claiming 40 GB", "pickle bytes claiming 4 GB"]


def test_memory_bombs_fail_cleanly_under_a_memory_limit(tmp_path: Path) -> None:
    runs, paths = [], []
    for i, kind in enumerate(BOMBS):
        path = tmp_path / f"bomb{i}.pt"
        _bomb(kind, path)
        paths.append(path)
        runs.append(["convert", str(path), "--arch", "squeezenet1_1", "-o", str(tmp_path / f"o{i}.pt")])
        runs.append(["heatmap", str(tmp_path / "no.png"), "--model", "squeezenet1_1", "--weights", str(path),
                     "-o", str(tmp_path)])
    results = bounded_cli(runs)
    assert len(results) == len(runs), results
    for (code, output, unexpected), args in zip(results, runs):
        lines = output.strip().splitlines()
        assert unexpected is None, (args, output, unexpected)
        assert code == 1, (args, output)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "bomb" in lines[0], (args, output)
    assert not any(tmp_path.glob("o*.pt"))
