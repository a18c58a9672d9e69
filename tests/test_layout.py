"""Layout routes on tiny pipelines: boxes alone (SD, SDXL), GLIGEN and ControlNet, and their bad inputs.

The tiny nets are random, so attention gradients are weak: the tests sharpen cross-attention by
scaling every ``attn2.to_k`` weight and take large steps (``step_scale=100``). GLIGEN's gates and
ControlNet's zero convolutions start at zero; the tests set them non-zero or the adapters' effect
could not be seen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ait2i_ext.adapters import adapter_for
from ait2i_ext.adapters.controlnet import (
    ControlNetAdapter,
    ControlNetXLAdapter,
    canny_edges,
    control_image,
    load_controlnet_pipeline,
)
from ait2i_ext.adapters.gligen import GLIGENAdapter, fusers_enabled, gligen_inputs, load_gligen_pipeline
from ait2i_ext.adapters.layout import parse_box_arg, route_config, subjects_with_boxes
from diffusers import (
    DDIMScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.models import MultiControlNetModel
from PIL import Image, ImageDraw

from ait2i_ext import AIT2IConfig, ScheduleConfig, Subject, generate, losses
from ait2i_ext.capture import capture_attention
from ait2i_ext.testing import (
    tiny_controlnet,
    tiny_gligen_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_unet_config,
)

PROMPT = "a cat and a dog"
CAT, DOG = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
SUBJECTS = [Subject("cat", box=CAT), Subject("dog", box=DOG)]
STEPS = 4


def guided(step_scale: float) -> AIT2IConfig:
    """Every step guided at ``step_scale``, without the box-only updates (tested on their own)."""
    return AIT2IConfig(schedule=ScheduleConfig(step_scale=step_scale, guided_fraction=1.0, box_iterations=0))


def sharpen(unet, factor: float) -> None:
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if name.endswith("attn2.to_k.weight"):
                param.mul_(factor)


def seed(n: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def in_box_fractions(out) -> list[float]:
    """Fraction of each group's (main-token) attention mass inside its own box, image 0."""
    fractions = []
    for group in out.groups[0]:
        m = out.maps[0, :, :, group.main]
        mask = losses.box_masks([group.box], *m.shape)[0]
        fractions.append(float((m * mask).sum() / m.sum()))
    return fractions


class UNetCalls:
    """Records the UNet's inputs (after any pre-hook) on every call while installed."""

    def __init__(self, unet):
        self.calls: list[dict] = []
        self.handle = unet.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.calls.append({"sample": sample.detach().clone(), "t": t, **kwargs})

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


# --- box arguments ----------------------------------------------------------------------------


def test_parse_box_arg_reads_word_and_box():
    assert parse_box_arg("cat:0.05,0.2,0.5,0.9") == ("cat", (0.05, 0.2, 0.5, 0.9))
    assert parse_box_arg("teddy bear: 0, 0, 1, 1") == ("teddy bear", (0.0, 0.0, 1.0, 1.0))


@pytest.mark.parametrize(
    "text, match",
    [
        ("cat:0.1,0.2,1.5,0.9", r"outside \[0, 1\]"),
        ("cat:-0.1,0.2,0.5,0.9", r"outside \[0, 1\]"),
        ("cat:0.6,0.2,0.5,0.9", "x0 < x1"),
        ("cat:0.1,0.9,0.5,0.9", "y0 < y1"),
        ("cat 0.1,0.2,0.5,0.9", "malformed"),
        (":0.1,0.2,0.5,0.9", "malformed"),
        ("cat:a,b,c,d", "malformed"),
        ("cat:0.1,0.2,0.5", "4 numbers"),
    ],
)
def test_parse_box_arg_rejects_bad_boxes(text, match):
    with pytest.raises(ValueError, match=match):
        parse_box_arg(text)


def test_subjects_with_boxes_names_subjects_by_their_words():
    out = subjects_with_boxes(
        ["red cat", "dog"],
        [("cat", CAT), ("dog", DOG), ("hat", (0.1, 0.0, 0.4, 0.2))],
        PROMPT + " with a hat",
    )
    assert [(s.phrase(), s.box) for s in out] == [
        ("red cat", CAT),
        ("dog", DOG),
        ("hat", (0.1, 0.0, 0.4, 0.2)),
    ]
    inferred = subjects_with_boxes(None, {"dog": DOG}, PROMPT)
    assert [(s.noun, s.box) for s in inferred] == [("cat", None), ("dog", DOG)]


