"""Finer output strides against shift-and-stitch at the features: equal on every cell, border cells included.

Reference (a). A finer stride removes the last subsampling(s) and dilates what follows. The same map can be
built without any dilation, from the original classifier's own modules (never convify's converted layers):

1. run the original layers up to the subsampling the finer stride removes (the *cut*);
2. run the cut layer itself with stride 1 (a copy with ``.stride`` set to 1; kernel and padding as they
   were, so its padding lies where it lies in the coarse network): a map at the finer resolution whose
   every ``r``-th row and column is the coarse map;
3. split that map into its ``r * r`` phases ``m[:, :, a::r, b::r]``: phase ``(a, b)`` is what the cut layer
   gives on windows shifted by ``(a, b)`` finer strides;
4. run the rest of the original network, undilated, on every phase (the head at every window of the native
   size: a flatten head by ``F.unfold`` + the original ``nn.Linear`` layers, a global-average-pool head by
   an average pool of the native window at stride 1 + the ``Linear`` layers per position);
5. interleave: ``ref[:, :, r * i + a, r * j + b] = phase_out[a][b][:, :, i, j]``.

A layer after the cut run undilated on a phase, with its own padding, is the dilated layer on the whole
map: its taps ``r`` apart stay within one phase, and a tap past the phase's end is a tap past the map's end,
padded alike. So every cell agrees, including the border cells that the shifted-input reference of
test_finer.py skips (the shifted image pads where the whole one has pixels). Two removed subsamplings
(``r = 4``) are the same idea twice: phases at the first cut, then within each phase, phases at the second.

Only PyTorch's own layers and the original weights are used here; convify gives the map under test.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convify
from convify.finer import finer_stride
from test_finer import AvgInside, CeilAtTheEnd, PaddedNet, TinySE

NUM_CLASSES = 5
Map = Callable[[torch.Tensor], torch.Tensor]


def interleave(phases: list[list[torch.Tensor]]) -> torch.Tensor:
    """``ref[:, :, r * i + a, r * j + b] = phases[a][b][:, :, i, j]``; the phases must tile a rectangle."""
    r, first = len(phases), phases[0][0]
    height, width = sum(p[0].shape[2] for p in phases), sum(p.shape[3] for p in phases[0])
    ref = first.new_full((*first.shape[:2], height, width), float("nan"))
    for a in range(r):
        for b in range(r):
            assert ref[:, :, a::r, b::r].shape == phases[a][b].shape, f"phase {(a, b)} does not fit"  # no broadcast
            ref[:, :, a::r, b::r] = phases[a][b]
    assert not ref.isnan().any()
    return ref


def stitch(full: torch.Tensor, rest: Map, r: int = 2) -> torch.Tensor:
    """``rest`` on every ``r * r`` phase of the finer-resolution map ``full``, interleaved."""
    return interleave([[rest(full[:, :, a::r, b::r]) for b in range(r)] for a in range(r)])


def with_stride(layer: nn.Module, stride) -> nn.Module:
    changed = copy.copy(layer)  # shares the original weights; the stride is the copy's own
    changed.stride = stride
    return changed


def cut(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The cut layer (an original pool or convolution) on its whole input at stride 1.

    Padding needs nothing: at stride 1 it pads the same map at the same place as at the original stride.
    Ceil mode does: at stride 1 it adds nothing, but the coarse layer (stride ``s``) may keep a last window
    that hangs past the map's end, and the finer map must hold the coarse map at every ``s``-th cell. So the
    finer map is every window the layer has at stride 1 in one axis or both and ``s`` in the others: the
    stride-1 windows (all inside the map) plus the coarse layer's overhanging last row/column, at
    ``s * (coarse length - 1)``, across every finer column/row. It invents no window that neither the coarse
    nor the stride-1 layer has (the shifted phases get no overhang of their own: their last window would
    start where the coarse layer has no window). Each part is written at its own positions; they agree where
    they overlap, and together they fill the map (an overhang is less than ``s`` positions).
    """
    if not getattr(layer, "ceil_mode", False):
        return with_stride(layer, 1)(x)
    s = nn.modules.utils._pair(layer.stride)
    parts = {(sh, sw): with_stride(layer, (sh, sw))(x) for sh in {1, s[0]} for sw in {1, s[1]}}
    height = max((p.shape[2] - 1) * sh + 1 for (sh, _), p in parts.items())
    width = max((p.shape[3] - 1) * sw + 1 for (_, sw), p in parts.items())
    full = x.new_full((*x.shape[:2], height, width), float("nan"))
    for (sh, sw), p in parts.items():
        full[:, :, :(p.shape[2] - 1) * sh + 1:sh, :(p.shape[3] - 1) * sw + 1:sw] = p
    assert not full.isnan().any()
    return full


