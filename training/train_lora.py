"""DreamBooth-style LoRA fine-tuning of a Stable Diffusion 1.x/2.x model on a custom concept.

A small, readable version of diffusers' ``train_dreambooth_lora.py`` (diffusers + peft + accelerate)
whose defaults follow the model being trained (`resolve_model_defaults`). See ``docs/lora.md``.

    python -m ait2i_ext.training.launch -m ait2i_ext.training.train_lora \\
        --pretrained_model path/or/hub-id --instance_data_dir dog/ \\
        --instance_prompt "a photo of sks dog" --output_dir sks-dog

Input is checked in `parse_args` before any model loads; `train` then reads as numbered steps: load,
class images, LoRA adapters, data, resume, loss, loop, save.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .lora_data import (
    DreamBoothDataset,
    EpochShuffleSampler,
    class_images_present,
    collate,
    ensure_class_images,
    list_images,
    read_captions,
    steps_per_epoch,
)

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RUN_CONFIG_NAME = "train_config.json"
CHECKPOINT_PREFIX = "checkpoint-"
DEFAULT_UNET_TARGETS = "to_q,to_k,to_v,to_out.0"
TEXT_ENCODER_TARGETS = "q_proj,k_proj,v_proj,out_proj"
# ... plus the token embeddings: words the base never learned (the identifier, a new class noun) get
# their own vectors (the rows of the prompt's tokens only; the rest of the vocabulary is untouched).
TEXT_ENCODER_TARGETS_WITH_EMBEDDINGS = TEXT_ENCODER_TARGETS + ",token_embedding"
_MODEL_DEFAULT = "Default: from the model's size (see `default_recipe`)"
EMBEDDING_ROWS = ("new", "all")


def _target_list(targets: str) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()]


def composition_options(others: str, sides: str) -> dict:
    """The `WorldComposer` fields of ``--composition_others`` ("1,3,1": relative frequencies of 0, 1, 2
    other objects) and ``--composition_sides`` ("18,28": the concept's side in pixels, lowest and highest;
    "own": the concept at its own size, not rescaled).

    Raises:
        ValueError: naming the flag, its value and what was expected.
    """
    try:
        weights = tuple(float(w) for w in others.split(","))
    except ValueError:
        weights = ()
    if not weights or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(
            f"--composition_others={others!r} is invalid: expected comma-separated weights >= 0 of 0, 1, 2 "
            "other objects, not all 0 (e.g. '1,3,1'; '1': the concept alone)"
        )
    if sides.strip() == "own":
        return {"other_weights": weights, "concept_sides": None}
    try:
        low, high = (int(v) for v in sides.split(","))
    except ValueError:
        low, high = 0, -1
    if not 1 <= low <= high:
        raise ValueError(
            f"--composition_sides={sides!r} is invalid: expected 'LOW,HIGH' pixels, 1 <= LOW <= HIGH (e.g. '14,28'), "
            "or 'own'"
        )
    return {"other_weights": weights, "concept_sides": (low, high)}


@dataclass(frozen=True)
class Recipe:
    """Defaults of the flags that depend on the model being trained (a flag given on the command line wins).

    Args:
        name: how the log names it.
        rank, lora_alpha, lora_targets, train_text_encoder, text_encoder_targets, learning_rate,
            max_train_steps, train_batch_size, random_flip, world_compositions, composition_others,
            composition_sides, prior_target: the flags' defaults (``lora_alpha=None``: equal to the rank;
            ``prior_target`` counts only with ``--with_prior_preservation``).
    """

    name: str
    rank: int
    lora_alpha: float | None
    lora_targets: str
    train_text_encoder: bool
    text_encoder_targets: str
    learning_rate: float
    max_train_steps: int
    train_batch_size: int
    random_flip: bool
    world_compositions: float = 0.0
    composition_others: str = "1,3,1"
    composition_sides: str = "18,28"
    prior_target: str = "noise"

    def __post_init__(self) -> None:
        for field in ("rank", "max_train_steps", "train_batch_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} is invalid: expected an integer >= 1")
        if self.learning_rate <= 0 or (self.lora_alpha is not None and self.lora_alpha <= 0):
            raise ValueError(
                f"learning_rate={self.learning_rate}, lora_alpha={self.lora_alpha} are invalid: expected > 0"
            )
        for field in ("lora_targets", "text_encoder_targets"):
            if not _target_list(getattr(self, field)):
                raise ValueError(f"{field}={getattr(self, field)!r} is invalid: expected module names")
        if not 0.0 <= self.world_compositions <= 1.0:
            raise ValueError(
                f"world_compositions={self.world_compositions} is invalid: expected a number in [0, 1]"
            )
        composition_options(self.composition_others, self.composition_sides)
        if self.prior_target not in PRIOR_TARGETS:
            raise ValueError(
                f"prior_target={self.prior_target!r} is invalid: expected one of {PRIOR_TARGETS}"
            )


# --prior_target: DreamBooth's noise, or the base model's prediction (a distillation of the base model).
PRIOR_TARGETS = ("noise", "base")

# Every LoRA-able layer of an SD UNet: attention, feed-forward, the transformer's projections and the
# ResNet convolutions.
ALL_UNET_TARGETS = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out,conv1,conv2,conv_shortcut"
# Models up to this side (the shipped 64 px shapes model) are small enough for the small-model recipe.
SMALL_MODEL_MAX_RESOLUTION = 128
# Measured on the shipped shapes model (docs/lora.md, "Choosing the recipe"). Its prior preservation is
# data, not a flag: the documented command uses 2000 rendered scenes of the training world as class images
# (``python -m ait2i_ext.shapes.concepts --class-scenes``), which kept the world where 100 base-drawn ones
# did not; a LoRA weight below 1 and cut-mix instance images measured worse (docs/personalization.md,
# fourth round).
SMALL_MODEL_RECIPE = Recipe(
    name="small-model recipe",
    rank=16,
    lora_alpha=None,
    lora_targets=ALL_UNET_TARGETS,
    # the identifier and a new noun ("sks star") have untrained embeddings in the shipped model: without
    # their own vectors the concept is drawn alone but not beside another subject. Training only their
    # rows (--text_encoder_targets token_embedding --embedding_rows new) measured worse beside a second
    # subject and drifted the world more (docs/personalization.md, third round)
    train_text_encoder=True,
    text_encoder_targets=TEXT_ENCODER_TARGETS_WITH_EMBEDDINGS,
    learning_rate=1e-3,
    max_train_steps=500,
    train_batch_size=4,
    random_flip=True,
    # the concept pasted at its own size beside one world object in 30 % of the instance slots (the concept
    # beside a second subject), with the class half distilled to the frozen base model (keeps the world the
    # compositions alone moved): tenth sitting, docs/personalization.md
    world_compositions=0.3,
    composition_others="0,1",
    composition_sides="own",
    prior_target="base",
)
# diffusers' DreamBooth-LoRA defaults for Stable Diffusion 1.x/2.x (512-768 px).
STANDARD_RECIPE = Recipe(
    name="Stable Diffusion recipe",
    rank=4,
    lora_alpha=None,
    lora_targets=DEFAULT_UNET_TARGETS,
    train_text_encoder=False,
    text_encoder_targets=TEXT_ENCODER_TARGETS,
    learning_rate=1e-4,
    max_train_steps=400,
    train_batch_size=1,
    random_flip=False,
    world_compositions=0.0,
)


@dataclass(frozen=True)
class TrainingResult:
    """What a finished run leaves behind.

    Args:
        output_dir (`Path`): the run's folder.
        weights_path (`Path`): ``output_dir / "pytorch_lora_weights.safetensors"``.
        global_step (`int`): optimizer steps done, counting those before a resume.
        unet (`torch.nn.Module`): the trained UNet with its LoRA adapter, in memory.
        text_encoder (`torch.nn.Module`): the text encoder (with a LoRA adapter if it was trained).
    """

    output_dir: Path
    weights_path: Path
    global_step: int
    unet: torch.nn.Module
    text_encoder: torch.nn.Module


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DreamBooth-style LoRA fine-tuning for a custom concept.")
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--pretrained_model", required=True, help="diffusers folder (with model_index.json) or hub id"
    )
    g.add_argument("--instance_data_dir", required=True, help="folder of images of the concept")
    g.add_argument(
        "--instance_prompt",
        required=True,
        help='e.g. "a photo of sks dog"; images captioned in the folder\'s metadata.jsonl use their own',
    )
    g.add_argument("--output_dir", default="lora-out")
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="training side in pixels; default: the model's own (UNet sample_size x VAE scale factor)",
    )
    g.add_argument("--random_crop", action="store_true", help="random instead of centre crop")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None, help=_MODEL_DEFAULT)
    g.add_argument(
        "--world_compositions",
        type=float,
        default=None,
        metavar="FRACTION",
        help="shapes-world models: the share of instance slots in which the concept, cut from the instance "
        "images that show it alone, is scaled to the world's object sizes and placed beside 0-2 rendered "
        "objects of the world, captioned ('a sks star and a blue square'; ait2i_ext.shapes.concepts."
        "WorldComposer); 0: off. " + _MODEL_DEFAULT,
    )
    g.add_argument(
        "--composition_others",
        default=None,
        metavar="WEIGHTS",
        help="--world_compositions: relative frequencies of 0, 1 and 2 other objects beside the concept "
        "('1': the concept alone, rescaled and moved). " + _MODEL_DEFAULT,
    )
    g.add_argument(
        "--composition_sides",
        default=None,
        metavar="LOW,HIGH",
        help="--world_compositions: the concept's side in pixels, drawn in [LOW, HIGH] (at most 28, the "
        "shapes world's largest object), or 'own': the concept at its size in the instance images, its pixels "
        "pasted as drawn. " + _MODEL_DEFAULT,
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true")
    g.add_argument("--class_data_dir", help="class images; missing ones are generated with the base model")
    g.add_argument("--class_prompt", help='e.g. "a photo of dog"')
    g.add_argument(
        "--class_prompts_file",
        help="text file, one prompt per line: class images are generated from them in turn (instead of "
        "--class_prompt), e.g. scenes of several objects so the LoRA keeps drawing them",
    )
    g.add_argument("--num_class_images", type=int, default=100)
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument(
        "--prior_target",
        choices=PRIOR_TARGETS,
        default=None,
        help="what the class half is pulled to: 'noise' (DreamBooth: the noise added to the class image) or "
        "'base' (the base model's own prediction for the same noisy class image and caption, adapters "
        "off: the LoRA is pulled back only where it changes the base model, without the noise's variance). "
        + _MODEL_DEFAULT,
    )
    g.add_argument("--class_batch_size", type=int, default=4, help="images per call when generating")
    g.add_argument("--class_inference_steps", type=int, default=25)

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=None, help=_MODEL_DEFAULT)
    g.add_argument("--lora_alpha", type=float, default=None, help=_MODEL_DEFAULT)
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument(
        "--lora_targets", default=None, help="comma-separated UNet module names; " + _MODEL_DEFAULT.lower()
    )
    g.add_argument(
        "--train_text_encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train a text-encoder LoRA; " + _MODEL_DEFAULT.lower(),
    )
    g.add_argument(
        "--text_encoder_targets",
        default=None,
        help="comma-separated text-encoder module names (with --train_text_encoder); "
        + _MODEL_DEFAULT.lower(),
    )

    g.add_argument(
        "--embedding_rows",
        choices=EMBEDDING_ROWS,
        default="all",
        help="with token_embedding in --text_encoder_targets, the token rows that train: 'all' (default): "
        "every token of the instance captions; 'new': only the instance captions' tokens that no class "
        "caption has (the identifier and a new noun)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--max_train_steps", type=int, default=None, help=_MODEL_DEFAULT)
    g.add_argument("--train_batch_size", type=int, default=None, help=_MODEL_DEFAULT)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=None, help=_MODEL_DEFAULT)
    g.add_argument("--lr_scheduler", default="constant", help="a diffusers.optimization scheduler name")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config"
    )
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("checkpoints and validation")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N")
    g.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--validation_steps", type=int, default=100)
    g.add_argument("--num_validation_images", type=int, default=2)
    g.add_argument("--validation_inference_steps", type=int, default=25)

    return p


def _check_model_folder(pretrained_model: str) -> None:
    path = Path(pretrained_model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"--pretrained_model={pretrained_model!r} has no model_index.json: expected a diffusers "
                "pipeline folder (as written by `save_pretrained`) or a hub id"
            )
    elif (
        path.exists()
        or path.is_absolute()
        or pretrained_model.startswith((".", "~"))
        or pretrained_model.count("/") > 1
    ):
        raise ValueError(
            f"--pretrained_model={pretrained_model!r} is not a folder: expected a diffusers pipeline folder "
            "(with model_index.json) or a hub id"
        )


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check everything that needs no model, raising a ``ValueError`` naming the flag, its value and what
    was expected. Flags left unset that depend on the model stay ``None`` until `resolve_model_defaults`.
    """

    def check(cond: bool, flag: str, value: object, expected: str) -> None:
        if not cond:
            raise ValueError(f"{flag}={value!r} is invalid: expected {expected}")

    for flag in (
        "rank",
        "max_train_steps",
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
    ):
        value = getattr(args, flag)
        if value is not None:  # None: the model's default, filled in by `resolve_model_defaults`
            check(value >= 1, f"--{flag}", value, "an integer >= 1")
    check(args.validation_steps >= 1, "--validation_steps", args.validation_steps, "an integer >= 1")
    if args.resolution is not None:
        check(
            args.resolution >= 8 and args.resolution % 8 == 0,
            "--resolution",
            args.resolution,
            "a multiple of 8 (or unset: the model's own size)",
        )
    if args.learning_rate is not None:
        check(args.learning_rate > 0, "--learning_rate", args.learning_rate, "a number > 0")
    if args.checkpoints_total_limit is not None:
        check(
            args.checkpoints_total_limit >= 1,
            "--checkpoints_total_limit",
            args.checkpoints_total_limit,
            ">= 1",
        )
    if args.lora_alpha is not None:
        check(args.lora_alpha > 0, "--lora_alpha", args.lora_alpha, "a number > 0")
    if args.world_compositions is not None:
        check(
            0.0 <= args.world_compositions <= 1.0,
            "--world_compositions",
            args.world_compositions,
            "a number in [0, 1] (0: off)",
        )
    # not yet resolved against the model's recipe: both recipes share these defaults
    others = args.composition_others or SMALL_MODEL_RECIPE.composition_others
    sides = args.composition_sides or SMALL_MODEL_RECIPE.composition_sides
    options = composition_options(others, sides)
    for flag in ("lora_targets", "text_encoder_targets"):
        if getattr(args, flag) is not None:
            check(
                bool(_target_list(getattr(args, flag))),
                f"--{flag}",
                getattr(args, flag),
                "comma-separated module names",
            )

    _check_model_folder(args.pretrained_model)
    images = list_images(args.instance_data_dir, "--instance_data_dir")
    captions = read_captions(images, args.instance_prompt)
    if args.world_compositions:  # given on the command line: its images must allow it
        from ait2i_ext.shapes.concepts import WorldComposer

        try:
            WorldComposer.from_instances(
                images,
                captions,
                args.instance_prompt,
                **options,
            )
        except ValueError as err:
            raise ValueError(
                f"--world_compositions={args.world_compositions} --composition_sides={sides}: {err}"
            ) from None

    if args.with_prior_preservation:
        check(
            args.class_data_dir is not None,
            "--class_data_dir",
            None,
            "a folder with --with_prior_preservation",
        )
        check(
            bool(args.class_prompt)
            or args.class_prompts_file is not None
            or class_images_present(args.class_data_dir) >= args.num_class_images,
            "--class_prompt",
            args.class_prompt,
            "a prompt (or --class_prompts_file) with --with_prior_preservation, unless --class_data_dir "
            "already holds --num_class_images images (captioned in its metadata.jsonl)",
        )
        if args.class_prompts_file is not None:
            check(
                bool(read_prompts_file(args.class_prompts_file)),
                "--class_prompts_file",
                args.class_prompts_file,
                "a text file holding at least one prompt, one per line",
            )
        check(args.num_class_images >= 1, "--num_class_images", args.num_class_images, "an integer >= 1")
    if args.resume_from_checkpoint not in (None, "latest"):
        path = _resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if path is None or _checkpoint_step(path) is None:
            raise ValueError(
                f"--resume_from_checkpoint={args.resume_from_checkpoint!r} is not a checkpoint: expected 'latest' "
                f"or an existing {CHECKPOINT_PREFIX}STEP folder (absolute or inside --output_dir)"
            )
    return args


