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
