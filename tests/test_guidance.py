import dataclasses

import numpy as np
import pytest
import torch
from ait2i_ext.adapters import StableDiffusionAdapter
from conftest import sharpen_attention

from ait2i_ext import AIT2IConfig, LossConfig, ScheduleConfig, generate
from ait2i_ext.config import model_config, model_loss, write_model_settings
from ait2i_ext.guidance import guidance_step, norm_preserving_step
from ait2i_ext.pipeline import _input_scale, resolve_targets

PROMPT = "a red circle and a blue square"
# Fixed radii: the held radii of the library default (calibrated) read a random UNet's first, near-uniform
# maps, which say nothing of a subject's size; these tests check the guidance mechanics.
FIXED = LossConfig(radius_mode="fixed")
STRONG = AIT2IConfig(loss=FIXED, schedule=ScheduleConfig(step_scale=100.0))
OBSERVE = AIT2IConfig(loss=FIXED, schedule=ScheduleConfig(step_scale=0.0))  # same losses recorded, no update


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _run(pipe, config=None, seed=0, **kw):
    kw = {"num_inference_steps": 6, "output_type": "np", **kw}
    return generate(pipe, PROMPT, config=config, generator=_gen(seed), **kw)


def _stock(pipe, seed=0, **kw):
    kw = {"num_inference_steps": 6, "output_type": "np", **kw}
    return pipe(PROMPT, generator=_gen(seed), **kw).images


def _use(pipe, scheduler: str):
    import diffusers

    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize(
    "guidance, return_maps, config",
    [(False, False, None), (False, True, None), (True, False, OBSERVE), (True, True, OBSERVE)],
)
def test_no_update_is_bit_identical_to_the_stock_pipeline(tiny_sd, guidance, return_maps, config):
    """Guidance off, or on with step size 0 (own encoding, own noise, UNet passes under capture,
    latents handed back every step): the very images of the stock call."""
    ref = _stock(tiny_sd)
    out = _run(tiny_sd, config, guidance=guidance, return_maps=return_maps)
    assert np.array_equal(out.images, ref)
    assert (out.maps is not None) == return_maps
    assert [r.step for r in out.steps] == ([0, 1, 2] if guidance else [])  # first half, step 0 included


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_zero_step_size_leaves_the_images_exactly_unchanged(tiny_sd, scheduler):
    pipe = _use(sharpen_attention(tiny_sd), scheduler)  # init_noise_sigma != 1 on Euler
    ref = _stock(pipe, negative_prompt="blurry")
    out = _run(pipe, OBSERVE, negative_prompt="blurry")
    assert np.array_equal(out.images, ref)
    assert not np.array_equal(_run(pipe, STRONG, negative_prompt="blurry").images, ref)


def test_zero_step_size_with_a_lora_at_scale_zero_equals_the_stock_pipeline(tiny_sd):
    """The LoRA scale reaches the text encoder too (``lora_scale`` of ``encode_prompt``)."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = dict(r=4, lora_alpha=4, init_lora_weights=False)
    inject_adapter_in_model(
        LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], **lora), tiny_sd.text_encoder
    )
    tiny_sd.unet.add_adapter(LoraConfig(target_modules=["to_q", "to_k", "to_v"], **lora))
    for scale in (0.0, 0.5):
        kw = {"cross_attention_kwargs": {"scale": scale}}
        assert np.array_equal(_run(tiny_sd, OBSERVE, **kw).images, _stock(tiny_sd, **kw))
    scaled = {"cross_attention_kwargs": {"scale": 0.0}}
    assert not np.array_equal(_stock(tiny_sd, **scaled), _stock(tiny_sd))  # the LoRA acts at scale 1


def test_negative_prompt_embeds_are_used_not_dropped(tiny_sd):
    negative = torch.randn(1, 77, 32, generator=_gen(5))
    ref = _stock(tiny_sd, negative_prompt_embeds=negative)
    out = _run(tiny_sd, OBSERVE, negative_prompt_embeds=negative)
    assert np.array_equal(out.images, ref) and not np.array_equal(ref, _stock(tiny_sd))


def test_sdxl_negative_embeds_are_used_as_the_stock_pipeline_uses_them(tiny_sdxl):
    g = _gen(5)
    negative = {
        "negative_prompt_embeds": torch.randn(1, 77, 32, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=g),
    }
    kw = dict(height=64, width=64, num_inference_steps=2, **negative)
    assert np.array_equal(_run(tiny_sdxl, OBSERVE, **kw).images, _stock(tiny_sdxl, **kw))


def test_lcm_timestep_cond_reaches_the_guided_pass():
    """A UNet with ``time_cond_proj_dim`` (LCM) gets the guidance-scale embedding in the guided
    pass exactly as in the pipeline's own passes."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from ait2i_ext.testing import tiny_sd_components, tiny_unet_config

    components = tiny_sd_components()
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(**tiny_unet_config(), time_cond_proj_dim=8).eval()
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    conds = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: conds.append(kwargs.get("timestep_cond")), with_kwargs=True
    )
    _run(pipe, OBSERVE, num_inference_steps=2, guidance_scale=3.0)
    hook.remove()
    assert len(conds) == 3 and all(c is not None for c in conds)  # guided pass, then 2 sampling passes
    torch.testing.assert_close(conds[0], conds[1], rtol=0, atol=0)


