"""The personalisation adapter on a tiny pipeline: load a LoRA, put the identifier in its noun's group,
generate from Python and the CLI, and refuse bad LoRAs without touching the pipeline. Offline, CPU."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ait2i_ext.adapters import personalize
from ait2i_ext.adapters.layout import subjects_with_boxes
from ait2i_ext.adapters.personalize import (
    RegionalConfig,
    auto_layout,
    box_regions,
    concept_mask,
    for_concepts,
    load_lora,
    load_loras,
    lora_file,
    parse_lora_scale,
    parse_regional,
    personalized_subjects,
    regional_loras,
    regional_prediction,
    strongest_only,
    unload_lora,
    with_layout,
)

from ait2i_ext import AIT2IConfig, ScheduleConfig, Subject, cli, generate, resolve_groups
from ait2i_ext.testing import tiny_sd_pipeline, tiny_unet_config
from ait2i_ext.tokens import with_identifier

try:  # installed: training/ is ait2i_ext.training
    from ait2i_ext.training import train_lora
except ImportError:  # source checkout run from the repository root
    from training import train_lora

PROMPT = "a sks dog and a cat"
SKS = 2  # <bos> a sks dog and a cat: "sks" is token 2, "dog" token 3 (single CLIP tokens)
GUIDED = AIT2IConfig(schedule=ScheduleConfig(guided_fraction=1.0))


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory) -> Path:
    """Two steps of the fine-tuning script, UNet and text encoder, alpha != rank: its output folder."""
    from PIL import Image

    images = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path_factory.mktemp("lora")
    train_lora.main(
        ["--pretrained_model", str(model_dir), "--instance_data_dir", str(images),
         "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "64",
         "--max_train_steps", "2", "--learning_rate", "1e-2", "--rank", "2", "--lora_alpha", "8",
         "--train_text_encoder", "--checkpointing_steps", "1000"]
    )  # fmt: skip
    return out


def _save_random_lora(folder: Path, cross_attention_dim: int = 32) -> Path:
    """A non-zero peft LoRA on a tiny UNet, saved as diffusers does (``save_lora_weights``)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=cross_attention_dim))
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )
    return folder / personalize.LORA_WEIGHT_NAME


def _images(pipe, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a sks dog", num_inference_steps=2, generator=generator, output_type="np").images


def _lora_layers(pipe) -> int:
    return sum(1 for _, m in pipe.unet.named_modules() if getattr(m, "lora_A", None))


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_load_lora_gives_the_images_of_load_lora_weights(trained, as_file):
    reference = tiny_sd_pipeline()
    base = _images(reference)
    reference.load_lora_weights(str(trained))
    expected = _images(reference)
    assert np.abs(expected - base).max() > 1e-4, "the LoRA had no effect: the comparison proves nothing"

    pipe = tiny_sd_pipeline()
    name = load_lora(pipe, trained / personalize.LORA_WEIGHT_NAME if as_file else trained)
    assert pipe.get_list_adapters() == {"unet": [name], "text_encoder": [name]}
    np.testing.assert_allclose(_images(pipe), expected, atol=1e-6)


def test_scale_zero_is_the_base_model_and_unload_restores_it(trained):
    pipe = tiny_sd_pipeline()
    base = _images(pipe)
    name = load_lora(pipe, trained, adapter_name="concept", scale=0.0)
    assert name == "concept"
    np.testing.assert_allclose(_images(pipe), base, atol=1e-6)
    with pytest.raises(ValueError, match=r"adapter_name='concept' is already loaded"):
        load_lora(pipe, trained, adapter_name="concept")
    unload_lora(pipe, "concept")
    assert pipe.get_list_adapters() == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.7", 0.7), ("1", 1.0), ("unet=0.5", {"unet": 0.5, "text_encoder": 1.0}),
     ("text_encoder=0, unet=0.25", {"unet": 0.25, "text_encoder": 0.0})],
)  # fmt: skip
def test_parse_lora_scale(text, expected):
    assert parse_lora_scale(text) == expected


@pytest.mark.parametrize("text", ["x", "-1", "vae=0.5", "unet=", "unet=0.5,unet=1", "unet=-0.1"])
def test_parse_lora_scale_names_a_bad_value(text):
    with pytest.raises(ValueError, match=rf"LoRA scale '{text}' is invalid: expected a weight >= 0"):
        parse_lora_scale(text)


def test_a_per_part_scale_weights_the_unet_and_text_encoder_apart(trained):
    """UNet weight 0 keeps only the text-encoder part: the images of the base UNet with the LoRA's
    text encoder, not those of the full LoRA or of the base model."""
    pipe = tiny_sd_pipeline()
    base = _images(pipe)
    load_loras(pipe, [trained], scales=[parse_lora_scale("unet=0")])
    text_only = _images(pipe)
    reference = tiny_sd_pipeline()
    reference.load_lora_weights(str(trained))
    full = _images(reference)
    reference.unet.disable_adapters()
    np.testing.assert_allclose(text_only, _images(reference), atol=1e-6)
    assert np.abs(text_only - base).max() > 1e-4 and np.abs(text_only - full).max() > 1e-4


# --- grouping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subjects", [None, ["dog", "cat"], ["sks dog", "cat"]], ids=["inferred", "nouns", "phrase"]
)
def test_identifier_joins_its_noun_group(tokenizer, subjects):
    dog, cat = resolve_groups(tokenizer, PROMPT, personalized_subjects(PROMPT, "sks", subjects))
    assert (dog.name, dog.main, dog.members) == ("dog", SKS + 1, (SKS,))
    assert cat.name == "cat" and SKS not in cat.indices


