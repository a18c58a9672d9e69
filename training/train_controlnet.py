"""Train an edge-controlled (Canny) ControlNet for the shipped shapes model.

The ControlNet is ``ControlNetModel.from_unet`` of the shipped UNet (its encoder weights copied, the
zero convolutions at 0) with a conditioning embedding of three stages, which downsamples the 64 px
edge map by 4 to the 16x16 latents of the 4x VAE. The base UNet, VAE and text encoder stay frozen.
The control image of a training scene is the built-in Canny (``canny_edges``) of the rendered scene,
so ``--control canny:scene.png`` at sampling time sees the same kind of image.

Runs on a CPU (``python -m ait2i_ext.training.train_controlnet``) and with ``accelerate launch``.
A checkpoint is written every ``--checkpoint-minutes`` and when ``--max-minutes`` runs out;
``--resume latest`` carries on from the newest one. Every ``--eval-every`` steps a few held-out
scenes are sampled from their edge maps and read back by the shapes evaluator: ``control`` is the
fraction of their objects drawn with the right shape at the right place (IoU >= 0.5). ControlNets
are known to pick up control suddenly after many steps; this measures when it happens. The finished
ControlNet is exported in fp16 (``--export-dir``), loadable with ``ControlNetModel.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from ait2i_ext.adapters.controlnet import canny_edges
from ait2i_ext.training.train_shapes import (
    Progress,
    _checkpoints,
    caption_ids,
    lr_factor,
    resume_state,
    v_loss,
)
from ait2i_ext.training.warm_start import (
    add_init_arguments,
    check_init_arguments,
    check_same_tensors,
    first_scene_seed,
)
from tqdm.auto import tqdm

from ait2i_ext.shapes.data import image_to_tensor, render_scene, sample_scene
from ait2i_ext.shapes.evaluator import box_iou, detect
from ait2i_ext.shapes.model import default_model_path

logger = logging.getLogger(__name__)

TRAIN_SEED_OFFSET = 30_000_000  # disjoint from train_shapes' scenes and from evaluation seeds
EVAL_SEED_OFFSET = 40_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="base pipeline folder (default: the shipped shapes model)")
    p.add_argument("--output-dir", default="runs/controlnet", help="checkpoints and the latest export")
    p.add_argument(
        "--export-dir", default=None, help="final ControlNet folder (default: OUTPUT_DIR/controlnet)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3, help="high on purpose: control appears sooner")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--decay-fraction", type=float, default=0.3, help="cosine decay over the last part")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument(
        "--timesteps",
        default="cubic",
        choices=("cubic", "uniform"),
        help="cubic favours noisy steps, where the layout is decided (T2I-Adapter's sampling)",
    )
    p.add_argument(
        "--eval-every", type=int, default=100, help="steps between control measurements (0: never)"
    )
    p.add_argument("--eval-scenes", type=int, default=12)
    p.add_argument("--eval-steps", type=int, default=12, help="DDIM steps of the evaluation samples")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    add_init_arguments(
        p,
        "continue an exported ControlNet folder (e.g. the shipped one): its weights (fp16 -> fp32) start "
        "the training; the frozen base still comes from --base",
    )
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads when training on a CPU")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "eval_scenes", "eval_steps", "cpu_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: expected >= 1")
    if args.lr <= 0:
        p.error(f"--lr {args.lr} is invalid: expected > 0")
    if not 0.0 <= args.caption_dropout < 1.0:
        p.error(f"--caption-dropout {args.caption_dropout} is invalid: expected in [0, 1)")
    if args.base is not None and not Path(args.base).is_dir():
        p.error(f"--base {args.base!r} does not exist: expected a StableDiffusionPipeline folder")
    check_init_arguments(p, args, "config.json", "ControlNetModel", "ControlNet")
    return args


def control_tensor(image) -> torch.Tensor:
    """Edge map of a rendered scene as the ControlNet sees it: ``(3, H, W)`` in [0, 1]."""
    edges = np.asarray(canny_edges(image), dtype=np.float32) / 255.0
    return torch.from_numpy(edges).permute(2, 0, 1).contiguous()


def training_example(seed: int, caption_dropout: float) -> dict:
    """Scene ``seed``: its image in [-1, 1], its Canny edge map in [0, 1] and its caption."""
    scene = sample_scene(seed)
    image = render_scene(scene)
    drop = random.Random(seed * 7919 + 3).random() < caption_dropout
    return {
        "pixel_values": image_to_tensor(image),
        "control": control_tensor(image),
        "caption": "" if drop else scene.caption,
    }


def control_rate(images, scenes) -> float:
    """Fraction of the scenes' objects found with their shape at their box (IoU >= 0.5), any colour."""
    hits = total = 0
    for image, scene in zip(images, scenes, strict=True):
        detections = detect(image)
        for obj in scene.objects:
            total += 1
            hits += any(d.shape == obj.shape and box_iou(d.box, obj.box) >= 0.5 for d in detections)
    return hits / total


