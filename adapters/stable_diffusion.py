"""Adapters for the plain text-to-image pipelines: Stable Diffusion 1.x/2.x and SDXL.

An adapter supplies two things and copies no pipeline code: how to run the pipeline's
*conditional* UNet pass on given latents (``forward``), and how to hand the guided latents back
to the running pipeline (``attach``, here through ``callback_on_step_end``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StableDiffusionAdapter:
    """``StableDiffusionPipeline`` and pipelines sharing its ``__call__`` (SD 1.x/2.x)."""

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
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompts,
            pipe._execution_device,
            num_images,
            do_cfg,
            call_kwargs.pop("negative_prompt", None),
            clip_skip=call_kwargs.get("clip_skip"),
        )
        attention_kwargs = call_kwargs.get("cross_attention_kwargs")

        def forward(latents: torch.Tensor, t) -> torch.Tensor:
            x = pipe.scheduler.scale_model_input(latents, t)
            return pipe.unet(
                x, t, encoder_hidden_states=prompt_embeds, cross_attention_kwargs=attention_kwargs
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
        device = pipe._execution_device
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=call_kwargs.pop("prompt_2", None),
            device=device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=call_kwargs.pop("negative_prompt", None),
            negative_prompt_2=call_kwargs.pop("negative_prompt_2", None),
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

        def forward(latents: torch.Tensor, t) -> torch.Tensor:
            x = pipe.scheduler.scale_model_input(latents, t)
            return pipe.unet(
                x,
                t,
                encoder_hidden_states=prompt_embeds,
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
