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
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from .config import PRESETS

logger = logging.getLogger("ait2i")


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def _device_and_dtype(device: str | None, dtype: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is invalid: expected cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device!r} is unavailable: this torch ({torch.__version__}) sees no CUDA device; "
            "use --device cpu or install a CUDA build of torch"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"--device {device!r} is unavailable: this torch has no MPS backend; use --device cpu"
        )
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


def layout_route(args: argparse.Namespace) -> str | None:
    """Which layout route ``--box`` takes: ``"gligen"``, ``"boxes"``, ``"controlnet"`` or ``None`` (no boxes).

    With boxes on the shipped model the shipped GLIGEN model grounds them unless ``--layout boxes``;
    ``--gligen PATH`` is GLIGEN on any model. Fills ``args.gligen`` with the shipped GLIGEN when it
    is chosen. Raises ``ValueError`` for a ``--layout`` that cannot be honoured.
    """
    from .shapes.gligen import default_gligen_path, gligen_installed

    if args.layout == "boxes" and args.gligen:
        raise ValueError("--layout boxes and --gligen contradict: --gligen grounds the boxes with GLIGEN")
    if args.layout == "gligen" and not args.box and not args.gligen:
        raise ValueError("--layout gligen needs boxes: add --box WORD:x0,y0,x1,y1 for each subject")
    if args.controlnet:
        if args.layout is not None:
            raise ValueError(f"--layout {args.layout} does not apply with --controlnet")
        return "controlnet"
    if args.gligen:
        return "gligen"
    if getattr(args, "regional_lora", False) and args.layout is None:
        # --box confines each LoRA to its box (_layout_subjects) on the personalisation route's own schedule
        # (the one its figures were measured with), not the boxes route's settings
        return None
    wants_gligen = args.layout == "gligen" or (args.layout is None and args.box)
    if not wants_gligen:
        return "boxes" if args.box else None
    shipped = args.model is None and default_model() is not None
    if shipped and gligen_installed():
        args.gligen = default_gligen_path()
        return "gligen"
    if args.layout == "gligen":
        raise ValueError(
            f"--layout gligen: no GLIGEN model for --model {args.model!r}: pass --gligen PATH_OR_ID "
            "(the shipped GLIGEN belongs to the shipped shapes model)"
        )
    return "boxes"


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
        from .adapters.personalize import load_loras

        load_loras(pipe, args.lora, scales=_lora_scales(args))
    if device == "cpu":
        # The shipped and tiny models are small: on a CPU one thread is fastest and never
        # oversubscribes a busy machine; large checkpoints get torch's default or --threads.
        small = args.model in (None, "tiny") and not (args.gligen or args.controlnet)
        small = small or args.gligen == _shipped_gligen()
        threads = args.threads or (1 if small else None)
        if threads:
            torch.set_num_threads(threads)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True if args.quiet else None, leave=False, desc="denoising")
    return pipe


def _shipped_gligen() -> str:
    from .shapes.gligen import default_gligen_path

    return default_gligen_path()


def _subjects(args: argparse.Namespace, prompt: str):
    """Subjects from ``--subjects``, ``--box`` and ``--identifier`` (``None`` = infer)."""
    from .tokens import infer_subjects

    subjects: list = list(args.subjects) if args.subjects else None
    if args.box:
        from .adapters.layout import parse_box_arg, subjects_with_boxes

        boxes = [parse_box_arg(b) for b in args.box]
        subjects = subjects_with_boxes(
            subjects if subjects is not None else infer_subjects(prompt), boxes, prompt
        )
    if args.identifier:
        from .adapters.personalize import personalized_subjects

        subjects = personalized_subjects(prompt, args.identifier, subjects)
    return subjects


