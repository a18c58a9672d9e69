"""Training data for personalisation on the shapes world: a new concept's instance images and the
class images of its prior preservation.

    python -m ait2i_ext.shapes.concepts --shape star --colour yellow --identifier sks --out data/star \
        --class-scenes data/shapes-world

writes ten images of a yellow star (``NEW_SHAPES``: the shipped model never saw one), some of them
beside one other shape of the world, with their captions ("a sks star and a blue square") in
``metadata.jsonl``, and with ``--class-scenes DIR`` 2000 rendered scenes of the training world with
their captions, the class images of the shipped model's recipe (``train_lora.py --class_data_dir DIR
--num_class_images 2000``). ``--class-prompts FILE`` instead writes captions of the world for class
images the base model draws (``--class_prompts_file``), and ``--cut-mix-from DIR`` adds SVDiff-style
cut-mix images (the concept pasted beside the objects of DIR's class images); both measured worse
(docs/personalization.md).

:class:`WorldComposer` is the composition augmentation of ``train_lora.py --world_compositions``: the
concept cut from its own instance images, scaled to the sizes objects have in the world's scenes and
placed beside rendered objects of the world, captioned ("a sks star and a blue square"), drawn afresh for
every training slot it takes.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .data import (
    ALL_SHAPES,
    COLOURS,
    IMAGE_SIZE,
    MARGIN,
    MAX_SIZE,
    MIN_SIZE,
    Scene,
    ShapeObject,
    _place,
    caption_for,
    render_scene,
    sample_scene,
    training_pairs,
)

CONCEPT_SIDES = (22, 34)  # a concept alone, side in pixels at 64 px
PAIRED_CONCEPT_SIDES = (18, MAX_SIZE)  # a concept beside another object


def concept_scenes(
    shape: str, colour: str, identifier: str, count: int = 10, with_other: int = 5, seed: int = 0
) -> list[Scene]:
    """``count`` scenes of the concept ``identifier`` (a ``colour`` ``shape``); the first ``count -
    with_other`` show it alone, the others beside one shape of the training world (a random colour-shape
    pair of another colour), in a random order in the caption ("a sks star and a blue square").

    Raises:
        ValueError: an unknown shape or colour, ``count < 1`` or ``with_other`` outside ``[0, count]``.
    """
    if shape not in ALL_SHAPES or colour not in COLOURS:
        raise ValueError(
            f"shape={shape!r}, colour={colour!r} is invalid: expected a shape of {ALL_SHAPES} and a colour of "
            f"{list(COLOURS)}"
        )
    if count < 1 or not 0 <= with_other <= count:
        raise ValueError(
            f"count={count}, with_other={with_other} is invalid: expected count >= 1, 0 <= with_other <= count"
        )
    rng = random.Random(seed)
    others = [(c, s) for c, s in training_pairs() if c != colour]
    scenes = []
    for i in range(count):
        concept = f"{identifier} {shape}"
        if i < count - with_other:
            sides = [rng.randint(*CONCEPT_SIDES)]
            objects = [(colour, shape)]
        else:
            sides = [rng.randint(*PAIRED_CONCEPT_SIDES), rng.randint(MIN_SIZE, MAX_SIZE - 4)]
            objects = [(colour, shape), rng.choice(others)]
        boxes = None
        while boxes is None:
            boxes = _place(rng, sides)
        placed = [ShapeObject(c, s, tuple(v / IMAGE_SIZE for v in b)) for (c, s), b in zip(objects, boxes)]
        if rng.random() < 0.5:
            placed.reverse()
        phrases = [concept if o.shape == shape and o.colour == colour else o.phrase for o in placed]
        scenes.append(Scene(tuple(placed), caption_for(phrases, rng)))
    return scenes


CLASS_SCENE_SEED = 100_000  # the scenes of the world used as class images start here


def class_scenes(count: int = 2000, seed: int = 0) -> list[Scene]:
    """``count`` rendered scenes of the training world (1-3 objects, ``sample_scene``) from
    ``CLASS_SCENE_SEED + seed``: the prior-preservation class images of the shipped model's recipe
    (the world as the base model learned it, instead of images the base model draws)."""
    return [sample_scene(CLASS_SCENE_SEED + seed + i) for i in range(count)]


def class_prompts(count: int = 200, seed: int = 0) -> list[str]:
    """Captions of ``count`` scenes of the training world (1-3 objects, ``sample_scene``), from ``seed``."""
    return [sample_scene(seed + i).caption for i in range(count)]


MAX_MIXED_OBJECTS = 2  # scenes of the base the concept joins (the world shows at most three objects)
INK_THRESHOLD = 230  # a pixel whose darkest channel is below this is part of a drawn object


def free_box(
    image: Image.Image, side: int, rng: random.Random, tries: int = 200
) -> tuple[int, int, int, int] | None:
    """A random ``side`` x ``side`` box of ``image`` that keeps ``MARGIN`` pixels from every drawn
    pixel and from the border, or None when ``tries`` random boxes found none."""
    ink = np.asarray(image.convert("RGB")).min(axis=2) < INK_THRESHOLD
    size = ink.shape[0]
    for _ in range(tries):
        x0 = rng.randint(MARGIN, size - MARGIN - side)
        y0 = rng.randint(MARGIN, size - MARGIN - side)
        if not ink[max(0, y0 - MARGIN) : y0 + side + MARGIN, max(0, x0 - MARGIN) : x0 + side + MARGIN].any():
            return (x0, y0, x0 + side, y0 + side)
    return None


def cut_mix(
    image: Image.Image, caption: str, shape: str, colour: str, identifier: str, rng: random.Random
) -> tuple[Image.Image, str] | None:
    """SVDiff's cut-mix for the shapes world: the concept (a ``colour`` ``shape``, rendered) pasted into a
    free spot of ``image``, a scene the base model drew for ``caption``, and the caption naming both
    ("a red circle" -> "a sks star and a red circle", the concept first or last at random). None when
    the scene leaves no room, its caption names no object or more than ``MAX_MIXED_OBJECTS``, or the
    base model's image does not show what its caption names (``ait2i_ext.shapes.evaluator``).
    """
    from .evaluator import evaluate
    from .prompts import parse_prompt

    objects = parse_prompt(caption)
    if not 1 <= len(objects) <= MAX_MIXED_OBJECTS:
        return None
    if not evaluate(image.convert("RGB"), [(o.colour, o.shape) for o in objects]).all_present:
        return None
    side = rng.randint(*PAIRED_CONCEPT_SIDES)
    box = free_box(image, side, rng)
    if box is None:
        return None
    concept = ShapeObject(colour, shape, tuple(v / image.width for v in box))
    drawn = render_scene(Scene((concept,), ""), size=image.width)
    mask = Image.fromarray(((np.asarray(drawn).min(axis=2) < INK_THRESHOLD) * 255).astype(np.uint8))
    mixed = image.convert("RGB").copy()
    mixed.paste(drawn, (0, 0), mask)
    phrases = [f"{o.colour} {o.shape}" for o in objects]
    phrases.insert(0 if rng.random() < 0.5 else len(phrases), f"{identifier} {shape}")
    return mixed, caption_for(phrases, rng)


def cut_mixes(
    class_dir: str | Path, count: int, shape: str, colour: str, identifier: str, seed: int = 0
) -> list[tuple[Image.Image, str]]:
    """``count`` cut-mix images (:func:`cut_mix`) of the concept in the base model's scenes of
    ``class_dir`` (class images with their captions in ``metadata.jsonl``, as ``train_lora.py`` draws
    them), with their captions. Scenes are taken in order; one the concept cannot join is skipped.

    Raises:
        ValueError: ``count < 0``, or ``class_dir`` has fewer than ``count`` scenes the concept can join.
    """
    from ait2i_ext.training.lora_data import list_images, read_captions

    if count < 0:
        raise ValueError(f"count={count} is invalid: expected an integer >= 0")
    images = list_images(class_dir, "--cut-mix-from")
    captions = read_captions(images, None, "--cut-mix-from")
    rng = random.Random(seed)
    mixes = []
    for path, caption in zip(images, captions, strict=True):
        if len(mixes) == count:
            break
        with Image.open(path) as image:
            mixed = cut_mix(image, caption, shape, colour, identifier, rng)
        if mixed is not None:
            mixes.append(mixed)
    if len(mixes) < count:
        raise ValueError(
            f"--cut-mix-from={str(class_dir)!r} has {len(mixes)} of its {len(images)} scenes the concept can "
            f"join (room for it, <= {MAX_MIXED_OBJECTS} objects, drawn as captioned): expected at least "
            f"{count} (--cut-mix)"
        )
    return mixes


# Composites with 0, 1 and 2 rendered objects beside the concept (the world's scenes hold 1-3 objects).
COMPOSED_OTHER_WEIGHTS = (1, 3, 1)


def _strip_article(caption: str) -> str:
    words = caption.split()
    return " ".join(words[1:] if words and words[0].lower() in ("a", "an") else words)


def concept_crop(image: Image.Image) -> Image.Image:
    """The drawn pixels of ``image`` (a concept drawn alone on white) cut to their box, as RGBA: opaque on
    the drawing, transparent elsewhere, the transparent pixels filled with the drawing's median colour (so
    scaling does not blend its edge with white).

    Raises:
        ValueError: ``image`` has no drawn pixel.
    """
    rgb = np.asarray(image.convert("RGB"))
    ink = rgb.min(axis=2) < INK_THRESHOLD
    if not ink.any():
        raise ValueError(f"the image ({image.width} x {image.height}) is blank: expected a drawn concept")
    rows, cols = np.nonzero(ink)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop, mask = rgb[r0:r1, c0:c1].copy(), ink[r0:r1, c0:c1]
    crop[~mask] = np.median(rgb[ink], axis=0).astype(np.uint8)
    return Image.fromarray(np.dstack([crop, mask.astype(np.uint8) * 255]), "RGBA")


def nearest_colour(crop: Image.Image) -> str:
    """The name in ``COLOURS`` nearest the median colour of ``crop``'s opaque pixels."""
    rgba = np.asarray(crop.convert("RGBA")).reshape(-1, 4)
    median = np.median(rgba[rgba[:, 3] > 127, :3], axis=0)
    return min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name]) - median) ** 2)))


