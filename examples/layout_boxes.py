"""Boxes per subject: the box terms pull each subject's attention into its own box.

    python examples/layout_boxes.py                     # the shipped shapes model, boxes alone
    python examples/layout_boxes.py --model PATH_OR_ID  # any SD / SDXL checkpoint

GLIGEN and ControlNet pipelines take the same subjects (see docs/layout.md): load them with
``ait2i_ext.adapters.layout.load_gligen_pipeline`` / ``ait2i_ext.adapters.controlnet.load_controlnet_pipeline``.
"""

import argparse

import torch
from diffusers import DiffusionPipeline

from ait2i_ext import Subject, generate
from ait2i_ext.cli import default_model
from ait2i_ext.viz import box_overlay, side_by_side

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

pipe = DiffusionPipeline.from_pretrained(
    args.model or default_model(), torch_dtype=torch.float32, safety_checker=None
)
prompt = "a red circle and a blue square"
subjects = [
    Subject("circle", attributes=("red",), box=(0.05, 0.3, 0.45, 0.7)),  # left
    Subject("square", attributes=("blue",), box=(0.55, 0.3, 0.95, 0.7)),  # right
]
boxes = {s.noun: s.box for s in subjects}
pictures = {}
for label, guided in [("plain", False), ("boxes", True)]:
    out = generate(
        pipe, prompt, subjects, guidance=guided, generator=torch.Generator().manual_seed(args.seed)
    )
    pictures[label] = box_overlay(out.images[0], boxes)
side_by_side(pictures, title=prompt).save("layout_boxes.png")
print("wrote layout_boxes.png")
