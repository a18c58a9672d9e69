import json

import pytest

from ait2i_ext.cli import main


def test_generate_tiny_writes_images_maps_and_json(tmp_path):
    out = tmp_path / "out"
    rc = main(
        [
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "a red circle and a blue square",
            "--steps",
            "4",
            "--compare",
            "--attention-maps",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    stem = "a-red-circle-and-a-blue-square_0"
    for suffix in ["plain.png", "guided.png", "plain_maps.png", "guided_maps.png", "compare.png"]:
        assert f"{stem}_{suffix}" in names
    record = json.loads((out / "run.json").read_text())
    guided = [e for e in record["images"] if e["guidance"]][0]
    assert [g["name"] for g in guided["groups"]] == ["circle", "square"]
    assert len(guided["loss_per_step"]) == 2 and "isolation" in guided["loss_per_step"][0]["losses"]
    assert record["config"]["schedule"]["step_scale"] == 20.0
    assert record["config"]["loss"]["aggregation_radius"] == 5.0  # a user's model: the reference radii


def test_describe(capsys):
    assert (
        main(
            ["describe", "--prompt", "a hippopotamus and a hot dog", "--subjects", "hippopotamus", "hot dog"]
        )
        == 0
    )
    assert "hippo@2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["describe", "--prompt", "a cat", "--subjects", "dog"], "'dog' is not in the prompt 'a cat'"),
        (["describe", "--prompt", "a cat", "--identifier", "sks"], "identifier 'sks' is not in the prompt"),
        (["describe", "--prompt", "a cat", "--model", "./nowhere"], "--model './nowhere' does not exist"),
        (["describe", "--prompt", " "], "--prompt '' is empty"),
        (
            ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "0", "--out", "x"],
            "--steps 0 is invalid",
        ),
        (["generate", "--model", "/nonexistent-dir-ait2i", "--prompt", "a cat", "--out", "x"], "nonexistent"),
    ],
)
def test_bad_input_exit_code_and_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_model_folder_without_model_index(tmp_path, capsys):
    assert (
        main(["generate", "--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "o")]) == 2
    )
    assert "without model_index.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, radii",
    [([], (2.5, 3.0)), (["--aggregation-radius", "4", "--alignment-radius", "4.5"], (4.0, 4.5))],
)
def test_shipped_model_uses_its_own_radii_unless_given(extra, radii, tmp_path):
    out = tmp_path / "out"
    argv = ["generate", "--prompt", "a red circle and a blue square", "--steps", "2", "--out", str(out)]
    assert main([*argv, "--quiet", *extra]) == 0
    loss = json.loads((out / "run.json").read_text())["config"]["loss"]
    assert (loss["aggregation_radius"], loss["alignment_radius"]) == radii


def test_bad_radius_is_refused_before_loading(capsys, tmp_path):
    argv = ["generate", "--model", "tiny", "--prompt", "a cat", "--aggregation-radius", "0"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "aggregation_radius=0.0 is invalid" in capsys.readouterr().err


SHAPES_PROMPT = "a red circle and a blue square"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-images", "0"], "--num-images 0 is invalid: expected in [1, 10000]"),
        (["--guidance-scale", "-3"], "--guidance-scale -3.0 is invalid: expected in [0.0, 50.0]"),
        (["--threads", "0"], "--threads 0 is invalid: expected >= 1"),
        (["--seed", "-1"], "--seed -1 is invalid"),
        (["--width", "63"], "--width 63 is invalid for this model: expected a multiple of 16"),
        (["--height", "72"], "--height 72 is invalid for this model: expected a multiple of 16"),
        (["--gligen", "/nonexistent-ait2i/gligen"], "--gligen '/nonexistent-ait2i/gligen' does not exist"),
        (["--lora", "/nonexistent-ait2i/sks.safetensors"], "does not exist"),
        (["--lora", "missing-lora.safetensors"], "--lora 'missing-lora.safetensors' does not exist"),
        (
            ["--controlnet", "./no-such-net", "--control", "canny:x.png"],
            "--controlnet './no-such-net' does not exist",
        ),
        (["--subjects", "dog"], "'dog' is not in the prompt"),
        (
            ["--box", "circle:0.1,0.1,0.5,0.5", "--box", "square:0.1,0.1,0.5,0.5"],
            "two subjects need different boxes",
        ),
        (["--no-guidance", "--compare"], "--compare and --no-guidance are exclusive"),
        (["--device", "nonsense"], "--device 'nonsense' is invalid"),
    ],
)
def test_bad_input_creates_nothing(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["generate", "--prompt", SHAPES_PROMPT, "--steps", "2", "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback
    assert not out.exists()


@pytest.mark.parametrize(
    "prompt, extra, message",
    [
        ("   ", [], "--prompt '' is empty"),
        ("word " * 80 + "cat", ["--subjects", "cat"], "lies past the tokenizer's 77-token window"),
        (
            "a cat and a dog",
            ["--evaluate"],
            "--evaluate: prompt 'a cat and a dog' names no shapes-world object",
        ),
        (
            SHAPES_PROMPT,
            ["--control", "canny:/nonexistent-ait2i.png", "--controlnet", "x/y"],
            "does not exist",
        ),
    ],
)
def test_bad_prompt_creates_nothing(prompt, extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", prompt, "--steps", "2", "--out", str(out), *extra]) == 2
    assert message.replace("''", repr(prompt.strip()) if prompt.strip() else "''") in capsys.readouterr().err
    assert not out.exists()


def test_cuda_on_a_cpu_build_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["generate", "--prompt", SHAPES_PROMPT, "--device", "cuda", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--device 'cuda' is unavailable: this torch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_api_refuses_zero_steps_and_images(tiny_sd):
    from ait2i_ext import generate

    for key in ("num_inference_steps", "num_images_per_prompt"):
        with pytest.raises(ValueError, match=f"{key}=0 is invalid: expected an integer >= 1"):
            generate(tiny_sd, "a cat and a dog", ["cat", "dog"], **{key: 0})


def test_run_json_is_written_first_and_after_every_image(tmp_path, monkeypatch):
    import ait2i_ext.pipeline as pipeline

    calls = []
    real = pipeline.generate

    def dies_on_the_second_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", dies_on_the_second_image)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["generate", "--model", "tiny", "--prompt", "a cat and a dog", "--steps", "2", "--num-images", "3",
              "--out", str(out), "--quiet"])  # fmt: skip
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running" and record["seeds"] == [0, 1, 2]
    assert [e["file"] for e in record["images"]] == ["a-cat-and-a-dog_0_guided.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a-cat-and-a-dog_0_guided.png", "run.json"]


def test_several_seeds_compare_with_evaluator_marks(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--prompt", SHAPES_PROMPT, "--steps", "3", "--num-images", "2", "--compare"]
    assert main([*argv, "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["evaluator"] == "ait2i_ext.shapes.evaluator"
    assert record["call"]["height"] == record["call"]["width"] == 64  # what was really run
    marks = {label: [e["evaluation"]["correct"] for e in record["images"] if e["guidance"] == (label == "guided")]
             for label in ("plain", "guided")}  # fmt: skip
    assert record["correct"] == {label: sum(m) for label, m in marks.items()}
    assert (out / record["sheet"]).exists() and record["sheet"].endswith("_seeds.png")
    assert f"plain {record['correct']['plain']}/2 right" in capsys.readouterr().out


def test_help_gives_every_option_a_text_and_its_default():
    import argparse

    from ait2i_ext.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"ait2i {name} {action.option_strings}: no help"
            if action.default not in (None, False) and not action.required:
                assert "%(default)s" in action.help or str(action.default) in action.help, (
                    action.option_strings
                )


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("ait2i 0.")


def _run_cli(args, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run(
        [sys.executable, "-m", "ait2i_ext.cli", *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )


def test_quiet_is_silent(tmp_path):
    argv = ["generate", "--prompt", SHAPES_PROMPT, "--subjects", "circle", "square", "--steps", "2"]
    quiet = _run_cli([*argv, "--out", "q", "--quiet"], tmp_path)  # a fresh process: every warning shows
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "q" / "run.json").exists()


def test_progress_bars_stay_out_of_a_log(tmp_path, capfd):
    argv = ["generate", "--prompt", SHAPES_PROMPT, "--subjects", "circle", "square", "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0  # stderr is captured: not a terminal
    out, err = capfd.readouterr()
    assert out.startswith("wrote 1 image(s)") and "\r" not in err and "\x1b[" not in err and "%|" not in err


def test_lora_run_is_quiet_without_quiet(tmp_path, capfd):
    """A UNet-only LoRA: diffusers' "No LoRA keys associated to CLIPTextModel" stays out of the output."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ait2i_ext.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"], init_lora_weights=False)
    )
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
    )
    argv = ["generate", "--model", str(tmp_path / "model"), "--lora", str(tmp_path / "lora"), "--prompt",
            "a cat and a dog", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "out")]  # fmt: skip
    capfd.readouterr()  # what saving the model printed
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert out.startswith("wrote 1 image(s)") and err == "", err


def test_the_models_schedule_reaches_the_cli_and_flags_still_win(tmp_path):
    """A model folder's ait2i.json schedule (not only its radii) applies through `ait2i generate`;
    a flag given on the command line overrides it."""
    import shutil

    from ait2i_ext.config import read_model_settings, write_model_settings
    from ait2i_ext.shapes.model import default_model_path

    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    loss = read_model_settings(model)["loss"]
    write_model_settings(model, loss={**loss, "isolation": "cosine"}, schedule={"step_scale": 7.0})
    base = ["generate", "--model", str(model), "--prompt", "a red circle and a blue square"]
    base += ["--steps", "2", "--quiet"]
    for extra, step_scale, isolation in (
        ([], 7.0, "cosine"),
        (["--step-scale", "3", "--isolation", "euclidean"], 3.0, "euclidean"),
    ):
        out = tmp_path / f"out{step_scale}"
        assert main([*base, *extra, "--out", str(out)]) == 0
        config = json.loads((out / "run.json").read_text())["config"]
        assert config["schedule"]["step_scale"] == step_scale
        assert config["loss"]["isolation"] == isolation
        assert config["loss"]["aggregation_radius"] == loss["aggregation_radius"]


def test_preset_sets_the_schedule_on_top_of_the_models_and_step_scale_wins(tmp_path):
    import shutil

    from ait2i_ext.config import read_model_settings, write_model_settings
    from ait2i_ext.shapes.model import default_model_path

    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    loss = read_model_settings(model)["loss"]
    write_model_settings(model, loss=loss, schedule={"guided_fraction": 0.25, "step_scale": 7.0})
    base = ["generate", "--model", str(model), "--prompt", "a red circle and a blue square"]
    base += ["--steps", "2", "--quiet"]
    for k, (extra, expected) in enumerate(
        [
            ([], (0.25, 7.0)),  # the model's schedule
            (["--preset", "reference"], (0.5, 20.0)),  # the authors', whatever the model's says
            (["--preset", "reference", "--step-scale", "3"], (0.5, 3.0)),
            (["--preset", "fast"], (0.08, 60.0)),  # 2 of 25 guided steps at a larger step
        ]
    ):
        out = tmp_path / f"out{k}"
        assert main([*base, *extra, "--out", str(out)]) == 0
        schedule = json.loads((out / "run.json").read_text())["config"]["schedule"]
        assert (schedule["guided_fraction"], schedule["step_scale"]) == expected, extra


def test_unknown_preset_is_refused_with_the_choices(capsys, tmp_path):
    argv = ["generate", "--prompt", "a cat", "--preset", "turbo", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "'turbo'" in err and "default" in err and "reference" in err