def _config(args: argparse.Namespace, route: str | None = None):
    """The run's configuration: the layout ``route``'s box settings (``layout_route``), the model's
    own settings (its folder's ``ait2i.json``), then what the command line says."""
    from .adapters.layout import route_config
    from .config import model_loss

    model = args.gligen or args.model or default_model()
    try:
        radii = model_loss(
            model, aggregation_radius=args.aggregation_radius, alignment_radius=args.alignment_radius
        )
    except ValueError as e:
        raise ValueError(f"--aggregation-radius / --alignment-radius: {e}") from None
    return route_config(
        route,
        model,
        loss={**radii, **({"isolation": args.isolation} if args.isolation else {})},
        # only what the command line says: the rest of the schedule is the model's (its ait2i.json)
        schedule={
            **({"step_scale": args.step_scale} if args.step_scale is not None else {}),
            **({"refinement": True} if args.refinement else {}),
        },
        mode=args.mode,
        preset=args.preset,
    )


#: Sane ranges of the numeric options: (option, attribute, lowest, highest or None).
_RANGES = (
    ("--steps", "steps", 1, 1000),
    ("--num-images", "num_images", 1, 10000),
    ("--seed", "seed", 0, 2**63 - 1),
    ("--guidance-scale", "guidance_scale", 0.0, 50.0),
    ("--step-scale", "step_scale", 0.0, None),
    ("--threads", "threads", 1, None),
    ("--height", "height", 8, 8192),
    ("--width", "width", 8, 8192),
)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _layout_subjects(args, subjects):
    """With ``--regional-lora``: the subjects with the boxes the concepts' LoRAs are confined to (``--box``,
    or the automatic layout of ``with_layout`` for two or more concepts), so the box term guides each
    group into its box; else the subjects as they are."""
    if not getattr(args, "regional_lora", False):
        return subjects
    from .adapters.personalize import parse_regional, with_layout

    return with_layout(subjects, parse_regional(args.regional or ""))


def _regional(args, pipe, subjects=None):
    """``--regional-lora``: each LoRA confined to its concept's region (``regional_loras``), else nothing."""
    if not getattr(args, "regional_lora", False):
        return contextlib.nullcontext()
    from .adapters.personalize import parse_regional, regional_loras

    names = pipe.get_list_adapters()["unet"]  # in --lora order (load_loras' default_0, default_1, ...)
    adapters = dict(zip(_as_list(args.identifier), names))
    scales = _lora_scales(args) or [1.0] * len(names)
    weights = {i: s["unet"] if isinstance(s, dict) else s for i, s in zip(adapters, scales)}
    config = parse_regional(args.regional or "")
    return regional_loras(
        pipe, args.prompt, adapters, num_images=1, config=config, weights=weights, subjects=subjects
    )


def _lora_scales(args) -> list | None:
    """``--lora-scale``: one weight for every ``--lora``, or one per ``--lora`` in order (None: 1.0 each)."""
    from .adapters.personalize import parse_lora_scale

    texts = _as_list(args.lora_scale)
    if not texts:
        return None
    loras = _as_list(args.lora)
    if len(texts) not in (1, len(loras)) or not loras:
        raise ValueError(
            f"--lora-scale given {len(texts)} time(s) for {len(loras)} --lora: expected once (every LoRA) "
            "or once per --lora"
        )
    scales = [parse_lora_scale(text) for text in texts]
    return scales * len(loras) if len(scales) == 1 else scales


