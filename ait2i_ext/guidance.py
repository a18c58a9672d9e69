"""Guidance: nudge the latents down the gradient of the AI-T2I loss during the first steps.

The data flow of one update, end to end, is :func:`guidance_step`: enable grad, run the
conditional UNet pass under attention capture, compute the losses per prompt, differentiate
w.r.t. the latents, step. :class:`Guide` applies it on the schedule of ``ScheduleConfig`` (and the
optional iterative refinement); adapters call ``Guide.update(i, latents)`` before each guided
denoising step ``i`` and know nothing about the losses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .capture import CrossAttentionLayer, StopForward, capture_attention, capture_layers
from .config import AIT2IConfig
from .objective import LossTerms, compute_losses, group_maps, group_radii
from .tokens import TokenGroup

logger = logging.getLogger(__name__)

# Runs the conditional UNet pass of the adapter's pipeline on ``latents`` at timestep ``t``.
UNetForward = Callable[[torch.Tensor, torch.Tensor], object]


@dataclass(frozen=True)
class PromptTarget:
    """What the losses need of one prompt: its groups, end-of-text index and image count."""

    groups: tuple[TokenGroup, ...]
    eot_index: int
    num_images: int


@dataclass(frozen=True)
class StepRecord:
    """Diagnostics of one guided denoising step (losses are means over the batch, before the update)."""

    step: int
    timestep: float
    step_size: float
    iterations: int
    losses: dict[str, float]


Radii = tuple[torch.Tensor, torch.Tensor]  # aggregation and alignment radii of one prompt's rows, (N, G) each


def _prompt_rows(attn: torch.Tensor, targets: Sequence[PromptTarget]) -> list[torch.Tensor]:
    """``attn`` cut into each prompt's rows (``num_images`` each, in batch order)."""
    starts = [0]
    for target in targets:
        starts.append(starts[-1] + target.num_images)
    if starts[-1] != attn.shape[0]:
        raise ValueError(f"batch of {attn.shape[0]} maps does not match the prompts' {starts[-1]} images")
    return [attn[a:b] for a, b in zip(starts, starts[1:])]


def batch_losses(
    attn: torch.Tensor,
    targets: Sequence[PromptTarget],
    config: AIT2IConfig,
    radii: Sequence[Radii] | None = None,
) -> LossTerms:
    """Losses of a batch laid out prompt after prompt (``num_images`` rows each).

    Args:
        attn: ``(B, H, W, T)`` captured maps, ``B = sum(t.num_images)``.
        targets: one :class:`PromptTarget` per prompt, in batch order.
        radii: per prompt, the radii its losses use (:func:`batch_radii`; ``None``: each step's own).
    """
    rows = _prompt_rows(attn, targets)
    radii = radii if radii is not None else [None] * len(rows)
    parts = [
        compute_losses(part, target.groups, target.eot_index, config.loss, radii=held)
        for part, target, held in zip(rows, targets, radii)
    ]
    fields = LossTerms.__dataclass_fields__
    return LossTerms(**{name: torch.cat([getattr(p, name) for p in parts]) for name in fields})


def batch_radii(
    attn: torch.Tensor, targets: Sequence[PromptTarget], config: AIT2IConfig
) -> tuple[Radii, ...]:
    """Each prompt's group radii on these maps (:func:`~ait2i_ext.objective.group_radii`), detached:
    what a ``radius_mode="calibrated"`` run measures on its first guided pass and then holds."""
    return tuple(
        group_radii(group_maps(part.float(), target.groups), config.loss)
        for part, target in zip(_prompt_rows(attn.detach(), targets), targets)
    )


