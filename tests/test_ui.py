"""``ait2i ui``: the page's pure helpers, the served app driven by ``gradio_client``, and a real browser.

The server tests start ``ait2i ui`` in a subprocess on 127.0.0.1 (a free port) on the shipped shapes
model and call its ``/generate`` endpoint with few steps. The browser test drives Debian's chromium
through Playwright (``apt-get install chromium``; Playwright's own browser download is not used) and
saves a screenshot of the page in its temporary folder, or at ``AIT2I_UI_SCREENSHOT`` when set
(``AIT2I_UI_SCREENSHOT=docs/images/ui.png`` remakes the README's picture).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

try:
    import gradio as gr
    import gradio_image_annotation  # noqa: F401
    from gradio_client import Client
    from gradio_client.exceptions import AppError
except ImportError as err:  # pragma: no cover - depends on the install
    pytest.skip(
        f"the ui extra is not installed ({err}): pip install -e '.[test,ui]'", allow_module_level=True
    )

from ait2i_ext import ui

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PROMPT = "a red circle and a blue square"
BOXES = {"circle": [0.05, 0.05, 0.45, 0.45], "square": [0.55, 0.55, 0.95, 0.95]}
STEPS = 4  # 2 guided steps: fast, and still a loss curve


# --- pure helpers ------------------------------------------------------------------------------


def test_subject_rows_infer_the_prompt_and_place_the_identifier():
    assert ui.subject_rows(PROMPT) == [["red circle", ""], ["blue square", ""]]
    assert ui.subject_rows("a sks circle and a square", "sks") == [["sks circle", "sks"], ["square", ""]]
    assert ui.subject_rows("a circle", "zzz") == [["circle", ""]]  # not in the prompt (yet): as inferred
    assert ui.subject_rows("") == [["", ""]]


def test_subjects_from_rows_skip_blank_rows_and_strip_the_identifier():
    rows = [["red circle", ""], ["", ""], ["sks square", "sks"], [None, None]]
    assert ui.subjects_from_rows(rows) == [
        {"noun": "circle", "attributes": ["red"]},
        {"noun": "square", "attributes": [], "identifier": "sks"},
    ]
    assert ui.subjects_from_rows([["", ""]]) is None  # empty table: infer


def test_boxes_from_annotation_normalise_and_refuse_boxes_for_no_subject():
    image = ui.blank_canvas(200)
    annotation = {
        "image": image,
        "boxes": [{"label": "red circle", "xmin": 150, "ymin": 20, "xmax": 50, "ymax": 100}],
    }
    assert ui.boxes_from_annotation(annotation, ["red circle"]) == [["red circle", [0.25, 0.1, 0.75, 0.5]]]
    assert ui.boxes_from_annotation({"image": image, "boxes": []}, ["x"]) == []
    with pytest.raises(
        ValueError, match=r"box 1 is labelled 'red circle': it names no subject; pick one of \['circle'\]"
    ):
        ui.boxes_from_annotation(annotation, ["circle"])
    annotation["boxes"][0]["label"] = ""
    with pytest.raises(ValueError, match="box 1 is without a label"):
        ui.boxes_from_annotation(annotation, ["red circle"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), r"steps=0 is invalid: expected an integer from 1 to 1000"),
        (dict(num_images=99), r"num_images=99 is invalid"),
        (dict(seed=-1), r"seed=-1 is invalid"),
        (dict(steps=2.5), r"steps=2.5 is invalid"),
        (dict(guidance_scale=-1), r"guidance_scale=-1 is invalid"),
        (dict(layout="controlnet"), r"layout='controlnet' is invalid: expected one of \['boxes', 'gligen'\]"),
    ],
)
def test_settings_refuse_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ui.Settings(**kwargs)


def test_resolve_subjects_checks_every_word_before_sampling(tokenizer):
    subjects = ui.resolve_subjects(
        tokenizer, PROMPT, ["red circle", "blue square"], [["circle", BOXES["circle"]]]
    )
    assert [(s.noun, s.box) for s in subjects] == [("circle", tuple(BOXES["circle"])), ("square", None)]
    assert ui.resolve_subjects(tokenizer, PROMPT) is None  # inferred by generate
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        ui.resolve_subjects(tokenizer, PROMPT, ["dog"])
    with pytest.raises(ValueError, match="box for 'triangle'"):
        ui.resolve_subjects(tokenizer, PROMPT, None, {"triangle": BOXES["circle"]})
    with pytest.raises(ValueError, match="the prompt is empty"):
        ui.resolve_subjects(tokenizer, "  ")


def test_cli_ui_refuses_a_bad_model_or_flag_before_serving(tmp_path, capsys):
    from ait2i_ext.cli import main

    assert main(["ui", "--model", str(tmp_path), "--port", str(_free_port())]) == 2
    assert "is a folder without model_index.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ui", "--share", "maybe"])
    assert "'maybe' is invalid: expected true or false" in capsys.readouterr().err


def _random_lora(unet, folder: Path) -> Path:
    """A non-zero LoRA for ``unet``'s architecture, saved as diffusers does."""
    import copy

    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = copy.deepcopy(unet)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )
    return folder


