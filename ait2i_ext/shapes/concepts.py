"""Training data for personalisation on the shapes world: a new concept's instance images and the
prompts of its prior-preservation class images.

    python -m ait2i_ext.shapes.concepts --shape star --colour yellow --identifier sks --out data/star

writes ten images of a yellow star (``NEW_SHAPES``: the shipped model never saw one), some of them
beside one other shape of the world, with their captions ("a sks star and a blue square") in
``metadata.jsonl``, and ``--class-prompts FILE``: captions of the training world ("a red circle and a
green square") for ``train_lora.py --class_prompts_file`` (class images drawn by the base model).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from .data import (
    ALL_SHAPES,
    COLOURS,
    IMAGE_SIZE,
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


def class_prompts(count: int = 200, seed: int = 0) -> list[str]:
    """Captions of ``count`` scenes of the training world (1-3 objects, ``sample_scene``), from ``seed``."""
    return [sample_scene(seed + i).caption for i in range(count)]


def write_concept(folder: str | Path, scenes: list[Scene], stem: str) -> list[Path]:
    """Render ``scenes`` into ``folder`` as ``{stem}-{i:02d}.png`` with their captions in ``metadata.jsonl``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for i, scene in enumerate(scenes):
        paths.append(folder / f"{stem}-{i:02d}.png")
        render_scene(scene).save(paths[-1])
        lines.append(json.dumps({"file_name": paths[-1].name, "text": scene.caption}))
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
    args = parser.parse_args(argv)
    if not args.identifier.strip() or " " in args.identifier.strip():
        parser.error(f"--identifier={args.identifier!r} is invalid: expected one word")
    try:
        scenes = concept_scenes(
            args.shape, args.colour, args.identifier, args.count, args.with_other, args.seed
        )
    except ValueError as err:
        parser.error(str(err))
    if args.num_class_prompts < 1:
        parser.error(f"--num-class-prompts={args.num_class_prompts} is invalid: expected an integer >= 1")
    write_concept(args.out, scenes, args.shape)
    if args.class_prompts:
        path = Path(args.class_prompts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(class_prompts(args.num_class_prompts, args.seed)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
