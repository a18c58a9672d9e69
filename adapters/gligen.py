"""Adapter for diffusers' ``StableDiffusionGLIGENPipeline`` (text-box GLIGEN).

GLIGEN grounds each phrase in its box through gated self-attention layers (``fuser``) between the
self- and cross-attention of every transformer block; the capture processors sit on the
cross-attention (``attn2``) layers only, so the fusers run untouched. With a box per subject the
AI-T2I box term pulls each subject's cross-attention into its box, on top of GLIGEN's grounding.

How this adapter fits the pipeline without copying its ``__call__``:

- ``gligen_phrases`` / ``gligen_boxes`` come from the subjects' boxes (phrase = the subject's
  words) unless the user passes them.
- The conditional UNet pass gets the same ``cross_attention_kwargs["gligen"]`` the pipeline builds
  for its conditional branch (:func:`gligen_inputs`), and the fusers enabled exactly on the steps
  the pipeline's scheduled sampling enables them (``gligen_scheduled_sampling_beta``).
- The pipeline only has the legacy ``callback(step, t, latents)``, whose return value it ignores.
  Its ``latents`` argument is the very tensor the loop feeds to the next UNet call (the loop does
  not reassign it between the callback and that call), so the guided latents are written into it
  in place with ``latents.copy_(guided)``, with ``callback_steps=1``.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .layout import GLIGEN_MAX_BOXES, StepTracker, boxed_subjects, torch_dtype
from .stable_diffusion import StableDiffusionAdapter

logger = logging.getLogger(__name__)


def _call_default(pipe, name: str):
    return inspect.signature(pipe.__call__).parameters[name].default


def check_gligen_layout(phrases: Sequence[str], boxes: Sequence[Sequence[float]]) -> None:
    """Raise unless ``phrases`` and ``boxes`` pair up and fit GLIGEN (at most 30 objects)."""
    if len(phrases) != len(boxes):
        raise ValueError(
            f"got {len(phrases)} GLIGEN phrases for {len(boxes)} boxes: expected one phrase per box"
        )
    if not boxes:
        raise ValueError(
            "GLIGEN needs at least one box: give the subjects boxes (Subject(..., box=(x0, y0, x1, y1)) or "
            "--box WORD:x0,y0,x1,y1) or pass gligen_phrases= and gligen_boxes="
        )
    if len(boxes) > GLIGEN_MAX_BOXES:
        raise ValueError(
            f"got {len(boxes)} boxes: StableDiffusionGLIGENPipeline accepts at most {GLIGEN_MAX_BOXES} "
            "(it would silently drop the rest)"
        )


def layout_from_subjects(subjects) -> tuple[list[str], list[list[float]]]:
    """GLIGEN phrases and boxes from the subjects that have a box.

    Args:
        subjects: specs for every prompt, or one list per prompt (GLIGEN grounds every prompt of a
            batch with the same phrases and boxes, so per-prompt lists must agree).

    Returns:
        ``(phrases, boxes)``: each boxed subject's words (``"red cat"``) and its box.
    """
    nested = (
        isinstance(subjects, (list, tuple))
        and subjects
        and all(isinstance(s, (list, tuple)) for s in subjects)
    )
    per_prompt = [boxed_subjects(s) for s in subjects] if nested else [boxed_subjects(subjects)]
    layouts = [([s.phrase() for s in boxed], [list(s.box) for s in boxed]) for boxed in per_prompt]
    if any(layout != layouts[0] for layout in layouts[1:]):
        raise ValueError(
            "the prompts' subjects have different boxes: StableDiffusionGLIGENPipeline grounds every prompt "
            "of a batch with one set of phrases and boxes"
        )
    return layouts[0]


@torch.no_grad()
def gligen_inputs(pipe, phrases: Sequence[str], boxes: Sequence[Sequence[float]], batch: int) -> dict:
    """``cross_attention_kwargs["gligen"]`` of the pipeline's conditional branch.

    The same tensors ``StableDiffusionGLIGENPipeline.__call__`` builds (step "5.1 Prepare GLIGEN
    variables") for its conditional half: the phrases' pooled text features, the boxes and the
    object mask, padded to 30 objects.

    Args:
        pipe: the GLIGEN pipeline.
        phrases: one phrase per box.
        boxes: ``(x0, y0, x1, y1)`` normalised boxes.
        batch: number of conditional images (prompts x images per prompt).

    Returns:
        ``{"boxes": (batch, 30, 4), "positive_embeddings": (batch, 30, D), "masks": (batch, 30)}``.
    """
    check_gligen_layout(phrases, boxes)
    device, dtype = pipe._execution_device, pipe.text_encoder.dtype
    tokens = pipe.tokenizer(list(phrases), padding=True, return_tensors="pt").to(device)
    features = pipe.text_encoder(**tokens).pooler_output
    n = len(boxes)
    padded_boxes = torch.zeros(GLIGEN_MAX_BOXES, 4, device=device, dtype=dtype)
    padded_boxes[:n] = torch.tensor([list(map(float, b)) for b in boxes])
    embeddings = torch.zeros(
        GLIGEN_MAX_BOXES, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype
    )
    embeddings[:n] = features
    masks = torch.zeros(GLIGEN_MAX_BOXES, device=device, dtype=dtype)
    masks[:n] = 1
    return {
        "boxes": padded_boxes.unsqueeze(0).expand(batch, -1, -1).clone(),
        "positive_embeddings": embeddings.unsqueeze(0).expand(batch, -1, -1).clone(),
        "masks": masks.unsqueeze(0).expand(batch, -1).clone(),
    }


@contextmanager
def fusers_enabled(unet, enabled: bool) -> Iterator[None]:
    """Switch GLIGEN's gated self-attention layers on or off, and put their state back after."""
    from diffusers.models.attention import GatedSelfAttentionDense

    fusers = [m for m in unet.modules() if type(m) is GatedSelfAttentionDense]
    before = [m.enabled for m in fusers]
    for m in fusers:
        m.enabled = enabled
    try:
        yield
    finally:
        for m, state in zip(fusers, before, strict=True):
            m.enabled = state


def check_callback_follows_every_step(scheduler, num_inference_steps: int) -> None:
    """Raise unless the pipeline's legacy callback runs after every UNet pass of the schedule.

    The loop calls it only after its ``len(timesteps) - num_inference_steps * order`` warm-up
    passes: PNDM's (its first timestep twice, or its Runge-Kutta steps) would go unguided, so guided
    step 1 would be skipped silently. Checked on a copy of the scheduler, before any sampling.
    """
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_inference_steps)
    order = getattr(scheduler, "order", 1)
    warm_up = len(probe.timesteps) - num_inference_steps * order
    if warm_up > 0:
        raise ValueError(
            f"{type(scheduler).__name__} is not supported with GLIGEN guidance: its first {warm_up} UNet pass(es) "
            "are a warm-up after which StableDiffusionGLIGENPipeline does not call back, so those steps could not "
            "be guided; use pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config) (or Euler, "
            "DPM-Solver++)"
        )


