"""Deviations from the authors' code, measured: variants of one ait2i setting side by side.

    OMP_NUM_THREADS=1 python benchmarks/deviations.py --variants peak_source=remaining,peak_source=full

Every variant is a ``LossConfig`` / ``ScheduleConfig`` field override (``field=value``, or
``mode=`` / ``map_blocks=``, or ``preset=NAME``: that preset's fields) on top of the model's own settings (its ``ait2i.json``), or ``plain`` (the stock
pipeline, guidance off); all variants run the same prompts (the shapes
prompt sets of ``benchmarks/alignment.py``), the same seeds and the same scheduler, scored by the
shapes evaluator. ``--scheduler PNDMScheduler`` swaps the model's scheduler (same config). Prints
one table (with paired counts on fully correct against the first variant: images right here and
wrong there, and the reverse) and writes ``--out``/table.json (rows and every image's scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment import score_shapes, shapes_cases  # noqa: E402

from ait2i_ext import AIT2IConfig, LossConfig, ScheduleConfig, generate  # noqa: E402
from ait2i_ext.config import PRESETS, model_config  # noqa: E402


def parse_variant(text: str) -> dict[str, object]:
    """``"peak_source=full;top_k=2"`` -> ``{"peak_source": "full", "top_k": 2}`` (values as JSON, else str)."""
    out = {}
    for item in filter(None, text.split(";")):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[name.strip()] = value.strip()
    return out


def variant_config(base: AIT2IConfig, overrides: dict[str, object]) -> AIT2IConfig:
    """``base`` with each field set on the config (``LossConfig``, ``ScheduleConfig`` or ``AIT2IConfig``'s
    ``mode`` / ``map_blocks``) that has it; ``preset`` sets that preset's fields first."""
    loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
    schedule_fields = {f.name for f in dataclasses.fields(ScheduleConfig)}
    overrides = dict(overrides)
    if "preset" in overrides:  # a named preset's fields first, then the variant's own
        name = overrides.pop("preset")
        if name not in PRESETS:
            raise SystemExit(f"--variants: preset={name!r} is invalid: expected one of {sorted(PRESETS)}")
        preset = PRESETS[name]
        overrides = {**preset.get("schedule", {}), **preset.get("options", {}), **overrides}
    loss = {k: v for k, v in overrides.items() if k in loss_fields}
    schedule = {k: v for k, v in overrides.items() if k in schedule_fields}
    options = {k: v for k, v in overrides.items() if k in ("mode", "map_blocks")}
    unknown = set(overrides) - loss_fields - schedule_fields - set(options)
    if unknown:
        raise SystemExit(
            f"--variants: {sorted(unknown)} are not LossConfig or ScheduleConfig fields or mode / map_blocks"
        )
    if "refinement_thresholds" in schedule:
        schedule["refinement_thresholds"] = tuple(tuple(p) for p in schedule["refinement_thresholds"])
    try:
        return dataclasses.replace(
            base,
            loss=dataclasses.replace(base.loss, **loss),
            schedule=dataclasses.replace(base.schedule, **schedule),
            **options,
        )
    except ValueError as err:  # a field's value the config refuses: one line, naming it
        raise SystemExit(f"--variants: {err}") from None


def paired(records: list[dict], first: str, name: str) -> dict[str, int]:
    """Paired counts on fully correct: images (same prompt and seed) right with ``name`` and wrong with
    ``first`` (``wins``), and the reverse (``losses``)."""
    base = {(r["prompt"], r["seed"]): r["correct"] for r in records if r["variant"] == first}
    mine = [(base[(r["prompt"], r["seed"])], r["correct"]) for r in records if r["variant"] == name]
    return {"wins": sum(b < m for b, m in mine), "losses": sum(b > m for b, m in mine)}


def set_rows(records: list[dict], names: list[str]) -> list[dict]:
    """Per prompt set and variant: the three rates, ``n`` and the paired counts against ``names[0]``."""
    rows = []
    for set_name in dict.fromkeys(r["set"] for r in records):
        mine = [r for r in records if r["set"] == set_name]
        for name in names:
            rs = [r for r in mine if r["variant"] == name]
            row = {"set": set_name, "variant": name, "n": len(rs)}
            row.update({k: sum(r[k] for r in rs) / len(rs) for k in ("present", "bound", "correct")})
            rows.append({**row, **paired(mine, names[0], name)})
    return rows


