"""The shapes world: scenes of 1 to 3 flat coloured shapes on a plain background, their captions and boxes.

Every scene is drawn from a seed, so ``render_scene(sample_scene(seed))`` is the same image on every
machine. Boxes are normalised ``(x0, y0, x1, y1)`` in [0, 1], with y pointing down as in image rows.
A fixed list of colour-shape pairs (``HELD_OUT_PAIRS``) never appears in a training scene, so prompts
naming them test whether the model composes colour and shape words it has only seen apart.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)

# Saturated colours, pairwise at least ~100 apart in RGB so that a blurred or slightly off sample
# still lands on the right name. Red/orange, pink/purple, blue/purple and green/cyan are the closest
# pairs: the "close colours" prompt split uses them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 220, 0),
    "green": (20, 160, 40),
    "cyan": (0, 200, 220),
    "blue": (30, 60, 220),
    "purple": (130, 30, 180),
    "pink": (250, 110, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shapes no training scene of the shipped model shows: new concepts for personalisation (a LoRA teaches
# them). Drawn and read back like the others, but only where asked for (``sample_scene(shapes=...)``).
NEW_SHAPES: tuple[str, ...] = ("star", "heart")
ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES
CLOSE_COLOURS: tuple[tuple[str, str], ...] = (
    ("red", "orange"),
    ("pink", "purple"),
    ("blue", "purple"),
    ("green", "cyan"),
    ("orange", "yellow"),
)
# Never drawn in a training scene; every colour and every shape still appears in other pairs.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("purple", "triangle"),
    ("orange", "circle"),
    ("cyan", "square"),
)

MIN_SIZE, MAX_SIZE = 14, 28  # object side in pixels at 64 px
MARGIN = 3  # pixels kept free between two objects' boxes and to the image border


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Args:
        colour: a key of ``COLOURS``.
        shape: one of ``SHAPES``.
        box: ``(x0, y0, x1, y1)`` normalised to [0, 1].
    """

    colour: str
    shape: str
    box: tuple[float, float, float, float]

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene: its objects (in caption order) and its caption."""

    objects: tuple[ShapeObject, ...]
    caption: str


def training_pairs() -> list[tuple[str, str]]:
    """All colour-shape pairs a training scene may contain (every pair but ``HELD_OUT_PAIRS``)."""
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]


def with_article(phrase: str) -> str:
    """ "red circle" -> "a red circle", "orange square" -> "an orange square"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption_for(phrases: list[str], rng: random.Random | None = None) -> str:
    """A caption naming ``phrases`` (``"red circle"``, ...) in one of several forms.

    Without ``rng`` the canonical form is used: "a red circle", "a red circle and a blue square",
    "a blue square, a red circle and a green triangle".
    """
    if not phrases:
        raise ValueError("caption_for needs at least one phrase")
    form = 0 if rng is None else rng.choices((0, 1, 2), weights=(6, 2, 2))[0]
    if form == 2 and len(phrases) > 1:  # "a red circle with a blue square"
        joiner = rng.choice(("with", "next to", "beside"))
        return f" {joiner} ".join(map(with_article, phrases)) if len(phrases) == 2 else caption_for(phrases)
    words = [with_article(p) for p in phrases] if form != 1 else list(phrases)
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def star_polygon(x0: float, y0: float, x1: float, y1: float, inner: float = 0.5) -> list[tuple[float, float]]:
    """An upright five-pointed star (inner radius ``inner`` x the outer) filling the box ``(x0, y0, x1, y1)``."""
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else inner
        angle = math.pi / 2 + k * math.pi / 5
        points.append((radius * math.cos(angle), -radius * math.sin(angle)))
    return _fit_to_box(points, x0, y0, x1, y1)


def heart_polygon(x0: float, y0: float, x1: float, y1: float, n: int = 48) -> list[tuple[float, float]]:
    """An upright heart (two lobes on top, the point at the bottom) filling the box ``(x0, y0, x1, y1)``."""
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x, -y))
    return _fit_to_box(points, x0, y0, x1, y1)


def _fit_to_box(
    points: list[tuple[float, float]], x0: float, y0: float, x1: float, y1: float
) -> list[tuple[float, float]]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx, sy = (x1 - x0) / (max(xs) - min(xs)), (y1 - y0) / (max(ys) - min(ys))
    return [(x0 + (x - min(xs)) * sx, y0 + (y - min(ys)) * sy) for x, y in points]


def _place(rng: random.Random, sizes: list[int]) -> list[tuple[int, int, int, int]] | None:
    boxes: list[tuple[int, int, int, int]] = []
    for size in sizes:
        for _ in range(50):
            x0 = rng.randint(MARGIN, IMAGE_SIZE - MARGIN - size)
            y0 = rng.randint(MARGIN, IMAGE_SIZE - MARGIN - size)
            box = (x0, y0, x0 + size, y0 + size)
            if all(
                box[0] >= b[2] + MARGIN
                or b[0] >= box[2] + MARGIN
                or box[1] >= b[3] + MARGIN
                or b[1] >= box[3] + MARGIN
                for b in boxes
            ):
                boxes.append(box)
                break
        else:
            return None
    return boxes


