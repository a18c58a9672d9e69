"""Measure the shapes model's quality bar: plain sampling (no attention guidance), scored by the evaluator.

For each prompt set and classifier-free guidance scale it samples ``--seeds`` images per prompt with
the pipeline's own scheduler and prints one markdown table row: single-object prompts correct
(colour, shape, count 1), all objects present, neglect, colour mixing, fully correct.

    python -m ait2i_ext.training.eval_shapes --model ait2i_ext/assets/shapes_model --scales 1 3 7.5
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ait2i_ext.shapes.evaluator import evaluate
from ait2i_ext.shapes.model import default_model_path
from ait2i_ext.shapes.prompts import prompt_set

logger = logging.getLogger(__name__)


def sample_set(pipe, name: str, seeds: int, scale: float, steps: int, batch_size: int) -> list:
    """Scores of every (prompt, seed) of set ``name``; seed ``s`` of every prompt is ``s``."""
    jobs = [(p, s) for p in prompt_set(name) for s in range(seeds)]
    scores = []
    for i in tqdm(range(0, len(jobs), batch_size), desc=f"{name} @ {scale}", mininterval=10):
        chunk = jobs[i : i + batch_size]
        images = pipe(
            [p.text for p, _ in chunk],
            guidance_scale=scale,
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
        ).images
        scores += [evaluate(im, p.objects) for im, (p, _) in zip(images, chunk, strict=True)]
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_model_path())
    parser.add_argument("--sets", nargs="+", default=["single", "two"])
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 3.0, 7.5])
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rows = [
        "| set | guidance | images | correct | all present | neglect | colour mixing | s/image |",
        "|---" * 8 + "|",
    ]
    for scale in args.scales:
        for name in args.sets:
            start = time.perf_counter()
            scores = sample_set(pipe, name, args.seeds, scale, args.steps, args.batch_size)
            per_image = (time.perf_counter() - start) / len(scores)

            def rate(key: str, scores: list = scores) -> str:
                return f"{100 * np.mean([getattr(s, key) for s in scores]):.0f} %"

            rows.append(
                f"| {name} | {scale:g} | {len(scores)} | {rate('correct')} | {rate('all_present')} | "
                f"{rate('neglect')} | {rate('colour_mixing')} | {per_image:.2f} |"
            )
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
