"""Configuration objects. Every constant of the method lives here as a default, never in the loss code.

All configs are frozen dataclasses that validate in ``__post_init__`` and raise a ``ValueError``
naming the offending field, its value and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

IsolationMode = Literal["euclidean", "cosine"]
GuidanceMode = Literal["full", "truncated", "lagged"]


def _check(cond: bool, name: str, value: object, expected: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class LossConfig:
    """Weights and geometry of the AI-T2I losses (``shared/METHOD.md``, Losses).

    Radii are in grid cells of a ``reference_resolution`` x ``reference_resolution`` map and scale
    with the map actually used (a 32x32 SDXL map uses twice the radius).
    """

    w_isolation: float = 2.0
    w_aggregation: float = 1.25
    w_existence: float = 0.25
    w_alignment: float = 0.75
    w_box: float = 1.0
    box_leak_weight: float = 1.0
    box_power: float = 1.0
    w_box_topk: float = 0.0
    box_topk_fraction: float = 0.2
    isolation: IsolationMode = "euclidean"
    top_k: int = 3
    aggregation_radius: float = 5.0
    alignment_radius: float = 6.0
    reference_resolution: int = 16
    softmax_scale: float = 100.0
    smoothing_kernel: int = 3
    smoothing_sigma: float = 0.5
    box_centroid_weight: float = 1.0

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
        ):
            value = getattr(self, name)
            _check(value >= 0, name, value, "a weight >= 0")
        _check(
            self.isolation in ("euclidean", "cosine"), "isolation", self.isolation, "'euclidean' or 'cosine'"
        )
        _check(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        for name in ("aggregation_radius", "alignment_radius", "softmax_scale", "smoothing_sigma"):
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
            0 < self.box_topk_fraction <= 1,
            "box_topk_fraction",
            self.box_topk_fraction,
            "a fraction in (0, 1]",
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """When and how far the latents move (``shared/METHOD.md``, Schedule).

    ``alpha_i = step_scale * sqrt(s_i)`` with ``s = linspace(scale_start, scale_end, num_steps)``,
    applied once per step on the first ``guided_fraction`` of the steps. Iterative refinement
    (Attend-and-Excite's) runs extra updates at the steps in ``refinement_thresholds`` until the
    existence loss falls below ``1 - threshold``, at most ``max_refinement_iters`` times.

    Layout boxes get their own schedule on top (layout guidance's, Chen et al. 2023): on the first
    ``box_guided_fraction`` of the steps, ``box_iterations`` extra updates descend the box term
    alone with step ``box_step_scale``. Without boxes these fields do nothing.
    """

    step_scale: float = 20.0
    scale_start: float = 1.0
    scale_end: float = 0.5
    guided_fraction: float = 0.5
    refinement: bool = False
    refinement_thresholds: tuple[tuple[int, float], ...] = ((0, 0.05), (10, 0.5), (20, 0.8))
    max_refinement_iters: int = 20
    box_iterations: int = 3
    box_guided_fraction: float = 0.2
    box_step_scale: float = 20.0

    def __post_init__(self) -> None:
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
            0.0 <= self.guided_fraction <= 1.0,
            "guided_fraction",
            self.guided_fraction,
            "a fraction in [0, 1]",
        )
        _check(self.max_refinement_iters >= 1, "max_refinement_iters", self.max_refinement_iters, ">= 1")
        for item in self.refinement_thresholds:
            _check(
                len(item) == 2 and int(item[0]) >= 0 and 0.0 <= float(item[1]) <= 1.0,
                "refinement_thresholds",
                self.refinement_thresholds,
                "pairs (step >= 0, threshold in [0, 1])",
            )

    def num_guided_steps(self, num_steps: int) -> int:
        """Number of leading denoising steps that get a latent update."""
        return int(round(num_steps * self.guided_fraction))

    def num_box_steps(self, num_steps: int) -> int:
        """Number of leading denoising steps that get the extra box-term updates."""
        return int(round(num_steps * self.box_guided_fraction)) if self.box_iterations else 0

    def step_sizes(self, num_steps: int) -> list[float]:
        """``alpha_i`` for every step ``i`` of a ``num_steps`` schedule (0 where unguided)."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} is invalid: expected an integer >= 1")
        guided = self.num_guided_steps(num_steps)
        out = []
        for i in range(num_steps):
            s = (
                self.scale_start
                if num_steps == 1
                else self.scale_start + (self.scale_end - self.scale_start) * i / (num_steps - 1)
            )
            out.append(self.step_scale * s**0.5 if i < guided else 0.0)
        return out


@dataclass(frozen=True)
class AIT2IConfig:
    """Everything a guided run needs besides the pipeline and the prompt.

    Args:
        loss: loss weights and geometry.
        schedule: step sizes and which steps are guided.
        attention_resolution: side of the square cross-attention maps the losses read. ``None``
            picks the UNet's cross-attention resolution closest to 16 (16x16 for SD 1.x/2.x at
            512 px, 32x32 for SDXL at 1024 px).
        mode: ``"truncated"`` (default) runs the conditional UNet pass for the update only up to the
            last layer that produces the maps (the same gradient as ``"full"``, less work);
            ``"full"`` runs the whole pass (the straightforward reference); ``"lagged"`` takes the
            gradient from the pipeline's own sampling pass and applies it one step late
            (approximate, no extra pass; see :mod:`ait2i_ext.fast`).
    """

    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    attention_resolution: int | None = None
    mode: GuidanceMode = "truncated"

    def __post_init__(self) -> None:
        _check(
            self.mode in ("full", "truncated", "lagged"), "mode", self.mode, "'full', 'truncated' or 'lagged'"
        )
        if self.attention_resolution is not None:
            _check(
                self.attention_resolution >= 1,
                "attention_resolution",
                self.attention_resolution,
                ">= 1 or None",
            )