def test_identifier_not_in_the_prompt_raises():
    with pytest.raises(ValueError, match=r"identifier 'zzz' is not in the prompt 'a sks dog and a cat'"):
        personalized_subjects(PROMPT, "zzz")


# --- generating ----------------------------------------------------------------------------------


def test_generate_on_the_lora_pipeline_records_losses(trained, tokenizer):
    pipe = tiny_sd_pipeline()
    load_lora(pipe, trained)
    subjects = with_identifier(["dog", "cat"], "sks", PROMPT)
    out = generate(
        pipe,
        PROMPT,
        subjects,
        config=GUIDED,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    dog, cat = out.groups[0]
    assert SKS in dog.members and SKS not in cat.indices
    assert len(out.steps) >= 2 and all(np.isfinite(s.losses["total"]) for s in out.steps)


def test_concept_with_layout_boxes(trained):
    pipe = tiny_sd_pipeline()
    load_lora(pipe, trained)
    dog_box, cat_box = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
    boxed = subjects_with_boxes(None, {"dog": dog_box, "cat": cat_box}, PROMPT)
    subjects = personalized_subjects(PROMPT, "sks", boxed)
    assert subjects[0] == Subject("dog", identifier="sks", box=dog_box)
    out = generate(
        pipe,
        PROMPT,
        subjects,
        config=GUIDED,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    dog, cat = out.groups[0]
    assert (dog.box, cat.box) == (dog_box, cat_box) and SKS in dog.members
    assert all(s.losses["box"] > 0 for s in out.steps)


def test_cli_generate_with_lora_and_identifier(model_dir, trained, tmp_path):
    out = tmp_path / "out"
    argv = ["generate", "--model", str(model_dir), "--lora", str(trained), "--identifier", "sks",
            "--prompt", PROMPT, "--steps", "2", "--out", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((out / "run.json").read_text())
    groups = {g["name"]: g for g in record["images"][0]["groups"]}
    assert SKS in groups["dog"]["members"] and SKS not in [groups["cat"]["main"], *groups["cat"]["members"]]
    assert record["images"][0]["loss_per_step"]
    assert (out / record["images"][0]["file"]).is_file()


# --- two concepts at once ---------------------------------------------------------------------------

TWO = "a sks dog and a xyz cat"
# the regional mode before the sixth round's defaults
FIFTH_ROUND = RegionalConfig(assign="independent", concept_prompt="full", full_prompt_fraction=0.0)


def test_two_loras_are_active_together_like_diffusers_multi_adapter(trained, tmp_path):
    other = _save_random_lora(tmp_path / "other")
    pipe = tiny_sd_pipeline()
    with warnings.catch_warnings(record=True) as caught:  # peft warns on a second adapter; not for the user
        warnings.simplefilter("always")
        names = load_loras(pipe, [trained, other], adapter_names=["dog", "cat"])
    assert not [w for w in caught if "peft_config" in str(w.message)], (
        "peft's second-adapter warning reached the user"
    )
    assert names == ["dog", "cat"] and set(pipe.get_active_adapters()) == {"dog", "cat"}

    reference = tiny_sd_pipeline()
    reference.load_lora_weights(str(trained), adapter_name="dog")
    reference.load_lora_weights(str(other.parent), adapter_name="cat")
    reference.set_adapters(["dog", "cat"], adapter_weights=[1.0, 1.0])
    both = _images(pipe)
    np.testing.assert_allclose(both, _images(reference), atol=1e-5)
    reference.set_adapters("dog")
    assert np.abs(both - _images(reference)).max() > 1e-4, "the second LoRA had no effect"


def test_load_loras_undoes_every_load_when_one_fails(trained, tmp_path):
    pipe = tiny_sd_pipeline()
    before = _images(pipe)
    with pytest.raises(ValueError, match="does not exist"):
        load_loras(pipe, [trained, tmp_path / "missing"])
    assert _lora_layers(pipe) == 0 or not personalize._adapter_names(pipe)
    np.testing.assert_allclose(_images(pipe), before, atol=1e-6)
    with pytest.raises(ValueError, match="scales=.*one per LoRA path"):
        load_loras(pipe, [trained], scales=[1.0, 0.5])
    with pytest.raises(ValueError, match="at least one LoRA"):
        load_loras(pipe, [])


def test_each_identifier_joins_its_own_group(tokenizer):
    subjects = personalized_subjects(TWO, ["sks", "xyz"])
    assert subjects == [Subject("dog", identifier="sks"), Subject("cat", identifier="xyz")]
    dog, cat = resolve_groups(tokenizer, TWO, subjects)
    # <bos> a sks dog and a xy z cat: "xyz" is two CLIP pieces, both in the cat's group
    assert dog.members == (SKS,) and cat.members == (6, 7) and cat.main == 8
    with pytest.raises(ValueError, match="both precede the subject 'dog'"):
        personalized_subjects("a sks xyz dog and a cat", ["sks", "xyz"])


def test_cli_generate_with_two_loras_and_two_identifiers(model_dir, trained, tmp_path):
    other = _save_random_lora(tmp_path / "other")
    out = tmp_path / "out"
    argv = ["generate", "--model", str(model_dir), "--lora", str(trained), "--lora", str(other),
            "--identifier", "sks", "--identifier", "xyz", "--prompt", TWO, "--steps", "2",
            "--out", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((out / "run.json").read_text())
    groups = {g["name"]: g for g in record["images"][0]["groups"]}
    assert groups["dog"]["members"] == [SKS]
    assert groups["cat"]["members"] and SKS not in groups["cat"]["members"]
    assert record["lora"] == [str(trained), str(other)] and record["identifier"] == ["sks", "xyz"]


def test_cli_lora_scale_weights_every_lora(model_dir, trained, tmp_path):
    def run(name: str, *extra: str) -> np.ndarray:
        argv = ["generate", "--model", str(model_dir), *extra, "--prompt", PROMPT, "--steps", "2",
                "--no-guidance", "--out", str(tmp_path / name), "--device", "cpu", "--quiet"]  # fmt: skip
        assert cli.main(argv) == 0
        record = json.loads((tmp_path / name / "run.json").read_text())
        return np.asarray(Image.open(tmp_path / name / record["images"][0]["file"]), dtype=np.int16)

    from PIL import Image

    base, full = run("base"), run("full", "--lora", str(trained))
    assert np.abs(full - base).max() > 2, "the LoRA had no effect: the comparison proves nothing"
    np.testing.assert_array_equal(run("zero", "--lora", str(trained), "--lora-scale", "0"), base)
    record = json.loads((tmp_path / "zero" / "run.json").read_text())
    assert record["lora_scale"] == ["0"]


# --- regional LoRA: each LoRA only where its concept is ------------------------------------------


def test_concept_mask_covers_the_group_map_peak_and_grows_with_dilation():
    maps = torch.full((2, 4, 4, 5), 0.01)
    maps[0, 1, 1, 2], maps[0, 1, 2, 3] = 0.9, 0.5  # image 0: identifier peak and noun next to it
    maps[1, 3, 3, 3] = 0.9  # image 1: the noun in the corner
    maps[:, 0, 3, 4] = 0.9  # another token's peak: not the group's
    hard = concept_mask(maps, (2, 3), (4, 4), threshold=0.3, softness=0.0)
    assert hard.shape == (2, 1, 4, 4)
    assert hard[0, 0].nonzero().tolist() == [[1, 1], [1, 2]] and hard[1, 0].nonzero().tolist() == [[3, 3]]
    grown = concept_mask(maps, (2, 3), (4, 4), threshold=0.3, softness=0.0, dilation=1)
    assert (grown >= hard).all() and grown[1, 0].sum() == 4 and grown[0, 0, 3, 3] == 0
    soft = concept_mask(maps, (2, 3), (8, 8), threshold=0.3, softness=0.2)
    assert soft.shape == (2, 1, 8, 8) and soft.min() >= 0 and soft.max() <= 1
    assert soft[1, 0, 7, 7] > 0.9 and soft[1, 0, 0, 0] == 0


def test_strongest_only_gives_each_cell_to_one_concept():
    star = torch.tensor([[[1.0, 0.8, 0.4], [0.2, 0.0, 0.5]]])
    heart = torch.tensor([[[0.0, 0.9, 0.3], [0.6, 0.0, 0.5]]])
    kept_star, kept_heart = strongest_only([star, heart])
    assert ((kept_star > 0) & (kept_heart > 0)).sum() == 0, "a cell kept by both concepts"
    torch.testing.assert_close(kept_star + kept_heart, torch.maximum(star, heart))
    assert kept_star[0, 1, 2] == 0.5 and kept_heart[0, 1, 2] == 0  # a tie goes to the first concept
    assert strongest_only([star])[0] is star


def test_held_by_others_marks_the_cells_another_subject_draws_more_attention_to():
    maps = torch.zeros(1, 2, 3, 6)
    maps[0, :, :, 2] = torch.tensor([[0.5, 0.3, 0.1], [0.4, 0.0, 0.2]])  # the concept's identifier
    maps[0, :, :, 3] = 0.1  # the concept's noun
    maps[0, :, :, 5] = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.0, 0.3]])  # the other subject
    held = personalize.held_by_others(maps, (2, 3), [(5,)])
    assert held.tolist() == [[[False, True, True], [True, False, False]]]  # ties stay with the concept
    assert not personalize.held_by_others(maps, (2, 3), []).any()


def test_other_tokens_are_the_groups_no_identifier_precedes(tokenizer):
    assert [sorted(g) for g in personalize.other_tokens(tokenizer, "a sks dog and a red cat", ["sks"])] == [
        [6, 7]
    ]
    assert personalize.other_tokens(tokenizer, TWO, ["sks", "xyz"]) == []


def test_own_prompt_is_the_group_words_alone(tokenizer):
    tokens = personalize.concept_tokens(tokenizer, TWO, ["sks", "xyz"])
    assert [personalize.own_prompt(tokenizer, TWO, tokens[i]) for i in ("sks", "xyz")] == [
        "a sks dog",
        "a xyz cat",
    ]


def test_regional_prediction_is_the_base_outside_every_mask():
    base, star, heart = torch.randn(3, 2, 4, 6, 6)
    left = torch.zeros(2, 1, 6, 6)
    left[..., :3] = 1.0
    out = regional_prediction(base, [star], [left])
    torch.testing.assert_close(out[..., 3:], base[..., 3:])
    torch.testing.assert_close(out[..., :3], star[..., :3])
    both = regional_prediction(base, [star, heart], [left, left])  # overlapping masks share the region
    torch.testing.assert_close(both[..., :3], (star[..., :3] + heart[..., :3]) / 2)
    torch.testing.assert_close(regional_prediction(base, [], []), base)


def test_regional_prediction_gain_pushes_each_concept_further_inside_its_mask():
    base, star = torch.randn(2, 2, 4, 6, 6)
    left = torch.zeros(2, 1, 6, 6)
    left[..., :3] = 1.0
    out = regional_prediction(base, [star], [left], gain=1.5)
    torch.testing.assert_close(out[..., 3:], base[..., 3:])
    torch.testing.assert_close(out[..., :3], base[..., :3] + 1.5 * (star[..., :3] - base[..., :3]))


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", 1.5), ("softness", -0.1), ("dilation", -1), ("mask_source", "next"), ("assign", "max")]
    + [
        ("concept_prompt", "mine"),
        ("full_prompt_fraction", 2.0),
        ("exclude_others", "yes"),
        ("arrangement", "ring"),
        ("gain", -1.0),
    ],
)
def test_regional_config_names_a_bad_value(field, value):
    with pytest.raises(ValueError, match=rf"RegionalConfig\({field}=.*\) is invalid: expected"):
        RegionalConfig(**{field: value})


