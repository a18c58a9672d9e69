"""Where a guided step's time goes: the guided pass's forward under capture, the losses, the backward.

    OMP_NUM_THREADS=1 python benchmarks/guided_step.py --arch shapes --batch 8

Runs plain sampling and ``ait2i_ext.generate`` (the model's settings) on one prompt, interleaved,
``--repeats`` times, and prints the process CPU seconds (user + system, one thread) of each call and,
for the guided calls, of the three parts of every guided update (summed over the run's guided
steps): the conditional UNet pass under attention capture (``guidance.capture_maps``), the losses
(``guidance.batch_losses``) and the backward to the latents (``torch.autograd.grad``). One guided
pass (its three parts) is then compared with one plain denoising step (the CFG UNet pass on twice
the batch, no grad). The parts are timed by wrapping the functions ``guidance.guidance_step`` calls;
nothing else changes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import PROMPTS, SHAPES_PROMPTS  # noqa: E402

from ait2i_ext import generate, guidance  # noqa: E402
from ait2i_ext.config import model_config  # noqa: E402
from ait2i_ext.testing import build_pipeline  # noqa: E402

PARTS = {"forward under capture": "capture_maps", "losses": "batch_losses"}


@contextmanager
def timed_parts(totals: dict[str, float]):
    """Add the CPU seconds of the guided update's parts to ``totals`` while the block runs."""

    def wrap(name, fn):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.process_time() - start

        return timed

    originals = {attr: getattr(guidance, attr) for attr in PARTS.values()}
    grad = torch.autograd.grad
    for name, attr in PARTS.items():
        setattr(guidance, attr, wrap(name, originals[attr]))
    torch.autograd.grad = wrap("backward", grad)
    try:
        yield totals
    finally:
        for attr, fn in originals.items():
            setattr(guidance, attr, fn)
        torch.autograd.grad = grad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "shapes"), default="tiny")
    parser.add_argument("--batch", type=int, default=1, help="images per call (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=None, help="default: 25 for shapes, 20 for tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--settings-from",
        metavar="FOLDER",
        help="use this model folder's ait2i.json ('shapes': the shipped shapes model's) instead of the pipeline's",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.arch == "shapes":
        from diffusers import DiffusionPipeline

        from ait2i_ext.shapes.model import default_model_path

        pipe = DiffusionPipeline.from_pretrained(default_model_path())
        prompt, subjects = next(iter(SHAPES_PROMPTS.items()))
    else:
        pipe = build_pipeline("tiny")
        prompt, subjects = next(iter(PROMPTS.items()))
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps or (25 if args.arch == "shapes" else 20)
    settings = args.settings_from
    if settings == "shapes":
        from ait2i_ext.shapes.model import default_model_path

        settings = default_model_path()
    config = model_config(settings or pipe)
    common = dict(num_inference_steps=steps, num_images_per_prompt=args.batch, output_type="np")

    def seeds():
        return [torch.Generator().manual_seed(s) for s in range(args.batch)]

    def plain():
        pipe(prompt, generator=seeds(), **common)

    def guided():
        return generate(pipe, prompt, subjects, config=config, generator=seeds(), **common)

    guided_steps = len(guided().steps)  # warm-up, untimed
    plain()
    calls, parts = defaultdict(list), defaultdict(list)
    for r in range(args.repeats):
        for name in ("plain", "guided") if r % 2 == 0 else ("guided", "plain"):
            totals: dict[str, float] = defaultdict(float)
            with timed_parts(totals):
                start = time.process_time()
                plain() if name == "plain" else guided()
                calls[name].append(time.process_time() - start)
            for part, seconds in totals.items():
                parts[part].append(seconds)
    plain_s, guided_s = statistics.median(calls["plain"]), statistics.median(calls["guided"])
    step_s = plain_s / steps  # a plain step's share (includes text encoding and decoding: an upper bound)
    print(
        f"# {args.arch}, batch {args.batch}, {steps} steps, {guided_steps} guided, median of {args.repeats}"
    )
    print(f"plain call   {plain_s:7.3f} CPU s")
    print(f"guided call  {guided_s:7.3f} CPU s  ({guided_s / plain_s:.3f}x plain)")
    for part in ("forward under capture", "losses", "backward"):
        per_pass = statistics.median(parts[part]) / guided_steps
        print(f"  {part:<22} {per_pass:7.3f} CPU s per guided step ({per_pass / step_s:.2f} plain steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