def test_subjects_with_boxes_rejects_unknown_words_and_duplicates():
    with pytest.raises(ValueError, match=r"'horse'.*'a cat and a dog'"):
        subjects_with_boxes(["cat", "dog"], {"horse": CAT}, PROMPT)
    with pytest.raises(ValueError, match="two boxes for subject 'cat'"):
        subjects_with_boxes(["red cat"], [("cat", CAT), ("red cat", DOG)], PROMPT)
    with pytest.raises(ValueError, match="outside"):
        subjects_with_boxes(["cat"], {"cat": (0, 0, 2, 1)}, PROMPT)


# --- boxes alone on plain SD / SDXL ---------------------------------------------------------------


@pytest.mark.parametrize("arch, sharpness", [("sd", 8.0), ("sdxl", 50.0)])  # tiny SDXL attends more flatly
def test_boxes_alone_move_attention_into_the_boxes(arch, sharpness):
    pipe = tiny_sd_pipeline() if arch == "sd" else tiny_sdxl_pipeline()
    sharpen(pipe.unet, sharpness)
    runs = {
        scale: generate(
            pipe,
            PROMPT,
            SUBJECTS,
            config=guided(scale),
            return_maps=True,
            num_inference_steps=STEPS,
            generator=seed(),
            output_type="latent",
        )
        for scale in (0.0, 100.0)
    }
    before, after = in_box_fractions(runs[0.0]), in_box_fractions(runs[100.0])
    assert all(a > b + 0.03 for a, b in zip(after, before, strict=True)), (before, after)
    # Same seed, same first step; the box term then stays below the unguided run's.
    box_plain, box_guided = runs[0.0].loss_curve("box"), runs[100.0].loss_curve("box")
    assert box_guided[0] == pytest.approx(box_plain[0])
    assert all(g < p for g, p in zip(box_guided[1:], box_plain[1:], strict=True))


def test_box_schedule_adds_box_only_updates_on_the_first_steps():
    pipe = tiny_sd_pipeline()
    sharpen(pipe.unet, 8.0)
    schedule = dict(step_scale=0.0, guided_fraction=0.5, box_guided_fraction=0.25, box_step_scale=100.0)
    config = AIT2IConfig(schedule=ScheduleConfig(box_iterations=3, **schedule))
    call = dict(num_inference_steps=8, output_type="latent")
    boxed = generate(pipe, PROMPT, SUBJECTS, config=config, generator=seed(), **call)
    # steps 0-1 (a quarter of 8): the update plus 3 box-only ones; steps 2-3: the update alone
    assert [r.iterations for r in boxed.steps] == [4, 4, 1, 1]
    unboxed = generate(pipe, PROMPT, ["cat", "dog"], config=config, generator=seed(), **call)
    assert [r.iterations for r in unboxed.steps] == [1, 1, 1, 1]  # no boxes: the schedule is off
    # the box-only updates lower the box term of the next steps (the main update has step 0 here)
    plain = AIT2IConfig(schedule=ScheduleConfig(box_iterations=0, **schedule))
    observed = generate(pipe, PROMPT, SUBJECTS, config=plain, generator=seed(), **call)
    assert boxed.loss_curve("box")[0] == pytest.approx(observed.loss_curve("box")[0])
    assert all(
        b < o for b, o in zip(boxed.loss_curve("box")[1:], observed.loss_curve("box")[1:], strict=True)
    )


def test_an_image_does_not_depend_on_its_batch_mates():
    # The boxes route with strong steps on every step: seed 1 alone and beside seeds 2 and 3 give
    # the same latents up to float32 rounding (the maps and losses are float32; batched kernels round
    # differently per batch size): measured ~5e-5 of latents ~19; in float64 throughout, ~1e-13.
    pipe = tiny_sd_pipeline()
    sharpen(pipe.unet, 8.0)
    strong = dict(step_scale=100.0, box_step_scale=100.0, guided_fraction=1.0)

    def first_image(num_images: int, **schedule) -> torch.Tensor:
        config = route_config("boxes", None, schedule={**strong, **schedule})
        generators = [seed(1 + k) for k in range(num_images)]
        call = dict(num_inference_steps=STEPS, output_type="latent", num_images_per_prompt=num_images)
        return generate(pipe, PROMPT, SUBJECTS, config=config, generator=generators, **call).images[0]

    tolerance = 2e-3
    torch.testing.assert_close(first_image(3), first_image(1), rtol=0, atol=tolerance)
    # the one documented coupling, refinement_scope="batch" (every image refined while one is
    # above its target), is well beyond that tolerance; "image" (the default) is not
    refine = dict(refinement=True, refinement_thresholds=((0, 0.8), (2, 0.9)))
    coupled = first_image(3, refinement_scope="batch", **refine) - first_image(
        1, refinement_scope="batch", **refine
    )
    assert float(coupled.abs().max()) > 100 * tolerance
    torch.testing.assert_close(first_image(3, **refine), first_image(1, **refine), rtol=0, atol=tolerance)


