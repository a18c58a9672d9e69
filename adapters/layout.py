"""Layout boxes: from the user's words to subjects with boxes, and the adapters' shared step counter.

A box is ``(x0, y0, x1, y1)`` normalised to ``[0, 1]`` (fractions of the image width and height,
origin top-left), the format GLIGEN uses. Boxes reach the losses through ``Subject.box``: every
group with a box adds the box term of :func:`ait2i_ext.losses.box_loss` to the objective, so boxes
alone already give layout control on plain SD/SDXL; GLIGEN and ControlNet add their own grounding
on top (:mod:`.gligen`, :mod:`.controlnet`).

    word, box = parse_box_arg("cat:0.05,0.2,0.5,0.9")          # the CLI's --box
    subjects = subjects_with_boxes(["cat", "dog"], {"cat": box, "dog": (0.5, 0.2, 0.95, 0.9)},
                                   prompt="a cat and a dog")
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

from ait2i_ext.config import AIT2IConfig, model_config
from ait2i_ext.tokens import Box, Subject, SubjectSpec, infer_subjects, validate_box

GLIGEN_MAX_BOXES = 30  # StableDiffusionGLIGENPipeline's max_objs

#: The settings each layout route starts from, shaped as ``ait2i.json`` (``{"loss": {...},
#: "schedule": {...}}``): they replace library defaults, and lose to a model's ``ait2i.json`` and to
#: the caller's fields (:func:`route_config`). ``generate`` without a ``config`` applies the route of
#: its adapter (``adapter.layout_route``), the CLI the route ``--box`` / ``--controlnet`` takes.
#: Measured in docs/layout.md: boxes alone and ControlNet box the attribute words too, descend layout
#: guidance's squared box energy (the worst-placed map pulls most) and BoxDiff's inner/outer top-k
#: term (no strong copy of a subject outside its box), with the library's box schedule (3 box-only
#: updates on the box term; boxes fifth round, ControlNet sitting 3). GLIGEN keeps the library
#: defaults (measured with them).
_BOXED_LOSS = {"box_members": True, "box_power": 2.0, "w_box_topk": 1.0}
ROUTE_SETTINGS: dict[str, dict[str, dict]] = {
    "boxes": {"loss": dict(_BOXED_LOSS)},
    "gligen": {},
    "controlnet": {"loss": dict(_BOXED_LOSS)},
}

#: The schedule preset (``ait2i_ext.config.PRESETS``) a layout route runs with when the caller names
#: none: every layout figure in docs/layout.md was measured with the authors' schedule (12 of 25
#: steps at step scale 20), not the shipped shapes model's faster one (5 of 25 at 40, chosen on
#: prompts without boxes, docs/performance.md): with boxes it lost images on GLIGEN (+0/-3) and
#: ControlNet (+0/-14) and saved only 10-17 % of the CPU time (docs/layout.md, "Which schedule").
ROUTE_PRESET = "reference"


def route_config(route: str | None, model=None, *, preset: str | None = None, **fields) -> AIT2IConfig:
    """The configuration a layout ``route`` runs with on ``model``: the library defaults, the route's
    :data:`ROUTE_SETTINGS` (none for ``route=None``: no layout), the model's ``ait2i.json``, the
    ``preset`` (``None``: :data:`ROUTE_PRESET` for a route, ``"default"`` without one), then
    ``fields`` (``loss=``, ``schedule=`` and other options of :func:`ait2i_ext.config.model_config`).
    ``generate`` and the CLI build their configs here.

    Raises:
        ValueError: an unknown route, or settings the configs refuse.
    """
    if route is not None and route not in ROUTE_SETTINGS:
        raise ValueError(f"layout route {route!r} is unknown: expected one of {sorted(ROUTE_SETTINGS)}")
    if preset is None:
        preset = "default" if route is None else ROUTE_PRESET
    return model_config(model, defaults=ROUTE_SETTINGS.get(route), preset=preset, **fields)


def parse_box_arg(text: str) -> tuple[str, Box]:
    """Parse a ``"WORD:x0,y0,x1,y1"`` box argument (the CLI's ``--box``).

    Args:
        text (`str`): e.g. ``"cat:0.05,0.2,0.5,0.9"`` or ``"teddy bear:0.1,0.1,0.6,0.9"``.

    Returns:
        ``(word, (x0, y0, x1, y1))`` with the box checked by :func:`ait2i_ext.tokens.validate_box`.

    Raises:
        ValueError: no ``:``, an empty word, not four numbers, a coordinate outside ``[0, 1]`` or an
            empty box (``x0 >= x1`` or ``y0 >= y1``).
    """
    word, sep, coords = str(text).rpartition(":")
    word = word.strip()
    if not sep or not word:
        raise ValueError(
            f"box {text!r} is malformed: expected WORD:x0,y0,x1,y1 (e.g. 'cat:0.05,0.2,0.5,0.9')"
        )
    parts = [p.strip() for p in coords.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"box {text!r} is malformed: {coords!r} is not four numbers x0,y0,x1,y1 in [0, 1]"
        ) from None
    return word, validate_box(values, word)


def _mentions(prompt: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", prompt, flags=re.IGNORECASE) is not None


def _names(subject: Subject) -> set[str]:
    """The words a box argument may use to name ``subject``."""
    return {n.lower() for n in (subject.noun, subject.head, subject.phrase(), *subject.aliases)}


def subjects_with_boxes(
    subjects: Sequence[SubjectSpec] | None,
    boxes: Mapping[str, Sequence[float]] | Sequence[tuple[str, Sequence[float]]],
    prompt: str | None = None,
) -> list[Subject]:
    """Attach boxes, named by words, to the subjects.

    A word names a subject when it equals its noun, its head noun, its full phrase or one of its
    aliases (case-insensitive): ``"cat"`` names ``"red cat"``. A word that names no subject but is a
    word of ``prompt`` becomes a new subject with that box.

    Args:
        subjects: subject specs (strings, mappings or ``Subject``); ``None`` infers them from ``prompt``.
        boxes: ``{word: box}`` or ``[(word, box), ...]`` (e.g. from :func:`parse_box_arg`).
        prompt: the prompt, to infer subjects and to accept boxes for its other words.

    Returns:
        The subjects as ``Subject`` objects, in order, with their boxes (new subjects last).

    Raises:
        ValueError: a word in neither the subjects nor the prompt, two boxes for one subject, a
            box for a subject that already has one, or an invalid box.
    """
    if subjects is None:
        if prompt is None:
            raise ValueError("subjects_with_boxes needs subjects or the prompt to infer them from")
        subjects = infer_subjects(prompt)
    if isinstance(subjects, (str, Subject, Mapping)):
        subjects = [subjects]
    result = [Subject.parse(s) for s in subjects]
    pairs = list(boxes.items()) if isinstance(boxes, Mapping) else [tuple(pair) for pair in boxes]
    boxed: dict[int, str] = {}
    for word, box in pairs:
        word = str(word).strip()
        box = validate_box(box, word)
        match = next((i for i, s in enumerate(result) if word.lower() in _names(s)), None)
        if match is None:
            if prompt is None or not _mentions(prompt, word):
                known = [s.phrase() for s in result]
                where = f"prompt {prompt!r}" if prompt is not None else "the prompt"
                raise ValueError(
                    f"box for {word!r}: the word is not among the subjects {known} nor in {where}"
                )
            result.append(Subject.parse(word))
            match = len(result) - 1
        subject = result[match]
        if match in boxed:
            raise ValueError(f"two boxes for subject {subject.noun!r} (named {boxed[match]!r} and {word!r})")
        if subject.box is not None:
            raise ValueError(
                f"subject {subject.noun!r} already has box {subject.box}: got a second one for {word!r}"
            )
        boxed[match] = word
        result[match] = Subject(subject.noun, subject.attributes, subject.aliases, subject.identifier, box)
    return result


def boxed_subjects(subjects: Sequence[SubjectSpec] | None) -> list[Subject]:
    """The subjects of ``subjects`` that carry a box, as ``Subject`` objects (``None`` -> none)."""
    if subjects is None or isinstance(subjects, str):
        return []
    if isinstance(subjects, (Subject, Mapping)):
        subjects = [subjects]
    parsed = [Subject.parse(s) for s in subjects]
    return [s for s in parsed if s.box is not None]


def has_boxes(subjects) -> bool:
    """Whether any subject of ``subjects`` (flat, or one list per prompt) carries a box."""
    nested = subjects is not None and not isinstance(subjects, (str, Subject, Mapping))
    if nested and any(isinstance(s, (list, tuple)) for s in subjects):
        return any(has_boxes(s) for s in subjects)
    return bool(boxed_subjects(subjects))


class StepTracker:
    """Which denoising step the adapter's next guided UNet pass belongs to.

    ``generate`` guides step 0 before the pipeline runs and step ``i + 1`` from the hook at the
    end of step ``i``; adapters whose conditional pass depends on the step (GLIGEN's scheduled
    sampling, ControlNet's guidance window) wrap that hook with :meth:`wrap` and read :attr:`step`.
    """

    def __init__(self) -> None:
        self.step = 0

    def wrap(self, on_step_end: Callable[[int, torch.Tensor, dict], dict]) -> Callable:
        def tracked(i: int, t, tensors: dict) -> dict:
            self.step = i + 1
            return on_step_end(i, t, tensors)

        return tracked


def torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float16`` from ``"float16"``, ``"fp16"`` or a ``torch.dtype`` (``None`` stays ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, names.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is invalid: expected float16, bfloat16 or float32")
    return value


def load_gligen_pipeline(path: str, dtype: torch.dtype | str | None = None):
    """Load a ``StableDiffusionGLIGENPipeline`` (text-box GLIGEN, e.g. ``masterful/gligen-1-4-generation-text-box``).

    Raises:
        ValueError: the path cannot be loaded, or its UNet has no gated self-attention.
    """
    from .gligen import load_gligen_pipeline as load

    return load(path, dtype)


__all__ = [
    "GLIGEN_MAX_BOXES",
    "ROUTE_PRESET",
    "ROUTE_SETTINGS",
    "StepTracker",
    "boxed_subjects",
    "has_boxes",
    "load_gligen_pipeline",
    "parse_box_arg",
    "route_config",
    "subjects_with_boxes",
    "torch_dtype",
]