def test_lora_picker_loads_for_one_run_and_leaves_the_pipeline_as_it_was(tmp_path):
    import numpy as np

    app = ui.App()  # the shipped model, in this process
    lora = _random_lora(app.pipeline("boxes").unet, tmp_path)
    prompt = "a sks circle and a blue square"

    def run(**kwargs):
        plain, guided, _, run_json, _ = app.generate(prompt, steps=2, progress=None, **kwargs)
        return np.asarray(plain[0][0]), np.asarray(guided[0][0]), _run_json(run_json)

    before, _, _ = run()
    with_lora, _, record = run(lora=str(lora), identifier="sks")
    after, _, _ = run()
    assert np.array_equal(before, after)  # unloaded after its run
    assert not np.array_equal(before, with_lora)
    circle = record["images"][1]["groups"][0]
    assert record["lora"] == str(lora) and circle["name"] == "circle" and 2 in circle["members"]  # sks@2
    with pytest.raises(gr.Error, match="does not exist"):
        app.generate(prompt, steps=2, lora=str(tmp_path / "missing.safetensors"), progress=None)


# --- the served app ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``ait2i ui`` in a subprocess on 127.0.0.1; yields its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ait2i_ext.cli", "ui", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ait2i ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ait2i ui did not answer on {url} within 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _run_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _check_images(gallery: list, count: int) -> None:
    from PIL import Image

    assert len(gallery) == count
    for item in gallery:
        with Image.open(item["image"]) as image:
            assert image.width > image.height > 0  # the image, then one map per subject, in a row


def test_generate_without_boxes(server):
    plain, guided, losses, run_json, summary = Client(server, verbose=False).predict(
        PROMPT, steps=STEPS, api_name="/generate"
    )
    _check_images(plain, 1)
    _check_images(guided, 1)
    record = _run_json(run_json)
    assert record["prompt"] == PROMPT and record["settings"]["steps"] == STEPS
    assert [(e["seed"], e["guidance"]) for e in record["images"]] == [(0, False), (0, True)]
    assert [g["name"] for g in record["images"][1]["groups"]] == ["circle", "square"]
    assert (
        not record["images"][0]["loss_per_step"] and len(record["images"][1]["loss_per_step"]) == STEPS // 2
    )
    assert [row[0] for row in losses["data"]] == list(range(STEPS // 2))  # the plot: loss per guided step
    assert record["config"]["loss"]["aggregation_radius"] == 2.5  # the shipped model's radii, as the CLI
    assert "2 images" in summary


def test_generate_with_boxes_and_two_seeds(server):
    plain, guided, losses, run_json, _ = Client(server, verbose=False).predict(
        PROMPT, boxes=BOXES, seed=3, num_images=2, steps=STEPS, api_name="/generate"
    )
    _check_images(plain, 2)
    _check_images(guided, 2)
    record = _run_json(run_json)
    assert [e["seed"] for e in record["images"]] == [3, 3, 4, 4]
    groups = {g["name"]: g["box"] for g in record["images"][1]["groups"]}
    assert groups == {name: BOXES[name] for name in ("circle", "square")}
    assert {row[2] for row in losses["data"]} == {"seed 3", "seed 4"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(subjects=["dog"]), "word 'dog' is not in the prompt"),
        (
            dict(boxes={"triangle": [0.1, 0.1, 0.5, 0.5]}),
            "box for 'triangle': the word is not among the subjects",
        ),
        (dict(steps=0), "steps=0 is invalid: expected an integer from 1 to 1000"),
        (dict(identifier="sks"), "identifier 'sks' is not in the prompt"),
    ],
)
def test_bad_input_is_a_message(server, kwargs, message):
    with pytest.raises(AppError, match=message):
        Client(server, verbose=False).predict(PROMPT, api_name="/generate", **kwargs)