def test_ip_adapter_inputs_are_refused_with_guidance(tiny_sd):
    with pytest.raises(ValueError, match="ip_adapter_image_embeds= is not supported with ait2i guidance"):
        generate(tiny_sd, PROMPT, ip_adapter_image_embeds=[torch.zeros(2, 1, 32)])
    with pytest.raises(ValueError, match="ip_adapter_image= is not supported"):
        generate(tiny_sd, PROMPT, ip_adapter_image=object())


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
    pipe = _use(sharpen_attention(tiny_sd), scheduler)
    ref = _stock(pipe)
    observed = _run(pipe, OBSERVE)
    guided = _run(pipe)
    assert np.array_equal(observed.images, ref)  # the scheduler's own sampling, untouched
    assert not np.array_equal(guided.images, ref)
    num_guided = ScheduleConfig().num_guided_steps(len(pipe.scheduler.timesteps))
    assert [r.step for r in guided.steps] == list(range(num_guided))
    # One update at the first timestep, in this scheduler's input scaling, lowers the objective there.
    adapter = StableDiffusionAdapter(pipe)
    _, forward = adapter.encode([PROMPT], 1, False, {})
    target = resolve_targets(pipe.tokenizer, [PROMPT], None, 1)
    pipe.scheduler.set_timesteps(6)
    t = pipe.scheduler.timesteps[0]
    z = torch.randn(1, 4, 32, 32, generator=_gen()) * pipe.scheduler.init_noise_sigma
    c = _input_scale(pipe.scheduler, t)
    moved, before, _ = guidance_step(pipe.unet, forward, z, t, target, OBSERVE, 1.0, c)
    _, after, _ = guidance_step(pipe.unet, forward, moved, t, target, OBSERVE, 0.0, c)
    assert float(after.total) < float(before.total)


def test_refinement_option_runs_extra_iterations(tiny_sd):
    cfg = AIT2IConfig(
        schedule=ScheduleConfig(refinement=True, refinement_thresholds=((0, 0.99),), max_refinement_iters=3)
    )
    out = _run(tiny_sd, cfg, num_inference_steps=4)
    assert out.steps[0].iterations == 3 and out.steps[1].iterations == 1


def test_refinement_per_image_does_not_depend_on_the_batch(tiny_sd):
    """Each image stops refining on its own: in a batch it comes out as it does alone. With the
    batch maximum an image that met the threshold keeps moving while another has not."""
    pipe = sharpen_attention(tiny_sd)
    schedule = dict(step_scale=20.0, refinement=True, max_refinement_iters=4)

    def images(seeds, threshold, scope):
        cfg = AIT2IConfig(
            schedule=ScheduleConfig(
                refinement_thresholds=((0, threshold),), refinement_scope=scope, **schedule
            )
        )
        gens = [_gen(s) for s in seeds]
        out = generate(
            pipe,
            PROMPT,
            config=cfg,
            generator=gens,
            num_images_per_prompt=len(seeds),
            num_inference_steps=2,
            output_type="np",
        )
        return out.images, out.steps[0].losses["existence"]

    # A threshold between the two seeds' existence losses: one image meets it, the other does not.
    lone = {s: images([s], 0.0, "image")[1] for s in (0, 1)}
    threshold = 1.0 - sum(lone.values()) / 2
    alone = {s: images([s], threshold, "image")[0][0] for s in (0, 1)}
    batch, _ = images([0, 1], threshold, "image")
    for k, s in enumerate((0, 1)):
        np.testing.assert_allclose(batch[k], alone[s], atol=1e-5)
    batch_max, _ = images([0, 1], threshold, "batch")
    assert any(np.abs(batch_max[k] - alone[s]).max() > 1e-3 for k, s in enumerate((0, 1)))


