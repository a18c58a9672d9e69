"""Alignment benchmark: methods side by side on the same prompts, seeds and model.

    python benchmarks/alignment.py                          # shipped shapes model, CPU
    accelerate launch --num_processes N benchmarks/alignment.py   # seeds sharded over N GPUs
    torchrun --nproc_per_node 2 benchmarks/alignment.py           # ... or over 2 CPU processes
    python benchmarks/alignment.py --model PATH --clip-model CLIP_PATH   # a user's SD checkpoint

Methods: ``plain`` (the stock pipeline), ``attend-excite`` (diffusers'
``StableDiffusionAttendAndExcitePipeline`` on the same components, its defaults), ``ait2i``
(defaults and the model's ``ait2i.json``: on the shipped shapes model its radii 2.5 / 3; a schedule
there applies too, ``--preset reference`` gives the authors' whatever it says),
``ait2i-reference`` (the reference radii 5 / 6 whatever the model), ``ait2i-adaptive`` (radii from
each subject's map, ``LossConfig(radius_mode="adaptive")``, whatever the model), ``ait2i-no-agg`` (aggregation and alignment weights 0), ``ait2i-no-iso`` (isolation
weight 0), ``ait2i-boxes`` (each subject also gets its layout box: the box terms of
docs/layout.md, with the box settings of the "boxes" route; ``gligen-ait2i`` and
``controlnet-ait2i-boxes`` get their routes' settings, ``ait2i_ext.adapters.layout.ROUTE_SETTINGS``), ``ait2i-lagged`` (the approximate ``"lagged"`` mode), ``gligen`` (the GLIGEN
model of ``--gligen``, by default the shipped GLIGEN shapes model, grounded on the layout boxes)
``gligen-ait2i`` (the same with ait2i guidance and the box term),
``controlnet`` / ``controlnet-ait2i`` (the ControlNet of ``--controlnet``, by default the shipped
Canny ControlNet, plain / with ``ait2i``; ``controlnet-ait2i-boxes`` also gives each subject its
layout box, where its edges are; the control image is the edges of the prompt's objects
drawn at their layout boxes, ``ait2i_ext.shapes.scene_edges``); ``--methods`` picks. An ait2i
method named ``METHOD@PRESET`` (e.g. ``gligen-ait2i@fast``) runs with the model's schedule under that
preset of ``ait2i_ext.config.PRESETS`` instead, so schedules compare side by side in one run. The
``in_box`` column is the share of objects drawn in their layout box (IoU >= 0.5). On the shapes model every image is scored by
``ait2i_ext.shapes.evaluator``: all subjects present (colour and shape), colours bound, fully
correct; plus wall-clock and process CPU seconds per image. With ``--model`` (a Stable Diffusion checkpoint) the prompts are
Attend-and-Excite's "a {animal} and a {animal}" pairs, scored with CLIP when ``--clip-model`` is given.
Prints one table and writes ``--out``/table.json, ``--out``/records.json (one record per image:
set, method, prompt, seed and its scores, for paired counts between methods) and a PNG grid of examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from ait2i_ext.adapters.layout import ROUTE_PRESET, ROUTE_SETTINGS

from ait2i_ext import AIT2IConfig, LossConfig, ScheduleConfig, Subject, generate
from ait2i_ext.config import PRESETS
from ait2i_ext.tokens import resolve_groups

METHODS = (
    "plain",
    "attend-excite",
    "ait2i",
    "ait2i-reference",
    "ait2i-adaptive",
    "ait2i-no-agg",
    "ait2i-no-iso",
    "ait2i-boxes",
    "ait2i-lagged",
    "gligen",
    "gligen-ait2i",
    "controlnet",
    "controlnet-ait2i",
    "controlnet-ait2i-boxes",
)
GLIGEN_METHODS = ("gligen", "gligen-ait2i")
ANIMALS = (
    "cat",
    "dog",
    "bird",
    "bear",
    "lion",
    "horse",
    "elephant",
    "monkey",
    "frog",
    "turtle",
    "rabbit",
    "mouse",
)


def method_config(
    method: str,
    mode: str,
    step_scale: float | None = None,
    radii: dict[str, float] | None = None,
    schedule: dict | None = None,
) -> AIT2IConfig | None:
    """The configuration of an ait2i ``method`` (``None`` for the others).

    ``radii`` (the model's ``LossConfig`` settings from its ``ait2i.json``, radii given on the
    command line on top) apply to every ait2i method but ``ait2i-reference``, which keeps the
    reference radii of ``LossConfig``, and ``ait2i-adaptive``, which takes them from the maps. ``schedule`` (the model's ``ScheduleConfig`` settings and
    the ``--preset``'s) applies to every ait2i method; ``step_scale``, if given, wins over it.
    """
    radii = {} if method in ("ait2i-reference", "ait2i-adaptive") else dict(radii or {})
    # The box methods run with their layout route's box settings (ait2i_ext.adapters.layout).
    settings = ROUTE_SETTINGS[ROUTE_METHODS[method]] if method in ROUTE_METHODS else {}
    radii = {**settings.get("loss", {}), **radii}
    schedule = ScheduleConfig(
        **{
            **settings.get("schedule", {}),
            **(schedule or {}),
            **({"step_scale": step_scale} if step_scale is not None else {}),
        }
    )
    loss = {
        "ait2i": LossConfig(**radii),
        "ait2i-reference": LossConfig(radius_mode="fixed"),
        "ait2i-adaptive": LossConfig(radius_mode="adaptive"),
        "ait2i-boxes": LossConfig(**radii),
        "ait2i-lagged": LossConfig(**radii),
        "gligen-ait2i": LossConfig(**radii),
        "controlnet-ait2i": LossConfig(**radii),
        "controlnet-ait2i-boxes": LossConfig(**radii),
        "ait2i-no-agg": LossConfig(w_aggregation=0.0, w_alignment=0.0, **radii),
        "ait2i-no-iso": LossConfig(w_isolation=0.0, **radii),
    }.get(method)
    if loss is None:
        return None
    return AIT2IConfig(loss=loss, schedule=schedule, mode="lagged" if method == "ait2i-lagged" else mode)


#: The ait2i methods that run a layout route (its ROUTE_SETTINGS, and ROUTE_PRESET unless --preset).
ROUTE_METHODS = {"ait2i-boxes": "boxes", "gligen-ait2i": "gligen", "controlnet-ait2i-boxes": "controlnet"}


#: The methods without ait2i guidance (no ``@PRESET`` variant).
UNGUIDED_METHODS = ("plain", "attend-excite", "gligen", "controlnet")


def split_method(method: str) -> tuple[str, str | None]:
    """``"gligen-ait2i@fast"`` -> ``("gligen-ait2i", "fast")``; ``"gligen"`` -> ``("gligen", None)``.

    Raises ``ValueError`` naming the method for an unknown name or preset, or a preset on a method
    without ait2i guidance.
    """
    name, at, preset = method.partition("@")
    if name not in METHODS:
        raise ValueError(
            f"{method!r} is invalid: expected some of {list(METHODS)}, each ait2i one optionally @PRESET"
        )
    if at and (name in UNGUIDED_METHODS or preset not in PRESETS):
        raise ValueError(
            f"{method!r} is invalid: @PRESET takes one of {sorted(PRESETS)} after an ait2i method, not {name!r}"
        )
    return name, preset if at else None


def method_schedule(method: str, args: argparse.Namespace) -> dict:
    """The schedule overrides ``method`` runs with: a layout route's (``args.route_schedule``: the
    model's ``ait2i.json`` under :data:`~ait2i_ext.adapters.layout.ROUTE_PRESET`, as ``ait2i generate
    --box`` runs) or the plain methods' (``args.schedule``), ``--preset`` winning over both; a
    ``METHOD@PRESET`` runs the model's under that preset (``args.preset_schedules``)."""
    name, preset = split_method(method)
    if preset is not None:
        return args.preset_schedules[preset]
    return args.route_schedule if name in ROUTE_METHODS else args.schedule


