"""Guidance modes end to end on the tiny pipeline: each runs, ``truncated`` equals ``full``, the default
equals a straightforward hand-written loop, and the approximate ``lagged`` mode lowers the loss and
leaves the UNet as it found it."""

import contextlib

import numpy as np
import pytest
import torch
from conftest import sharpen_attention

from ait2i_ext import AIT2IConfig, LossConfig, ScheduleConfig, generate, resolve_groups
from ait2i_ext.capture import StopForward, capture_attention
from ait2i_ext.fast import LaggedGuide, frozen_parameters
from ait2i_ext.guidance import PromptTarget, batch_losses
from ait2i_ext.tokens import eot_index

PROMPT, SUBJECTS = "a red circle and a blue square", ["red circle", "blue square"]
STRONG = ScheduleConfig(step_scale=100.0)
OBSERVE = ScheduleConfig(step_scale=0.0)
# Fixed radii: the library default's (calibrated) are read from a random UNet's first, near-uniform
# maps and held; these tests compare the modes' mechanics, which the radii do not change.
FIXED = LossConfig(radius_mode="fixed")


def _run(pipe, mode="full", schedule=STRONG, seed=0, **kw):
    kw = {"num_inference_steps": 6, "output_type": "np", **kw}
    config = AIT2IConfig(loss=FIXED, mode=mode, schedule=schedule)
    return generate(
        pipe, PROMPT, SUBJECTS, config=config, generator=torch.Generator().manual_seed(seed), **kw
    )


@pytest.mark.parametrize("mode", ["full", "truncated", "lagged"])
def test_each_mode_runs(tiny_sd, mode):
    out = _run(tiny_sd, mode, num_inference_steps=4, return_maps=True)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    assert set(out.group_maps(0)) == {"circle", "square"}
    assert [r.step for r in out.steps] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r.losses["total"])) for r in out.steps)


def test_truncated_images_equal_full(tiny_sd):
    pipe = sharpen_attention(tiny_sd)
    full, fast = _run(pipe, "full"), _run(pipe, "truncated")
    assert torch.allclose(torch.from_numpy(fast.images), torch.from_numpy(full.images), atol=1e-5)
    assert fast.loss_curve() == pytest.approx(full.loss_curve(), abs=1e-5)


def _straightforward(pipe, schedule: ScheduleConfig, steps: int, seed: int):
    """The reference schedule written out by hand: before each guided step, one conditional UNet
    pass under capture, the losses, their gradient, the step; then the stock CFG step."""
    config = AIT2IConfig(loss=FIXED, schedule=schedule)
    target = PromptTarget(
        resolve_groups(pipe.tokenizer, PROMPT, SUBJECTS), eot_index(pipe.tokenizer, PROMPT), 1
    )
    cond, uncond = pipe.encode_prompt([PROMPT], "cpu", 1, True)
    pipe.scheduler.set_timesteps(steps)
    latents = pipe.prepare_latents(1, 4, 64, 64, cond.dtype, "cpu", torch.Generator().manual_seed(seed))
    sizes = schedule.step_sizes(steps)
    for i, t in enumerate(pipe.scheduler.timesteps):
        if i < schedule.num_guided_steps(steps):
            z = latents.detach().requires_grad_(True)
            with torch.enable_grad(), capture_attention(pipe.unet, (32, 32)) as store:
                pipe.unet(z, t, encoder_hidden_states=cond)
                loss = batch_losses(store.maps(), [target], config).total.sum()
                (grad,) = torch.autograd.grad(loss, z)
            latents = (z - sizes[i] * grad).detach()
        with torch.no_grad():
            noise = pipe.unet(
                torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])
            ).sample
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + 7.5 * (noise_cond - noise_uncond)
            latents = pipe.scheduler.step(noise, t, latents).prev_sample
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


