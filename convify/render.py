"""Drawing score maps on photos. Pure functions: arrays in, RGB PIL images out.

A cell's value belongs to the centre of its window, not to a stretch of the map over the whole image
(stretching is off by up to half a window: the classic misalignment). :func:`place_map` puts each value at
its cell's centre and interpolates bilinearly between neighbouring centres. Each cell owns the
``stride x stride`` square around its centre; pixels outside all of those squares (a band along the
edges, about half a window minus half a stride wide) have no cell of their own and are drawn as
"no data": greyed and hatched, never extrapolated.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = ["place_map", "overlay", "overlay_large", "grid", "colorize", "DEFAULT_MAX_SIDE"]

NO_DATA_GREY = 128
# The long side of a huge image's overlay (overlay_large): 4096 px shows a 100,000 px slide's map at one
# pixel per 25, in ~50 MB of drawing space; the photo-sized overlay of a 6000 px photo is already 18,000 px
# wide as a three-panel grid.
DEFAULT_MAX_SIDE = 4096
# Image rows drawn at once: the float work space of an overlay is ~60 bytes a pixel of one strip.
_STRIP_ROWS = 256


def place_map(values: torch.Tensor, centers: torch.Tensor, step: Sequence[float], size: tuple[int, int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread cell values over image pixels by the geometry.

    Args:
        values: ``(H', W')`` one value per cell.
        centers: ``(H', W', 2)`` each cell's window centre ``(x, y)`` in image pixels (continuous: pixel
            ``(x, y)`` covers ``[x, x+1) x [y, y+1)``).
        step: ``(sx, sy)`` distance between neighbouring centres in image pixels (the stride, scaled).
        size: ``(width, height)`` of the image.

    Returns:
        ``(H, W)`` values (bilinear between centres, constant within the half-step around an edge cell)
        and an ``(H, W)`` bool mask that is True where some cell's square covers the pixel.
    """
    return _place(values, (float(centers[0, 0, 0]), float(centers[0, 0, 1])), step, size[0], 0, size[1])


def _place(values: torch.Tensor, first: tuple[float, float], step: Sequence[float], width: int, top: int,
           height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`place_map` for image rows ``top .. top + height`` only (the same numbers as those rows of the
    whole), with cell ``(0, 0)``'s centre at ``first``: ``(height, width)`` values and mask."""
    rows, cols = values.shape
    x = torch.arange(width, dtype=torch.float64) + 0.5
    y = torch.arange(top, top + height, dtype=torch.float64) + 0.5
    u = (x - first[0]) / float(step[0])  # column coordinate, 0 at the first centre
    v = (y - first[1]) / float(step[1])
    inside = ((v >= -0.5) & (v <= rows - 0.5))[:, None] & ((u >= -0.5) & (u <= cols - 0.5))[None, :]
    gx = (u / (cols - 1) * 2 - 1) if cols > 1 else torch.zeros_like(u)
    gy = (v / (rows - 1) * 2 - 1) if rows > 1 else torch.zeros_like(v)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].float()  # (1, h, W, 2) as (x, y)
    placed = F.grid_sample(values[None, None].float(), grid, mode="bilinear", padding_mode="border",
                           align_corners=True)[0, 0]
    return placed, inside


