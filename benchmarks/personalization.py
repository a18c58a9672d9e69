"""Personalisation end to end on the shapes model: teach it a star, then draw the star beside a known shape.

    python benchmarks/personalization.py                         # shipped shapes model, CPU, a few minutes
    python benchmarks/personalization.py --seeds 32 --train-steps 400 --out out/personalization

1. Render ``--images`` instance images of a concept the shapes world never shows: an upright
   five-pointed yellow star (``render_star``), one per image, on the shapes world's background.
2. Fine-tune two LoRAs with ``training/train_lora.py`` on "a sks star": ``plain`` and ``reg`` (the
   attention regulariser, ``--attention_reg_weight``, pulling "sks" onto "star").
3. For each LoRA, on the same seeds, generate "a sks star and a {colour} {shape}" three ways:
   ``stock`` (the pipeline untouched), ``ait2i`` with "sks" in no group (subjects "star" and the
   other), ``ait2i+sks`` with "sks" in the star's group (:func:`personalized_subjects`).
   The base model without a LoRA (``stock``) is the reference row.
4. Score each image: ``concept`` = a star-shaped blob of the concept colour (:func:`is_star`),
   ``colour`` = any blob of the concept colour (the weaker sign that the concept was drawn at all),
   ``other`` = the other subject present in its colour and shape (``ait2i_ext.shapes.evaluator``),
   ``both`` = both at once.

Prints one table and writes ``--out``/table.json, the LoRAs, the instance images and a PNG grid.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from ait2i_ext.adapters.personalize import load_lora, personalized_subjects
from PIL import Image, ImageDraw

from ait2i_ext import AIT2IConfig, LossConfig, generate
from ait2i_ext.config import model_loss
from ait2i_ext.shapes.data import BACKGROUND, COLOURS, IMAGE_SIZE
from ait2i_ext.shapes.model import default_model_path

IDENTIFIER, CLASS_NOUN = "sks", "star"
CONCEPT_COLOUR = "yellow"
INSTANCE_PROMPT = f"a {IDENTIFIER} {CLASS_NOUN}"
OTHERS = ("red circle", "blue square", "green triangle", "purple circle")
METHODS = ("stock", "ait2i", "ait2i+sks")
MIN_AREA = 30  # the shapes evaluator's smallest object, in pixels at 64 px
MIN_STAR_IOU = 0.5


# --- the new concept ---------------------------------------------------------------------------


def star_polygon(x0: float, y0: float, x1: float, y1: float, inner: float = 0.5) -> list[tuple[float, float]]:
    """An upright five-pointed star filling the box ``(x0, y0, x1, y1)`` (pixels)."""
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else inner
        angle = math.pi / 2 + k * math.pi / 5
        points.append((radius * math.cos(angle), -radius * math.sin(angle)))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx, sy = (x1 - x0) / (max(xs) - min(xs)), (y1 - y0) / (max(ys) - min(ys))
    return [(x0 + (x - min(xs)) * sx, y0 + (y - min(ys)) * sy) for x, y in points]


def render_star(rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """One instance image: a yellow star of side 22-34 px at a random place."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    side = rng.randint(22, 34)
    x0, y0 = rng.randint(3, size - 3 - side), rng.randint(3, size - 3 - side)
    ImageDraw.Draw(image).polygon(
        star_polygon(x0, y0, x0 + side - 1, y0 + side - 1), fill=COLOURS[CONCEPT_COLOUR]
    )
    return image


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Star, circle, square and apex-up triangle masks filling a ``height x width`` box."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(star_polygon(0, 0, width - 1, height - 1), fill=1)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    cy, cx = height / 2, width / 2
    return {
        "star": np.asarray(canvas, dtype=bool),
        "circle": ((yy - cy) / cy) ** 2 + ((xx - cx) / cx) ** 2 <= 1.0,
        "square": np.ones((height, width), bool),
        "triangle": np.abs(xx - cx) <= (yy / height) * width / 2,
    }


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as ``(n, 2)`` arrays of ``(row, col)``."""
    seen = np.zeros_like(mask)
    comps = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, comp = deque([start]), []
        while queue:
            r, c = queue.popleft()
            comp.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        comps.append(np.array(comp))
    return comps


def star_scores(image: Image.Image, colour: str = CONCEPT_COLOUR, max_distance: float = 90.0) -> list[dict]:
    """Per blob of ``colour`` (nearest palette colour, as the shapes evaluator assigns pixels): its
    area and IoU with a star, circle, square and triangle fitted to its box."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    index = 1 + list(COLOURS).index(colour)
    mask = (dist.argmin(-1) == index) & (dist.min(-1) <= max_distance)
    blobs = []
    for comp in _components(mask):
        if len(comp) < MIN_AREA:
            continue
        (r0, c0), (r1, c1) = comp.min(0), comp.max(0) + 1
        blob = np.zeros((r1 - r0, c1 - c0), bool)
        blob[comp[:, 0] - r0, comp[:, 1] - c0] = True
        ious = {
            k: float((blob & t).sum() / (blob | t).sum()) for k, t in _templates(r1 - r0, c1 - c0).items()
        }
        blobs.append({"area": len(comp), **ious})
    return blobs


