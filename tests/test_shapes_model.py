"""The shapes-world model: its architecture, the shipped weights, and a training smoke run."""

import os

import pytest
import torch

from ait2i_ext.shapes.model import build_shapes_pipeline, default_model_path

SHIPPED = os.path.isfile(os.path.join(default_model_path(), "model_index.json"))
needs_shipped = pytest.mark.skipif(
    not SHIPPED, reason="the shipped weights (ait2i_ext/assets/shapes_model) are not trained yet"
)


def _cross_attention_resolutions(pipe, height: int = 64) -> set[int]:
    """Side lengths of the maps every cross-attention layer sees, found with forward hooks."""
    seen = set()
    hooks = [
        module.register_forward_hook(
            lambda m, args, kwargs, out: seen.add(int(args[0].shape[1] ** 0.5)), with_kwargs=True
        )
        for name, module in pipe.unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        latent = height // pipe.vae_scale_factor
        with torch.no_grad():
            pipe.unet(
                torch.randn(1, 4, latent, latent),
                10,
                torch.randn(1, 77, pipe.text_encoder.config.hidden_size),
            )
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_architecture_has_16x16_cross_attention():
    pipe = build_shapes_pipeline()
    assert pipe.vae_scale_factor == 4
    assert _cross_attention_resolutions(pipe) == {16, 8, 4}
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


@pytest.mark.skipif(
    not SHIPPED, reason="the shipped weights (ait2i_ext/assets/shapes_model) are not trained yet"
)
def test_shipped_model_loads_and_samples():
    from diffusers import StableDiffusionAttendAndExcitePipeline, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle and a blue square", num_inference_steps=4, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    ae = StableDiffusionAttendAndExcitePipeline.from_pretrained(default_model_path(), safety_checker=None)
    assert ae.vae_scale_factor == 4
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(default_model_path()) for f in fs)
    assert total < 30e6


def test_training_smoke_run(tmp_path, capfd):
    from diffusers import StableDiffusionPipeline

    from ait2i_ext.config import read_model_settings

    try:
        from ait2i_ext.training.train_shapes import main
    except ImportError:  # not installed: run from the repository root
        from training.train_shapes import main

    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--vae-steps", "2", "--unet-steps", "2", "--batch-size", "2"]
    argv += ["--vae-batch-size", "2", "--scale-samples", "4", "--warmup-steps", "1"]
    export = main(argv)
    assert (out / "checkpoints").is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(str(export), safety_checker=None)
    assert pipe.vae.config.scaling_factor != 1.0
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # The model's ait2i settings travel with it (radii sized to its objects, its schedule), as shipped.
    assert read_model_settings(export) == read_model_settings(default_model_path())
    # Resuming a finished run changes nothing and exports again.
    assert main([*argv, "--resume", "latest"]) == export
    # In-process training prints none of accelerate's launch notes (issue 12).
    assert "num_processes" not in "".join(capfd.readouterr())


@needs_shipped
def test_evaluator_reads_shipped_vae_reconstructions():
    import numpy as np
    from diffusers import AutoencoderKL

    from ait2i_ext.shapes.data import image_to_tensor, render_scene, sample_scene
    from ait2i_ext.shapes.evaluator import evaluate

    vae = AutoencoderKL.from_pretrained(default_model_path(), subfolder="vae").eval()
    scenes = [sample_scene(seed, allow_held_out=True) for seed in range(900_000, 900_064)]
    pixels = torch.stack([image_to_tensor(render_scene(s)) for s in scenes])
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        assert torch.allclose(posterior.sample(), posterior.mean, atol=1e-3)  # deterministic
        decoded = vae.decode(posterior.mean).sample.clamp(-1, 1)
    images = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.mean([evaluate(im, s.objects).correct for im, s in zip(images, scenes, strict=True)]) >= 0.95


def test_training_refuses_a_bad_object_mix_before_training(tmp_path, capsys):
    from ait2i_ext.training.train_shapes import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path / "run"), "--object-weights", "0", "0", "0"])
    assert exit_info.value.code == 2
    assert "--object-weights: object_weights=(0.0, 0.0, 0.0) is invalid" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_shipped_controlnet_loads_and_follows_the_edges():
    """The shipped Canny ControlNet loads with the stock loader, matches the 4x VAE and puts the
    shapes of a scene where its edges are (four scenes, 20 steps, no ait2i guidance)."""
    import numpy as np
    from ait2i_ext.adapters.controlnet import canny_edges
    from ait2i_ext.training.train_controlnet import control_rate
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from ait2i_ext.shapes import (
        PromptObject,
        default_controlnet_path,
        load_controlnet_pipeline,
        render_scene,
        sample_scene,
        scene_edges,
    )

    net = ControlNetModel.from_pretrained(default_controlnet_path())
    assert net.config.conditioning_embedding_out_channels == [16, 32, 64]
    pipe = load_controlnet_pipeline()
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    scenes = [sample_scene(seed, num_objects=1) for seed in range(50_000_000, 50_000_004)]
    assert np.array_equal(
        np.asarray(scene_edges(scenes[0])), np.asarray(canny_edges(render_scene(scenes[0])))
    )
    with pytest.raises(ValueError, match="needs a box"):
        scene_edges([PromptObject("red", "circle")])
    images = pipe(
        [s.caption for s in scenes],
        image=[scene_edges(s) for s in scenes],
        num_inference_steps=20,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert control_rate(images, scenes) >= 0.5  # near the start of training: 0.04-0.08
