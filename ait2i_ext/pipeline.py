"""``generate``: AI-T2I guidance on a user's existing diffusers pipeline object.

The pipeline's own ``__call__`` runs unchanged. Guidance is attached from outside:

1. resolve each prompt's subjects to token groups;
2. encode the prompts once (the adapter) and pass the embeddings to the call;
3. draw the initial noise exactly as the pipeline would and guide it for step 0;
4. guide the latents of every later scheduled step from the adapter's step-end hook;
5. collect per-step losses and, on request, the conditional attention maps of the sampling passes.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .capture import capture_attention, map_side
from .config import AIT2IConfig, read_model_settings
from .fast import LaggedGuide, sampling_hooks
from .guidance import Guide, PromptTarget, StepRecord
from .tokens import SubjectSpec, TokenGroup, eot_index, resolve_groups

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuidedOutput:
    """Result of :func:`generate`.

    Args:
        images: what the pipeline returned as ``images`` (PIL images by default).
        groups: per prompt, its resolved token groups.
        steps: per guided step, the loss terms (batch means) before the update.
        maps: ``(B, H, W, T)`` conditional cross-attention maps of the sampling passes averaged
            over the denoising steps (``None`` unless ``return_maps``).
        images_per_prompt: images generated for each prompt.
        config: the configuration the run used (the model's settings applied, the map resolution
            resolved).
    """

    images: list
    groups: tuple[tuple[TokenGroup, ...], ...]
    steps: tuple[StepRecord, ...]
    maps: torch.Tensor | None
    images_per_prompt: int = 1
    config: AIT2IConfig | None = None

    def group_maps(self, index: int) -> dict[str, torch.Tensor]:
        """Per-group ``(H, W)`` maps (the main token's map) of image ``index``."""
        if self.maps is None:
            raise ValueError("no maps were recorded: call generate(..., return_maps=True)")
        groups = self.groups[index // self.images_per_prompt]
        return {g.name: self.maps[index, :, :, g.main] for g in groups}

    def loss_curve(self, term: str = "total") -> list[float]:
        return [record.losses[term] for record in self.steps]


def _prompts(prompt: str | Sequence[str]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    prompts = list(prompt)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompt={prompt!r} is invalid: expected a non-empty string or list of strings")
    return prompts


def _subjects_per_prompt(subjects, n: int) -> list:
    """``None``, one list of specs for every prompt, or one list per prompt."""
    if subjects is None or isinstance(subjects, str):
        return [subjects] * n
    subjects = list(subjects)
    nested = subjects and all(isinstance(s, (list, tuple)) for s in subjects)
    if not nested:
        return [subjects] * n
    if len(subjects) != n:
        raise ValueError(f"got {len(subjects)} subject lists for {n} prompts: expected one list per prompt")
    return subjects


def resolve_targets(tokenizer, prompts: list[str], subjects, num_images: int) -> list[PromptTarget]:
    """Token groups, end-of-text index and image count for each prompt."""
    return [
        PromptTarget(resolve_groups(tokenizer, p, s), eot_index(tokenizer, p), num_images)
        for p, s in zip(prompts, _subjects_per_prompt(subjects, len(prompts)))
    ]


def _call_defaults(pipe) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    return {k: v.default for k, v in params.items() if v.default is not inspect.Parameter.empty}


def generate(
    pipe,
    prompt: str | Sequence[str],
    subjects: Sequence[SubjectSpec] | Sequence[Sequence[SubjectSpec]] | None = None,
    *,
    config: AIT2IConfig | None = None,
    guidance: bool = True,
    return_maps: bool = False,
    adapter=None,
    **call_kwargs,
) -> GuidedOutput:
    """Generate with AI-T2I guidance on ``pipe`` (SD 1.x/2.x, SDXL, or a pipeline an adapter supports).

    Args:
        pipe: a loaded diffusers pipeline.
        prompt: one prompt or a list (batch).
        subjects: subjects by words (see :mod:`ait2i_ext.tokens`), for every prompt or one list per
            prompt; ``None`` infers them from each prompt.
        config: loss weights, schedule and mode. ``None``: the model's own settings, i.e.
            ``AIT2IConfig()`` updated by the box settings of the adapter's layout route
            (``ait2i_ext.adapters.layout.ROUTE_SETTINGS``), then by the ``ait2i.json`` of the folder
            the pipeline was loaded from (:func:`~ait2i_ext.config.model_config`; the shipped shapes
            model has one). An
            explicit ``config`` is used as given: build it with ``model_config(pipe, ...)`` to
            change some fields and keep the model's others.
        guidance: ``False`` runs the pipeline untouched (same images as calling it directly).
        return_maps: also record the conditional attention maps of the sampling passes.
        adapter: an adapter instance; by default chosen from the pipeline's class.
        **call_kwargs: passed to the pipeline (``num_inference_steps``, ``generator``,
            ``negative_prompt``, ``guidance_scale``, ``num_images_per_prompt``, ``height``, ...).

    Returns:
        :class:`GuidedOutput` with the images, the groups, per-step losses and the maps.
    """
    from .adapters import adapter_for
    from .adapters.layout import has_boxes, route_config

    adapter = adapter or adapter_for(pipe)
    if config is None:
        route = getattr(adapter, "layout_route", None)
        # plain SD/SDXL take the boxes route only with boxes (as `ait2i generate --box`)
        config = route_config(None if route == "boxes" and not has_boxes(subjects) else route, pipe)
    elif read_model_settings(pipe):
        logger.info("an explicit config is used as given: %s's ait2i.json does not apply", pipe.name_or_path)
    for key in ("prompt_embeds", "pooled_prompt_embeds", "latents"):
        if call_kwargs.get(key) is not None:
            raise ValueError(
                f"{key}= is not supported by ait2i.generate: pass the prompt text; ait2i encodes it"
            )
    for key in ("num_inference_steps", "num_images_per_prompt"):
        value = call_kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r} is invalid: expected an integer >= 1")
    prompts = _prompts(prompt)
    defaults = _call_defaults(pipe)
    # The map resolution, fixed once for the run: down- and up-block layers at 1/32 of the image.
    latent_hw = _latent_hw(pipe, call_kwargs)
    side = map_side(pipe.unet, latent_hw, config.attention_resolution, pipe.vae_scale_factor)
    config = dataclasses.replace(config, attention_resolution=side)
    num_images = int(call_kwargs.get("num_images_per_prompt") or 1)
    targets = resolve_targets(adapter.tokenizer, prompts, subjects, num_images)
    # Layout adapters fill their own call arguments (GLIGEN boxes, the control image's size).
    if hasattr(adapter, "prepare"):
        call_kwargs = adapter.prepare(dict(call_kwargs), subjects)
    guide: Guide | None = None
    observed = _MapAccumulator(num_images * len(prompts)) if return_maps else None
    kwargs = dict(call_kwargs)

    if guidance:
        guidance_scale = kwargs.get("guidance_scale", defaults.get("guidance_scale", 7.5))
        steps = kwargs.pop("num_inference_steps", defaults.get("num_inference_steps", 50))
        embeds, forward = adapter.encode(prompts, num_images, guidance_scale > 1.0, kwargs)
        kwargs.update(embeds, num_images_per_prompt=1)  # the embeddings are already repeated per image
        device = pipe._execution_device  # walks every component's modules: looked up once
        timesteps = _timesteps(pipe, steps, kwargs, device)
        noise = _initial_noise(pipe, len(prompts) * num_images, kwargs, device)
        # The pipeline scales the latents it is given by init_noise_sigma: hand it the noise plus the
        # update in noise units, so that a zero update gives it exactly the noise it would draw.
        latents = noise * pipe.scheduler.init_noise_sigma  # what prepare_latents makes of it
        guide_cls = LaggedGuide if config.mode == "lagged" else Guide  # ait2i_ext/fast.py
        guide = guide_cls(
            pipe.unet, forward, targets, timesteps, config, lambda t: _input_scale(pipe.scheduler, t)
        )
        guided = guide.update(0, latents)
        kwargs.update(
            num_inference_steps=steps, latents=noise + (guided - latents) / pipe.scheduler.init_noise_sigma
        )
    else:
        kwargs["prompt"] = prompts

    def on_step_end(i: int, t, tensors: dict) -> dict:
        if observed is not None:
            observed.add(store)
        if guide is not None:
            tensors["latents"] = guide.update(i + 1, tensors["latents"])
        return tensors

    if guide is not None or observed is not None:
        kwargs = adapter.attach(kwargs, on_step_end)
    with torch.no_grad(), sampling_hooks(guide):
        if observed is not None:
            with capture_attention(pipe.unet, latent_hw, config.attention_resolution, detach=True) as store:
                result = pipe(**kwargs)
        else:
            result = pipe(**kwargs)
    images = result.images if hasattr(result, "images") else result[0]
    return GuidedOutput(
        images=images,
        groups=tuple(t.groups for t in targets),
        steps=tuple(guide.records) if guide else (),
        maps=observed.mean() if observed is not None else None,
        images_per_prompt=num_images,
        config=config,
    )


class _MapAccumulator:
    """Running mean of the conditional half of each sampling pass's captured maps."""

    def __init__(self, batch: int):
        self.batch, self.total, self.count = batch, None, 0

    def add(self, store) -> None:
        if not len(store):
            return
        maps = store.maps()
        maps = maps[-self.batch :]  # CFG passes are [uncond, cond]: keep the conditional half
        self.total = maps if self.total is None else self.total + maps
        self.count += 1
        store.clear()

    def mean(self) -> torch.Tensor | None:
        return None if self.total is None else (self.total / self.count).cpu()


def _latent_hw(pipe, kwargs: dict) -> tuple[int, int]:
    size = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    height = kwargs.get("height") or size * pipe.vae_scale_factor
    width = kwargs.get("width") or size * pipe.vae_scale_factor
    return int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor


def _timesteps(pipe, steps: int, kwargs: dict, device):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    timesteps, _ = retrieve_timesteps(
        pipe.scheduler, steps, device, kwargs.get("timesteps"), kwargs.get("sigmas")
    )
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    return timesteps


def _input_scale(scheduler, t) -> float:
    """The factor ``scale_model_input`` applies at ``t`` (1 for DDIM/PNDM, 1/sqrt(sigma^2+1) for Euler)."""
    one = torch.ones((), device=t.device if torch.is_tensor(t) else None)
    return float(scheduler.scale_model_input(one, t))


def _initial_noise(pipe, batch: int, kwargs: dict, device) -> torch.Tensor:
    """The unit-variance noise the pipeline would draw (``prepare_latents`` before its scaling by
    ``init_noise_sigma``): the same generator calls, so the stock call would draw the same values."""
    from diffusers.utils.torch_utils import randn_tensor

    h, w = _latent_hw(pipe, kwargs)
    shape = (batch, pipe.unet.config.in_channels, h, w)
    generator = kwargs.get("generator")
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(
            f"got {len(generator)} generators for a batch of {batch} images: expected one per image"
        )
    dtype = kwargs["prompt_embeds"].dtype
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