def sample_timesteps(n: int, num_train_timesteps: int, kind: str, device) -> torch.Tensor:
    """``n`` training timesteps: uniform, or ``cubic`` (``T (1 - u^3)``, most of them noisy)."""
    if kind == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), device=device)
    u = torch.rand(n, device=device)
    return ((1.0 - u**3) * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Conditioning embedding channels whose stride-2 convolutions (one between two entries) shrink
    the control image by ``vae_scale_factor``: ``(16, 32, 64)`` for the shapes model's 4x VAE."""
    stages = int(vae_scale_factor).bit_length()  # log2(factor) + 1 for a power of two
    if vae_scale_factor < 1 or 2 ** (stages - 1) != vae_scale_factor:
        raise ValueError(f"vae_scale_factor={vae_scale_factor} is invalid: expected a power of two")
    return tuple(16 * 2**k for k in range(stages))


def build_controlnet(unet, vae_scale_factor: int):
    """``ControlNetModel.from_unet`` (encoder weights copied, zero convolutions at 0) with a
    conditioning embedding that downsamples by ``vae_scale_factor``."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_channels(vae_scale_factor)
    )


def load_controlnet_weights(controlnet, folder) -> None:
    """Copy the weights of the exported ControlNet ``folder`` into ``controlnet`` (cast to its dtype).

    Raises:
        ValueError: ``folder``'s ControlNet has other keys or shapes than ``controlnet`` (the
            ControlNet of ``--base``), e.g. one trained for another base model.
    """
    from diffusers import ControlNetModel

    found = ControlNetModel.from_pretrained(folder).state_dict()
    check_same_tensors(controlnet.state_dict(), found, folder, "ControlNet")
    controlnet.load_state_dict(found)


def main(argv: list[str] | None = None) -> Path:
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    export_dir = Path(args.export_dir) if args.export_dir else output_dir / "controlnet"
    accelerator = Accelerator()
    if accelerator.is_main_process:  # the recipe, next to its checkpoints
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    set_seed(args.seed)

    base = StableDiffusionPipeline.from_pretrained(
        args.base or default_model_path(), torch_dtype=torch.float32
    )
    vae, unet, text_encoder, tokenizer, scheduler = (
        base.vae,
        base.unet,
        base.text_encoder,
        base.tokenizer,
        base.scheduler,
    )
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False).eval().to(accelerator.device)
    controlnet = build_controlnet(unet, base.vae_scale_factor)
    if args.init_from:
        load_controlnet_weights(controlnet, args.init_from)
        logger.info("ControlNet weights from %s (trained %d steps)", args.init_from, args.init_step)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=0.0)
    controlnet, opt = accelerator.prepare(controlnet, opt)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if resume_state(accelerator, output_dir, args.resume):
        logger.info("resumed at step %d", progress.unet_step)

    sampler = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=accelerator.unwrap_model(controlnet),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sampler.set_progress_bar_config(disable=True)
    eval_scenes = [sample_scene(EVAL_SEED_OFFSET + k) for k in range(args.eval_scenes)]

    @torch.no_grad()
    def measure_control() -> float:
        controlnet.eval()
        images = [
            sampler(
                scene.caption,
                image=canny_edges(render_scene(scene)),
                num_inference_steps=args.eval_steps,
                generator=torch.Generator().manual_seed(k),
            ).images[0]
            for k, scene in enumerate(eval_scenes)
        ]
        controlnet.train()
        return control_rate(images, eval_scenes)

    start = last_ckpt = time.monotonic()

    def save_checkpoint() -> None:
        nonlocal last_ckpt
        last_ckpt = time.monotonic()
        accelerator.save_state(str(output_dir / "checkpoints" / f"checkpoint-{progress.unet_step}"))
        if accelerator.is_main_process:
            for old in _checkpoints(output_dir)[: -args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            export_controlnet(accelerator.unwrap_model(controlnet), output_dir / "controlnet-latest")
        accelerator.wait_for_everyone()

    alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device)
    snr_all = alphas_cumprod / (1.0 - alphas_cumprod)
    scaling = vae.config.scaling_factor
    controlnet.train()
    bar = tqdm(
        total=args.steps,
        initial=progress.unet_step,
        desc="controlnet",
        disable=not accelerator.is_main_process,
        mininterval=10,
    )
    while progress.unet_step < args.steps:
        step = progress.unet_step
        first = first_scene_seed(TRAIN_SEED_OFFSET, args.init_step + step, accelerator, args.batch_size)
        items = [training_example(first + i, args.caption_dropout) for i in range(args.batch_size)]
        pixels = torch.stack([it["pixel_values"] for it in items]).to(accelerator.device)
        control = torch.stack([it["control"] for it in items]).to(accelerator.device)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup_steps, args.decay_fraction)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean * scaling
            text = text_encoder(caption_ids(tokenizer, [it["caption"] for it in items], accelerator.device))[
                0
            ]
        noise = torch.randn_like(latents)
        t = sample_timesteps(
            latents.shape[0], scheduler.config.num_train_timesteps, args.timesteps, latents.device
        )
        noisy = scheduler.add_noise(latents, noise, t)
        down, mid = controlnet(noisy, t, text, controlnet_cond=control, return_dict=False)
        pred = unet(
            noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        target = scheduler.get_velocity(latents, noise, t)
        loss = v_loss(pred, target, snr_all[t], args.min_snr_gamma)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        progress.unet_step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if accelerator.is_main_process and progress.unet_step % 25 == 0:
            logger.info("step %d loss %.4f", progress.unet_step, loss.item())
        if accelerator.is_main_process and args.eval_every and progress.unet_step % args.eval_every == 0:
            total = args.init_step + progress.unet_step
            logger.info("step %d (%d in all) control %.3f", progress.unet_step, total, measure_control())
        if args.max_minutes is not None and time.monotonic() - start > args.max_minutes * 60:
            break
        if time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    if progress.unet_step >= args.steps and accelerator.is_main_process:
        export_controlnet(accelerator.unwrap_model(controlnet), export_dir)
        logger.info("exported %s after %.1f minutes", export_dir, (time.monotonic() - start) / 60)
    accelerator.wait_for_everyone()
    return export_dir


def export_controlnet(controlnet, path: Path) -> None:
    """Save an fp16 copy of ``controlnet`` (safetensors) to ``path``, replacing it atomically."""
    import copy

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(controlnet).to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def cli(argv: list[str] | None = None) -> int:
    """Console entry point (``ait2i-train-controlnet``): :func:`main` with an exit code."""
    main(argv)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
