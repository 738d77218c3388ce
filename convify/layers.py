"""Layers convify puts into converted networks (besides standard torch.nn ones)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseConv2d", "DilatedAvgPool2d"]


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution computed as a matrix product over channels, exactly like the ``Linear`` it replaces.

    It is an ``nn.Conv2d`` (kernel 1x1, stride 1, weight ``(out, in, 1, 1)``), so tools that look for
    convolutions see one. Its forward runs ``F.linear`` on the channels-last view of ``(N, C, H, W)``,
    which is the same kernel the original ``Linear`` ran: at the native size the result is bit-for-bit the
    original's, where a convolution kernel would sum in another order and differ in the last bits.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in, H, W) -> (N, out, H, W)``."""
        return F.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias).movedim(-1, 1)


class DilatedAvgPool2d(nn.Module):
    """Average pooling whose window taps are ``dilation`` apart (``nn.AvgPool2d`` has no dilation).

    What a finer output stride (:mod:`convify.finer`) puts in place of an average pool after the removed
    subsampling: the same window, spread over the finer map. With ``dilation`` 1 it equals
    ``nn.AvgPool2d(kernel_size, stride, padding, count_include_pad=..., divisor_override=...)`` (without
    ``ceil_mode``): the window sum is a depthwise convolution with ones, divided by the window's size,
    by the positions inside the map when padding is not counted, or by ``divisor_override``.

    ``(N, C, H, W) -> (N, C, H', W')``, ``H' = (H + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1``.
    """

    def __init__(self, kernel_size: Any, stride: Any, padding: Any = 0, dilation: Any = 1,
                 count_include_pad: bool = True, divisor_override: Optional[int] = None) -> None:
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.count_include_pad, self.divisor_override = bool(count_include_pad), divisor_override
        self.ceil_mode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, C, H', W')``."""
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        channels = x.shape[1]
        total = F.conv2d(F.pad(x, (pw, pw, ph, ph)), x.new_ones(channels, 1, kh, kw), stride=self.stride,
                         dilation=self.dilation, groups=channels)
        if self.divisor_override:
            return total / self.divisor_override
        if self.count_include_pad or not (ph or pw):
            return total / (kh * kw)
        inside = F.pad(x.new_ones(1, 1, *x.shape[2:]), (pw, pw, ph, ph))
        return total / F.conv2d(inside, x.new_ones(1, 1, kh, kw), stride=self.stride, dilation=self.dilation)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
