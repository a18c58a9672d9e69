"""Boxes per subject on the shipped models, offline: plain GLIGEN vs GLIGEN + ait2i, boxes drawn over.

    python examples/layout_boxes.py                      # shipped GLIGEN shapes model, seeds 0-3
    python examples/layout_boxes.py --layout boxes       # the box term alone on the plain shipped model
    python examples/layout_boxes.py --model PATH_OR_ID   # boxes alone on any SD / SDXL checkpoint

Writes ``layout_boxes.png`` (``--out``): one row per seed, one column per method, each layout box
drawn in its own colour. A ControlNet pipeline takes the same subjects (see docs/layout.md).
"""

import argparse

import torch
from diffusers import DiffusionPipeline

from ait2i_ext import Subject, generate
from ait2i_ext.cli import default_model
from ait2i_ext.shapes.gligen import load_gligen_pipeline
from ait2i_ext.viz import boxed_comparison

parser = argparse.ArgumentParser()
parser.add_argument("--layout", choices=["gligen", "boxes"], default="gligen")
parser.add_argument("--model", default=None, help="an SD / SDXL checkpoint (boxes alone)")
parser.add_argument("--seeds", type=int, default=4)
parser.add_argument("--steps", type=int, default=25)
parser.add_argument("--out", default="layout_boxes.png")
args = parser.parse_args()
torch.set_num_threads(1)  # the shipped models are small: one thread is fastest on a CPU

prompt = "a red circle and a blue square"
subjects = [
    Subject("circle", attributes=("red",), box=(0.05, 0.05, 0.45, 0.45)),  # top left
    Subject("square", attributes=("blue",), box=(0.55, 0.55, 0.95, 0.95)),  # bottom right
]
if args.model is None and args.layout == "gligen":
    pipe, labels = load_gligen_pipeline(), ("GLIGEN", "GLIGEN + ait2i")
else:
    pipe = DiffusionPipeline.from_pretrained(args.model or default_model(), safety_checker=None)
    labels = ("plain", "boxes (ait2i)")
pipe.set_progress_bar_config(disable=True)
rows = []
for seed in range(args.seeds):
    row = {}
    for label, guided in zip(labels, (False, True)):
        out = generate(
            pipe,
            prompt,
            subjects,
            guidance=guided,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(seed),
        )
        row[f"{label}, seed {seed}"] = out.images[0]
    rows.append(row)
boxed_comparison(rows, {s.phrase(): s.box for s in subjects}, title=prompt).save(args.out)
print(f"wrote {args.out}")