def world_composer(args: argparse.Namespace):
    """The `WorldComposer` of ``--world_compositions`` (None when it is 0), cut from the instance images
    captioned as the concept alone. When the recipe's default finds no such image it is turned off
    (``args.world_compositions = 0``) with a warning; a value given on the command line was checked by
    `validate_args`.
    """
    if not args.world_compositions:
        return None
    from ait2i_ext.shapes.concepts import WorldComposer

    images = list_images(args.instance_data_dir, "--instance_data_dir")
    try:
        composer = WorldComposer.from_instances(
            images,
            read_captions(images, args.instance_prompt),
            args.instance_prompt,
            **composition_options(args.composition_others, args.composition_sides),
        )
    except ValueError as err:
        logger.warning("%s; training without world compositions (--world_compositions 0)", err)
        args.world_compositions = 0.0
        return None
    logger.info(
        "world compositions: %.0f%% of the instance slots show the concept (cut from %d images of it alone) "
        "in a scene of the world (0/1/2 other objects weighted %s, the concept %s)",
        100 * args.world_compositions,
        len(composer.crops),
        args.composition_others,
        "-".join(map(str, composer.concept_sides)) + " px" if composer.concept_sides else "at its own size",
    )
    return composer


def read_prompts_file(path: str | Path) -> list[str]:
    """The non-empty lines of a prompts file (``[]`` if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (see `validate_args`)."""
    return validate_args(build_parser().parse_args(argv))


