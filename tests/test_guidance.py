import pytest
import torch
from conftest import sharpen_attention

from ait2i_ext import AIT2IConfig, ScheduleConfig, generate

PROMPT = "a red circle and a blue square"
STRONG = AIT2IConfig(schedule=ScheduleConfig(step_scale=100.0))
OBSERVE = AIT2IConfig(schedule=ScheduleConfig(step_scale=0.0))  # same losses recorded, no update


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _run(pipe, config=None, seed=0, **kw):
    kw = {"num_inference_steps": 6, "output_type": "np", **kw}
    return generate(pipe, PROMPT, config=config, generator=_gen(seed), **kw)


@pytest.mark.parametrize("return_maps", [False, True])
def test_guidance_off_is_bit_identical_to_the_stock_pipeline(tiny_sd, return_maps):
    ref = tiny_sd(PROMPT, num_inference_steps=6, output_type="np", generator=_gen()).images
    out = _run(tiny_sd, guidance=False, return_maps=return_maps)
    assert (out.images == ref).all()
    assert out.steps == ()
    assert (out.maps is not None) == return_maps


def test_zero_step_size_leaves_the_images_unchanged(tiny_sd):
    ref = tiny_sd(PROMPT, num_inference_steps=6, output_type="np", generator=_gen()).images
    out = _run(tiny_sd, OBSERVE)
    assert abs(out.images - ref).max() < 1e-5
    assert [r.step for r in out.steps] == [0, 1, 2]  # the first half of 6 steps, step 0 included


@pytest.mark.parametrize("seed", [0, 1])
def test_guided_loss_is_lower_than_unguided_sd(tiny_sd, seed):
    pipe = sharpen_attention(tiny_sd)
    plain = sum(_run(pipe, OBSERVE, seed).loss_curve())
    guided = sum(_run(pipe, STRONG, seed).loss_curve())
    assert guided < plain


def test_guided_loss_is_lower_than_unguided_sdxl(tiny_sdxl):
    pipe = sharpen_attention(tiny_sdxl)
    plain = sum(_run(pipe, OBSERVE, height=64, width=64, num_inference_steps=10).loss_curve())
    guided = sum(_run(pipe, STRONG, height=64, width=64, num_inference_steps=10).loss_curve())
    assert guided < plain


def test_step_zero_is_guided(tiny_sd):
    pipe = sharpen_attention(tiny_sd)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    _run(pipe, STRONG, num_inference_steps=2)
    hook.remove()
    plain_first = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: plain_first.append(args[0].detach().clone()))
    _run(pipe, guidance=False, num_inference_steps=2)
    hook.remove()
    # the sampling pass of step 0 (the first CFG batch of 2) sees guided latents
    first_sampling = next(x for x in seen if x.shape[0] == 2)
    assert not torch.allclose(first_sampling, plain_first[0])


def test_batch_images_per_prompt_negative_prompt_and_reproducible(tiny_sd):
    prompts = [PROMPT, "a cat and a dog"]
    kw = dict(
        num_images_per_prompt=2, negative_prompt=["blurry", "blurry"], num_inference_steps=4, output_type="np"
    )
    a = generate(tiny_sd, prompts, generator=_gen(3), return_maps=True, **kw)
    b = generate(tiny_sd, prompts, generator=_gen(3), **kw)
    assert a.images.shape == (4, 64, 64, 3)
    assert (a.images == b.images).all()
    assert [g.name for g in a.groups[1]] == ["cat", "dog"]
    maps = a.group_maps(3)
    assert set(maps) == {"cat", "dog"} and maps["cat"].shape == (16, 16)


@pytest.mark.parametrize(
    "scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"]
)
def test_any_scheduler(tiny_sd, scheduler):
    import diffusers

    tiny_sd.scheduler = getattr(diffusers, scheduler).from_config(tiny_sd.scheduler.config)
    out = _run(sharpen_attention(tiny_sd), STRONG, num_inference_steps=4)
    assert out.images.shape == (1, 64, 64, 3)
    assert len(out.steps) == len(tiny_sd.scheduler.timesteps) // 2  # PNDM's PRK warm-up adds steps
    assert all(torch.isfinite(torch.tensor(r.losses["total"])) for r in out.steps)


def test_refinement_option_runs_extra_iterations(tiny_sd):
    cfg = AIT2IConfig(
        schedule=ScheduleConfig(refinement=True, refinement_thresholds=((0, 0.99),), max_refinement_iters=3)
    )
    out = _run(tiny_sd, cfg, num_inference_steps=4)
    assert out.steps[0].iterations == 3 and out.steps[1].iterations == 1


def test_user_callback_still_runs_and_sees_guided_latents(tiny_sd):
    steps = []

    def callback(pipe, i, t, tensors):
        steps.append(i)
        return tensors

    _run(tiny_sd, num_inference_steps=4, callback_on_step_end=callback)
    assert steps == [0, 1, 2, 3]


def test_truncated_mode_matches_full(tiny_sd):
    pipe = sharpen_attention(tiny_sd)
    full = _run(pipe, AIT2IConfig(schedule=STRONG.schedule, mode="full"))
    fast = _run(pipe, AIT2IConfig(schedule=STRONG.schedule, mode="truncated"))
    assert abs(full.images - fast.images).max() < 1e-4


def test_bad_inputs(tiny_sd):
    with pytest.raises(ValueError, match="prompt_embeds= is not supported"):
        generate(tiny_sd, PROMPT, prompt_embeds=torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        generate(tiny_sd, PROMPT, subjects=["dog"])
    with pytest.raises(ValueError, match=r"prompt=\[\] is invalid"):
        generate(tiny_sd, [])
    with pytest.raises(ValueError, match="pipeline object is not supported"):
        generate(object(), PROMPT)
    with pytest.raises(ValueError, match=r"mode='fastest' is invalid"):
        AIT2IConfig(mode="fastest")
