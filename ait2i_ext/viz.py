"""Pictures of attention maps and layout boxes (PIL and numpy only).

Maps are drawn with a small hand-written "turbo"-like colour ramp (dark blue = cold, dark red =
hot) and a colour bar giving the values; boxes are ``(x0, y0, x1, y1)`` normalised to ``[0, 1]``. Images smaller than a tile are
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


def colourise(m: MapLike, high: float | None = None) -> np.ndarray:
    """A map through the colour ramp, normalised to its own ``[min, max]`` or to ``[0, high]``.

    Args:
        m (`torch.Tensor` or `np.ndarray` of shape `(H, W)`): the map.
        high (`float`, *optional*): the value drawn hottest on a fixed scale from 0 (values are
            clipped to it); ``None`` stretches the map's own range.

    Returns:
        `np.ndarray` of shape `(H, W, 3)`, ``uint8``.
    """
    m = _to_numpy(m)
    low, top = (float(m.min()), float(m.max())) if high is None else (0.0, float(high))
    unit = np.clip((m - low) / (top - low), 0.0, 1.0) if top > low else np.zeros_like(m)
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


def _heat_tile(m: MapLike, size: tuple[int, int], high: float) -> Image.Image:
    """The map alone through the colour ramp on the fixed scale ``[0, high]``, upsampled to ``size``."""
    upsampled = Image.fromarray(_to_numpy(m), mode="F").resize(size, Image.Resampling.BILINEAR)
    return Image.fromarray(colourise(np.asarray(upsampled), high))


def colour_bar(height: int, high: float, font, width: int = 16) -> Image.Image:
    """A vertical colour bar for the scale ``[0, high]`` with three labelled ticks (top = ``high``)."""
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)
    bar = Image.fromarray(colourise(ramp, 1.0))
    label_width = int(max(font.getlength(f"{v:.3g}") for v in (0.0, high / 2, high))) + 8
    out = Image.new("RGB", (width + label_width, height), (255, 255, 255))
    out.paste(bar, (0, 0))
    draw = ImageDraw.Draw(out)
    text_height = font.getbbox("0")[3]
    for fraction in (0.0, 0.5, 1.0):
        y = round((1 - fraction) * (height - 1))
        draw.line((width, y, width + 3, y), fill=(0, 0, 0))
        top = min(max(0, y - text_height // 2), height - text_height - 1)
        draw.text((width + 5, top), f"{high * fraction:.3g}", fill=(0, 0, 0), font=font)
    return out


def attention_grid(
    image: Image.Image,
    group_maps: Mapping[str, MapLike],
    boxes: Mapping[str, Box] | None = None,
    cell: int = 256,
) -> Image.Image:
    """One row: the image, then each subject's attention map beside it, each with its colour bar.

    The maps are drawn alone (not over the image), each from 0 to its own largest value, and the bar
    right of each map gives its values (the share of a cell's cross-attention on the subject's word),
    so a weak map is readable and its bar says that it is weak. Each subject keeps one colour: its
    name above its panel, its box on the image and on its panel.

    Args:
        image (`PIL.Image.Image`): the generated image.
        group_maps (`Mapping[str, torch.Tensor | np.ndarray]`): subject name -> `(H, W)` map.
        boxes (`Mapping[str, tuple]`, *optional*): subject name -> ``(x0, y0, x1, y1)`` in ``[0, 1]``.
        cell (`int`): panel width in pixels; the image is resized to it (nearest when enlarging).

    Returns:
        `PIL.Image.Image`: RGB, ``cell`` wide for the image plus ``cell`` and a bar per subject.
    """
    boxes = dict(boxes or {})
    base = _upscale(image, cell)
    names = list(group_maps)
    colours = {name: _colour(i) for i, name in enumerate(names + [b for b in boxes if b not in group_maps])}
    font = _font(max(12, cell // 14))
    small = _font(max(10, cell // 20))
    label_height = font.getbbox("Ag")[3] + 8

    panels = [("image", None, base.copy(), None)]
    for name in names:
        high = float(_to_numpy(group_maps[name]).max())
        bar = colour_bar(base.height, high, small)
        panels.append((name, colours[name], _heat_tile(group_maps[name], base.size, high), bar))
    gap = 6
    widths = [cell + (gap + bar.width + gap if bar else 0) for *_, bar in panels]
    grid = Image.new("RGB", (sum(widths), label_height + base.height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    left = 0
    for (name, colour, tile, bar), width in zip(panels, widths):
        tile_draw = ImageDraw.Draw(tile)
        if colour is None:  # the image panel shows every box, a subject's panel its own
            shown = boxes
        else:
            shown = {name: boxes[name]} if name in boxes else {}
        for box_name, box in shown.items():
            _draw_box(tile_draw, box, tile.size, colours[box_name], None, font)
        grid.paste(tile, (left, label_height))
        if bar is not None:
            grid.paste(bar, (left + cell + gap, label_height))
        draw.text((left + 6, 4), name, fill=colour or (0, 0, 0), font=font)
        left += width
    return grid


RIGHT, WRONG = (30, 150, 60), (200, 40, 40)


def seed_sheet(
    rows: Mapping[str, Sequence[tuple[int, Image.Image, bool | None]]],
    title: str | None = None,
    cell: int = 128,
) -> Image.Image:
    """Images of several seeds, one row per method (e.g. plain and guided), each marked right or wrong.

    Args:
        rows (`Mapping[str, Sequence[tuple]]`): row label -> ``(seed, image, correct)`` per column;
            ``correct`` is ``True`` (green frame, "right"), ``False`` (red frame, "wrong") or ``None``
            (no mark). A row with marks gets its count of right images in its label.
        title (`str`, *optional*): a line above the sheet (e.g. the prompt).
        cell (`int`): tile width in pixels.

    Returns:
        `PIL.Image.Image`: RGB.
    """
    font = _font(max(12, cell // 9))
    line = font.getbbox("Ag")[3] + 6
    labels = {}
    for label, items in rows.items():
        marks = [mark for _, _, mark in items if mark is not None]
        labels[label] = [label, f"{sum(marks)}/{len(marks)} right"] if marks else [label]
    left = max(int(font.getlength(text)) for lines in labels.values() for text in lines) + 16
    columns = max(len(items) for items in rows.values())
    top = line * (2 if title else 1)
    row_height = cell + line
    frame = max(3, cell // 32)
    sheet = Image.new("RGB", (left + columns * cell, top + len(rows) * row_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 3), title, fill=(0, 0, 0), font=font)
    for r, (label, items) in enumerate(rows.items()):
        y = top + r * row_height
        for k, text in enumerate(labels[label]):
            draw.text((6, y + cell // 2 - line + k * line), text, fill=(0, 0, 0), font=font)
        for c, (seed, image, mark) in enumerate(items):
            x = left + c * cell
            if r == 0:
                draw.text((x + 4, top - line + 2), f"seed {seed}", fill=(0, 0, 0), font=font)
            tile = _upscale(image, cell - 2 * frame)
            sheet.paste(tile, (x + frame, y + frame))
            if mark is not None:
                colour = RIGHT if mark else WRONG
                draw.rectangle(
                    (x, y, x + cell - 1, y + tile.height + 2 * frame - 1), outline=colour, width=frame
                )
                draw.text(
                    (x + 4, y + tile.height + 2 * frame), "right" if mark else "wrong", fill=colour, font=font
                )
    return sheet


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
