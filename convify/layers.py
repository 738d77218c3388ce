"""Layers convify puts into converted networks (besides standard torch.nn ones)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseConv2d", "WindowLinear", "FinerPool2d", "PhaseAvgPool2d", "SamePad2d", "SpaceToDepth",
           "WindowAttentionPool2d", "CondConv2d", "overhang", "same_padding"]


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


# Output positions (over the batch) up to which WindowLinear computes in its "unfold" form; beyond, "conv".
# Measured with benchmarks/head_forms.py (2 CPU cores, 2 threads; VGG16's 7x7x512 -> 4096 and AlexNet's
# 6x6x256 -> 4096 heads, maps of 224 to 1024 px at strides 32 and 16): unfold + linear is 2.5x to 8x faster
# than the convolution up to 10x10 positions, 1.2x to 1.3x at 26x26, and about even at 51x51, where its
# buffer of unfolded windows (positions x C*kh*kw floats) reaches 260 MB. The cap keeps that buffer under
# about 100 MB (VGG16) in the range where unfolding is clearly the faster form.
UNFOLD_POSITIONS = 1024


class WindowLinear(nn.Conv2d):
    """The first ``Linear`` of a flattening head, applied to every ``kernel x kernel`` window of the map.

    It is an ``nn.Conv2d`` (weight ``(out, C, kh, kw)``: the Linear's columns in ``(C, H, W)`` order) with two
    exact ways to compute (:attr:`FORMS`, chosen per call by :meth:`form_for`):

    - ``"unfold"``: the windows unfolded into ``(positions, C * kh * kw)`` rows and run through ``F.linear``,
      the kernel the original ``Linear`` ran (at the native size the result is bit for bit the original's).
      On the maps a head sees it is the faster form: a CPU convolution re-lays out the weight (400 MB for
      VGG16) on every call.
    - ``"conv"``: ``F.conv2d``, for maps of more than :data:`UNFOLD_POSITIONS` output positions, where the
      unfolded windows would take more memory than the re-laid-out weight saves time.

    A third form, the sum over the ``kh * kw`` taps of a shifted view times that tap's weight, is measured by
    ``benchmarks/head_forms.py`` and is never the fastest (2x to 3x slower than unfolding even with its weight
    laid out in advance), so it is not offered. ``stride`` and ``dilation`` are honoured (finer strides).

    ``(N, C, H, W) -> (N, out, H', W')``, ``H' = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1``.
    """

    FORMS = ("unfold", "conv")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         bias=bias)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')`` for an input of ``height x width`` (either may be below 1: no window fits)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def form_for(self, batch: int, height: int, width: int) -> str:
        """The form :meth:`forward` uses on a ``(batch, C, height, width)`` input."""
        rows, cols = self.output_size(height, width)
        if rows < 1 or cols < 1 or batch * rows * cols > UNFOLD_POSITIONS or self.padding_mode != "zeros" \
                or isinstance(self.padding, str):
            return "conv"
        return "unfold"

    def compute(self, x: torch.Tensor, form: str) -> torch.Tensor:
        """``(N, C, H, W) -> (N, out, H', W')`` in the given form (see :attr:`FORMS`); all give the same map."""
        if form == "conv":
            return super().forward(x)
        if form != "unfold":
            raise ValueError(f"form must be one of {', '.join(self.FORMS)}; got {str(form)[:20]!r}")
        rows, cols = self.output_size(x.shape[2], x.shape[3])
        windows = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, L)
        out = F.linear(windows.transpose(1, 2), self.weight.flatten(1), self.bias)  # (N, L, out)
        return out.transpose(1, 2).reshape(x.shape[0], self.out_channels, rows, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, out, H', W')``, in the form :meth:`form_for` picks."""
        return self.compute(x, self.form_for(*x.shape[:1], *x.shape[2:]))


def overhang(n: int, k: int, pad: int, d: int, stride: int) -> int:
    """Rows a ceil-mode window op with ``stride`` hangs past its padded input of length ``n``, by PyTorch's rule
    (the last window starts inside the input or its first padding): what a finer pool must pad after the map
    to keep that last window when it runs at a smaller stride."""
    span = n + 2 * pad - d * (k - 1) - 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= n + pad:
        out -= 1
    return max(0, (out - 1) * stride - span)


class FinerPool2d(nn.Module):
    """A max or average pool as a finer output stride (:mod:`convify.finer`) needs it.

    - ``dilation``: window taps that many positions apart (``nn.AvgPool2d`` has none).
    - ``ceil_stride``: per axis, the subsampling this pool had in ceil mode, now removed (0: none). The pool
      then pads after the map as far as that ceil-mode window hung over (:func:`overhang`), so the last
      window is kept; padding is not counted in an average there, as PyTorch does not count the overhang.

    With dilation 1 and no ``ceil_stride`` it equals ``nn.MaxPool2d`` / ``nn.AvgPool2d`` (without ceil mode):
    the average is a depthwise convolution with ones over the zero-padded map, divided by the window's size,
    by the positions inside the map (and inside its padding when ``count_include_pad``), or by
    ``divisor_override``.

    ``(N, C, H, W) -> (N, C, H', W')``, ``H' = (H + 2 * padding + extra - dilation * (kernel - 1) - 1) // stride + 1``
    with ``extra = overhang(H, kernel, padding, dilation, ceil_stride)``.
    """

    def __init__(self, mode: str, kernel_size: Any, stride: Any, padding: Any = 0, dilation: Any = 1,
                 ceil_stride: Any = 0, count_include_pad: bool = True, divisor_override: Optional[int] = None) -> None:
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be max or avg, not {mode!r}")
        self.mode = mode
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation, self.ceil_stride = _pair(padding), _pair(dilation), _pair(ceil_stride)
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding + self.ceil_stride) < 0:
            raise ValueError("kernel_size, stride and dilation must be at least 1, padding and ceil_stride at least 0")
        if divisor_override is not None and (not isinstance(divisor_override, int) or divisor_override < 1):
            raise ValueError("divisor_override must be a positive integer")
        self.count_include_pad, self.divisor_override = bool(count_include_pad), divisor_override

    def extra(self, height: int, width: int) -> tuple[int, int]:
        """Positions padded after the map, per axis, for an input of ``height x width``."""
        return tuple(overhang(n, self.kernel_size[a], self.padding[a], self.dilation[a], self.ceil_stride[a])
                     if self.ceil_stride[a] else 0 for a, n in enumerate((height, width)))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, C, H', W')``."""
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        eh, ew = self.extra(x.shape[2], x.shape[3])
        if self.mode == "max":
            padded = F.pad(x, (pw, pw + ew, ph, ph + eh), value=float("-inf"))
            return F.max_pool2d(padded, self.kernel_size, self.stride, 0, self.dilation)
        channels = x.shape[1]
        total = F.conv2d(F.pad(x, (pw, pw + ew, ph, ph + eh)), x.new_ones(channels, 1, kh, kw), stride=self.stride,
                         dilation=self.dilation, groups=channels)
        if self.divisor_override:
            return total / self.divisor_override
        if not (ph or pw or eh or ew) or (self.count_include_pad and not (eh or ew)):
            return total / (kh * kw)
        counted = F.pad(x.new_ones(1, 1, *x.shape[2:]), (pw, pw, ph, ph), value=float(self.count_include_pad))
        counted = F.pad(counted, (0, ew, 0, eh))  # the overhang is never counted
        return total / F.conv2d(counted, x.new_ones(1, 1, kh, kw), stride=self.stride, dilation=self.dilation)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _whole(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _checked_pair(name: str, given: Any, hi: int) -> tuple[int, int]:
    """``given`` (an integer, or a pair of them, from 1 to ``hi``) as a pair; a ValueError naming ``name`` if not.
    A layer's arguments come from files too: a string, a bool or a huge number must not pass."""
    pair = (given, given) if not isinstance(given, (tuple, list)) else tuple(given)
    if len(pair) != 2 or not all(_whole(v, 1, hi) for v in pair):
        raise ValueError(f"{name} must be an integer from 1 to {hi}, or a pair of them; got {str(given)[:40]}")
    return pair  # type: ignore[return-value]


