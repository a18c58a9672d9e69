"""Train the shapes-world text-to-image model: first the VAE, then the UNet and text encoder together.

Runs unchanged on a CPU (``python -m ait2i_ext.training.train_shapes``) and on one or more GPUs
(``python -m ait2i_ext.training.launch -m ait2i_ext.training.train_shapes``). Seeds are fixed, so a run with the same arguments
and the same number of processes reproduces the same weights. A checkpoint is written every
``--checkpoint-minutes`` and when ``--max-minutes`` runs out; ``--resume latest`` carries on from
the newest one. The finished model is exported as a ``StableDiffusionPipeline`` folder in fp16
(``--export-dir``, EMA weights), loadable with ``StableDiffusionPipeline.from_pretrained``.

Recipe: the VAE learns L1 reconstruction of its posterior mean (plus a little noise) with a tiny KL
term; its posterior is then made deterministic and its latents scaled to unit standard deviation. The UNet predicts ``v`` under min-SNR-gamma weighting; the caption is replaced by
``""`` for ``--caption-dropout`` of the scenes so that classifier-free guidance has an unconditional
branch to push against.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ait2i_ext.config import write_model_settings
from ait2i_ext.shapes.data import DEFAULT_OBJECT_WEIGHTS, ShapesDataset
from ait2i_ext.shapes.model import SHAPES_LOSS, SHAPES_SCHEDULE, build_shapes_pipeline

logger = logging.getLogger(__name__)

VAE_SEED_OFFSET = 10_000_000  # VAE scenes are disjoint from the UNet's and from evaluation seeds
UNET_SEED_OFFSET = 20_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/shapes", help="checkpoints and the latest export")
    p.add_argument("--export-dir", default=None, help="final pipeline folder (default: OUTPUT_DIR/pipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch-size", type=int, default=16, help="per process")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--vae-latent-noise", type=float, default=0.05)
    p.add_argument("--scale-samples", type=int, default=2048, help="scenes measuring the latent scale")
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--decay-fraction", type=float, default=0.3, help="cosine decay over the last part")
    p.add_argument("--caption-dropout", type=float, default=0.15)
    p.add_argument(
        "--object-weights",
        type=float,
        nargs=3,
        default=list(DEFAULT_OBJECT_WEIGHTS),
        metavar=("ONE", "TWO", "THREE"),
        help="relative frequencies of UNet training scenes with 1, 2 and 3 objects",
    )
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="torch threads when training on a CPU (1 is fastest on a small machine shared with other jobs)",
    )
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    args = p.parse_args(argv)
    try:  # a bad mix fails now, not after the VAE phase
        ShapesDataset(1, object_weights=tuple(args.object_weights))
    except ValueError as e:
        p.error(f"--object-weights: {e}")
    return args


class EMA:
    """Exponential moving average of a list of parameters, with warm-up (decay grows with steps)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter]) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = [s.clone() for s in state["shadow"]]


class Progress:
    """Step counters of both phases and the latent scale, saved with every checkpoint."""

    def __init__(self) -> None:
        self.vae_step = 0
        self.unet_step = 0
        self.scaling_factor = 1.0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Linear warm-up, constant, then cosine decay to 10 % over the last ``decay_fraction`` of steps."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1.0 - decay_fraction))
    if step < decay_start:
        return 1.0
    t = (step - decay_start) / max(1, total - decay_start)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [
        p
        for p in (output_dir / "checkpoints").glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name)
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resume_state(accelerator, output_dir: Path, resume: str | None) -> Path | None:
    """Load ``--resume`` (``"latest"`` or a checkpoint folder) into the accelerator's registered state.

    Returns the checkpoint loaded, or ``None`` (no ``--resume``, or no checkpoint yet: a fresh start).
    """
    if not resume:
        return None
    ckpts = _checkpoints(output_dir)
    path = (ckpts[-1] if ckpts else None) if resume == "latest" else Path(resume)
    if path is None:
        logger.info("no checkpoint in %s: starting from scratch", output_dir)
        return None
    accelerator.load_state(str(path))
    return path