class GLIGENAdapter(StableDiffusionAdapter):
    """``StableDiffusionGLIGENPipeline``: grounded conditional pass and in-place latent updates.

    Args:
        pipe: the GLIGEN pipeline.
        subjects: the subjects of :func:`ait2i_ext.generate` (their boxes fill ``gligen_phrases`` /
            ``gligen_boxes`` when the call does not pass them); ``generate`` also hands them over
            through :meth:`prepare`.
    """

    layout_route = "gligen"

    def __init__(self, pipe, subjects=None):
        super().__init__(pipe)
        self.subjects = subjects
        self.tracker = StepTracker()

    def prepare(self, call_kwargs: dict, subjects=None) -> dict:
        """The call's kwargs with ``gligen_phrases`` / ``gligen_boxes`` filled from the subjects' boxes
        (unless given), checked for GLIGEN's limits."""
        phrases, boxes = call_kwargs.get("gligen_phrases"), call_kwargs.get("gligen_boxes")
        subjects = subjects if subjects is not None else self.subjects
        if phrases is None and boxes is None and subjects is None:
            raise ValueError(
                "GLIGEN needs phrases and boxes: pass gligen_phrases= and gligen_boxes=, or "
                "adapter=GLIGENAdapter(pipe, subjects) so that the subjects' boxes fill them"
            )
        if phrases is None and boxes is None:
            phrases, boxes = layout_from_subjects(subjects)
        elif phrases is None or boxes is None:
            raise ValueError(
                "pass both gligen_phrases= and gligen_boxes=, or neither (boxes then come from subjects)"
            )
        check_gligen_layout(phrases, boxes)
        return {**call_kwargs, "gligen_phrases": list(phrases), "gligen_boxes": [list(b) for b in boxes]}

    def encode(
        self, prompts: list[str], num_images: int, do_cfg: bool, call_kwargs: dict
    ) -> tuple[dict, Callable]:
        pipe = self.pipe
        layout = self.prepare(call_kwargs)
        steps = call_kwargs.get("num_inference_steps", _call_default(pipe, "num_inference_steps"))
        check_callback_follows_every_step(pipe.scheduler, steps)
        new, _ = super().encode(prompts, num_images, do_cfg, call_kwargs)
        prompt_embeds = new["prompt_embeds"]
        grounding = gligen_inputs(
            pipe, layout["gligen_phrases"], layout["gligen_boxes"], prompt_embeds.shape[0]
        )
        attention = dict(call_kwargs.get("cross_attention_kwargs") or {})
        beta = call_kwargs.get(
            "gligen_scheduled_sampling_beta", _call_default(pipe, "gligen_scheduled_sampling_beta")
        )
        self.tracker = tracker = StepTracker()

        def forward(latents: torch.Tensor, t) -> torch.Tensor:
            # The pipeline runs the fusers on its first int(beta * T) steps only (scheduled sampling).
            grounded = tracker.step < int(beta * len(pipe.scheduler.timesteps))
            x = pipe.scheduler.scale_model_input(latents, t)
            with fusers_enabled(pipe.unet, grounded):
                return pipe.unet(
                    x,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs={**attention, "gligen": grounding},
                ).sample

        # The pipeline writes its "gligen" entry into the dict it is given: hand it a copy of the user's.
        extra = {"cross_attention_kwargs": attention} if attention else {}
        return {
            **new,
            "gligen_phrases": layout["gligen_phrases"],
            "gligen_boxes": layout["gligen_boxes"],
            **extra,
        }, forward

    def attach(self, call_kwargs: dict, on_step_end: Callable[[int, torch.Tensor, dict], dict]) -> dict:
        """Route ``on_step_end`` through the legacy ``callback`` and write its latents in place.

        The user's own ``callback`` (with its ``callback_steps``) runs after ours and sees the guided
        latents.
        """
        order = getattr(self.pipe.scheduler, "order", 1)
        if order != 1:
            raise ValueError(
                f"{type(self.pipe.scheduler).__name__} (order {order}) is not supported with GLIGEN guidance: "
                "the pipeline's legacy callback does not run after every UNet call; use a first-order "
                "scheduler (DDIM, PNDM, DPM-Solver++, Euler)"
            )
        user = call_kwargs.pop("callback", None)
        every = call_kwargs.pop("callback_steps", None) or 1
        tracked = self.tracker.wrap(on_step_end)

        def callback(i: int, t, latents: torch.Tensor) -> None:
            guided = tracked(i, t, {"latents": latents})["latents"]
            if guided is not latents:
                latents.copy_(guided)  # the loop's own tensor: its next UNet call reads these values
            if user is not None and i % every == 0:
                user(i, t, latents)

        return {**self.prepare(call_kwargs), "callback": callback, "callback_steps": 1}


