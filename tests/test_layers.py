"""The layers convify adds, against the torch layers they stand for."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convify
from convify import layers
from convify.layers import FinerPool2d, WindowLinear


@pytest.mark.parametrize("stride, dilation, padding", [(1, 1, 0), (2, 1, 0), (1, 2, 0), (1, 1, 2)])
def test_window_linear_is_the_convolution_in_both_forms(stride: int, dilation: int, padding: int) -> None:
    torch.manual_seed(0)
    head = WindowLinear(16, 24, (3, 4), stride=stride, padding=padding, dilation=dilation).eval()
    for side in (4, 9, 30, 70):  # from one position to many more than UNFOLD_POSITIONS
        x = torch.randn(2, 16, side + 3, side + 5)
        if (x.shape[2] + 2 * padding - dilation * 2 - 1) < 0:
            continue
        expected = F.conv2d(x, head.weight, head.bias, stride, padding, dilation)
        torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    positions = [(side, (side + 3 + 2 * padding - dilation * 2 - 1) // stride + 1) for side in (4, 70)]
    assert positions[0][1] ** 2 <= layers.UNFOLD_POSITIONS < positions[1][1] ** 2  # both forms ran


def test_window_linear_unfolds_up_to_its_position_cap_and_convolves_beyond() -> None:
    head = WindowLinear(4, 6, 3)
    side = int(layers.UNFOLD_POSITIONS ** 0.5)  # a side x side map of outputs: at the cap
    assert head.form_for(1, side + 2, side + 2) == "unfold"
    assert head.form_for(1, side + 3, side + 3) == "conv" and head.form_for(2, side + 2, side + 2) == "conv"
    assert head.form_for(1, 2, 9) == "conv"  # no window fits: the convolution says so
    assert head.form_for(1, 3, 3) == "unfold" and head.output_size(3, 3) == (1, 1)
    with pytest.raises(ValueError, match="form must be one of unfold, conv"):
        head.compute(torch.zeros(1, 4, 3, 3), "taps")


@pytest.mark.parametrize("name", ["alexnet", "vgg11"])
def test_zoo_flattening_heads_are_window_linears_and_exact(name: str) -> None:
    """At the native size the head computes as the original Linear did: the same numbers, bit for bit."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    fcn = convify.convert(model, 224)
    heads = [m for m in fcn.net.modules() if isinstance(m, WindowLinear)]
    assert len(heads) == 1 and fcn.check["max_abs_diff"] == 0.0
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(fcn(x)[0, :, 0, 0], model(x)[0])
        # and on a larger map the head equals the convolution form of itself
        big = torch.randn(1, 3, 224 + 32 * 30, 224 + 32 * 2)
        features = {}
        handle = heads[0].register_forward_hook(lambda m, i, o: features.update(x=i[0].clone(), y=o.clone()))
        fcn(big)
        handle.remove()
        head = heads[0]
        torch.testing.assert_close(features["y"], F.conv2d(features["x"], head.weight, head.bias),
                                   rtol=1e-4, atol=1e-4)


def test_finer_pools_equal_torch_pools() -> None:
    x = torch.randn(2, 5, 13, 14, dtype=torch.float64)
    for k, s, p, counted, divisor in [(3, 1, 1, True, None), (3, 2, 1, False, None), (2, 2, 0, True, None),
                                      (3, 1, 1, False, None), (3, 2, 1, True, 4)]:
        torch.testing.assert_close(FinerPool2d("avg", k, s, p, 1, 0, counted, divisor)(x),
                                   nn.AvgPool2d(k, s, p, count_include_pad=counted, divisor_override=divisor)(x))
        torch.testing.assert_close(FinerPool2d("max", k, s, p)(x), nn.MaxPool2d(k, s, p)(x))
    with pytest.raises(ValueError, match="max or avg"):
        FinerPool2d("min", 2, 2)


@pytest.mark.parametrize("k, s, p, counted", [(3, 2, 0, True), (2, 2, 0, True), (3, 2, 1, False), (3, 2, 1, True),
                                              (2, 2, 1, True), (3, 3, 1, False)])
def test_a_finer_pool_keeps_the_ceil_mode_overhang(k: int, s: int, p: int, counted: bool) -> None:
    """At stride 1 with ``ceil_stride=s``, every s-th output is the ceil-mode pool's, the overhanging last window
    included, whatever the length (some lengths overhang, some do not)."""
    for n in range(5, 13):
        x = torch.randn(1, 2, n, n + 1, dtype=torch.float64)
        finer = FinerPool2d("avg", k, 1, p, 1, s, counted)(x)[:, :, ::s, ::s]
        torch.testing.assert_close(finer, nn.AvgPool2d(k, s, p, ceil_mode=True, count_include_pad=counted)(x))
        if p <= k // 2:
            finer = FinerPool2d("max", k, 1, p, 1, s)(x)[:, :, ::s, ::s]
            torch.testing.assert_close(finer, nn.MaxPool2d(k, s, p, ceil_mode=True)(x))