def colorize(values: np.ndarray, cmap: str = "inferno", vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """``(...)`` values -> ``(..., 3)`` uint8 RGB through a matplotlib colormap (``vmin``..``vmax`` mapped to 0..1)."""
    from matplotlib import colormaps

    scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    return (colormaps[cmap](scaled)[..., :3] * 255 + 0.5).astype(np.uint8)


def overlay(image: Image.Image, values: torch.Tensor, centers: torch.Tensor, step: Sequence[float], *,
            label: str = "", alpha: float = 0.6, cmap: str = "inferno", vmin: float = 0.0,
            vmax: Optional[float] = None,
            box: Optional[Sequence[float]] = None, legend: bool = True) -> Image.Image:
    """The photo with a map drawn on it, a legend below.

    Args:
        image: the RGB photo.
        values: ``(H', W')`` one value per cell (probabilities, as the engine passes them).
        centers, step: where cells lie, as for :func:`place_map`.
        label: the legend's title (the class name).
        alpha: opacity of the colours at the top of the scale (a quarter of it at the bottom), so the photo
            shows through where the class scores low.
        cmap: a matplotlib colormap name.
        vmin, vmax: the values at the two ends of the colour scale; ``vmax=None`` takes the map's peak, so a
            class that peaks at 0.2 is as visible as one at 0.9 (the legend prints the scale).
        box: ``(x0, y0, x1, y1)`` to outline; default: the peak cell's own square (``step`` around its
            centre), clipped to the image.
        legend: draw the colour bar with the class name and score scale.

    Returns:
        An RGB image: the photo's size, plus the legend strip.
    """
    if box is None:
        i, j = _peak_cell(values)
        cx, cy = float(centers[i, j, 0]), float(centers[i, j, 1])
        half = (float(step[0]) / 2, float(step[1]) / 2)
        box = (cx - half[0], cy - half[1], cx + half[0], cy + half[1])
    return _draw(image, values, (float(centers[0, 0, 0]), float(centers[0, 0, 1])), step, box, label=label,
                 peak=float(values.max()), alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax, legend=legend)


def overlay_large(thumbnail: Image.Image, values: Union[np.ndarray, torch.Tensor], *, image_size: tuple[int, int],
                  geometry_center0: Sequence[float], step: Sequence[float], label: str = "",
                  max_side: int = DEFAULT_MAX_SIDE, reduce: str = "mean", alpha: float = 0.6,
                  cmap: str = "inferno", vmin: float = 0.0, vmax: Optional[float] = None,
                  box: Optional[Sequence[float]] = None, legend: bool = True) -> Image.Image:
    """A huge image's map drawn on a thumbnail of it, in memory bounded by the thumbnail (never the image).

    Each cell is placed by its centre scaled to the thumbnail, exactly as :func:`overlay` places it on the
    full image (the same drawing, legend and hatched no-data band): the result is, up to resampling, the
    full-size overlay shrunk to the thumbnail.

    Args:
        thumbnail: the whole image shrunk (RGB; e.g. from the region reader); if its long side exceeds
            ``max_side`` it is shrunk further to fit.
        values: ``(H', W')`` one value per cell (probabilities, say), numpy or torch.
        image_size: ``(W, H)`` of the full image, in pixels.
        geometry_center0: ``(x, y)`` of cell ``(0, 0)``'s centre, in full-image pixels.
        step: ``(sx, sy)`` distance between neighbouring centres, in full-image pixels.
        label: the legend's title (the class name).
        max_side: the longest side of the drawing, in pixels (default :data:`DEFAULT_MAX_SIDE`).
        reduce: where cells are closer than a thumbnail pixel, neighbouring cells are first pooled into groups
            at least a pixel apart: ``"mean"`` (what shrinking the full overlay shows) or ``"max"`` (a
            one-cell peak stays visible).
        alpha, cmap, vmin, vmax, legend: as for :func:`overlay` (``vmax=None``: the map's peak).
        box: ``(x0, y0, x1, y1)`` in full-image pixels to outline; default: the peak cell's square.

    Returns:
        An RGB image of the thumbnail's size (at most ``max_side`` on the long side), plus the legend strip.

    Raises:
        ValueError: sizes or steps that are not positive, a ``values`` that is not 2-D, an unknown ``reduce``.
    """
    width, height = (int(v) for v in image_size)
    if width < 1 or height < 1 or min(float(step[0]), float(step[1])) <= 0 or max_side < 1:
        raise ValueError(f"overlay_large needs a positive image_size, step and max_side, not {image_size}, "
                         f"{tuple(step)}, {max_side}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', not {reduce!r}")
    values = torch.as_tensor(values).float()
    if values.dim() != 2 or values.numel() == 0:
        raise ValueError(f"values must be (H', W'), not {tuple(values.shape)}")
    picture = thumbnail.convert("RGB")
    if max(picture.size) > max_side:
        ratio = max_side / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * ratio)), max(1, round(picture.height * ratio))),
                                 Image.Resampling.BOX)
    tx, ty = picture.width / width, picture.height / height  # thumbnail pixels per image pixel
    if box is None:
        i, j = _peak_cell(values)
        cx = float(geometry_center0[0]) + j * float(step[0])
        cy = float(geometry_center0[1]) + i * float(step[1])
        box = (cx - float(step[0]) / 2, cy - float(step[1]) / 2, cx + float(step[0]) / 2, cy + float(step[1]) / 2)
    box = (box[0] * tx, box[1] * ty, box[2] * tx, box[3] * ty)
    first = (float(geometry_center0[0]) * tx, float(geometry_center0[1]) * ty)
    shown, first, drawn_step = _pool_to_pixels(values, first, (float(step[0]) * tx, float(step[1]) * ty), reduce)
    if vmax is None:
        vmax = max(float(values.max()), vmin + 1e-6)
    return _draw(picture, shown, first, drawn_step, box, label=label, peak=float(values.max()), alpha=alpha,
                 cmap=cmap, vmin=vmin, vmax=vmax, legend=legend)


def _peak_cell(values: Union[np.ndarray, torch.Tensor]) -> tuple[int, int]:
    flat = int(torch.argmax(torch.as_tensor(values)))
    return divmod(flat, values.shape[1])


def _pool_to_pixels(values: torch.Tensor, first: tuple[float, float], step: tuple[float, float], reduce: str
                    ) -> tuple[torch.Tensor, tuple[float, float], tuple[float, float]]:
    """Where centres are under a pixel apart, pool ``f`` cells into one, centred on its cells' mean centre,
    so that bilinear sampling does not skip cells. Returns the values, first centre and step to draw."""
    fx, fy = (max(1, math.ceil(1.0 / s - 1e-9)) for s in step)
    if fx == 1 and fy == 1:
        return values, first, step
    kernel = (fy, fx)
    if reduce == "max":
        pooled = F.max_pool2d(values[None, None], kernel, kernel, ceil_mode=True)[0, 0]
    else:
        pooled = F.avg_pool2d(values[None, None], kernel, kernel, ceil_mode=True, count_include_pad=False)[0, 0]
    return (pooled, (first[0] + (fx - 1) / 2 * step[0], first[1] + (fy - 1) / 2 * step[1]),
            (fx * step[0], fy * step[1]))


