"""The benchmark scripts run end to end on tiny components (their figures are not checked here)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def random_shapes_model(tmp_path_factory):
    from ait2i_ext.shapes.model import build_shapes_pipeline

    path = tmp_path_factory.mktemp("shapes") / "model"
    build_shapes_pipeline().save_pretrained(path)
    return path


def shapes_two(model) -> list[str]:
    """Benchmark arguments for the first prompt of the ``two`` set on ``model``."""
    return ["--model", str(model), "--prompts", "shapes", "--sets", "two", "--prompts-per-set", "1"]


def test_alignment_benchmark_runs_and_writes_its_table(random_shapes_model, tmp_path, capsys):
    alignment = _load("alignment")
    argv = shapes_two(random_shapes_model)
    argv += [
        "--seeds",
        "2",
        "--seed-offset",
        "1000",
        "--steps",
        "2",
        "--methods",
        "plain,ait2i,ait2i-boxes,ait2i-lagged",
        "--out",
        str(tmp_path),
    ]
    assert alignment.main(argv) == 0
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"plain", "ait2i", "ait2i-boxes", "ait2i-lagged"}
    assert all(r["n"] == 2 and 0.0 <= r["in_box"] <= 1.0 for r in rows)
    out = capsys.readouterr().out
    assert "ait2i-boxes" in out
    assert (tmp_path / "examples.png").exists()  # examples come from the first seed, 1000 here
    assert "2 seeds from 1000" in out


def test_alignment_benchmark_gligen_methods_share_seeds(random_shapes_model, tmp_path):
    from ait2i_ext.training.train_gligen import gligen_pipeline_from
    from diffusers import StableDiffusionPipeline

    gligen = tmp_path / "gligen"
    gligen_pipeline_from(StableDiffusionPipeline.from_pretrained(random_shapes_model)).save_pretrained(gligen)
    argv = shapes_two(random_shapes_model)
    methods = "plain,gligen,gligen-ait2i,gligen-ait2i@fast"
    argv += ["--seeds", "2", "--first-seed", "7", "--steps", "2", "--methods", methods]
    out = tmp_path / "out"
    assert _load("alignment").main([*argv, "--gligen", str(gligen), "--out", str(out)]) == 0
    table = json.loads((out / "table.json").read_text())
    rows = {(r["set"], r["method"]): r for r in table["rows"]}
    assert {m for _, m in rows} == set(methods.split(","))
    assert all(r["n"] == 2 and 0.0 <= r["in_box"] <= 1.0 and r["cpu_seconds"] > 0 for r in rows.values())
    assert table["args"]["first_seed"] == 7
    records = json.loads((out / "records.json").read_text())  # one per image, for paired counts
    assert sorted((r["method"], r["seed"]) for r in records) == [
        (m, s) for m in ("gligen", "gligen-ait2i", "gligen-ait2i@fast", "plain") for s in (7, 8)
    ]


def test_method_at_preset_runs_the_models_schedule_under_that_preset(tmp_path):
    from ait2i_ext.adapters.layout import route_config

    from ait2i_ext.config import PRESETS, write_model_settings

    alignment = _load("alignment")
    write_model_settings(tmp_path, schedule={"guided_fraction": 0.2, "step_scale": 40.0})
    args = argparse.Namespace(
        schedule=alignment.schedule_overrides(tmp_path, "default"),
        route_schedule=alignment.schedule_overrides(tmp_path, "reference"),
        preset_schedules={p: alignment.schedule_overrides(tmp_path, p) for p in PRESETS},
    )
    assert alignment.split_method("gligen-ait2i@fast") == ("gligen-ait2i", "fast")
    assert alignment.split_method("gligen") == ("gligen", None)
    assert alignment.method_schedule("gligen-ait2i", args) == {"guided_fraction": 0.5, "step_scale": 20.0}
    for preset in ("default", "fast"):
        method = f"controlnet-ait2i-boxes@{preset}"
        schedule = alignment.method_schedule(method, args)
        config = alignment.method_config("controlnet-ait2i-boxes", "truncated", None, None, schedule)
        assert config.schedule == route_config("controlnet", tmp_path, preset=preset).schedule, method
    assert alignment.method_schedule("gligen-ait2i@default", args) == {
        "guided_fraction": 0.2,
        "step_scale": 40.0,
    }
    records = [
        {"set": "two", "method": m, "prompt": "p", "seed": 0, "correct": c}
        for m, c in (("gligen", 0.0), ("gligen-ait2i@fast", 1.0))
    ]
    assert alignment.format_paired(records, ["gligen", "gligen-ait2i@fast"])[0] == (
        "paired two: gligen-ait2i@fast vs gligen: correct +1/-0"
    )
    for bad in ("gligen@fast", "gligen-ait2i@slow", "magic@fast"):
        with pytest.raises(ValueError, match=f"'{bad}' is invalid"):
            alignment.split_method(bad)
    with pytest.raises(SystemExit, match="--methods: 'controlnet@default' is invalid: @PRESET takes one of"):
        alignment.main(["--methods", "controlnet@default", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_paired_counts_compare_the_same_prompt_and_seed():
    alignment = _load("alignment")

    def record(method, seed, correct, prompt="p"):
        return {
            "set": "two",
            "method": method,
            "prompt": prompt,
            "seed": seed,
            "correct": correct,
            "in_box": 0.5,
        }

    records = [record("controlnet", s, c) for s, c in enumerate([1.0, 0.0, 0.0, 1.0])]
    records += [record("controlnet-ait2i-boxes", s, c) for s, c in enumerate([1.0, 1.0, 1.0, 0.0])]
    records += [record("controlnet-ait2i-boxes", 0, 1.0, prompt="other")]  # no plain image to pair with
    assert alignment.paired_counts(records, "controlnet-ait2i-boxes", "controlnet", "correct") == (2, 1)
    assert alignment.paired_counts(records, "controlnet-ait2i-boxes", "controlnet", "in_box") == (0, 0)
    lines = alignment.format_paired(records, ["controlnet", "controlnet-ait2i-boxes"])
    assert lines == [
        "paired two: controlnet-ait2i-boxes vs controlnet: correct +2/-1, in_box +0/-0",
        "paired all: controlnet-ait2i-boxes vs controlnet: correct +2/-1, in_box +0/-0",
    ]


def test_alignment_benchmark_gligen_methods_read_the_gligen_models_settings(random_shapes_model, tmp_path):
    # The GLIGEN methods take their loss settings from the GLIGEN folder's ait2i.json (as the CLI's
    # GLIGEN route does), not from the base model's: a bad value there is refused before any sampling.
    gligen = tmp_path / "gligen"
    gligen.mkdir()
    (gligen / "ait2i.json").write_text(json.dumps({"loss": {"aggregation_radius": -1.0}}))
    argv = [*shapes_two(random_shapes_model), "--methods", "gligen-ait2i", "--gligen", str(gligen)]
    with pytest.raises(SystemExit, match=r"--gligen: .*ait2i.json.*aggregation_radius"):
        _load("alignment").main([*argv, "--out", str(tmp_path / "out")])


def test_alignment_benchmark_rejects_unknown_methods(random_shapes_model, tmp_path):
    with pytest.raises(SystemExit, match="'magic' is invalid"):
        _load("alignment").main(
            ["--model", str(random_shapes_model), "--methods", "plain,magic", "--out", str(tmp_path)]
        )


def test_method_configs_share_radii_except_the_reference_row():
    alignment = _load("alignment")
    radii = {"aggregation_radius": 2.5, "alignment_radius": 3.0}
    for method in ("ait2i", "ait2i-no-agg", "ait2i-no-iso", "ait2i-boxes", "ait2i-lagged"):
        loss = alignment.method_config(method, "truncated", 20.0, radii).loss
        assert (loss.aggregation_radius, loss.alignment_radius) == (2.5, 3.0), method
    reference = alignment.method_config("ait2i-reference", "truncated", 20.0, radii).loss
    assert (reference.radius_mode, reference.aggregation_radius, reference.alignment_radius) == (
        "fixed",
        5.0,
        6.0,
    )
    adaptive = alignment.method_config("ait2i-adaptive", "truncated", 20.0, radii).loss
    assert adaptive.radius_mode == "adaptive"
    assert alignment.method_config("ait2i-lagged", "truncated").mode == "lagged"
    assert alignment.method_config("ait2i-no-agg", "full").loss.w_aggregation == 0.0
    assert alignment.method_config("plain", "truncated") is None


def test_deviations_preset_variant_sets_the_presets_schedule():
    deviations = _load("deviations")
    base = deviations.AIT2IConfig(schedule=deviations.ScheduleConfig(guided_fraction=0.25, step_scale=7.0))
    config = deviations.variant_config(base, {"preset": "reference"})
    assert (config.schedule.guided_fraction, config.schedule.step_scale) == (0.5, 20.0)
    config = deviations.variant_config(base, {"preset": "reference", "step_scale": 3.0})
    assert (config.schedule.guided_fraction, config.schedule.step_scale) == (0.5, 3.0)
    assert deviations.variant_config(base, {"preset": "default"}) == base


def test_method_configs_take_the_models_schedule_and_step_scale_wins():
    alignment = _load("alignment")
    model = {"guided_fraction": 0.32, "step_scale": 30.0}
    for method in ("ait2i", "ait2i-reference", "ait2i-boxes", "gligen-ait2i"):
        schedule = alignment.method_config(method, "truncated", None, None, model).schedule
        assert (schedule.guided_fraction, schedule.step_scale) == (0.32, 30.0), method
    schedule = alignment.method_config("ait2i", "truncated", 5.0, None, model).schedule
    assert (schedule.guided_fraction, schedule.step_scale) == (0.32, 5.0)
    assert alignment.method_config("ait2i", "truncated").schedule == alignment.ScheduleConfig()


def test_boxes_method_runs_the_boxes_route_with_the_models_schedule(tmp_path, monkeypatch):
    # The model's schedule is only what its ait2i.json sets: library defaults must not replace a
    # route's box schedule (they did: ait2i-boxes ran box_iterations 3 on the box term alone).
    from ait2i_ext.adapters.layout import ROUTE_SETTINGS, route_config

    from ait2i_ext.config import model_loss, write_model_settings

    alignment = _load("alignment")
    boxes = {
        **ROUTE_SETTINGS["boxes"],
        "schedule": {"box_update_terms": ("box", "existence"), "box_iterations": 5},
    }
    monkeypatch.setitem(ROUTE_SETTINGS, "boxes", boxes)
    write_model_settings(tmp_path, loss={"aggregation_radius": 2.5}, schedule={"step_scale": 30.0})
    assert alignment.schedule_overrides(tmp_path, "default") == {"step_scale": 30.0}
    # a layout route runs ROUTE_PRESET ("reference") over the model's schedule, as `ait2i generate --box`
    args = argparse.Namespace(
        schedule=alignment.schedule_overrides(tmp_path, "default"),
        route_schedule=alignment.schedule_overrides(tmp_path, "reference"),
    )
    assert alignment.method_schedule("ait2i", args) == {"step_scale": 30.0}
    schedule = alignment.method_schedule("ait2i-boxes", args)
    assert schedule == {"step_scale": 20.0, "guided_fraction": 0.5}
    config = alignment.method_config("ait2i-boxes", "truncated", None, model_loss(tmp_path), schedule)
    assert config == route_config("boxes", tmp_path, mode="truncated")
    assert (config.schedule.box_update_terms, config.schedule.box_iterations) == (("box", "existence"), 5)
    assert config.schedule.step_scale == 20.0
    assert route_config(None, tmp_path).schedule.step_scale == 30.0  # no route: the model's own


def test_alignment_benchmark_shards_seeds_over_two_cpu_processes(random_shapes_model, tmp_path):
    import os
    import subprocess

    argv = ["--model", str(random_shapes_model), "--prompts", "shapes", "--sets", "two"]
    argv += ["--prompts-per-set", "1", "--seeds", "4", "--batch", "4", "--steps", "2", "--methods", "plain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
    ]
    run = subprocess.run(
        [*command, str(ROOT / "benchmarks" / "alignment.py"), *argv, "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["num_processes"] == 2
    # the two shards merged, each seed once (the set's row and the "all" row)
    assert [(r["set"], r["n"]) for r in table["rows"]] == [("two", 4), ("all", 4)]


def test_bad_radius_fails_before_any_sampling(tmp_path):
    with pytest.raises(SystemExit, match="aggregation_radius=-1.0 is invalid"):
        _load("alignment").main(["--aggregation-radius", "-1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="alignment_radius=0.0 is invalid"):
        _load("personalization").main(["--alignment-radius", "0", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_personalization_refuses_more_paired_images_than_images(tmp_path):
    with pytest.raises(SystemExit, match=r"--with-other=11 is invalid: expected 0..--images \(10\)"):
        _load("personalization").main(["--with-other", "11", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_alignment_benchmark_controlnet_methods_on_the_shipped_model(random_shapes_model, tmp_path):
    alignment = _load("alignment")
    methods = "controlnet,controlnet-ait2i,controlnet-ait2i-boxes"
    argv = ["--sets", "two", "--prompts-per-set", "1", "--seeds", "2", "--steps", "2", "--methods", methods]
    assert alignment.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert {r["method"] for r in rows} == set(methods.split(","))
    assert all(r["n"] == 2 and 0.0 <= r["in_box"] <= 1.0 for r in rows)
    with pytest.raises(SystemExit, match="shipped shapes model only"):
        alignment.main(
            ["--model", str(random_shapes_model), "--methods", "controlnet", "--out", str(tmp_path)]
        )
    assert alignment.method_config("controlnet", "truncated") is None


def test_alignment_benchmark_controlnet_option_names_the_folder(random_shapes_model, tmp_path):
    alignment = _load("alignment")
    argv = [
        "--sets",
        "two",
        "--prompts-per-set",
        "1",
        "--seeds",
        "1",
        "--steps",
        "1",
        "--methods",
        "controlnet",
    ]
    with pytest.raises(OSError, match="no_such_controlnet"):  # the folder is loaded, not the shipped one
        alignment.main([*argv, "--controlnet", str(tmp_path / "no_such_controlnet"), "--out", str(tmp_path)])


def test_alignment_prompt_offset_picks_a_later_split_and_rejects_one_outside_the_set():
    from ait2i_ext.shapes.prompts import prompt_set

    alignment = _load("alignment")
    cases = alignment.shapes_cases(["two", "three"], 2, first=12)
    assert [c.text for c in cases] == [p.text for p in prompt_set("two")[12:14] + prompt_set("three")[12:14]]
    with pytest.raises(ValueError, match="prompt offset 40 is outside set 'two'"):
        alignment.shapes_cases(["two"], 1, first=40)


def test_alignment_cli_names_the_flag_for_an_offset_outside_the_set(random_shapes_model, tmp_path):
    argv = [*shapes_two(random_shapes_model), "--prompt-offset", "40", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"--sets / --prompt-offset: prompt offset 40 is outside set 'two'"):
        _load("alignment").main(argv)
    assert not (tmp_path / "o").exists()


def test_overhead_memory_probe_leaves_the_allocator_alone_until_it_measures(monkeypatch):
    """Fixing glibc's mmap threshold slows the guided passes (more page faults), so it must not
    happen before the timed rounds: only ``measure()`` (the untimed memory round) may set it."""
    overhead = _load("overhead")
    calls = []

    class FakeLibc:
        def mallopt(self, *args):
            calls.append(("mallopt", *args))

        def malloc_trim(self, *args):
            calls.append(("malloc_trim", *args))

    monkeypatch.setattr(overhead.ctypes, "CDLL", lambda name: FakeLibc())
    probe = overhead.PeakMemory(overhead.torch.device("cpu"))
    if not probe.available:
        pytest.skip("no /proc/self/clear_refs here")
    assert calls == []
    with probe.measure():
        assert ("mallopt", probe.MMAP_THRESHOLD, 4096) in calls
    assert probe.peak_bytes >= 0


def test_overhead_variant_rows_run_the_models_settings_with_their_fields(monkeypatch):
    """``overhead.py --variants``: each row is the model's settings (its ``ait2i.json``) with the given
    field overrides, parsed as ``deviations.py --variants`` parses them."""
    from types import SimpleNamespace

    from ait2i_ext.shapes.model import default_model_path

    overhead = _load("overhead")
    args = overhead.parse_args(
        ["--methods", "plain", "--variants", "radius_mode=calibrated;guided_fraction=0.28"]
    )
    assert args.variants == ["radius_mode=calibrated;guided_fraction=0.28"]
    seen = []
    monkeypatch.setattr(
        overhead,
        "generate",
        lambda pipe, prompt, subjects, config, **kw: seen.append(config) or SimpleNamespace(images=[]),
    )
    run = overhead.make_runner(args.variants[0], object(), None, 2, settings=default_model_path())
    run("a red circle and a blue square", ("red circle", "blue square"), 0)
    (config,) = seen
    assert (config.loss.radius_mode, config.schedule.guided_fraction) == ("calibrated", 0.28)
    assert (config.schedule.step_scale, config.loss.w_split, config.mode) == (40.0, 2.0, "truncated")
    with pytest.raises(SystemExit, match="not LossConfig or ScheduleConfig fields"):
        overhead.make_runner("no_such_field=1", object(), None, 2)
    # a value the config refuses: one line naming it, before any image
    with pytest.raises(
        SystemExit, match=r"^--variants: radius_share='max' is invalid: expected 'own' or 'min'$"
    ):
        overhead.make_runner("radius_share=max", object(), None, 2, settings=default_model_path())


def test_guided_step_breakdown_runs_and_puts_the_functions_back(capsys):
    import torch

    from ait2i_ext import guidance

    guided_step = _load("guided_step")
    originals = guidance.capture_maps, guidance.batch_losses, torch.autograd.grad
    assert guided_step.main(["--steps", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for part in ("forward under capture", "losses", "backward"):
        assert part in out
    assert (guidance.capture_maps, guidance.batch_losses, torch.autograd.grad) == originals