def is_star(blob: dict) -> bool:
    """A blob (of :func:`star_scores`) that overlaps a star best, at IoU >= ``MIN_STAR_IOU``."""
    return blob["star"] >= MIN_STAR_IOU and blob["star"] > max(
        blob["circle"], blob["square"], blob["triangle"]
    )


# --- the run ------------------------------------------------------------------------------------


def train(model: str, images: Path, out: Path, args, regularised: bool) -> Path:
    try:
        from ait2i_ext.training import train_lora
    except ImportError:
        from training import train_lora

    argv = [
        "--pretrained_model", model, "--instance_data_dir", str(images), "--instance_prompt", INSTANCE_PROMPT,
        "--output_dir", str(out), "--resolution", str(IMAGE_SIZE), "--max_train_steps", str(args.train_steps),
        "--train_batch_size", str(args.train_batch), "--learning_rate", str(args.lr), "--rank", str(args.rank),
        "--checkpointing_steps", str(10 * args.train_steps), "--random_flip", "--seed", "0",
    ]  # fmt: skip
    if args.train_text_encoder:
        argv.append("--train_text_encoder")
    if regularised:
        argv += [
            "--attention_reg_weight",
            str(args.reg_weight),
            "--identifier",
            IDENTIFIER,
            "--class_noun",
            CLASS_NOUN,
        ]
    return train_lora.main(argv).weights_path


def subjects_for(method: str, prompt: str, other: str):
    if method == "ait2i":
        return [CLASS_NOUN, other]
    return personalized_subjects(prompt, IDENTIFIER, [CLASS_NOUN, other])


def sample(pipe, method: str, other: str, seeds: list[int], args) -> list[Image.Image]:
    prompt = f"{INSTANCE_PROMPT} and a {other}"
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    call = dict(
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, num_images_per_prompt=len(seeds)
    )
    if method == "stock":
        return pipe(prompt, generator=generators, **call).images
    config = AIT2IConfig(loss=LossConfig(**args.radii), mode=args.mode)
    return generate(
        pipe, prompt, subjects_for(method, prompt, other), config=config, generator=generators, **call
    ).images


