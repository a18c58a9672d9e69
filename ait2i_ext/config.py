"""Configuration objects. Every constant of the method lives here as a default, never in the loss code.

All configs are frozen dataclasses that validate in ``__post_init__`` and raise a ``ValueError``
naming the offending field, its value and what was expected.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

IsolationMode = Literal["euclidean", "cosine"]
GuidanceMode = Literal["full", "truncated", "lagged"]
PeakSource = Literal["remaining", "full"]
ExistenceTokens = Literal["words", "all"]
RefinementScope = Literal["image", "batch"]
MapBlocks = Literal["down_up", "down"]
RadiusMode = Literal["fixed", "adaptive", "calibrated"]
RadiusShare = Literal["own", "min"]
BoxEnergy = Literal["centroid", "extent"]
BoxMaps = Literal["raw", "words", "peaked", "softmax"]
BoxReduce = Literal["mean", "max"]
#: The raw loss terms (``LossTerms`` fields) the box-only updates of the layout schedule may descend.
BOX_UPDATE_TERMS = ("box", "existence", "isolation", "aggregation", "alignment")


def _check(cond: bool, name: str, value: object, expected: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class LossConfig:
    """Weights and geometry of the AI-T2I losses (``docs/method.md``, Losses).

    ``radius_mode`` chooses the aggregation and alignment radii. ``"fixed"``: ``aggregation_radius``
    / ``alignment_radius``, in grid cells of a ``reference_resolution`` x ``reference_resolution``
    map, scaled with the map actually used (a 32x32 SDXL map uses twice the radius); they must suit
    how big the model draws its subjects. ``"adaptive"``: at every step, each group's radii are
    ``aggregation_factor`` / ``alignment_factor`` times the size of its main map's blob
    (:func:`ait2i_ext.losses.blob_radius`: the cells above ``radius_level`` of its peak's rise over
    the map's median), so no per-model setting. ``"calibrated"``: the same factors times each
    subject's blob size measured once, on the run's first guided pass, then held for the run (a
    fixed radius per subject that the maps chose; ``Guide`` keeps it). ``radius_share`` (adaptive and
    calibrated): ``"own"``, each subject its own size; ``"min"``, every subject of an image the
    smallest of their sizes (one radius per image, as fixed radii are one for all, still from the maps).
    The default, calibrated 0.85 / 1.0 shared, needs no per-model radius (docs/method.md, tenth
    sitting); the shipped shapes models keep their fixed 2.5 / 3 (their ``ait2i.json``).

    ``peak_source`` picks the map the peak centroids are taken from (``"remaining"``: with earlier
    peak regions removed; ``"full"``: the whole map, as the authors' code does; see
    :func:`ait2i_ext.losses.peak_centroids`). ``existence_tokens`` picks the tokens the existence
    term's softmax runs over (``"words"``: the prompt's words only; ``"all"``: ``1:-1`` as
    Attend-and-Excite, padding included). ``box_members`` also pulls each boxed group's member
    tokens (attributes, aliases) into its box, one map each; ``box_existence`` makes the existence
    term read a boxed group's map inside its box only (its strongest cell there). ``box_maps`` picks
    the maps :func:`~ait2i_ext.losses.box_loss` reads: ``"raw"``, the captured probabilities, or
    ``"words"``, the same maps after the existence term's softmax over the prompt's words (sharper: a
    cell counts for the word that wins it, so the diffuse share every token gets everywhere no longer
    hides where the object is), or ``"peaked"``, the captured maps less their median
    (:func:`~ait2i_ext.losses.above_floor`: the floor every token has everywhere no longer counts as
    mass outside the box), or ``"softmax"``, each map's softmax over the cells at
    ``box_temperature`` times its peak's rise over its median (:func:`~ait2i_ext.losses.spatial_softmax`: the floor
    vanishes and the strongest cells carry the mass). ``box_energy`` picks how a map is pulled into its box:
    ``"centroid"``, the share outside the box plus a pull of the map's centre of mass onto the box's
    (:func:`~ait2i_ext.losses.box_loss`; no pull on a map centred on its box, and a square pull on a
    triangle), or ``"extent"``, the share outside plus a pull of every outside cell by its distance
    to the box (``box_distance_weight``) and BoxDiff's corner-style constraint that the map reaches
    each side of the box (``box_side_weight``; ``box_side_level`` of its peak;
    :func:`~ait2i_ext.losses.box_extent_loss`):
    an object need not fill its box. ``box_far_weight`` adds the extent energy's distance pull to
    the centroid energy (0: off), so a map spread around a centred box moves too.
    ``box_isolation_weight`` weighs the isolation term between two groups whose boxes do not
    overlap, rising to 1 with their overlap (:func:`~ait2i_ext.losses.box_pair_weights`; 1: as
    without boxes). ``box_reduce`` makes one box energy of the groups': ``"mean"``, or ``"max"``, the
    worst-placed group's alone (:func:`~ait2i_ext.losses.reduce_box_energy`: Attend-and-Excite's most
    neglected token, with boxes). ``w_split`` weighs the split term
    (:func:`~ait2i_ext.losses.split_loss`: a subject's peaked mass farther than ``split_factor`` times
    its blob radius from its strongest peak, cut at ``split_level`` of the peak's rise; no per-model
    radius), against one subject drawn twice. The defaults are
    the measured choices (DEVELOPERS.md; the box settings: docs/layout.md).
    """

    w_isolation: float = 2.0
    w_aggregation: float = 1.25
    w_existence: float = 0.25
    w_alignment: float = 0.75
    w_box: float = 1.0
    box_leak_weight: float = 1.0
    box_power: float = 1.0
    w_box_topk: float = 0.0
    box_members: bool = False
    box_existence: bool = False
    box_topk_fraction: float = 0.2
    box_maps: BoxMaps = "raw"
    box_energy: BoxEnergy = "centroid"
    box_distance_weight: float = 1.0
    box_side_weight: float = 1.0
    box_side_level: float = 0.5
    box_far_weight: float = 0.0
    box_isolation_weight: float = 1.0
    box_temperature: float = 0.1
    box_reduce: BoxReduce = "mean"
    isolation: IsolationMode = "euclidean"
    top_k: int = 3
    radius_mode: RadiusMode = "calibrated"
    aggregation_radius: float = 5.0
    alignment_radius: float = 6.0
    reference_resolution: int = 16
    aggregation_factor: float = 0.85
    alignment_factor: float = 1.0
    radius_level: float = 0.5
    radius_share: RadiusShare = "min"
    softmax_scale: float = 100.0
    smoothing_kernel: int = 3
    smoothing_sigma: float = 0.5
    box_centroid_weight: float = 1.0
    w_split: float = 0.0
    split_factor: float = 2.0
    split_level: float = 0.5
    peak_source: PeakSource = "remaining"
    existence_tokens: ExistenceTokens = "words"

    def __post_init__(self) -> None:
        for name in (
            "w_isolation",
            "w_aggregation",
            "w_existence",
            "w_alignment",
            "w_box",
            "box_centroid_weight",
            "box_leak_weight",
            "w_box_topk",
            "box_distance_weight",
            "box_side_weight",
            "box_far_weight",
            "w_split",
        ):
            value = getattr(self, name)
            _check(value >= 0, name, value, "a weight >= 0")
        _check(
            self.isolation in ("euclidean", "cosine"), "isolation", self.isolation, "'euclidean' or 'cosine'"
        )
        _check(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        _check(
            self.peak_source in ("remaining", "full"),
            "peak_source",
            self.peak_source,
            "'remaining' or 'full'",
        )
        _check(
            self.existence_tokens in ("words", "all"),
            "existence_tokens",
            self.existence_tokens,
            "'words' or 'all'",
        )
        _check(
            self.radius_mode in ("fixed", "adaptive", "calibrated"),
            "radius_mode",
            self.radius_mode,
            "'fixed', 'adaptive' or 'calibrated'",
        )
        _check(self.radius_share in ("own", "min"), "radius_share", self.radius_share, "'own' or 'min'")
        _check(0 < self.radius_level <= 1, "radius_level", self.radius_level, "a fraction in (0, 1]")
        _check(0 <= self.split_level < 1, "split_level", self.split_level, "a fraction in [0, 1)")
        for name in (
            "aggregation_radius",
            "alignment_radius",
            "aggregation_factor",
            "alignment_factor",
            "softmax_scale",
            "smoothing_sigma",
            "split_factor",
        ):
            value = getattr(self, name)
            _check(value > 0, name, value, "a number > 0")
        _check(self.reference_resolution >= 1, "reference_resolution", self.reference_resolution, ">= 1")
        _check(
            self.smoothing_kernel >= 1 and self.smoothing_kernel % 2 == 1,
            "smoothing_kernel",
            self.smoothing_kernel,
            "an odd integer >= 1",
        )
        _check(self.box_power >= 1, "box_power", self.box_power, "a number >= 1")
        _check(
            0 <= self.box_isolation_weight <= 1,
            "box_isolation_weight",
            self.box_isolation_weight,
            "a fraction in [0, 1]",
        )
        _check(isinstance(self.box_members, bool), "box_members", self.box_members, "True or False")
        _check(isinstance(self.box_existence, bool), "box_existence", self.box_existence, "True or False")
        _check(
            self.box_maps in ("raw", "words", "peaked", "softmax"),
            "box_maps",
            self.box_maps,
            "'raw', 'words', 'peaked' or 'softmax'",
        )
        _check(self.box_temperature > 0, "box_temperature", self.box_temperature, "a number > 0")
        _check(self.box_reduce in ("mean", "max"), "box_reduce", self.box_reduce, "'mean' or 'max'")
        _check(
            self.box_energy in ("centroid", "extent"), "box_energy", self.box_energy, "'centroid' or 'extent'"
        )
        _check(0 < self.box_side_level <= 1, "box_side_level", self.box_side_level, "a fraction in (0, 1]")
        _check(
            0 < self.box_topk_fraction <= 1,
            "box_topk_fraction",
            self.box_topk_fraction,
            "a fraction in (0, 1]",
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """When and how far the latents move (``docs/method.md``, Schedule).

    ``alpha_i = step_scale * sqrt(s_i)`` with ``s = linspace(scale_start, scale_end, num_steps)``,
    applied once per step on the first ``guided_fraction`` of the steps (:meth:`guided_steps`; each is
    one more UNet pass with its backward, so their number sets the cost). Iterative refinement
    (Attend-and-Excite's) runs extra updates at the steps in ``refinement_thresholds`` until the
    existence loss falls below ``1 - threshold``, at most ``max_refinement_iters`` times; with
    ``refinement_scope="image"`` each image of a batch stops on its own (its result does not depend
    on the other images of the batch), with ``"batch"`` all continue while the worst has not met it.

    Layout boxes get their own schedule on top (layout guidance's, Chen et al. 2023): on the first
    ``box_guided_fraction`` of the steps, ``box_iterations`` extra updates with step ``box_step_scale``
    descend the sum of the raw terms named in ``box_update_terms`` (default: the box term alone;
    ``("box", "existence")`` with ``LossConfig(box_members=True)`` traded in-box for correctness on
    boxes alone in earlier rounds and lost on ControlNet: measured in docs/layout.md). An image whose box term is
    at or below ``box_stop`` gets no more of these updates at that step (layout guidance's loss
    threshold; ``None``: every image gets every update). Before the first step, ``box_init_iterations``
    updates of the initial noise descend the same terms, each a step of ``box_init_step`` times the
    latent's RMS along the normalised gradient, the latent rescaled to its norm after each
    (InitNO's optimisation of the initial noise, with the box energy;
    :func:`ait2i_ext.guidance.norm_preserving_step`; 0: off). With ``box_norm_step`` > 0 the box-only
    updates are such steps too, of that fraction of each image's latent RMS, instead of
    ``box_step_scale`` times the raw gradient (whose size follows how strongly the maps respond: the
    first-named object's most). Each layout route may start
    from its own box settings (``ait2i_ext.adapters.layout.ROUTE_SETTINGS``, applied by
    :func:`model_config`'s ``defaults``).
    Without boxes these fields do nothing.
    """

    step_scale: float = 20.0
    scale_start: float = 1.0
    scale_end: float = 0.5
    guided_fraction: float = 0.5
    refinement: bool = False
    refinement_thresholds: tuple[tuple[int, float], ...] = ((0, 0.05), (10, 0.5), (20, 0.8))
    max_refinement_iters: int = 20
    refinement_scope: RefinementScope = "image"
    box_iterations: int = 3
    box_guided_fraction: float = 0.2
    box_step_scale: float = 20.0
    box_update_terms: tuple[str, ...] = ("box",)
    box_stop: float | None = None
    box_init_iterations: int = 0
    box_init_step: float = 0.05
    box_norm_step: float = 0.0

    def __post_init__(self) -> None:
        _check(
            len(self.box_update_terms) > 0 and set(self.box_update_terms) <= set(BOX_UPDATE_TERMS),
            "box_update_terms",
            self.box_update_terms,
            f"a non-empty tuple of {BOX_UPDATE_TERMS}",
        )
        _check(self.step_scale >= 0, "step_scale", self.step_scale, "a number >= 0")
        _check(self.box_iterations >= 0, "box_iterations", self.box_iterations, "an integer >= 0")
        _check(
            0.0 <= self.box_guided_fraction <= 1.0,
            "box_guided_fraction",
            self.box_guided_fraction,
            "a fraction in [0, 1]",
        )
        _check(self.box_step_scale >= 0, "box_step_scale", self.box_step_scale, "a number >= 0")
        _check(
            isinstance(self.box_init_iterations, int) and self.box_init_iterations >= 0,
            "box_init_iterations",
            self.box_init_iterations,
            "an integer >= 0",
        )
        _check(0 < self.box_init_step <= 1, "box_init_step", self.box_init_step, "a fraction in (0, 1]")
        _check(0 <= self.box_norm_step <= 1, "box_norm_step", self.box_norm_step, "a fraction in [0, 1]")
        _check(
            self.box_stop is None or self.box_stop >= 0, "box_stop", self.box_stop, "None or a number >= 0"
        )
        _check(
            0.0 <= self.guided_fraction <= 1.0,
            "guided_fraction",
            self.guided_fraction,
            "a fraction in [0, 1]",
        )
        _check(self.max_refinement_iters >= 1, "max_refinement_iters", self.max_refinement_iters, ">= 1")
        _check(
            self.refinement_scope in ("image", "batch"),
            "refinement_scope",
            self.refinement_scope,
            "'image' or 'batch'",
        )
        for item in self.refinement_thresholds:
            _check(
                len(item) == 2 and int(item[0]) >= 0 and 0.0 <= float(item[1]) <= 1.0,
                "refinement_thresholds",
                self.refinement_thresholds,
                "pairs (step >= 0, threshold in [0, 1])",
            )

    def num_guided_steps(self, num_steps: int) -> int:
        """Number of leading denoising steps that get a latent update: ``floor(num_steps * guided_fraction)``.

        ``num_steps`` is the length of the scheduler's timesteps, i.e. the denoising loop's
        iterations: 25 of 50 for DDIM, and 25 of PNDM's 51 (its first timestep runs twice), as
        the authors' code guides the loop indices ``i < 25``.
        """
        return math.floor(num_steps * self.guided_fraction + 1e-9)

    def guided_steps(self, num_steps: int) -> tuple[int, ...]:
        """The steps that get a latent update: the first :meth:`num_guided_steps`."""
        return tuple(range(self.num_guided_steps(num_steps)))

    def num_box_steps(self, num_steps: int) -> int:
        """Number of leading denoising steps that get the extra box-term updates."""
        return int(round(num_steps * self.box_guided_fraction)) if self.box_iterations else 0

    def step_sizes(self, num_steps: int) -> list[float]:
        """``alpha_i`` for every step ``i`` of a ``num_steps`` schedule (0 where unguided)."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} is invalid: expected an integer >= 1")
        guided = set(self.guided_steps(num_steps))
        out = []
        for i in range(num_steps):
            s = (
                self.scale_start
                if num_steps == 1
                else self.scale_start + (self.scale_end - self.scale_start) * i / (num_steps - 1)
            )
            out.append(self.step_scale * s**0.5 if i in guided else 0.0)
        return out


@dataclass(frozen=True)
class AIT2IConfig:
    """Everything a guided run needs besides the pipeline and the prompt.

    Args:
        loss: loss weights and geometry.
        schedule: step sizes and which steps are guided.
        attention_resolution: side of the cross-attention maps the losses read. ``None`` picks
            the down- and up-block layers at 1/32 of the image side (16x16 for SD 1.x/2.x at
            512 px, 24x24 at 768, 32x32 for SDXL at 1024; the mid block never joins), or, on UNets
            without layers there, the side closest to 16 (:func:`ait2i_ext.capture.select_factor`).
        mode: ``"truncated"`` (default) runs the conditional UNet pass for the update only up to the
            last layer that produces the maps (the same gradient as ``"full"``, less work);
            ``"full"`` runs the whole pass (the straightforward reference); ``"lagged"`` takes the
            gradient from the pipeline's own sampling pass and applies it one step late
            (approximate, no extra pass; see :mod:`ait2i_ext.fast`).
        map_blocks: ``"down_up"`` (default): the losses read the down- and up-block layers of
            that resolution; ``"down"``: the down-block ones only, so the guided pass stops before
            the mid block (cheaper, but worse than plain sampling on the shapes benchmark:
            ``docs/performance.md``; an experiment, not a recommended setting).
    """

    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    attention_resolution: int | None = None
    mode: GuidanceMode = "truncated"
    map_blocks: MapBlocks = "down_up"

    def __post_init__(self) -> None:
        _check(
            self.mode in ("full", "truncated", "lagged"), "mode", self.mode, "'full', 'truncated' or 'lagged'"
        )
        _check(self.map_blocks in ("down_up", "down"), "map_blocks", self.map_blocks, "'down_up' or 'down'")
        if self.attention_resolution is not None:
            _check(
                self.attention_resolution >= 1,
                "attention_resolution",
                self.attention_resolution,
                ">= 1 or None",
            )


# --- settings stored with a model -----------------------------------------------------------

#: A pipeline folder may hold this file at its root: ``{"loss": {...}, "schedule": {...}}``, field
#: overrides of :class:`LossConfig` / :class:`ScheduleConfig` that suit that model (e.g. loss radii
#: sized to its objects). :func:`model_config` reads it; the training scripts write it.
MODEL_SETTINGS_FILE = "ait2i.json"
_SECTIONS = {"loss": LossConfig, "schedule": ScheduleConfig}


def _model_folder(model) -> Path | None:
    """The local folder a pipeline (``name_or_path``) or a path names, ``None`` if there is none."""
    path = getattr(model, "name_or_path", model)
    if not isinstance(path, (str, os.PathLike)):
        return None
    folder = Path(path)
    return folder if folder.is_dir() else None


def read_model_settings(model) -> dict[str, dict]:
    """The ``ait2i.json`` settings of a model folder: ``{"loss": {...}, "schedule": {...}}``.

    Args:
        model: a pipeline folder, or a pipeline loaded from one (``pipe.name_or_path``). A hub id,
            a pipeline built in memory or a folder without the file gives ``{}``.

    Raises:
        ValueError: the file is not valid JSON, has unknown sections or fields, or values the
            configs refuse (naming the file).
    """
    folder = _model_folder(model)
    if folder is None or not (folder / MODEL_SETTINGS_FILE).is_file():
        return {}
    path = folder / MODEL_SETTINGS_FILE
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(settings, dict) or set(settings) - set(_SECTIONS):
        raise ValueError(f"{path} is invalid: expected an object with the sections {sorted(_SECTIONS)}")
    for section, cls in _SECTIONS.items():
        values = settings.get(section, {})
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            raise ValueError(
                f"{path}: section {section!r} is invalid: expected {cls.__name__} fields, got {values!r}"
            )
        try:
            cls(**_from_json(values))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
    return {section: dict(settings.get(section, {})) for section in _SECTIONS if settings.get(section)}


def _from_json(values: dict) -> dict:
    """JSON lists back to the tuples the frozen configs hold."""
    out = dict(values)
    if "refinement_thresholds" in out:
        out["refinement_thresholds"] = tuple(tuple(pair) for pair in out["refinement_thresholds"])
    if "box_update_terms" in out:
        out["box_update_terms"] = tuple(out["box_update_terms"])
    return out


#: Named settings applied on top of a model's settings (``model_config(pipe, preset="reference")``,
#: ``ait2i generate --preset reference``): per preset, the :class:`ScheduleConfig` fields
#: (``"schedule"``) and other :class:`AIT2IConfig` fields (``"options"``) it sets.
#: ``"reference"`` is the authors' schedule (the :class:`ScheduleConfig` defaults), for a model
#: whose ``ait2i.json`` sets another (the shipped shapes model: 5 of 25 steps at step scale 40).
#: ``"fast"``: 2 of 25 guided steps (8 %) at step scale 60, about 1.1x plain time on the shapes
#: model (docs/performance.md).
PRESETS: dict[str, dict[str, dict]] = {
    "default": {},
    "reference": {"schedule": {"guided_fraction": 0.5, "step_scale": 20.0}},
    "fast": {"schedule": {"guided_fraction": 0.08, "step_scale": 60.0}},
}


def model_config(
    model=None,
    *,
    defaults: dict[str, dict] | None = None,
    loss: dict | None = None,
    schedule: dict | None = None,
    preset: str = "default",
    **options,
) -> AIT2IConfig:
    """The :class:`AIT2IConfig` a model calls for: the library defaults, ``defaults``, its
    ``ait2i.json``, the ``preset``, then the given fields.

    Args:
        model: a pipeline folder or a pipeline loaded from one (``None``: defaults only).
        defaults: settings shaped as ``ait2i.json`` (``{"loss": {...}, "schedule": {...}}``) that
            replace library defaults but lose to the model's own, e.g. a layout route's box settings
            (``ait2i_ext.adapters.layout.ROUTE_SETTINGS``).
        loss: :class:`LossConfig` fields that win over the model's.
        schedule: :class:`ScheduleConfig` fields that win over the model's and the preset's.
        preset: a name of :data:`PRESETS` (``"default"``: the model's settings as they are).
        **options: other :class:`AIT2IConfig` fields (``mode``, ``attention_resolution``,
            ``map_blocks``), winning over the preset's.

    Example: ``model_config(pipe, schedule={"step_scale": 10})`` keeps the model's loss radii.
    """
    _check(preset in PRESETS, "preset", preset, f"one of {sorted(PRESETS)}")
    defaults = defaults or {}
    _check(
        set(defaults) <= set(_SECTIONS), "defaults", defaults, f"a dict with the sections {sorted(_SECTIONS)}"
    )
    settings = read_model_settings(model) if model is not None else {}
    chosen = PRESETS[preset]
    return AIT2IConfig(
        loss=LossConfig(
            **_from_json({**defaults.get("loss", {}), **settings.get("loss", {}), **(loss or {})})
        ),
        schedule=ScheduleConfig(
            **_from_json(
                {
                    **defaults.get("schedule", {}),
                    **settings.get("schedule", {}),
                    **chosen.get("schedule", {}),
                    **(schedule or {}),
                }
            )
        ),
        **{**chosen.get("options", {}), **options},
    )


def model_loss(model, **given: float | None) -> dict:
    """``LossConfig`` overrides for ``model``: its ``ait2i.json`` loss settings, then the ``given``
    fields that are not ``None`` (e.g. ``aggregation_radius=args.aggregation_radius``). A given
    radius asks for that radius: it sets ``radius_mode="fixed"`` unless ``radius_mode`` is given too.

    Raises ``ValueError`` (naming the value) for a setting ``LossConfig`` refuses, so command-line
    tools can fail before loading or sampling anything.
    """
    loss = dict(read_model_settings(model).get("loss", {})) if model is not None else {}
    given = {name: value for name, value in given.items() if value is not None}
    if {"aggregation_radius", "alignment_radius"} & set(given):
        given.setdefault("radius_mode", "fixed")
    loss.update(given)
    LossConfig(**loss)  # validates
    return loss


def write_model_settings(
    folder: str | os.PathLike, loss: dict | None = None, schedule: dict | None = None
) -> Path:
    """Write ``ait2i.json`` (the given :class:`LossConfig` / :class:`ScheduleConfig` fields) into a
    pipeline folder, validated first; returns its path."""
    settings = {k: dict(v) for k, v in (("loss", loss), ("schedule", schedule)) if v}
    for section, values in settings.items():
        _SECTIONS[section](**_from_json(values))
    path = Path(folder) / MODEL_SETTINGS_FILE
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path