def test_user_callback_still_runs_and_sees_guided_latents(tiny_sd):
    """The user's callback runs after the update: it sees the guided latents (not the scheduler's),
    and what it returns is what the next step's UNet passes get."""
    pipe = sharpen_attention(tiny_sd)
    seen, stepped, unet_inputs = {}, [], []
    step = pipe.scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        stepped.append(out[0].clone())  # prev_sample (a tuple with return_dict=False)
        return out

    def callback(pipe, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        return {"latents": tensors["latents"] + 1.0} if i == 2 else tensors

    pipe.scheduler.step = recording_step
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: unet_inputs.append(args[0].detach().clone()))
    _run(pipe, STRONG, num_inference_steps=4, callback_on_step_end=callback)
    hook.remove()
    sampling = [x[1:] for x in unet_inputs if x.shape[0] == 2]  # conditional half of each CFG pass
    assert sorted(seen) == [0, 1, 2, 3] and len(sampling) == 4
    assert not torch.equal(seen[0], stepped[0])  # step 1 is guided: the callback sees the update
    assert torch.equal(seen[0], sampling[1]) and torch.equal(seen[1], sampling[2])
    assert torch.equal(seen[3], stepped[3])  # last step: nothing left to guide
    assert torch.equal(seen[2] + 1.0, sampling[3])  # the callback's latents reach the next step


def test_truncated_mode_matches_full(tiny_sd):
    pipe = sharpen_attention(tiny_sd)
    full = _run(pipe, AIT2IConfig(schedule=STRONG.schedule, mode="full"))
    fast = _run(pipe, AIT2IConfig(schedule=STRONG.schedule, mode="truncated"))
    assert abs(full.images - fast.images).max() < 1e-4