def paste_concept(canvas: Image.Image, crop: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """``canvas`` with ``crop`` (:func:`concept_crop`) scaled to fit ``box`` (pixels, aspect kept, centred)."""
    x0, y0, x1, y1 = box
    scale = min((x1 - x0) / crop.width, (y1 - y0) / crop.height)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    scaled = crop.resize(size, Image.BILINEAR)
    mask = scaled.getchannel("A").point(lambda a: 255 if a > 127 else 0)
    out = canvas.copy()
    out.paste(scaled.convert("RGB"), (x0 + (x1 - x0 - size[0]) // 2, y0 + (y1 - y0 - size[1]) // 2), mask)
    return out


def compose_concept(
    crop: Image.Image,
    phrase: str,
    rng: random.Random,
    other_weights: Sequence[float] = COMPOSED_OTHER_WEIGHTS,
    concept_sides: tuple[int, int] | None = PAIRED_CONCEPT_SIDES,
) -> tuple[Image.Image, str]:
    """A scene of the world with the concept in it: ``crop`` (:func:`concept_crop`) at a side drawn from
    ``concept_sides`` (default 18-28 px: the world's object sizes, 14-28, from the smallest at which the
    shipped VAE still draws a star's points), placed apart from 0, 1 or 2 rendered objects of the world
    (``other_weights``; colour-shape pairs of the training world in other colours than the concept's, at
    the world's sizes, 4 px less with three objects), with a caption naming all of them in a random order
    ("a sks star and a blue square"; ``phrase`` is the concept's, e.g. "sks star"). ``concept_sides=None``:
    the concept at its own size, its pixels pasted as drawn (not resampled)."""
    count = rng.choices(range(len(other_weights)), weights=other_weights)[0]
    colour = nearest_colour(crop)
    others = rng.sample([p for p in training_pairs() if p[0] != colour], count)
    boxes = None
    while boxes is None:
        high = MAX_SIZE if count < 2 else MAX_SIZE - 4
        if concept_sides is None:
            sides = [max(crop.size)]
        else:
            top = min(concept_sides[1], high)
            sides = [rng.randint(min(concept_sides[0], top), top)]
        boxes = _place(rng, sides + [rng.randint(MIN_SIZE, high) for _ in range(count)])
    placed = tuple(
        ShapeObject(c, s, tuple(v / IMAGE_SIZE for v in box)) for (c, s), box in zip(others, boxes[1:])
    )
    image = paste_concept(render_scene(Scene(placed, "")), crop, boxes[0])
    phrases = [phrase, *(o.phrase for o in placed)]
    rng.shuffle(phrases)
    return image, caption_for(phrases, rng)


@dataclass(frozen=True, eq=False)
class WorldComposer:
    """The composition augmentation of a concept (``train_lora.py --world_compositions``): called with a
    ``random.Random``, returns a new training image and its caption (:func:`compose_concept` of one of
    ``crops`` drawn at random).

    Args:
        crops: the concept as its instance images draw it alone (:func:`concept_crop`).
        phrase: the concept's words without article, e.g. ``"sks star"``.
        other_weights: relative frequencies of 0, 1 and 2 other objects.
        concept_sides: the concept's side in pixels, lowest and highest; None: its own size (not rescaled).
    """

    crops: tuple[Image.Image, ...]
    phrase: str
    other_weights: tuple[float, ...] = field(default=COMPOSED_OTHER_WEIGHTS)
    concept_sides: tuple[int, int] | None = PAIRED_CONCEPT_SIDES

    def __post_init__(self) -> None:
        if not self.crops:
            raise ValueError("crops=() is invalid: expected at least one image of the concept alone")
        if not self.phrase.strip():
            raise ValueError(
                f"phrase={self.phrase!r} is invalid: expected the concept's words, e.g. 'sks star'"
            )
        if not self.other_weights or min(self.other_weights) < 0 or sum(self.other_weights) <= 0:
            raise ValueError(
                f"other_weights={self.other_weights!r} is invalid: expected weights >= 0, not all 0"
            )
        if self.concept_sides is not None:
            low, high = self.concept_sides
            if not 1 <= low <= high <= MAX_SIZE:
                raise ValueError(
                    f"concept_sides={self.concept_sides!r} is invalid: expected 1 <= low <= high <= {MAX_SIZE}, "
                    "or None (its own size)"
                )
        else:  # its own size: room for the concept and one more object of the world
            largest, room = max(max(c.size) for c in self.crops), IMAGE_SIZE - 3 * MARGIN - MIN_SIZE
            if largest > room:
                raise ValueError(
                    f"a crop of {largest} px is invalid with concept_sides=None (its own size): expected at most "
                    f"{room} px, to leave room for another object"
                )

    @classmethod
    def from_instances(
        cls, images: Sequence[str | Path], captions: Sequence[str], prompt: str, **options
    ) -> WorldComposer:
        """From the instance images whose caption names only the concept (``prompt``, e.g. "a sks star",
        with or without its article); the others (the concept beside other objects) are not cut.
        ``options``: the other fields (``other_weights``, ``concept_sides``).

        Raises:
            ValueError: no instance image is captioned as the concept alone.
        """
        phrase = _strip_article(prompt)
        alone = [p for p, c in zip(images, captions, strict=True) if _strip_article(c) == phrase]
        if not alone:
            raise ValueError(
                f"no instance image is captioned {prompt!r} alone: expected at least one image of the concept "
                "alone to cut it from (--world_compositions)"
            )
        crops = []
        for path in alone:
            with Image.open(path) as image:
                crops.append(concept_crop(image))
        return cls(tuple(crops), phrase, **options)

    def __call__(self, rng: random.Random) -> tuple[Image.Image, str]:
        return compose_concept(
            rng.choice(self.crops), self.phrase, rng, self.other_weights, self.concept_sides
        )


def write_concept(
    folder: str | Path, scenes: list[Scene], stem: str, mixes: Sequence[tuple[Image.Image, str]] = ()
) -> list[Path]:
    """Render ``scenes`` into ``folder`` as ``{stem}-{i:02d}.png``, and save the cut-mix images ``mixes``
    (:func:`cut_mixes`) as ``mix-{i:02d}.png``, with every caption in ``metadata.jsonl``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = [(f"{stem}-{i:02d}.png", render_scene(s), s.caption) for i, s in enumerate(scenes)]
    images += [(f"mix-{i:02d}.png", image, caption) for i, (image, caption) in enumerate(mixes)]
    paths, lines = [], []
    for name, image, caption in images:
        paths.append(folder / name)
        image.save(paths[-1])
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=ALL_SHAPES)
    parser.add_argument("--colour", required=True, choices=list(COLOURS))
    parser.add_argument("--identifier", required=True, help="the concept's rare word, e.g. sks")
    parser.add_argument("--out", required=True, help="folder for the images and metadata.jsonl")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--with-other", type=int, default=5, help="how many show one other shape too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--class-prompts", help="also write a file of training-world captions (for --class_prompts_file)"
    )
    parser.add_argument("--num-class-prompts", type=int, default=200)
    parser.add_argument(
        "--class-scenes",
        metavar="DIR",
        help="also write rendered scenes of the training world with their captions (metadata.jsonl) into DIR, "
        "as class images for train_lora.py --class_data_dir",
    )
    parser.add_argument("--num-class-scenes", type=int, default=2000)
    parser.add_argument(
        "--cut-mix-from",
        metavar="CLASS_DIR",
        help="class images the base model drew (train_lora.py's --class_data_dir, with metadata.jsonl): "
        "also write --cut-mix images of the concept pasted beside their objects",
    )
    parser.add_argument(
        "--cut-mix", type=int, default=20, help="how many cut-mix images (with --cut-mix-from)"
    )
    args = parser.parse_args(argv)
    if not args.identifier.strip() or " " in args.identifier.strip():
        parser.error(f"--identifier={args.identifier!r} is invalid: expected one word")
    try:
        scenes = concept_scenes(
            args.shape, args.colour, args.identifier, args.count, args.with_other, args.seed
        )
    except ValueError as err:
        parser.error(str(err))
    for flag in ("num_class_prompts", "num_class_scenes"):
        if getattr(args, flag) < 1:
            parser.error(
                f"--{flag.replace('_', '-')}={getattr(args, flag)} is invalid: expected an integer >= 1"
            )
    mixes = []
    if args.cut_mix_from:
        try:
            mixes = cut_mixes(
                args.cut_mix_from, args.cut_mix, args.shape, args.colour, args.identifier, args.seed
            )
        except ValueError as err:
            parser.error(str(err))
    write_concept(args.out, scenes, args.shape, mixes)
    if args.class_scenes:
        write_concept(args.class_scenes, class_scenes(args.num_class_scenes, args.seed), "scene")
    if args.class_prompts:
        path = Path(args.class_prompts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(class_prompts(args.num_class_prompts, args.seed)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
