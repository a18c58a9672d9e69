"""Captured attention: processors that record cross-attention probabilities, and their store.

Only the cross-attention layers at the resolution the losses read get a recording processor;
every other layer keeps its processor (the fused SDPA kernel). The processors are installed and
the originals restored by :func:`capture_attention`, a context manager whose ``finally`` puts the
originals back, also when the forward pass raises.

Layer resolutions come from the UNet's structure (which blocks down- or up-sample), not from
counting calls, so the store knows before the first forward which layers to record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# --- which layers, at which resolution ------------------------------------------------------


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention layer of a UNet: its processor name and its downsampling factor."""

    name: str  # e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    factor: int  # map side = ceil(latent side / factor)
    order: tuple[int, int, int]  # execution order key: (stage, block, position)


def _block_factors(unet) -> dict[str, int]:
    factors, f = {}, 1
    for i, block in enumerate(unet.down_blocks):
        factors[f"down_blocks.{i}"] = f
        if getattr(block, "downsamplers", None) is not None:
            f *= 2
    factors["mid_block"] = f
    for i, block in enumerate(unet.up_blocks):
        factors[f"up_blocks.{i}"] = f
        if getattr(block, "upsamplers", None) is not None:
            f //= 2
    return factors


def cross_attention_layers(unet) -> list[CrossAttentionLayer]:
    """Every cross-attention (``attn2``) layer of a diffusers UNet, in execution order."""
    factors = _block_factors(unet)
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    layers = []
    for position, name in enumerate(unet.attn_processors):
        if ".attn2." not in name:
            continue
        parts = name.split(".")
        block = parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])
        if block not in factors:
            continue
        idx = 0 if parts[0] == "mid_block" else int(parts[1])
        layers.append(CrossAttentionLayer(name, factors[block], (stage[parts[0]], idx, position)))
    return sorted(layers, key=lambda layer: layer.order)


def map_shape(latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    return math.ceil(latent_hw[0] / factor), math.ceil(latent_hw[1] / factor)


def select_factor(unet, latent_hw: tuple[int, int], resolution: int | None = None) -> int:
    """The downsampling factor whose maps the losses read.

    ``resolution=None`` picks the cross-attention resolution whose longer side is closest to 16
    (ties: the larger maps); an explicit ``resolution`` must exist in the UNet.
    """
    factors = sorted({layer.factor for layer in cross_attention_layers(unet)})
    if not factors:
        raise ValueError("the UNet has no cross-attention (attn2) layers: nothing to guide")
    sides = {f: max(map_shape(latent_hw, f)) for f in factors}
    if resolution is None:
        return min(factors, key=lambda f: (abs(sides[f] - 16), -sides[f]))
    for f in factors:
        if sides[f] == resolution:
            return f
    raise ValueError(
        f"attention_resolution={resolution!r} does not exist in this UNet for latents {latent_hw}: "
        f"cross-attention layers have map sides {sorted(set(sides.values()))}"
    )


# --- the store and the processor ------------------------------------------------------------


class AttentionStore:
    """Cross-attention probabilities keyed by layer name, overwritten on every forward pass.

    Each entry is ``(B, H*W, T)``: softmax(QK^T / sqrt(d)) averaged over heads. With
    ``detach=False`` the autograd graph is kept so losses can be differentiated w.r.t. the latents.
    """

    def __init__(self, layer_names: list[str], shape: tuple[int, int], detach: bool = False):
        self.layer_names = list(layer_names)
        self.shape = shape
        self.detach = detach
        self._probs: dict[str, torch.Tensor] = {}

    def record(self, name: str, probs: torch.Tensor) -> None:
        self._probs[name] = probs.detach() if self.detach else probs

    def clear(self) -> None:
        self._probs.clear()

    def __len__(self) -> int:
        return len(self._probs)

    def maps(self, batch: slice | None = None) -> torch.Tensor:
        """Maps averaged over the captured layers: ``(B, H, W, T)`` float32.

        Args:
            batch: optional slice of the batch to keep (e.g. the conditional half of a CFG pass).

        Raises:
            RuntimeError: nothing was captured at this resolution, naming the layers expected.
        """
        if not self._probs:
            raise RuntimeError(
                f"no cross-attention was captured at {self.shape[0]}x{self.shape[1]}: expected layers "
                f"{self.layer_names}, saw none (was the UNet called inside capture_attention?)"
            )
        probs = [p if batch is None else p[batch] for p in self._probs.values()]
        mean = torch.stack([p.float() for p in probs]).mean(0)
        b, n, t = mean.shape
        h, w = self.shape
        if n != h * w:
            raise RuntimeError(f"captured maps have {n} positions, expected {h}x{w}={h * w}")
        return mean.reshape(b, h, w, t)


class CaptureProcessor:
    """Cross-attention that records its probabilities in a store; the output equals the stock one.

    Records ``softmax(QK^T * scale + mask)`` averaged over heads and otherwise follows diffusers'
    ``AttnProcessor2_0`` step for step (fused SDPA for the output).
    """

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_len = context.shape[0], context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # The probabilities are recorded from their own product; the output is the fused kernel's,
        # so a layer under capture returns exactly what the stock processor returns.
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        self.store.record(self.name, scores.softmax(dim=-1, dtype=torch.float32).mean(dim=1))
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# --- install and restore --------------------------------------------------------------------


class StopForward(Exception):
    """Raised after the last captured layer when the rest of the UNet pass is not needed."""


def _module(unet, processor_name: str):
    return unet.get_submodule(processor_name.removesuffix(".processor"))


@contextmanager
def capture_attention(
    unet,
    latent_hw: tuple[int, int] | int,
    resolution: int | None = None,
    detach: bool = False,
    stop_early: bool = False,
    after_last: Callable[[], None] | None = None,
) -> Iterator[AttentionStore]:
    """Record cross-attention maps of ``unet`` at one resolution while the block runs.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (LoRA layers loaded or not).
        latent_hw: ``(h, w)`` of the latents the UNet will see (or one int for square latents).
        resolution: side of the maps to record; ``None`` picks the one closest to 16.
        detach: drop the autograd graph of the recorded maps (plain observation).
        stop_early: raise :class:`StopForward` right after the last recorded layer, so a caller
            that only needs the maps skips the rest of the UNet (catch it around the call).
        after_last: called right after the last recorded layer (e.g. to switch grad off for the
            rest of the pass), before ``stop_early`` applies.

    Yields:
        The :class:`AttentionStore`; read it with ``store.maps()``.
    """
    if isinstance(latent_hw, int):
        latent_hw = (latent_hw, latent_hw)
    factor = select_factor(unet, latent_hw, resolution)
    layers = [layer for layer in cross_attention_layers(unet) if layer.factor == factor]
    store = AttentionStore([layer.name for layer in layers], map_shape(latent_hw, factor), detach=detach)
    # Only the recorded layers change processor: the rest of the UNet is never touched.
    modules = [_module(unet, layer.name) for layer in layers]
    originals = [module.processor for module in modules]

    def _after_last(module, args, output):
        if after_last is not None:
            after_last()
        if stop_early:
            raise StopForward

    hook = modules[-1].register_forward_hook(_after_last) if (stop_early or after_last) else None
    try:
        for module, layer in zip(modules, layers):
            module.set_processor(CaptureProcessor(store, layer.name))
        yield store
    finally:
        if hook is not None:
            hook.remove()
        for module, original in zip(modules, originals):
            module.set_processor(original)