# --- GLIGEN -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gligen_pipe():
    pipe = tiny_gligen_pipeline()
    sharpen(pipe.unet, 8.0)
    return pipe


GLIGEN_CALL = dict(
    gligen_phrases=["a cat", "a dog"],
    gligen_boxes=[list(CAT), list(DOG)],
    num_inference_steps=2,
    output_type="latent",
)


def test_gligen_inputs_match_the_pipelines_conditional_branch(gligen_pipe):
    with UNetCalls(gligen_pipe.unet) as calls:
        gligen_pipe(prompt=[PROMPT, "a dog"], generator=seed(), **GLIGEN_CALL)
    theirs = calls[0]["cross_attention_kwargs"]["gligen"]
    ours = gligen_inputs(gligen_pipe, GLIGEN_CALL["gligen_phrases"], GLIGEN_CALL["gligen_boxes"], batch=2)
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key][2:])  # [uncond x2, cond x2]
    assert ours["masks"][:, :2].eq(1).all() and ours["masks"][:, 2:].eq(0).all()


def test_capture_leaves_the_gated_self_attention_untouched(gligen_pipe):
    unet = gligen_pipe.unet
    grounding = gligen_inputs(gligen_pipe, ["a cat"], [list(CAT)], batch=1)
    x, t = torch.randn(1, 4, 32, 32, generator=seed()), torch.tensor(500)
    text = torch.randn(1, 77, 32, generator=seed(1))

    def run():
        return unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": grounding}).sample

    fusers = {k: v for k, v in unet.attn_processors.items() if ".fuser." in k}
    assert fusers
    # A pipeline call leaves the fusers off after its grounded steps: switch them on explicitly.
    with torch.no_grad(), fusers_enabled(unet, True):
        stock = run()
        with capture_attention(unet, (32, 32)) as store:
            assert {k: v for k, v in unet.attn_processors.items() if ".fuser." in k} == fusers
            captured = run()
    with torch.no_grad(), fusers_enabled(unet, False):
        ungrounded = run()
    assert len(store) > 0 and not any(".fuser." in name for name in store.layer_names)
    torch.testing.assert_close(captured, stock)
    assert not torch.allclose(ungrounded, stock)  # the fusers really act (gates opened)


def test_gligen_latent_update_reaches_the_next_step(gligen_pipe):
    adapter = GLIGENAdapter(gligen_pipe)
    guided_latents, seen_by_user = {}, []

    def on_step_end(i, t, tensors):
        guided_latents[i + 1] = tensors["latents"] + 0.25 * (i + 1)  # any new tensor stands for the guide's
        return {"latents": guided_latents[i + 1]}

    kwargs = adapter.attach(
        dict(GLIGEN_CALL, num_inference_steps=3, callback=lambda i, t, z: seen_by_user.append(z.clone())),
        on_step_end,
    )
    with UNetCalls(gligen_pipe.unet) as calls:
        gligen_pipe(prompt=PROMPT, generator=seed(), **kwargs)
    assert len(calls) == 3 and sorted(guided_latents) == [1, 2, 3]
    # The UNet input of step i (DDIM: no input scaling) is [uncond, cond] of the guided latents.
    for i in (1, 2):
        torch.testing.assert_close(calls[i]["sample"], torch.cat([guided_latents[i]] * 2))
    for i, z in enumerate(seen_by_user):  # the user's own callback runs after ours and sees the update
        torch.testing.assert_close(z, guided_latents[i + 1])