def test_a_run_finds_its_layers_and_parameters_once_with_the_same_images(tiny_sd, monkeypatch):
    """The layers a guided pass records and the UNet's trainable parameters are found once per run
    (each lookup walks the whole UNet), and the images are the ones a lookup per pass gives."""
    from ait2i_ext import guidance

    pipe = sharpen_attention(tiny_sd)
    config = AIT2IConfig(loss=FIXED, schedule=ScheduleConfig(step_scale=100.0, guided_fraction=0.5))
    looked_up = {"layers": 0, "parameters": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            looked_up[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(guidance, "capture_layers", counted("layers", guidance.capture_layers))
    monkeypatch.setattr(
        guidance, "trainable_parameters", counted("parameters", guidance.trainable_parameters)
    )
    once = _run(pipe, config)
    assert len(once.steps) == 3 and looked_up == {"layers": 1, "parameters": 1}
    assert all(p.requires_grad for p in pipe.unet.parameters())  # restored after the run
    # The same passes with the lookups made in every pass (no layers or parameters handed in).
    from ait2i_ext import capture

    monkeypatch.setattr(capture, "capture_layers", counted("per pass", capture.capture_layers))
    looked_up["per pass"] = 0
    step = guidance.guidance_step
    monkeypatch.setattr(guidance, "guidance_step", lambda *args: step(*args[:10]))
    every_pass = _run(pipe, config)
    assert looked_up["per pass"] == 3 and np.array_equal(once.images, every_pass.images)


def test_bad_inputs(tiny_sd):
    with pytest.raises(ValueError, match="prompt_embeds= is not supported"):
        generate(tiny_sd, PROMPT, prompt_embeds=torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        generate(tiny_sd, PROMPT, subjects=["dog"])
    with pytest.raises(ValueError, match=r"prompt=\[\] is invalid"):
        generate(tiny_sd, [])
    with pytest.raises(ValueError, match="pipeline object is not supported"):
        generate(object(), PROMPT)
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"num_inference_steps={steps!r} is invalid"):
            generate(tiny_sd, PROMPT, num_inference_steps=steps)
    with pytest.raises(ValueError, match=r"mode='fastest' is invalid"):
        AIT2IConfig(mode="fastest")


# --- settings that belong to the model (ait2i.json in the pipeline folder) ---------------------


def _radii(out):
    return out.config.loss.aggregation_radius, out.config.loss.alignment_radius


def test_shipped_model_uses_its_own_radii_through_the_api():
    from diffusers import DiffusionPipeline

    from ait2i_ext.shapes.model import default_model_path

    pipe = DiffusionPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np")
    assert _radii(generate(pipe, PROMPT, **kw)) == (2.5, 3.0)
    assert _radii(generate(pipe, PROMPT, config=AIT2IConfig(), **kw)) == (5.0, 6.0)  # explicit wins
    kept = model_config(pipe, schedule={"step_scale": 10.0})
    assert _radii(generate(pipe, PROMPT, config=kept, **kw)) == (2.5, 3.0)


def test_a_retrained_folder_carries_its_own_settings(tmp_path):
    from diffusers import StableDiffusionPipeline

    from ait2i_ext.testing import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path)
    write_model_settings(tmp_path, loss={"aggregation_radius": 4.0, "alignment_radius": 4.5})
    write_model_settings(tmp_path, loss={"aggregation_radius": 4.0}, schedule={"guided_fraction": 0.25})
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    out = generate(pipe, PROMPT, num_inference_steps=4, output_type="np")
    assert _radii(out) == (4.0, 6.0) and [r.step for r in out.steps] == [0]
    (tmp_path / "ait2i.json").write_text('{"loss": {"aggregation_radius": -1}}')
    with pytest.raises(ValueError, match=r"ait2i.json: aggregation_radius=-1 is invalid"):
        generate(pipe, PROMPT, num_inference_steps=2)
    (tmp_path / "ait2i.json").write_text('{"loss": {"radius": 2}}')
    with pytest.raises(ValueError, match=r"section 'loss' is invalid: expected LossConfig fields"):
        model_config(tmp_path)
    assert model_config(tiny_sd_pipeline()) == AIT2IConfig()  # built in memory: no folder, defaults


def test_a_tuple_of_terms_descends_their_sum(tiny_sd):
    """``term=("box", "existence")`` (the box-only updates' ``box_update_terms``) steps along the sum of
    the two terms' gradients: the update is the two single-term updates added."""
    from ait2i_ext import Subject

    pipe = sharpen_attention(tiny_sd)
    adapter = StableDiffusionAdapter(pipe)
    _, forward = adapter.encode([PROMPT], 1, False, {})
    subjects = [
        Subject("circle", ("red",), box=(0, 0, 0.5, 1)),
        Subject("square", ("blue",), box=(0.5, 0, 1, 1)),
    ]
    target = resolve_targets(pipe.tokenizer, [PROMPT], subjects, 1)
    pipe.scheduler.set_timesteps(6)
    t = pipe.scheduler.timesteps[0]
    z = torch.randn(1, 4, 32, 32, generator=_gen())

    def moved(term):
        return guidance_step(pipe.unet, forward, z, t, target, OBSERVE, 1.0, 1.0, term)[0] - z

    box, existence, both = moved("box"), moved("existence"), moved(("box", "existence"))
    assert box.abs().max() > 0 and existence.abs().max() > 0
    torch.testing.assert_close(both, box + existence, rtol=1e-4, atol=1e-6)


def test_the_box_only_updates_descend_the_schedules_box_update_terms(tiny_sd):
    from ait2i_ext import Subject

    pipe = sharpen_attention(tiny_sd)
    subjects = [
        Subject("circle", ("red",), box=(0, 0, 0.5, 1)),
        Subject("square", ("blue",), box=(0.5, 0, 1, 1)),
    ]
    schedule = dict(step_scale=0.0, box_guided_fraction=0.5, box_step_scale=100.0)

    def run(terms):
        config = AIT2IConfig(schedule=ScheduleConfig(box_update_terms=terms, **schedule))
        return generate(
            pipe,
            PROMPT,
            subjects,
            config=config,
            generator=_gen(),
            num_inference_steps=4,
            output_type="latent",
        )

    box, with_existence = run(("box",)), run(("box", "existence"))
    assert [r.iterations for r in box.steps] == [4, 4]
    assert not torch.equal(box.images, with_existence.images)


@pytest.mark.parametrize("mode", ["truncated", "lagged"])
def test_calibrated_radii_are_measured_on_the_first_pass_and_held(tiny_sd, monkeypatch, mode):
    """A ``"calibrated"`` run's first guided pass measures each subject's radii from its maps (as
    ``"adaptive"``); every later pass uses those radii, although its own maps would give others."""
    from ait2i_ext import guidance, objective

    passes = []

    def spy(attn, groups, eot_index, cfg, boxes_enabled=True, radii=None):
        measured = objective.group_radii(objective.group_maps(attn.detach().float(), groups), cfg)
        passes.append((radii, measured))
        return objective.compute_losses(attn, groups, eot_index, cfg, boxes_enabled, radii=radii)

    monkeypatch.setattr(guidance, "compute_losses", spy)
    pipe = sharpen_attention(tiny_sd)
    config = dataclasses.replace(STRONG, mode=mode, loss=LossConfig(radius_mode="calibrated"))
    guided = _run(pipe, config)
    assert len(guided.steps) == len(passes) == 3
    assert passes[0][0] is None  # the first pass measures its own
    first = passes[0][1]
    for radii, _ in passes[1:]:
        assert all(torch.equal(held, r) for held, r in zip(first, radii))
    assert any(not torch.equal(first[0], measured[0]) for _, measured in passes[1:])
    adaptive = _run(pipe, dataclasses.replace(config, loss=LossConfig(radius_mode="adaptive")))
    assert adaptive.steps[0].losses == guided.steps[0].losses
    assert not np.array_equal(adaptive.images, guided.images)


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_radii_guide_the_tiny_pipeline(tiny_sd, seed):
    """Radii from the maps, end to end: a guided run records its steps and changes the images, and
    one update lowers the objective measured with the radii of the maps it moved."""
    pipe = sharpen_attention(tiny_sd)
    adaptive = dataclasses.replace(AIT2IConfig(), loss=LossConfig(radius_mode="adaptive"))
    guided = _run(pipe, adaptive, seed)
    assert guided.config.loss.radius_mode == "adaptive" and len(guided.steps) == 3
    assert not np.array_equal(guided.images, _stock(pipe, seed))
    adapter = StableDiffusionAdapter(pipe)
    _, forward = adapter.encode([PROMPT], 1, False, {})
    target = resolve_targets(pipe.tokenizer, [PROMPT], None, 1)
    pipe.scheduler.set_timesteps(6)
    t = pipe.scheduler.timesteps[0]
    z = torch.randn(1, 4, 32, 32, generator=_gen(seed)) * pipe.scheduler.init_noise_sigma
    moved, before, _ = guidance_step(pipe.unet, forward, z, t, target, adaptive, 1.0)
    _, after, _ = guidance_step(pipe.unet, forward, moved, t, target, adaptive, 0.0)
    assert float(after.total) < float(before.total)


def test_a_given_radius_means_a_fixed_radius(tmp_path):
    """A command line's --aggregation-radius over a model whose ait2i.json chose adaptive radii."""
    write_model_settings(tmp_path, loss={"radius_mode": "adaptive"})
    assert model_loss(tmp_path) == {"radius_mode": "adaptive"}
    assert model_loss(tmp_path, aggregation_radius=4.0) == {"radius_mode": "fixed", "aggregation_radius": 4.0}
    given = model_loss(tmp_path, alignment_radius=4.0, radius_mode="adaptive")
    assert given["radius_mode"] == "adaptive"
    with pytest.raises(ValueError, match="radius_mode='auto' is invalid"):
        model_loss(tmp_path, radius_mode="auto")


def test_box_only_updates_stop_for_an_image_whose_box_term_is_at_box_stop(tiny_sd):
    """``box_stop``: an image at or below it gets no more box-only updates (a stop above any box term
    equals no box-only updates at all); below every box term it changes nothing."""
    from ait2i_ext import Subject

    pipe = sharpen_attention(tiny_sd)
    subjects = [
        Subject("circle", ("red",), box=(0, 0, 0.5, 1)),
        Subject("square", ("blue",), box=(0.5, 0, 1, 1)),
    ]

    def run(**fields):
        schedule = dict(step_scale=0.0, box_guided_fraction=0.5, box_step_scale=100.0, **fields)
        config = AIT2IConfig(schedule=ScheduleConfig(**schedule))
        call = dict(generator=_gen(), num_inference_steps=4, output_type="latent")
        return generate(pipe, PROMPT, subjects, config=config, **call)

    pulled, never = run(), run(box_iterations=0)
    stopped = run(box_stop=100.0)
    assert [r.iterations for r in stopped.steps] == [1, 1]
    torch.testing.assert_close(stopped.images, never.images)
    assert not torch.equal(pulled.images, never.images)
    assert torch.equal(run(box_stop=0.0).images, pulled.images)
    with pytest.raises(ValueError, match="box_stop"):
        ScheduleConfig(box_stop=-1.0)


def test_norm_preserving_step_descends_and_keeps_each_latents_norm():
    z = torch.randn(3, 4, 8, 8, generator=_gen())
    weights = torch.randn(3, 4, 8, 8, generator=_gen(1))  # a linear loss per image: its gradient
    moved = norm_preserving_step(z, weights, 0.1)
    torch.testing.assert_close(moved.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1))
    assert ((moved * weights).flatten(1).sum(1) < (z * weights).flatten(1).sum(1)).all()
    # only the gradient's direction counts, image by image
    torch.testing.assert_close(
        norm_preserving_step(z, weights * torch.tensor([1.0, 10.0, 1e-3])[:, None, None, None], 0.1), moved
    )


