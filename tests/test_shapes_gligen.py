"""The shipped GLIGEN shapes model: it loads with the stock loader and with ours, shares the shapes
model's VAE, text encoder and tokenizer, and carries its loss radii."""

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionGLIGENPipeline

from ait2i_ext.shapes import default_gligen_path, default_model_path, load_gligen_pipeline

SHARED = ("vae", "text_encoder", "tokenizer", "scheduler")


def test_stock_from_pretrained_loads_the_shipped_gligen():
    pipe = StableDiffusionGLIGENPipeline.from_pretrained(default_gligen_path())
    assert pipe.unet.config.attention_type == "gated" and pipe.unet.config.sample_size == 16


def test_loader_gives_a_float32_gligen_pipeline_with_trained_gates():
    pipe = load_gligen_pipeline()
    assert isinstance(pipe, StableDiffusionGLIGENPipeline) and pipe.unet.dtype == torch.float32
    gates = [p for n, p in pipe.unet.named_parameters() if n.endswith("alpha_attn")]
    assert gates and all(g != 0 for g in gates) and max(g.abs() for g in gates) > 0.05  # trained from 0


def test_shipped_gligen_shares_the_shapes_models_other_components():
    gligen, base = Path(default_gligen_path()), Path(default_model_path())
    for name in SHARED:
        files = sorted(p.relative_to(gligen / name) for p in (gligen / name).rglob("*") if p.is_file())
        assert files, name
        for f in files:
            assert (gligen / name / f).read_bytes() == (base / name / f).read_bytes(), f"{name}/{f}"
    settings = json.loads((gligen / "ait2i.json").read_text())
    assert settings["loss"] == {"radius_mode": "fixed", "aggregation_radius": 2.5, "alignment_radius": 3.0}