def _draw(image: Image.Image, values: torch.Tensor, first: tuple[float, float], step: Sequence[float],
          box: Sequence[float], *, label: str, peak: float, alpha: float, cmap: str, vmin: float,
          vmax: Optional[float], legend: bool) -> Image.Image:
    """The drawing both overlays share, done :data:`_STRIP_ROWS` image rows at a time: the float work space
    is a strip's, never the image's (the image itself is held as uint8 once)."""
    if vmax is None:
        vmax = max(float(values.max()), vmin + 1e-6)
    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    height, width = rgb.shape[:2]
    out = np.empty_like(rgb)
    hatched = False
    for top in range(0, height, _STRIP_ROWS):
        strip = rgb[top:top + _STRIP_ROWS].astype(np.float32)
        rows = strip.shape[0]
        placed, inside = _place(values, first, step, width, top, rows)
        placed_np, mask = placed.numpy(), inside.numpy()
        colours = colorize(placed_np, cmap, vmin, vmax).astype(np.float32)
        strength = np.clip((placed_np - vmin) / max(vmax - vmin, 1e-12), 0, 1)[..., None]
        weight = alpha * (0.25 + 0.75 * strength)  # low scores let the photo through, high ones cover it
        blended = strip * (1 - weight) + colours * weight
        grey = strip.mean(axis=2, keepdims=True) * 0.35 + NO_DATA_GREY * 0.65
        drawn = np.clip(np.where(mask[..., None], blended, np.repeat(grey, 3, axis=2)) + 0.5, 0, 255)
        out[top:top + rows] = drawn.astype(np.uint8)
        _hatch(out[top:top + rows], mask, top)
        hatched |= not bool(mask.all())
    picture = Image.fromarray(out, "RGB")
    draw = ImageDraw.Draw(picture)
    # PIL's rectangle includes its end pixels; the box's end is exclusive
    x0, y0 = max(0.0, box[0]), max(0.0, box[1])
    x1, y1 = min(width, box[2]) - 1.0, min(height, box[3]) - 1.0
    if x1 >= x0 and y1 >= y0:
        draw.rectangle((x0, y0, x1, y1), outline=(0, 255, 255), width=max(2, width // 300))
    if not legend:
        return picture
    return _with_legend(picture, label, peak, cmap, vmin, vmax, hatched)


def _hatch(array: np.ndarray, inside: np.ndarray, top: int = 0) -> None:
    """Diagonal lines over the no-data pixels (in place, on rows ``top..`` of the picture), so they cannot be
    mistaken for low scores."""
    height, width = inside.shape
    yy, xx = np.mgrid[top:top + height, 0:width]
    lines = ((xx + yy) % 12 < 2) & ~inside
    array[lines] = (200, 200, 200)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _with_legend(picture: Image.Image, label: str, peak: float, cmap: str, vmin: float, vmax: float,
                 hatched: bool = True) -> Image.Image:
    width = picture.width
    text_size = max(12, width // 40)
    height = text_size * 3 + 12
    canvas = Image.new("RGB", (width, picture.height + height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(text_size)
    top = picture.height + 4
    note = "; hatched: no cell" if hatched else ""
    draw.text((6, top), f"{label}: probability per cell (peak {peak:.2f}){note}", fill=(0, 0, 0),
              font=font)
    bar_left, bar_right = 6, width - 6
    bar_top, bar_bottom = top + text_size + 4, top + text_size + 4 + text_size // 2 + 4
    ramp = colorize(np.linspace(vmin, vmax, max(bar_right - bar_left, 2)), cmap, vmin, vmax)
    bar = Image.fromarray(np.repeat(ramp[None], bar_bottom - bar_top, axis=0), "RGB")
    canvas.paste(bar, (bar_left, bar_top))
    small = _font(max(10, text_size * 3 // 4))
    for fraction in (0.0, 0.5, 1.0):
        value = vmin + fraction * (vmax - vmin)
        x = bar_left + fraction * (bar_right - bar_left)
        text = f"{value:.2g}"
        text_width = draw.textlength(text, font=small)
        draw.text((min(max(x - text_width / 2, 0), width - text_width), bar_bottom + 1), text, fill=(0, 0, 0),
                  font=small)
    return canvas


def grid(images: Sequence[Image.Image], columns: int = 3, gap: int = 8) -> Image.Image:
    """Tile images left to right, ``columns`` per row, on white."""
    if not images:
        raise ValueError("grid() needs at least one image")
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    canvas = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap),
                       (255, 255, 255))
    for n, im in enumerate(images):
        r, c = divmod(n, columns)
        canvas.paste(im, (c * (cell_w + gap), r * (cell_h + gap)))
    return canvas