def by_windows(m: torch.Tensor, k: int, linear: Map) -> torch.Tensor:
    """A flatten head (``linear`` after ``torch.flatten`` of a ``C x k x k`` map) on every ``k x k`` window of
    ``m``. ``F.unfold`` lays a window out as ``(C, kh, kw)``, the order of ``torch.flatten``."""
    n, _, h, w = m.shape
    out = linear(F.unfold(m, k).transpose(1, 2))  # (N, positions, classes)
    return out.transpose(1, 2).reshape(n, -1, h - k + 1, w - k + 1)


def by_average(m: torch.Tensor, k: int, linear: Map) -> torch.Tensor:
    """A global-average-pool head on every ``k x k`` window (the native map's size) of ``m``."""
    return by_windows(F.avg_pool2d(m, k, 1), 1, linear)


def check_everywhere(model: nn.Module, size: int, stride: int, x: torch.Tensor, reference: Map,
                     convert_check: bool = True) -> None:
    """The stride-``stride`` network's whole map equals ``reference(x)``: its size, then every cell."""
    coarse = convify.convert(model.eval(), size, check=convert_check)
    fine = finer_stride(coarse, stride)
    with torch.inference_mode():
        out, ref = fine(x), reference(x)
    assert out.shape == ref.shape, f"finer map {tuple(out.shape)}, shift-and-stitch {tuple(ref.shape)}"
    assert tuple(out.shape[2:]) == fine.output_size(*x.shape[2:])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())))


