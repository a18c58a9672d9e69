"""training/train_gligen.py on tiny components: a GLIGEN copy of the base UNet, a few steps that
train only the new layers, an export the stock loader reads, and resuming to the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from ait2i_ext.training import train_gligen
from diffusers import StableDiffusionGLIGENPipeline
from safetensors.torch import load_file

from ait2i_ext.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "pipe"
    tiny_sd_pipeline().save_pretrained(path)
    return path


def _train(base, out, *extra):
    argv = ["--base", str(base), "--output-dir", str(out), "--batch-size", "2", "--warmup-steps", "1", *extra]
    return train_gligen.main(argv)


def _unet(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_gligen_unet_copies_the_base_and_trains_only_its_new_layers(base):
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(base)
    pipe = train_gligen.gligen_pipeline_from(plain)
    assert pipe.unet.config.attention_type == "gated" and pipe.vae is plain.vae
    new = pipe.unet.state_dict()
    for key, value in plain.unet.state_dict().items():
        torch.testing.assert_close(new[key], value)
    layers, gates = train_gligen.trainable_parameters(pipe.unet)
    trained = {id(p) for p in layers + gates}
    names = [n for n, p in pipe.unet.named_parameters() if id(p) in trained]
    assert names and all(n.startswith("position_net.") or ".fuser." in n for n in names)
    assert len(gates) == 2 * sum(".fuser.alpha_attn" in n for n in names)
    assert all(not p.requires_grad for n, p in pipe.unet.named_parameters() if n in plain.unet.state_dict())


def test_training_exports_a_stock_loadable_gligen_pipeline(base, tmp_path):
    export = _train(base, tmp_path / "run", "--steps", "2")
    pipe = StableDiffusionGLIGENPipeline.from_pretrained(export)
    assert pipe.unet.config.attention_type == "gated"
    settings = json.loads((export / "ait2i.json").read_text())
    assert settings == {"loss": {"aggregation_radius": 2.5, "alignment_radius": 3.0}}
    weights, original = _unet(export), _unet(base)
    assert {v.dtype for v in weights.values()} == {torch.float16}
    for key, value in original.items():  # the base stays frozen (stored in fp16)
        torch.testing.assert_close(weights[key].float(), value.half().float())
    gates = [v for k, v in weights.items() if k.endswith("alpha_attn")]
    assert gates and all(g.abs() > 0 for g in gates)  # the gates left 0: the grounding is open


def test_resume_gives_the_same_weights(base, tmp_path):
    straight = _train(base, tmp_path / "a", "--steps", "3")
    # --max-minutes 0 stops after the first step with a checkpoint; --resume latest finishes the run.
    stopped = _train(base, tmp_path / "b", "--steps", "3", "--max-minutes", "0")
    assert not stopped.exists() and [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == [
        "checkpoint-1"
    ]
    resumed = _train(base, tmp_path / "b", "--steps", "3", "--resume", "latest")
    a, b = _unet(straight), _unet(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "argv, message", [(["--steps", "0"], "--steps 0"), (["--gate-lr", "-1"], "--gate-lr -1.0")]
)
def test_bad_arguments_fail_before_any_work(base, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        _train(base, tmp_path / "run", *argv)
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        train_gligen.parse_args(["--base", str(tmp_path)])
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
