"""training/train_controlnet.py on a tiny base: it trains only the ControlNet, exports a stock
``ControlNetModel`` folder in fp16 whose downsampling matches the base, and resumes exactly."""

import json

import pytest
import torch
from ait2i_ext.adapters.controlnet import check_downsampling
from ait2i_ext.training.train_controlnet import (
    conditioning_channels,
    control_rate,
    load_controlnet_weights,
    main,
    parse_args,
)
from diffusers import ControlNetModel
from safetensors.torch import load_file

from ait2i_ext.shapes import render_scene, sample_scene
from ait2i_ext.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_sd_pipeline().save_pretrained(path)
    return path


def run(base_dir, out, steps: int, *extra: str):
    argv = ["--base", str(base_dir), "--output-dir", str(out), "--steps", str(steps), "--batch-size", "2"]
    argv += ["--eval-every", "2", "--eval-scenes", "1", "--eval-steps", "2", "--warmup-steps", "1"]
    return main([*argv, *extra])


def test_conditioning_channels_match_the_vae():
    assert conditioning_channels(4) == (16, 32, 64)  # the shapes model: 64 px -> 16x16
    assert len(conditioning_channels(8)) == 4  # Stable Diffusion's 8x VAE
    with pytest.raises(ValueError, match="vae_scale_factor=3"):
        conditioning_channels(3)


def test_trains_exports_and_resumes_to_the_same_weights(base_dir, tmp_path):
    export = run(base_dir, tmp_path / "a", 3)
    stored = load_file(export / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    straight = ControlNetModel.from_pretrained(export)
    check_downsampling(straight, tiny_sd_pipeline().vae_scale_factor)
    zero_convs = [p for n, p in straight.named_parameters() if n.startswith("controlnet_down_blocks")]
    assert any(p.abs().sum() > 0 for p in zero_convs)  # they start at 0: the ControlNet trained
    run(base_dir, tmp_path / "b", 2)
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "b" / "controlnet-latest.tmp").exists()
    resumed = ControlNetModel.from_pretrained(run(base_dir, tmp_path / "b", 3, "--resume", "latest"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_init_from_starts_from_the_folder_and_continues_its_scenes(base_dir, tmp_path, monkeypatch):
    from ait2i_ext.training import train_controlnet

    first = run(base_dir, tmp_path / "a", 2)
    seeds = []
    example = train_controlnet.training_example
    monkeypatch.setattr(
        train_controlnet, "training_example", lambda seed, drop: seeds.append(seed) or example(seed, drop)
    )
    # One step at a negligible learning rate: the export is the folder's ControlNet (fp16 -> fp32 -> fp16)
    export = run(base_dir, tmp_path / "b", 1, "--lr", "1e-12", "--init-from", str(first), "--init-step", "2")
    folder, continued = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (first, export))
    assert folder.keys() == continued.keys()
    for key, value in folder.items():
        torch.testing.assert_close(continued[key], value, rtol=0, atol=0, msg=key)
    # the folder trained steps 0-1 on scenes 0-3 (batch 2): this run's first step draws scenes 4-5
    assert seeds == [train_controlnet.TRAIN_SEED_OFFSET + 4, train_controlnet.TRAIN_SEED_OFFSET + 5]
    recorded = json.loads((tmp_path / "b" / "train_args.json").read_text())
    assert recorded["init_from"] == str(first) and recorded["init_step"] == 2


def test_init_from_refuses_what_is_not_a_controlnet_of_the_base(base_dir, tmp_path, capsys):
    from ait2i_ext.training.train_controlnet import build_controlnet
    from diffusers import StableDiffusionPipeline

    from ait2i_ext.testing import tiny_unet_config

    with pytest.raises(SystemExit):
        parse_args(["--base", str(base_dir), "--init-from", str(base_dir)])
    assert (
        "is not a ControlNet folder: expected a config.json naming ControlNetModel" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        parse_args(["--base", str(base_dir), "--init-from", str(base_dir / "unet")])
    assert "found 'UNet2DConditionModel'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--base", str(base_dir), "--init-step", "5"])
    assert "--init-step 5 needs --init-from" in capsys.readouterr().err
    base = StableDiffusionPipeline.from_pretrained(base_dir)
    wider = ControlNetModel.from_unet(
        type(base.unet)(**tiny_unet_config(cross_attention_dim=16)),
        conditioning_embedding_out_channels=(16, 32),
    )
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match="does not fit the ControlNet of --base"):
        load_controlnet_weights(build_controlnet(base.unet, base.vae_scale_factor), tmp_path / "wider")


def test_control_rate_reads_shape_and_place():
    scenes = [sample_scene(k) for k in range(3)]
    assert control_rate([render_scene(s) for s in scenes], scenes) == 1.0
    assert control_rate([render_scene(s) for s in scenes[1:] + scenes[:1]], scenes) < 0.5


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--steps", "0"], "--steps 0"),
        (["--lr", "-1"], "--lr -1"),
        (["--base", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_arguments_fail_before_training(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path / "o"), *argv])
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
