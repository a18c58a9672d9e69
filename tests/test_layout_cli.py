"""The three layout routes from the command line: boxes alone, GLIGEN and ControlNet."""

import json

import pytest
from test_layout import edge_picture

from ait2i_ext.cli import main
from ait2i_ext.testing import tiny_controlnet, tiny_gligen_pipeline, tiny_sd_pipeline

BOXES = ["--box", "cat:0.05,0.2,0.5,0.9", "--box", "dog:0.5,0.2,0.95,0.9"]
COMMON = ["--prompt", "a cat and a dog", "--steps", "2", "--quiet", *BOXES]


def _check_run(out, expect_boxes=True):
    record = json.loads((out / "run.json").read_text())
    (entry,) = record["images"]
    assert [g["box"] for g in entry["groups"]] == [[0.05, 0.2, 0.5, 0.9], [0.5, 0.2, 0.95, 0.9]]
    assert (out / entry["file"]).exists() and (out / entry["boxes"]).exists()
    assert "box" in entry["loss_per_step"][0]["losses"]


def test_boxes_alone(tmp_path):
    assert main(["generate", "--model", "tiny", *COMMON, "--out", str(tmp_path / "o")]) == 0
    _check_run(tmp_path / "o")
    config = json.loads((tmp_path / "o" / "run.json").read_text())["config"]
    # the boxes route's settings (ait2i_ext.adapters.layout.ROUTE_SETTINGS) are what ran
    assert config["loss"]["box_members"] and config["loss"]["box_power"] == 2.0
    assert config["loss"]["w_box_topk"] == 1.0 and config["schedule"]["box_iterations"] == 3


def test_gligen_route(tmp_path):
    tiny_gligen_pipeline().save_pretrained(tmp_path / "gligen")
    assert (
        main(["generate", "--gligen", str(tmp_path / "gligen"), *COMMON, "--out", str(tmp_path / "o")]) == 0
    )
    _check_run(tmp_path / "o")


def test_controlnet_route(tmp_path):
    base = tiny_sd_pipeline()
    base.save_pretrained(tmp_path / "base")
    tiny_controlnet(base.unet).save_pretrained(tmp_path / "cn")
    edge_picture().save(tmp_path / "edges.png")
    argv = ["generate", "--model", str(tmp_path / "base"), "--controlnet", str(tmp_path / "cn")]
    argv += ["--control", f"image:{tmp_path / 'edges.png'}", *COMMON, "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    _check_run(tmp_path / "o")
    config = json.loads((tmp_path / "o" / "run.json").read_text())["config"]
    # the ControlNet route's settings (ait2i_ext.adapters.layout.ROUTE_SETTINGS) are what ran
    assert config["loss"]["box_members"] and config["loss"]["box_power"] == 2.0
    assert (
        list(config["schedule"]["box_update_terms"]) == ["box"] and config["schedule"]["box_iterations"] == 3
    )
    assert config["schedule"]["step_scale"] == 20.0  # the layout routes' preset: reference


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--control", "canny:x.png"], "--controlnet and --control go together"),
        (["--gligen", "g", "--controlnet", "c", "--control", "image:x.png"], "exclusive"),
    ],
)
def test_route_argument_errors(tmp_path, capsys, extra, message):
    assert main(["generate", "--model", "tiny", *COMMON, *extra, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- the shipped GLIGEN shapes model ------------------------------------------------------------

SHAPES = ["--prompt", "a red circle and a blue square", "--steps", "2", "--quiet"]
SHAPE_BOXES = ["--box", "circle:0.05,0.05,0.45,0.45", "--box", "square:0.55,0.55,0.95,0.95"]


@pytest.mark.parametrize(
    "extra, route, gligen",
    [([], "gligen", True), (["--layout", "gligen"], "gligen", True), (["--layout", "boxes"], "boxes", False)],
)
def test_box_on_the_shipped_model_takes_the_shipped_gligen_unless_told(tmp_path, extra, route, gligen):
    from ait2i_ext.shapes.gligen import default_gligen_path

    out = tmp_path / "o"
    assert main(["generate", *SHAPES, *SHAPE_BOXES, *extra, "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["layout"]["route"] == route
    assert record["layout"]["gligen"] == (default_gligen_path() if gligen else None)
    assert record["config"]["loss"]["aggregation_radius"] == 2.5  # the shapes radii on both routes
    (entry,) = record["images"]
    assert [g["box"] for g in entry["groups"]] == [[0.05, 0.05, 0.45, 0.45], [0.55, 0.55, 0.95, 0.95]]


def test_no_box_no_layout_route(tmp_path):
    assert main(["generate", *SHAPES, "--out", str(tmp_path / "o")]) == 0
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["layout"]["route"] is None and record["layout"]["gligen"] is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layout", "gligen"], "--layout gligen needs boxes"),
        (["--layout", "boxes", "--gligen", "g", *SHAPE_BOXES], "--layout boxes and --gligen contradict"),
        (["--model", "tiny", "--layout", "gligen", *SHAPE_BOXES], "no GLIGEN model for --model 'tiny'"),
    ],
)
def test_layout_argument_errors(tmp_path, capsys, extra, message):
    assert main(["generate", *SHAPES, *extra, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_controlnet_shapes_uses_the_shipped_controlnet(tmp_path, monkeypatch):
    from ait2i_ext.adapters import controlnet as adapter

    from ait2i_ext.shapes import default_controlnet_path, default_model_path, render_scene, sample_scene

    loaded = []
    load = adapter.load_controlnet_pipeline
    monkeypatch.setattr(adapter, "load_controlnet_pipeline", lambda *a: loaded.append(a) or load(*a))
    render_scene(sample_scene(0)).save(tmp_path / "scene.png")
    argv = ["generate", "--prompt", "a red circle and a blue square", "--controlnet", "shapes"]
    argv += [
        "--control",
        f"canny:{tmp_path / 'scene.png'}",
        "--steps",
        "2",
        "--quiet",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0
    assert [a[:2] for a in loaded] == [(default_model_path(), [default_controlnet_path()])]
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["layout"]["controlnet"] == ["shapes"] and len(record["images"]) == 1
