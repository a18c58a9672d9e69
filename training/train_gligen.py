"""Train a box-grounded (GLIGEN) shapes model on top of a trained shapes ``StableDiffusionPipeline``.

The base UNet becomes a diffusers GLIGEN UNet (``UNet2DConditionModel`` with
``attention_type="gated"``: a gated self-attention ``fuser`` in every transformer block and the
text-box ``position_net``), its weights copied over. As GLIGEN does, only the fusers and the position
net train; the base UNet, text encoder and VAE stay frozen. Each training scene comes with its true
boxes and phrases ("red circle"), encoded as the pipeline encodes them (the text encoder's pooled
output of each phrase). The fusers' gates (``alpha_attn``, ``alpha_dense``) start at 0 and get their
own learning rate (``--gate-lr``), so the grounding opens within a short CPU run.

Runs unchanged on a CPU (``python -m ait2i_ext.training.train_gligen``) and on GPUs
(``python -m ait2i_ext.training.launch -m ait2i_ext.training.train_gligen``). A checkpoint is written every
``--checkpoint-minutes`` and when ``--max-minutes`` runs out; ``--resume latest`` carries on from the
newest one. The result is a ``StableDiffusionGLIGENPipeline`` folder in fp16 (EMA weights of the
trained layers), loadable with the stock ``StableDiffusionGLIGENPipeline.from_pretrained``, with an
``ait2i.json`` holding the loss radii for this model.
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

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from ait2i_ext.adapters.layout import GLIGEN_MAX_BOXES
from tqdm.auto import tqdm

from ait2i_ext.shapes.data import DEFAULT_OBJECT_WEIGHTS, image_to_tensor, render_scene, sample_scene
from ait2i_ext.shapes.model import SHAPES_LOSS, default_model_path

from .train_shapes import EMA, _checkpoints, caption_ids, export_pipeline, lr_factor, resume_state, v_loss
from .warm_start import add_init_arguments, check_init_arguments, check_same_tensors, first_scene_seed

logger = logging.getLogger(__name__)

GLIGEN_SEED_OFFSET = 30_000_000  # scenes disjoint from the base model's training and from evaluation
TRAINED = ("fuser", "position_net")  # GLIGEN's new modules: the only ones that train
GATES = ("alpha_attn", "alpha_dense")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base", default=None, help="base StableDiffusionPipeline folder (default: the shipped model)"
    )
    p.add_argument("--output-dir", default="runs/gligen", help="checkpoints and the latest export")
    p.add_argument("--export-dir", default=None, help="final pipeline folder (default: OUTPUT_DIR/pipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=5e-4, help="fusers and position net")
    p.add_argument("--gate-lr", type=float, default=5e-3, help="the fusers' gates (alpha_attn, alpha_dense)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--decay-fraction", type=float, default=0.3, help="cosine decay over the last part")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="caption and boxes both dropped")
    p.add_argument("--grounding-dropout", type=float, default=0.1, help="boxes dropped, caption kept")
    p.add_argument(
        "--min-timestep",
        type=int,
        default=500,
        help="train on t in [MIN, 1000): the pipeline grounds only its first steps (scheduled sampling)",
    )
    p.add_argument(
        "--min-snr-gamma",
        type=float,
        default=0.0,
        help="min-SNR-gamma loss weighting; 0 (default): plain v-MSE. Min-SNR weights the noisiest steps, "
        "where the layout is decided, by ~0.01 and the grounding then learns nothing in a short run",
    )
    p.add_argument(
        "--gate-init",
        type=float,
        default=0.0,
        help="start every fuser gate at this value with the fusers' output layers at zero (the UNet still "
        "starts equal to the base, but the fusers get gradients from the first step); 0: GLIGEN's init",
    )
    p.add_argument(
        "--box-attention-weight",
        type=float,
        default=0.0,
        help="weight of the fusers' box-attention loss: each visual token inside a box attends to that "
        "box's object token, tokens outside every box do not (0: the v-loss alone, as GLIGEN)",
    )
    p.add_argument(
        "--object-weights",
        default="3,4,3",
        help="relative frequencies of training scenes with 1, 2 and 3 objects",
    )
    p.add_argument(
        "--probe-every", type=int, default=0, help="log the grounding gap every N steps (0: never)"
    )
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    add_init_arguments(
        p,
        "continue an exported GLIGEN pipeline folder (e.g. the shipped one): its fusers and position net "
        "(fp16 -> fp32) start the training and the EMA; the base UNet still comes from --base",
    )
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads when training on a CPU")
    args = p.parse_args(argv)
    try:
        args.object_weights = tuple(float(w) for w in args.object_weights.split(","))
        sample_scene(0, object_weights=args.object_weights)
    except ValueError:
        p.error(f"--object-weights {args.object_weights!r} is invalid: expected 3 weights >= 0, e.g. 3,4,3")
    checks = {
        "--steps": (args.steps >= 1, ">= 1"),
        "--batch-size": (args.batch_size >= 1, ">= 1"),
        "--lr": (args.lr > 0, "> 0"),
        "--gate-lr": (args.gate_lr > 0, "> 0"),
        "--caption-dropout": (0 <= args.caption_dropout < 1, "in [0, 1)"),
        "--grounding-dropout": (0 <= args.grounding_dropout < 1, "in [0, 1)"),
        "--min-timestep": (0 <= args.min_timestep < 1000, "in [0, 1000)"),
        "--min-snr-gamma": (args.min_snr_gamma >= 0, ">= 0"),
        "--ema-decay": (0 <= args.ema_decay < 1, "in [0, 1)"),
        "--gate-init": (-3 <= args.gate_init <= 3, "in [-3, 3]"),
        "--probe-every": (args.probe_every >= 0, ">= 0"),
        "--box-attention-weight": (args.box_attention_weight >= 0, ">= 0"),
    }
    for name, (ok, expected) in checks.items():
        if not ok:
            value = getattr(args, name[2:].replace("-", "_"))
            p.error(f"{name} {value} is out of range: expected {expected}")
    base = Path(args.base or default_model_path())
    if not (base / "model_index.json").exists():
        p.error(f"--base {str(base)!r} is not a diffusers pipeline folder (no model_index.json)")
    args.base = str(base)
    check_init_arguments(p, args, "model_index.json", "StableDiffusionGLIGENPipeline", "GLIGEN pipeline")
    if args.init_from is not None and args.gate_init:
        p.error("--gate-init would reset the fusers of --init-from: give one of them")
    return args


def gligen_pipeline_from(base):
    """A ``StableDiffusionGLIGENPipeline`` sharing ``base``'s VAE, text encoder, tokenizer and
    scheduler, with a GLIGEN copy of its UNet (new fusers and position net, randomly initialised).

    Args:
        base: a ``StableDiffusionPipeline``.

    Raises:
        ValueError: the base UNet's weights do not fit the GLIGEN UNet (other keys than the new
            ``fuser`` / ``position_net`` ones missing, or unexpected keys).
    """
    from diffusers import StableDiffusionGLIGENPipeline, UNet2DConditionModel

    config = {k: v for k, v in base.unet.config.items() if k != "_name_or_path"}  # no local paths
    unet = UNet2DConditionModel.from_config({**config, "attention_type": "gated"})
    missing, unexpected = unet.load_state_dict(base.unet.state_dict(), strict=False)
    not_new = [k for k in missing if not any(k.startswith(m) or f".{m}." in k for m in TRAINED)]
    if not_new or unexpected:
        raise ValueError(
            f"base UNet does not fit a GLIGEN UNet: missing {not_new[:5]}, unexpected {unexpected[:5]}"
        )
    unet.to(base.unet.dtype)
    return StableDiffusionGLIGENPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_grounding(unet, folder) -> int:
    """Copy the fusers' and position net's weights of the GLIGEN pipeline ``folder`` into ``unet``
    (cast to ``unet``'s dtype); the base UNet's weights stay ``unet``'s own. Returns the tensors copied.

    Raises:
        ValueError: ``folder``'s UNet is not a GLIGEN UNet of ``unet``'s shapes (other keys or shapes).
    """
    from diffusers import UNet2DConditionModel

    found = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    check_same_tensors(unet.state_dict(), found, folder, "GLIGEN UNet")
    new = {k: v for k, v in found.items() if k.startswith("position_net.") or ".fuser." in k}
    unet.load_state_dict(new, strict=False)
    return len(new)


def trainable_parameters(unet) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """``(layers, gates)``: the fusers' and position net's parameters, the gates apart; all else frozen."""
    unet.requires_grad_(False)
    layers, gates = [], []
    for name, param in unet.named_parameters():
        if name.startswith("position_net.") or ".fuser." in name:
            param.requires_grad_(True)
            (gates if name.rsplit(".", 1)[-1] in GATES else layers).append(param)
    return layers, gates


def open_gates(unet, value: float) -> int:
    """Start every fuser's gates at ``value`` and its attention and feed-forward outputs at zero.

    GLIGEN starts the gates at 0, so ``x + tanh(alpha) * attn(...)`` passes no gradient to the fusers'
    weights until the gates open: in a short run they barely learn. Zero outputs behind open gates keep
    the UNet equal to the base at the start (as ControlNet's zero convolutions do) while the output
    layers get gradients at once. Returns the number of fusers changed.
    """
    from diffusers.models.attention import GatedSelfAttentionDense

    fusers = [m for m in unet.modules() if isinstance(m, GatedSelfAttentionDense)]
    with torch.no_grad():
        for fuser in fusers:
            fuser.alpha_attn.fill_(value)
            fuser.alpha_dense.fill_(value)
            last = [m for m in fuser.ff.net if isinstance(m, torch.nn.Linear)][-1]
            for layer in (fuser.attn.to_out[0], last):
                layer.weight.zero_()
                layer.bias.zero_()
    return len(fusers)


class KeepProbs:
    """A fuser attention processor that computes what diffusers' ``AttnProcessor`` computes and keeps
    the attention probabilities ``(batch * heads, tokens, tokens)`` for the box-attention loss.
    Training only: the exported folder stores weights, not processors."""

    def __init__(self) -> None:
        self.probs = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q, k, v = (attn.head_to_batch_dim(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        self.probs = attn.get_attention_scores(q, k, None)
        out = attn.batch_to_head_dim(torch.bmm(self.probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def keep_fuser_probs(unet) -> list[KeepProbs]:
    """Give every fuser's attention a :class:`KeepProbs` processor; returns them."""
    from diffusers.models.attention import GatedSelfAttentionDense

    kept = []
    for module in unet.modules():
        if isinstance(module, GatedSelfAttentionDense):
            kept.append(KeepProbs())
            module.attn.set_processor(kept[-1])
    return kept


def box_attention_loss(kept: list[KeepProbs], grounding: dict) -> torch.Tensor:
    """Mean over the fusers of ``(1 - in)^2`` for visual tokens inside a box, ``in`` their attention
    (averaged over heads) on the object tokens whose box holds them, plus ``out^2`` for tokens outside
    every box, ``out`` their attention on all real object tokens (layout guidance's energy, here as a
    training loss: it teaches the fusers to find each token's box)."""
    boxes, masks = grounding["boxes"], grounding["masks"]
    batch, objects = masks.shape
    losses = []
    for keep in kept:
        probs, keep.probs = keep.probs, None  # consumed: no graph left behind in the modules
        visual = probs.shape[1] - objects
        side = int(round(visual**0.5))
        probs = probs.view(batch, -1, probs.shape[1], probs.shape[2]).mean(1)[:, :visual, visual:]
        centre = (torch.arange(side, device=probs.device, dtype=probs.dtype) + 0.5) / side
        y, x = (c.flatten() for c in torch.meshgrid(centre, centre, indexing="ij"))
        inside = (
            (x[None, :, None] >= boxes[:, None, :, 0])
            & (x[None, :, None] <= boxes[:, None, :, 2])
            & (y[None, :, None] >= boxes[:, None, :, 1])
            & (y[None, :, None] <= boxes[:, None, :, 3])
            & (masks[:, None, :] > 0)
        ).to(probs.dtype)  # (batch, visual, objects)
        in_any = inside.amax(-1)
        mass_in = (probs * inside).sum(-1)
        mass_real = (probs * masks[:, None, :]).sum(-1)
        per_token = in_any * (1 - mass_in).square() + (1 - in_any) * mass_real.square()
        grounded = (masks.sum(-1) > 0).to(probs.dtype)[:, None]
        losses.append((per_token * grounded).sum() / (grounded.sum() * visual).clamp(min=1))
    return torch.stack(losses).mean()


def turned_layouts(layouts: list[tuple[list[str], list]]) -> list[tuple[list[str], list]]:
    """The same phrases with every box turned half a circle about the image centre (wrong places)."""
    return [(ps, [(1 - x1, 1 - y1, 1 - x0, 1 - y0) for x0, y0, x1, y1 in bs]) for ps, bs in layouts]


@torch.no_grad()
def grounding_gap(pipe, unet, scenes: int = 32, timesteps=(950, 800, 650), seed: int = 40_000_000) -> dict:
    """How much the UNet uses the boxes: its v-loss on held-out scenes (2-3 objects, seeds
    ``seed ..``) with their true boxes and with the boxes turned half a circle, per timestep.

    Returns ``{t: (loss_true, loss_turned)}``; ``loss_turned > loss_true`` means the boxes steer it.
    """
    device = next(unet.parameters()).device
    pixels, captions, layouts = [], [], []
    for s in range(seed, seed + scenes):
        scene = sample_scene(s, object_weights=(0, 1, 1))
        pixels.append(image_to_tensor(render_scene(scene)))
        captions.append(scene.caption)
        layouts.append(([o.phrase for o in scene.objects], [o.box for o in scene.objects]))
    latents = (
        pipe.vae.encode(torch.stack(pixels).to(device)).latent_dist.mean * pipe.vae.config.scaling_factor
    )
    context = pipe.text_encoder(caption_ids(pipe.tokenizer, captions, device))[0]
    inputs = {"true": grounding_inputs(pipe, layouts, device)}
    inputs["turned"] = grounding_inputs(pipe, turned_layouts(layouts), device)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    was_training = unet.training
    unet.eval()
    gaps = {}
    for step in timesteps:
        t = torch.full((latents.shape[0],), step, device=device)
        noisy = pipe.scheduler.add_noise(latents, noise, t)
        target = pipe.scheduler.get_velocity(latents, noise, t)
        losses = []
        for grounding in inputs.values():
            pred = unet(noisy, t, context, cross_attention_kwargs={"gligen": grounding}).sample
            losses.append(torch.nn.functional.mse_loss(pred.float(), target.float()).item())
        gaps[step] = tuple(losses)
    unet.train(was_training)
    return gaps


def log_gap(step: int, gaps: dict) -> None:
    text = ", ".join(f"t={t}: {a:.4f} vs {b:.4f} ({100 * (b - a) / a:+.1f} %)" for t, (a, b) in gaps.items())
    logger.info("step %d grounding gap (loss true vs turned boxes): %s", step, text)


def scene_batch(
    first_seed: int,
    size: int,
    caption_dropout: float,
    grounding_dropout: float,
    object_weights: tuple[float, float, float] = DEFAULT_OBJECT_WEIGHTS,
):
    """Scenes ``first_seed ..``: pixel tensors, captions and per scene its ``(phrases, boxes)``.

    Dropout draws come from the scene seed, so a batch is the same on every run. A dropped caption
    also drops the boxes (the pipeline's unconditional branch has neither); a dropped grounding keeps
    the caption and gives no boxes.
    """
    pixels, captions, layouts = [], [], []
    for seed in range(first_seed, first_seed + size):
        scene = sample_scene(seed, object_weights=object_weights)
        draw = random.Random(seed * 7919 + 3)
        drop_caption = draw.random() < caption_dropout
        drop_boxes = drop_caption or draw.random() < grounding_dropout
        pixels.append(image_to_tensor(render_scene(scene)))
        captions.append("" if drop_caption else scene.caption)
        layouts.append(
            ([], []) if drop_boxes else ([o.phrase for o in scene.objects], [o.box for o in scene.objects])
        )
    return torch.stack(pixels), captions, layouts


@torch.no_grad()
def grounding_inputs(pipe, layouts: list[tuple[list[str], list]], device) -> dict:
    """The ``cross_attention_kwargs["gligen"]`` of a batch, built as the GLIGEN pipeline builds it:
    each phrase's pooled text feature, its box and a mask, padded to 30 objects."""
    batch, dim = len(layouts), pipe.unet.config.cross_attention_dim
    boxes = torch.zeros(batch, GLIGEN_MAX_BOXES, 4, device=device)
    embeddings = torch.zeros(batch, GLIGEN_MAX_BOXES, dim, device=device)
    masks = torch.zeros(batch, GLIGEN_MAX_BOXES, device=device)
    phrases = sorted({p for ps, _ in layouts for p in ps})
    if phrases:
        tokens = pipe.tokenizer(phrases, padding=True, return_tensors="pt").to(device)
        pooled = dict(zip(phrases, pipe.text_encoder(**tokens).pooler_output.float(), strict=True))
        for i, (ps, bs) in enumerate(layouts):
            for j, (phrase, box) in enumerate(zip(ps, bs, strict=True)):
                boxes[i, j] = torch.tensor(box)
                embeddings[i, j] = pooled[phrase]
                masks[i, j] = 1
    return {"boxes": boxes, "positive_embeddings": embeddings, "masks": masks}


def write_settings(path: Path) -> None:
    """The ``ait2i.json`` of the exported folder: the loss radii sized to this model's objects."""
    radii = {
        "radius_mode": SHAPES_LOSS.radius_mode,
        "aggregation_radius": SHAPES_LOSS.aggregation_radius,
        "alignment_radius": SHAPES_LOSS.alignment_radius,
    }
    (path / "ait2i.json").write_text(json.dumps({"loss": radii}, indent=2) + "\n")


class Progress:
    """The step counter, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def main(argv: list[str] | None = None) -> Path:
    from diffusers import StableDiffusionPipeline

    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    export_dir = Path(args.export_dir) if args.export_dir else output_dir / "pipeline"
    accelerator = Accelerator()
    if accelerator.is_main_process:  # the recipe, next to its checkpoints
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if accelerator.device.type == "cpu" and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    set_seed(args.seed)

    base = StableDiffusionPipeline.from_pretrained(args.base, torch_dtype=torch.float32, safety_checker=None)
    pipe = gligen_pipeline_from(base)
    vae, unet, text_encoder, scheduler = pipe.vae, pipe.unet, pipe.text_encoder, pipe.scheduler
    vae.requires_grad_(False).eval().to(accelerator.device)
    text_encoder.requires_grad_(False).eval().to(accelerator.device)
    if args.init_from:
        copied = load_grounding(unet, args.init_from)
        logger.info("fusers and position net from %s (%d tensors)", args.init_from, copied)
    if args.gate_init:
        open_gates(unet, args.gate_init)
    kept = keep_fuser_probs(unet) if args.box_attention_weight else []
    layers, gates = trainable_parameters(unet)
    params = layers + gates
    opt = torch.optim.AdamW(
        [{"params": layers, "lr": args.lr}, {"params": gates, "lr": args.gate_lr}],
        weight_decay=0.0,
        betas=(0.9, 0.99),
    )
    base_lrs = [args.lr, args.gate_lr]
    unet, opt = accelerator.prepare(unet, opt)
    ema = EMA(params, args.ema_decay)
    progress = Progress()
    accelerator.register_for_checkpointing(ema, progress)
    path = resume_state(accelerator, output_dir, args.resume)
    if path is not None:
        logger.info("resumed from %s (step %d)", path, progress.step)

    start = last_ckpt = time.monotonic()
    scaling = vae.config.scaling_factor

    def export(path: Path) -> None:
        export_pipeline(pipe, ema, params, scaling, path)
        write_settings(path)

    def save_checkpoint() -> None:
        nonlocal last_ckpt
        last_ckpt = time.monotonic()
        accelerator.save_state(str(output_dir / "checkpoints" / f"checkpoint-{progress.step}"))
        if accelerator.is_main_process:
            for old in _checkpoints(output_dir)[: -args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            export(output_dir / "pipeline-latest")
        accelerator.wait_for_everyone()

    unet.train()
    alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device)
    snr_all = alphas_cumprod / (1.0 - alphas_cumprod)
    bar = tqdm(
        total=args.steps,
        initial=progress.step,
        desc="gligen",
        disable=not accelerator.is_main_process,
        mininterval=10,
    )
    finished = progress.step >= args.steps
    while not finished:
        first = first_scene_seed(
            GLIGEN_SEED_OFFSET, args.init_step + progress.step, accelerator, args.batch_size
        )
        pixels, captions, layouts = scene_batch(
            first, args.batch_size, args.caption_dropout, args.grounding_dropout, args.object_weights
        )
        factor = lr_factor(progress.step, args.steps, args.warmup_steps, args.decay_fraction)
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = lr * factor
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + progress.step)
        with torch.no_grad():
            latents = vae.encode(pixels.to(accelerator.device)).latent_dist.mean * scaling
            ids = caption_ids(pipe.tokenizer, captions, accelerator.device)
            context = text_encoder(ids)[0]
            grounding = grounding_inputs(pipe, layouts, accelerator.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        t = torch.randint(
            args.min_timestep, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        )
        t = t.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        pred = unet(noisy, t, context, cross_attention_kwargs={"gligen": grounding}).sample
        loss = v_loss(pred, target, snr_all[t], args.min_snr_gamma)
        if kept:
            attention = box_attention_loss(kept, grounding)
            loss = loss + args.box_attention_weight * attention
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(params)
        progress.step += 1
        bar.update(1)
        gate = torch.stack([g.detach().abs() for g in gates]).mean().item()
        extra = {"box_attn": f"{attention.item():.3f}"} if kept else {}
        bar.set_postfix(loss=f"{loss.item():.4f}", gate=f"{gate:.3f}", **extra, refresh=False)
        finished = progress.step >= args.steps
        if accelerator.is_main_process and args.probe_every and progress.step % args.probe_every == 0:
            log_gap(args.init_step + progress.step, grounding_gap(pipe, accelerator.unwrap_model(unet)))
        if finished or (args.max_minutes is not None and time.monotonic() - start > args.max_minutes * 60):
            break
        if time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    if finished and accelerator.is_main_process:
        export(export_dir)
        logger.info("exported %s after %.1f minutes", export_dir, (time.monotonic() - start) / 60)
    accelerator.wait_for_everyone()
    return export_dir


def cli(argv: list[str] | None = None) -> int:
    """Console entry point (``ait2i-train-gligen``): :func:`main` with an exit code."""
    main(argv)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
