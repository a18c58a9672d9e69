"""Pipeline adapters: one small module per pipeline family. ``adapter_for(pipe)`` picks one."""

from __future__ import annotations

from .controlnet import ControlNetAdapter, ControlNetXLAdapter
from .gligen import GLIGENAdapter
from .stable_diffusion import StableDiffusionAdapter, StableDiffusionXLAdapter

# Class name -> adapter, most specific first. Other adapter modules register themselves here.
ADAPTERS: dict[str, type] = {
    "StableDiffusionXLPipeline": StableDiffusionXLAdapter,
    "StableDiffusionPipeline": StableDiffusionAdapter,
    "StableDiffusionGLIGENPipeline": GLIGENAdapter,
    "StableDiffusionControlNetPipeline": ControlNetAdapter,
    "StableDiffusionXLControlNetPipeline": ControlNetXLAdapter,
}


def adapter_for(pipe):
    """The adapter for ``pipe``'s class (or its nearest registered base class)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](pipe)
    raise ValueError(
        f"pipeline {type(pipe).__name__} is not supported: expected one of {sorted(ADAPTERS)} (or a subclass)"
    )


__all__ = ["ADAPTERS", "StableDiffusionAdapter", "StableDiffusionXLAdapter", "adapter_for"]
