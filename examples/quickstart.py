"""Guide a diffusers pipeline you already have: plain vs guided for the same seed.

python examples/quickstart.py                      # the shipped shapes-world model, on CPU
python examples/quickstart.py --model PATH_OR_ID   # your Stable Diffusion / SDXL checkpoint
"""

import argparse

import torch
from diffusers import DiffusionPipeline

from ait2i_ext import generate
from ait2i_ext.cli import default_model
from ait2i_ext.viz import attention_grid, side_by_side

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
parser.add_argument("--prompt", default="a red circle and a blue square")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

pipe = DiffusionPipeline.from_pretrained(
    args.model or default_model(), torch_dtype=torch.float32, safety_checker=None
)
runs = {}
for label, guided in [("plain", False), ("guided", True)]:
    out = generate(
        pipe,
        args.prompt,
        subjects=["red circle", "blue square"] if args.model is None else None,  # None: inferred
        guidance=guided,
        return_maps=True,
        generator=torch.Generator().manual_seed(args.seed),
        num_inference_steps=50,
    )
    runs[label] = out.images[0]
    attention_grid(out.images[0], out.group_maps(0)).save(f"quickstart_{label}_maps.png")
    if guided:
        print("loss per guided step:", [round(x, 3) for x in out.loss_curve()])
side_by_side(runs, title=args.prompt).save("quickstart_compare.png")
print("wrote quickstart_compare.png and quickstart_*_maps.png")
