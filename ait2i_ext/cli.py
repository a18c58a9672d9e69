"""The ``ait2i`` command.

    ait2i generate --prompt "a red circle and a blue square" --out out/
    ait2i generate --prompt "a cat and a dog" --model runwayml/stable-diffusion-v1-5 --compare --out out/
    ait2i describe --prompt "a hippopotamus and a hot dog"

``generate`` writes one PNG per image, on request a grid of the per-group attention maps next to
it (``--attention-maps``), a side-by-side plain vs guided picture for the same seed
(``--compare``), and ``run.json`` with what was run (prompt, groups, seeds, config, loss per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

logger = logging.getLogger("ait2i")


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def _device_and_dtype(device: str | None, dtype: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype is None:
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if dtype not in names:
        raise ValueError(f"--dtype {dtype!r} is invalid: expected one of {sorted(names)}")
    return device, names[dtype]


def default_model() -> str | None:
    """The shipped shapes-world model folder, when it is installed."""
    try:
        from .shapes.model import default_model_path

        path = Path(default_model_path())
    except ImportError:
        return None
    return str(path) if (path / "model_index.json").exists() else None


def load_pipeline(args: argparse.Namespace):
    """The pipeline named by ``--model`` (a local folder or hub id; ``tiny`` for random tiny
    components), with ``--gligen``/``--controlnet``/``--lora`` applied."""
    import torch

    device, dtype = _device_and_dtype(args.device, args.dtype)
    model = args.model or default_model()
    if model is None and not args.gligen:
        raise ValueError(
            "no --model given and no shipped default model is installed: pass --model PATH_OR_ID"
        )
    if args.gligen:
        from .adapters.layout import load_gligen_pipeline

        pipe = load_gligen_pipeline(args.gligen, dtype)
    elif args.controlnet:
        from .adapters.controlnet import load_controlnet_pipeline
        from .shapes.model import default_controlnet_path

        # "shapes": the shipped Canny ControlNet of the shipped shapes model
        nets = [default_controlnet_path() if c == "shapes" else c for c in args.controlnet]
        pipe = load_controlnet_pipeline(model, nets, dtype)
    elif model == "tiny":
        from .testing import tiny_sd_pipeline

        pipe = tiny_sd_pipeline()
    else:
        from diffusers import DiffusionPipeline

        path = Path(model)
        if path.exists() and not (path / "model_index.json").exists():
            raise ValueError(
                f"--model {model!r} is a folder without model_index.json: expected a diffusers pipeline folder"
            )
        kwargs = (
            {"safety_checker": None, "requires_safety_checker": False} if "xl" not in model.lower() else {}
        )
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **kwargs)
    if args.lora:
        from .adapters.personalize import load_lora

        load_lora(pipe, args.lora)
    if device == "cpu":
        # The shipped and tiny models are small: on a CPU one thread is fastest and never
        # oversubscribes a busy machine; large checkpoints get torch's default or --threads.
        small = args.model in (None, "tiny") and not (args.gligen or args.controlnet)
        threads = args.threads or (1 if small else None)
        if threads:
            torch.set_num_threads(threads)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=False, leave=False, desc="denoising")
    return pipe


def _subjects(args: argparse.Namespace, prompt: str):
    """Subjects from ``--subjects``, ``--box`` and ``--identifier`` (``None`` = infer)."""
    from .tokens import infer_subjects, with_identifier

    subjects: list = list(args.subjects) if args.subjects else None
    if args.box:
        from .adapters.layout import parse_box_arg, subjects_with_boxes

        boxes = [parse_box_arg(b) for b in args.box]
        subjects = subjects_with_boxes(
            subjects if subjects is not None else infer_subjects(prompt), boxes, prompt
        )
    if args.identifier:
        subjects = with_identifier(
            subjects if subjects is not None else infer_subjects(prompt), args.identifier, prompt
        )
    return subjects


def _config(args: argparse.Namespace):
    from .config import AIT2IConfig, LossConfig, ScheduleConfig
    from .shapes.model import loss_radii

    shipped = args.model is None and default_model() is not None
    try:
        radii = loss_radii(shipped, args.aggregation_radius, args.alignment_radius)
    except ValueError as e:
        raise ValueError(f"--aggregation-radius / --alignment-radius: {e}") from None
    loss = LossConfig(isolation=args.isolation, **radii)
    schedule = ScheduleConfig(step_scale=args.step_scale, refinement=args.refinement)
    return AIT2IConfig(loss=loss, schedule=schedule, mode=args.mode)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from . import viz
    from .pipeline import generate

    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} is invalid: expected an integer >= 1")
    config = _config(args)
    subjects = _subjects(args, args.prompt)  # bad words and boxes fail before anything loads
    if args.gligen and args.controlnet:
        raise ValueError("--gligen and --controlnet are exclusive: choose one layout route")
    if bool(args.control) != bool(args.controlnet):
        raise ValueError(
            "--controlnet and --control go together: a ControlNet needs a control image and vice versa"
        )
    pipe = load_pipeline(args)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    if args.height:
        call["height"] = args.height
    if args.width:
        call["width"] = args.width
    if args.negative_prompt:
        call["negative_prompt"] = args.negative_prompt
    if args.control:
        from .adapters.controlnet import control_image

        size = args.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
        call["image"] = control_image(args.control, size, controlnet=getattr(pipe, "controlnet", None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.num_images))
    runs = [("guided", True)] if not args.no_guidance else [("plain", False)]
    if args.compare and not args.no_guidance:
        runs = [("plain", False), ("guided", True)]
    record = {
        "prompt": args.prompt,
        "model": args.model or default_model(),
        "config": dataclasses.asdict(config),
        "call": {k: v for k, v in call.items() if k != "image"},
        "layout": {
            "boxes": args.box,
            "gligen": args.gligen,
            "controlnet": args.controlnet,
            "control": args.control,
        },
        "lora": args.lora,
        "identifier": args.identifier,
        "images": [],
    }
    stem = _slug(args.prompt)
    with tqdm(total=len(seeds) * len(runs), desc="images", disable=args.quiet) as bar:
        for seed in seeds:
            pictures = {}
            for label, guided in runs:
                generator = torch.Generator(device="cpu").manual_seed(seed)
                t0 = time.perf_counter()
                result = generate(
                    pipe,
                    args.prompt,
                    subjects,
                    config=config,
                    guidance=guided,
                    return_maps=args.attention_maps,
                    generator=generator,
                    **call,
                )
                seconds = time.perf_counter() - t0
                image = result.images[0]
                name = f"{stem}_{seed}_{label}.png"
                image.save(out / name)
                pictures[label] = image
                entry = {
                    "file": name,
                    "seed": seed,
                    "guidance": guided,
                    "seconds": round(seconds, 3),
                    "groups": [dataclasses.asdict(g) for g in result.groups[0]],
                    "loss_per_step": [dataclasses.asdict(s) for s in result.steps],
                }
                if args.attention_maps:
                    boxes = {g.name: g.box for g in result.groups[0] if g.box}
                    grid = viz.attention_grid(image, result.group_maps(0), boxes or None)
                    entry["attention_maps"] = f"{stem}_{seed}_{label}_maps.png"
                    grid.save(out / entry["attention_maps"])
                if any(g.box for g in result.groups[0]):
                    boxes = {g.name: g.box for g in result.groups[0] if g.box}
                    entry["boxes"] = f"{stem}_{seed}_{label}_boxes.png"
                    viz.box_overlay(image, boxes).save(out / entry["boxes"])
                record["images"].append(entry)
                bar.update(1)
            if len(pictures) == 2:
                side = viz.side_by_side(pictures, title=args.prompt)
                side.save(out / f"{stem}_{seed}_compare.png")
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    if not args.quiet:
        print(f"wrote {len(record['images'])} image(s) and run.json to {out}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from .testing import load_clip_tokenizer
    from .tokens import describe, resolve_groups

    if args.model:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    else:
        tokenizer = load_clip_tokenizer()
    subjects = _subjects(args, args.prompt)
    print(describe(tokenizer, args.prompt, resolve_groups(tokenizer, args.prompt, subjects)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ait2i", description="AI-T2I attention guidance for diffusers pipelines."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def subject_args(p):
        p.add_argument("--prompt", required=True, help="the text prompt")
        p.add_argument(
            "--subjects",
            nargs="+",
            metavar="WORDS",
            help='subjects by words, last word the noun: --subjects "red circle" "blue square" '
            "(default: inferred from the prompt)",
        )
        p.add_argument(
            "--box",
            action="append",
            metavar="WORD:X0,Y0,X1,Y1",
            help='a layout box for a subject, normalised: --box "cat:0.05,0.2,0.5,0.9" (repeatable)',
        )
        p.add_argument(
            "--identifier", help="personalisation token (e.g. sks) joining the group of the noun it precedes"
        )

    g = sub.add_parser("generate", help="generate images with (or without) AI-T2I guidance")
    subject_args(g)
    g.add_argument(
        "--model",
        help="diffusers pipeline folder or hub id (default: the shipped shapes model); 'tiny' for random tiny components",
    )
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1, help="images (consecutive seeds)")
    g.add_argument("--steps", type=int, default=50, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--negative-prompt")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--no-guidance", action="store_true", help="plain sampling (the stock pipeline)")
    g.add_argument(
        "--compare",
        action="store_true",
        help="also sample plain with the same seed and save both side by side",
    )
    g.add_argument(
        "--attention-maps",
        action="store_true",
        help="save a grid of per-subject attention maps next to each image",
    )
    g.add_argument("--step-scale", type=float, default=20.0, help="alpha_i = step_scale * sqrt(s_i)")
    g.add_argument("--isolation", choices=["euclidean", "cosine"], default="euclidean")
    g.add_argument(
        "--aggregation-radius",
        type=float,
        help="peak radius in cells of a 16x16 map, about a subject's radius (default: 5, METHOD's value for SD; "
        "2.5 for the shipped shapes model, whose objects are small)",
    )
    g.add_argument(
        "--alignment-radius",
        type=float,
        help="radius of the attribute / member alignment term (default: 6; 3 for the shipped shapes model)",
    )
    g.add_argument(
        "--mode",
        choices=["full", "truncated", "lagged"],
        default="truncated",
        help="truncated (default) stops the guided UNet pass after the last layer it reads: same result as "
        "full, faster; lagged reuses the sampling pass (approximate, fastest)",
    )
    g.add_argument(
        "--refinement", action="store_true", help="Attend-and-Excite iterative refinement at steps 0, 10, 20"
    )
    g.add_argument(
        "--gligen", metavar="MODEL", help="a StableDiffusionGLIGENPipeline folder or hub id (boxes via --box)"
    )
    g.add_argument(
        "--controlnet",
        metavar="MODEL",
        action="append",
        help="a ControlNet folder or hub id (repeatable); 'shapes' for the shipped shapes model's Canny ControlNet",
    )
    g.add_argument(
        "--control",
        metavar="KIND:PATH",
        help="control image: canny:photo.png, lineart:photo.png or image:edges.png",
    )
    g.add_argument("--lora", metavar="PATH", help="a LoRA (.safetensors file or folder) to load")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument(
        "--threads", type=int, help="CPU threads (default: 1 for the shipped/tiny models, else torch's)"
    )
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32 on cpu")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("describe", help="show the token groups a prompt resolves to")
    subject_args(d)
    d.add_argument("--model", help="pipeline folder whose tokenizer to use (default: the CLIP tokenizer)")
    d.set_defaults(func=cmd_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. its note that torchvision is absent
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:
        print(f"ait2i: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