def _unet_call(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, timestep and the prompt's embeddings for one UNet call, as the pipeline makes them."""
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    return latents, torch.tensor(500), embeds


def _predictions(pipe, x, t, embeds) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction with its LoRA and without (and the LoRA must change it)."""
    with torch.no_grad():
        lora = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        pipe.unet.disable_lora()
        base = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        pipe.unet.enable_lora()
    assert (lora - base).abs().max() > 1e-4, "the LoRA had no effect: the comparison proves nothing"
    return lora, base


def test_regional_lora_confines_the_lora_to_its_mask(tmp_path, monkeypatch):
    """Outside the mask the prediction is the base UNet's (no LoRA), inside it the LoRA's."""
    pipe = tiny_sd_pipeline()
    name = load_lora(pipe, _save_random_lora(tmp_path / "concept"))
    x, t, embeds = _unet_call(pipe, "a sks dog")
    lora, base = _predictions(pipe, x, t, embeds)

    def right_half(level, size, *args):
        mask = torch.zeros(level.shape[0], 1, *size)
        mask[..., size[1] // 2 :] = 1.0
        return mask

    monkeypatch.setattr(personalize, "level_mask", right_half)
    with regional_loras(pipe, "a sks dog", {"sks": name}) as hook, torch.no_grad():
        out = pipe.unet(x, t, encoder_hidden_states=embeds).sample
    assert hook.passes == 1
    torch.testing.assert_close(out[..., :8], base[..., :8])
    torch.testing.assert_close(out[..., 8:], lora[..., 8:])
    with torch.no_grad():  # on exit the LoRA is active everywhere again
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=embeds).sample, lora)


@pytest.mark.parametrize(
    "config",
    [
        FIFTH_ROUND,
        RegionalConfig(assign="strongest", concept_prompt="own"),
        RegionalConfig(assign="strongest", concept_prompt="own", full_prompt_fraction=0.5),
    ],
    ids=["full-prompt", "own-prompt", "full-then-own-prompt"],
)
def test_regional_lora_runs_one_lora_pass_per_concept_and_step(trained, tmp_path, config):
    other = _save_random_lora(tmp_path / "other")
    pipe = tiny_sd_pipeline()
    names = load_loras(pipe, [trained, other])
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with regional_loras(pipe, TWO, dict(zip(["sks", "xyz"], names)), num_images=2, config=config) as hook:
        out = generate(pipe, TWO, personalized_subjects(TWO, ["sks", "xyz"]), num_inference_steps=3,
                       num_images_per_prompt=2, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert hook.passes == 2 * 3 and len(out.images) == 2
    assert set(pipe.get_active_adapters()) == set(names)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors  # captures all ended
    with pytest.raises(ValueError, match=r"UNet got a batch of 2, expected num_images=3"):
        with regional_loras(pipe, TWO, dict(zip(["sks", "xyz"], names)), num_images=3):
            pipe(TWO, num_inference_steps=1, guidance_scale=1.0, num_images_per_prompt=2)


def test_exclude_others_leaves_the_other_subjects_place_to_the_base_pass(tmp_path, monkeypatch):
    """The concept's mask covers everything, the cat holds the right half: with ``exclude_others`` the
    right half is the no-LoRA prediction, without it the LoRA's."""
    pipe = tiny_sd_pipeline()
    name = load_lora(pipe, _save_random_lora(tmp_path / "concept"))
    x, t, embeds = _unet_call(pipe, PROMPT)
    with torch.no_grad():
        lora = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        pipe.unet.disable_lora()
        base = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        pipe.unet.enable_lora()
    cat = personalize.other_tokens(pipe.tokenizer, PROMPT, ["sks"])

    def right_half(maps, tokens, others):
        assert list(others) == cat
        held = torch.zeros(maps.shape[:3], dtype=torch.bool)
        held[..., maps.shape[2] // 2 :] = True
        return held

    monkeypatch.setattr(personalize, "group_level", lambda maps, tokens: torch.ones(maps.shape[:3]))
    monkeypatch.setattr(personalize, "held_by_others", right_half)
    hard = dict(threshold=0.5, softness=0.0, dilation=0)
    for exclude, right in ((True, base), (False, lora)):
        config = RegionalConfig(exclude_others=exclude, **hard)
        with regional_loras(pipe, PROMPT, {"sks": name}, config=config), torch.no_grad():
            out = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        torch.testing.assert_close(out[..., :6], lora[..., :6])  # away from the bilinear border
        torch.testing.assert_close(out[..., 10:], right[..., 10:])


def test_for_concepts_settles_auto_by_the_number_of_concepts():
    assert for_concepts(RegionalConfig(), 2).concept_prompt == "own"
    assert for_concepts(RegionalConfig(), 1).concept_prompt == "full"
    assert for_concepts(RegionalConfig(concept_prompt="full"), 2).concept_prompt == "full"


def _regional_images(pipe, prompt, adapters, config):
    with regional_loras(pipe, prompt, adapters, config=config):
        out = generate(pipe, prompt, personalized_subjects(prompt, list(adapters)), num_inference_steps=3,
                       generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    return out.images


def test_default_regional_mode_is_the_fifth_rounds_with_one_concept_own_prompts_with_two(trained, tmp_path):
    pipe = tiny_sd_pipeline()
    names = load_loras(pipe, [trained, _save_random_lora(tmp_path / "other")])
    one = {"sks": names[0]}
    np.testing.assert_array_equal(
        _regional_images(pipe, PROMPT, one, RegionalConfig()),
        _regional_images(pipe, PROMPT, one, FIFTH_ROUND),
    )
    two = dict(zip(["sks", "xyz"], names))
    default = _regional_images(pipe, TWO, two, RegionalConfig())
    own = RegionalConfig(concept_prompt="own", full_prompt_fraction=0.3, assign="strongest")
    np.testing.assert_array_equal(default, _regional_images(pipe, TWO, two, own))
    assert np.abs(default - _regional_images(pipe, TWO, two, FIFTH_ROUND)).max() > 1e-4


def test_own_prompt_passes_read_the_concept_words_as_its_text_encoder_lora_encodes_them(trained, tmp_path):
    pipe = tiny_sd_pipeline()
    names = load_loras(pipe, [trained, _save_random_lora(tmp_path / "other")])
    config = RegionalConfig(concept_prompt="own", full_prompt_fraction=0.5)
    with regional_loras(pipe, TWO, dict(zip(["sks", "xyz"], names)), config=config) as hook:
        pipe.set_adapters([names[0]])
        expected = pipe.encode_prompt("a sks dog", "cpu", 1, False)[0]
        pipe.set_adapters(names)
    torch.testing.assert_close(hook.embeds["own"]["sks"], expected)
    assert not torch.allclose(hook.embeds["full"]["sks"], expected)  # the whole prompt before the switch


def test_a_prompt_without_identifier_runs_no_lora_at_all(trained):
    """Zero drift by construction: no LoRA pass, the text encoder's LoRA off too: the stock images."""
    stock = tiny_sd_pipeline()
    expected = stock(
        "a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    pipe = tiny_sd_pipeline()
    name = load_lora(pipe, trained)
    call = dict(num_inference_steps=2, output_type="np")
    with_lora = pipe("a dog", generator=torch.Generator().manual_seed(0), **call).images
    assert np.abs(with_lora - expected.images).max() > 1e-4, "the LoRA had no effect: the test proves nothing"
    with regional_loras(pipe, "a dog", {"sks": name}) as hook:
        images = pipe("a dog", generator=torch.Generator().manual_seed(0), **call).images
    assert hook is None
    np.testing.assert_allclose(images, expected.images, atol=1e-6)
    again = pipe("a dog", generator=torch.Generator().manual_seed(0), **call).images
    np.testing.assert_allclose(again, with_lora, atol=1e-6)  # restored on exit


def test_regional_lora_refuses_an_adapter_that_is_not_loaded(trained):
    pipe = tiny_sd_pipeline()
    load_lora(pipe, trained, adapter_name="dog")
    with pytest.raises(
        ValueError, match=r"adapters \['cat'\] are not loaded in this pipeline: loaded are \['dog'\]"
    ):
        with regional_loras(pipe, PROMPT, {"sks": "cat"}):
            pass


def test_cli_generate_with_regional_lora(model_dir, trained, tmp_path):
    other = _save_random_lora(tmp_path / "other")
    out = tmp_path / "out"
    argv = ["generate", "--model", str(model_dir), "--lora", str(trained), "--lora", str(other),
            "--identifier", "sks", "--identifier", "xyz", "--regional-lora", "--prompt", TWO, "--steps", "2",
            "--out", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["regional_lora"] is True and (out / record["images"][0]["file"]).is_file()


def test_parse_regional_reads_typed_fields_and_names_a_bad_item():
    config = parse_regional(" assign=strongest, threshold=0.4,dilation=2 ")
    assert config == RegionalConfig(assign="strongest", threshold=0.4, dilation=2)
    assert parse_regional("") == RegionalConfig()
    with pytest.raises(ValueError, match=r"'colour=red' is invalid: expected name=value with a name of \["):
        parse_regional("colour=red")
    with pytest.raises(ValueError, match=r"'dilation=1.5' is invalid: expected an integer"):
        parse_regional("dilation=1.5")
    with pytest.raises(ValueError, match="assign"):
        parse_regional("assign=nearest")
    assert parse_regional("exclude_others=true,threshold=0.3").exclude_others is True
    assert parse_regional("exclude_others=False").exclude_others is False
    with pytest.raises(ValueError, match=r"'exclude_others=maybe' is invalid: expected true or false"):
        parse_regional("exclude_others=maybe")


def _cli_regional(monkeypatch, model_dir, trained, out, *flags) -> tuple[list[dict], dict]:
    """``ait2i generate --lora --identifier sks --regional-lora *flags`` on PROMPT: the keyword arguments of
    every ``regional_loras`` call, and ``run.json``."""
    calls = []
    real = personalize.regional_loras

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(personalize, "regional_loras", spy)
    argv = ["generate", "--model", str(model_dir), "--lora", str(trained), "--identifier", "sks",
            "--regional-lora", *flags, "--prompt", PROMPT, "--steps", "2", "--out", str(out),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    return calls, json.loads((out / "run.json").read_text())


def test_cli_regional_fields_reach_the_regional_mode(model_dir, trained, tmp_path, monkeypatch):
    fields = "assign=strongest,concept_prompt=own"
    calls, record = _cli_regional(monkeypatch, model_dir, trained, tmp_path / "out", "--regional", fields)
    assert [c["config"] for c in calls] == [RegionalConfig(assign="strongest", concept_prompt="own")]
    assert record["regional"] == fields


def test_cli_bad_regional_fields_are_one_line_errors(model_dir, trained, tmp_path, capsys):
    base = ["generate", "--model", str(model_dir), "--lora", str(trained), "--identifier", "sks",
            "--prompt", PROMPT, "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(base + ["--regional-lora", "--regional", "threshold=2"]) == 2
    assert "--regional: " in capsys.readouterr().err
    assert cli.main(base + ["--regional", "assign=strongest"]) == 2
    assert "--regional 'assign=strongest' needs --regional-lora" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_regional_lora_needs_one_identifier_per_lora(model_dir, trained, tmp_path, capsys):
    argv = ["generate", "--model", str(model_dir), "--lora", str(trained), "--regional-lora",
            "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path), "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "one --identifier per --lora (got 1 --lora, 0 --identifier)" in capsys.readouterr().err
    no_lora = [
        "generate",
        "--model",
        str(model_dir),
        "--regional-lora",
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path),
    ]
    assert cli.main(no_lora) == 2
    assert "--regional-lora needs at least one --lora" in capsys.readouterr().err


# --- bad input -----------------------------------------------------------------------------------


def test_cli_identifier_not_in_prompt_exits_2(model_dir, trained, tmp_path, capsys):
    argv = ["generate", "--model", str(model_dir), "--lora", str(trained), "--identifier", "zzz",
            "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path), "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "identifier 'zzz' is not in the prompt 'a sks dog and a cat'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("scales", "match"),
    [(["1", "1"], r"--lora-scale given 2 time\(s\) for 1 --lora: expected once"),
     (["unet=x"], r"LoRA scale 'unet=x' is invalid")],
)  # fmt: skip
def test_cli_bad_lora_scale_exits_2(model_dir, trained, tmp_path, capsys, scales, match):
    argv = ["generate", "--model", str(model_dir), "--lora", str(trained), "--prompt", PROMPT,
            "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]  # fmt: skip
    for scale in scales:
        argv += ["--lora-scale", scale]
    assert cli.main(argv) == 2
    assert re.search(match, capsys.readouterr().err) and not (tmp_path / "out").exists()


def test_cli_pickle_lora_exits_2(model_dir, tmp_path, capsys):
    pickle = tmp_path / "concept.bin"
    torch.save({"unet.x.lora.down.weight": torch.zeros(1)}, pickle)
    argv = ["generate", "--model", str(model_dir), "--lora", str(pickle), "--prompt", PROMPT,
            "--steps", "2", "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "only safetensors is loaded" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", r"LoRA '.*nowhere' does not exist"),
        ("bin", r"LoRA '.*concept\.bin' is a pickle \(\.bin\): only safetensors is loaded"),
        ("ckpt", r"LoRA '.*concept\.ckpt' is a pickle \(\.ckpt\): only safetensors is loaded"),
        (
            "pickle_folder",
            r"holds only pickle weights \['pytorch_lora_weights\.bin'\]: only safetensors is loaded",
        ),
        ("empty_folder", r"LoRA folder '.*empty' has no pytorch_lora_weights\.safetensors"),
        ("corrupt", r"could not be read as safetensors"),
    ],
)
def test_bad_lora_paths_raise_naming_the_path(case, match, tmp_path):
    paths = {
        "missing": tmp_path / "nowhere",
        "bin": tmp_path / "concept.bin",
        "ckpt": tmp_path / "concept.ckpt",
        "pickle_folder": tmp_path / "pickled",
        "empty_folder": tmp_path / "empty",
        "corrupt": tmp_path / "corrupt.safetensors",
    }
    for name in ("bin", "ckpt"):
        paths[name].write_bytes(b"pickle")
    paths["pickle_folder"].mkdir()
    (paths["pickle_folder"] / "pytorch_lora_weights.bin").write_bytes(b"pickle")
    paths["empty_folder"].mkdir()
    paths["corrupt"].write_bytes(b"not a safetensors header")
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match=match):
        load_lora(pipe, paths[case])
    assert pipe.get_list_adapters() == {}


def test_lora_for_another_cross_attention_dim_raises_naming_key_and_shapes(tmp_path):
    file = _save_random_lora(tmp_path, cross_attention_dim=16)
    pipe = tiny_sd_pipeline()
    base = _images(pipe)
    with pytest.raises(
        ValueError,
        match=r"key 'unet\..*attn2\.to_k\.lora_A\.weight' has shape \(2, 16\) but layer .*has 32 inputs",
    ):
        load_lora(pipe, file)
    assert pipe.get_list_adapters() == {} and _lora_layers(pipe) == 0
    np.testing.assert_allclose(_images(pipe), base, atol=0)


def test_lora_with_keys_naming_no_layer_raises(tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(_save_random_lora(tmp_path / "good")))
    renamed = {k.replace("attn2.to_k", "attn2.to_kk"): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    pipe = tiny_sd_pipeline()
    with pytest.raises(
        ValueError, match=r"\d+ key\(s\) name no layer of \['text_encoder', 'unet'\], e\.g\. \['unet\..*to_kk"
    ):
        load_lora(pipe, tmp_path / "renamed.safetensors")
    assert pipe.get_list_adapters() == {} and _lora_layers(pipe) == 0


def test_a_load_that_adapts_too_few_layers_is_undone(tmp_path, monkeypatch):
    """diffusers/peft may skip layers silently: the adapter checks after loading and unloads."""
    file = _save_random_lora(tmp_path)
    pipe = tiny_sd_pipeline()
    base = _images(pipe)
    monkeypatch.setattr(personalize, "_injected", lambda model, name: set())
    with pytest.raises(ValueError, match=r"unet layer\(s\) were not adapted after loading"):
        load_lora(pipe, file)
    assert pipe.get_list_adapters() == {}
    np.testing.assert_allclose(_images(pipe), base, atol=0)


def test_lora_file_accepts_a_training_checkpoint_folder(trained, tmp_path):
    assert lora_file(trained) == trained / "pytorch_lora_weights.safetensors"
    with pytest.raises(ValueError, match=r"is not a \.safetensors file"):
        (tmp_path / "weights.txt").write_text("x")
        lora_file(tmp_path / "weights.txt")


# --- regions that do not move: layout boxes ------------------------------------------------------


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


@pytest.mark.parametrize("aspect", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_auto_layout_places_equal_boxes_in_order_along_the_long_axis(count, aspect):
    boxes = auto_layout(count, 0.42, aspect)
    assert len(boxes) == count
    axis = 0 if aspect >= 1 else 1
    for box in boxes:
        assert all(0.0 <= v <= 1.0 for v in box) and box[0] < box[2] and box[1] < box[3]
        width, height = (box[2] - box[0]) * aspect, box[3] - box[1]  # in units of the image height
        assert width == pytest.approx(height, abs=1e-5)  # square in pixels (6 decimals)
        assert min(width, height) <= 0.42 + 1e-9
        assert (box[1] + box[3]) / 2 == pytest.approx(0.5) or (box[0] + box[2]) / 2 == pytest.approx(0.5)
    centres = [(b[axis] + b[axis + 2]) / 2 for b in boxes]
    assert centres == sorted(centres) and len(set(centres)) == count
    assert all(_overlap(a, b) < 1e-12 for i, a in enumerate(boxes) for b in boxes[i + 1 :])  # may touch
    with pytest.raises(ValueError, match=r"count=0 is invalid"):
        auto_layout(0, 0.4)


@pytest.mark.parametrize("count", [2, 3])
def test_auto_layout_diagonal_puts_the_boxes_farther_apart_on_the_diagonal(count):
    row, diagonal = auto_layout(count, 0.42), auto_layout(count, 0.42, arrangement="diagonal")
    assert [(b[0], b[2]) for b in diagonal] == [(b[0], b[2]) for b in row]  # the same columns
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in diagonal]
    assert all(x == pytest.approx(y) for x, y in centres)  # on the diagonal, top left first
    spread = [math.dist(a, b) for a, b in zip(centres, centres[1:])]
    assert all(s > 1.4 * (1 / count) for s in spread)  # the row's centres are 1 / count apart
    assert all(_overlap(a, b) < 1e-12 for i, a in enumerate(diagonal) for b in diagonal[i + 1 :])
    with pytest.raises(ValueError, match=r"arrangement='ring' is invalid"):
        auto_layout(2, 0.4, arrangement="ring")


def test_box_regions_share_the_image_among_the_boxes_nearest_first():
    left, right = (0.05, 0.3, 0.45, 0.7), (0.55, 0.3, 0.95, 0.7)
    hard = box_regions([left, right], (16, 16), 0.0)
    torch.testing.assert_close(hard[0] + hard[1], torch.ones(1, 1, 16, 16))  # every cell to one box
    assert bool((hard[0][..., :8] == 1).all()) and bool((hard[1][..., 8:] == 1).all())
    soft = box_regions([left, right], (16, 16), 0.25)
    torch.testing.assert_close(soft[0] + soft[1], torch.ones(1, 1, 16, 16))  # a ramp between the two
    assert 0.0 < float(soft[0][0, 0, 8, 8]) < 1.0 and float(soft[0][0, 0, 8, 0]) == 1.0
    torch.testing.assert_close(box_regions([left], (4, 4), 0.1)[0], torch.ones(1, 1, 4, 4))


def test_for_concepts_settles_the_mask_source_by_concepts_and_boxes():
    auto = RegionalConfig(mask_source="auto")
    assert RegionalConfig().mask_source == "auto"  # the default
    assert for_concepts(auto, 2).mask_source == "mean"  # no boxes: attention, as measured best
    assert for_concepts(auto, 1).mask_source == "mean"
    assert for_concepts(auto, 1, boxed=True).mask_source == "regions"
    assert for_concepts(auto, 2, boxed=True).mask_source == "regions"
    assert for_concepts(RegionalConfig(mask_source="current"), 2, boxed=True).mask_source == "current"


def test_with_layout_gives_every_subject_a_box_only_when_the_concepts_have_none():
    two = personalized_subjects(TWO, ["sks", "xyz"])
    boxes = RegionalConfig(mask_source="regions", box_size=0.4)
    laid = with_layout(two, boxes)
    assert [s.box for s in laid] == auto_layout(2, 0.4) and [s.identifier for s in laid] == ["sks", "xyz"]
    assert [s.box for s in with_layout(two, RegionalConfig(mask_source="mean"))] == [None, None]
    given = subjects_with_boxes(two, {"dog": (0.5, 0.1, 0.9, 0.5), "cat": (0.0, 0.5, 0.4, 0.9)}, TWO)
    assert with_layout(given, boxes) == given  # the user's boxes win
    one = personalized_subjects(PROMPT, "sks")  # one concept and a cat: boxes for both on request
    assert [s.box for s in with_layout(one, boxes)] == auto_layout(2, 0.4)
    assert [s.box for s in with_layout(one, RegionalConfig(mask_source="auto"))] == [None, None]
    diagonal = with_layout(two, replace(boxes, arrangement="diagonal"))
    assert [s.box for s in diagonal] == auto_layout(2, 0.4, arrangement="diagonal")
    half = subjects_with_boxes(two, {"dog": (0.5, 0.1, 0.9, 0.5)}, TWO)
    with pytest.raises(ValueError, match=r"concepts \['xyz'\] have no box while \['sks'\] have one"):
        with_layout(half, boxes)


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_regional_lora_with_boxes_gives_each_region_to_its_subject(tmp_path, gain):
    """mask_source="regions": the LoRA's prediction on the concept's side (its box nearest), the no-LoRA
    prediction on the other subject's side, at every step; ``gain`` multiplies the LoRA's change there."""
    pipe = tiny_sd_pipeline()
    name = load_lora(pipe, _save_random_lora(tmp_path / "concept"))
    x, t, embeds = _unet_call(pipe, PROMPT)
    lora, base = _predictions(pipe, x, t, embeds)
    boxes = {"dog": (0.6, 0.2, 0.9, 0.8), "cat": (0.1, 0.2, 0.4, 0.8)}
    subjects = subjects_with_boxes(personalized_subjects(PROMPT, "sks"), boxes, PROMPT)
    config = RegionalConfig(mask_source="regions", box_softness=0.0, gain=gain)
    with regional_loras(pipe, PROMPT, {"sks": name}, config=config, subjects=subjects) as hook:
        with torch.no_grad():
            outs = [pipe.unet(x, t, encoder_hidden_states=embeds).sample for _ in range(2)]
    assert hook.passes == 2
    for out in outs:
        torch.testing.assert_close(out[..., :8], base[..., :8])
        torch.testing.assert_close(out[..., 8:], base[..., 8:] + gain * (lora[..., 8:] - base[..., 8:]))


def test_two_concepts_without_boxes_get_the_automatic_layout(trained, tmp_path, monkeypatch):
    """Two concepts, mask_source="regions", no boxes: the image is shared between auto_layout's two boxes."""
    pipe = tiny_sd_pipeline()
    names = load_loras(pipe, [trained, _save_random_lora(tmp_path / "other")])
    seen = []
    real = personalize.box_regions
    monkeypatch.setattr(
        personalize, "box_regions", lambda boxes, *args: seen.append(boxes) or real(boxes, *args)
    )
    config = RegionalConfig(mask_source="regions", concept_prompt="full")
    with regional_loras(pipe, TWO, dict(zip(["sks", "xyz"], names)), config=config) as hook:
        pipe(TWO, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    layout = auto_layout(2, config.box_size)
    assert hook.layout == layout and hook.boxes == {"sks": 0, "xyz": 1}
    assert seen == [layout] and hook.passes == 2


def test_mixed_masks_take_the_layout_first_then_the_attention(trained, tmp_path, monkeypatch):
    """mask_source="mixed": the layout's regions while t > (1 - regions_fraction) * T, then the
    attention masks (their mean over the steps after the switch)."""
    pipe = tiny_sd_pipeline()
    names = load_loras(pipe, [trained, _save_random_lora(tmp_path / "other")])
    used = []
    real_regions, real_masks = personalize.box_regions, personalize._RegionalHook.masks
    monkeypatch.setattr(
        personalize, "box_regions", lambda boxes, *args: used.append("regions") or real_regions(boxes, *args)
    )
    monkeypatch.setattr(
        personalize._RegionalHook, "masks", lambda self, *args: used.append("maps") or real_masks(self, *args)
    )
    config = RegionalConfig(mask_source="mixed", regions_fraction=0.5, concept_prompt="full")
    with regional_loras(pipe, TWO, dict(zip(["sks", "xyz"], names)), config=config) as hook:
        pipe(TWO, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    steps = [float(t) for t in pipe.scheduler.timesteps]
    early = sum(t > 500 for t in steps)
    assert 0 < early < 4 and used == ["regions"] * early + ["maps"] * (4 - early)
    assert hook.layout == auto_layout(2, config.box_size) and hook.passes == 2 * 4
    assert all(count == 4 - early for count in hook.counts.values())  # the mean starts after the switch


def test_cli_mixed_masks_get_the_automatic_layout(model_dir, trained, tmp_path, monkeypatch):
    fields = "mask_source=mixed,arrangement=diagonal,gain=1.2"
    calls, _ = _cli_regional(monkeypatch, model_dir, trained, tmp_path / "out", "--regional", fields)
    config = RegionalConfig(mask_source="mixed", arrangement="diagonal", gain=1.2)
    assert [c["config"] for c in calls] == [config]
    boxes = [(s.identifier, s.box) for s in calls[0]["subjects"]]
    assert boxes == list(zip(["sks", None], auto_layout(2, config.box_size, arrangement="diagonal")))


def test_cli_box_with_regional_lora_reaches_the_regions(model_dir, trained, tmp_path, monkeypatch):
    box = ("--box", "dog:0.5,0.1,0.9,0.6")
    calls, record = _cli_regional(monkeypatch, model_dir, trained, tmp_path / "out", *box)
    boxes = [(s.identifier, s.box) for s in calls[0]["subjects"]]
    assert boxes == [("sks", (0.5, 0.1, 0.9, 0.6)), (None, None)]
    assert record["layout"]["route"] is None and record["layout"]["gligen"] is None  # no GLIGEN for a LoRA
