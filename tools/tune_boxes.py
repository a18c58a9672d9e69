"""Box-term variants on the shipped shapes model, side by side with plain and AI-T2I without boxes.

The tuning tool behind the "boxes alone" table of docs/layout.md: every variant runs on the same
prompts and seeds, scored by ``ait2i_ext.shapes.evaluator`` (all present, fully correct, in box =
an asked object detected with IoU >= 0.5 with its box). Results are cached per variant and split
under ``--out``, so adding a variant does not rerun the others.

    OMP_NUM_THREADS=1 python tools/tune_boxes.py --sets two --prompt-offset 3 --prompts-per-set 2 \\
        --seeds 16 --variants plain,ait2i,boxes,iters5
    # the same variants on the shipped ControlNet (control image: the objects' edges at their boxes)
    OMP_NUM_THREADS=1 python tools/tune_boxes.py --sets three --prompt-offset 1 --variants cn-plain,cn-iters3
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from ait2i_ext.adapters.controlnet import load_controlnet_pipeline
from ait2i_ext.adapters.layout import ROUTE_SETTINGS

from ait2i_ext import AIT2IConfig, LossConfig, ScheduleConfig, Subject, generate
from ait2i_ext.shapes.model import SHAPES_LOSS, default_controlnet_path, default_model_path
from ait2i_ext.shapes.prompts import prompt_set

logger = logging.getLogger(__name__)

RADII = dict(aggregation_radius=SHAPES_LOSS.aggregation_radius, alignment_radius=SHAPES_LOSS.alignment_radius)

# name -> (LossConfig overrides, ScheduleConfig overrides) on top of BASE; "plain" and "ait2i" get no
# boxes, "default..." start from the route's settings as they are now (library defaults + ROUTE_SETTINGS).
BASE = ({"box_members": False}, {"box_update_terms": ("box",)})  # the box settings of the first round
MEX_IT5 = ({"box_members": True}, {"box_update_terms": ("box", "existence"), "box_iterations": 5})
VARIANTS: dict[str, tuple[dict, dict]] = {
    "plain": ({}, {}),
    "ait2i": ({}, {}),
    "boxes": ({}, {"box_iterations": 0}),  # the box term before issue 10 (weight 1, no box schedule)
    "wbox4": ({"w_box": 4.0}, {"box_iterations": 0}),
    "iters5": ({}, {"box_iterations": 5, "box_guided_fraction": 0.2, "box_step_scale": 20.0}),
    "iters5-s60": ({}, {"box_iterations": 5, "box_guided_fraction": 0.2, "box_step_scale": 60.0}),
    "iters5-sq": (
        {"box_power": 2.0},
        {"box_iterations": 5, "box_guided_fraction": 0.2, "box_step_scale": 60.0},
    ),
    "iters5-topk": (
        {"w_box_topk": 1.0},
        {"box_iterations": 5, "box_guided_fraction": 0.2, "box_step_scale": 60.0},
    ),
    "iters5-s10": ({}, {"box_iterations": 5, "box_guided_fraction": 0.2, "box_step_scale": 10.0}),
    "iters3": (
        {},
        {"box_iterations": 3, "box_guided_fraction": 0.2, "box_step_scale": 20.0},
    ),  # round 1's default
    "iters5-noleak": (
        {"box_leak_weight": 0.0},
        {"box_iterations": 5, "box_guided_fraction": 0.2, "box_step_scale": 60.0},
    ),
    # issue 10, second round: keep the other terms inside the box-only updates, boxes for attributes too
    "iters3-ex": ({}, {"box_update_terms": ("box", "existence")}),
    "iters3-exiso": ({}, {"box_update_terms": ("box", "existence", "isolation")}),
    "iters3-mem": ({"box_members": True}, {}),
    "iters3-mem-ex": ({"box_members": True}, {"box_update_terms": ("box", "existence")}),  # the default
    "iters2": ({}, {"box_iterations": 2}),
    "iters3-sq": ({"box_power": 2.0}, {}),
    "iters3-frac1": ({}, {"box_guided_fraction": 0.1}),
    "default": ({}, {}),
    # issue 14, seventh sitting: the shipped model's ait2i.json adds the split term (w_split), which the
    # CLI's boxes route and AI-T2I without boxes read; these two are them as the shipped model runs them
    "default-split": ({"w_split": SHAPES_LOSS.w_split}, {}),
    "ait2i-split": ({"w_split": SHAPES_LOSS.w_split}, {}),
    "default-frac4": ({}, {"box_guided_fraction": 0.4}),
    "default-s40": ({}, {"box_step_scale": 40.0}),
    "default-refine": ({}, {"refinement": True}),
    "default-all": ({}, {"box_guided_fraction": 0.5, "box_update_terms": ("box", "existence", "alignment")}),
    # issue 10, third round: the second round's settings with a stronger or longer box pull
    "mex-s40": ({"box_members": True}, {"box_update_terms": ("box", "existence"), "box_step_scale": 40.0}),
    "mex-frac3": (
        {"box_members": True},
        {"box_update_terms": ("box", "existence"), "box_guided_fraction": 0.3},
    ),
    "mex-it5": MEX_IT5,
    "mex-s30": ({"box_members": True}, {"box_update_terms": ("box", "existence"), "box_step_scale": 30.0}),
    "default-it5": ({}, {"box_iterations": 5}),
    "mex-it5-s12": (
        {"box_members": True},
        {"box_update_terms": ("box", "existence"), "box_iterations": 5, "box_step_scale": 12.0},
    ),
    # a strong pull on the first 3 of 25 steps only
    "mex-s40-f12": (
        {"box_members": True},
        {"box_update_terms": ("box", "existence"), "box_step_scale": 40.0, "box_guided_fraction": 0.12},
    ),
    "mex-it8-f12": (
        {"box_members": True},
        {"box_update_terms": ("box", "existence"), "box_iterations": 8, "box_guided_fraction": 0.12},
    ),
    "mex-cen3": (
        {"box_members": True, "box_centroid_weight": 3.0},
        {"box_update_terms": ("box", "existence")},
    ),
    # issue 10, fourth round, from mex-it5 (the boxes route's settings before it): layout guidance's
    # squared energy (the worst-placed map pulls most), with BoxDiff's inner/outer top-k or a stronger
    # step, the existence term read inside the box, a longer box schedule, and a stronger pull whose
    # box-only updates stop once an image is in its boxes
    **{
        f"mex-it5-{name}": ({**MEX_IT5[0], **loss}, {**MEX_IT5[1], **schedule})
        for name, (loss, schedule) in {
            "sq": ({"box_power": 2.0}, {}),
            "sq-topk": ({"box_power": 2.0, "w_box_topk": 1.0}, {}),
            "sq-s30": ({"box_power": 2.0}, {"box_step_scale": 30.0}),
            "inex": ({"box_existence": True}, {}),
            "frac4": ({}, {"box_guided_fraction": 0.4}),
            # box term <= 0.85: about where both objects of a two-object prompt are in their boxes
            "s40-stop": ({}, {"box_step_scale": 40.0, "box_stop": 0.85}),
        }.items()
    },
    # issue 10, fifth round: the fourth round's report row ran this by mistake (alignment.py's model
    # schedule replaced the route's): the squared energy, top-k and boxed attributes with the library's
    # box schedule (3 box-only updates on the box term alone)
    "sq-topk-mem": ({"box_members": True, "box_power": 2.0, "w_box_topk": 1.0}, {}),
    # issue 10, sixth round, from the route (sq-topk-mem): on three objects the maps stay diffuse and
    # the box term's mass ratio barely moves (the middle object's share stays at its box's area), so
    # a sharper map for the ratio, a stronger or longer pull
    "default-words": ({"box_maps": "words"}, {}),
    "default-wbox3": ({"w_box": 3.0}, {}),
    "default-it6": ({}, {"box_iterations": 6}),
    "default-words-s40": ({"box_maps": "words"}, {"box_step_scale": 40.0}),
    # objects land beside their box or smaller than it: BoxDiff's inner top-k over half the box asks
    # for an object its size
    "default-topk5": ({"box_topk_fraction": 0.5}, {}),
    # issue 10, seventh round: the extent energy (layout guidance's share outside the box, a pull of
    # every outside cell by its distance to the box, BoxDiff's corner constraint made loose: the map
    # reaches each side) instead of the centroid pull, which squares triangles and gives a centred
    # box nothing
    "default-extent": ({"box_energy": "extent"}, {}),
    "default-extent-d3": ({"box_energy": "extent", "box_distance_weight": 3.0}, {}),
    "default-extent-s40": ({"box_energy": "extent"}, {"box_step_scale": 40.0}),
    # the sides dropped: the mass inside the box, pulled by distance (BoxDiff's top-k sets the size)
    "default-extent-noside": ({"box_energy": "extent", "box_side_weight": 0.0}, {}),
    "default-extent-noside-d3": (
        {"box_energy": "extent", "box_side_weight": 0.0, "box_distance_weight": 3.0},
        {},
    ),
    "default-extent-side3": ({"box_energy": "extent", "box_side_level": 0.3}, {}),
    # the four above ran with the side term's peak differentiable (commit 3a7b6da): it pushed each
    # map's peak down, and objects faded; from here the peak is a constant
    "default-extent-fixedpeak": ({"box_energy": "extent"}, {}),
    # issue 10, eighth round, from the route as shipped (with the model's split term): the extent
    # energy's distance pull added to the centroid energy, so the middle of a row of boxes (a map
    # spread above and below it, centred on it) is pulled too; the side term (what lost objects) left out
    "default-split-far1": ({"w_split": SHAPES_LOSS.w_split, "box_far_weight": 1.0}, {}),
    # isolation pushes the groups' centres apart: with a row of boxes it pulls objects onto the rows
    # above and below; boxes that do not overlap already keep their objects apart
    "default-split-iso0": ({"w_split": SHAPES_LOSS.w_split, "box_isolation_weight": 0.0}, {}),
    # the box term reads the maps less their median: the floor every token has everywhere hides how
    # little the object moves (a row of three: in-box shares 0.10 -> 0.15-0.30 over the 15 box updates)
    "default-split-peaked": ({"w_split": SHAPES_LOSS.w_split, "box_maps": "peaked"}, {}),
    "default-split-iso0-peaked": (
        {"w_split": SHAPES_LOSS.w_split, "box_isolation_weight": 0.0, "box_maps": "peaked"},
        {},
    ),
    # issue 10, ninth round, from the route as shipped: optimise the initial noise for the box terms
    # first (InitNO's idea: normalised steps, the latent kept at its norm), the box term on each map's
    # softmax over the cells (the floor drops out), and isolation off between disjoint boxes with them
    **{
        f"default-split-{name}": ({"w_split": SHAPES_LOSS.w_split, **loss}, schedule)
        for name, (loss, schedule) in {
            "init10": ({}, {"box_init_iterations": 10, "box_init_step": 0.05}),
            "init10-s15": ({}, {"box_init_iterations": 10, "box_init_step": 0.15}),
            "init20": ({}, {"box_init_iterations": 20, "box_init_step": 0.05}),
            "soft10": ({"box_maps": "softmax", "box_temperature": 0.1}, {}),
            "soft25": ({"box_maps": "softmax", "box_temperature": 0.25}, {}),
            "init10-iso0": (
                {"box_isolation_weight": 0.0},
                {"box_init_iterations": 10, "box_init_step": 0.05},
            ),
        }.items()
    },
    # issue 10, tenth round: with three boxes the first-named object's map takes the box steps (its
    # in-box share 0.10 -> 0.40 while the last one's falls 0.11 -> 0.08): the box energy of the worst
    # group alone (Attend-and-Excite's max), alone and with the ninth round's two three-box leads
    **{
        f"default-split-{name}": ({"w_split": SHAPES_LOSS.w_split, "box_reduce": "max", **loss}, schedule)
        for name, (loss, schedule) in {
            "max": ({}, {}),
            "max-init10": ({}, {"box_init_iterations": 10, "box_init_step": 0.05}),
            "max-soft25": ({"box_maps": "softmax", "box_temperature": 0.25}, {}),
            # the box-only updates as normalised steps (each image's latent moves by a share of its
            # RMS, InitNO's step): the raw step 20 moves a share by 0.005 per update at step 0
            "max-norm05": ({}, {"box_norm_step": 0.05}),
            "max-norm10": ({}, {"box_norm_step": 0.1}),
            "norm05": ({"box_reduce": "mean"}, {"box_norm_step": 0.05}),
            "max-init10-soft25": (
                {"box_maps": "softmax", "box_temperature": 0.25},
                {"box_init_iterations": 10, "box_init_step": 0.05},
            ),
            "init10-soft25": (
                {"box_reduce": "mean", "box_maps": "softmax", "box_temperature": 0.25},
                {"box_init_iterations": 10, "box_init_step": 0.05},
            ),
        }.items()
    },
}
#: Variant names with this prefix run on the shipped ControlNet (control image: the edges of the
#: prompt's objects at their boxes); "cn-plain" is the stock ControlNet pipeline.
CONTROLNET = "cn-"


def variant_config(name: str, route: str = "boxes") -> AIT2IConfig | None:
    """``name``'s configuration; the "default..." variants start from ``route``'s settings
    (``ROUTE_SETTINGS``: the library defaults and the route's box settings)."""
    if name == "plain":
        return None
    loss, schedule = VARIANTS[name]
    if name.startswith("default"):
        settings = ROUTE_SETTINGS[route]
        base_loss, base_schedule = settings.get("loss", {}), settings.get("schedule", {})
    else:
        base_loss, base_schedule = BASE
    return AIT2IConfig(
        loss=LossConfig(**{**RADII, **base_loss, **loss}),
        schedule=ScheduleConfig(**{**base_schedule, **schedule}),
    )


def run(pipe, name: str, prompt, seeds: list[int], steps: int, images_dir: Path | None = None) -> list[dict]:
    """``pipe``: the plain shapes pipeline, or for a ``cn-`` variant the ControlNet one; the images
    are saved under ``images_dir`` when given."""
    from ait2i_ext.shapes.evaluator import evaluate
    from ait2i_ext.shapes.model import scene_edges

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    call = dict(
        num_inference_steps=steps, guidance_scale=7.5, num_images_per_prompt=len(seeds), generator=generators
    )
    route = "controlnet" if name.startswith(CONTROLNET) else "boxes"
    if name.startswith(CONTROLNET):
        name, call["image"] = name.removeprefix(CONTROLNET), scene_edges(prompt.objects)
    start = time.perf_counter()
    if name == "plain":
        images = pipe(prompt.text, **call).images
    else:
        boxed = not name.startswith("ait2i")
        subjects = [
            Subject(o.shape, attributes=(o.colour,), box=o.box if boxed else None) for o in prompt.objects
        ]
        images = generate(pipe, prompt.text, subjects, config=variant_config(name, route), **call).images
    seconds = (time.perf_counter() - start) / len(seeds)
    rows = []
    for seed, image in zip(seeds, images, strict=True):
        s = evaluate(image, prompt.objects)
        in_box = [float((o.iou or 0.0) >= 0.5) for o in s.objects]
        rows.append(
            {
                "prompt": prompt.text,
                "seed": seed,
                "present": float(s.all_present),
                "correct": float(s.correct),
                "in_box": sum(in_box) / len(in_box),
                "seconds": seconds,
                # per asked object: its count and best IoU; every detection, to see why one misses its box
                "objects": [{"count": o.count, "iou": o.iou} for o in s.objects],
                "detections": [[d.colour, d.shape, list(d.box)] for d in s.detections],
            }
        )
        if images_dir is not None:
            image.save(images_dir / f"{prompt.text.replace(' ', '_')}-{seed}.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="two")
    parser.add_argument("--prompt-offset", type=int, default=3, help="first prompt of each set")
    parser.add_argument("--prompts-per-set", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--variants", default="plain,ait2i,boxes")
    parser.add_argument(
        "--controlnet", help="ControlNet folder for the cn- variants (default: the shipped one)"
    )
    parser.add_argument("--out", default="out/tune_boxes")
    parser.add_argument("--save-images", action="store_true", help="keep each variant's images under --out")
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        if name.removeprefix(CONTROLNET) not in VARIANTS:
            raise SystemExit(f"--variants: {name!r} is invalid: expected some of {list(VARIANTS)}")
    prompts = [
        p
        for s in args.sets.split(",")
        for p in prompt_set(s.strip())[args.prompt_offset : args.prompt_offset + args.prompts_per_set]
    ]
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    split = f"{args.sets}-p{args.prompt_offset}x{args.prompts_per_set}-s{args.seed_offset}x{args.seeds}-t{args.steps}"
    out = Path(args.out) / split
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pipes = {False: DiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None)}
    if any(n.startswith(CONTROLNET) for n in names):
        pipes[True] = load_controlnet_pipeline(
            default_model_path(), args.controlnet or default_controlnet_path(), torch.float32
        )
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    table = []
    for name in tqdm(names, desc="variants"):
        cache = out / f"{name}.json"
        if cache.exists():
            rows = json.loads(cache.read_text())
        else:
            pipe = pipes[name.startswith(CONTROLNET)]
            images_dir = out / name if args.save_images else None
            if images_dir is not None:
                images_dir.mkdir(exist_ok=True)
            rows = [r for p in prompts for r in run(pipe, name, p, seeds, args.steps, images_dir)]
            cache.write_text(json.dumps({"variant": VARIANTS[name.removeprefix(CONTROLNET)], "rows": rows}))
            rows = {"rows": rows}
        rows = rows["rows"]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("present", "correct", "in_box", "seconds")}
        table.append((name, mean, len(rows)))
    print(f"split {split}: {[p.text for p in prompts]}")
    print(f"{'variant':<16}{'all present':>12}{'correct':>10}{'in box':>10}{'s/image':>9}{'n':>5}")
    for name, m, n in table:
        print(
            f"{name:<16}{100 * m['present']:>11.1f}%{100 * m['correct']:>9.1f}%{100 * m['in_box']:>9.1f}%"
            f"{m['seconds']:>9.2f}{n:>5}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