def test_gligen_guided_run_fills_boxes_from_subjects_and_lowers_the_box_term(gligen_pipe):
    adapter = GLIGENAdapter(gligen_pipe, SUBJECTS)
    runs = {}
    with UNetCalls(gligen_pipe.unet) as calls:
        for scale in (0.0, 100.0):
            runs[scale] = generate(
                gligen_pipe,
                PROMPT,
                SUBJECTS,
                config=guided(scale),
                adapter=adapter,
                num_inference_steps=STEPS,
                generator=seed(),
                output_type="latent",
            )
    grounding = [
        c["cross_attention_kwargs"]["gligen"]
        for c in calls
        if "gligen" in (c["cross_attention_kwargs"] or {})
    ]
    assert len(grounding) == len(calls)  # every pass, guide's and pipeline's, is grounded
    torch.testing.assert_close(grounding[-1]["boxes"][-1, :2], torch.tensor([CAT, DOG]))
    assert len(runs[100.0].steps) == STEPS
    box_plain, box_guided = runs[0.0].loss_curve("box"), runs[100.0].loss_curve("box")
    assert all(g < p for g, p in zip(box_guided[1:], box_plain[1:], strict=True)), (box_plain, box_guided)
    assert not torch.allclose(torch.as_tensor(runs[0.0].images), torch.as_tensor(runs[100.0].images))


def test_gligen_forward_follows_scheduled_sampling(gligen_pipe):
    adapter = GLIGENAdapter(gligen_pipe, SUBJECTS)
    new, forward = adapter.encode(
        [PROMPT], 1, False, dict(num_inference_steps=4, gligen_scheduled_sampling_beta=0.5)
    )
    gligen_pipe.scheduler.set_timesteps(4)
    x, t = torch.randn(1, 4, 32, 32, generator=seed()), gligen_pipe.scheduler.timesteps[0]
    grounding = {"gligen": gligen_inputs(gligen_pipe, new["gligen_phrases"], new["gligen_boxes"], 1)}
    reference = {}
    with torch.no_grad():
        for on in (True, False):
            with fusers_enabled(gligen_pipe.unet, on):
                embeds = new["prompt_embeds"]
                reference[on] = gligen_pipe.unet(
                    x, t, encoder_hidden_states=embeds, cross_attention_kwargs=grounding
                ).sample
        for step, on in ((0, True), (1, True), (2, False), (3, False)):  # int(0.5 * 4) = 2 grounded steps
            adapter.tracker.step = step
            torch.testing.assert_close(forward(x, t), reference[on])


def test_gligen_prepare_takes_the_subjects_boxes(gligen_pipe):
    filled = GLIGENAdapter(gligen_pipe).prepare(
        {}, [Subject("cat", ("red",), box=CAT), "bird", Subject("dog", box=DOG)]
    )
    assert filled["gligen_phrases"] == ["red cat", "dog"] and filled["gligen_boxes"] == [list(CAT), list(DOG)]
    given = {"gligen_phrases": ["a bird"], "gligen_boxes": [list(DOG)]}
    assert GLIGENAdapter(gligen_pipe, SUBJECTS).prepare(given)["gligen_phrases"] == ["a bird"]
    per_prompt = [[Subject("cat", box=CAT)], [Subject("cat", box=DOG)]]
    with pytest.raises(ValueError, match="one set of phrases and boxes"):
        GLIGENAdapter(gligen_pipe).prepare({}, per_prompt)


def test_gligen_bad_inputs(gligen_pipe):
    too_many = [Subject(f"cat{k}", box=(0.0, 0.0, 0.5, 0.5)) for k in range(31)]
    with pytest.raises(ValueError, match="at most 30"):
        GLIGENAdapter(gligen_pipe, too_many).prepare({})
    with pytest.raises(ValueError, match="at least one box"):
        generate(gligen_pipe, PROMPT, ["cat", "dog"], adapter=GLIGENAdapter(gligen_pipe, ["cat", "dog"]))
    with pytest.raises(ValueError, match="GLIGEN needs phrases and boxes"):
        GLIGENAdapter(gligen_pipe).prepare({})
    with pytest.raises(ValueError, match="one phrase per box"):
        GLIGENAdapter(gligen_pipe).prepare({"gligen_phrases": ["a cat"], "gligen_boxes": [CAT, DOG]})
    scheduler = gligen_pipe.scheduler
    try:
        gligen_pipe.scheduler = HeunDiscreteScheduler.from_config(scheduler.config)
        with pytest.raises(ValueError, match="order 2"):
            GLIGENAdapter(gligen_pipe, SUBJECTS).attach({}, lambda i, t, tensors: tensors)
    finally:
        gligen_pipe.scheduler = scheduler


