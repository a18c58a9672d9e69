"""``ait2i ui``: a local web page to name subjects, draw their boxes and compare plain vs guided.

    pip install -e ".[ui]" && ait2i ui            # http://127.0.0.1:7860, the shipped shapes model

The page: the prompt; its subjects, inferred at once and editable (words, last word the noun; the
identifier of a LoRA concept), with the token groups they resolve to; a canvas on which the user
draws one box per subject; seed, steps, guidance scale, step scale, number of images; a layout
route and a LoRA. **Generate** samples every seed twice with the same noise, plain and guided, and
shows each image with its subjects' attention maps (and boxes) beside it, the loss per guided step
and a ``run.json`` to download.

Sampling is :func:`ait2i_ext.generate` on a pipeline from :func:`ait2i_ext.cli.load_pipeline`, with
the configuration ``ait2i generate`` would use; pictures come from :mod:`ait2i_ext.viz`. The queue
runs one generation at a time (one device); every result goes back to the request that asked for it.

The named endpoint ``/generate`` takes the prompt first and has defaults for everything else, so
scripts can drive it::

    from gradio_client import Client
    plain, guided, losses, run_json, summary = Client("http://127.0.0.1:7860/").predict(
        "a red circle and a blue square", api_name="/generate")
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # fully offline

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gradio_image_annotation import image_annotator  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from . import viz  # noqa: E402
from .cli import _config, build_parser, default_model, load_pipeline  # noqa: E402
from .pipeline import GuidedOutput, generate  # noqa: E402
from .shapes.gligen import default_gligen_path, gligen_installed  # noqa: E402
from .tokens import Subject, describe, infer_subjects, resolve_groups, with_identifier  # noqa: E402

logger = logging.getLogger(__name__)

#: Layout routes the page offers: name -> ``ait2i generate`` options that load its pipeline.
#: "boxes" is box guidance on the plain model; "gligen" the shipped GLIGEN shapes model (boxes
#: grounded by GLIGEN, plus the box term), offered on the shipped model only.
LAYOUT_ROUTES: dict[str, dict] = {
    "boxes": {},
    **({"gligen": {"gligen": default_gligen_path()}} if gligen_installed() else {}),
}
CANVAS = 512  # px, the side of the drawing canvas (boxes are sent normalised to [0, 1])
MAX_IMAGES = 8
SUBJECT_HEADERS = ["subject (words; last word = noun)", "identifier"]


@dataclass(frozen=True)
class Settings:
    """What one Generate press samples: ``num_images`` seeds from ``seed``, plain and guided."""

    seed: int = 0
    steps: int = 50
    guidance_scale: float = 7.5
    step_scale: float = 20.0
    num_images: int = 1
    layout: str = "boxes"

    def __post_init__(self) -> None:
        for name, low, high in (("seed", 0, 2**63 - 1), ("steps", 1, 1000), ("num_images", 1, MAX_IMAGES)):
            value = getattr(self, name)
            if value is None or float(value) != int(value) or not low <= int(value) <= high:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer from {low} to {high}")
            object.__setattr__(self, name, int(value))
        for name in ("guidance_scale", "step_scale"):
            value = getattr(self, name)
            if value is None or not 0.0 <= float(value) <= 100.0:
                raise ValueError(f"{name}={value!r} is invalid: expected a number from 0 to 100")
            object.__setattr__(self, name, float(value))
        if self.layout not in LAYOUT_ROUTES:
            raise ValueError(f"layout={self.layout!r} is invalid: expected one of {sorted(LAYOUT_ROUTES)}")


# --- the page's inputs -> subjects (pure functions) ------------------------------------------


def subject_rows(prompt: str, identifier: str = "") -> list[list[str]]:
    """The table of subjects inferred from ``prompt``: ``[words, identifier]`` per subject."""
    rows = [[words, ""] for words in infer_subjects(prompt or "")]
    ident = (identifier or "").strip()
    if ident:
        with contextlib.suppress(ValueError):  # not (yet) in the prompt: the table stays as inferred
            rows = [
                [s.phrase(), s.identifier or ""] for s in with_identifier([r[0] for r in rows], ident, prompt)
            ]
    return rows or [["", ""]]


def subjects_from_rows(rows: Sequence[Sequence] | None) -> list[dict] | None:
    """Subject mappings (``Subject.parse``'s form) from the table; ``None`` when it is empty (infer)."""
    subjects = []
    for row in rows or []:
        words = str(row[0] or "").split() if len(row) else []
        ident = str(row[1] or "").strip() if len(row) > 1 else ""
        words = [w for w in words if w.lower() != ident.lower()]
        if not words:
            continue
        subjects.append(
            {"noun": words[-1], "attributes": words[:-1], **({"identifier": ident} if ident else {})}
        )
    return subjects or None


def row_labels(rows: Sequence[Sequence] | None) -> list[str]:
    """The name of each table row's subject, as the canvas labels its boxes."""
    return [str(row[0]).strip() for row in rows or [] if len(row) and str(row[0] or "").strip()]


def boxes_from_annotation(annotation: Mapping | None, labels: Sequence[str]) -> list[list]:
    """``[[label, [x0, y0, x1, y1]], ...]`` normalised to ``[0, 1]`` from the canvas's pixel boxes.

    Raises:
        ValueError: a box without a label or whose label is no subject (e.g. one renamed since).
    """
    if not annotation or not annotation.get("boxes"):
        return []
    image = annotation.get("image")
    height, width = (np.asarray(image).shape[:2]) if image is not None else (CANVAS, CANVAS)
    boxes = []
    for index, box in enumerate(annotation["boxes"], start=1):
        label = str(box.get("label") or "").strip()
        if label not in labels:
            named = f"labelled {label!r}" if label else "without a label"
            raise ValueError(f"box {index} is {named}: it names no subject; pick one of {list(labels)}")
        x0, x1 = sorted((box["xmin"] / width, box["xmax"] / width))
        y0, y1 = sorted((box["ymin"] / height, box["ymax"] / height))
        clip = [min(1.0, max(0.0, round(v, 4))) for v in (x0, y0, x1, y1)]
        boxes.append([label, clip])
    return boxes


def resolve_subjects(
    tokenizer, prompt: str, subjects=None, boxes=None, identifier: str | None = None
) -> list[Subject] | None:
    """The subjects ``generate`` gets: boxes attached by word, the identifier joined to its noun.

    Every word is checked against the prompt here, so a bad input fails before any sampling.

    Args:
        subjects: ``None`` (infer) or specs as :meth:`Subject.parse` takes them.
        boxes: ``{word: box}`` or ``[[word, box], ...]`` normalised boxes, or ``None``.
        identifier: a LoRA concept's identifier, joined to the group of the noun it follows.

    Raises:
        ValueError: an empty prompt, a word not in the prompt, a box naming no subject, ...
    """
    from .adapters.layout import subjects_with_boxes

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type what the image should show")
    if isinstance(subjects, (str, Mapping)):
        subjects = [subjects]
    if subjects is not None:
        subjects = [Subject.parse(s) for s in subjects] or None
    if boxes:
        subjects = subjects_with_boxes(subjects, boxes, prompt)
    if identifier and identifier.strip():
        subjects = with_identifier(
            subjects if subjects is not None else infer_subjects(prompt), identifier, prompt
        )
    resolve_groups(tokenizer, prompt, subjects)  # raises naming the word and the prompt
    return subjects


# --- sampling and what the page shows ---------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image of a Generate press: its seed, whether it was guided, the result and its time."""

    seed: int
    guided: bool
    output: GuidedOutput
    seconds: float

    @property
    def label(self) -> str:
        return "guided" if self.guided else "plain"


def sample_pairs(pipe, prompt: str, subjects, settings: Settings, config, progress=None) -> list[Sample]:
    """Every seed sampled plain then guided from the same noise, with the attention maps."""
    jobs = [
        (seed, guided)
        for seed in range(settings.seed, settings.seed + settings.num_images)
        for guided in (False, True)
    ]
    samples = []
    for seed, guided in progress.tqdm(jobs, desc="images") if progress is not None else jobs:
        start = time.perf_counter()
        output = generate(
            pipe,
            prompt,
            subjects,
            config=config,
            guidance=guided,
            return_maps=True,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
        )
        samples.append(Sample(seed, guided, output, time.perf_counter() - start))
    return samples


def picture(sample: Sample, cell: int = 192) -> Image.Image:
    """The image, then each subject's attention map over it, boxes drawn in the subjects' colours."""
    boxes = {g.name: g.box for g in sample.output.groups[0] if g.box}
    return viz.attention_grid(sample.output.images[0], sample.output.group_maps(0), boxes or None, cell=cell)


def loss_table(samples: Sequence[Sample]):
    """The total loss at each guided step, one line per seed (a ``pandas.DataFrame``)."""
    import pandas as pd

    rows = [
        {"step": record.step, "loss": record.losses["total"], "seed": f"seed {s.seed}"}
        for s in samples
        if s.guided
        for record in s.output.steps
    ]
    return pd.DataFrame(rows, columns=["step", "loss", "seed"])


def run_record(prompt: str, subjects, settings: Settings, config, samples: Sequence[Sample], **extra) -> dict:
    """What was run, as ``run.json``: prompt, subjects, settings, config, groups and loss per step."""
    return {
        "prompt": prompt,
        **extra,
        "subjects": None if subjects is None else [dataclasses.asdict(s) for s in subjects],
        "settings": dataclasses.asdict(settings),
        "config": dataclasses.asdict(config),
        "images": [
            {
                "seed": s.seed,
                "guidance": s.guided,
                "seconds": round(s.seconds, 3),
                "groups": [dataclasses.asdict(g) for g in s.output.groups[0]],
                "loss_per_step": [dataclasses.asdict(r) for r in s.output.steps],
            }
            for s in samples
        ],
    }


@contextlib.contextmanager
def lora_loaded(pipe, path: str | None) -> Iterator[None]:
    """``pipe`` with the LoRA at ``path`` for the duration (nothing when ``path`` is empty)."""
    if not path or not str(path).strip():
        yield
        return
    from .adapters.personalize import load_lora, unload_lora

    name = load_lora(pipe, str(path).strip(), adapter_name="ait2i_ui")
    try:
        yield
    finally:
        unload_lora(pipe, name)


def blank_canvas(size: int = CANVAS, cells: int = 8) -> np.ndarray:
    """A light canvas with a faint grid, the image frame the boxes are drawn on."""
    image = Image.new("RGB", (size, size), (246, 246, 246))
    draw = ImageDraw.Draw(image)
    for i in range(1, cells):
        x = round(i * size / cells)
        draw.line([(x, 0), (x, size)], fill=(222, 222, 222))
        draw.line([(0, x), (size, x)], fill=(222, 222, 222))
    return np.asarray(image)


def _hex(colour: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


# --- the app ------------------------------------------------------------------------------------


def generate_args(model: str | None, **options) -> argparse.Namespace:
    """``ait2i generate``'s options with their defaults (so the page samples as the CLI does)."""
    args = build_parser().parse_args(["generate", "--prompt", "-", "--out", "-"])
    args.model = model
    for name, value in options.items():
        setattr(args, name, value)
    return args


class App:
    """The loaded pipelines (one per layout route, loaded on first use) and the request handlers."""

    def __init__(self, model: str | None = None, pipe=None):
        self.model = model
        self.pipes = {} if pipe is None else {"boxes": pipe}

    def pipeline(self, layout: str):
        if layout == "gligen" and self.model is not None:
            raise ValueError(
                f"layout 'gligen' is the shipped GLIGEN shapes model: it needs the shipped model, not {self.model!r}"
            )
        if layout not in self.pipes:
            self.pipes[layout] = load_pipeline(generate_args(self.model, **LAYOUT_ROUTES[layout]))
            self.pipes[layout].set_progress_bar_config(disable=False, leave=False, desc="denoising")
        return self.pipes[layout]

    @property
    def tokenizer(self):
        return self.pipeline("boxes").tokenizer

    # Handlers: a ValueError is the user's input; it reaches the page as a message (gr.Error).

    def groups_text(self, prompt: str, rows, identifier: str = "") -> str:
        if not prompt or not prompt.strip():
            return "Type a prompt: its subjects appear above."
        try:
            subjects = resolve_subjects(self.tokenizer, prompt, subjects_from_rows(rows), None, identifier)
        except ValueError as err:
            return f"⚠ {err}"
        return describe(self.tokenizer, prompt, resolve_groups(self.tokenizer, prompt, subjects))

    def infer(self, prompt: str, identifier: str = ""):
        rows = subject_rows(prompt, identifier)
        return rows, self.canvas_labels(rows), self.groups_text(prompt, rows, identifier)

    def canvas_labels(self, rows):
        labels = row_labels(rows) or ["(no subject)"]
        colours = [_hex(viz.PALETTE[i % len(viz.PALETTE)]) for i in range(len(labels))]
        return image_annotator(label_list=labels, label_colors=colours)

    def collect(self, prompt: str, rows, annotation):
        """The page's table and canvas as the ``/generate`` endpoint's JSON arguments."""
        try:
            return subjects_from_rows(rows), boxes_from_annotation(annotation, row_labels(rows))
        except ValueError as err:
            raise gr.Error(str(err), title="Check the boxes") from None

    def generate(
        self,
        prompt: str,
        subjects=None,
        boxes=None,
        seed: int = 0,
        steps: int = 50,
        guidance_scale: float = 7.5,
        step_scale: float = 20.0,
        num_images: int = 1,
        layout: str = "boxes",
        lora: str = "",
        identifier: str = "",
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (gradio's way to receive the tracker)
    ):
        started = time.time()
        try:
            settings = Settings(seed, steps, guidance_scale, step_scale, num_images, layout)
            args = generate_args(self.model, step_scale=settings.step_scale)
            config = _config(args, settings.layout)  # the layout route's box settings
            pipe = self.pipeline(settings.layout)
            resolved = resolve_subjects(pipe.tokenizer, prompt, subjects, boxes, identifier)
            with lora_loaded(pipe, lora):
                samples = sample_pairs(pipe, prompt, resolved, settings, config, progress)
        except ValueError as err:
            raise gr.Error(str(err), title="Cannot generate") from None
        record = run_record(
            prompt,
            resolved,
            settings,
            config,
            samples,
            model=self.model or default_model(),
            lora=lora or None,
            identifier=identifier or None,
            started=started,
            finished=time.time(),
        )
        folder = Path(tempfile.mkdtemp(prefix="ait2i-ui-"))
        (folder / "run.json").write_text(json.dumps(record, indent=2, default=str))
        shown = {
            label: [(picture(s), f"seed {s.seed}, {s.seconds:.1f} s") for s in samples if s.label == label]
            for label in ("plain", "guided")
        }
        total = sum(s.seconds for s in samples)
        seeds = f"{settings.num_images} seed{'s' if settings.num_images > 1 else ''}"
        summary = f"{len(samples)} images ({seeds} x plain/guided, {settings.steps} steps) in {total:.1f} s"
        logger.info("%s: %s", prompt, summary)
        return shown["plain"], shown["guided"], loss_table(samples), str(folder / "run.json"), summary


CSS = """
#groups textarea, #groups pre {font-family: ui-monospace, monospace; font-size: 12px}
#summary {min-height: 1.5em}
#plain .thumbnail-item, #guided .thumbnail-item {aspect-ratio: auto !important; height: auto !important}
#plain .grid-wrap, #guided .grid-wrap {height: auto !important; min-height: 0 !important; max-height: none !important}
#plain .grid-container, #guided .grid-container {padding-top: 0 !important}
#plain .thumbnail-item img, #guided .thumbnail-item img {width: 100%; height: auto !important}
"""


def build_app(app: App) -> gr.Blocks:
    """The page (see the module docstring); ``app`` holds the pipeline and the handlers."""
    prompt0 = "a red circle and a blue square"
    rows0 = subject_rows(prompt0)
    with gr.Blocks(title="ait2i", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "## ait2i: aggregating-and-isolating attention guidance\n"
            "Type a prompt, check its subjects, draw one box per subject (optional), press **Generate**: "
            "the same seed is sampled plain and guided, each image beside its subjects' attention maps."
        )
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox(value=prompt0, label="prompt", elem_id="prompt", lines=1)
                table = gr.Dataframe(
                    value=rows0,
                    headers=SUBJECT_HEADERS,
                    datatype=["str", "str"],
                    type="array",
                    interactive=True,
                    label="subjects (inferred from the prompt; edit, add or remove rows)",
                    elem_id="subjects",
                )
                groups = gr.Textbox(
                    value=app.groups_text(prompt0, rows0),
                    label="token groups",
                    lines=3,
                    interactive=False,
                    elem_id="groups",
                )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    steps = gr.Number(value=50, precision=0, label="steps", elem_id="steps")
                    num_images = gr.Number(value=1, precision=0, label="images (seeds)")
                with gr.Row():
                    guidance_scale = gr.Slider(0, 20, value=7.5, step=0.5, label="guidance scale (CFG)")
                    step_scale = gr.Slider(
                        0, 60, value=20, step=1, label="step scale (alpha = s * sqrt(s_i))"
                    )
                with gr.Accordion("layout route and LoRA", open=False):
                    layout = gr.Radio(
                        list(LAYOUT_ROUTES),
                        value="boxes",
                        label="layout route",
                        info="boxes: box guidance on the plain model; gligen: the shipped GLIGEN shapes model grounds the boxes",
                    )
                    with gr.Row():
                        lora = gr.Textbox(
                            "", label="LoRA (.safetensors file or folder)", placeholder="runs/sks-circle"
                        )
                        identifier = gr.Textbox("", label="its identifier", placeholder="sks")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=4):
                labels0 = row_labels(rows0)
                canvas = image_annotator(
                    {"image": blank_canvas(), "boxes": []},
                    label_list=labels0,
                    label_colors=[_hex(viz.PALETTE[i]) for i in range(len(labels0))],
                    sources=None,
                    image_type="numpy",
                    label="layout: draw one box per subject (drag; pick its subject)",
                    show_download_button=False,
                    show_clear_button=False,
                    show_remove_button=True,
                    height=CANVAS,
                    elem_id="canvas",
                )
        summary = gr.Markdown(label="summary", elem_id="summary")
        shown = dict(
            columns=1, format="png", height="auto", object_fit="contain", preview=False, show_label=False
        )
        with gr.Row(equal_height=False):
            with gr.Column():
                gr.Markdown("**plain**: each image, then each subject's attention over it")
                plain = gr.Gallery(label="plain", elem_id="plain", buttons=["download"], **shown)
            with gr.Column():
                gr.Markdown("**guided (AI-T2I)**: the same seeds, guided")
                guided = gr.Gallery(label="guided", elem_id="guided", buttons=["download"], **shown)
        with gr.Row():
            losses = gr.LinePlot(
                x="step", y="loss", color="seed", label="loss per guided step", height=220, elem_id="losses"
            )
            run_json = gr.File(label="run.json", elem_id="run-json")
        subjects_json = gr.JSON(visible=False)
        boxes_json = gr.JSON(visible=False)

        cheap = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
        prompt.change(
            app.infer, [prompt, identifier], [table, canvas, groups], trigger_mode="always_last", **cheap
        )
        identifier.change(
            app.infer, [prompt, identifier], [table, canvas, groups], trigger_mode="always_last", **cheap
        )
        table.input(
            lambda p, r, i: (app.canvas_labels(r), app.groups_text(p, r, i)),
            [prompt, table, identifier],
            [canvas, groups],
            **cheap,
        )
        button.click(app.collect, [prompt, table, canvas], [subjects_json, boxes_json], **cheap).success(
            app.generate,
            [
                prompt,
                subjects_json,
                boxes_json,
                seed,
                steps,
                guidance_scale,
                step_scale,
                num_images,
                layout,
                lora,
                identifier,
            ],
            [plain, guided, losses, run_json, summary],
            api_name="generate",
            concurrency_limit=1,
            concurrency_id="device",
        )
    return demo


def serve(args: argparse.Namespace) -> int:
    """``ait2i ui``: load the model (errors before serving), build the page and serve it."""
    app = App(args.model)
    app.pipeline("boxes")
    demo = build_app(app)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, ssr_mode=False)
    return 0
