"""Architecture of the shapes-world text-to-image model and where its shipped weights live.

The model is a standard diffusers ``StableDiffusionPipeline``: 64 px images, a small ``AutoencoderKL``
that downsamples by 4 (16x16x4 latents), a ``UNet2DConditionModel`` with cross-attention at 16x16,
8x8 and 4x4, and a 3-layer ``CLIPTextModel`` on the real CLIP vocabulary, trained from scratch by
``training/train_shapes.py``. The UNet predicts ``v`` (``prediction_type="v_prediction"``).
"""

from __future__ import annotations

from importlib import resources

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ..config import LossConfig, ScheduleConfig
from ..testing import BOS_ID, CLIP_VOCAB_SIZE, EOS_ID, load_clip_tokenizer

TEXT_HIDDEN = 64
LATENT_CHANNELS = 4

#: The loss geometry for this model. Its objects are 14-28 px of 64, i.e. 3.5-7 cells of the 16x16
#: maps, so the aggregation / alignment radii are about an object's radius (2.5 / 3 cells), as the
#: reference 5 / 6 are for Stable Diffusion subjects spanning about half of a 512 px image. With the
#: reference radii a ball covers a whole object and its neighbour, and aggregation pulls the two
#: together (measured in docs/shapes.md). ``training/train_shapes.py`` writes it into the model
#: folder's ``ait2i.json``, which ``generate``, the CLI and the benchmarks read. ``w_split`` = 2: the
#: split term against one subject drawn twice (docs/method.md, One subject drawn twice).
SHAPES_LOSS = LossConfig(radius_mode="fixed", aggregation_radius=2.5, alignment_radius=3.0, w_split=2.0)
#: The schedule for this model at its 25 steps: 5 guided steps at step scale 40 instead of the
#: authors' 12 at 20, as good on the held-out split at ~1.3x instead of ~1.75x plain time
#: (docs/performance.md). Written into ``ait2i.json`` with the radii.
SHAPES_SCHEDULE = ScheduleConfig(guided_fraction=0.2, step_scale=40.0)


def default_model_path() -> str:
    """Folder of the shipped shapes model (a ``StableDiffusionPipeline`` saved with ``save_pretrained``)."""
    return str(resources.files("ait2i_ext") / "assets" / "shapes_model")


def default_controlnet_path() -> str:
    """Folder of the shipped Canny ControlNet for the shapes model (a ``ControlNetModel`` folder,
    trained by ``training/train_controlnet.py``)."""
    return str(resources.files("ait2i_ext") / "assets" / "shapes_controlnet")


def load_controlnet_pipeline(dtype: torch.dtype | str | None = torch.float32):
    """The shipped shapes model with its shipped Canny ControlNet: a ``StableDiffusionControlNetPipeline``.

    Its control image is an edge map of a 64 px scene, e.g. :func:`scene_edges` of the objects to draw.
    """
    from ..adapters.controlnet import load_controlnet_pipeline as load

    return load(default_model_path(), default_controlnet_path(), dtype)


def scene_edges(objects, size: int = 64):
    """The control image of a layout: the built-in Canny edges of ``objects`` drawn at their boxes.

    Args:
        objects: a ``Scene`` or its objects (anything with ``colour``, ``shape`` and ``box``, e.g.
            the ``PromptObject`` s of a benchmark prompt).
        size: side of the square image in pixels.

    Returns:
        An RGB PIL image, white edges on black, as ``--control canny:scene.png`` makes of the
        rendered scene.
    """
    from ..adapters.controlnet import canny_edges
    from .data import Scene, ShapeObject, render_scene

    objects = getattr(objects, "objects", objects)
    if any(getattr(o, "box", None) is None for o in objects):
        raise ValueError("scene_edges needs a box for every object: expected (x0, y0, x1, y1) boxes")
    scene = Scene(tuple(ShapeObject(o.colour, o.shape, tuple(o.box)) for o in objects), caption="")
    return canny_edges(render_scene(scene, size))


def text_encoder_config() -> CLIPTextConfig:
    """A 3-layer, 64-wide CLIP text encoder on the 49408-token CLIP vocabulary."""
    return CLIPTextConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_HIDDEN * 4,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
    )


def vae_config() -> dict:
    """``AutoencoderKL``: 64x64x3 images <-> 16x16x4 latents (two downsamplings)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
    )


def unet_config() -> dict:
    """``UNet2DConditionModel`` on 16x16 latents with cross-attention at 16x16, 8x8 and 4x4."""
    return dict(
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 96, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,  # the number of heads, despite the name
        norm_num_groups=16,
    )


def scheduler_config() -> dict:
    """Stable Diffusion's noise schedule; the model predicts ``v``."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_shapes_pipeline(seed: int = 0, vae_scaling_factor: float = 1.0):
    """A randomly initialised shapes-world ``StableDiffusionPipeline`` (the training starting point).

    Args:
        seed: seed of the initial weights.
        vae_scaling_factor: the latent scale stored in the VAE config (set after the VAE is trained).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(), scaling_factor=vae_scaling_factor)
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(text_encoder_config())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe
