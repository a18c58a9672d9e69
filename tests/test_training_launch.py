"""``ait2i_ext.training.launch``: accelerate's launcher without its notes about defaulted values."""

import os
import subprocess
import sys

from accelerate.commands.launch import launch_command_parser
from ait2i_ext.training.launch import fill_launch_args, launch_defaults

NOTE = "`--num_processes` was set"  # accelerate's note, followed by "to a value of `0`" on a CPU


def test_values_accelerate_would_default_are_filled_on_a_cpu():
    args = launch_command_parser().parse_args(["-m", "some.module", "--x", "1"])
    assert args.num_processes is None  # plain `accelerate launch` would pick 0 here and print the note
    filled = fill_launch_args(args, uses_config=False, num_gpus=0)
    assert filled.num_processes == 1 and filled.num_machines == 1
    assert filled.mixed_precision == "no" and filled.dynamo_backend == "no"
    assert filled.training_script_args == ["--x", "1"] and args.num_processes is None  # input not changed
    assert launch_defaults(4)["num_processes"] == 4


def test_given_values_and_config_files_win():
    args = launch_command_parser().parse_args(["--num_processes", "2", "--mixed_precision", "bf16", "x.py"])
    filled = fill_launch_args(args, uses_config=False, num_gpus=8)
    assert filled.num_processes == 2 and filled.mixed_precision == "bf16" and filled.num_machines == 1
    assert fill_launch_args(args, uses_config=True, num_gpus=0).num_machines is None


def test_tiny_training_run_through_the_launcher_prints_no_accelerate_note(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")  # no user accelerate config
    argv = ["--output-dir", str(tmp_path / "run"), "--vae-steps", "1", "--unet-steps", "1"]
    argv += ["--batch-size", "2", "--vae-batch-size", "2", "--scale-samples", "2", "--warmup-steps", "1"]
    cmd = [sys.executable, "-m", "ait2i_ext.training.launch", "-m", "ait2i_ext.training.train_shapes", *argv]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    assert NOTE not in output and "were not passed to `accelerate launch`" not in output