def schedule_overrides(model, preset: str) -> dict:
    """The ``ScheduleConfig`` fields ``model``'s ``ait2i.json`` and the ``preset`` set, and only those:
    a layout route's box schedule (``ROUTE_SETTINGS``) stays unless the model or preset sets it.

    Raises ``ValueError`` for settings the config refuses (before any sampling).
    """
    from ait2i_ext.config import model_config, read_model_settings

    schedule = model_config(model, preset=preset).schedule  # validated, JSON lists made tuples
    names = {**read_model_settings(model).get("schedule", {}), **PRESETS[preset].get("schedule", {})}
    return {name: getattr(schedule, name) for name in names}


@dataclasses.dataclass(frozen=True)
class Case:
    set_name: str
    text: str
    subjects: tuple  # subject specs for ait2i (strings "colour shape")
    objects: tuple  # evaluator requests (shapes model) or animal names
    boxed: tuple = ()  # the subjects with their layout boxes (shapes model)


def shapes_cases(sets: list[str], per_set: int, first: int = 0) -> list[Case]:
    """Prompts ``first .. first+per_set-1`` of each named set (a split of prompts not tuned on)."""
    from ait2i_ext.shapes.prompts import prompt_set

    cases = []
    for name in sets:
        prompts = prompt_set(name)
        if not 0 <= first < len(prompts):
            raise ValueError(f"prompt offset {first} is outside set {name!r}: expected 0..{len(prompts) - 1}")
        for p in prompts[first : first + per_set]:
            subjects = tuple(f"{o.colour} {o.shape}" for o in p.objects)
            boxed = tuple(Subject(o.shape, attributes=(o.colour,), box=o.box) for o in p.objects)
            cases.append(Case(name, p.text, subjects, p.objects, boxed))
    return cases


