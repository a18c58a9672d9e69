"""Deviations from the authors' code, measured: variants of one ait2i setting side by side.

    OMP_NUM_THREADS=1 python benchmarks/deviations.py --variants peak_source=remaining,peak_source=full

Every variant is a ``LossConfig`` / ``ScheduleConfig`` field override (``field=value``) on top of
the model's own settings (its ``ait2i.json``); all variants run the same prompts (the shapes
prompt sets of ``benchmarks/alignment.py``), the same seeds and the same scheduler, scored by the
shapes evaluator. ``--scheduler PNDMScheduler`` swaps the model's scheduler (same config). Prints
one table and writes ``--out``/table.json.
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
from ait2i_ext.config import model_config  # noqa: E402


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
    """``base`` with each field set on the config (``LossConfig`` or ``ScheduleConfig``) that has it."""
    loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
    schedule_fields = {f.name for f in dataclasses.fields(ScheduleConfig)}
    loss = {k: v for k, v in overrides.items() if k in loss_fields}
    schedule = {k: v for k, v in overrides.items() if k in schedule_fields}
    unknown = set(overrides) - loss_fields - schedule_fields
    if unknown:
        raise SystemExit(f"--variants: {sorted(unknown)} are not LossConfig or ScheduleConfig fields")
    if "refinement_thresholds" in schedule:
        schedule["refinement_thresholds"] = tuple(tuple(p) for p in schedule["refinement_thresholds"])
    return dataclasses.replace(
        base,
        loss=dataclasses.replace(base.loss, **loss),
        schedule=dataclasses.replace(base.schedule, **schedule),
    )


def main(argv: list[str] | None = None) -> int:
    from diffusers import DiffusionPipeline

    from ait2i_ext.shapes.model import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True, help="comma-separated; each 'field=value;field=value'")
    parser.add_argument("--sets", default="two")
    parser.add_argument("--prompts-per-set", type=int, default=2)
    parser.add_argument("--seeds", default="0-31", help="first-last, inclusive")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--scheduler", help="a diffusers scheduler class name (default: the model's)")
    parser.add_argument("--out", default="out/deviations")
    args = parser.parse_args(argv)

    model = default_model_path()
    base = model_config(model)
    variants = [(v, variant_config(base, parse_variant(v))) for v in args.variants.split(",")]
    first, last = (int(x) for x in args.seeds.split("-"))
    seeds = list(range(first, last + 1))
    pipe = DiffusionPipeline.from_pretrained(model)
    if args.scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    cases = shapes_cases([s.strip() for s in args.sets.split(",")], args.prompts_per_set)
    rows = []
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
                    generator=[torch.Generator().manual_seed(s) for s in chunk],
                    num_inference_steps=args.steps,
                    num_images_per_prompt=len(chunk),
                )
                scores += [score_shapes(image, case) for image in out.images]
        row = {"variant": name, "n": len(scores), "seconds": time.perf_counter() - start}
        row.update({k: sum(s[k] for s in scores) / len(scores) for k in ("present", "bound", "correct")})
        rows.append(row)
        print(
            f"{name:<40} present {100 * row['present']:5.1f}%  bound {100 * row['bound']:5.1f}%  "
            f"correct {100 * row['correct']:5.1f}%  n={row['n']}  {row['seconds']:.0f}s",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items()}
    (out / "table.json").write_text(json.dumps({"args": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