def _missing_local_path(value: str) -> bool:
    """``value`` is written as a local path (not a hub id ``org/name``) and does not exist."""
    if Path(value).expanduser().exists():
        return False
    return (
        value.startswith((".", "/", "~"))
        or value.count("/") > 1
        or "\\" in value
        or value.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth"))
    )


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model: ranges, combinations, paths, the device. Raises ``ValueError``."""
    if not args.prompt.strip():
        raise ValueError("--prompt '' is empty: expected a text prompt")
    for option, name, low, high in _RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            expected = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{option} {value} is invalid: expected {expected}")
    if args.seed + args.num_images > 2**63:
        raise ValueError(f"--seed {args.seed} with --num-images {args.num_images} runs past 2**63 - 1")
    if args.gligen and args.controlnet:
        raise ValueError("--gligen and --controlnet are exclusive: choose one layout route")
    if bool(args.control) != bool(args.controlnet):
        raise ValueError(
            "--controlnet and --control go together: a ControlNet needs a control image and vice versa"
        )
    if args.no_guidance and args.compare:
        raise ValueError("--compare and --no-guidance are exclusive: --compare already samples plain")
    for option, values in (
        ("--model", [] if args.model == "tiny" else _as_list(args.model)),
        ("--gligen", _as_list(args.gligen)),
        ("--controlnet", _as_list(args.controlnet)),
        ("--lora", _as_list(args.lora)),
    ):
        for value in values:
            if _missing_local_path(value):
                raise ValueError(f"{option} {value!r} does not exist: expected a local path or a hub id")
    for spec in _as_list(args.control):
        path = spec.partition(":")[2]
        if path and not Path(path).expanduser().exists():
            raise ValueError(f"--control {spec!r}: the image {path!r} does not exist")
    _lora_scales(args)
    if args.regional_lora and (not args.lora or len(_as_list(args.identifier)) != len(_as_list(args.lora))):
        raise ValueError(
            f"--regional-lora needs at least one --lora and one --identifier per --lora (got "
            f"{len(_as_list(args.lora))} --lora, "
            f"{len(_as_list(args.identifier))} --identifier): the i-th identifier names the i-th LoRA's concept"
        )
    if args.regional is not None:
        if not args.regional_lora:
            raise ValueError(
                f"--regional {args.regional!r} needs --regional-lora (it sets the regional mode's fields)"
            )
        from .adapters.personalize import parse_regional

        try:
            parse_regional(args.regional)
        except ValueError as e:
            raise ValueError(f"--regional: {e}") from None
    _device_and_dtype(args.device, args.dtype)
    if args.evaluate:
        _shapes_objects(args.prompt)
    _check_boxes(args.box)


def _check_boxes(specs) -> None:
    """Boxes parse, and no two subjects share one box (isolation could not tell them apart)."""
    from .adapters.layout import parse_box_arg

    seen: dict[tuple, str] = {}
    for spec in _as_list(specs):
        word, box = parse_box_arg(spec)
        if tuple(box) in seen:
            raise ValueError(
                f"--box {spec!r} repeats the box of {seen[tuple(box)]!r}: two subjects need different boxes"
            )
        seen[tuple(box)] = word


def _image_multiple(pipe) -> int:
    """Image sides must be a multiple of this: the VAE factor times the UNet's total downsampling."""
    levels = len(pipe.unet.config.block_out_channels)
    return int(pipe.vae_scale_factor) * 2 ** (levels - 1)


def check_against_model(args: argparse.Namespace, pipe, subjects) -> dict:
    """Checks that need the loaded pipeline (image size, words in its tokenizer's window); returns the
    image size ``{"height": H, "width": W}`` the run will use."""
    from .tokens import resolve_groups

    multiple = _image_multiple(pipe)
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = {}
    for option, name in (("--height", "height"), ("--width", "width")):
        value = getattr(args, name) or default
        if value % multiple:
            raise ValueError(
                f"{option} {value} is invalid for this model: expected a multiple of {multiple} "
                f"(VAE factor {pipe.vae_scale_factor} x UNet downsampling {multiple // pipe.vae_scale_factor}), "
                f"e.g. {max(multiple, value // multiple * multiple)}"
            )
        size[name] = value
    resolve_groups(pipe.tokenizer, args.prompt, subjects)  # a word not in the prompt or past its window
    return size


def _shapes_objects(prompt: str):
    """The shapes-world objects of ``prompt`` for the evaluator (``ValueError`` when it names none)."""
    from .shapes.prompts import parse_prompt

    try:
        return parse_prompt(prompt)
    except ValueError as err:
        raise ValueError(f"--evaluate: {err}") from None


def _evaluation(image, objects) -> dict:
    """The shapes-world evaluator's verdict on one image (``correct``: every object right, nothing else)."""
    from .shapes.evaluator import evaluate

    score = evaluate(image, objects)
    return {
        "correct": score.correct,
        "all_present": score.all_present,
        "all_bound": score.all_bound,
        "neglect": score.neglect,
        "colour_mixing": score.colour_mixing,
        "extra": score.extra,
    }


