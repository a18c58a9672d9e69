"""The built-in Canny finds the outline of every shapes-world colour, as OpenCV's Canny on RGB does."""

import numpy as np
import pytest
from ait2i_ext.adapters.controlnet import canny_edges
from PIL import Image

from ait2i_ext.shapes.data import COLOURS, Scene, ShapeObject, render_scene


@pytest.mark.parametrize("colour", sorted(COLOURS))
def test_canny_edges_outline_a_square_of_every_colour_on_white(colour):
    """Yellow on white is about as bright as the background (grey 201 vs 255): edges taken from the
    grey image alone lost every yellow object, so the ControlNet never saw where it should go."""
    scene = Scene((ShapeObject(colour, "square", (0.25, 0.25, 0.75, 0.75)),), caption="")
    edges = np.asarray(canny_edges(render_scene(scene, 64)))[..., 0] > 0
    rows, cols = np.nonzero(edges)
    assert rows.size, f"no edges for a {colour} square"
    assert (
        14 <= rows.min() <= 18
        and 45 <= rows.max() <= 49
        and 14 <= cols.min() <= 18
        and 45 <= cols.max() <= 49
    )
    assert not edges[24:40, 24:40].any() and edges.mean() < 0.15  # an outline, nothing inside


def test_canny_edges_of_a_grey_picture_use_its_one_channel():
    """On a grey picture every channel is the same: the edges are those of the grey image."""
    grey = np.full((64, 64), 255, np.uint8)
    grey[16:48, 16:48] = 90
    as_rgb = canny_edges(Image.fromarray(grey).convert("RGB"))
    assert np.array_equal(np.asarray(as_rgb), np.asarray(canny_edges(Image.fromarray(grey))))