def _guided_steps(pipe, scheduler_cls, **scheduler_kwargs) -> list[int]:
    scheduler = pipe.scheduler
    try:
        pipe.scheduler = scheduler_cls.from_config(scheduler.config, **scheduler_kwargs)
        out = generate(
            pipe,
            PROMPT,
            SUBJECTS,
            config=AIT2IConfig(schedule=ScheduleConfig(step_scale=1.0)),
            adapter=GLIGENAdapter(pipe, SUBJECTS),
            num_inference_steps=8,
            generator=seed(),
            output_type="latent",
        )
    finally:
        pipe.scheduler = scheduler
    return [r.step for r in out.steps]


def test_gligen_guides_every_scheduled_step(gligen_pipe):
    assert _guided_steps(gligen_pipe, DDIMScheduler) == [0, 1, 2, 3]


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_gligen_refuses_schedulers_whose_warm_up_skips_the_callback(gligen_pipe, skip_prk_steps):
    # PNDM runs UNet passes before the legacy callback starts (its warm-up): guided step 1 would be
    # skipped silently ([0, 2, 3]). It must be a clear error before any sampling.
    with (
        UNetCalls(gligen_pipe.unet) as calls,
        pytest.raises(ValueError, match="PNDMScheduler.*DDIMScheduler"),
    ):
        _guided_steps(gligen_pipe, PNDMScheduler, skip_prk_steps=skip_prk_steps)
    assert calls == []


# --- ControlNet -----------------------------------------------------------------------------------