def test_box_init_iterations_move_the_initial_noise_only_with_boxes(tiny_sd):
    """``box_init_iterations``: updates of the initial noise on the box terms before step 0 change a
    run with boxes, leave a run without boxes as it was, and 0 (the default) is the run without them."""
    from ait2i_ext import Subject

    pipe = sharpen_attention(tiny_sd)
    boxed = [
        Subject("circle", ("red",), box=(0, 0, 0.5, 1)),
        Subject("square", ("blue",), box=(0.5, 0, 1, 1)),
    ]

    def run(subjects, **fields):
        config = AIT2IConfig(schedule=ScheduleConfig(box_guided_fraction=0.5, **fields))
        call = dict(generator=_gen(), num_inference_steps=4, output_type="latent")
        return generate(pipe, PROMPT, subjects, config=config, **call)

    base, init = run(boxed), run(boxed, box_init_iterations=2)
    assert not torch.equal(init.images, base.images)
    assert torch.equal(run(boxed, box_init_iterations=0).images, base.images)
    assert torch.equal(run(None, box_init_iterations=2).images, run(None).images)
    with pytest.raises(ValueError, match="box_init_iterations=-1 is invalid: expected an integer >= 0"):
        ScheduleConfig(box_init_iterations=-1)
    with pytest.raises(ValueError, match=r"box_init_step=0.0 is invalid: expected a fraction in \(0, 1\]"):
        ScheduleConfig(box_init_step=0.0)