def capture_maps(
    unet,
    forward: UNetForward,
    latents: torch.Tensor,
    t,
    config: AIT2IConfig,
    layers: Sequence[CrossAttentionLayer] | None = None,
) -> torch.Tensor:
    """Run ``forward`` under capture and return the maps ``(B, H, W, T)`` with their graph.

    ``layers``: the layers to record (``capture.capture_layers`` for these latents and ``config``),
    or ``None`` to find them here.
    """
    truncated = config.mode == "truncated"
    with capture_attention(
        unet,
        tuple(latents.shape[-2:]),
        config.attention_resolution,
        stop_early=truncated,
        blocks=config.map_blocks,
        layers=layers,
    ) as store:
        try:
            forward(latents, t)
        except StopForward:
            pass
        return store.maps()


def guidance_step(
    unet,
    forward: UNetForward,
    latents: torch.Tensor,
    t,
    targets: Sequence[PromptTarget],
    config: AIT2IConfig,
    step_size: float | torch.Tensor,
    input_scale: float = 1.0,
    term: str | tuple[str, ...] = "total",
    box_stop: float | None = None,
    layers: Sequence[CrossAttentionLayer] | None = None,
    trainable: Sequence[torch.nn.Parameter] | None = None,
    radii: Sequence[Radii] | None = None,
) -> tuple[torch.Tensor, LossTerms, torch.Tensor]:
    """One latent update ``z <- z - step_size * grad_z L``, taken in the UNet's input space.

    ``L`` is the ``term`` field of :class:`LossTerms`: ``"total"`` (the objective) or one raw term,
    e.g. ``"box"``; a tuple of fields descends their sum (the box-only updates of the layout
    schedule, ``ScheduleConfig.box_update_terms``).

    ``input_scale`` is the factor ``c`` the scheduler applies before the UNet (``scale_model_input``;
    1 for DDIM/PNDM/DPM, ``1/sqrt(sigma^2+1)`` for Euler-type). The step is taken on ``c * z`` so that
    ``step_size`` means the same for every scheduler: ``z <- z - step_size * grad_z L / c^2``.
    ``step_size`` may be a ``(B,)`` tensor, one size per image (0 leaves an image as it is). With
    ``box_stop`` an image whose box term is at or below it is left as it is. ``layers`` (the
    recorded layers, see :func:`capture_maps`) and ``trainable`` (the UNet's parameters that
    require grad, see :func:`frozen_parameters`) may be found once per run and passed in: finding
    them walks the whole UNet. ``radii``: per prompt, the radii the losses use (see
    :func:`batch_losses`).

    Returns:
        The updated latents (detached, same dtype), the loss terms before the update, and the
        captured maps ``(B, H, W, T)`` (detached).
    """
    z = latents.detach()
    grad, terms, attn = latent_gradient(unet, forward, z, t, targets, config, term, layers, trainable, radii)
    if box_stop is not None:
        step_size = torch.as_tensor(step_size) * (terms.box.detach() > box_stop).float()
    if torch.is_tensor(step_size):
        step_size = step_size.to(grad.device, grad.dtype).view(-1, *[1] * (grad.ndim - 1))
    new = (z - (step_size / input_scale**2) * grad.to(z.dtype)).to(latents.dtype)
    return new, terms, attn


def latent_gradient(
    unet,
    forward: UNetForward,
    latents: torch.Tensor,
    t,
    targets: Sequence[PromptTarget],
    config: AIT2IConfig,
    term: str | tuple[str, ...] = "total",
    layers: Sequence[CrossAttentionLayer] | None = None,
    trainable: Sequence[torch.nn.Parameter] | None = None,
    radii: Sequence[Radii] | None = None,
) -> tuple[torch.Tensor, LossTerms, torch.Tensor]:
    """``grad_z L`` at ``latents`` (``L``: the ``term`` fields of :class:`LossTerms`, summed, as in
    :func:`guidance_step`; ``radii`` as there), with the loss terms and the captured maps (both detached)."""
    # Frozen weights: the pass is differentiated w.r.t. the latents only, so no layer saves its
    # input for a weight gradient (less memory, ~5 % less time on the shapes UNet).
    with torch.enable_grad(), frozen_parameters(unet, trainable):
        z = latents.detach().requires_grad_(True)
        attn = capture_maps(unet, forward, z, t, config, layers)
        terms = batch_losses(attn, targets, config, radii)
        names = (term,) if isinstance(term, str) else term
        loss = sum(getattr(terms, name) for name in names)
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return grad, _detach(terms), attn.detach()