def _image(height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---- the small networks of test_finer.py ----------------------------------------------------------------

SHAPES = [(97, 83), (64, 130), (66, 67)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stride", [4, 2])
def test_padded_net(shape: tuple[int, int], stride: int) -> None:
    """Padded convolutions and max pools (stride 8); stride 4 cuts at the third pool, stride 2 also at the
    second. Native size 24: the flatten head sees 3x3 windows."""
    torch.manual_seed(0)
    model = PaddedNet().eval()
    body = model.body  # conv relu pool(2) | conv relu pool(5) | conv relu pool(8) | conv relu
    head = lambda m: by_windows(body[9:](m), 3, model.fc)  # noqa: E731
    if stride == 4:
        reference = lambda x: stitch(cut(body[8], body[:8](x)), head)  # noqa: E731
    else:
        reference = lambda x: stitch(cut(body[5], body[:5](x)),  # noqa: E731
                                     lambda p: stitch(cut(body[8], body[6:8](p)), head))
    check_everywhere(model, 24, stride, _image(*shape), reference)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stride", [4, 2])
def test_average_pools_and_a_strided_residual_block(shape: tuple[int, int], stride: int) -> None:
    """AvgInside (stride 8). Stride 4 cuts at the residual block (the 3x3 conv and the 1x1 skip both at
    stride 1); stride 2 first at the padded average pool (count_include_pad=False: at stride 1 over the whole
    map it counts what the coarse pool counts), then, within each of its phases, at the block. The padded
    ``smooth`` pool runs undilated on each phase (padding counted: divisor 9 everywhere). Native size 32:
    the map before the mean is 4x4."""
    torch.manual_seed(0)
    model = AvgInside().eval()
    block = lambda m: F.relu(with_stride(model.a, 1)(m)) + with_stride(model.skip, 1)(m)  # noqa: E731
    head = lambda m: by_average(model.smooth(m), 4, model.fc)  # noqa: E731
    if stride == 4:
        reference = lambda x: stitch(block(model.pool(F.relu(model.stem(x)))), head)  # noqa: E731
    else:
        reference = lambda x: stitch(cut(model.pool, F.relu(model.stem(x))),  # noqa: E731
                                     lambda p: stitch(block(p), head))
    check_everywhere(model, 32, stride, _image(*shape), reference)


@pytest.mark.parametrize("shape", SHAPES)
def test_ceil_mode_pool_at_the_cut(shape: tuple[int, int]) -> None:
    """CeilAtTheEnd (stride 4) at stride 2: the cut is a ceil-mode max pool (see :func:`cut` for what its
    overhanging window means at the finer stride). Native size 32: the pooled map is 7x7."""
    torch.manual_seed(0)
    model = CeilAtTheEnd().eval()
    features = lambda x: F.relu(model.conv(x))  # noqa: E731
    reference = lambda x: stitch(cut(model.pool, features(x)), lambda p: by_average(p, 7, model.fc))  # noqa: E731
    x = _image(*shape)
    if shape == (97, 83):  # 97 rows -> a 48-row map: the coarse pool's last window hangs over (83 -> 41: not)
        with torch.inference_mode():
            m = features(x)
            assert cut(model.pool, m).shape[2] == with_stride(model.pool, 1)(m).shape[2] + 1
            assert cut(model.pool, m).shape[3] == with_stride(model.pool, 1)(m).shape[3]
    check_everywhere(model, 32, 2, x, reference)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stride", [2, 1])
def test_squeeze_excitation_pools_each_phase(shape: tuple[int, int], stride: int) -> None:
    """TinySE (stride 4): squeeze-and-excitation as a layer, as ``F.adaptive_avg_pool2d`` and as ``x.mean``,
    before and after each cut. Run on a phase, each pools over that phase alone. Stride 2 cuts at ``down``
    (``se0`` before the cut pools the whole map); stride 1 first at ``stem`` (``se0`` then pools each of its
    phases), then, within each phase, at ``down``. Native size 32: the map before the mean is 8x8."""
    torch.manual_seed(0)
    model = TinySE().eval()
    head = lambda m: by_average(model.tail(m), 8, model.fc)  # noqa: E731
    if stride == 2:
        reference = lambda x: stitch(cut(model.down, model.se0(F.relu(model.stem(x)))), head)  # noqa: E731
    else:
        reference = lambda x: stitch(cut(model.stem, x),  # noqa: E731
                                     lambda p: stitch(cut(model.down, model.se0(F.relu(p))), head))
    check_everywhere(model, 32, stride, _image(*shape), reference)


# ---- torchvision networks, random weights ---------------------------------------------------------------

@pytest.mark.parametrize("stride, shape", [(16, (288, 320)), (8, (251, 290))])
def test_vgg16(stride: int, shape: tuple[int, int]) -> None:
    """The removed subsamplings are pool5 (features[30]) and, for stride 8, pool4 (features[23]). The
    AdaptiveAvgPool2d((7, 7)) is the identity at 224 px (convify removes it); the flatten head sees 7x7."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16(num_classes=NUM_CLASSES).eval()
    f = model.features
    head = lambda m: by_windows(m, 7, model.classifier)  # noqa: E731
    if stride == 16:
        reference = lambda x: stitch(cut(f[30], f[:30](x)), head)  # noqa: E731
    else:
        reference = lambda x: stitch(cut(f[23], f[:23](x)),  # noqa: E731
                                     lambda p: stitch(cut(f[30], f[24:30](p)), head))
    check_everywhere(model, 224, stride, _image(*shape, seed=2), reference, convert_check=False)


def _unstrided(block: nn.Module) -> nn.Module:
    """A copy of a torchvision Bottleneck that subsamples, at stride 1: its 3x3 conv2 and its downsample's 1x1
    conv (the original weights)."""
    block = copy.deepcopy(block)
    block.conv2.stride, block.downsample[0].stride = (1, 1), (1, 1)
    return block


@pytest.mark.parametrize("stride", [16, 8])
def test_resnet50(stride: int) -> None:
    """The removed subsamplings are layer4[0] and, for stride 8, layer3[0]: each block at stride 1 gives its
    full-resolution output. layer4[1:] and the pooled head (7x7 at 224 px) run on each phase; for stride 8,
    layer3[1:] and layer4[0] run on each phase of the first cut, then layer4[0]'s map is split again."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=NUM_CLASSES).eval()
    m = model
    head = lambda p: by_average(m.layer4[1:](p), 7, m.fc)  # noqa: E731
    prefix = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2)
    if stride == 16:
        reference = lambda x: stitch(_unstrided(m.layer4[0])(m.layer3(prefix(x))), head)  # noqa: E731
    else:
        fourth = _unstrided(m.layer4[0])
        reference = lambda x: stitch(_unstrided(m.layer3[0])(prefix(x)),  # noqa: E731
                                     lambda p: stitch(fourth(m.layer3[1:](p)), head))
    check_everywhere(model, 224, stride, _image(291, 325, seed=3), reference, convert_check=False)


def test_mobilenet_v3_small_at_stride_16_with_squeeze_excitation_per_phase() -> None:
    """The removed subsampling is the 5x5 depthwise conv of features[9] (no residual there). Its SE block comes
    after the cut, as do features[10:]'s: run on each phase sub-map, each SE pools over its own phase only
    (phase (0, 0) is then the coarse network, whose SE pools over the coarse map). The SE blocks before the cut
    pool over the whole map at their resolution, as in the coarse network. Pooled head: 7x7 at 224 px."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES).eval()
    f, block = model.features, model.features[9].block  # expand, depthwise (stride 2), SE, project
    depthwise = copy.deepcopy(block[1])
    depthwise[0].stride = (1, 1)
    prefix = nn.Sequential(*f[:9], block[0], depthwise)
    rest = lambda p: by_average(f[10:](block[2:](p)), 7, model.classifier)  # noqa: E731
    check_everywhere(model, 224, 16, _image(289, 322, seed=4), lambda x: stitch(prefix(x), rest),
                     convert_check=False)


def test_mobilenet_v3_small_at_stride_8_with_squeeze_excitation_per_phase() -> None:
    """Two removed subsamplings: the depthwise convs of features[4] and features[9] (neither has a residual).
    The SE blocks of features[4:9] pool each of the 2x2 phases of the first cut, those of features[9:] each
    of the 2x2 phases within them (4x4 in the finer map); features[1]'s SE, before both, pools the whole map."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES).eval()
    f, b4, b9 = model.features, model.features[4].block, model.features[9].block
    dw4, dw9 = copy.deepcopy(b4[1]), copy.deepcopy(b9[1])
    dw4[0].stride = dw9[0].stride = (1, 1)
    prefix = nn.Sequential(*f[:4], b4[0], dw4)
    middle = nn.Sequential(*b4[2:], *f[5:9], b9[0], dw9)
    rest = lambda p: by_average(f[10:](b9[2:](p)), 7, model.classifier)  # noqa: E731
    reference = lambda x: stitch(prefix(x), lambda p: stitch(middle(p), rest))  # noqa: E731
    check_everywhere(model, 224, 8, _image(257, 290, seed=5), reference, convert_check=False)
