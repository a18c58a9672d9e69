"""Pictures of attention maps and layout boxes (PIL and numpy only).

Maps are drawn with a small hand-written "turbo"-like colour ramp (dark blue = cold, dark red =
hot); boxes are ``(x0, y0, x1, y1)`` normalised to ``[0, 1]``. Images smaller than a tile are
upscaled with nearest-neighbour sampling so that tiny test images (64 px) stay readable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

Box = Sequence[float]
MapLike = torch.Tensor | np.ndarray

# Control points of a turbo-like ramp: value in [0, 1] -> RGB.
_RAMP_STOPS = np.array([0.0, 0.15, 0.35, 0.5, 0.65, 0.85, 1.0])
_RAMP_COLOURS = np.array(
    [
        (48, 18, 59),
        (50, 110, 230),
        (30, 200, 220),
        (100, 250, 110),
        (240, 220, 50),
        (250, 110, 20),
        (122, 4, 3),
    ],
    dtype=np.float64,
)

# Distinct, saturated colours for subjects (tab10 order).
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font, at ``size`` px where this Pillow can scale it."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def _to_numpy(m: MapLike) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().float().cpu().numpy()
    m = np.asarray(m, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"map of shape {m.shape} is invalid: expected (H, W)")
    return m


def colourise(m: MapLike) -> np.ndarray:
    """A map through the colour ramp, normalised to its own ``[min, max]``.

    Args:
        m (`torch.Tensor` or `np.ndarray` of shape `(H, W)`): the map.

    Returns:
        `np.ndarray` of shape `(H, W, 3)`, ``uint8``.
    """
    m = _to_numpy(m)
    low, high = float(m.min()), float(m.max())
    unit = (m - low) / (high - low) if high > low else np.zeros_like(m)
    rgb = [np.interp(unit, _RAMP_STOPS, _RAMP_COLOURS[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def _upscale(image: Image.Image, width: int) -> Image.Image:
    """``image`` as RGB, resized to ``width`` (keeping its aspect): nearest when enlarging."""
    image = image.convert("RGB")
    height = max(1, round(width * image.height / image.width))
    if (width, height) == image.size:
        return image
    resample = Image.Resampling.NEAREST if width > image.width else Image.Resampling.LANCZOS
    return image.resize((width, height), resample)


def heatmap_overlay(image: Image.Image, m: MapLike, alpha: float = 0.5) -> Image.Image:
    """The map, upsampled bilinearly to the image size and normalised to ``[0, 1]``, over the image.

    Args:
        image (`PIL.Image.Image`): the generated image.
        m (`torch.Tensor` or `np.ndarray` of shape `(H, W)`): an attention map.
        alpha (`float`): opacity of the heat map (0 = image only, 1 = heat map only).

    Returns:
        `PIL.Image.Image`: RGB, the size of ``image``.
    """
    m = _to_numpy(m)
    upsampled = Image.fromarray(m, mode="F").resize(image.size, Image.Resampling.BILINEAR)
    heat = Image.fromarray(colourise(np.asarray(upsampled)))
    return Image.blend(image.convert("RGB"), heat, alpha)


def _draw_box(
    draw: ImageDraw.ImageDraw,
    box: Box,
    size: tuple[int, int],
    colour: tuple[int, int, int],
    label: str | None,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    """A box outlined in ``colour`` over a white halo (readable on any background), with a label."""
    width, height = size
    x0, y0, x1, y1 = box
    rect = (x0 * (width - 1), y0 * (height - 1), x1 * (width - 1), y1 * (height - 1))
    line = max(3, width // 80)
    draw.rectangle(rect, outline=(255, 255, 255), width=line + 2)
    draw.rectangle(rect, outline=colour, width=line)
    if label:
        left, top, right, bottom = draw.textbbox((rect[0] + line + 2, rect[1] + line + 2), label, font=font)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=colour)
        draw.text((left, top), label, fill=(255, 255, 255), font=font)


def box_overlay(image: Image.Image, boxes: Mapping[str, Box], cell: int = 256) -> Image.Image:
    """The image with each layout box drawn and labelled in its own colour.

    Args:
        image (`PIL.Image.Image`): the image; one narrower than ``cell`` is upscaled (nearest) to it.
        boxes (`Mapping[str, tuple]`): label -> ``(x0, y0, x1, y1)`` normalised to ``[0, 1]``.
        cell (`int`): smallest width of the result.

    Returns:
        `PIL.Image.Image`: RGB.
    """
    out = _upscale(image, max(cell, image.width))
    draw = ImageDraw.Draw(out)
    font = _font(max(12, out.width // 20))
    for index, (name, box) in enumerate(boxes.items()):
        _draw_box(draw, box, out.size, _colour(index), name, font)
    return out


def attention_grid(
    image: Image.Image,
    group_maps: Mapping[str, MapLike],
    boxes: Mapping[str, Box] | None = None,
    cell: int = 256,
    alpha: float = 0.5,
) -> Image.Image:
    """One row: the image, then each group's map over it, every tile labelled.

    Each group keeps one colour: its label, its box on the image tile and on its own tile.

    Args:
        image (`PIL.Image.Image`): the generated image.
        group_maps (`Mapping[str, torch.Tensor | np.ndarray]`): group name -> `(H, W)` map.
        boxes (`Mapping[str, tuple]`, *optional*): group name -> ``(x0, y0, x1, y1)`` in ``[0, 1]``.
        cell (`int`): tile width in pixels; the image is resized to it (nearest when enlarging).
        alpha (`float`): opacity of the heat maps.

    Returns:
        `PIL.Image.Image`: RGB, ``(1 + len(group_maps)) * cell`` wide.
    """
    boxes = dict(boxes or {})
    base = _upscale(image, cell)
    names = list(group_maps)
    colours = {name: _colour(i) for i, name in enumerate(names + [b for b in boxes if b not in group_maps])}
    font = _font(max(12, cell // 14))
    label_height = font.getbbox("Ag")[3] + 8

    tiles = [("image", None, base)]
    tiles += [(name, colours[name], heatmap_overlay(base, group_maps[name], alpha)) for name in names]
    grid = Image.new("RGB", (cell * len(tiles), label_height + base.height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column, (name, colour, tile) in enumerate(tiles):
        left = column * cell
        tile_draw = ImageDraw.Draw(tile)
        if colour is None:  # the image tile shows every box, a group's tile its own
            shown = boxes
        else:
            shown = {name: boxes[name]} if name in boxes else {}
        for box_name, box in shown.items():
            _draw_box(tile_draw, box, tile.size, colours[box_name], None, font)
        grid.paste(tile, (left, label_height))
        draw.text((left + 6, 4), name, fill=colour or (0, 0, 0), font=font)
    return grid


def side_by_side(images: Mapping[str, Image.Image], title: str | None = None, cell: int = 256) -> Image.Image:
    """Images in one row under their labels (e.g. ``{"plain": a, "guided": b}`` for one seed).

    Args:
        images (`Mapping[str, PIL.Image.Image]`): label -> image, in display order.
        title (`str`, *optional*): a line above the row (e.g. the prompt).
        cell (`int`): tile width in pixels.

    Returns:
        `PIL.Image.Image`: RGB, ``len(images) * cell`` wide.
    """
    tiles = {label: _upscale(image, cell) for label, image in images.items()}
    font = _font(max(12, cell // 14))
    line = font.getbbox("Ag")[3] + 8
    top = line * (2 if title else 1)
    height = max(t.height for t in tiles.values())
    grid = Image.new("RGB", (cell * len(tiles), top + height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((6, 4), title, fill=(0, 0, 0), font=font)
    for column, (label, tile) in enumerate(tiles.items()):
        draw.text((column * cell + 6, top - line + 4), label, fill=(0, 0, 0), font=font)
        grid.paste(tile, (column * cell, top))
    return grid


def boxed_comparison(
    rows: Sequence[Mapping[str, Image.Image]],
    boxes: Mapping[str, Box],
    title: str | None = None,
    cell: int = 192,
) -> Image.Image:
    """Methods side by side (columns) for several seeds (rows), the layout boxes drawn over every image.

    Args:
        rows (`Sequence[Mapping[str, PIL.Image.Image]]`): per row, label -> image (same labels in every row).
        boxes (`Mapping[str, tuple]`): label -> ``(x0, y0, x1, y1)`` in ``[0, 1]``, drawn on each image.
        title (`str`, *optional*): a line above the first row (e.g. the prompt).
        cell (`int`): tile width in pixels.

    Returns:
        `PIL.Image.Image`: RGB, ``len(rows[0]) * cell`` wide.
    """
    if not rows:
        raise ValueError("boxed_comparison needs at least one row of images")
    strips = [
        side_by_side(
            {k: box_overlay(v, boxes, cell) for k, v in row.items()}, title if i == 0 else None, cell
        )
        for i, row in enumerate(rows)
    ]
    return stack_rows(strips)


def stack_rows(strips: Sequence[Image.Image]) -> Image.Image:
    """Images stacked top to bottom on white, left-aligned (e.g. rows of :func:`side_by_side`)."""
    grid = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (255, 255, 255))
    y = 0
    for strip in strips:
        grid.paste(strip, (0, y))
        y += strip.height
    return grid
