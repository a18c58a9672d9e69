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
    argv = ["generate", "--model", "/nonexistent-dir-ait2i", "--prompt", "a cat", "--aggregation-radius", "0"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "aggregation_radius=0.0 is invalid" in capsys.readouterr().err