def load_gligen_pipeline(path: str, dtype: torch.dtype | str | None = None):
    """Load a text-box GLIGEN checkpoint (e.g. ``masterful/gligen-1-4-generation-text-box``).

    Args:
        path: a local folder or a Hub id of a ``StableDiffusionGLIGENPipeline``.
        dtype: ``torch.float16``, ``"float16"``, ... (``None``: as stored).

    Raises:
        ValueError: the checkpoint cannot be loaded, or its UNet has no gated self-attention.
    """
    from diffusers import StableDiffusionGLIGENPipeline

    try:
        pipe = StableDiffusionGLIGENPipeline.from_pretrained(path, torch_dtype=torch_dtype(dtype))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot load a GLIGEN pipeline from {path!r}: {err}") from err
    attention_type = pipe.unet.config.get("attention_type", "default")
    if attention_type != "gated":
        raise ValueError(
            f"{path!r} is not a text-box GLIGEN checkpoint: its UNet has attention_type={attention_type!r}, "
            "expected 'gated'"
        )
    return pipe


__all__ = [
    "GLIGENAdapter",
    "check_callback_follows_every_step",
    "check_gligen_layout",
    "fusers_enabled",
    "gligen_inputs",
    "layout_from_subjects",
    "load_gligen_pipeline",
]
