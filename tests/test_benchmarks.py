"""The benchmark scripts run end to end on tiny components (their figures are not checked here)."""

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


def test_alignment_benchmark_runs_and_writes_its_table(random_shapes_model, tmp_path, capsys):
    alignment = _load("alignment")
    argv = [
        "--model",
        str(random_shapes_model),
        "--prompts",
        "shapes",
        "--sets",
        "two",
        "--prompts-per-set",
        "1",
    ]
    argv += [
        "--seeds",
        "2",
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
    assert "ait2i-boxes" in capsys.readouterr().out
    assert (tmp_path / "examples.png").exists()


def test_alignment_benchmark_rejects_unknown_methods(random_shapes_model, tmp_path):
    with pytest.raises(SystemExit, match="'magic' is invalid"):
        _load("alignment").main(
            ["--model", str(random_shapes_model), "--methods", "plain,magic", "--out", str(tmp_path)]
        )
