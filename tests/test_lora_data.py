"""Training data of the LoRA script: per-image captions, class-image pairing, shapes-world concepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ait2i_ext.shapes.concepts import (
    PAIRED_CONCEPT_SIDES,
    WorldComposer,
    class_prompts,
    class_scenes,
    concept_crop,
    concept_scenes,
    cut_mix,
    main,
    write_concept,
)
from ait2i_ext.shapes.data import MAX_SIZE, Scene, ShapeObject, render_scene
from ait2i_ext.shapes.evaluator import EvaluatorConfig, detect, evaluate
from ait2i_ext.shapes.prompts import parse_prompt

try:
    from ait2i_ext.training.lora_data import DreamBoothDataset, list_images, read_captions
except ImportError:
    from training.lora_data import DreamBoothDataset, list_images, read_captions


def _images(folder: Path, count: int, prefix: str = "") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)).save(folder / f"{prefix}{i}.png")
    return list_images(folder)


def test_captions_come_from_metadata_jsonl_else_the_prompt(tmp_path):
    images = _images(tmp_path, 3)
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "1.png", "text": "a sks star and a blue square"}) + "\n"
    )
    assert list_images(tmp_path) == images  # metadata.jsonl is not an image, and not an error either
    assert read_captions(images, "a sks star") == ["a sks star", "a sks star and a blue square", "a sks star"]
    with pytest.raises(ValueError, match=r"2 image\(s\) have no caption .* \['0.png', '2.png'\]"):
        read_captions(images, None)


def test_a_broken_metadata_line_is_named(tmp_path):
    images = _images(tmp_path, 1)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png"}\n')
    with pytest.raises(
        ValueError, match=r"metadata.jsonl' line 1 .* expected a JSON object with \"file_name\" and \"text\""
    ):
        read_captions(images, "x")


def test_every_class_image_is_used_over_the_epochs(tmp_path):
    instance = _images(tmp_path / "i", 2)
    classes = _images(tmp_path / "c", 5)
    ids = torch.arange(5).unsqueeze(1).repeat(1, 77)  # class image j has ids j
    data = DreamBoothDataset(instance, torch.zeros(77, dtype=torch.long), 8, classes, ids)
    seen = []
    for epoch in range(3):
        data.set_epoch(epoch)
        seen += [int(data[i]["class_ids"][0]) for i in range(len(data))]
    assert seen == [0, 1, 2, 3, 4, 0]
    assert data[0]["instance_ids"].shape == (77,)


def test_prompt_rows_must_match_the_images(tmp_path):
    instance = _images(tmp_path / "i", 2)
    with pytest.raises(ValueError, match=r"instance_prompt_ids has 3 rows: expected one per image \(2\)"):
        DreamBoothDataset(instance, torch.zeros(3, 77, dtype=torch.long), 8)


def test_concept_scenes_show_the_concept_and_sometimes_one_other_shape():
    scenes = concept_scenes("star", "yellow", "sks", count=10, with_other=4, seed=3)
    assert [len(s.objects) for s in scenes] == [1] * 6 + [2] * 4
    for scene in scenes:
        assert "sks star" in scene.caption
        concept = [o for o in scene.objects if o.shape == "star"]
        assert len(concept) == 1 and concept[0].colour == "yellow"
        others = [o for o in scene.objects if o.shape != "star"]
        assert all(o.colour != "yellow" and o.phrase in scene.caption for o in others)
        # the renderer draws what the caption says: the evaluator finds every object
        assert evaluate(render_scene(scene), [(o.colour, o.shape) for o in scene.objects]).all_present
    assert concept_scenes("star", "yellow", "sks", seed=3) != concept_scenes("star", "yellow", "sks", seed=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": "hexagon"}, r"shape='hexagon', colour='yellow' is invalid"),
        ({"with_other": 11}, r"count=10, with_other=11 is invalid"),
    ],
)
def test_concept_scenes_reject_bad_input(kwargs, match):
    args = {"shape": "star", "colour": "yellow", "identifier": "sks", **kwargs}
    with pytest.raises(ValueError, match=match):
        concept_scenes(**args)


def test_class_prompts_are_training_world_captions():
    prompts = class_prompts(50, seed=7)
    assert len(prompts) == 50 and prompts == class_prompts(50, seed=7)
    assert not any(word in p for p in prompts for word in ("star", "heart", "sks"))
    assert any(" and " in p for p in prompts)


def test_the_command_writes_images_captions_and_class_prompts(tmp_path):
    out, prompts = tmp_path / "star", tmp_path / "prompts.txt"
    assert main(["--shape", "star", "--colour", "yellow", "--identifier", "sks", "--out", str(out),
                 "--count", "4", "--with-other", "2", "--class-prompts", str(prompts),
                 "--num-class-prompts", "5"]) == 0  # fmt: skip
    images = list_images(out)
    assert [p.name for p in images] == [f"star-{i:02d}.png" for i in range(4)]
    captions = read_captions(images, None)
    assert (
        all("sks star" in c for c in captions)
        and sum(" and " in c or "with" in c or "beside" in c or "next to" in c for c in captions) == 2
    )
    assert len(prompts.read_text().splitlines()) == 5
    write_concept(tmp_path / "again", concept_scenes("star", "yellow", "sks", 4, 2), "star")
    assert (tmp_path / "again" / "metadata.jsonl").read_text() == (out / "metadata.jsonl").read_text()


def test_the_command_refuses_bad_input_before_writing(tmp_path, capsys):
    out = tmp_path / "star"
    with pytest.raises(SystemExit) as err:
        main(
            [
                "--shape",
                "star",
                "--colour",
                "yellow",
                "--identifier",
                "sks",
                "--out",
                str(out),
                "--with-other",
                "20",
            ]
        )
    assert err.value.code == 2 and "with_other=20 is invalid" in capsys.readouterr().err
    assert not out.exists()


def _scene(*objects: tuple[str, str, tuple[float, float, float, float]]) -> Image.Image:
    return render_scene(Scene(tuple(ShapeObject(c, s, b) for c, s, b in objects), ""))


def test_cut_mix_pastes_the_concept_beside_the_scene_and_names_both():
    import random

    image = _scene(("red", "circle", (0.05, 0.05, 0.4, 0.4)))
    for seed in range(5):
        mixed, caption = cut_mix(image, "a red circle", "star", "yellow", "sks", random.Random(seed))
        assert "sks star" in caption and "red circle" in caption
        # the scene's object is untouched and the concept is drawn: the evaluator reads both
        assert evaluate(mixed, [("red", "circle"), ("yellow", "star")]).all_present
        assert np.array_equal(np.asarray(mixed)[:24, :24], np.asarray(image)[:24, :24])


def test_cut_mix_skips_scenes_without_room_or_not_showing_their_caption():
    import random

    full = _scene(("blue", "square", (0.0, 0.0, 1.0, 1.0)))
    assert cut_mix(full, "a blue square", "star", "yellow", "sks", random.Random(0)) is None
    circle = _scene(("red", "circle", (0.05, 0.05, 0.4, 0.4)))
    assert cut_mix(circle, "a green square", "star", "yellow", "sks", random.Random(0)) is None


def test_cut_mixes_join_the_scenes_that_have_room_and_are_written_with_their_captions(tmp_path, capsys):
    classes, out = tmp_path / "class", tmp_path / "star"
    classes.mkdir()
    rows = [("a red circle", ("red", "circle", (0.05, 0.05, 0.4, 0.4))),
            ("a blue square", ("blue", "square", (0.0, 0.0, 1.0, 1.0))),  # no room: skipped
            ("a green triangle", ("green", "triangle", (0.5, 0.5, 0.9, 0.9)))]  # fmt: skip
    lines = []
    for i, (caption, obj) in enumerate(rows):
        _scene(obj).save(classes / f"class-{i:05d}.png")
        lines.append(json.dumps({"file_name": f"class-{i:05d}.png", "text": caption}))
    (classes / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["--shape", "star", "--colour", "yellow", "--identifier", "sks", "--out", str(out),
                 "--count", "2", "--with-other", "0", "--cut-mix-from", str(classes), "--cut-mix", "2"]) == 0  # fmt: skip
    images = list_images(out)
    assert [p.name for p in images] == ["mix-00.png", "mix-01.png", "star-00.png", "star-01.png"]
    captions = read_captions(images, None)
    assert "red circle" in captions[0] and "green triangle" in captions[1]
    assert all("sks star" in c for c in captions)
    with pytest.raises(SystemExit):
        main(["--shape", "star", "--colour", "yellow", "--identifier", "sks", "--out", str(tmp_path / "again"),
              "--cut-mix-from", str(classes), "--cut-mix", "3"])  # fmt: skip
    assert "has 2 of its 3 scenes the concept can join" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_class_scenes_are_the_rendered_world_with_its_captions(tmp_path):
    scenes = class_scenes(40)
    assert scenes == class_scenes(40) and scenes != class_scenes(40, seed=1)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert not any(o.shape in ("star", "heart") for s in scenes for o in s.objects)
    out = tmp_path / "world"
    assert main(["--shape", "star", "--colour", "yellow", "--identifier", "sks", "--out", str(tmp_path / "star"),
                 "--class-scenes", str(out), "--num-class-scenes", "3"]) == 0  # fmt: skip
    images = list_images(out)
    assert [p.name for p in images] == ["scene-00.png", "scene-01.png", "scene-02.png"]
    assert read_captions(images, None) == [s.caption for s in scenes[:3]]
    for image, scene in zip(images, scenes):
        assert evaluate(
            Image.open(image).convert("RGB"), [(o.colour, o.shape) for o in scene.objects]
        ).all_present


# --- world compositions (train_lora.py --world_compositions) --------------------------------------


def _star_folder(folder: Path) -> tuple[list[Path], list[str]]:
    write_concept(folder, concept_scenes("star", "yellow", "sks", count=6, with_other=3, seed=2), "star")
    images = list_images(folder)
    return images, read_captions(images, None)


def test_the_composer_cuts_the_concept_from_its_lone_images_only(tmp_path):
    images, captions = _star_folder(tmp_path / "star")
    composer = WorldComposer.from_instances(images, captions, "a sks star")
    assert len(composer.crops) == 3 and composer.phrase == "sks star"  # the three lone stars
    crop = composer.crops[0]
    alpha = np.asarray(crop.getchannel("A"))
    assert alpha.max() == 255 and alpha.min() == 0  # the star opaque, its box corners transparent
    assert (alpha[0].any(), alpha[-1].any(), alpha[:, 0].any(), alpha[:, -1].any()) == (
        True,
    ) * 4  # cut tight
    with pytest.raises(ValueError, match=r"no instance image is captioned 'a xyz heart' alone"):
        WorldComposer.from_instances(images, captions, "a xyz heart")
    with pytest.raises(ValueError, match=r"is blank: expected a drawn concept"):
        concept_crop(Image.new("RGB", (64, 64), "white"))


def test_a_composition_shows_the_concept_at_world_sizes_beside_the_objects_its_caption_names(tmp_path):
    images, captions = _star_folder(tmp_path / "star")
    composer = WorldComposer.from_instances(images, captions, "a sks star")
    config = EvaluatorConfig(shapes=("circle", "square", "triangle", "star"))
    rng = __import__("random").Random(0)
    counts = []
    for _ in range(40):
        image, caption = composer(rng)
        assert image.size == (64, 64) and "sks star" in caption
        rest = caption.replace("sks star", "")
        others = (
            [(o.colour, o.shape) for o in parse_prompt(rest)]
            if any(w in rest for w in ("circle", "square", "triangle"))
            else []
        )
        counts.append(len(others))
        assert all(colour != "yellow" for colour, _ in others)
        # the evaluator finds the star and every object the caption names, apart (no fused blobs)
        assert evaluate(image, [("yellow", "star"), *others], config).all_present, caption
        (star,) = [d for d in detect(image, config) if d.shape == "star"]
        side = round(max(star.box[2] - star.box[0], star.box[3] - star.box[1]) * 64)
        assert (
            PAIRED_CONCEPT_SIDES[0] - 1 <= side <= MAX_SIZE
        )  # 18-28 px: the world's object sizes (not the lone images' 22-34 px)
    assert set(counts) == {0, 1, 2}


def test_a_composer_without_other_objects_rescales_and_moves_the_lone_concept(tmp_path):
    # train_lora.py --composition_others 1 --composition_sides 14,28
    images, captions = _star_folder(tmp_path / "star")
    composer = WorldComposer.from_instances(
        images, captions, "a sks star", other_weights=(1.0,), concept_sides=(14, 28)
    )
    config = EvaluatorConfig(shapes=("circle", "square", "triangle", "star"))
    rng = __import__("random").Random(0)
    sides, centres = [], set()
    for _ in range(30):
        image, caption = composer(rng)
        assert caption.removeprefix("a ") == "sks star"
        (star,) = detect(image, config)
        assert star.shape == "star" and star.colour == "yellow"
        sides.append(round(max(star.box[2] - star.box[0], star.box[3] - star.box[1]) * 64))
        centres.add((round((star.box[0] + star.box[2]) * 4), round((star.box[1] + star.box[3]) * 4)))
    assert 13 <= min(sides) < PAIRED_CONCEPT_SIDES[0] and max(sides) <= MAX_SIZE  # below the paired 18 px
    assert len(centres) > 10  # placed anywhere, not centred


def _pasted_as_drawn(image: Image.Image, crop: Image.Image) -> bool:
    """Whether ``crop``'s opaque pixels appear in ``image`` unchanged, somewhere."""
    rgb, cut = np.asarray(image.convert("RGB")), np.asarray(crop)
    mask, h, w = cut[..., 3] > 127, crop.height, crop.width
    return any(
        np.array_equal(rgb[y : y + h, x : x + w][mask], cut[..., :3][mask])
        for y in range(image.height - h + 1)
        for x in range(image.width - w + 1)
    )