def norm_preserving_step(latents: torch.Tensor, grad: torch.Tensor, size: float) -> torch.Tensor:
    """Move each image's latent against ``grad`` by ``size`` times its RMS, then rescale it to its
    former norm (InitNO-style: the initial noise stays on the Gaussian's shell however far it turns).

    Args:
        latents (`torch.Tensor` of shape `(B, ...)`): the latents, one row per image.
        grad (`torch.Tensor` of the same shape): the loss's gradient; only its direction per image is used.
        size (`float`): the step as a fraction of each latent's RMS.
    """
    dims = tuple(range(1, latents.ndim))
    z = latents.float()
    g = grad.float()
    direction = g / g.pow(2).mean(dims, keepdim=True).sqrt().clamp_min(1e-12)
    rms = z.pow(2).mean(dims, keepdim=True).sqrt()
    moved = z - size * rms * direction
    new_rms = moved.pow(2).mean(dims, keepdim=True).sqrt().clamp_min(1e-12)
    return (moved * (rms / new_rms)).to(latents.dtype)


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``module``'s parameters that require grad (the ones :func:`frozen_parameters` turns off)."""
    return [p for p in module.parameters() if p.requires_grad]


@contextmanager
def frozen_parameters(
    module: torch.nn.Module, params: Sequence[torch.nn.Parameter] | None = None
) -> Iterator[None]:
    """Turn off ``requires_grad`` on ``module``'s parameters for the block, and restore it.

    A pass differentiated only w.r.t. its input then saves no tensors for weight gradients.
    ``params``: :func:`trainable_parameters` of ``module``, found once by a caller that freezes it
    for many passes (``None``: found here).
    """
    params = trainable_parameters(module) if params is None else params
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _detach(terms: LossTerms) -> LossTerms:
    return LossTerms(**{k: getattr(terms, k).detach() for k in LossTerms.__dataclass_fields__})


