"""Tiny, randomly initialised diffusers components built from configs, for tests, examples and the
CPU benchmark. They use the real CLIP tokenizer vocabulary shipped in ``ait2i_ext/assets`` so that
prompts split into the same tokens as on Stable Diffusion.

``arch="sd15"`` builds the Stable Diffusion 1.5 architecture (random weights, 512 px) for
timing on a GPU machine.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407


def tokenizer_path() -> str:
    """Folder of the shipped CLIP tokenizer (``vocab.json``, ``merges.txt``)."""
    return str(resources.files("ait2i_ext") / "assets" / "clip_tokenizer")


def load_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, offline ("a cat and a dog" -> 49406 320 2368 537 320 1929 49407)."""
    return CLIPTokenizer.from_pretrained(tokenizer_path(), model_max_length=max_length)


def _text_config(hidden: int, layers: int, heads: int, projection_dim: int | None = None) -> CLIPTextConfig:
    kwargs = dict(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def tiny_unet_config(cross_attention_dim: int = 32, sdxl: bool = False) -> dict:
    """A UNet with cross-attention at latent/2 and latent/4 (16x16 and 8x8 for 32x32 latents)."""
    cfg = dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,  # the number of heads, despite the name
        norm_num_groups=8,
    )
    if sdxl:
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,
            transformer_layers_per_block=(1, 1, 1),
            use_linear_projection=True,
        )
    return cfg


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_sd_components(seed: int = 0) -> dict:
    """Components of a tiny ``StableDiffusionPipeline``: 64 px images, 32x32 latents."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(32, 2, 2))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_sd_pipeline(seed: int = 0, cls=None):
    """A tiny ``StableDiffusionPipeline`` (or ``cls``, any class taking the same components)."""
    from diffusers import StableDiffusionPipeline

    cls = cls or StableDiffusionPipeline
    comps = tiny_sd_components(seed)
    if cls is not StableDiffusionPipeline:
        import inspect

        accepted = set(inspect.signature(cls.__init__).parameters)
        comps = {k: v for k, v in comps.items() if k in accepted}
    pipe = cls(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` with two text encoders (16 + 16 = 32 dims)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=32, sdxl=True))
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(16, 2, 2))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(16, 2, 2, projection_dim=32))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionXLPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_pipeline(dtype: torch.dtype = torch.float16, device: str = "cuda"):
    """The Stable Diffusion 1.5 architecture with random weights (for timing only)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(_text_config(768, 12, 12))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


def build_pipeline(arch: Literal["tiny", "tiny-sdxl", "sd15"] = "tiny", **kwargs):
    """Build a pipeline by architecture name (see module docstring)."""
    builders = {"tiny": tiny_sd_pipeline, "tiny-sdxl": tiny_sdxl_pipeline, "sd15": sd15_pipeline}
    if arch not in builders:
        raise ValueError(f"arch={arch!r} is invalid: expected one of {sorted(builders)}")
    return builders[arch](**kwargs)


def tiny_gligen_pipeline(seed: int = 0, open_gates: bool = True):
    """A tiny ``StableDiffusionGLIGENPipeline`` (gated self-attention UNet + position net).

    Random-init GLIGEN gates are 0, so the boxes would have no effect: ``open_gates`` sets them to 1.
    """
    from diffusers import StableDiffusionGLIGENPipeline, UNet2DConditionModel
    from diffusers.models.attention import GatedSelfAttentionDense

    components = tiny_sd_components(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(), attention_type="gated").eval()
    if open_gates:
        with torch.no_grad():
            for module in unet.modules():
                if isinstance(module, GatedSelfAttentionDense):
                    module.alpha_attn.fill_(1.0)
                    module.alpha_dense.fill_(1.0)
    keys = ("vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor")
    pipe = StableDiffusionGLIGENPipeline(
        unet=unet, requires_safety_checker=False, **{k: components[k] for k in keys}
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet(unet, seed: int = 0, channels: int = 3):
    """A tiny ``ControlNetModel`` copied from ``unet``; its zero convolutions get random weights
    (at 0 they would add nothing)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 32), conditioning_channels=channels
    )
    with torch.no_grad():
        for name, param in net.named_parameters():
            if (
                "controlnet_down_blocks" in name
                or "controlnet_mid_block" in name
                or "cond_embedding.conv_out" in name
            ):
                param.normal_(0.0, 0.1)
    return net.eval()
