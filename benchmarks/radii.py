"""Do adaptive radii follow the objects? Blob radius of each subject's map per guided step vs the drawn object.

    OMP_NUM_THREADS=1 python benchmarks/radii.py --resolutions 16,8 --sets two:4-9 --seeds 2000-2003

Runs the shipped shapes model with its own settings (guided), reading the maps at each of
``--resolutions`` (16: the maps the losses read; 8: the next level, the same objects at half the
cells), and records :func:`ait2i_ext.losses.blob_radius` of every group's main map at every guided
step. Each object the evaluator finds in the final image (its colour and shape) gives its radius
``sqrt(area / pi)``. Prints, per resolution and step, the median blob radius in cells of a 16x16
map and its correlation with the drawn object's radius over the objects found; a fixed radius is
the same for every object (correlation 0 by construction). Writes ``--out``/radii.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deviations import select_cases  # noqa: E402

from ait2i_ext import generate, losses, objective  # noqa: E402
from ait2i_ext.config import model_config  # noqa: E402


def object_radius(image, case, reference: int) -> list[float | None]:
    """Radius of each requested object as drawn (largest matching blob), in cells of a ``reference`` map."""
    from ait2i_ext.shapes.evaluator import detect

    found = detect(image)
    out = []
    for obj in case.objects:
        areas = [d.area for d in found if d.colour == obj.colour and d.shape == obj.shape]
        out.append(math.sqrt(max(areas) / math.pi) * reference / image.size[0] if areas else None)
    return out


def correlation(xs: list[float], ys: list[float]) -> float:
    return float(torch.corrcoef(torch.tensor([xs, ys]))[0, 1]) if len(xs) > 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    from diffusers import DiffusionPipeline

    from ait2i_ext.shapes.model import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="16,8", help="map sides to read, comma-separated")
    parser.add_argument("--sets", default="two:4-9", help="as benchmarks/deviations.py --sets")
    parser.add_argument("--seeds", default="2000-2003", help="first-last, inclusive")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default="out/radii")
    args = parser.parse_args(argv)

    model = default_model_path()
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    first, last = (int(x) for x in args.seeds.split("-"))
    seeds = list(range(first, last + 1))
    base = model_config(model)
    reference = base.loss.reference_resolution
    seen: list[torch.Tensor] = []
    group_radii = objective.group_radii

    def record(main, cfg):  # the radii are chosen here at every guided step: note the blob radius too
        n, g, h, w = main.shape
        size = losses.blob_radius(main.reshape(n * g, h, w), cfg.radius_level).view(n, g)
        seen.append(size * reference / h)
        return group_radii(main, cfg)

    objective.group_radii = record
    results = {}
    try:
        for side in (int(x) for x in args.resolutions.split(",")):
            config = dataclasses.replace(base, attention_resolution=side)
            blobs, drawn = [], []
            for case in select_cases(args.sets, 1):
                seen.clear()
                out = generate(
                    pipe,
                    case.text,
                    list(case.subjects),
                    config=config,
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                    num_inference_steps=args.steps,
                    num_images_per_prompt=len(seeds),
                )
                blobs.append(torch.stack(seen, dim=1))  # (N, steps, G)
                drawn += [object_radius(image, case, reference) for image in out.images]
            blobs = torch.cat(blobs)
            rows = []
            for step in range(blobs.shape[1]):
                pairs = [
                    (float(blobs[i, step, g]), r)
                    for i, radii in enumerate(drawn)
                    for g, r in enumerate(radii)
                    if r is not None
                ]
                xs, ys = zip(*pairs)
                rows.append(
                    {"step": step, "median": statistics.median(xs), "corr": correlation(list(xs), list(ys))}
                )
            found = [r for radii in drawn for r in radii if r is not None]
            results[side] = {"objects": len(found), "object_median": statistics.median(found), "steps": rows}
            print(
                f"maps {side}x{side}: {len(found)} objects found, drawn radius median "
                f"{statistics.median(found):.2f} (cells of {reference}x{reference})"
            )
            for row in rows:
                print(
                    f"  step {row['step']:>2}: blob radius median {row['median']:.2f}  corr {row['corr']:+.2f}"
                )
    finally:
        objective.group_radii = group_radii
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "radii.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