def test_default_mode_equals_the_straightforward_loop(tiny_sd):
    pipe = sharpen_attention(tiny_sd)
    assert AIT2IConfig().mode in ("full", "truncated")  # exact modes only as the default
    out = _run(pipe, AIT2IConfig().mode, seed=2)
    ref = _straightforward(pipe, STRONG, steps=6, seed=2)
    assert torch.allclose(torch.from_numpy(out.images), torch.from_numpy(ref), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_lagged_lowers_the_loss(tiny_sd, seed):
    pipe = sharpen_attention(tiny_sd)
    observed = _run(pipe, "lagged", OBSERVE, seed)
    guided = _run(pipe, "lagged", STRONG, seed)
    # the losses are read before each step's update, so step 0 is the same; later steps are lower
    assert guided.loss_curve()[0] == pytest.approx(observed.loss_curve()[0])
    assert sum(guided.loss_curve()) < sum(observed.loss_curve())


def test_lagged_reads_the_same_losses_as_full_and_adds_no_unet_call(tiny_sd):
    pipe = sharpen_attention(tiny_sd)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        lagged = _run(pipe, "lagged", OBSERVE)
        assert len(calls) == 6  # one CFG pass per step, nothing else
        calls.clear()
        full = _run(pipe, "full", OBSERVE)
        assert len(calls) == 6 + 3  # plus one conditional pass per guided step
    finally:
        hook.remove()
    assert lagged.loss_curve() == pytest.approx(full.loss_curve(), abs=1e-5)
    assert abs(lagged.images - full.images).max() < 1e-5  # no step taken: the same images


def test_lagged_split_matches_batched(tiny_sd, monkeypatch):
    pipe = sharpen_attention(tiny_sd)
    batched = _run(pipe, "lagged")
    monkeypatch.setattr(LaggedGuide, "split_cfg", True)
    split = _run(pipe, "lagged")
    assert split.loss_curve() == pytest.approx(batched.loss_curve(), abs=1e-4)
    assert abs(split.images - batched.images).max() < 1e-3


def test_lagged_without_cfg_and_with_several_images(tiny_sd):
    out = _run(
        sharpen_attention(tiny_sd),
        "lagged",
        guidance_scale=1.0,
        num_images_per_prompt=2,
        num_inference_steps=4,
    )
    assert out.images.shape == (2, 64, 64, 3) and len(out.steps) == 2


def _unet_state(unet):
    return (
        dict(unet.attn_processors),
        len(unet._forward_hooks) + len(unet._forward_pre_hooks),
        all(p.requires_grad for p in unet.parameters()),
    )


def test_lagged_restores_the_unet_also_on_error(tiny_sd):
    before = _unet_state(tiny_sd.unet)
    _run(tiny_sd, "lagged", num_inference_steps=4)
    assert _unet_state(tiny_sd.unet) == before and torch.is_grad_enabled()

    def fail(pipe, i, t, tensors):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(tiny_sd, "lagged", num_inference_steps=4, callback_on_step_end=fail)
    assert _unet_state(tiny_sd.unet) == before and torch.is_grad_enabled()


def test_lagged_rejects_refinement(tiny_sd):
    with pytest.raises(ValueError, match="mode='lagged' does not support refinement"):
        _run(tiny_sd, "lagged", ScheduleConfig(refinement=True))


def test_frozen_parameters_restores_and_prunes_nothing_needed(tiny_sd):
    unet = tiny_sd.unet
    unet.conv_in.weight.requires_grad_(False)  # a parameter frozen by the user stays frozen
    z = torch.randn(1, 4, 32, 32, requires_grad=True)
    cond = torch.randn(1, 77, 32)
    grads = []
    for frozen in (False, True):
        freeze = frozen_parameters(unet) if frozen else contextlib.nullcontext()
        with torch.enable_grad(), freeze, capture_attention(unet, (32, 32), stop_early=True) as store:
            with pytest.raises(StopForward):
                unet(z, 10, encoder_hidden_states=cond)
            grads.append(torch.autograd.grad(store.maps()[..., 2].square().sum(), z)[0])
    assert torch.allclose(grads[0], grads[1])
    assert not unet.conv_in.weight.requires_grad
    assert all(p.requires_grad for name, p in unet.named_parameters() if name != "conv_in.weight")


def test_lagged_with_an_euler_scheduler(tiny_sd):
    from diffusers import EulerDiscreteScheduler

    tiny_sd.scheduler = EulerDiscreteScheduler.from_config(tiny_sd.scheduler.config)
    pipe = sharpen_attention(tiny_sd)
    observed, guided = _run(pipe, "lagged", OBSERVE), _run(pipe, "lagged", STRONG)
    assert sum(guided.loss_curve()) < sum(observed.loss_curve())


def _controlnet_pipeline():
    from diffusers import StableDiffusionControlNetPipeline

    from ait2i_ext.testing import tiny_controlnet, tiny_sd_pipeline

    base = tiny_sd_pipeline()
    keys = StableDiffusionControlNetPipeline._get_signature_keys(StableDiffusionControlNetPipeline)[0]
    components = {k: v for k, v in base.components.items() if k in keys}
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=tiny_controlnet(base.unet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("family", ["gligen", "controlnet"])
def test_lagged_on_layout_pipelines(family, split, monkeypatch):
    from PIL import Image

    from ait2i_ext import Subject
    from ait2i_ext.testing import tiny_gligen_pipeline

    monkeypatch.setattr(LaggedGuide, "split_cfg", split)
    subjects = [Subject("circle", box=(0.0, 0.0, 0.5, 1.0)), Subject("square", box=(0.5, 0.0, 1.0, 1.0))]
    if family == "gligen":
        pipe, extra = tiny_gligen_pipeline(), {}
    else:
        pipe, extra = _controlnet_pipeline(), {"image": Image.new("RGB", (64, 64), (255, 255, 255))}
    out = generate(
        pipe,
        PROMPT,
        subjects,
        config=AIT2IConfig(loss=FIXED, mode="lagged", schedule=STRONG),
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **extra,
    )
    assert np.isfinite(out.images).all() and [r.step for r in out.steps] == [0, 1]


def test_down_map_blocks_truncated_equals_full_and_weights_stay_trainable(tiny_sd):
    pipe = sharpen_attention(tiny_sd)
    runs = []
    for mode in ("full", "truncated"):
        config = AIT2IConfig(mode=mode, schedule=STRONG, map_blocks="down")
        runs.append(
            generate(
                pipe,
                PROMPT,
                SUBJECTS,
                config=config,
                generator=torch.Generator().manual_seed(0),
                num_inference_steps=6,
                output_type="np",
            )
        )
    assert torch.allclose(torch.from_numpy(runs[0].images), torch.from_numpy(runs[1].images), atol=1e-5)
    assert runs[0].loss_curve() == pytest.approx(runs[1].loss_curve(), abs=1e-5)
    default = _run(pipe, "truncated")
    assert runs[1].loss_curve() != pytest.approx(default.loss_curve(), abs=1e-6)  # other maps are read
    # the guided pass freezes the weights only while it runs
    assert all(p.requires_grad for p in pipe.unet.parameters())
    with pytest.raises(ValueError, match="map_blocks='mid' is invalid"):
        AIT2IConfig(map_blocks="mid")
