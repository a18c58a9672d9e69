"""The shapes world's scenes: deterministic, well formed, held-out pairs kept out of training."""

import random

import numpy as np
import pytest
import torch

from ait2i_ext.shapes.data import (
    COLOURS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    SHAPES,
    ShapesDataset,
    caption_for,
    render_scene,
    sample_scene,
)
from ait2i_ext.shapes.prompts import PROMPT_SETS, parse_prompt, prompt_set, subjects_for


def test_world_has_enough_colours_and_shapes():
    assert len(COLOURS) >= 7
    assert {"circle", "square", "triangle"} <= set(SHAPES)


def test_same_seed_same_scene_and_pixels():
    for seed in range(20):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(render_scene(a)), np.asarray(render_scene(b)))
    assert len({sample_scene(s) for s in range(20)}) == 20


def test_scenes_are_well_formed():
    for seed in range(300):
        scene = sample_scene(seed)
        assert 1 <= len(scene.objects) <= 3
        pairs = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)
        assert not set(pairs) & set(HELD_OUT_PAIRS)
        for o in scene.objects:
            assert 0 <= o.box[0] < o.box[2] <= 1 and 0 <= o.box[1] < o.box[3] <= 1
            assert o.phrase in scene.caption
        for i, a in enumerate(scene.objects):  # boxes never overlap
            for b in scene.objects[i + 1 :]:
                assert (
                    a.box[2] <= b.box[0]
                    or b.box[2] <= a.box[0]
                    or a.box[3] <= b.box[1]
                    or b.box[3] <= a.box[1]
                )


def test_captions_name_objects_in_order():
    assert caption_for(["red circle"]) == "a red circle"
    assert caption_for(["red circle", "blue square"]) == "a red circle and a blue square"
    assert (
        caption_for(["blue square", "red circle", "green triangle"])
        == "a blue square, a red circle and a green triangle"
    )
    assert caption_for(["orange circle"]) == "an orange circle"
    for seed in range(100):
        scene = sample_scene(seed)
        assert [(o.colour, o.shape) for o in parse_prompt(scene.caption)] == [
            (o.colour, o.shape) for o in scene.objects
        ]


def test_num_objects_is_validated():
    with pytest.raises(ValueError, match="num_objects"):
        sample_scene(0, num_objects=4)


def test_object_weights_set_the_mix_of_scene_sizes():
    counts = [len(sample_scene(seed, object_weights=(6, 3, 1)).objects) for seed in range(600)]
    assert np.bincount(counts, minlength=4)[1:].tolist() == pytest.approx([360, 180, 60], abs=40)
    assert {len(sample_scene(s, object_weights=(0, 1, 0)).objects) for s in range(50)} == {2}
    singles = ShapesDataset(20, object_weights=(1, 0, 0))
    assert all(" and " not in singles[i]["caption"] for i in range(20))
    # the default mix is unchanged, so the default weights reproduce the old scenes
    assert sample_scene(123) == sample_scene(123, object_weights=(3, 4, 3))
    for bad in [(1, 1), (-1, 1, 1), (0, 0, 0)]:
        with pytest.raises(ValueError, match="object_weights"):
            ShapesDataset(4, object_weights=bad)


def test_dataset_items_and_caption_dropout():
    data = ShapesDataset(64, seed_offset=5, caption_dropout=0.5)
    item = data[3]
    assert item["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert torch.equal(
        item["pixel_values"], ShapesDataset(64, seed_offset=5, caption_dropout=0.5)[3]["pixel_values"]
    )
    dropped = sum(data[i]["caption"] == "" for i in range(64))
    assert 16 <= dropped <= 48
    assert all(ShapesDataset(8)[i]["caption"] for i in range(8))


def test_prompt_sets_are_fixed_and_valid():
    phrasings = {"phrase_comma", "phrase_the", "phrase_plus", "phrase_one"}
    assert set(PROMPT_SETS) == {"single", "two", "three", "held_out", "close_colours", "hard"} | phrasings
    for name, prompts in PROMPT_SETS.items():
        assert len(prompts) >= 20, name
        assert len({p.text for p in prompts}) == len(prompts), name
        for p in prompts:
            assert parse_prompt(p.text) == tuple((type(o)(o.colour, o.shape)) for o in p.objects)
            assert all(o.box is not None for o in p.objects)
    assert all(len(p.objects) == 2 for p in prompt_set("two"))
    assert all(len(p.objects) == 3 for p in prompt_set("hard"))
    assert all(any((o.colour, o.shape) in HELD_OUT_PAIRS for o in p.objects) for p in prompt_set("held_out"))
    with pytest.raises(ValueError, match="prompt set"):
        prompt_set("nope")


def test_subjects_for_gives_noun_and_attribute_words():
    (a, b) = subjects_for(parse_prompt("a red circle and a cyan square"))
    assert (a.noun, a.attributes) == ("circle", ("red",))
    assert (b.noun, b.attributes) == ("square", ("cyan",))
    assert subjects_for(prompt_set("two")[0].objects)[0].box == prompt_set("two")[0].objects[0].box


def test_new_shapes_only_when_asked_for():
    from ait2i_ext.shapes.data import ALL_SHAPES, NEW_SHAPES

    default = {o.shape for seed in range(300) for o in sample_scene(seed).objects}
    assert default == set(SHAPES)  # the training world is unchanged
    assert sample_scene(7) == sample_scene(7, shapes=None)
    new = {o.shape for seed in range(100) for o in sample_scene(seed, shapes=NEW_SHAPES).objects}
    assert new == set(NEW_SHAPES)
    for shape in NEW_SHAPES:
        image = np.asarray(render_scene(sample_scene(1, num_objects=1, shapes=(shape,))))
        assert (image != 255).any()
    with pytest.raises(ValueError, match="shapes=.*invalid"):
        sample_scene(0, shapes=("hexagon",))
    assert set(ALL_SHAPES) == set(SHAPES) | set(NEW_SHAPES)


def test_phrasing_sets_rephrase_the_two_set_in_forms_training_never_uses():
    from ait2i_ext.shapes.data import caption_for

    two = prompt_set("two")
    assert (
        prompt_set("phrase_the")[0].text.startswith("the ")
        and " and the " in prompt_set("phrase_the")[0].text
    )
    rng = random.Random(0)
    training = {caption_for(["red circle", "blue square"], rng) for _ in range(2000)}
    for name in ("phrase_comma", "phrase_the", "phrase_plus", "phrase_one"):
        prompts = prompt_set(name)
        assert [p.objects for p in prompts] == [p.objects for p in two]
        assert all(
            parse_prompt(p.text) == tuple(o.__class__(o.colour, o.shape) for o in p.objects) for p in prompts
        )
        rephrased = {
            "phrase_comma": "a red circle, a blue square",
            "phrase_the": "the red circle and the blue square",
            "phrase_plus": "a red circle plus a blue square",
            "phrase_one": "one red circle and one blue square",
        }[name]
        assert rephrased not in training
    # the article before a vowel, as the `two` set and the training captions write it
    assert prompt_set("phrase_comma")[4].text == "a blue square, an orange triangle"
    assert prompt_set("phrase_plus")[4].text == "a blue square plus an orange triangle"