def format_table(rows: list[dict]) -> str:
    header = f"{'lora':<8}{'method':<12}{'concept':>10}{'colour':>10}{'other':>10}{'both':>10}{'s/image':>10}{'n':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['lora']:<8}{r['method']:<12}{100 * r['concept']:>9.1f}%{100 * r['colour']:>9.1f}%{100 * r['other']:>9.1f}%"
            f"{100 * r['both']:>9.1f}%{r['seconds']:>10.3f}{r['n']:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    from ait2i_ext.shapes.evaluator import evaluate
    from ait2i_ext.viz import side_by_side

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="shapes-world pipeline folder (default: the shipped shapes model)")
    parser.add_argument("--out", default="out/personalization")
    parser.add_argument("--images", type=int, default=10, help="instance images of the star")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument(
        "--reg-weight", type=float, default=1.0, help="--attention_reg_weight of the reg LoRA"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse LoRAs already trained in --out")
    parser.add_argument("--others", default=",".join(OTHERS), help="the second subjects, comma-separated")
    parser.add_argument("--seeds", type=int, default=16, help="seeds 0..N-1 for every prompt and method")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--mode", default="truncated", choices=["full", "truncated"])
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
    try:  # the model's ait2i.json radii; bad radii fail here, not after the LoRAs are trained
        args.radii = model_loss(
            args.model or default_model_path(),
            aggregation_radius=args.aggregation_radius,
            alignment_radius=args.alignment_radius,
        )
    except ValueError as e:
        raise SystemExit(f"--aggregation-radius / --alignment-radius: {e}") from None

    if args.model:
        model = args.model
    else:
        model = default_model_path()
    if not (Path(model) / "model_index.json").is_file():
        raise SystemExit(
            f"--model {model!r} has no model_index.json: train the shapes model first (training/train_shapes.py)"
        )
    others = [o.strip() for o in args.others.split(",") if o.strip()]
    for other in others:
        colour, shape = other.split()
        if colour == CONCEPT_COLOUR:
            raise SystemExit(f"--others: {other!r} has the concept's colour {CONCEPT_COLOUR!r}: pick another")
    out = Path(args.out)
    # The shipped model is saved in fp16; train and sample on an fp32 copy (CPU has no fp16 matmuls
    # worth using, and train_lora.py keeps a checkpoint's dtype when --mixed_precision is "no").
    base = out / "base-fp32"
    if not (base / "model_index.json").is_file():
        StableDiffusionPipeline.from_pretrained(
            model, torch_dtype=torch.float32, safety_checker=None
        ).save_pretrained(base)
    images_dir = out / "instance"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(args.images):
        render_star(rng).save(images_dir / f"star-{i:02d}.png")

    # 1. Two LoRAs, with and without the attention regulariser.
    loras, train_seconds = {}, {}
    for name, regularised in (("plain", False), ("reg", True)):
        folder = out / f"lora-{name}"
        if args.reuse and (folder / "pytorch_lora_weights.safetensors").is_file():
            loras[name] = folder / "pytorch_lora_weights.safetensors"
            continue
        start = time.perf_counter()
        loras[name] = train(str(base), images_dir, folder, args, regularised)
        train_seconds[name] = time.perf_counter() - start

    # 2. The same seeds for every LoRA, prompt and method.
    seeds = list(range(args.seeds))
    runs = [("none", "stock")] + [(lora, m) for lora in loras for m in METHODS]
    records, examples = [], {}
    bar = tqdm(total=len(runs) * len(others), desc="prompts")
    pipes = {}
    for lora, method in runs:
        if lora not in pipes:
            pipe = StableDiffusionPipeline.from_pretrained(
                model, torch_dtype=torch.float32, safety_checker=None
            )
            if lora != "none":
                load_lora(pipe, loras[lora])
            pipe.set_progress_bar_config(disable=True)
            pipes = {lora: pipe}
        for other in others:
            start = time.perf_counter()
            images = sample(pipes[lora], method, other, seeds, args)
            seconds = (time.perf_counter() - start) / len(seeds)
            colour, shape = other.split()
            for seed, image in zip(seeds, images, strict=True):
                blobs = star_scores(image)
                concept = any(is_star(b) for b in blobs)
                present = evaluate(image, [(colour, shape)]).objects[0].present
                records.append({"lora": lora, "method": method, "other": other, "seed": seed, "seconds": seconds,
                                "concept": float(concept), "colour": float(bool(blobs)), "other_present": float(present),
                                "both": float(concept and present)})  # fmt: skip
                if seed == 0:
                    examples[(other, f"{lora}/{method}")] = image
            bar.update(1)
    bar.close()

    rows = []
    for lora, method in runs:
        rs = [r for r in records if r["lora"] == lora and r["method"] == method]
        rows.append({
            "lora": lora, "method": method, "n": len(rs), "seconds": sum(r["seconds"] for r in rs) / len(rs),
            "concept": sum(r["concept"] for r in rs) / len(rs),
            "colour": sum(r["colour"] for r in rs) / len(rs),
            "other": sum(r["other_present"] for r in rs) / len(rs),
            "both": sum(r["both"] for r in rs) / len(rs),
        })  # fmt: skip
    print(
        f"model: {model}; concept '{INSTANCE_PROMPT}' from {args.images} images, {args.train_steps} LoRA steps "
        f"(train s: {', '.join(f'{k} {v:.0f}' for k, v in train_seconds.items()) or 'reused'}); "
        f"{len(others)} prompts x {args.seeds} seeds; {args.steps} steps; guidance scale {args.guidance_scale}"
    )
    print(format_table(rows))
    labels = [f"{lora}/{method}" for lora, method in runs]
    strips = [
        side_by_side({k: examples[(o, k)] for k in labels}, title=f"{INSTANCE_PROMPT} and a {o}")
        for o in others
    ]
    grid = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (255, 255, 255))
    for i, strip in enumerate(strips):
        grid.paste(strip, (0, sum(s.height for s in strips[:i])))
    grid.save(out / "examples.png")
    (out / "table.json").write_text(
        json.dumps(
            {"args": vars(args), "train_seconds": train_seconds, "rows": rows, "records": records}, indent=2
        )
    )
    print(f"wrote {out / 'table.json'} and {out / 'examples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