def animal_cases(per_set: int) -> list[Case]:
    pairs = [(a, b) for i, a in enumerate(ANIMALS) for b in ANIMALS[i + 1 :]][:per_set]
    return [Case("animals", f"a {a} and a {b}", (a, b), (a, b)) for a, b in pairs]


def run_method(
    pipe, ae_pipe, method: str, case: Case, seeds: list[int], args, gligen_pipe=None, cn_pipe=None
) -> tuple[list, float]:
    """Images for ``seeds`` (one batch), wall-clock and process CPU seconds per image (``gligen_pipe``
    for the GLIGEN methods, ``cn_pipe`` the ControlNet pipeline; ``gligen`` is ``generate(...,
    guidance=False)``: the stock pipeline call, phrases and boxes filled from the subjects' boxes;
    ``method`` may be ``NAME@PRESET``, :func:`split_method`)."""
    name = split_method(method)[0]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    call = dict(
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, num_images_per_prompt=len(seeds)
    )
    if method.startswith("controlnet"):
        from ait2i_ext.shapes.model import scene_edges

        pipe, call["image"] = cn_pipe, scene_edges(case.objects)
    start, cpu_start = time.perf_counter(), time.process_time()
    if name in ("plain", "controlnet"):
        images = pipe(case.text, generator=generators, **call).images
    elif name in GLIGEN_METHODS:
        out = generate(
            gligen_pipe,
            case.text,
            list(case.boxed),
            config=method_config(
                "gligen-ait2i", args.mode, args.step_scale, args.gligen_radii, method_schedule(method, args)
            ),
            guidance=name == "gligen-ait2i",
            generator=generators,
            **call,
        )
        images = out.images
    elif name == "attend-excite":
        groups = resolve_groups(pipe.tokenizer, case.text, list(case.subjects))
        images = ae_pipe(
            case.text, token_indices=[g.main for g in groups], generator=generators, **call
        ).images
    else:
        out = generate(
            pipe,
            case.text,
            list(case.boxed if name.endswith("ait2i-boxes") else case.subjects),
            config=method_config(name, args.mode, args.step_scale, args.radii, method_schedule(method, args)),
            generator=generators,
            **call,
        )
        images = out.images
    return images, (time.perf_counter() - start) / len(seeds), (time.process_time() - cpu_start) / len(seeds)


def score_shapes(image, case: Case) -> dict[str, float]:
    from ait2i_ext.shapes.evaluator import evaluate

    s = evaluate(image, case.objects)
    in_box = [float((o.iou or 0.0) >= 0.5) for o in s.objects]
    return {
        "present": float(s.all_present),
        "bound": float(s.all_bound),
        "correct": float(s.correct),
        "in_box": sum(in_box) / len(in_box),
    }


class ClipScorer:
    """Full-prompt and minimum-subject CLIP similarity, as Attend-and-Excite reports."""

    def __init__(self, path: str, device: str):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def __call__(self, image, case: Case) -> dict[str, float]:
        texts = [case.text] + [f"a photo of a {a}" for a in case.objects]
        inputs = self.processor(text=texts, images=image, return_tensors="pt", padding=True).to(self.device)
        out = self.model(**inputs)
        sims = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
        return {"clip_full": float(sims[0]), "clip_min_subject": float(sims[1:].min())}


