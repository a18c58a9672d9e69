"""The shapes evaluator reads rendered ground truth right (>= 98 %) and scores prompts sensibly."""

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ait2i_ext.shapes.data import BACKGROUND, Scene, ShapeObject, render_scene, sample_scene
from ait2i_ext.shapes.evaluator import EvaluatorConfig, box_iou, detect, evaluate
from ait2i_ext.shapes.prompts import PromptObject


def _correct(scene, image) -> bool:
    score = evaluate(image, scene.objects)
    return score.correct and all(o.iou > 0.5 for o in score.objects)


def test_right_on_rendered_ground_truth():
    scenes = [sample_scene(seed, allow_held_out=True) for seed in range(300)]
    accuracy = np.mean([_correct(s, render_scene(s)) for s in scenes])
    assert accuracy >= 0.98


def test_right_on_slightly_blurred_ground_truth():
    scenes = [sample_scene(seed, allow_held_out=True) for seed in range(1000, 1100)]
    accuracy = np.mean([_correct(s, render_scene(s).filter(ImageFilter.GaussianBlur(0.7))) for s in scenes])
    assert accuracy >= 0.95


def test_neglect_and_colour_mixing_are_told_apart():
    box_a, box_b = (0.1, 0.3, 0.4, 0.6), (0.6, 0.3, 0.9, 0.6)
    asked = (PromptObject("red", "circle", box_a), PromptObject("blue", "square", box_b))
    good = render_scene(
        Scene((ShapeObject("red", "circle", box_a), ShapeObject("blue", "square", box_b)), "")
    )
    score = evaluate(good, asked)
    assert score.correct and score.all_present and not score.neglect and not score.colour_mixing
    assert score.mean_iou > 0.9  # boxes off the pixel grid

    neglected = render_scene(Scene((ShapeObject("red", "circle", box_a),), ""))
    score = evaluate(neglected, asked)
    assert score.neglect and not score.correct
    assert score.objects[0].correct and not score.objects[1].present and score.objects[1].iou == 0.0

    mixed = render_scene(
        Scene((ShapeObject("red", "circle", box_a), ShapeObject("red", "square", box_b)), "")
    )
    score = evaluate(mixed, asked)
    assert score.colour_mixing and not score.neglect and not score.all_present
    assert not score.objects[0].colour_bound  # red leaked onto the square
    assert score.objects[1].shape_present and not score.objects[1].present


def test_counts_duplicates_and_extras():
    twice = Scene(
        (
            ShapeObject("green", "triangle", (0.1, 0.1, 0.4, 0.4)),
            ShapeObject("green", "triangle", (0.6, 0.6, 0.9, 0.9)),
        ),
        "",
    )
    score = evaluate(render_scene(twice), [("green", "triangle")])
    assert score.objects[0].count == 2 and score.extra == 1 and not score.correct
    assert score.objects[0].iou is None


def test_blank_image_and_inputs():
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    assert detect(blank) == ()
    assert evaluate(np.asarray(blank), [("red", "circle")]).neglect
    big = render_scene(sample_scene(3), size=256)  # any size is read at 64 px
    assert _correct(sample_scene(3), big)
    with pytest.raises(ValueError, match="invalid"):
        evaluate(blank, [("teal", "circle")])
    with pytest.raises(ValueError, match="at least one"):
        evaluate(blank, [])
    with pytest.raises(ValueError, match="min_area"):
        EvaluatorConfig(min_area=0)


def test_results_are_frozen_and_box_iou():
    score = evaluate(render_scene(sample_scene(0)), sample_scene(0).objects)
    with pytest.raises(dataclasses.FrozenInstanceError):
        score.extra = 3
    assert box_iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)
    assert box_iou((0, 0, 0.2, 0.2), (0.5, 0.5, 1, 1)) == 0.0


# --- new shapes (personalisation concepts) ------------------------------------------------------


@pytest.mark.parametrize("blur", [0.0, 0.7])
def test_new_shapes_are_read_right_on_rendered_scenes(blur):
    from ait2i_ext.shapes.data import ALL_SHAPES, NEW_SHAPES

    scenes = [sample_scene(seed, allow_held_out=True, shapes=ALL_SHAPES) for seed in range(300)]
    scenes += [sample_scene(seed, shapes=NEW_SHAPES) for seed in range(300, 400)]
    assert sum(any(o.shape in NEW_SHAPES for o in s.objects) for s in scenes) >= 150

    def image(scene):
        rendered = render_scene(scene)
        return rendered.filter(ImageFilter.GaussianBlur(blur)) if blur else rendered

    accuracy = np.mean([_correct(s, image(s)) for s in scenes])
    assert accuracy >= 0.98


def test_new_shapes_join_the_templates_only_when_asked_for():
    from ait2i_ext.shapes.data import ALL_SHAPES

    star = render_scene(Scene((ShapeObject("yellow", "star", (0.2, 0.2, 0.7, 0.7)),), ""))
    (default,) = detect(star)
    assert default.shape != "star"  # the training world's reading of old shapes is unchanged
    (known,) = detect(star, EvaluatorConfig(shapes=ALL_SHAPES))
    assert known.shape == "star" and known.colour == "yellow"
    score = evaluate(star, [("yellow", "star")])  # a requested star is looked for
    assert score.correct and score.objects[0].present
    heart = render_scene(Scene((ShapeObject("red", "heart", (0.3, 0.1, 0.8, 0.6)),), ""))
    assert not evaluate(heart, [("red", "star")]).objects[0].present
    assert evaluate(heart, [("red", "heart")]).objects[0].present
    with pytest.raises(ValueError, match="shapes=.*invalid"):
        EvaluatorConfig(shapes=("star",))