def select_cases(spec: str, per_set: int) -> list:
    """The prompts of ``--sets``: ``"two:2-3,three:0-0"`` -> ``two``'s prompts 2 and 3 and ``three``'s first."""
    cases = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, span = item.partition(":")
        if not span:
            cases += shapes_cases([name], per_set)
            continue
        try:
            first, last = (int(x) for x in span.split("-"))
        except ValueError:
            raise SystemExit(f"--sets: {item!r} is invalid: expected NAME or NAME:FIRST-LAST") from None
        chosen = shapes_cases([name], last + 1)[first:]
        if first < 0 or len(chosen) != last - first + 1:
            raise SystemExit(f"--sets: {item!r} is invalid: set {name!r} has no prompts {first}..{last}")
        cases += chosen
    return cases


def main(argv: list[str] | None = None) -> int:
    from diffusers import DiffusionPipeline

    from ait2i_ext.shapes.model import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True, help="comma-separated; each 'field=value;field=value'")
    parser.add_argument(
        "--sets",
        default="two",
        help="shapes prompt sets, comma-separated; 'name:FIRST-LAST' takes that set's prompts FIRST..LAST "
        "(0-based, inclusive; e.g. 'two:2-3,three:0-0' for a split other than the first prompts)",
    )
    parser.add_argument("--prompts-per-set", type=int, default=2, help="for a set named without a range")

    parser.add_argument("--seeds", default="0-31", help="first-last, inclusive")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--batch", type=int, default=16, help="seeds per call (num_images_per_prompt): refinement's batch"
    )
    parser.add_argument("--scheduler", help="a diffusers scheduler class name (default: the model's)")
    parser.add_argument("--out", default="out/deviations")
    args = parser.parse_args(argv)

    cases = select_cases(args.sets, args.prompts_per_set)
    model = default_model_path()
    base = model_config(model)
    # "plain": the stock pipeline (guidance off), same seeds
    variants = [
        (v, None if v == "plain" else variant_config(base, parse_variant(v)))
        for v in args.variants.split(",")
    ]
    first, last = (int(x) for x in args.seeds.split("-"))
    seeds = list(range(first, last + 1))
    pipe = DiffusionPipeline.from_pretrained(model)
    if args.scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rows, records = [], []
    for name, config in variants:
        scores, start = [], time.perf_counter()
        for case in cases:
            for i in range(0, len(seeds), args.batch):
                chunk = seeds[i : i + args.batch]
                out = generate(
                    pipe,
                    case.text,
                    list(case.subjects),
                    config=config,
                    guidance=config is not None,
                    generator=[torch.Generator().manual_seed(s) for s in chunk],
                    num_inference_steps=args.steps,
                    num_images_per_prompt=len(chunk),
                )
                for seed, image in zip(chunk, out.images):
                    scores.append(score_shapes(image, case))
                    records.append({"variant": name, "set": case.set_name, "prompt": case.text, "seed": seed})
                    records[-1].update(scores[-1])
        row = {"variant": name, "n": len(scores), "seconds": time.perf_counter() - start}
        row.update({k: sum(s[k] for s in scores) / len(scores) for k in ("present", "bound", "correct")})
        row.update(paired(records, variants[0][0], name))
        rows.append(row)
        print(
            f"{name:<40} present {100 * row['present']:5.1f}%  bound {100 * row['bound']:5.1f}%  "
            f"correct {100 * row['correct']:5.1f}%  correct vs first +{row['wins']}/-{row['losses']}  "
            f"n={row['n']}  {row['seconds']:.0f}s",
            flush=True,
        )
    per_set = set_rows(records, [name for name, _ in variants])
    for row in per_set if len({r["set"] for r in per_set}) > 1 else []:
        print(
            f"  {row['set']:<14}{row['variant']:<40} present {100 * row['present']:5.1f}%  "
            f"bound {100 * row['bound']:5.1f}%  correct {100 * row['correct']:5.1f}%  "
            f"+{row['wins']}/-{row['losses']}  n={row['n']}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items()}
    table = {"args": meta, "rows": rows, "sets": per_set, "images": records}
    (out / "table.json").write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
