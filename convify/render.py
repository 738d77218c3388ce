"""Drawing score maps on photos. Pure functions: arrays in, RGB PIL images out.

A cell's value belongs to the centre of its window, not to a stretch of the map over the whole image
(stretching is off by up to half a window: the classic misalignment). :func:`place_map` puts each value at
its cell's centre and interpolates bilinearly between neighbouring centres. Each cell owns the
``stride x stride`` square around its centre; pixels outside all of those squares (a band along the
edges, about half a window minus half a stride wide) have no cell of their own and are drawn as
"no data": greyed and hatched, never extrapolated.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = ["place_map", "overlay", "grid", "colorize"]

NO_DATA_GREY = 128


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
    width, height = size
    rows, cols = values.shape
    x = torch.arange(width, dtype=torch.float64) + 0.5
    y = torch.arange(height, dtype=torch.float64) + 0.5
    u = (x - float(centers[0, 0, 0])) / float(step[0])  # column coordinate, 0 at the first centre
    v = (y - float(centers[0, 0, 1])) / float(step[1])
    inside = ((v >= -0.5) & (v <= rows - 0.5))[:, None] & ((u >= -0.5) & (u <= cols - 0.5))[None, :]
    gx = (u / (cols - 1) * 2 - 1) if cols > 1 else torch.zeros_like(u)
    gy = (v / (rows - 1) * 2 - 1) if rows > 1 else torch.zeros_like(v)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].float()  # (1, H, W, 2) as (x, y)
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
    if vmax is None:
        vmax = max(float(values.max()), vmin + 1e-6)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    placed, inside = place_map(values, centers, step, image.size)
    colours = colorize(placed.numpy(), cmap, vmin, vmax).astype(np.float32)
    mask = inside.numpy()[..., None]
    strength = np.clip((placed.numpy() - vmin) / max(vmax - vmin, 1e-12), 0, 1)[..., None]
    weight = alpha * (0.25 + 0.75 * strength)  # low scores let the photo through, high ones cover it
    blended = rgb * (1 - weight) + colours * weight
    grey = rgb.mean(axis=2, keepdims=True) * 0.35 + NO_DATA_GREY * 0.65
    out = np.where(mask, blended, np.repeat(grey, 3, axis=2))
    picture = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")
    _hatch(picture, inside.numpy())
    draw = ImageDraw.Draw(picture)
    if box is None:
        flat = int(torch.argmax(values))
        i, j = divmod(flat, values.shape[1])
        cx, cy = float(centers[i, j, 0]), float(centers[i, j, 1])
        half = (float(step[0]) / 2, float(step[1]) / 2)
        box = (cx - half[0], cy - half[1], cx + half[0], cy + half[1])
    # PIL's rectangle includes its end pixels; the box's end is exclusive
    x0, y0 = max(0.0, box[0]), max(0.0, box[1])
    x1, y1 = min(image.width, box[2]) - 1.0, min(image.height, box[3]) - 1.0
    if x1 >= x0 and y1 >= y0:
        draw.rectangle((x0, y0, x1, y1), outline=(0, 255, 255), width=max(2, image.width // 300))
    if not legend:
        return picture
    return _with_legend(picture, label, float(values.max()), cmap, vmin, vmax)


def _hatch(picture: Image.Image, inside: np.ndarray) -> None:
    """Diagonal lines over the no-data pixels, so they cannot be mistaken for low scores."""
    height, width = inside.shape
    yy, xx = np.mgrid[0:height, 0:width]
    lines = ((xx + yy) % 12 < 2) & ~inside
    array = np.asarray(picture).copy()
    array[lines] = (200, 200, 200)
    picture.paste(Image.fromarray(array, "RGB"))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _with_legend(picture: Image.Image, label: str, peak: float, cmap: str, vmin: float, vmax: float) -> Image.Image:
    width = picture.width
    text_size = max(12, width // 40)
    height = text_size * 3 + 12
    canvas = Image.new("RGB", (width, picture.height + height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(text_size)
    top = picture.height + 4
    draw.text((6, top), f"{label}: probability per cell (peak {peak:.2f}); hatched: no cell", fill=(0, 0, 0),
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
