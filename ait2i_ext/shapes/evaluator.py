"""Read a shapes-world image back: which coloured shapes it shows, and how well it matches a prompt.

From the image alone: every pixel is given the nearest palette colour (or background, or nothing
when no colour is close), thin fringes are removed by a 3x3 morphological opening (corners regrown), each colour's
4-connected blobs above a minimum area become detections, and each detection's shape is a square
when the blob fills the corners of its box, else the template (circle or apex-up triangle drawn in the blob's
box) that overlaps it best. The new shapes (``NEW_SHAPES``: star, heart) join the templates only when
asked for, so scores of the training world's shapes do not change: ``EvaluatorConfig(shapes=ALL_SHAPES)``,
or ``evaluate`` with a requested star or heart.

``evaluate(image, objects)`` then scores the requested objects:

- ``present``: a blob of the requested colour and shape exists;
- ``shape_present``: a blob of the requested shape exists in any colour (its absence is *neglect*);
- ``colour_bound``: present, and the colour does not also sit on another shape that was not asked
  for in that colour (its absence with the shape present is *colour mixing*);
- ``count``: the number of blobs with that colour and shape;
- ``iou``: the box IoU of the best-matching blob with the requested box, when a box is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .data import ALL_SHAPES, BACKGROUND, COLOURS, IMAGE_SIZE, SHAPES, heart_polygon, star_polygon

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class EvaluatorConfig:
    """Thresholds of the evaluator (at 64 px; areas scale with the image).

    Args:
        max_colour_distance: a pixel farther than this (RGB, 0-255) from every palette colour and the
            background is left unassigned.
        min_area: smallest blob, in pixels at 64 px, counted as an object.
        min_shape_iou: a blob whose best template overlap is below this has shape ``"unknown"``.
        square_corner_fill: a blob filling at least this fraction of each of the four corner cells (a
            quarter of its box's side each) is a square; a circle fills at most ~0.3 of each, a
            triangle nothing of its top ones.
        shapes: the shapes a blob may be read as (a subset of ``ALL_SHAPES`` holding ``SHAPES``);
            ``evaluate`` adds the requested ones.
    """

    max_colour_distance: float = 90.0
    min_area: int = 30
    min_shape_iou: float = 0.6
    square_corner_fill: float = 0.45
    shapes: tuple[str, ...] = SHAPES

    def __post_init__(self) -> None:
        if self.max_colour_distance <= 0:
            raise ValueError(f"max_colour_distance={self.max_colour_distance} is invalid: expected > 0")
        if self.min_area < 1:
            raise ValueError(f"min_area={self.min_area} is invalid: expected >= 1")
        if not 0.0 <= self.min_shape_iou <= 1.0:
            raise ValueError(f"min_shape_iou={self.min_shape_iou} is invalid: expected in [0, 1]")
        if not set(SHAPES) <= set(self.shapes) <= set(ALL_SHAPES):
            raise ValueError(
                f"shapes={self.shapes!r} is invalid: expected all of {SHAPES} and any of {ALL_SHAPES}"
            )


@dataclass(frozen=True)
class Detection:
    """One blob found in the image: its colour, shape (or ``"unknown"``), box and area in pixels."""

    colour: str
    shape: str
    box: Box
    area: int
    shape_iou: float


@dataclass(frozen=True)
class ObjectScore:
    """How one requested object appears in the image (see the module docstring)."""

    colour: str
    shape: str
    present: bool
    shape_present: bool
    colour_bound: bool
    count: int
    iou: float | None

    @property
    def correct(self) -> bool:
        """Drawn once, in its colour, and its colour on no other shape."""
        return self.present and self.count == 1 and self.colour_bound


@dataclass(frozen=True)
class PromptScore:
    """Scores of all requested objects of one image, and what else the image shows.

    ``all_present``: every object present (colour and shape); ``neglect``: some requested shape is
    drawn in no colour; ``colour_mixing``: every shape drawn but some in the wrong colour or with its
    colour leaking; ``correct``: every object correct and nothing else drawn.
    """

    objects: tuple[ObjectScore, ...]
    detections: tuple[Detection, ...]
    extra: int

    @property
    def all_present(self) -> bool:
        return all(o.present for o in self.objects)

    @property
    def all_shapes_present(self) -> bool:
        return all(o.shape_present for o in self.objects)

    @property
    def all_bound(self) -> bool:
        return all(o.colour_bound for o in self.objects)

    @property
    def neglect(self) -> bool:
        return not self.all_shapes_present

    @property
    def colour_mixing(self) -> bool:
        return self.all_shapes_present and not self.all_bound

    @property
    def correct(self) -> bool:
        return all(o.correct for o in self.objects) and self.extra == 0

    @property
    def mean_iou(self) -> float | None:
        ious = [o.iou for o in self.objects if o.iou is not None]
        return float(np.mean(ious)) if ious else None


_NAMES = list(COLOURS)
_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # index 0 = background


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _shift3(mask: np.ndarray, reduce) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return reduce([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def _clean(mask: np.ndarray, regrow: int = 3) -> np.ndarray:
    """3x3 opening (removes 1-2 px wide fringes and lines), then regrow inside ``mask`` for
    ``regrow`` steps so that sharp corners (a triangle's apex) the opening cut off come back."""
    cleaned = _shift3(_shift3(mask, np.logical_and.reduce), np.logical_or.reduce)
    for _ in range(regrow):
        cleaned = _shift3(cleaned, np.logical_or.reduce) & mask
    return cleaned


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an ``(N, 2)`` array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    found = []
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        stack, pixels = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        found.append(np.array(pixels))
    return found


def _polygon_mask(points: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _templates(height: int, width: int, shapes: tuple[str, ...] = SHAPES) -> dict[str, np.ndarray]:
    """Masks of ``shapes`` (circle, square, apex-up triangle, star, heart) filling a ``height`` x ``width`` box."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    circle = ((yy - cy) / (height / 2)) ** 2 + ((xx - cx) / (width / 2)) ** 2 <= 1.0
    frac = (yy + 0.5) / height  # 0 at the apex row, 1 at the base
    triangle = np.abs(xx - cx) <= frac * width / 2
    templates = {"circle": circle, "square": np.ones((height, width), bool), "triangle": triangle}
    box = (0, 0, width - 1, height - 1)
    if "star" in shapes:
        templates["star"] = _polygon_mask(star_polygon(*box), height, width)
    if "heart" in shapes:
        templates["heart"] = _polygon_mask(heart_polygon(*box), height, width)
    return templates


def detect(image: Image.Image | np.ndarray, config: EvaluatorConfig | None = None) -> tuple[Detection, ...]:
    """Every coloured blob of ``image`` (any size, RGB) with its colour, shape and box."""
    config = config or EvaluatorConfig()
    pixels = _to_array(image)
    dist = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 1 + colours)
    label = dist.argmin(-1)
    label[dist.min(-1) > config.max_colour_distance] = -1
    size = pixels.shape[0]
    detections = []
    for k, name in enumerate(_NAMES, start=1):
        mask = _clean(label == k)
        for comp in _components(mask):
            if len(comp) < config.min_area:
                continue
            r0, c0 = comp.min(0)
            r1, c1 = comp.max(0) + 1
            blob = np.zeros((r1 - r0, c1 - c0), bool)
            blob[comp[:, 0] - r0, comp[:, 1] - c0] = True
            ious = {
                shape: float((blob & template).sum() / (blob | template).sum())
                for shape, template in _templates(r1 - r0, c1 - c0, config.shapes).items()
            }
            # A blurred square loses its corner pixels and can overlap the circle template better than
            # the square one, but the quarter-size cells at its box corners stay mostly filled.
            ch, cw = max(1, (r1 - r0) // 4), max(1, (c1 - c0) // 4)
            corners = (blob[:ch, :cw], blob[:ch, -cw:], blob[-ch:, :cw], blob[-ch:, -cw:])
            if min(float(c.mean()) for c in corners) >= config.square_corner_fill:
                best = "square"
            else:
                best = max((s for s in ious if s != "square"), key=ious.__getitem__)
            best_iou = ious[best]
            if best_iou < config.min_shape_iou:
                best = "unknown"
            box = (c0 / size, r0 / size, c1 / size, r1 / size)
            detections.append(Detection(name, best, box, len(comp), best_iou))
    return tuple(detections)


def box_iou(a: Box, b: Box) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _as_request(obj) -> tuple[str, str, Box | None]:
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        colour, shape, *rest = obj
        box = rest[0] if rest else None
    else:
        colour, shape, box = obj.colour, obj.shape, getattr(obj, "box", None)
    if colour not in COLOURS or shape not in ALL_SHAPES:
        raise ValueError(
            f"object ({colour!r}, {shape!r}) is invalid: colours {list(COLOURS)}, shapes {ALL_SHAPES}"
        )
    return colour, shape, (tuple(box) if box is not None else None)


def evaluate(
    image: Image.Image | np.ndarray, objects: Iterable, config: EvaluatorConfig | None = None
) -> PromptScore:
    """Score ``image`` against the requested ``objects``.

    Args:
        image: an RGB image (PIL or ``(H, W, 3)`` uint8 array), ideally 64 px.
        objects: the prompt's objects: ``ShapeObject``/``PromptObject`` (anything with ``colour``,
            ``shape`` and optionally ``box``) or ``(colour, shape[, box])`` tuples.
        config: thresholds; ``EvaluatorConfig()`` by default. A requested new shape (star, heart) is
            added to ``config.shapes``.
    """
    requests = [_as_request(o) for o in objects]
    if not requests:
        raise ValueError("evaluate needs at least one object")
    config = config or EvaluatorConfig()
    wanted = tuple(s for s in ALL_SHAPES if s in config.shapes or any(r[1] == s for r in requests))
    if wanted != tuple(config.shapes):
        config = dataclasses.replace(config, shapes=wanted)
    detections = detect(image, config)
    requested = {(c, s) for c, s, _ in requests}
    scores = []
    for colour, shape, box in requests:
        matches = [d for d in detections if d.colour == colour and d.shape == shape]
        leaked = any(
            d.colour == colour and d.shape != shape and (colour, d.shape) not in requested for d in detections
        )
        iou = None
        if box is not None:
            iou = max((box_iou(d.box, box) for d in matches), default=0.0)
        scores.append(
            ObjectScore(
                colour=colour,
                shape=shape,
                present=bool(matches),
                shape_present=any(d.shape == shape for d in detections),
                colour_bound=bool(matches) and not leaked,
                count=len(matches),
                iou=iou,
            )
        )
    extra = sum(1 for d in detections if (d.colour, d.shape) not in requested)
    extra += sum(max(0, s.count - 1) for s in scores)
    return PromptScore(objects=tuple(scores), detections=detections, extra=extra)