def test_box_norm_step_makes_the_box_only_updates_normalised_steps(tiny_sd):
    """``box_norm_step`` > 0: each box-only update moves the latent by that share of its RMS along the
    normalised gradient (``box_step_scale``, the raw step, no longer counts); 0 (the default) is the
    raw step as before."""
    from ait2i_ext import Subject

    pipe = sharpen_attention(tiny_sd)
    boxed = [
        Subject("circle", ("red",), box=(0, 0, 0.5, 1)),
        Subject("square", ("blue",), box=(0.5, 0, 1, 1)),
    ]

    def run(**fields):
        config = AIT2IConfig(schedule=ScheduleConfig(box_guided_fraction=0.5, **fields))
        call = dict(generator=_gen(), num_inference_steps=4, output_type="latent")
        return generate(pipe, PROMPT, boxed, config=config, **call).images

    base, normalised = run(), run(box_norm_step=0.1)
    assert not torch.equal(normalised, base)
    assert torch.equal(run(box_norm_step=0.1, box_step_scale=1e6), normalised)
    assert torch.equal(run(box_norm_step=0.0), base)
    with pytest.raises(ValueError, match=r"box_norm_step=1.5 is invalid: expected a fraction in \[0, 1\]"):
        ScheduleConfig(box_norm_step=1.5)