DEFAULT_OBJECT_WEIGHTS = (3, 4, 3)


def sample_scene(
    seed: int,
    num_objects: int | None = None,
    allow_held_out: bool = False,
    object_weights: tuple[float, float, float] = DEFAULT_OBJECT_WEIGHTS,
    shapes: tuple[str, ...] | None = None,
) -> Scene:
    """The scene of ``seed``: 1 to 3 objects with distinct colour-shape pairs, placed without overlap.

    Args:
        seed: any integer; the same seed gives the same scene.
        num_objects: force the number of objects (1-3); by default 1, 2 or 3 drawn with ``object_weights``.
        allow_held_out: also draw ``HELD_OUT_PAIRS`` (never for training).
        object_weights: relative frequencies of scenes with 1, 2 and 3 objects.
        shapes: the shapes to draw from (any of ``ALL_SHAPES``); default ``SHAPES``, the training world.
            Every colour pairs with a shape not in ``SHAPES`` (``HELD_OUT_PAIRS`` name only old shapes).
    """
    if shapes is not None and (not shapes or any(s not in ALL_SHAPES for s in shapes)):
        raise ValueError(f"shapes={shapes!r} is invalid: expected a non-empty tuple of {ALL_SHAPES}")
    if len(object_weights) != 3 or min(object_weights) < 0 or sum(object_weights) <= 0:
        raise ValueError(
            f"object_weights={object_weights!r} is invalid: expected 3 weights >= 0 (for 1, 2, 3 objects), not all 0"
        )
    rng = random.Random(seed)
    n = num_objects if num_objects is not None else rng.choices((1, 2, 3), weights=object_weights)[0]
    if not 1 <= n <= 3:
        raise ValueError(f"num_objects={n} is invalid: expected 1, 2 or 3")
    pairs = [(c, s) for c in COLOURS for s in SHAPES] if allow_held_out else training_pairs()
    if shapes is not None:
        pairs = [(c, s) for c in COLOURS for s in shapes if allow_held_out or (c, s) not in HELD_OUT_PAIRS]
    while True:
        chosen = rng.sample(pairs, n)
        sizes = [rng.randint(MIN_SIZE, MAX_SIZE if n < 3 else MAX_SIZE - 4) for _ in chosen]
        boxes = _place(rng, sizes)
        if boxes is not None:
            break
    objects = tuple(
        ShapeObject(c, s, tuple(v / IMAGE_SIZE for v in box))
        for (c, s), box in zip(chosen, boxes, strict=True)
    )
    caption = caption_for([o.phrase for o in objects], rng)
    return Scene(objects=objects, caption=caption)


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size`` pixels (no anti-aliasing)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * size for v in obj.box)
        colour = COLOURS[obj.colour]
        # PIL's right/bottom coordinates are inclusive: draw up to one pixel short of the box edge.
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif obj.shape == "triangle":
            draw.polygon(((x0 + x1 - 1) / 2, y0, x1 - 1, y1 - 1, x0, y1 - 1), fill=colour)
        elif obj.shape == "star":
            draw.polygon(star_polygon(x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif obj.shape == "heart":
            draw.polygon(heart_polygon(x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            raise ValueError(f"shape={obj.shape!r} is invalid: expected one of {ALL_SHAPES}")
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> ``(3, H, W)`` float tensor in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ShapesDataset(torch.utils.data.Dataset):
    """Training scenes ``seed_offset .. seed_offset + length - 1``: image tensor, caption and boxes.

    Args:
        length: number of scenes.
        seed_offset: first scene seed (use different offsets for training and evaluation).
        caption_dropout: probability of replacing the caption by ``""`` (trains the unconditional
            branch that classifier-free guidance needs); drawn from the scene seed, so deterministic.
        object_weights: relative frequencies of scenes with 1, 2 and 3 objects.
    """

    def __init__(
        self,
        length: int,
        seed_offset: int = 0,
        caption_dropout: float = 0.0,
        object_weights: tuple[float, float, float] = DEFAULT_OBJECT_WEIGHTS,
    ) -> None:
        if length < 1:
            raise ValueError(f"length={length} is invalid: expected >= 1")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={caption_dropout} is invalid: expected in [0, 1)")
        self.length = length
        self.seed_offset = seed_offset
        self.caption_dropout = caption_dropout
        self.object_weights = tuple(object_weights)
        sample_scene(seed_offset, object_weights=self.object_weights)  # bad weights fail here, not mid-epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        seed = self.seed_offset + index
        scene = sample_scene(seed, object_weights=self.object_weights)
        drop = random.Random(seed * 7919 + 1).random() < self.caption_dropout
        return {
            "pixel_values": image_to_tensor(render_scene(scene)),
            "caption": "" if drop else scene.caption,
        }
