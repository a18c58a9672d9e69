"""Personalisation end to end on the shapes model: teach it shapes it never saw, then draw them.

    python benchmarks/personalization.py --out out/personalization             # trains, then 64 seeds
    python benchmarks/personalization.py --lora-star runs/sks-star --lora-heart runs/xyz-heart

1. Render ``--images`` instance images of two concepts the shapes world never shows: a yellow star
   ("a sks star") and a red heart ("a xyz heart"), ``--with-other`` of them beside one other shape
   ("a sks star and a blue square"; ``ait2i_ext.shapes.concepts``).
2. Train one LoRA per concept with ``training/train_lora.py``: its defaults for this model plus prior
   preservation on 2000 rendered scenes of the training world (the documented command of
   docs/lora.md), or reuse ``--lora-star`` / ``--lora-heart``.
3. On the same seeds for every method, generate
   - the concept alone ("a sks star") and next to a second subject ("a sks star and a blue square",
     ...), with the star LoRA;
   - two concepts at once ("a sks star and a xyz heart"), both LoRAs active (peft multi-adapter);
   - base prompts without an identifier ("a red circle", ...), with no LoRA, the star LoRA and both;
   the ``--methods`` of: ``plain`` (the pipeline untouched), ``ait2i`` with the identifiers in no group
   (subjects are the nouns and the other subjects' words), ``ait2i+id`` with each identifier in the
   group of the noun it precedes (:func:`personalized_subjects`), and ``regional`` / ``ait2i+id+regional``:
   plain / ait2i+id with each LoRA only where its concept is (:func:`regional_loras`, ``--regional``
   for its :class:`RegionalConfig` fields; base prompts then run no LoRA), and ``ait2i+id+regional2``,
   the same with the fields of ``--regional2`` (two regional settings side by side in one run). With
   ``mask_source="regions"`` (or ``"mixed"``: the regions first, then the attention masks) the concepts
   get the automatic layout (:func:`with_layout`): the regional passes share the image among its boxes
   and ait2i's box term guides each group into its box.
4. Score each image with ``ait2i_ext.shapes.evaluator``: every requested object (the concept in its
   colour and shape, the other subject) present.

Prints one table, the paired counts against plain with each method's CPU time per image relative to
plain's, and writes ``--out``/table.json (with the per-seed results) and ``--out``/examples.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from ait2i_ext.adapters.personalize import (
    RegionalConfig,
    load_loras,
    parse_lora_scale,
    parse_regional,
    personalized_subjects,
    regional_loras,
    with_layout,
)
from PIL import Image

from ait2i_ext import AIT2IConfig, LossConfig, generate
from ait2i_ext.config import model_loss
from ait2i_ext.shapes.concepts import class_scenes, concept_scenes, write_concept
from ait2i_ext.shapes.model import default_model_path

# identifier -> (shape, colour): the concepts, drawn in one colour each.
CONCEPTS = {"sks": ("star", "yellow"), "xyz": ("heart", "red")}
LORA_OF = {"sks": "star", "xyz": "heart"}
SECOND_SUBJECTS = ("blue square", "red circle", "green triangle", "purple circle")
BASE_PROMPTS = (
    "a red circle",
    "a blue square",
    "a red circle and a blue square",
    "a green triangle and a purple circle",
)
GROUPS = ("concept alone", "concept + other", "two concepts", "base prompt")
METHODS = ("plain", "ait2i", "ait2i+id", "regional", "ait2i+id+regional", "ait2i+id+regional2")
#: Methods run by default ("regional", plain sampling with each LoRA confined to its concept's place,
#: only on request: docs/personalization.md measured it below ait2i + regional).
DEFAULT_METHODS = ("plain", "ait2i", "ait2i+id", "ait2i+id+regional")


def cases(
    others: list[str], base_prompts: list[str], base_loras: list[list[str]], methods: Sequence[str] = METHODS
) -> list[dict]:
    """Every prompt of the study: its LoRAs, identifiers, requested objects and methods. ``ait2i`` without
    the identifier in a group runs on the concept + other subject prompts (where isolation matters); base
    prompts run ``plain`` and ``regional`` (which runs no LoRA on them: the stock model's images)."""
    star = {"identifiers": ["sks"], "loras": ["star"]}
    rows = [{"group": "concept alone", "prompt": "a sks star", "nouns": ["star"], **star}]
    for other in others:
        rows.append(
            {
                "group": "concept + other",
                "prompt": f"a sks star and a {other}",
                "nouns": ["star", other],
                **star,
            }
        )
    rows.append(
        {
            "group": "two concepts",
            "prompt": "a sks star and a xyz heart",
            "nouns": ["star", "heart"],
            "identifiers": ["sks", "xyz"],
            "loras": ["star", "heart"],
        }
    )
    for prompt in base_prompts:
        for loras in ([], *base_loras):
            rows.append(
                {"group": "base prompt", "prompt": prompt, "nouns": None, "identifiers": [], "loras": loras}
            )
    for row in rows:
        allowed = {"concept + other": METHODS, "base prompt": ("plain", "regional")}.get(
            row["group"], ("plain", "ait2i+id", "regional", "ait2i+id+regional", "ait2i+id+regional2")
        )
        row["methods"] = [m for m in methods if m in allowed]
    return [row for row in rows if row["methods"]]


def requested_objects(case: dict) -> list[tuple[str, str]]:
    from ait2i_ext.shapes.prompts import parse_prompt

    if not case["identifiers"]:
        return [(o.colour, o.shape) for o in parse_prompt(case["prompt"])]
    objects = []
    for noun in case["nouns"]:
        words = noun.split()
        if len(words) == 2:
            objects.append((words[0], words[1]))
        else:
            ident = next(i for i in case["identifiers"] if CONCEPTS[i][0] == noun)
            objects.append((CONCEPTS[ident][1], noun))
    return objects


# --- workers: one pipeline per process, reloaded when the set of LoRAs changes -------------------

_STATE: dict = {}


def _pipeline(model: str, loras: tuple[str, ...], scale: float | dict[str, float] = 1.0, fuse: bool = True):
    """The pipeline with ``loras`` loaded: fused (same images, no LoRA overhead), or as separate adapters
    ``default_0``, ``default_1``, ... for the regional methods."""
    from diffusers import StableDiffusionPipeline

    if _STATE.get("loras") != (loras, scale, fuse):
        torch.set_num_threads(1)
        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        if loras:
            names = load_loras(pipe, list(loras), scales=[scale] * len(loras))
            if fuse:
                pipe.fuse_lora(adapter_names=names)
        _STATE.update(pipe=pipe, loras=(loras, scale, fuse))
    return _STATE["pipe"]


def _unet_scale(scale: float | dict[str, float]) -> float:
    return scale["unet"] if isinstance(scale, dict) else scale


def run_job(job: dict) -> dict:
    """Generate and score one (case, method, seed chunk)."""
    from ait2i_ext.shapes.evaluator import evaluate

    case, method, seeds = job["case"], job["method"], job["seeds"]
    regional = "regional" in method
    pipe = _pipeline(job["model"], tuple(job["lora_paths"]), job["lora_scale"], fuse=not regional)
    call = dict(
        num_inference_steps=job["steps"],
        guidance_scale=job["guidance_scale"],
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    start = time.process_time()
    subjects = case["nouns"]
    if method.startswith("ait2i+id") or (regional and case["identifiers"]):
        subjects = personalized_subjects(case["prompt"], case["identifiers"], subjects)
    if regional:  # adapters default_<i> in the order of the case's LoRAs
        adapters = {ident: f"default_{case['loras'].index(LORA_OF[ident])}" for ident in case["identifiers"]}
        fields = job["regional2" if method.endswith("2") else "regional"]
        if case["identifiers"]:  # the automatic layout's boxes for mask_source "regions" / "mixed"
            subjects = with_layout(subjects, RegionalConfig(**fields))
        context = regional_loras(
            pipe, case["prompt"], adapters, len(seeds), RegionalConfig(**fields),
            weights={ident: _unet_scale(job["lora_scale"]) for ident in adapters}, subjects=subjects,
        )  # fmt: skip
    else:
        context = contextlib.nullcontext()
    with context:
        if method in ("plain", "regional"):
            images = pipe(case["prompt"], **call).images
        else:
            config = AIT2IConfig(loss=LossConfig(**job["radii"]))
            images = generate(pipe, case["prompt"], subjects, config=config, **call).images
    seconds = (time.process_time() - start) / len(seeds)
    objects = requested_objects(case)
    present = [evaluate(image, objects).all_present for image in images]
    keep = {s: image for s, image in zip(seeds, images, strict=True) if s in job["example_seeds"]}
    return {
        "job": {k: job[k] for k in ("case_id", "method")},
        "present": present,
        "seconds": seconds,
        "examples": keep,
    }


# --- the run ------------------------------------------------------------------------------------


NUM_CLASS_IMAGES = 2000


def train_concept(model: str, ident: str, images: Path, class_dir: Path, out: Path) -> tuple[Path, float]:
    """Train the concept's LoRA with train_lora.py's defaults and prior preservation on the rendered
    scenes of the training world in ``class_dir`` (captioned, written once and shared)."""
    try:
        from ait2i_ext.training import train_lora
    except ImportError:
        from training import train_lora

    shape = CONCEPTS[ident][0]
    start = time.process_time()
    train_lora.main(
        ["--pretrained_model", model, "--instance_data_dir", str(images),
         "--instance_prompt", f"a {ident} {shape}", "--output_dir", str(out),
         "--with_prior_preservation", "--class_data_dir", str(class_dir),
         "--num_class_images", str(NUM_CLASS_IMAGES)]
    )  # fmt: skip
    return out, time.process_time() - start


def format_table(rows: list[dict], methods: Sequence[str] = METHODS) -> str:
    width = {m: max(10, len(m) + 2) for m in methods}
    header = (
        f"{'group':<16}{'prompt':<40}{'LoRAs':<12}"
        + "".join(f"{m:>{width[m]}}" for m in methods)
        + f"{'n':>5}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = "".join(
            f"{100 * r['present'][m]:>{width[m] - 1}.1f}%" if m in r["present"] else f"{'':>{width[m]}}"
            for m in methods
        )
        lines.append(
            f"{r['group']:<16}{r['prompt']:<40}{'+'.join(r['loras']) or 'none':<12}{cells}{r['n']:>5}"
        )
    return "\n".join(lines)


def paired(flags: list[bool], reference: list[bool]) -> tuple[int, int]:
    """Seeds right with ``flags`` and wrong with ``reference``, and the reverse (same seeds)."""
    return (sum(a and not b for a, b in zip(flags, reference, strict=True)),
            sum(b and not a for a, b in zip(flags, reference, strict=True)))  # fmt: skip


def paired_table(rows: list[dict], methods: Sequence[str]) -> str:
    """Per row and method: +wins / -losses against plain (and against ait2i+id for the regional one), and
    the CPU seconds per image relative to plain's."""
    lines = ["paired counts (+right/-wrong vs plain, same seeds) and CPU time per image relative to plain:"]
    for r in rows:
        if "plain" not in r["flags"]:
            continue
        cells = []
        for m in methods:
            if m == "plain" or m not in r["flags"]:
                continue
            win, loss = paired(r["flags"][m], r["flags"]["plain"])
            cell = f"{m} +{win}/-{loss}"
            for other in ("ait2i+id", "ait2i+id+regional"):
                if m.startswith("ait2i+id+regional") and m != other and other in r["flags"]:
                    cell += f" (vs {other} " + "+{}/-{})".format(*paired(r["flags"][m], r["flags"][other]))
            cells.append(f"{cell} x{r['seconds'][m] / r['seconds']['plain']:.2f}")
        lines.append(f"  {r['prompt']} [{'+'.join(r['loras']) or 'none'}]: " + "; ".join(cells))
    return "\n".join(lines)


def examples_grid(examples: dict, seeds: list[int]) -> Image.Image | None:
    """The figure of the docs: concept alone, next to a square, two concepts; plain vs ait2i (and ait2i +
    regional LoRA when it ran)."""
    from ait2i_ext.viz import side_by_side

    strips = []
    for prompt in ("a sks star", "a sks star and a blue square", "a sks star and a xyz heart"):
        for seed in seeds:
            tiles = {
                m: examples[(prompt, m, seed)]
                for m in ("plain", "ait2i+id", "ait2i+id+regional", "ait2i+id+regional2")
                if (prompt, m, seed) in examples
            }
            if tiles:
                strips.append(side_by_side(tiles, title=f"{prompt} (seed {seed})", cell=128))
    if not strips:
        return None
    grid = Image.new("RGB", (max(s.width for s in strips) * 2, sum(s.height for s in strips[::2])), "white")
    for i, strip in enumerate(strips):
        grid.paste(strip, ((i % 2) * strip.width, sum(s.height for s in strips[: i - i % 2 : 2])))
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="shapes-world pipeline folder (default: the shipped shapes model)")
    parser.add_argument("--out", default="out/personalization")
    parser.add_argument("--images", type=int, default=10, help="instance images per concept")
    parser.add_argument("--with-other", type=int, default=5, help="of them, beside one other shape")
    parser.add_argument("--lora-star", help="a trained 'a sks star' LoRA (default: train one)")
    parser.add_argument("--lora-heart", help="a trained 'a xyz heart' LoRA (default: train one)")
    parser.add_argument(
        "--others", default=",".join(SECOND_SUBJECTS), help="second subjects, comma-separated"
    )
    parser.add_argument("--base-prompts", default=",".join(BASE_PROMPTS), help="prompts without identifier")
    parser.add_argument(
        "--base-loras", default="star,star+heart", help="LoRA sets the base prompts run with (besides none)"
    )
    parser.add_argument(
        "--lora-scale",
        default="1",
        help="every LoRA's weight: '0.7', or per part 'unet=0.5,text_encoder=1' (default: 1, as trained)",
    )
    parser.add_argument(
        "--seeds", type=int, default=64, help="seeds --first-seed.. for every prompt and method"
    )
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--regional",
        default="",
        help="RegionalConfig fields for the regional methods, e.g. 'threshold=0.2,dilation=1,mask_source=mean' "
        "(default: RegionalConfig's)",
    )
    parser.add_argument(
        "--regional2",
        default="",
        help="RegionalConfig fields for the method ait2i+id+regional2, e.g. 'assign=strongest' "
        "(default: RegionalConfig's)",
    )
    parser.add_argument(
        "--groups",
        default=",".join(GROUPS),
        help=f"the row groups to run, comma-separated, of {', '.join(GROUPS)} (default: all)",
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--workers", type=int, default=2, help="processes, one CPU thread each")
    parser.add_argument(
        "--aggregation-radius",
        type=float,
        help="default: the model's ait2i.json (2.5 on the shipped model), else 5",
    )
    parser.add_argument(
        "--alignment-radius",
        type=float,
        help="default: the model's ait2i.json (3 on the shipped model), else 6",
    )
    args = parser.parse_args(argv)
    try:  # the model's ait2i.json radii; bad radii fail here, before any training
        radii = model_loss(
            args.model or default_model_path(),
            aggregation_radius=args.aggregation_radius,
            alignment_radius=args.alignment_radius,
        )
    except ValueError as e:
        raise SystemExit(f"--aggregation-radius / --alignment-radius: {e}") from None
    try:
        lora_scale = parse_lora_scale(args.lora_scale)
    except ValueError as e:
        raise SystemExit(f"--lora-scale: {e}") from None
    for flag in ("seeds", "images", "steps", "workers"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag}={getattr(args, flag)} is invalid: expected an integer >= 1")
    if not 0 <= args.with_other <= args.images:
        raise SystemExit(f"--with-other={args.with_other} is invalid: expected 0..--images ({args.images})")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(
            f"--methods={args.methods!r} is invalid: expected a comma-separated subset of {METHODS}"
        )
    try:
        regional = dataclasses.asdict(parse_regional(args.regional))
    except ValueError as e:
        raise SystemExit(f"--regional: {e}") from None
    try:
        regional2 = dataclasses.asdict(parse_regional(args.regional2))
    except ValueError as e:
        raise SystemExit(f"--regional2: {e}") from None
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if not groups or any(g not in GROUPS for g in groups):
        raise SystemExit(
            f"--groups={args.groups!r} is invalid: expected a comma-separated subset of {GROUPS}"
        )
    others = [o.strip() for o in args.others.split(",") if o.strip()]
    from ait2i_ext.shapes.data import COLOURS, SHAPES

    for other in others:
        words = other.split()
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES or words[0] == "yellow":
            raise SystemExit(
                f"--others: {other!r} is invalid: expected 'colour shape' with a colour of {list(COLOURS)} "
                f"other than the star's yellow and a shape of {SHAPES}"
            )
    base_prompts = [p.strip() for p in args.base_prompts.split(",") if p.strip()]
    base_loras = [b.split("+") for b in args.base_loras.split(",") if b]
    if any(name not in LORA_OF.values() for names in base_loras for name in names):
        raise SystemExit(f"--base-loras={args.base_loras!r} is invalid: expected sets like 'star,star+heart'")
    for flag, path in (("--lora-star", args.lora_star), ("--lora-heart", args.lora_heart)):
        if path is not None and not Path(path).exists():
            raise SystemExit(f"{flag}={path!r} does not exist: expected a LoRA folder or .safetensors file")
    if args.model:
        model = args.model
    else:
        model = default_model_path()
    if not (Path(model) / "model_index.json").is_file():
        raise SystemExit(
            f"--model {model!r} has no model_index.json: expected a shapes-world pipeline folder"
        )

    out = Path(args.out)
    lora_paths, train_seconds = {"star": args.lora_star, "heart": args.lora_heart}, {}
    for ident, (shape, colour) in CONCEPTS.items():
        if lora_paths[shape] is not None:
            continue
        images = out / f"instance-{shape}"
        scenes = concept_scenes(shape, colour, ident, args.images, args.with_other, seed=len(train_seconds))
        write_concept(images, scenes, shape)
        class_dir = out / "class-scenes"
        if not class_dir.is_dir():
            write_concept(class_dir, class_scenes(NUM_CLASS_IMAGES), "scene")
        folder, train_seconds[shape] = train_concept(model, ident, images, class_dir, out / f"lora-{shape}")
        lora_paths[shape] = str(folder)

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    chunks = [seeds[i : i + 16] for i in range(0, len(seeds), 16)]
    example_seeds = seeds[:2]
    all_cases = [c for c in cases(others, base_prompts, base_loras, methods) if c["group"] in groups]
    jobs = [
        {"case_id": i, "case": case, "method": method, "seeds": chunk, "model": model, "radii": radii,
         "lora_paths": [lora_paths[name] for name in case["loras"]], "lora_scale": lora_scale,
         "steps": args.steps, "guidance_scale": args.guidance_scale, "example_seeds": example_seeds,
         "regional": regional, "regional2": regional2}
        for i, case in enumerate(all_cases) for method in case["methods"] for chunk in chunks
    ]  # fmt: skip
    # Case by case (the concept alone first), so that a partial run still holds whole prompts.
    jobs.sort(key=lambda j: j["case_id"])
    from tqdm.auto import tqdm

    results = []
    out.mkdir(parents=True, exist_ok=True)
    partial = (out / "partial.jsonl").open("w")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for result in tqdm(pool.map(run_job, jobs), total=len(jobs), desc="image batches"):
            results.append(result)
            partial.write(json.dumps({k: v for k, v in result.items() if k != "examples"}) + "\n")
            partial.flush()
    partial.close()

    rows, examples = [], {}
    for i, case in enumerate(all_cases):
        row = {k: case[k] for k in ("group", "prompt", "loras")}
        row["present"], row["seconds"] = {}, {}
        for method in case["methods"]:
            mine = [r for r in results if r["job"] == {"case_id": i, "method": method}]
            flags = [p for r in mine for p in r["present"]]  # in seed order (jobs and chunks are)
            row["present"][method] = sum(flags) / len(flags)
            row.setdefault("flags", {})[method] = flags
            row["seconds"][method] = sum(r["seconds"] for r in mine) / len(mine)
            row["n"] = len(flags)
            for r in mine:
                for seed, image in r["examples"].items():
                    examples[(case["prompt"], method, seed)] = image
        rows.append(row)

    print(
        f"model: {model}; LoRAs: {lora_paths} (trained in CPU s: "
        f"{', '.join(f'{k} {v:.0f}' for k, v in train_seconds.items()) or 'reused'}); LoRA scale {lora_scale}; "
        f"seeds {seeds[0]}..{seeds[-1]}; {args.steps} steps; guidance scale {args.guidance_scale}; radii {radii}"
    )
    print(f"regional: {RegionalConfig(**regional)}")
    if "ait2i+id+regional2" in methods:
        print(f"regional2: {RegionalConfig(**regional2)}")
    print(format_table(rows, [m for m in METHODS if m in methods]))
    print(paired_table(rows, [m for m in METHODS if m in methods]))
    out.mkdir(parents=True, exist_ok=True)
    grid = examples_grid(examples, example_seeds)
    if grid is not None:
        grid.save(out / "examples.png")
    (out / "table.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "model": model,
                "loras": lora_paths,
                "train_cpu_seconds": train_seconds,
                "seeds": seeds,
                "rows": rows,
            },
            indent=2,
        )  # fmt: skip
    )
    print(f"wrote {out / 'table.json'} and {out / 'examples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
