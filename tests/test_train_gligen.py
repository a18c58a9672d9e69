"""training/train_gligen.py on tiny components: a GLIGEN copy of the base UNet, a few steps that
train only the new layers, an export the stock loader reads, and resuming to the same weights."""

from __future__ import annotations

import json
import shutil

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
    assert settings == {"loss": {"radius_mode": "fixed", "aggregation_radius": 2.5, "alignment_radius": 3.0}}
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


def _gligen(base):
    from diffusers import StableDiffusionPipeline

    return train_gligen.gligen_pipeline_from(StableDiffusionPipeline.from_pretrained(base))


def _grounding(pipe, layouts):
    return {"gligen": train_gligen.grounding_inputs(pipe, layouts, "cpu")}


LAYOUT = [(["red circle", "blue square"], [(0.05, 0.05, 0.45, 0.45), (0.55, 0.5, 0.95, 0.9)])]


def test_open_gates_start_equal_to_the_base_and_give_the_fusers_gradients(base):
    pipe = _gligen(base)
    unet = pipe.unet
    sample = torch.randn(
        1, 4, unet.config.sample_size, unet.config.sample_size, generator=torch.Generator().manual_seed(0)
    )
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    kwargs = {"cross_attention_kwargs": _grounding(pipe, LAYOUT)}
    with torch.no_grad():
        closed = unet(sample, 900, context, **kwargs).sample
    fusers = train_gligen.open_gates(unet, 1.0)
    assert fusers > 0
    gates = [p for n, p in unet.named_parameters() if n.endswith(("alpha_attn", "alpha_dense"))]
    assert len(gates) == 2 * fusers and all(g.item() == 1.0 for g in gates)
    opened = unet(sample, 900, context, **kwargs).sample
    torch.testing.assert_close(opened, closed)  # zero outputs: still the base UNet's prediction
    train_gligen.trainable_parameters(unet)
    opened.square().mean().backward()
    outputs = [p for n, p in unet.named_parameters() if ".fuser.attn.to_out.0.weight" in n]
    assert outputs and all(p.grad is not None and p.grad.abs().sum() > 0 for p in outputs)


def test_turned_layouts_turn_every_box_half_a_circle():
    ((phrases, boxes),) = train_gligen.turned_layouts(LAYOUT)
    assert phrases == LAYOUT[0][0]
    torch.testing.assert_close(
        torch.tensor(boxes), torch.tensor([(0.55, 0.55, 0.95, 0.95), (0.05, 0.1, 0.45, 0.5)])
    )


