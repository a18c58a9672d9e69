"""The shipped box-grounded (GLIGEN) shapes model: where it lives and how to load it.

``ait2i_ext/assets/shapes_gligen`` is a ``StableDiffusionGLIGENPipeline`` folder (fp16) trained by
``training/train_gligen.py`` on top of the shipped shapes model: its UNet is the shapes UNet plus
GLIGEN's gated self-attention layers and text-box position net; VAE, text encoder, tokenizer and
scheduler are the shapes model's. It loads with the stock ``from_pretrained`` as well:

    StableDiffusionGLIGENPipeline.from_pretrained(default_gligen_path())
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch


def default_gligen_path() -> str:
    """Folder of the shipped GLIGEN shapes model."""
    return str(resources.files("ait2i_ext") / "assets" / "shapes_gligen")


def gligen_installed() -> bool:
    """Whether the shipped GLIGEN shapes model is present (it is in the wheel and the repository)."""
    return (Path(default_gligen_path()) / "model_index.json").exists()


def load_gligen_pipeline(dtype: torch.dtype | str | None = torch.float32, path: str | None = None):
    """The shipped GLIGEN shapes model as a ``StableDiffusionGLIGENPipeline``.

    Args:
        dtype: ``torch.float32`` (default: runs on any CPU), ``"float16"``, ... (``None``: as stored).
        path: another GLIGEN pipeline folder (default: the shipped one).

    Raises:
        ValueError: the folder cannot be loaded or its UNet is not a GLIGEN (gated) UNet.
    """
    from ..adapters.gligen import load_gligen_pipeline as load

    return load(path or default_gligen_path(), dtype)


__all__ = ["default_gligen_path", "gligen_installed", "load_gligen_pipeline"]