def model_resolution(unet_config, vae_config) -> int:
    """The image side a model was made for: the UNet's ``sample_size`` (latent side) x the VAE's scale
    factor (``2 ** (len(block_out_channels) - 1)``, as diffusers' pipelines compute it)."""
    return int(unet_config.sample_size) * 2 ** (len(vae_config.block_out_channels) - 1)


def default_recipe(resolution: int) -> Recipe:
    """The recipe for a model trained at ``resolution`` px: ``SMALL_MODEL_RECIPE`` up to
    ``SMALL_MODEL_MAX_RESOLUTION``, else ``STANDARD_RECIPE``."""
    return SMALL_MODEL_RECIPE if resolution <= SMALL_MODEL_MAX_RESOLUTION else STANDARD_RECIPE


def resolve_model_defaults(args: argparse.Namespace, unet_config, vae_config) -> argparse.Namespace:
    """Fill the flags left unset from the model being trained, and log what was chosen: ``resolution``
    (the model's own size) and the recipe flags of `default_recipe` for that size. Also sets
    ``args.lora_alpha`` (default: rank) and ``args.lora_target_list``.
    """
    if args.resolution is None:
        args.resolution = model_resolution(unet_config, vae_config)
        logger.info(
            "--resolution not given: training at %d px, the model's own size (UNet sample_size %d x VAE "
            "scale factor %d)",
            args.resolution,
            unet_config.sample_size,
            args.resolution // unet_config.sample_size,
        )
    recipe = default_recipe(args.resolution)
    chosen = {}
    for field in dataclasses.fields(recipe)[1:]:  # all but the name
        if getattr(args, field.name) is None:
            chosen[field.name] = getattr(recipe, field.name)
            setattr(args, field.name, chosen[field.name])
    if chosen:
        logger.info(
            "defaults for a %d px model (%s): %s",
            args.resolution,
            recipe.name,
            ", ".join(f"--{k} {v}" for k, v in chosen.items()),
        )
    args.lora_alpha = float(args.rank if args.lora_alpha is None else args.lora_alpha)
    args.lora_target_list = _target_list(args.lora_targets)
    return args