def _write_json(path: Path, record: dict) -> None:
    """Write ``record`` atomically: a killed run leaves the previous complete file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from . import viz
    from .pipeline import generate

    check_arguments(args)  # everything that needs no model, before anything loads
    shipped = args.model is None and not (args.gligen or args.controlnet)
    route = layout_route(args)  # may pick the shipped GLIGEN for --box on the shipped model
    config = _config(args, route)  # the route's box settings, the model's ait2i.json, the flags
    subjects = _subjects(args, args.prompt)  # bad words and boxes fail before anything loads
    subjects = _layout_subjects(args, subjects)
    objects = None
    if args.evaluate or (shipped and default_model() is not None):
        try:
            objects = _shapes_objects(args.prompt)
        except ValueError:
            objects = None  # a prompt outside the shapes world on the shipped model: no marks
    pipe = load_pipeline(args)
    size = check_against_model(args, pipe, subjects)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, **size)
    if args.negative_prompt:
        call["negative_prompt"] = args.negative_prompt
    if args.control:
        from .adapters.controlnet import control_image

        call["image"] = control_image(
            args.control, size["height"], controlnet=getattr(pipe, "controlnet", None)
        )
    seeds = list(range(args.seed, args.seed + args.num_images))
    runs = [("guided", True)] if not args.no_guidance else [("plain", False)]
    if args.compare:
        runs = [("plain", False), ("guided", True)]
    record = {
        "status": "running",
        "prompt": args.prompt,
        "model": args.model or default_model(),
        "config": dataclasses.asdict(config),
        "call": {k: v for k, v in call.items() if k != "image"},
        "seeds": seeds,
        "layout": {
            "route": route,
            "boxes": args.box,
            "gligen": args.gligen,
            "controlnet": args.controlnet,
            "control": args.control,
        },
        "lora": args.lora,
        "lora_scale": args.lora_scale,
        "regional_lora": args.regional_lora,
        "regional": args.regional,
        "identifier": args.identifier,
        "evaluator": "ait2i_ext.shapes.evaluator" if objects else None,
        "images": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # nothing is created before every check has passed
    _write_json(out / "run.json", record)
    stem = _slug(args.prompt)
    sheet: dict[str, list] = {label: [] for label, _ in runs}
    with tqdm(total=len(seeds) * len(runs), desc="images", disable=True if args.quiet else None) as bar:
        for seed in seeds:
            pictures = {}
            for label, guided in runs:
                generator = torch.Generator(device="cpu").manual_seed(seed)
                t0 = time.perf_counter()
                with _regional(args, pipe, subjects):
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
                if objects:
                    entry["evaluation"] = _evaluation(image, objects)
                sheet[label].append((seed, image, entry.get("evaluation", {}).get("correct")))
                boxes = {g.name: g.box for g in result.groups[0] if g.box}
                if args.attention_maps:
                    grid = viz.attention_grid(image, result.group_maps(0), boxes or None)
                    entry["attention_maps"] = f"{stem}_{seed}_{label}_maps.png"
                    grid.save(out / entry["attention_maps"])
                if boxes:
                    entry["boxes"] = f"{stem}_{seed}_{label}_boxes.png"
                    viz.box_overlay(image, boxes).save(out / entry["boxes"])
                record["images"].append(entry)
                _write_json(out / "run.json", record)  # a killed run keeps what it made
                bar.update(1)
            if len(pictures) == 2:
                side = viz.side_by_side(pictures, title=args.prompt)
                side.save(out / f"{stem}_{seed}_compare.png")
    summary = []
    if len(seeds) > 1 or objects:
        record["sheet"] = f"{stem}_seeds.png"
        viz.seed_sheet(sheet, title=args.prompt).save(out / record["sheet"])
    if objects:
        record["correct"] = {label: sum(bool(mark) for _, _, mark in rows) for label, rows in sheet.items()}
        summary = [f"{label} {n}/{len(seeds)} right" for label, n in record["correct"].items()]
    record["status"] = "done"
    _write_json(out / "run.json", record)
    if not args.quiet:
        extra = f" (evaluator: {', '.join(summary)})" if summary else ""
        print(f"wrote {len(record['images'])} image(s) and run.json to {out}{extra}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from .testing import load_clip_tokenizer
    from .tokens import describe, resolve_groups

    if not args.prompt.strip():
        raise ValueError("--prompt '' is empty: expected a text prompt")
    if args.model and _missing_local_path(args.model):
        raise ValueError(f"--model {args.model!r} does not exist: expected a local path or a hub id")
    if args.model:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    else:
        tokenizer = load_clip_tokenizer()
    subjects = _subjects(args, args.prompt)
    print(describe(tokenizer, args.prompt, resolve_groups(tokenizer, args.prompt, subjects)))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    try:
        from .ui import serve
    except ImportError as err:
        raise ImportError(f"ait2i ui needs the ui extra ({err}): pip install 'ait2i[ui]'") from None
    return serve(args)


def _true_or_false(text: str) -> bool:
    if text.strip().lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected true or false")
    return text.strip().lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ait2i",
        description="AI-T2I attention guidance for diffusers pipelines (the method: docs/method.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
            "--identifier",
            action="append",
            help="personalisation token (e.g. sks) joining the group of the noun it precedes (repeatable; default: none)",
        )

    g = sub.add_parser("generate", help="generate images with (or without) AI-T2I guidance")
    subject_args(g)
    g.add_argument(
        "--model",
        help="diffusers pipeline folder or hub id (default: the shipped shapes model); 'tiny' for random tiny components",
    )
    g.add_argument("--out", required=True, help="output folder, created after every check has passed")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    g.add_argument(
        "--num-images",
        type=int,
        default=1,
        help="images, one per consecutive seed from --seed (default: %(default)s); with several, "
        "also a sheet of all seeds, *_seeds.png",
    )
    g.add_argument("--steps", type=int, default=50, help="denoising steps, 1-1000 (default: %(default)s)")
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=7.5,
        help="classifier-free guidance scale, 0-50; <= 1 turns it off (default: %(default)s)",
    )
    g.add_argument("--negative-prompt", help="what the image should not show (default: none)")
    g.add_argument(
        "--height",
        type=int,
        help="image height in pixels, a multiple of what the model needs (the VAE factor x the UNet's "
        "downsampling: 16 on the shipped model, 64 on Stable Diffusion) (default: the model's size)",
    )
    g.add_argument("--width", type=int, help="image width in pixels, as --height (default: the model's size)")
    g.add_argument("--no-guidance", action="store_true", help="plain sampling only (the stock pipeline)")
    g.add_argument(
        "--compare",
        action="store_true",
        help="sample plain and guided with the same seeds; save them side by side (*_compare.png)",
    )
    g.add_argument(
        "--evaluate",
        action="store_true",
        help="mark each image right or wrong with the shapes-world evaluator (the prompt must name "
        "shapes-world objects); on by default for the shipped model when the prompt does",
    )
    g.add_argument(
        "--attention-maps",
        action="store_true",
        help="save each subject's attention map beside the image, with a colour bar (*_maps.png)",
    )
    g.add_argument(
        "--step-scale",
        type=float,
        help="step size alpha_i = step_scale * sqrt(s_i), >= 0 (default: the model's ait2i.json, else 20)",
    )
    g.add_argument(
        "--isolation",
        choices=["euclidean", "cosine"],
        help="isolation loss between subjects (default: the model's ait2i.json, else euclidean)",
    )
    g.add_argument(
        "--aggregation-radius",
        type=float,
        help="a fixed peak radius in cells of a 16x16 map, about a subject's radius (default: none, the radii "
        "come from each subject's map; 2.5 on the shipped shapes model, whose objects are small; 5 suits Stable Diffusion)",
    )
    g.add_argument(
        "--alignment-radius",
        type=float,
        help="a fixed radius of the attribute / member alignment term (default: from the maps; 3 on the shipped shapes model)",
    )
    g.add_argument(
        "--mode",
        choices=["full", "truncated", "lagged"],
        default="truncated",
        help="truncated (default) stops the guided UNet pass after the last layer it reads: same result as "
        "full, faster; lagged reuses the sampling pass (approximate, fastest)",
    )
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="default: the model's schedule (its ait2i.json, else the authors'); reference: the authors' "
        "schedule whatever the model's ait2i.json says; fast: 8%% of the steps guided at step scale 60 "
        "(about 1.1x plain time). Unset: default, or reference with --box / --controlnet (the schedule "
        "layout was measured with). --step-scale wins over it",
    )
    g.add_argument(
        "--refinement",
        action="store_true",
        help="Attend-and-Excite iterative refinement at steps 0, 10, 20 (default: off)",
    )
    g.add_argument(
        "--gligen",
        metavar="MODEL",
        help="a StableDiffusionGLIGENPipeline folder or hub id, boxes via --box (default: none)",
    )
    g.add_argument(
        "--layout",
        choices=["gligen", "boxes"],
        help="how --box places the subjects: gligen (default on the shipped model: the shipped GLIGEN model "
        "grounds the boxes, plus the box term) or boxes (the box term alone, on the plain model)",
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
        help="control image for --controlnet: canny:photo.png, lineart:photo.png or image:edges.png",
    )
    g.add_argument(
        "--lora",
        metavar="PATH",
        action="append",
        help="a LoRA (.safetensors file or folder) to load (repeatable: all are active together; default: none)",
    )
    g.add_argument(
        "--lora-scale",
        metavar="WEIGHT",
        action="append",
        help="the LoRAs' weight: '0.7', or per part 'unet=0.5,text_encoder=1'; once for every --lora or "
        "once per --lora (default: 1, as trained)",
    )
    g.add_argument(
        "--regional-lora",
        action="store_true",
        help="each --lora acts only where its concept is (the i-th --identifier names the i-th --lora's "
        "concept; one extra UNet pass per concept per step); a prompt without identifier runs no LoRA; "
        "with --box the image is shared among the boxes, each concept's LoRA in its box's region, the "
        "box term guiding its group there (without boxes: --regional mask_source=regions, the automatic layout)",
    )
    g.add_argument(
        "--regional",
        metavar="FIELDS",
        help="with --regional-lora: RegionalConfig fields, e.g. 'assign=independent,concept_prompt=full,"
        "full_prompt_fraction=0' (default: RegionalConfig(), docs/personalization.md)",
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)")
    g.add_argument(
        "--threads", type=int, help="CPU threads, >= 1 (default: 1 for the shipped/tiny models, else torch's)"
    )
    g.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        help="weights' dtype (default: fp16 on cuda, fp32 on cpu)",
    )
    g.add_argument("--quiet", action="store_true", help="print nothing but errors; no progress bars")
    g.add_argument("--verbose", action="store_true", help="also show the libraries' warnings and notes")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("describe", help="show the token groups a prompt resolves to")
    subject_args(d)
    d.add_argument("--model", help="pipeline folder whose tokenizer to use (default: the CLIP tokenizer)")
    d.set_defaults(func=cmd_describe)

    u = sub.add_parser("ui", help="a local web page: name subjects, draw boxes, compare plain and guided")
    u.add_argument("--model", help="diffusers pipeline folder or hub id (default: the shipped shapes model)")
    u.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine only)"
    )
    u.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    u.add_argument(
        "--share",
        type=_true_or_false,
        default=False,
        metavar="true|false",
        help="a public share link (default: false)",
    )
    u.set_defaults(func=cmd_ui)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ait2i")
    except PackageNotFoundError:
        return "unknown (not installed)"


def quiet_libraries(verbose: bool = False, quiet: bool = False) -> None:
    """Keep the libraries' routine notes out of a run's output (``verbose`` keeps them).

    Silenced: diffusers' ``torch_dtype`` FutureWarning and its fp16-on-CPU note, peft/diffusers'
    "No LoRA keys associated to CLIPTextModel", accelerate's notes, transformers' notes. Loading bars
    show only on a terminal and never with ``quiet``.
    """
    import warnings

    import diffusers
    import transformers

    if quiet or not sys.stderr.isatty():
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*float16.*cpu.*", category=UserWarning)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    for name in ("accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. its note that torchvision is absent
    args = build_parser().parse_args(argv)
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    quiet_libraries(verbose, quiet)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:
        print(f"ait2i: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