def example_grid(rows: list[tuple[str, dict]], methods: list[str]):
    from ait2i_ext.viz import side_by_side, stack_rows

    return stack_rows(
        [side_by_side({m: images[m] for m in methods}, title=text, cell=160) for text, images in rows]
    )


#: The method each layout / guided method is paired with (same prompt and seed) in the paired counts.
PAIRED_WITH = {
    "gligen-ait2i": "gligen",
    "controlnet-ait2i": "controlnet",
    "controlnet-ait2i-boxes": "controlnet",
}


def paired_counts(records: list[dict], method: str, base: str, key: str) -> tuple[int, int]:
    """``(wins, losses)`` of ``method`` over ``base`` on ``key`` across the images both have (same
    set, prompt and seed): a win is an image where ``method`` scores higher."""
    scores = {(r["set"], r["prompt"], r["seed"]): r[key] for r in records if r["method"] == base}
    diffs = [
        r[key] - scores[(r["set"], r["prompt"], r["seed"])]
        for r in records
        if r["method"] == method and (r["set"], r["prompt"], r["seed"]) in scores
    ]
    return sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)


def format_paired(records: list[dict], methods: list[str]) -> list[str]:
    """One line per set and guided method whose base (:data:`PAIRED_WITH`, else ``plain``) ran too."""
    lines = []
    keys = [k for k in ("correct", "in_box") if k in records[0]]
    for set_name in list(dict.fromkeys(r["set"] for r in records)) + ["all"]:
        rs = [r for r in records if set_name == "all" or r["set"] == set_name]
        for method in methods:
            base = PAIRED_WITH.get(split_method(method)[0], "plain")
            if method == base or base not in methods or method in ("gligen", "controlnet"):
                continue
            counts = ", ".join(
                f"{k} +{wins}/-{losses}"
                for k in keys
                for wins, losses in [paired_counts(rs, method, base, k)]
            )
            lines.append(f"paired {set_name}: {method} vs {base}: {counts}")
    return lines