def test_grounding_gap_is_zero_for_a_unet_that_ignores_the_boxes(base):
    pipe = _gligen(base)  # fusers behind closed gates (GLIGEN's init): the boxes change nothing
    gaps = train_gligen.grounding_gap(pipe, pipe.unet, scenes=2, timesteps=(900,))
    ((true, turned),) = gaps.values()
    assert true > 0 and turned == pytest.approx(true, rel=1e-6)
    train_gligen.open_gates(pipe.unet, 1.0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".fuser." in name:
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    ((true, turned),) = train_gligen.grounding_gap(pipe, pipe.unet, scenes=2, timesteps=(900,)).values()
    assert turned != pytest.approx(true, rel=1e-4)  # fusers that read the boxes: the loss moves


def test_bad_object_weights_fail_before_any_work(base, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(base, tmp_path / "run", "--object-weights", "1,2")
    assert "--object-weights" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_box_attention_loss_is_zero_when_every_token_attends_to_its_own_box():
    boxes = torch.zeros(1, 30, 4)
    boxes[0, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # top-left quarter: tokens 0, 1, 4, 5 of a 4x4 grid
    masks = torch.zeros(1, 30)
    masks[0, 0] = 1
    grounding = {"boxes": boxes, "masks": masks}
    heads, visual = 2, 16
    perfect = torch.zeros(heads, visual + 30, visual + 30)
    for token in range(visual):
        inside = token in (0, 1, 4, 5)
        perfect[:, token, visual if inside else token] = 1.0  # own box's object, else itself
    keep = train_gligen.KeepProbs()
    keep.probs = perfect
    assert train_gligen.box_attention_loss([keep], grounding).item() == 0.0
    assert keep.probs is None  # consumed
    keep.probs = torch.full_like(perfect, 1 / (visual + 30))
    assert train_gligen.box_attention_loss([keep], grounding).item() > 0.2  # 4 of 16 tokens at ~1
    keep.probs = perfect
    assert (
        train_gligen.box_attention_loss([keep], {"boxes": boxes, "masks": torch.zeros(1, 30)}).item() == 0.0
    )


def test_keep_probs_computes_what_the_stock_processor_computes(base):
    pipe = _gligen(base)
    train_gligen.open_gates(pipe.unet, 1.0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".fuser." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    unet = pipe.unet
    sample = torch.randn(2, 4, unet.config.sample_size, unet.config.sample_size)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    kwargs = {"cross_attention_kwargs": _grounding(pipe, LAYOUT * 2)}
    with torch.no_grad():
        stock = unet(sample, 700, context, **kwargs).sample
        kept = train_gligen.keep_fuser_probs(unet)
        ours = unet(sample, 700, context, **kwargs).sample
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
    assert kept and all(k.probs is not None and k.probs.shape[0] % 2 == 0 for k in kept)


@pytest.fixture(scope="module")
def gligen_folder(tmp_path_factory):
    """A tiny GLIGEN pipeline folder on the tiny base, its fusers random and its gates open (at 1)."""
    from ait2i_ext.testing import tiny_gligen_pipeline

    path = tmp_path_factory.mktemp("gligen") / "pipe"
    tiny_gligen_pipeline().save_pretrained(path)
    return path


def _grounding_weights(weights):
    return {k: v for k, v in weights.items() if k.startswith("position_net.") or ".fuser." in k}


def test_init_from_starts_the_fusers_and_the_ema_from_the_folder(base, gligen_folder, tmp_path):
    pipe = _gligen(base)
    assert train_gligen.load_grounding(pipe.unet, gligen_folder) == len(
        _grounding_weights(_unet(gligen_folder))
    )
    loaded = pipe.unet.state_dict()
    for key, value in _grounding_weights(_unet(gligen_folder)).items():
        torch.testing.assert_close(loaded[key], value.float(), rtol=0, atol=0)
    # One step at a negligible learning rate: the export (EMA, fp16) is the folder's grounding, the base
    # UNet's weights are --base's own.
    out = tmp_path / "run"
    export = _train(
        base,
        out,
        "--steps",
        "1",
        "--lr",
        "1e-12",
        "--gate-lr",
        "1e-12",
        "--init-from",
        str(gligen_folder),
        "--init-step",
        "7",
    )
    weights, folder = _unet(export), _unet(gligen_folder)
    for key, value in _grounding_weights(folder).items():
        torch.testing.assert_close(weights[key], value.half(), rtol=0, atol=0)
    for key, value in _unet(base).items():
        torch.testing.assert_close(weights[key].float(), value.half().float())
    recorded = json.loads((out / "train_args.json").read_text())
    assert recorded["init_from"] == str(gligen_folder) and recorded["init_step"] == 7


def test_init_from_refuses_what_is_not_a_gligen_folder_of_the_base(base, gligen_folder, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from ait2i_ext.testing import tiny_unet_config

    with pytest.raises(SystemExit):
        train_gligen.parse_args(["--base", str(base), "--init-from", str(base)])
    assert "is not a GLIGEN pipeline folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_gligen.parse_args(["--base", str(base), "--init-from", str(gligen_folder), "--gate-init", "1"])
    assert "--gate-init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_gligen.parse_args(["--base", str(base), "--init-step", "5"])
    assert "--init-step 5 needs --init-from" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(gligen_folder, other)
    wider = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=16), attention_type="gated")
    wider.save_pretrained(other / "unet")
    with pytest.raises(ValueError, match="does not fit the GLIGEN UNet of --base"):
        train_gligen.load_grounding(_gligen(base).unet, other)
