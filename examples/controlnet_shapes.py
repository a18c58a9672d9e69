"""Edge control on the shipped shapes model: the shipped Canny ControlNet, plain and with ait2i.

    python examples/controlnet_shapes.py            # writes scene.png and controlnet_shapes.png

scene.png is the layout drawn as a shapes scene; its Canny edges are the control image (the same as
``ait2i generate ... --controlnet shapes --control canny:scene.png``). Each row is one seed: control
image | plain ControlNet | ControlNet + ait2i with the scene's boxes (each subject's box is where its
edges are: the ControlNet route's box settings apply, as ``benchmarks/alignment.py``'s
``controlnet-ait2i-boxes``), each marked right or wrong by the shapes evaluator.
"""

import argparse

import torch
from PIL import Image

from ait2i_ext import Subject, generate
from ait2i_ext.shapes import PromptObject, evaluate, load_controlnet_pipeline, render_scene, scene_edges
from ait2i_ext.shapes.data import Scene, ShapeObject
from ait2i_ext.viz import side_by_side

parser = argparse.ArgumentParser()
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
parser.add_argument("--steps", type=int, default=25)
parser.add_argument("--out", default="controlnet_shapes.png")
args = parser.parse_args()
torch.set_num_threads(1)

prompt = "a red circle, a blue square and a green triangle"
objects = (
    PromptObject("red", "circle", (0.06, 0.08, 0.44, 0.46)),
    PromptObject("blue", "square", (0.56, 0.12, 0.92, 0.48)),
    PromptObject("green", "triangle", (0.3, 0.56, 0.7, 0.96)),
)
render_scene(Scene(tuple(ShapeObject(o.colour, o.shape, o.box) for o in objects), prompt)).save("scene.png")
control = scene_edges(objects)
pipe = load_controlnet_pipeline()
pipe.set_progress_bar_config(disable=True)
subjects = [Subject(o.shape, attributes=(o.colour,), box=o.box) for o in objects]
rows = []
for seed in args.seeds:
    tiles = {"control (canny)": control}
    for label, guided in [("ControlNet", False), ("ControlNet + ait2i, boxes", True)]:
        image = generate(
            pipe,
            prompt,
            subjects,
            guidance=guided,
            image=control,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        mark = "right" if evaluate(image, objects).correct else "wrong"
        tiles[f"{label}: {mark}"] = image
    rows.append(side_by_side(tiles, title=f"seed {seed}", cell=192))
grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), (255, 255, 255))
for k, row in enumerate(rows):
    grid.paste(row, (0, k * rows[0].height))
grid.save(args.out)
print(f"wrote scene.png and {args.out}")
