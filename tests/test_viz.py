"""Pictures: sizes, hot pixels, labels and boxes."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ait2i_ext.viz import PALETTE, attention_grid, box_overlay, colourise, heatmap_overlay


def grey_image(size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), (128, 128, 128))


def hot_corner(size: int = 16) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[:4, :4] = 1.0
    return m


def test_colourise_ramp_runs_cold_to_hot():
    rgb = colourise(np.linspace(0, 1, 11)[None].repeat(2, axis=0))
    assert rgb.shape == (2, 11, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 2] > rgb[0, 0, 0]  # cold end is blue
    assert rgb[0, -1, 0] > rgb[0, -1, 2]  # hot end is red
    assert (colourise(np.ones((3, 3))) == colourise(np.zeros((3, 3)))).all()  # flat map: no division by 0


def test_heatmap_overlay_size_and_hot_pixels():
    image = grey_image(128)
    out = heatmap_overlay(image, hot_corner(), alpha=0.5)
    assert out.size == image.size and out.mode == "RGB"
    hot, cold = np.asarray(out)[5, 5].astype(int), np.asarray(out)[120, 120].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]
    assert (hot != 128).any() and (cold != 128).any()
    assert np.array_equal(
        np.asarray(heatmap_overlay(image, hot_corner().numpy(), alpha=0.0)), np.asarray(image)
    )


def test_box_overlay_upscales_and_draws_in_distinct_colours():
    out = box_overlay(grey_image(64), {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.2, 1.0, 0.8)}, cell=256)
    assert out.size == (256, 256)
    pixels = {tuple(p) for p in np.asarray(out).reshape(-1, 3)}
    assert PALETTE[0] in pixels and PALETTE[1] in pixels
    assert box_overlay(grey_image(512), {}).size == (512, 512)  # larger images keep their size


def test_attention_grid_layout_and_example(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(60, 200, (64, 64, 3), dtype=np.uint8))
    cat = torch.zeros(16, 16)
    cat[2:8, 2:7] = 1.0
    dog = torch.zeros(16, 16)
    dog[9:14, 9:15] = 0.5  # a weaker map: drawn on its own scale, its bar says 0.5
    grid = attention_grid(
        image, {"cat": cat, "dog": dog}, boxes={"cat": (0.1, 0.1, 0.45, 0.5), "dog": (0.55, 0.55, 0.95, 0.9)}
    )
    cell = 256
    one = attention_grid(image, {"cat": cat})
    panel = one.width - cell  # the cat's map and its colour bar
    assert one.height == grid.height and cell + 30 < panel < cell + 120
    assert cell + 30 < grid.width - cell - panel < cell + 120  # the dog's map and bar
    label = grid.height - cell
    pixels = np.asarray(grid).astype(int)
    # the image panel is the image itself (no heat map laid over it), away from the boxes
    upscaled = np.asarray(image.resize((cell, cell), Image.Resampling.NEAREST)).astype(int)
    assert np.array_equal(pixels[label + 240 : label + 250, 5:20], upscaled[240:250, 5:20])
    cat_hot = pixels[label + 4 * 16 + 8, cell + 4 * 16 + 8]  # inside the cat blob, on the cat panel
    cat_cold = pixels[label + 12 * 16, cell + 12 * 16]
    dog_hot = pixels[label + 11 * 16 + 8, cell + panel + 11 * 16 + 8]
    assert cat_hot[0] > cat_hot[2] and cat_cold[2] > cat_cold[0]
    assert dog_hot[0] > dog_hot[2]  # hot on its own scale
    for k in range(2):  # each map has its bar: hot on top, cold below
        bar = pixels[label:, k * panel + 2 * cell + 8 : k * panel + 2 * cell + 20]
        assert bar[2, 5, 0] > bar[2, 5, 2] and bar[-3, 5, 2] > bar[-3, 5, 0]
    title = {tuple(p) for p in pixels[:label, cell : cell + panel].reshape(-1, 3)}
    assert PALETTE[0] in title  # the cat's name in the cat's colour
    grid.save(tmp_path / "grid.png")


def test_colour_bar_labels_the_scale():
    from ait2i_ext.viz import _font, colour_bar

    bar = colour_bar(100, 0.25, _font(12))
    pixels = np.asarray(bar).astype(int)
    assert bar.height == 100 and bar.width > 30
    assert pixels[1, 5, 0] > pixels[1, 5, 2] and pixels[98, 5, 2] > pixels[98, 5, 0]
    assert (pixels[:, 22:] < 100).any()  # tick labels were written


def test_seed_sheet_marks_right_and_wrong():
    from ait2i_ext.viz import RIGHT, WRONG, seed_sheet

    rows = {
        "plain": [(0, grey_image(), False), (1, grey_image(), True)],
        "guided": [(0, grey_image(), True), (1, grey_image(), True)],
    }
    sheet = seed_sheet(rows, title="a cat", cell=128)
    pixels = {tuple(p) for p in np.asarray(sheet).reshape(-1, 3)}
    assert RIGHT in pixels and WRONG in pixels
    assert sheet.height > 2 * 128 and sheet.width > 2 * 128
    unmarked = seed_sheet({"plain": [(0, grey_image(), None)]}, cell=128)
    assert not {RIGHT, WRONG} & {tuple(p) for p in np.asarray(unmarked).reshape(-1, 3)}