def controlnet_pipeline(arch: str, nets: int = 1, channels: int = 3):
    base = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd_pipeline()
    controlnets = [tiny_controlnet(base.unet, k, channels) for k in range(nets)]
    cls = StableDiffusionXLControlNetPipeline if arch == "sdxl" else StableDiffusionControlNetPipeline
    components = {k: v for k, v in base.components.items() if k in cls._get_signature_keys(cls)[0]}
    # DDIM does not scale the UNet input: a recorded pipeline input replays as latents.
    components["scheduler"] = DDIMScheduler.from_config(base.scheduler.config)
    pipe = cls(**components, controlnet=controlnets[0] if nets == 1 else controlnets)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edge_picture(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle(
        (size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(255, 255, 255)
    )
    return image


@pytest.mark.parametrize(
    "arch, nets, extra",
    [
        ("sd", 1, dict(controlnet_conditioning_scale=0.7, control_guidance_end=0.5)),
        ("sd", 1, dict(guess_mode=True)),
        ("sd", 2, dict(controlnet_conditioning_scale=[0.5, 1.5], control_guidance_start=[0.0, 0.5])),
        ("sdxl", 1, dict(controlnet_conditioning_scale=0.7)),
    ],
    ids=["sd-window", "sd-guess-mode", "sd-multi", "sdxl"],
)
def test_controlnet_forward_matches_the_pipelines_conditional_branch(arch, nets, extra):
    pipe = controlnet_pipeline(arch, nets)
    image = edge_picture() if nets == 1 else [edge_picture(), edge_picture().rotate(90)]
    call = dict(image=image, num_inference_steps=2, guidance_scale=5.0, **extra)
    with UNetCalls(pipe.unet) as theirs:
        pipe(prompt=PROMPT, generator=seed(), output_type="latent", **call)
    adapter = adapter_for(pipe)
    assert isinstance(adapter, ControlNetXLAdapter if arch == "sdxl" else ControlNetAdapter)
    _, forward = adapter.encode([PROMPT], 1, True, dict(call))
    with UNetCalls(pipe.unet) as ours, torch.no_grad():
        for step, call_ in enumerate(theirs):
            adapter.tracker.step = step
            forward(call_["sample"][1:], call_["t"])  # DDIM: the UNet input is the latents
    scales = []
    for mine, pipeline in zip(ours, theirs, strict=True):
        down, mid = mine["down_block_additional_residuals"], mine["mid_block_additional_residual"]
        assert len(down) == len(pipeline["down_block_additional_residuals"])
        for a, b in zip(down, pipeline["down_block_additional_residuals"], strict=True):
            torch.testing.assert_close(a, b[1:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mid, pipeline["mid_block_additional_residual"][1:], atol=1e-5, rtol=1e-4)
        scales.append(float(mid.abs().sum()))
    if extra.get("control_guidance_end") == 0.5:  # the window closes after step 0
        assert scales[0] > 0 and scales[1] == 0


def test_controlnet_guided_run(tmp_path):
    pipe = controlnet_pipeline("sd")
    sharpen(pipe.unet, 8.0)
    out = generate(
        pipe,
        PROMPT,
        SUBJECTS,
        config=guided(100.0),
        return_maps=True,
        image=edge_picture(),
        num_inference_steps=2,
        generator=seed(),
        output_type="latent",
    )
    assert len(out.steps) == 2 and out.maps.shape[1:3] == (16, 16)
    assert out.loss_curve("box")[1] < out.loss_curve("box")[0]


def test_controlnet_channel_mismatch_is_refused_before_running():
    pipe = controlnet_pipeline("sd", channels=1)
    with (
        UNetCalls(pipe.unet) as calls,
        pytest.raises(ValueError, match="3 channels.*conditioning_channels=1"),
    ):
        generate(pipe, PROMPT, SUBJECTS, image=edge_picture(), num_inference_steps=2)
    assert calls == []


def test_controlnet_downsampling_mismatch_is_refused_before_running(tmp_path):
    from diffusers import ControlNetModel

    pipe = controlnet_pipeline("sd")  # the tiny VAE downsamples by 2
    pipe.controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 64))
    with UNetCalls(pipe.unet) as calls, pytest.raises(ValueError, match="downsamples .* by 4 .* by 2"):
        generate(pipe, PROMPT, SUBJECTS, image=edge_picture(), num_inference_steps=2)
    assert calls == []
    tiny_sd_pipeline().save_pretrained(tmp_path / "base")
    pipe.controlnet.save_pretrained(tmp_path / "cn4x")
    with pytest.raises(ValueError, match="downsamples .* by 4 .* by 2"):
        load_controlnet_pipeline(str(tmp_path / "base"), str(tmp_path / "cn4x"))


@pytest.mark.parametrize("nets", [1, 2])
def test_controlnet_per_prompt_images_with_several_images_per_prompt(nets):
    """One control image per prompt, two images each: guided at step size 0 is the stock pipeline."""
    pipe = controlnet_pipeline("sd", nets)
    images = [edge_picture(), edge_picture().rotate(45)]
    if nets == 2:  # per prompt, one image per net
        images = [[image, image.rotate(90)] for image in images]
    prompts = [PROMPT, "a dog and a cat"]
    call = dict(image=images, num_images_per_prompt=2, num_inference_steps=2, output_type="latent")
    stock = pipe(prompt=prompts, generator=seed(), **call).images
    ours = generate(
        pipe, prompts, [["cat", "dog"], ["dog", "cat"]], config=guided(0.0), generator=seed(), **call
    )
    assert ours.images.shape == stock.shape == (4, 4, 32, 32)
    torch.testing.assert_close(ours.images, stock, atol=1e-5, rtol=1e-4)


def test_controlnet_prepare_takes_the_size_of_the_control_image():
    pipe = controlnet_pipeline("sd")
    image = edge_picture(48)
    assert adapter_for(pipe).prepare({"image": image}) == {"image": image, "height": 48, "width": 48}


def test_control_image_kinds_and_errors(tmp_path):
    path = tmp_path / "photo.png"
    edge_picture(80).save(path)
    for kind in ("canny", "lineart", "image"):
        image = control_image(f"{kind}:{path}", 64)
        assert image.size == (64, 64) and image.mode == "RGB"
    edges = np.asarray(control_image(f"canny:{path}", 64))[..., 0] > 0
    # The square's top side lies at row 16: OpenCV's Canny (controlnet-aux) draws it 1 px thick, the
    # built-in one 2 px, so look in a band; nothing inside the square or in the corner.
    assert edges[14:18, 20:44].any(axis=0).all()
    assert not edges[30:34, 30:34].any() and not edges[:8, :8].any()
    (tmp_path / "broken.png").write_bytes(b"not an image")
    for bad in (tmp_path / "broken.png", tmp_path / "missing.png"):
        with pytest.raises(ValueError, match=str(bad.name)):
            control_image(f"canny:{bad}", 64)
    with pytest.raises(ValueError, match="malformed"):
        control_image(f"depth:{path}", 64)
    one_channel = tiny_controlnet(tiny_sd_pipeline().unet, channels=1)
    with pytest.raises(ValueError, match="conditioning_channels=1"):
        control_image(f"image:{path}", 64, controlnet=one_channel)


def test_canny_edges_follow_a_square():
    edges = np.asarray(canny_edges(edge_picture(64)))[..., 0] > 0
    rows, cols = np.nonzero(edges)
    assert (
        14 <= rows.min() <= 17
        and 47 <= rows.max() <= 50
        and 14 <= cols.min() <= 17
        and 47 <= cols.max() <= 50
    )
    assert edges.mean() < 0.15  # thin lines, not filled regions


def test_loaders_from_saved_checkpoints(tmp_path, gligen_pipe):
    base = tiny_sd_pipeline()
    base.save_pretrained(tmp_path / "base")
    for k in range(2):
        tiny_controlnet(base.unet, k).save_pretrained(tmp_path / f"cn{k}")
    gligen_pipe.save_pretrained(tmp_path / "gligen")
    pipe = load_controlnet_pipeline(str(tmp_path / "base"), str(tmp_path / "cn0"), "float32")
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    multi = load_controlnet_pipeline(
        str(tmp_path / "base"), [str(tmp_path / "cn0"), str(tmp_path / "cn1")], None
    )
    assert isinstance(multi.controlnet, MultiControlNetModel) and len(multi.controlnet.nets) == 2
    assert load_gligen_pipeline(str(tmp_path / "gligen"), "fp32").unet.config.attention_type == "gated"
    with pytest.raises(ValueError, match="not a text-box GLIGEN checkpoint"):
        load_gligen_pipeline(str(tmp_path / "base"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load a ControlNet from"):
        load_controlnet_pipeline(str(tmp_path / "base"), str(tmp_path / "empty"))
    torch.manual_seed(0)
    wide = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=16))
    tiny_controlnet(wide).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="cross_attention_dim=16 but the base"):
        load_controlnet_pipeline(str(tmp_path / "base"), str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="dtype"):
        load_gligen_pipeline(str(tmp_path / "gligen"), "float7")