def save_run_config(args: argparse.Namespace, output_dir: Path) -> Path:
    """Write the run's resolved flags (model-derived defaults filled in) to ``output_dir/train_config.json``."""
    path = output_dir / RUN_CONFIG_NAME
    config = {k: v for k, v in vars(args).items() if k != "lora_target_list"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-STEP`` folder name, else ``None``."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``output_dir`` (``checkpoint-STEP`` folders), oldest first. Folders still
    being written are named ``.checkpoint-STEP.tmp`` and never listed.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if p.is_dir() and (step := _checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def _resolve_checkpoint(output_dir: str | Path, which: str) -> Path | None:
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for path in (Path(which), Path(output_dir) / which):
        if path.is_dir():
            return path
    return None


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None = None) -> Path:
    """Write the training state to ``output_dir/checkpoint-{step}`` atomically.

    Every process writes into ``.checkpoint-{step}.tmp`` (accelerate stores per-process RNG states);
    the main process then renames it, so a run killed while saving leaves only a ``.tmp`` folder and
    the previous checkpoints intact. Older checkpoints beyond ``total_limit`` are deleted afterwards.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = output_dir / f".{CHECKPOINT_PREFIX}{step}.old"
        if final.exists():  # same step saved by an earlier run resumed from before it
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if total_limit is not None:
            for stale in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(stale)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------
# LoRA weights
# --------------------------------------------------------------------------------------------------


def check_lora_targets(model: torch.nn.Module, targets: Sequence[str], flag: str = "--lora_targets") -> None:
    """Raise a ``ValueError`` listing the targets that match no module of ``model`` (peft's rule: the
    module name equals the target or ends with ``"." + target``); peft itself would skip them silently.
    """
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n in names if "attn" in n} or {n.rsplit(".", 1)[-1] for n in names}
        )
        raise ValueError(
            f"{flag}={','.join(targets)!r}: {unmatched} match no layer of the {type(model).__name__}; "
            f"expected names such as {leaves[:12]}"
        )


def new_token_ids(instance_ids: torch.Tensor, class_ids: torch.Tensor | None) -> list[int]:
    """The token ids of the instance captions that no class caption holds (sorted): the identifier and a
    noun the class captions never use. Without class captions, every instance caption token."""
    seen = set() if class_ids is None else set(class_ids.flatten().tolist())
    return sorted(set(instance_ids.flatten().tolist()) - seen)


@contextlib.contextmanager
def adapters_off(*models: torch.nn.Module):
    """The base ``models`` inside the block: every peft adapter layer of theirs bypassed, no gradients.

    peft's ``enable_adapters(False)`` also stops the adapters' gradients; ``enable_adapters(True)``
    restores them, so the trained parameters are the same after the block.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def restrict_embedding_lora(text_encoder, token_ids: Sequence[int]) -> int:
    """Let only the rows ``token_ids`` of the text encoder's token-embedding LoRA train.

    peft's embedding LoRA adds ``(lora_embedding_B @ lora_embedding_A).T`` to the table, with ``A``
    (rank x vocab) starting at zero: zeroing the gradient of ``A``'s other columns keeps their rows exactly
    at the base embeddings (AdamW's decay keeps zeros at zero). Returns the number of hooked layers.
    """
    hooked = 0
    for module in text_encoder.modules():
        table = getattr(module, "lora_embedding_A", None)
        if table is None or "default" not in table:
            continue
        param = table["default"]
        mask = torch.zeros(1, param.shape[1], dtype=param.dtype, device=param.device)
        mask[0, list(token_ids)] = 1
        param.register_hook(lambda grad, mask=mask: grad * mask)
        hooked += 1
    return hooked


def lora_layers_and_metadata(unet, text_encoder=None) -> dict:
    """Keyword arguments of ``StableDiffusionLoraLoaderMixin.save_lora_weights`` for the adapters of
    ``unet`` (and ``text_encoder`` if it has one): diffusers-format layers plus peft's adapter config,
    so ``lora_alpha != rank`` loads at full strength.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import StateDictType
    from peft.utils import get_peft_model_state_dict

    kwargs = {
        # peft's key format as is: diffusers' conversion renames only the attention layers' keys, and a
        # file mixing both formats loads without them (conv and feed-forward targets).
        "unet_lora_layers": get_peft_model_state_dict(unet),
        "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    }
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder),
            original_type=StateDictType.PEFT,  # an embedding-only state dict has no type to infer
        )
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    return kwargs


def load_lora_into(folder: str | Path, unet, text_encoder=None) -> None:
    """Load a checkpoint's LoRA file into the existing ``"default"`` adapters of ``unet`` / ``text_encoder``."""
    from ait2i_ext.adapters.personalize import lora_state_to_peft
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=LORA_WEIGHT_NAME)
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(
        unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default"
    )
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(
            f"checkpoint {str(folder)!r} has UNet LoRA keys this adapter lacks: {unexpected[:5]}"
        )
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        te_state = {
            k.removeprefix("text_encoder."): v for k, v in state_dict.items() if k.startswith("text_encoder.")
        }
        set_peft_model_state_dict(
            text_encoder, lora_state_to_peft("text_encoder", te_state), adapter_name="default"
        )


