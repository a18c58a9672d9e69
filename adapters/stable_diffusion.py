"""Adapters for the plain text-to-image pipelines: Stable Diffusion 1.x/2.x and SDXL.

An adapter supplies two things and copies no pipeline code: how to run the pipeline's
*conditional* UNet pass on given latents (``forward``), and how to hand the guided latents back
to the running pipeline (``attach``, here through ``callback_on_step_end``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

#: Pipeline inputs a guided run cannot pass on to its own conditional UNet pass (refused clearly).
UNSUPPORTED_WITH_GUIDANCE = {
    "ip_adapter_image": "IP-Adapter images",
    "ip_adapter_image_embeds": "IP-Adapter image embeddings",
}


def check_call_kwargs(call_kwargs: dict) -> None:
    """Raise for inputs that the guided conditional pass would silently drop."""
    for key, what in UNSUPPORTED_WITH_GUIDANCE.items():
        if call_kwargs.get(key) is not None:
            raise ValueError(
                f"{key}= is not supported with ait2i guidance: {what} would not reach the guided UNet pass "
                "(run with guidance=False, or without the IP-Adapter)"
            )


def per_prompt(value, prompts: list[str]):
    """A negative prompt given as one string for a single prompt, as the list ait2i's prompts are."""
    return [value] * len(prompts) if isinstance(value, str) else value


def lora_scale(call_kwargs: dict) -> float | None:
    """The LoRA scale the pipeline applies to its text encoder(s): ``cross_attention_kwargs["scale"]``."""
    return (call_kwargs.get("cross_attention_kwargs") or {}).get("scale")


def timestep_cond(pipe, call_kwargs: dict, batch: int, like: torch.Tensor) -> torch.Tensor | None:
    """The guidance-scale embedding a UNet with ``time_cond_proj_dim`` (LCM) gets, as the pipeline
    builds it; ``None`` for other UNets."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    scale = call_kwargs.get("guidance_scale")
    if scale is None:
        scale = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    w = torch.tensor(scale - 1).repeat(batch)
    return pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(device=like.device, dtype=like.dtype)


class StableDiffusionAdapter:
    """``StableDiffusionPipeline`` and pipelines sharing its ``__call__`` (SD 1.x/2.x)."""

    #: Its layout route: the box settings of ``ait2i_ext.adapters.layout.ROUTE_SETTINGS`` it runs with.
    layout_route = "boxes"

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    def encode(
        self, prompts: list[str], num_images: int, do_cfg: bool, call_kwargs: dict
    ) -> tuple[dict, Callable]:
        """Encode the prompts once; return the call's new kwargs and the conditional UNet pass."""
        pipe = self.pipe
        check_call_kwargs(call_kwargs)
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompts,
            pipe._execution_device,
            num_images,
            do_cfg,
            per_prompt(call_kwargs.pop("negative_prompt", None), prompts),
            negative_prompt_embeds=call_kwargs.pop("negative_prompt_embeds", None),
            lora_scale=lora_scale(call_kwargs),
            clip_skip=call_kwargs.get("clip_skip"),
        )
        attention_kwargs = call_kwargs.get("cross_attention_kwargs")
        cond = timestep_cond(pipe, call_kwargs, prompt_embeds.shape[0], prompt_embeds)

        def forward(latents: torch.Tensor, t) -> torch.Tensor:
            x = pipe.scheduler.scale_model_input(latents, t)
            return pipe.unet(
                x,
                t,
                encoder_hidden_states=prompt_embeds,
                timestep_cond=cond,
                cross_attention_kwargs=attention_kwargs,
            ).sample

        return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}, forward

    def attach(self, call_kwargs: dict, on_step_end: Callable[[int, torch.Tensor, dict], dict]) -> dict:
        """Route ``on_step_end(i, t, tensors) -> tensors`` through ``callback_on_step_end``,
        composed with the user's own callback (which runs after ours and sees the guided latents)."""
        user = call_kwargs.pop("callback_on_step_end", None)
        inputs = list(call_kwargs.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])
        if user is not None and hasattr(user, "tensor_inputs"):
            inputs += list(user.tensor_inputs)
        inputs = list(dict.fromkeys(["latents", *inputs]))

        def callback(pipe, i, t, tensors):
            tensors = on_step_end(i, t, tensors)
            if user is not None:
                tensors.update(user(pipe, i, t, tensors) or {})
            return tensors

        return {**call_kwargs, "callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": inputs}


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """``StableDiffusionXLPipeline``: two text encoders, pooled embeddings and size conditioning."""

    def encode(
        self, prompts: list[str], num_images: int, do_cfg: bool, call_kwargs: dict
    ) -> tuple[dict, Callable]:
        pipe = self.pipe
        check_call_kwargs(call_kwargs)
        device = pipe._execution_device
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=call_kwargs.pop("prompt_2", None),
            device=device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=per_prompt(call_kwargs.pop("negative_prompt", None), prompts),
            negative_prompt_2=per_prompt(call_kwargs.pop("negative_prompt_2", None), prompts),
            negative_prompt_embeds=call_kwargs.pop("negative_prompt_embeds", None),
            negative_pooled_prompt_embeds=call_kwargs.pop("negative_pooled_prompt_embeds", None),
            lora_scale=lora_scale(call_kwargs),
            clip_skip=call_kwargs.get("clip_skip"),
        )
        height = call_kwargs.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
        width = call_kwargs.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
        projection_dim = (
            pipe.text_encoder_2.config.projection_dim
            if pipe.text_encoder_2 is not None
            else int(pooled.shape[-1])
        )
        time_ids = pipe._get_add_time_ids(
            call_kwargs.get("original_size") or (height, width),
            call_kwargs.get("crops_coords_top_left", (0, 0)),
            call_kwargs.get("target_size") or (height, width),
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        ).to(device)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(prompt_embeds.shape[0], 1)}
        attention_kwargs = call_kwargs.get("cross_attention_kwargs")
        cond = timestep_cond(pipe, call_kwargs, prompt_embeds.shape[0], prompt_embeds)

        def forward(latents: torch.Tensor, t) -> torch.Tensor:
            x = pipe.scheduler.scale_model_input(latents, t)
            return pipe.unet(
                x,
                t,
                encoder_hidden_states=prompt_embeds,
                timestep_cond=cond,
                added_cond_kwargs=added,
                cross_attention_kwargs=attention_kwargs,
            ).sample

        new = {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
        return new, forward