class PhaseAvgPool2d(nn.Module):
    """The global average pool of each phase of a map, as a finer output stride (:mod:`convify.finer`) needs it.

    At a finer stride the map after a removed subsampling interleaves ``r x r`` phases: the sub-grid
    ``x[:, :, a::r, b::r]`` is what the original network computed for the image shifted by ``(a, b)`` finer
    strides. A global average pool there (squeeze-and-excitation) must average each phase over itself alone,
    as the original did; this layer does, and gives every position its own phase's mean, so the layers that
    follow it (the SE block's 1x1 convolutions and activations) and the ``scale * x`` that multiplies it back
    in run unchanged: position ``(i, j)`` is scaled by the summary of phase ``(i % r, j % r)``.

    ``phases``: ``r`` per axis (an int, or ``(rows, columns)``). With ``phases=1`` it is
    ``nn.AdaptiveAvgPool2d(1)`` expanded to the map's size. A phase with no position in the map (``r`` larger
    than the map) is never computed.

    ``(N, C, H, W) -> (N, C, H, W)``: ``out[:, :, i, j] = x[:, :, i % r_h::r_h, j % r_w::r_w].mean((2, 3))``.
    """

    # A phase count is a ratio of two strides; a stride is at most the native input size (convify.limits).
    MAX_PHASES = 4096

    def __init__(self, phases: Any) -> None:
        super().__init__()
        self.phases: tuple[int, int] = _checked_pair("phases", phases, self.MAX_PHASES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, C, H, W)``, each position its phase's mean."""
        n, c, h, w = x.shape
        # phases past the map's end have no position (at least 1: an empty map gives an empty map)
        rh, rw = max(1, min(self.phases[0], h)), max(1, min(self.phases[1], w))
        if rh == rw == 1:  # one phase: the global mean, in memory of its own (a layer after may work in place)
            return F.adaptive_avg_pool2d(x, 1).expand(n, c, h, w).contiguous()
        rows, cols = -(-h // rh), -(-w // rw)
        padded = F.pad(x, (0, cols * rw - w, 0, rows * rh - h))  # zeros: they add nothing to a phase's sum
        sums = padded.reshape(n, c, rows, rh, cols, rw).sum((2, 4))  # (N, C, rh, rw)
        count_h = torch.div(torch.arange(h - 1, h - 1 - rh, -1, device=x.device), rh, rounding_mode="floor") + 1
        count_w = torch.div(torch.arange(w - 1, w - 1 - rw, -1, device=x.device), rw, rounding_mode="floor") + 1
        means = sums / (count_h[:, None] * count_w[None, :]).to(sums.dtype)
        return means.repeat(1, 1, rows, cols)[:, :, :h, :w]


def same_padding(n: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding ``(before, after)`` of a window op on an axis ``n`` long: the least total that
    gives ``ceil(n / stride)`` outputs, the odd one after. It depends on ``n`` modulo ``stride``."""
    total = max((-(-n // stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """TensorFlow's "SAME" padding for the window op that follows, computed from the size of the map it meets.

    timm's ``Conv2dSame``, ``MaxPool2dSame``, ``AvgPool2dSame`` and ``StdConv2dSame`` (every ``tf_*`` model) pad
    this way: by :func:`same_padding` of the actual map, so the padding before changes with the input's size
    modulo the stride, and with it where cells lie (the geometry's ``"same_pad"`` layers). Freezing the native
    size's padding would be wrong at other sizes; this layer computes it for every input.

    ``kernel_size``, ``stride``, ``dilation``: the following window op's, per axis. ``value``: what to pad with
    (0, or ``-inf`` before a max pool).

    ``(N, C, H, W) -> (N, C, H + ph, W + pw)`` with ``ph = sum(same_padding(H, ...))``.
    """

    # a window or stride larger than the largest native input convify converts is not a layer (convify.limits)
    MAX_WINDOW = 4096

    def __init__(self, kernel_size: Any, stride: Any, dilation: Any = 1, value: float = 0.0) -> None:
        super().__init__()
        checked = [_checked_pair(name, given, self.MAX_WINDOW)
                   for name, given in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation))]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            raise ValueError(f"value must be a number, got {str(value)[:40]}")
        self.kernel_size, self.stride, self.dilation = checked
        self.value = float(value)

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` for a ``height x width`` map, as ``F.pad`` takes it."""
        top, bottom = same_padding(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        return left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, C, H + top + bottom, W + left + right)``."""
        return F.pad(x, self.padding(x.shape[-2], x.shape[-1]), value=self.value)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, value={self.value}"


class SpaceToDepth(nn.Module):
    """Each ``block x block`` block of the map folded into channels (TResNet's stem, timm's ``SpaceToDepth``):
    channel ``(i * block + j) * C + c`` of output position ``(y, x)`` is channel ``c`` of input position
    ``(y * block + i, x * block + j)``. A window of ``block`` at stride ``block``: rows and columns past the last
    whole block are left out (as a convolution of that kernel and stride leaves them), where timm's views would fail.

    ``(N, C, H, W) -> (N, C * block**2, H // block, W // block)``.
    """

    MAX_BLOCK = 64

    def __init__(self, block_size: int = 4) -> None:
        super().__init__()
        if not _whole(block_size, 1, self.MAX_BLOCK):
            raise ValueError(f"block_size must be an integer from 1 to {self.MAX_BLOCK}, got {str(block_size)[:40]}")
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, C * block**2, H // block, W // block)``."""
        b = self.block_size
        n, c, h, w = x.shape
        x = x[:, :, :h // b * b, :w // b * b]
        x = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)  # (N, b, b, C, H/b, W/b)
        return x.reshape(n, c * b * b, h // b, w // b)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}"


class WindowAttentionPool2d(nn.Module):
    """An attention-pooling head (CLIP's ResNets, timm's ``AttentionPool2d``) applied to every ``window`` of the map.

    The original pools a whole ``kh x kw`` map: its tokens (each position's features), a first token (their mean,
    or a learned class token) in front, a positional embedding added, then multi-head attention of the first
    token's query over all tokens' keys and values, and an output projection. This layer gives, at every stride-1
    position of a larger map, that result for the ``kh x kw`` window there: exactly the original at the native size.

    The projections are linear, so they are taken once per map position, not once per window: a token's key is
    ``W_k x + W_k pos_i + b_k`` with ``W_k x`` a 1x1 convolution of the map and ``W_k pos_i + b_k`` a table per
    place ``i`` in the window; the mean token's is the window's mean of ``W_k x``. Only the first token's output is
    kept, so only its query is computed.

    Attributes (constructor arguments): ``in_features`` (C), ``embed_dim`` (E, a multiple of ``num_heads``),
    ``out_features`` (K; 0: no output projection, the output is E), ``num_heads``, ``window`` ``(kh, kw)``,
    ``class_token`` (a learned first token instead of the mean). Parameters: ``qkv_weight`` ``(3E, C)``,
    ``qkv_bias`` ``(3E,)``, ``pos`` ``(kh * kw + 1, C)`` (the embedding at the native map size, first token first),
    ``cls`` ``(C,)`` if ``class_token``, ``proj_weight`` ``(K, E)`` and ``proj_bias`` ``(K,)`` if ``out_features``.

    ``(N, C, H, W) -> (N, K, H - kh + 1, W - kw + 1)``.
    """

    MAX_WINDOW = 64
    POSITIONS_PER_CHUNK = 1024  # windows attended at once (memory: chunk x (kh kw + 1) x 2E floats)

    def __init__(self, in_features: int, embed_dim: int, out_features: int, num_heads: int, window: Any,
                 class_token: bool = False) -> None:
        super().__init__()
        pair = _checked_pair("window", window, self.MAX_WINDOW)
        if not all(_whole(v, 1, 1 << 16) for v in (in_features, embed_dim, num_heads)) \
                or not _whole(out_features, 0, 1 << 20) or embed_dim % num_heads or not isinstance(class_token, bool):
            raise ValueError("in_features, embed_dim and num_heads must be integers from 1 to 65536 (embed_dim a "
                             "multiple of num_heads), out_features from 0 to 2**20 and class_token true or false")
        self.in_features, self.embed_dim, self.out_features = in_features, embed_dim, out_features
        self.num_heads, self.window, self.class_token = num_heads, pair, class_token
        tokens = pair[0] * pair[1] + 1
        self.qkv_weight = nn.Parameter(torch.empty(3 * embed_dim, in_features))
        self.qkv_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.pos = nn.Parameter(torch.empty(tokens, in_features))
        self.cls = nn.Parameter(torch.empty(in_features)) if class_token else None
        self.proj_weight = nn.Parameter(torch.empty(out_features, embed_dim)) if out_features else None
        self.proj_bias = nn.Parameter(torch.empty(out_features)) if out_features else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, K, H - kh + 1, W - kw + 1)``."""
        (kh, kw), e, heads = self.window, self.embed_dim, self.num_heads
        n, _, h, w = x.shape
        rows, cols = h - kh + 1, w - kw + 1
        if rows < 1 or cols < 1:
            return x.new_zeros(n, self.out_features or e, max(rows, 0), max(cols, 0))
        wq, wk, wv = self.qkv_weight.split(e)
        bq, bk, bv = self.qkv_bias.split(e)
        pos_k, pos_v = F.linear(self.pos, wk, bk), F.linear(self.pos, wv, bv)  # (T, E): a table per place
        maps_k, maps_v = (F.conv2d(x, wt[:, :, None, None]) for wt in (wk, wv))  # (N, E, H, W)
        if self.class_token:
            first = self.cls + self.pos[0]
            q0 = F.linear(first, wq, bq).expand(n, rows, cols, e)
            k0 = F.linear(first, wk, bk).expand(n, rows, cols, e)
            v0 = F.linear(first, wv, bv).expand(n, rows, cols, e)
        else:  # the mean token: the window's mean of each projection, plus the first place's table
            q0 = F.avg_pool2d(F.conv2d(x, wq[:, :, None, None]), (kh, kw), 1).permute(0, 2, 3, 1) \
                + F.linear(self.pos[0], wq, bq)
            k0 = F.avg_pool2d(maps_k, (kh, kw), 1).permute(0, 2, 3, 1) + pos_k[0]
            v0 = F.avg_pool2d(maps_v, (kh, kw), 1).permute(0, 2, 3, 1) + pos_v[0]
        # every window's keys and values: (N, E, kh kw, rows cols) -> (N, rows cols, kh kw, E), plus the tables
        keys = F.unfold(maps_k, (kh, kw)).reshape(n, e, kh * kw, rows * cols).permute(0, 3, 2, 1) + pos_k[1:]
        values = F.unfold(maps_v, (kh, kw)).reshape(n, e, kh * kw, rows * cols).permute(0, 3, 2, 1) + pos_v[1:]
        keys = torch.cat([k0.reshape(n, rows * cols, 1, e), keys], 2)  # (N, L, T, E), the first token first
        values = torch.cat([v0.reshape(n, rows * cols, 1, e), values], 2)
        query = q0.reshape(n, rows * cols, 1, e)
        out = []
        for start in range(0, rows * cols, self.POSITIONS_PER_CHUNK):
            part = slice(start, start + self.POSITIONS_PER_CHUNK)
            q, k, v = (t[:, part].reshape(-1, t.shape[2], heads, e // heads).transpose(1, 2)
                       for t in (query, keys, values))  # (N L', heads, T or 1, E / heads)
            out.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, e))
        pooled = torch.cat(out, 1)  # (N, L, E)
        if self.out_features:
            pooled = F.linear(pooled, self.proj_weight, self.proj_bias)
        return pooled.transpose(1, 2).reshape(n, -1, rows, cols)

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features or self.embed_dim}, heads={self.num_heads}, "
                f"window={self.window}, class_token={self.class_token}")


class CondConv2d(nn.Module):
    """A convolution whose kernel is each image's own mix of ``num_experts`` kernels (CondConv, timm's
    ``CondConv2d`` in the ``*efficientnet_cc_*`` models): ``routing`` ``(N, E)`` weighs the experts (a routing
    computed from a global pool of the map, so the layer is global context). The same arithmetic as timm's: the
    mixed kernels of the batch run as one grouped convolution over the images' channels side by side.

    Parameters: ``weight`` ``(E, out * in / groups * kh * kw)``, ``bias`` ``(E, out)`` if ``bias``.

    ``(N, in, H, W), (N, E) -> (N, out, H', W')``, ``H' = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1``.
    """

    MAX_CHANNELS = 1 << 16
    MAX_KERNEL = 64

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, num_experts: int = 4) -> None:
        super().__init__()
        if not all(_whole(v, 1, self.MAX_CHANNELS) for v in (in_channels, out_channels, groups, num_experts)) \
                or in_channels % groups or out_channels % groups or not isinstance(bias, bool):
            raise ValueError("in_channels, out_channels, groups and num_experts must be integers from 1 to 65536, "
                             "the channels multiples of groups, and bias true or false")
        self.in_channels, self.out_channels, self.groups, self.num_experts = in_channels, out_channels, groups, num_experts
        self.kernel_size = _checked_pair("kernel_size", kernel_size, self.MAX_KERNEL)
        self.stride = _checked_pair("stride", stride, self.MAX_KERNEL)
        self.dilation = _checked_pair("dilation", dilation, self.MAX_KERNEL)
        self.padding = _pair_of(padding)
        if len(self.padding) != 2 or not all(_whole(p, 0, self.MAX_KERNEL * self.MAX_KERNEL) for p in self.padding):
            raise ValueError(f"padding must be an integer from 0 to {self.MAX_KERNEL ** 2}, or a pair of them")
        per_expert = out_channels * (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(torch.empty(num_experts, per_expert))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None

    def forward(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """``(N, in, H, W), (N, E) -> (N, out, H', W')``."""
        n, c, h, w = x.shape
        weight = torch.matmul(routing, self.weight).view(n * self.out_channels, self.in_channels // self.groups,
                                                         *self.kernel_size)
        bias = torch.matmul(routing, self.bias).view(n * self.out_channels) if self.bias is not None else None
        out = F.conv2d(x.reshape(1, n * c, h, w), weight, bias, self.stride, self.padding, self.dilation,
                       self.groups * n)
        return out.permute([1, 0, 2, 3]).view(n, self.out_channels, out.shape[-2], out.shape[-1])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, num_experts={self.num_experts}")


def _pair_of(v: Any) -> tuple:
    """An int or a pair, as a pair (whatever else it is, unchanged for :func:`_checked_pair` to refuse)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