def test_a_composer_at_the_concepts_own_size_pastes_its_pixels_beside_another_object(tmp_path):
    # train_lora.py --composition_others 0,1 --composition_sides own
    images, captions = _star_folder(tmp_path / "star")
    composer = WorldComposer.from_instances(
        images, captions, "a sks star", other_weights=(0.0, 1.0), concept_sides=None
    )
    config = EvaluatorConfig(shapes=("circle", "square", "triangle", "star"))
    rng = __import__("random").Random(0)
    for _ in range(12):
        image, caption = composer(rng)
        (other,) = parse_prompt(caption.replace("sks star", ""))
        assert evaluate(image, [("yellow", "star"), (other.colour, other.shape)], config).all_present, caption
        assert any(_pasted_as_drawn(image, crop) for crop in composer.crops), "the star was resampled"
    with pytest.raises(
        ValueError, match=r"a crop of 60 px is invalid with concept_sides=None .* at most 41 px"
    ):
        WorldComposer((Image.new("RGBA", (60, 60)),), "sks star", concept_sides=None)


def test_composed_slots_take_a_fraction_of_the_instance_images_and_repeat_with_the_seed(tmp_path):
    images = _images(tmp_path / "instance", 4)
    drawn = []

    def compose(rng):
        drawn.append(rng.random())
        return Image.new("RGB", (8, 8), (255, 255, 255)), "composed"

    def tokenize(caption):
        return torch.full((77,), 7 if caption == "composed" else 0)

    def composed_slots(seed):
        dataset = DreamBoothDataset(
            images, torch.zeros(4, 77, dtype=torch.long), 8, compose=compose, compose_fraction=0.5,
            tokenize=tokenize, seed=seed,
        )  # fmt: skip
        slots = []
        for epoch in range(25):
            dataset.set_epoch(epoch)
            for i in range(4):
                example = dataset[i]
                composed = bool(example["instance_ids"][0] == 7)
                assert composed == bool(
                    (example["instance_pixels"] == 1).all()
                )  # white image <-> its caption
                slots.append(composed)
        return slots

    first = composed_slots(seed=0)
    assert 0.35 < sum(first) / len(first) < 0.65
    assert composed_slots(seed=0) == first  # drawn from (seed, epoch, index): a resumed run sees the same
    assert composed_slots(seed=1) != first
    plain = DreamBoothDataset(
        images, torch.zeros(4, 77, dtype=torch.long), 8, compose=compose, tokenize=tokenize
    )
    calls = len(drawn)
    assert (
        all(plain[i]["instance_ids"][0] == 0 for i in range(4)) and len(drawn) == calls
    )  # fraction 0: never
    with pytest.raises(ValueError, match=r"compose_fraction=1.5 is invalid"):
        DreamBoothDataset(
            images, torch.zeros(4, 77), 8, compose=compose, compose_fraction=1.5, tokenize=tokenize
        )
    with pytest.raises(ValueError, match=r"tokenize=None is invalid with compose"):
        DreamBoothDataset(images, torch.zeros(4, 77), 8, compose=compose, compose_fraction=0.5)