def format_table(rows: list[dict], keys: list[str]) -> str:
    header = (
        f"{'set':<14}{'method':<23}"
        + "".join(f"{k:>18}" for k in keys)
        + f"{'s/image':>10}{'CPU s/image':>12}{'n':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = "".join(
            f"{100 * r[k]:>17.1f}%" if k in ("present", "bound", "correct", "in_box") else f"{r[k]:>18.4f}"
            for k in keys
        )
        lines.append(
            f"{r['set']:<14}{r['method']:<23}{cells}{r['seconds']:>10.3f}{r['cpu_seconds']:>12.3f}{r['n']:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from diffusers import DiffusionPipeline, StableDiffusionAttendAndExcitePipeline
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="a Stable Diffusion pipeline folder or hub id (default: the shipped shapes model)"
    )
    parser.add_argument(
        "--prompts",
        choices=["shapes", "animals"],
        help="prompt family (default: shapes for the shapes model, animals with --model)",
    )
    parser.add_argument("--clip-model", help="CLIP model folder for CLIP scores (with --model)")
    parser.add_argument(
        "--sets",
        default="two,three,held_out,hard",
        help="shapes prompt sets, comma-separated (ait2i_ext.shapes.prompts; also single, close_colours and "
        "the phrasings training never uses: phrase_comma, phrase_the, phrase_plus, phrase_one)",
    )
    parser.add_argument("--prompts-per-set", type=int, default=4)
    parser.add_argument(
        "--prompt-offset", type=int, default=0, help="first prompt of each set: prompts OFFSET..OFFSET+N-1"
    )
    parser.add_argument("--seeds", type=int, default=64, help="N seeds for every prompt and method")
    parser.add_argument(
        "--first-seed",
        "--seed-offset",
        dest="first_seed",
        type=int,
        default=0,
        help="first seed: seeds FIRST..FIRST+N-1 (a split not tuned on)",
    )
    parser.add_argument(
        "--gligen",
        help="GLIGEN pipeline folder for the gligen methods (default: the shipped GLIGEN shapes model)",
    )
    parser.add_argument(
        "--controlnet",
        help="ControlNet folder for the controlnet methods (default: the shipped Canny shapes ControlNet)",
    )
    parser.add_argument("--batch", type=int, default=32, help="seeds sampled together")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument(
        "--methods", default="plain,attend-excite,ait2i,ait2i-reference,ait2i-no-agg,ait2i-no-iso"
    )
    parser.add_argument(
        "--step-scale",
        type=float,
        help="ait2i step size (alpha_i = step_scale * sqrt(s_i); default: the model's ait2i.json and "
        "--preset, else 20)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="ait2i schedule preset on top of the model's (ait2i_ext.config.PRESETS; unset: default, and "
        "the layout routes' ROUTE_PRESET for ait2i-boxes / gligen-ait2i / controlnet-ait2i-boxes)",
    )
    parser.add_argument(
        "--aggregation-radius",
        type=float,
        help="ait2i peak radius in 16x16-map cells (default: the model's ait2i.json: 2.5 on the shapes model; else 5)",
    )
    parser.add_argument(
        "--alignment-radius",
        type=float,
        help="ait2i alignment radius (default: the model's ait2i.json: 3 on the shapes model; else 6)",
    )
    parser.add_argument("--mode", default="truncated", choices=["full", "truncated"])
    parser.add_argument("--examples", type=int, default=6, help="prompts shown in the PNG grid")
    parser.add_argument("--out", default="out/alignment")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        try:
            split_method(m)
        except ValueError as e:
            raise SystemExit(f"--methods: {e}") from None
        if m.startswith("controlnet") and args.model:
            raise SystemExit(f"--methods: {m!r} runs on the shipped shapes model only (without --model)")
    from ait2i_ext.config import model_loss
    from ait2i_ext.shapes.gligen import default_gligen_path
    from ait2i_ext.shapes.model import default_model_path

    def loss_settings(folder, flag: str) -> dict:
        """``folder``'s ait2i.json loss settings with the radius flags on top; a bad value exits naming ``flag``."""
        try:
            return model_loss(
                folder, aggregation_radius=args.aggregation_radius, alignment_radius=args.alignment_radius
            )
        except ValueError as e:
            raise SystemExit(f"{flag}: {e}") from None

    # the model's ait2i.json radii (the shapes model's fit its objects); bad radii fail here
    args.radii = loss_settings(
        args.model or default_model_path(), "--aggregation-radius / --alignment-radius"
    )
    # the GLIGEN methods read the GLIGEN model's own ait2i.json, as `ait2i generate --box` does
    args.gligen_radii = loss_settings(args.gligen or default_gligen_path(), "--gligen")
    # the model's schedule (its ait2i.json), then the preset's; --step-scale on top (method_config)
    args.schedule = schedule_overrides(args.model or default_model_path(), args.preset or "default")
    args.route_schedule = schedule_overrides(args.model or default_model_path(), args.preset or ROUTE_PRESET)
    args.preset_schedules = {p: schedule_overrides(args.model or default_model_path(), p) for p in PRESETS}
    # cpu=True lets `torchrun --nproc_per_node N` shard over CPU processes (gloo); `accelerate launch
    # --cpu` starts a single process whatever --num_processes says.
    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    family = args.prompts or ("animals" if args.model else "shapes")
    if args.model:
        model = args.model
    else:
        from ait2i_ext.shapes.model import default_model_path

        model = default_model_path()
    if family == "animals":
        cases = animal_cases(args.prompts_per_set)
    else:
        sets = [s.strip() for s in args.sets.split(",")]
        try:
            cases = shapes_cases(sets, args.prompts_per_set, args.prompt_offset)
        except ValueError as e:
            raise SystemExit(f"--sets / --prompt-offset: {e}") from None
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    cn_pipe = None
    if any(m.startswith("controlnet") for m in methods):
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        from ait2i_ext.shapes.model import default_controlnet_path

        keys = StableDiffusionControlNetPipeline._get_signature_keys(StableDiffusionControlNetPipeline)[0]
        cn_pipe = StableDiffusionControlNetPipeline(
            **{k: v for k, v in pipe.components.items() if k in keys},
            controlnet=ControlNetModel.from_pretrained(
                args.controlnet or default_controlnet_path(), torch_dtype=dtype
            ).to(device),
        )
        cn_pipe.set_progress_bar_config(disable=True)
    ae_pipe = None
    if "attend-excite" in methods:
        ae_pipe = StableDiffusionAttendAndExcitePipeline(
            **{k: v for k, v in pipe.components.items() if k != "image_encoder"}
        )
        ae_pipe.set_progress_bar_config(disable=True)
    clip = ClipScorer(args.clip_model, device) if args.clip_model else None
    gligen_pipe = None
    if any(split_method(m)[0] in GLIGEN_METHODS for m in methods) and not all(c.boxed for c in cases):
        raise SystemExit("--methods gligen, gligen-ait2i need layout boxes: use the shapes prompts")
    if any(split_method(m)[0] in GLIGEN_METHODS for m in methods):
        from ait2i_ext.shapes.gligen import load_gligen_pipeline

        gligen_pipe = load_gligen_pipeline(dtype, args.gligen).to(device)
        gligen_pipe.set_progress_bar_config(disable=True)

    # warm-up (first calls allocate and pick kernels), so the first method timed is not penalised
    pipe(cases[0].text, num_inference_steps=1, guidance_scale=args.guidance_scale)
    seeds_all = list(range(args.first_seed, args.first_seed + args.seeds))
    records, examples = [], {}
    with state.split_between_processes(seeds_all) as my_seeds:
        batches = [my_seeds[i : i + args.batch] for i in range(0, len(my_seeds), args.batch)]
        bar = tqdm(
            total=len(cases) * len(methods) * len(batches), desc="batches", disable=not state.is_main_process
        )
        for case in cases:
            for method in methods:
                for seeds in batches:
                    images, seconds, cpu_seconds = run_method(
                        pipe, ae_pipe, method, case, seeds, args, gligen_pipe, cn_pipe
                    )
                    for seed, image in zip(seeds, images):
                        scores = (
                            score_shapes(image, case)
                            if family == "shapes"
                            else (clip(image, case) if clip else {})
                        )
                        records.append(
                            {
                                "set": case.set_name,
                                "method": method,
                                "prompt": case.text,
                                "seed": seed,
                                "seconds": seconds,
                                "cpu_seconds": cpu_seconds,
                                **scores,
                            }
                        )
                        shown = {c for c, _ in examples}  # every method of a prompt already shown
                        if seed == args.first_seed and (case.text in shown or len(shown) < args.examples):
                            examples[(case.text, method)] = image
                    bar.update(1)
        bar.close()
    records = gather_object(records)
    examples = gather_object([examples])
    state.wait_for_everyone()
    state.destroy_process_group()  # a live gloo group can abort the interpreter at exit
    if not state.is_main_process:
        return 0

    keys = [
        k
        for k in ("present", "bound", "correct", "in_box", "clip_full", "clip_min_subject")
        if k in records[0]
    ]
    rows = []
    for set_name in list(dict.fromkeys([r["set"] for r in records])) + ["all"]:
        for method in methods:
            rs = [r for r in records if r["method"] == method and (set_name == "all" or r["set"] == set_name)]
            if rs:
                row = {
                    "set": set_name,
                    "method": method,
                    "n": len(rs),
                    "seconds": sum(r["seconds"] for r in rs) / len(rs),
                    "cpu_seconds": sum(r["cpu_seconds"] for r in rs) / len(rs),
                }
                row.update({k: sum(r[k] for r in rs) / len(rs) for k in keys})
                rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows, keys)
    print(
        f"model: {model}; {len(cases)} prompts x {args.seeds} seeds from {args.first_seed}; {args.steps} steps; "
        f"guidance scale {args.guidance_scale}; device {device}"
    )
    print(table)
    for line in format_paired(records, methods) if keys else []:
        print(line)
    merged = {k: v for part in examples for k, v in part.items()}
    texts = list(dict.fromkeys(t for t, _ in merged))
    grid_rows = [
        (t, {m: merged[(t, m)] for m in methods}) for t in texts if all((t, m) in merged for m in methods)
    ]
    if grid_rows:
        example_grid(grid_rows, methods).save(out / "examples.png")
    (out / "table.json").write_text(
        json.dumps(
            {"args": vars(args), "num_processes": state.num_processes, "rows": rows},
            indent=2,
        )
    )
    (out / "records.json").write_text(json.dumps(records))  # one per image: paired counts between methods
    print(f"wrote {out / 'table.json'}, {out / 'records.json'} and {out / 'examples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