def save_lora(output_dir: Path, unet, text_encoder=None) -> Path:
    """Write ``output_dir/pytorch_lora_weights.safetensors`` via a temporary folder and an atomic rename."""
    from diffusers import StableDiffusionPipeline

    tmp = output_dir / ".lora.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp), weight_name=LORA_WEIGHT_NAME, **lora_layers_and_metadata(unet, text_encoder)
    )
    final = output_dir / LORA_WEIGHT_NAME
    os.replace(tmp / LORA_WEIGHT_NAME, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _base_pipeline(model: str, unet, vae, text_encoder, tokenizer):
    """A `StableDiffusionPipeline` around the given (possibly adapted) components, without safety checker."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        model,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def log_validation(args, accelerator, unet, text_encoder, vae, tokenizer, step: int) -> list[Path]:
    """Generate ``num_validation_images`` for ``validation_prompt`` with the current LoRA and save them
    as ``output_dir/validation/step-{step:06d}-{i}.png``.
    """
    pipeline = _base_pipeline(
        args.pretrained_model,
        accelerator.unwrap_model(unet),
        vae,
        accelerator.unwrap_model(text_encoder),
        tokenizer,
    )
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    with accelerator.autocast():  # fp32 LoRA layers over half-precision base weights
        images = pipeline(
            [args.validation_prompt] * args.num_validation_images,
            num_inference_steps=args.validation_inference_steps,
            generator=generator,
        ).images
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"step-{step:06d}-{i}.png")
        image.save(paths[-1])
    logger.info("Saved %d validation images for step %d in %s", len(paths), step, folder)
    del pipeline
    return paths


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> TrainingResult:
    """Run the fine-tuning described by checked ``args`` (see `parse_args`)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTokenizer

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed, device_specific=True)  # each process draws its own noise

    # 1. Load the frozen base model.
    model = args.pretrained_model
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    resolve_model_defaults(args, unet.config, vae.config)
    composer = world_composer(args)
    if accelerator.is_main_process:
        save_run_config(args, output_dir)
    check_lora_targets(unet, args.lora_target_list)
    if args.train_text_encoder:
        check_lora_targets(text_encoder, _target_list(args.text_encoder_targets), "--text_encoder_targets")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    for module in (unet, vae, text_encoder):
        module.to(accelerator.device)
        # also casts an fp16-saved model trained in fp32 (e.g. the shipped shapes model)
        module.to(dtype=weight_dtype)

    # 2. Class images for prior preservation, made with the base model before any adapter exists.
    class_images = None
    if args.with_prior_preservation:
        if accelerator.is_main_process:
            ensure_class_images(
                args.class_data_dir,
                read_prompts_file(args.class_prompts_file) if args.class_prompts_file else args.class_prompt,
                args.num_class_images,
                lambda: _base_pipeline(model, unet, vae, text_encoder, tokenizer),
                seed=args.seed,
                batch_size=args.class_batch_size,
                num_inference_steps=args.class_inference_steps,
            )
        accelerator.wait_for_everyone()
        class_images = list_images(args.class_data_dir, "--class_data_dir")[: args.num_class_images]
        if len(class_images) < args.num_class_images:
            raise ValueError(
                f"--class_data_dir={args.class_data_dir!r} holds {len(class_images)} images: expected "
                f"--num_class_images={args.num_class_images}"
            )

    # 3. LoRA adapters; only their parameters train (in float32 under mixed precision).
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=args.lora_target_list,
        )
    )
    trained = [unet]
    if args.train_text_encoder:
        # peft directly: transformers' `add_adapter` demands a newer peft than diffusers does.
        inject_adapter_in_model(
            LoraConfig(
                r=args.rank,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=_target_list(args.text_encoder_targets),
            ),
            text_encoder,
            adapter_name="default",
        )
        trained.append(text_encoder)
    cast_training_params(trained, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    def save_model_hook(models, weights, folder):
        weights.clear()  # accelerate would save full models; the LoRA file is enough
        if accelerator.is_main_process:
            unwrapped_te = accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None
            StableDiffusionPipeline.save_lora_weights(
                folder,
                weight_name=LORA_WEIGHT_NAME,
                **lora_layers_and_metadata(accelerator.unwrap_model(unet), unwrapped_te),
            )

    def load_model_hook(models, folder):
        models.clear()
        unwrapped_te = accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None
        load_lora_into(folder, accelerator.unwrap_model(unet), unwrapped_te)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)

    # 4. Data: the order depends only on (seed, epoch), so a resumed run continues it.
    def prompt_ids(prompts: list[str]) -> torch.Tensor:
        """`(N, 77)` token ids, one row per image's caption."""
        return tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids

    instance_images = list_images(args.instance_data_dir, "--instance_data_dir")
    instance_ids = prompt_ids(read_captions(instance_images, args.instance_prompt))
    class_ids = None
    if class_images:
        class_ids = prompt_ids(read_captions(class_images, args.class_prompt, "--class_data_dir"))
    embedding_targets = "token_embedding" in _target_list(args.text_encoder_targets or "")
    if args.train_text_encoder and embedding_targets and args.embedding_rows == "new":
        rows = new_token_ids(instance_ids, class_ids)
        restrict_embedding_lora(accelerator.unwrap_model(text_encoder), rows)
        logger.info(
            "token embeddings: only the rows of %s train (--embedding_rows new)",
            tokenizer.convert_ids_to_tokens(rows),
        )
    dataset = DreamBoothDataset(
        instance_images,
        instance_ids,
        args.resolution,
        class_images=class_images,
        class_prompt_ids=class_ids,
        center_crop=not args.random_crop,
        random_flip=args.random_flip,
        seed=args.seed,
        compose=composer,
        compose_fraction=args.world_compositions,
        tokenize=lambda caption: prompt_ids([caption])[0],
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochShuffleSampler(len(dataset), args.seed),
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global generator untouched
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if args.train_text_encoder:
        text_encoder = accelerator.prepare(text_encoder)

    # 5. Resume: model, optimizer, scheduler and RNG states; the step counter continues.
    global_step = 0
    if args.resume_from_checkpoint:
        path = _resolve_checkpoint(output_dir, args.resume_from_checkpoint)
        if path is None:
            logger.info("No checkpoint in %s; starting a new run", output_dir)
        else:
            logger.info("Resuming from %s", path)
            accelerator.load_state(str(path))
            global_step = _checkpoint_step(path)

    updates_per_epoch = steps_per_epoch(len(dataloader), args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    # 6. The loss of one batch: diffusion (+ prior on the class half).
    def compute_loss(batch) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(args.train_text_encoder):
            embeddings = text_encoder(batch["input_ids"].to(accelerator.device), return_dict=False)[0]
        pred = unet(noisy, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        n = int(batch["num_instance"])
        loss = F.mse_loss(pred[:n].float(), target[:n].float())
        logs = {"loss": loss.item()}
        if args.with_prior_preservation:
            if args.prior_target == "base":
                target = target.clone()
                with adapters_off(unet, text_encoder):
                    base = text_encoder(batch["input_ids"][n:].to(accelerator.device), return_dict=False)[0]
                    target[n:] = unet(
                        noisy[n:], timesteps[n:], encoder_hidden_states=base, return_dict=False
                    )[0]
            prior = F.mse_loss(pred[n:].float(), target[n:].float())
            loss = loss + args.prior_loss_weight * prior
            logs["prior"] = prior.item()
        return loss, logs

    # 7. The loop.
    progress = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    for epoch in range(first_epoch, num_epochs):
        if global_step >= args.max_train_steps:
            break
        for module in trained:
            module.train()
        dataset.set_epoch(epoch)  # the augmentations' seed
        dataloader.set_epoch(epoch)  # the shuffle's seed
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(dataloader, skip_batches)
            loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(*trained):
                loss, logs = compute_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            progress.set_postfix(**{k: f"{v:.4f}" for k, v in logs.items()})
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if (
                args.validation_prompt
                and global_step % args.validation_steps == 0
                and accelerator.is_main_process
            ):
                log_validation(args, accelerator, unet, text_encoder, vae, tokenizer, global_step)
            if global_step >= args.max_train_steps:
                break
    progress.close()

    # 8. Save the LoRA.
    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(unet)
    text_encoder = accelerator.unwrap_model(text_encoder)
    weights_path = output_dir / LORA_WEIGHT_NAME
    if accelerator.is_main_process:
        save_lora(output_dir, unet, text_encoder if args.train_text_encoder else None)
        logger.info("Saved %s after %d steps", weights_path, global_step)
    accelerator.end_training()
    return TrainingResult(output_dir, weights_path, global_step, unet, text_encoder)


def main(argv: Sequence[str] | None = None) -> TrainingResult:
    """Parse ``argv`` (default: ``sys.argv[1:]``), check it and train; for calls from Python."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(parse_args(argv))


def cli(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``ait2i-train-lora``): like `main`, returning an exit status; a bad input
    (a flag, a folder, a model: ``ValueError`` / ``OSError``) is one line on stderr and status 2, as
    ``ait2i``'s commands do, not a traceback."""
    try:
        main(argv)
    except (ValueError, OSError) as err:
        print(f"ait2i-train-lora: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