def test_registry_picks_the_layout_adapters(gligen_pipe):
    assert type(adapter_for(gligen_pipe)) is GLIGENAdapter


def test_the_default_box_settings_are_the_measured_ones():
    """docs/layout.md: the library defaults are the first round's box settings (box term alone in the
    box-only updates, attributes not boxed), which measured better on ControlNet (and GLIGEN was
    measured with them); boxes alone get the third round's through their route (next test)."""
    from ait2i_ext import LossConfig

    pipe = tiny_sd_pipeline()
    sharpen(pipe.unet, 8.0)
    subjects = [Subject("cat", ("red",), box=CAT), Subject("dog", ("blue",), box=DOG)]
    prompt = "a red cat and a blue dog"
    schedule = dict(step_scale=0.0, box_guided_fraction=0.5, box_step_scale=100.0)

    def run(loss: dict, box_terms: dict):
        config = AIT2IConfig(loss=LossConfig(**loss), schedule=ScheduleConfig(**schedule, **box_terms))
        call = dict(num_inference_steps=4, output_type="latent", generator=seed())
        return generate(pipe, prompt, subjects, config=config, **call).images

    default = run({}, {})
    measured = run({"box_members": False}, {"box_update_terms": ("box",)})
    assert torch.equal(default, measured)
    assert not torch.equal(default, run({"box_members": False}, {"box_update_terms": ("box", "existence")}))
    assert not torch.equal(default, run({"box_members": True}, {"box_update_terms": ("box",)}))


BOXES_ROUTE = {
    "box_members": True,
    "box_power": 2.0,
    "w_box_topk": 1.0,
    "box_update_terms": ("box",),
    "box_iterations": 3,
}
LIBRARY = {
    "box_members": False,
    "box_power": 1.0,
    "w_box_topk": 0.0,
    "box_update_terms": ("box",),
    "box_iterations": 3,
}
CONTROLNET_ROUTE = dict(BOXES_ROUTE)  # measured separately on the shipped ControlNet (docs/layout.md)


def _box_settings(config: AIT2IConfig) -> dict:
    loss, schedule = config.loss, config.schedule
    return {
        "box_members": loss.box_members,
        "box_power": loss.box_power,
        "w_box_topk": loss.w_box_topk,
        "box_update_terms": schedule.box_update_terms,
        "box_iterations": schedule.box_iterations,
    }