def test_two_clients_at_once_queue_and_keep_their_own_results(server):
    prompts = ["a red circle and a blue square", "a green triangle and a yellow circle"]
    results: dict[str, tuple] = {}

    def call(prompt):
        results[prompt] = Client(server, verbose=False).predict(prompt, steps=STEPS, api_name="/generate")

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == sorted(prompts)
    records = [_run_json(results[p][3]) for p in prompts]
    assert [r["prompt"] for r in records] == prompts  # each client got its own run
    assert results[prompts[0]][1][0]["image"] != results[prompts[1]][1][0]["image"]
    first, second = sorted(records, key=lambda r: r["started"])
    assert first["finished"] <= second["started"]  # one generation at a time


# --- a real browser ------------------------------------------------------------------------------


def _draw_box(page, canvas, box, label):
    """Drag a box (fractions of the canvas image) with the mouse, then pick its subject."""
    frame = canvas.bounding_box()
    side = min(frame["width"], frame["height"])
    left = frame["x"] + (frame["width"] - side) / 2
    top = frame["y"] + (frame["height"] - side) / 2
    x0, y0, x1, y1 = box
    page.mouse.move(left + x0 * side, top + y0 * side)
    page.mouse.down()
    page.mouse.move(left + x1 * side, top + y1 * side, steps=8)
    page.mouse.up()
    page.locator("#canvas input.border-none").last.click()
    page.get_by_role("option", name=label, exact=True).click()
    page.get_by_role("button", name="OK").click()


def test_browser_draw_two_boxes_and_generate(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(server)
            prompt = page.locator("#prompt textarea")
            prompt.fill("a green triangle and a blue square")
            page.wait_for_function("document.querySelector('#subjects').innerText.includes('green triangle')")
            page.locator("#steps input").fill("20")  # enough guided steps for a loss curve in the picture
            canvas = page.locator("#canvas canvas").first
            _draw_box(page, canvas, (0.08, 0.1, 0.45, 0.5), "green triangle")
            _draw_box(page, canvas, (0.55, 0.5, 0.92, 0.9), "blue square")
            page.locator("#generate").click()
            page.locator("#plain img").first.wait_for(state="visible", timeout=240_000)
            page.locator("#guided img").first.wait_for(state="visible", timeout=240_000)
            page.wait_for_function("document.querySelector('#summary').innerText.includes('images')")
            for gallery in ("#plain img", "#guided img"):
                assert page.locator(gallery).first.evaluate("img => img.complete && img.naturalWidth > 0")
            assert page.locator(".toast-body").count() == 0  # no error message
            link = page.locator("#run-json a").first.get_attribute("href")
            record = page.request.get(link if link.startswith("http") else server.rstrip("/") + link).json()
            boxes = {g["name"]: g["box"] for g in record["images"][1]["groups"]}
            assert set(boxes) == {"triangle", "square"} and all(boxes.values())
            assert boxes["triangle"][0] < 0.2 and boxes["square"][0] > 0.45  # drawn where the mouse went
            out = Path(os.environ.get("AIT2I_UI_SCREENSHOT") or tmp_path / "ui.png")
            page.screenshot(path=str(out), full_page=True)
            assert out.stat().st_size > 10_000

            # a box for no subject: rename the subjects, keep the boxes -> a message, no traceback
            prompt.fill("a red circle")
            page.wait_for_function("document.querySelector('#subjects').innerText.includes('red circle')")
            page.locator("#generate").click()
            page.get_by_text("it names no subject").first.wait_for(timeout=30_000)
        finally:
            browser.close()


def test_gligen_route_loads_the_shipped_gligen_on_the_shipped_model_only():
    from diffusers import StableDiffusionGLIGENPipeline

    assert set(ui.LAYOUT_ROUTES) == {"boxes", "gligen"}
    assert isinstance(ui.App().pipeline("gligen"), StableDiffusionGLIGENPipeline)
    with pytest.raises(ValueError, match="needs the shipped model"):
        ui.App(model="tiny").pipeline("gligen")
