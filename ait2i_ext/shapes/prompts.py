"""Fixed benchmark prompt sets of the shapes world, with each prompt's objects and layout boxes.

Sets (``PROMPT_SETS``, or ``prompt_set(name)``):

- ``"single"``: one object, every colour-shape pair seen in training (the model must follow the text);
- ``"two"``: two objects, different colours and shapes ("a red circle and a blue square");
- ``"three"``: three objects, one of each shape, three different colours;
- ``"held_out"``: two objects, one of them a pair never drawn in training (``HELD_OUT_PAIRS``);
- ``"close_colours"``: two objects of different shapes in two close colours (red/orange, ...);
- ``"hard"``: three objects, two of them in close colours;
- ``"phrase_comma"``, ``"phrase_the"``, ``"phrase_plus"``, ``"phrase_one"``: the ``"two"`` set's
  objects (same order, boxes) in phrasings the training captions never use (``PHRASINGS``): "a red
  circle, a blue square", "the red circle and the blue square", "a red circle plus a blue square",
  "one red circle and one blue square" (training captions say "a X and a Y", "X and Y", "a X
  with / next to / beside a Y").

The lists are built once from fixed seeds, so they are the same on every machine. Each object has
a layout box (normalised ``(x0, y0, x1, y1)``) for box-conditioned guidance; the boxes of a prompt
never overlap.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .data import CLOSE_COLOURS, COLOURS, HELD_OUT_PAIRS, SHAPES, caption_for, training_pairs, with_article

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class PromptObject:
    """One object a prompt asks for: its colour word, its shape noun and an optional layout box."""

    colour: str
    shape: str
    box: Box | None = None


@dataclass(frozen=True)
class BenchmarkPrompt:
    """A benchmark prompt: its text and its objects in the order the text names them."""

    text: str
    objects: tuple[PromptObject, ...]

    @property
    def boxes(self) -> tuple[Box | None, ...]:
        return tuple(o.box for o in self.objects)


@dataclass(frozen=True)
class SubjectWords:
    """The words naming one subject: its noun, its attribute words and its layout box."""

    noun: str
    attributes: tuple[str, ...]
    box: Box | None = None


# Layouts by number of objects: a few non-overlapping arrangements, used in turn.
LAYOUTS: dict[int, tuple[tuple[Box, ...], ...]] = {
    1: (((0.25, 0.25, 0.75, 0.75),),),
    2: (
        ((0.05, 0.3, 0.45, 0.7), (0.55, 0.3, 0.95, 0.7)),  # left, right
        ((0.3, 0.05, 0.7, 0.45), (0.3, 0.55, 0.7, 0.95)),  # top, bottom
        ((0.05, 0.05, 0.45, 0.45), (0.55, 0.55, 0.95, 0.95)),  # diagonal
    ),
    3: (
        ((0.02, 0.34, 0.32, 0.66), (0.35, 0.34, 0.65, 0.66), (0.68, 0.34, 0.98, 0.66)),  # a row
        ((0.05, 0.05, 0.4, 0.4), (0.6, 0.05, 0.95, 0.4), (0.32, 0.6, 0.68, 0.95)),  # a triangle
    ),
}


def make_prompt(pairs: list[tuple[str, str]], layout_index: int = 0) -> BenchmarkPrompt:
    """A prompt in the canonical caption form for ``pairs`` of (colour, shape), with layout boxes."""
    layouts = LAYOUTS[len(pairs)]
    boxes = layouts[layout_index % len(layouts)]
    objects = tuple(PromptObject(c, s, b) for (c, s), b in zip(pairs, boxes, strict=True))
    return BenchmarkPrompt(caption_for([f"{c} {s}" for c, s in pairs]), objects)


def _build_sets() -> dict[str, tuple[BenchmarkPrompt, ...]]:
    rng = random.Random(1234)
    train = training_pairs()
    colours = list(COLOURS)
    close = {frozenset(p) for p in CLOSE_COLOURS}

    def distinct(n: int, pool: list[tuple[str, str]], ok=lambda ps: True) -> list[tuple[str, str]]:
        while True:
            ps = rng.sample(pool, n)
            if len({c for c, _ in ps}) == n and len({s for _, s in ps}) == n and ok(ps):
                return ps

    def unique(make, count: int) -> list[list[tuple[str, str]]]:
        found: list[list[tuple[str, str]]] = []
        while len(found) < count:
            ps = make()
            if ps not in found:
                found.append(ps)
        return found

    sets: dict[str, list[list[tuple[str, str]]]] = {}
    sets["single"] = [[p] for p in train]
    sets["two"] = unique(lambda: distinct(2, train, lambda ps: frozenset(c for c, _ in ps) not in close), 32)
    sets["three"] = unique(lambda: distinct(3, train), 24)

    def with_held_out() -> list[tuple[str, str]]:
        held = rng.choice(HELD_OUT_PAIRS)
        other = distinct(1, [p for p in train if p[0] != held[0] and p[1] != held[1]])[0]
        return rng.sample([held, other], 2)

    sets["held_out"] = unique(with_held_out, 24)

    def close_pair(n: int) -> list[tuple[str, str]]:
        a, b = rng.choice(CLOSE_COLOURS)
        rest = [c for c in colours if c not in (a, b)]
        cols = [a, b] + rng.sample(rest, n - 2)
        while True:
            shapes = rng.sample(SHAPES, n)
            ps = list(zip(cols, shapes, strict=True))
            if all(p not in HELD_OUT_PAIRS for p in ps):
                return rng.sample(ps, n)

    sets["close_colours"] = unique(lambda: close_pair(2), 24)
    sets["hard"] = unique(lambda: close_pair(3), 24)
    return {name: tuple(make_prompt(ps, i) for i, ps in enumerate(lists)) for name, lists in sets.items()}


#: Two-object phrasings the training captions (``data.caption_for``) never produce (``{a0}``: the
#: first object with its article, "a red circle" / "an orange square"; ``{0}``: without).
PHRASINGS: dict[str, str] = {
    "phrase_comma": "{a0}, {a1}",
    "phrase_the": "the {0} and the {1}",
    "phrase_plus": "{a0} plus {a1}",
    "phrase_one": "one {0} and one {1}",
}


def _rephrased(prompts: tuple[BenchmarkPrompt, ...], form: str) -> tuple[BenchmarkPrompt, ...]:
    """``prompts`` (two objects each) with their text in ``form``, objects and boxes unchanged."""
    out = []
    for p in prompts:
        names = [f"{o.colour} {o.shape}" for o in p.objects]
        articles = {f"a{i}": with_article(name) for i, name in enumerate(names)}
        out.append(BenchmarkPrompt(form.format(*names, **articles), p.objects))
    return tuple(out)


PROMPT_SETS: dict[str, tuple[BenchmarkPrompt, ...]] = _build_sets()
PROMPT_SETS.update({name: _rephrased(PROMPT_SETS["two"], form) for name, form in PHRASINGS.items()})


def prompt_set(name: str) -> tuple[BenchmarkPrompt, ...]:
    """The benchmark prompts of set ``name`` (see the module docstring)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"prompt set {name!r} is invalid: expected one of {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name]


_OBJECT_RE = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})s?\b")


def parse_prompt(text: str) -> tuple[PromptObject, ...]:
    """The "colour shape" objects named in ``text``, in order ("a red circle and a blue square")."""
    objects = tuple(PromptObject(m.group(1), m.group(2)) for m in _OBJECT_RE.finditer(text.lower()))
    if not objects:
        raise ValueError(
            f"prompt {text!r} names no shapes-world object (a colour of {list(COLOURS)} then a shape of {SHAPES})"
        )
    return objects


def subjects_for(prompt_objects) -> tuple[SubjectWords, ...]:
    """For each object, the words that name it: its shape noun, its colour word, and its box.

    Args:
        prompt_objects: ``PromptObject``\\ s (or anything with ``colour``, ``shape`` and optionally
            ``box``), e.g. ``prompt.objects`` or ``parse_prompt(text)``.
    """
    return tuple(SubjectWords(o.shape, (o.colour,), getattr(o, "box", None)) for o in prompt_objects)