def test_each_layout_route_runs_with_its_box_settings(gligen_pipe):
    """Without a config, ``generate`` runs the box settings of its adapter's route: boxes alone the
    measured ones of docs/layout.md (attributes boxed, existence in the box-only updates, squared
    energy with the top-k terms), ControlNet the same (measured on its own), GLIGEN the library
    defaults; an explicit config is used as given."""
    from ait2i_ext.adapters.layout import ROUTE_SETTINGS

    subjects = [Subject("cat", ("red",), box=CAT), Subject("dog", ("blue",), box=DOG)]
    call = dict(num_inference_steps=1, output_type="latent", generator=seed())
    prompt = "a red cat and a blue dog"
    sd = tiny_sd_pipeline()
    assert _box_settings(generate(sd, prompt, subjects, **call).config) == BOXES_ROUTE
    explicit = generate(sd, prompt, subjects, config=AIT2IConfig(), **call)
    assert _box_settings(explicit.config) == LIBRARY
    cn = generate(controlnet_pipeline("sd"), prompt, subjects, image=edge_picture(), **call)
    assert _box_settings(cn.config) == CONTROLNET_ROUTE
    gligen = generate(gligen_pipe, prompt, subjects, adapter=GLIGENAdapter(gligen_pipe, subjects), **call)
    assert _box_settings(gligen.config) == LIBRARY
    assert ROUTE_SETTINGS["gligen"] == {}


def test_layout_routes_run_the_schedule_they_were_measured_with_unless_a_preset_is_named():
    # The shipped shapes model's ait2i.json guides 5 of 25 steps at 40 (chosen without boxes); every
    # layout figure was measured with the authors' 12 of 25 at 20, which the routes keep.
    from ait2i_ext.adapters.layout import ROUTE_PRESET, ROUTE_SETTINGS, route_config

    from ait2i_ext.shapes.model import default_model_path

    model = default_model_path()
    plain = route_config(None, model).schedule
    assert (plain.guided_fraction, plain.step_scale) == (0.2, 40.0)
    assert ROUTE_PRESET == "reference"
    for route in ROUTE_SETTINGS:
        schedule = route_config(route, model).schedule
        assert (schedule.guided_fraction, schedule.step_scale) == (0.5, 20.0), route
        fast = route_config(route, model, preset="fast").schedule
        assert (fast.guided_fraction, fast.step_scale) == (0.08, 60.0), route
    assert route_config("boxes", model, preset="default").schedule.step_scale == 40.0
    assert route_config("boxes", model, schedule={"step_scale": 7.0}).schedule.step_scale == 7.0


def test_route_settings_lose_to_the_models_file_and_the_callers_fields(tmp_path):
    """Library defaults < the route's settings < the model's ait2i.json < the caller's fields."""
    from ait2i_ext.adapters.layout import route_config

    from ait2i_ext.config import write_model_settings

    assert _box_settings(route_config("boxes")) == BOXES_ROUTE
    assert _box_settings(route_config("controlnet")) == CONTROLNET_ROUTE
    assert _box_settings(route_config("gligen")) == LIBRARY
    write_model_settings(
        tmp_path, loss={"box_members": False, "box_power": 1.5}, schedule={"box_step_scale": 5.0}
    )
    from_file = route_config("boxes", tmp_path)
    assert (from_file.loss.box_members, from_file.loss.box_power) == (False, 1.5)
    assert from_file.schedule.box_step_scale == 5.0
    assert from_file.loss.w_box_topk == 1.0  # the route's, not in the file
    given = route_config("boxes", tmp_path, loss={"w_box_topk": 0.0})
    assert given.loss.w_box_topk == 0.0
    with pytest.raises(ValueError, match="layout route 'sketch' is unknown"):
        route_config("sketch")


def test_generate_on_plain_sd_takes_the_boxes_route_only_with_boxes(tmp_path):
    # Without boxes a plain pipeline runs its model's own schedule (its ait2i.json), with boxes the
    # boxes route's preset (ROUTE_PRESET): the two differ once a model's file sets a schedule.
    from ait2i_ext.adapters.layout import has_boxes
    from diffusers import StableDiffusionPipeline

    from ait2i_ext.config import write_model_settings

    tiny_sd_pipeline().save_pretrained(tmp_path)
    write_model_settings(tmp_path, schedule={"guided_fraction": 0.25, "step_scale": 30.0})
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 4, "output_type": "np"}
    plain = generate(pipe, "a cat and a dog", ["cat", "dog"], **call)
    assert plain.config.schedule.step_scale == 30.0 and [r.step for r in plain.steps] == [0]
    boxed = [Subject("cat", box=(0.0, 0.0, 0.5, 0.5)), "dog"]
    assert has_boxes(boxed) and has_boxes([["cat"], boxed]) and not has_boxes(["cat", "dog"])
    layout = generate(pipe, "a cat and a dog", boxed, **call)
    assert layout.config.schedule.step_scale == 20.0 and layout.config.loss.box_power == 2.0
