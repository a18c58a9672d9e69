"""``accelerate launch`` for the training scripts, without its notes about defaulted values.

    python -m ait2i_ext.training.launch -m ait2i_ext.training.train_shapes --output-dir runs/shapes
    python -m ait2i_ext.training.launch --num_processes 4 -m ait2i_ext.training.train_lora ...

It takes exactly ``accelerate launch``'s arguments. Without a config file (``--config_file`` or
the one ``accelerate config`` writes), plain ``accelerate launch`` picks ``--num_processes`` as the
number of GPUs (0 on a CPU machine), ``--num_machines 1``, ``--mixed_precision no`` and
``--dynamo_backend no``, and prints a note about each. Here the values not given are set to the
same choices (one process on a machine without GPUs) before accelerate sees them, so the run is
the one ``accelerate launch`` would start, without the note. With a config file nothing changes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def launch_defaults(num_gpus: int) -> dict[str, object]:
    """The values ``accelerate launch`` falls back to without a config file (1 process on a CPU)."""
    return {
        "num_processes": max(num_gpus, 1),
        "num_machines": 1,
        "mixed_precision": "no",
        "dynamo_backend": "no",
    }


def fill_launch_args(args: argparse.Namespace, uses_config: bool, num_gpus: int) -> argparse.Namespace:
    """``args`` (parsed by accelerate's launch parser) with the defaulted values set, unless a config
    file supplies them (``uses_config``); values the user gave are kept."""
    if uses_config:
        return args
    filled = argparse.Namespace(**vars(args))
    for name, value in launch_defaults(num_gpus).items():
        if getattr(filled, name, None) is None:
            setattr(filled, name, value)
    return filled


def main(argv: Sequence[str] | None = None) -> None:
    import torch
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    # accelerate reads a config file when one is named, or when its default one exists (not with --cpu)
    uses_config = args.config_file is not None or (os.path.isfile(default_config_file) and not args.cpu)
    launch_command(fill_launch_args(args, uses_config, torch.cuda.device_count()))


if __name__ == "__main__":
    main()
