"""Layers convify puts into converted networks (besides standard torch.nn ones)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseConv2d"]


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
