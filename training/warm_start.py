"""Continuing an exported model in a new training sitting: ``--init-from FOLDER`` / ``--init-step N``.

Shared by ``train_gligen`` and ``train_controlnet``. The folder's trained weights (fp16 when exported)
start the new run in fp32; ``--init-step`` says how many steps the folder trained, so the new run's
scenes come after the ones it saw (the scene seeds continue) while its step counter, warm-up and
learning-rate schedule start at 0 (Adam's moments are new). Both land in ``train_args.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_init_arguments(p: argparse.ArgumentParser, loads: str) -> None:
    """``--init-from`` (help: ``loads``, what it starts from the folder) and ``--init-step``."""
    p.add_argument("--init-from", default=None, help=loads)
    p.add_argument(
        "--init-step",
        type=int,
        default=0,
        help="steps the --init-from model has trained: its scenes are skipped (this run's step counter and "
        "learning-rate schedule start at 0)",
    )


def check_init_arguments(
    p: argparse.ArgumentParser, args, config_name: str, expected: str, kind: str
) -> None:
    """Exit with a one-line error (``p.error``) unless ``--init-from`` names a folder whose
    ``config_name`` (``model_index.json``, ``config.json``) has ``_class_name == expected``, and unless
    ``--init-step`` is >= 0 and comes with ``--init-from``. ``kind`` names the folder in the message."""
    if args.init_step < 0:
        p.error(f"--init-step {args.init_step} is out of range: expected >= 0")
    if args.init_from is None:
        if args.init_step:
            p.error(f"--init-step {args.init_step} needs --init-from (the model that trained those steps)")
        return
    config = Path(args.init_from) / config_name
    found = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    if found != expected:
        p.error(
            f"--init-from {args.init_from!r} is not a {kind} folder: expected a {config_name} naming "
            f"{expected}, found " + (f"{found!r}" if config.is_file() else f"no {config_name}")
        )


def first_scene_seed(offset: int, step: int, accelerator, batch_size: int) -> int:
    """Seed of this process's first scene at global step ``step`` (``--init-step`` included): every
    process and step draws its own ``batch_size`` consecutive scenes after ``offset``."""
    return offset + (step * accelerator.num_processes + accelerator.process_index) * batch_size


def check_same_tensors(own: dict, found: dict, folder, what: str) -> None:
    """Raise ``ValueError`` (one line naming ``folder`` and ``what``, the model of ``--base`` it must fit)
    unless the state dicts ``own`` and ``found`` have the same keys and shapes."""
    wrong = sorted(set(own) ^ set(found)) or [k for k in own if own[k].shape != found[k].shape]
    if wrong:
        raise ValueError(
            f"--init-from {str(folder)!r} does not fit the {what} of --base: keys or shapes differ "
            f"at {wrong[:3]} ({len(wrong)} in all)"
        )