def caption_ids(tokenizer, captions: list[str], device) -> torch.Tensor:
    """``(B, 77)`` token ids of ``captions``, padded to the tokenizer's length as the pipelines pad."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def v_loss(pred: torch.Tensor, target: torch.Tensor, snr: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
    """Mean squared error on ``v``, each sample weighted by min-SNR-gamma (``gamma = 0``: unweighted).

    Args:
        pred, target: ``(B, C, H, W)`` predicted and true velocities.
        snr: ``(B,)`` signal-to-noise ratio of each sample's timestep.
    """
    weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1.0) if min_snr_gamma else torch.ones_like(snr)
    return (weight * F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))).mean()


def export_pipeline(
    pipe, ema: EMA, params: list[torch.nn.Parameter], scaling_factor: float, path: Path
) -> None:
    """Save a copy of ``pipe`` with the EMA weights in fp16 safetensors; ``pipe`` itself is untouched."""
    index = {id(p): i for i, p in enumerate(params)}
    shadow = {i: s for i, s in enumerate(ema.shadow)}
    modules = {}
    for name in ("vae", "unet", "text_encoder"):
        original = getattr(pipe, name)
        module = copy.deepcopy(original)
        with torch.no_grad():
            for p_orig, p_copy in zip(original.parameters(), module.parameters(), strict=True):
                if id(p_orig) in index:
                    p_copy.copy_(shadow[index[id(p_orig)]])
        modules[name] = module.to(torch.float16)
    modules["vae"].register_to_config(scaling_factor=scaling_factor)
    export = type(pipe)(
        **modules,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export.save_pretrained(tmp, safe_serialization=True)
    # Weights are stored in fp16 but the text encoder's config asks for float32, so a plain
    # from_pretrained (transformers defaults to dtype="auto") gives float32 modules that run on any CPU.
    te_config = tmp / "text_encoder" / "config.json"
    config = json.loads(te_config.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    te_config.write_text(json.dumps(config, indent=2) + "\n")
    # The model's ait2i settings travel with it: loss radii sized to its objects, its schedule.
    write_model_settings(
        tmp,
        loss={
            k: getattr(SHAPES_LOSS, k)
            for k in ("radius_mode", "aggregation_radius", "alignment_radius", "w_split")
        },
        schedule={k: getattr(SHAPES_SCHEDULE, k) for k in ("guided_fraction", "step_scale")},
    )
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    export_dir = Path(args.export_dir) if args.export_dir else output_dir / "pipeline"
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if accelerator.device.type == "cpu" and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    set_seed(args.seed)

    pipe = build_shapes_pipeline(seed=args.seed)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    scheduler = pipe.scheduler
    diffusion_params = list(unet.parameters()) + list(text_encoder.parameters())
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    opt = torch.optim.AdamW(diffusion_params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    # The VAE is trained through encode/decode, which a DDP wrapper does not expose: it stays
    # unwrapped and its gradients are averaged over processes by hand.
    vae = vae.to(accelerator.device)
    unet, text_encoder, vae_opt, opt = accelerator.prepare(unet, text_encoder, vae_opt, opt)
    accelerator.register_for_checkpointing(vae)
    ema = EMA(diffusion_params, args.ema_decay)
    progress = Progress()
    accelerator.register_for_checkpointing(ema, progress)

    path = resume_state(accelerator, output_dir, args.resume)
    if path is not None:
        logger.info(
            "resumed from %s (vae step %d, unet step %d)", path, progress.vae_step, progress.unet_step
        )

    start = last_ckpt = time.monotonic()

    def save_checkpoint() -> None:
        nonlocal last_ckpt
        last_ckpt = time.monotonic()
        step = progress.vae_step + progress.unet_step
        accelerator.save_state(str(output_dir / "checkpoints" / f"checkpoint-{step}"))
        if accelerator.is_main_process:
            for old in _checkpoints(output_dir)[: -args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            if progress.vae_step >= args.vae_steps and progress.unet_step > 0:
                export_pipeline(
                    pipe, ema, diffusion_params, progress.scaling_factor, output_dir / "pipeline-latest"
                )
        accelerator.wait_for_everyone()

    def out_of_time() -> bool:
        return args.max_minutes is not None and time.monotonic() - start > args.max_minutes * 60

    def batches(
        seed_offset: int,
        first_step: int,
        caption_dropout: float,
        batch_size: int,
        object_weights: tuple[float, ...] = DEFAULT_OBJECT_WEIGHTS,
    ):
        """Global batch ``k`` holds scenes ``seed_offset + k * batch_size * num_processes ...``."""
        step = first_step
        while True:
            first = seed_offset + (step * accelerator.num_processes + accelerator.process_index) * batch_size
            data = ShapesDataset(
                batch_size, seed_offset=first, caption_dropout=caption_dropout, object_weights=object_weights
            )
            items = [data[i] for i in range(batch_size)]
            pixels = torch.stack([it["pixel_values"] for it in items]).to(accelerator.device)
            yield pixels, [it["caption"] for it in items]
            step += 1

    # 1. VAE.
    if progress.vae_step < args.vae_steps:
        vae.train()
        bar = tqdm(
            total=args.vae_steps,
            initial=progress.vae_step,
            desc="vae",
            disable=not accelerator.is_main_process,
            mininterval=10,
        )
        for pixels, _ in batches(VAE_SEED_OFFSET, progress.vae_step, 0.0, args.vae_batch_size):
            posterior = vae.encode(pixels).latent_dist
            # Decode the posterior mean plus a little fixed noise: a freshly initialised posterior
            # has unit variance, and sampling from it slows the start of training many times over.
            latents = posterior.mean + args.vae_latent_noise * torch.randn_like(posterior.mean)
            recon = vae.decode(latents).sample
            rec_loss = F.l1_loss(recon.float(), pixels.float())
            loss = rec_loss + args.kl_weight * posterior.kl().mean()
            accelerator.backward(loss)
            if accelerator.num_processes > 1:
                for p in vae.parameters():
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            vae_opt.step()
            vae_opt.zero_grad(set_to_none=True)
            progress.vae_step += 1
            bar.update(1)
            bar.set_postfix(l1=f"{rec_loss.item():.4f}", refresh=False)
            if progress.vae_step >= args.vae_steps:
                break
            if out_of_time():
                save_checkpoint()
                return export_dir
            if time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
                save_checkpoint()
        bar.close()
        # Make the posterior deterministic (std e^-10), so ``latent_dist.sample()`` in other scripts
        # (img2img, DreamBooth/LoRA training) gives the mean the UNet was trained on.
        with torch.no_grad():
            half = vae.quant_conv.out_channels // 2
            vae.quant_conv.weight[half:].zero_()
            vae.quant_conv.bias[half:].fill_(-20.0)
        # Scale latents to unit standard deviation, measured on --scale-samples scenes.
        vae.eval()
        with torch.no_grad():
            stds = []
            for k, (pixels, _) in enumerate(batches(VAE_SEED_OFFSET - 100_000, 0, 0.0, args.batch_size)):
                stds.append(vae.encode(pixels).latent_dist.mean.float().std())
                if (k + 1) * args.batch_size * accelerator.num_processes >= args.scale_samples:
                    break
            std = accelerator.reduce(torch.stack(stds).mean(), reduction="mean")
        progress.scaling_factor = float(1.0 / std)
        logger.info("VAE trained: latent scaling factor %.4f", progress.scaling_factor)
        save_checkpoint()

    # 2. UNet + text encoder.
    vae.eval().requires_grad_(False)
    unet.train()
    text_encoder.train()
    alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device)
    snr_all = alphas_cumprod / (1.0 - alphas_cumprod)
    bar = tqdm(
        total=args.unet_steps,
        initial=progress.unet_step,
        desc="unet",
        disable=not accelerator.is_main_process,
        mininterval=10,
    )
    finished = progress.unet_step >= args.unet_steps
    if not finished:
        for pixels, captions in batches(
            UNET_SEED_OFFSET,
            progress.unet_step,
            args.caption_dropout,
            args.batch_size,
            tuple(args.object_weights),
        ):
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_factor(
                    progress.unet_step, args.unet_steps, args.warmup_steps, args.decay_fraction
                )
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.mean * progress.scaling_factor
            ids = caption_ids(tokenizer, captions, accelerator.device)
            noise = torch.randn_like(latents)
            t = torch.randint(
                0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
            )
            noisy = scheduler.add_noise(latents, noise, t)
            target = scheduler.get_velocity(latents, noise, t)
            with accelerator.autocast():
                pred = unet(noisy, t, text_encoder(ids)[0]).sample
            loss = v_loss(pred, target, snr_all[t], args.min_snr_gamma)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(diffusion_params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(diffusion_params)
            progress.unet_step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if progress.unet_step >= args.unet_steps:
                finished = True
                break
            if out_of_time():
                break
            if time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
                save_checkpoint()
    bar.close()
    save_checkpoint()
    if finished and accelerator.is_main_process:
        export_pipeline(pipe, ema, diffusion_params, progress.scaling_factor, export_dir)
        logger.info("exported %s after %.1f minutes", export_dir, (time.monotonic() - start) / 60)
    accelerator.wait_for_everyone()
    return export_dir


def cli(argv: list[str] | None = None) -> int:
    """Console entry point (``ait2i-train-shapes``): :func:`main` with an exit code."""
    main(argv)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