class Guide:
    """Applies :func:`guidance_step` on the schedule and keeps the diagnostics of the run.

    Args:
        unet: the UNet whose cross-attention is read.
        forward: the adapter's conditional UNet pass.
        targets: the prompts' groups, in batch order.
        timesteps: the scheduler's timesteps for this run (one entry per denoising step).
        config: the run's configuration.
        input_scale: ``t -> c``, the scheduler's model-input scaling at ``t`` (see :func:`guidance_step`).
    """

    def __init__(self, unet, forward: UNetForward, targets, timesteps, config: AIT2IConfig, input_scale=None):
        self.unet, self.forward, self.targets, self.config = unet, forward, tuple(targets), config
        self.input_scale = input_scale or (lambda t: 1.0)
        self.timesteps = list(timesteps)
        self.step_sizes = config.schedule.step_sizes(len(self.timesteps))
        self.guided_steps = frozenset(config.schedule.guided_steps(len(self.timesteps)))
        self.thresholds = dict(config.schedule.refinement_thresholds) if config.schedule.refinement else {}
        has_boxes = any(g.box is not None for target in self.targets for g in target.groups)
        self.num_box_steps = config.schedule.num_box_steps(len(self.timesteps)) if has_boxes else 0
        self.records: list[StepRecord] = []
        # Found on the first guided step, shared by the run's guided passes (each lookup walks the UNet).
        self._layers: dict[tuple[int, ...], tuple[CrossAttentionLayer, ...]] = {}
        self._trainable: list[torch.nn.Parameter] | None = None
        # radius_mode="calibrated": each prompt's radii, measured on the first guided pass, then held.
        self.radii: tuple[Radii, ...] | None = None

    def _calibrate(self, attn: torch.Tensor) -> None:
        """Hold the radii measured on ``attn`` (the run's first guided pass) for a calibrated run."""
        if self.radii is None and self.config.loss.radius_mode == "calibrated":
            self.radii = batch_radii(attn, self.targets, self.config)

    def _pass_setup(self, latents: torch.Tensor):
        """The recorded layers for ``latents``' size and the UNet's trainable parameters, found once."""
        hw = tuple(latents.shape[-2:])
        if hw not in self._layers:
            config = self.config
            self._layers[hw] = capture_layers(
                self.unet, hw, config.attention_resolution, blocks=config.map_blocks
            )
        if self._trainable is None:
            self._trainable = trainable_parameters(self.unet)
        return self._layers[hw], self._trainable

    def is_guided(self, i: int) -> bool:
        """Step ``i`` is on the schedule: a guided step (``ScheduleConfig.guided_steps``) or a box step
        (with ``step_scale=0`` its losses are still recorded)."""
        return i in self.guided_steps or 0 <= i < self.num_box_steps

    def update(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """The latents for denoising step ``i``: guided when ``i`` is on the schedule, else unchanged."""
        if not self.is_guided(i):
            return latents
        t, alpha = self.timesteps[i], self.step_sizes[i]
        c = self.input_scale(t)
        layers, trainable = self._pass_setup(latents)

        def step(
            z: torch.Tensor, size: float | torch.Tensor, term: str | tuple[str, ...] = "total", stop=None
        ):
            return guidance_step(
                self.unet,
                self.forward,
                z,
                t,
                self.targets,
                self.config,
                size,
                c,
                term,
                stop,
                layers,
                trainable,
                self.radii,
            )

        schedule = self.config.schedule
        names = schedule.box_update_terms

        def normalised_step(z: torch.Tensor, size: float, stop=None) -> tuple[torch.Tensor, LossTerms]:
            grad, box_terms, _ = latent_gradient(
                self.unet, self.forward, z, t, self.targets, self.config, names, layers, trainable, self.radii
            )
            if stop is not None:  # images at or below box_stop stay as they are
                grad = grad * (box_terms.box > stop).to(grad.dtype).view(-1, *[1] * (grad.ndim - 1))
            return norm_preserving_step(z, grad, size), box_terms

        if i == 0 and self.num_box_steps and schedule.box_init_iterations:
            # The initial noise first, on the box terms alone (InitNO's idea, with the box energy).
            for _ in range(schedule.box_init_iterations):
                latents, _ = normalised_step(latents, schedule.box_init_step)
        latents, terms, attn = step(latents, alpha)
        self._calibrate(attn)
        iterations = 1
        if i < self.num_box_steps:  # the layout schedule: extra updates on the box term (+ box_update_terms)
            size, stop = schedule.box_step_scale, schedule.box_stop
            for _ in range(schedule.box_iterations):
                if schedule.box_norm_step:
                    latents, box_terms = normalised_step(latents, schedule.box_norm_step, stop)
                else:
                    latents, box_terms, _ = step(latents, size, names, stop)
                if stop is not None and not bool((box_terms.box > stop).any()):
                    break  # every image was at or below box_stop: this update left them as they were
                iterations += 1
        if i in self.thresholds:
            target = 1.0 - self.thresholds[i]
            per_image = self.config.schedule.refinement_scope == "image"
            while iterations < self.config.schedule.max_refinement_iters:
                # Images still above the target get another update ("batch": all, while any is).
                above = terms.existence > target
                if not bool(above.any()):
                    break
                latents, terms, _ = step(latents, alpha * above.float() if per_image else alpha)
                iterations += 1
        self.records.append(StepRecord(i, float(t), alpha, iterations, terms.as_floats()))
        logger.debug("step %d: %s", i, self.records[-1].losses)
        return latents
