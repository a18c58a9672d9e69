"""Captured attention: processors that record cross-attention probabilities, and their store.

Only the cross-attention layers at the resolution the losses read (down and up blocks, 1/32 of
the image side) get a recording processor, which wraps the layer's own processor: that one still
computes the output, the wrapper only records the probabilities. Every other layer is untouched.
The wrappers are installed and the originals restored by :func:`capture_attention`, a context
manager whose ``finally`` puts the originals back, also when the forward pass raises.

Layer resolutions come from the UNet's structure (which blocks down- or up-sample), not from
counting calls, so the store knows before the first forward which layers to record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# --- which layers, at which resolution ------------------------------------------------------


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention layer of a UNet: its processor name, block and downsampling factor."""

    name: str  # e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    factor: int  # map side = ceil(latent side / factor)
    order: tuple[int, int, int]  # execution order key: (stage, block, position)

    @property
    def in_mid_block(self) -> bool:
        return self.name.startswith("mid_block.")


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


def guided_layers(unet, blocks: str = "down_up") -> list[CrossAttentionLayer]:
    """The cross-attention layers the losses may read: those of the down and up blocks
    (``blocks="down"``: the down blocks only, so a pass that needs only the maps can stop before the
    mid block; ``AIT2IConfig.map_blocks``).

    The mid block never joins. On SD 1.x/2.x it runs at 1/64 of the image side, below every map
    the method reads; on SDXL it shares the 1/32 resolution (10 of its 60 layers there), and
    leaving it out keeps one rule for every UNet: the method's maps average the down- and
    up-block layers of one resolution (``docs/method.md``).
    """
    if blocks not in ("down_up", "down"):
        raise ValueError(f"blocks={blocks!r} is invalid: expected 'down_up' or 'down'")
    prefix = "down_blocks." if blocks == "down" else ""
    return [
        layer
        for layer in cross_attention_layers(unet)
        if not layer.in_mid_block and layer.name.startswith(prefix)
    ]


def map_shape(latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    return math.ceil(latent_hw[0] / factor), math.ceil(latent_hw[1] / factor)


#: The method reads the maps at 1/32 of the image side (16x16 for SD at 512 px, 24x24 at 768,
#: 32x32 for SDXL at 1024).
IMAGE_TO_MAP = 32
#: Fallback map side for UNets without layers at 1/32 of the image (small models with a VAE that
#: downsamples less than Stable Diffusion's 8, like the shipped 64 px shapes model), or when the
#: image size is not known.
FALLBACK_SIDE = 16


def select_factor(
    unet, latent_hw: tuple[int, int], resolution: int | None = None, vae_scale_factor: int | None = None
) -> int:
    """The downsampling factor (in latent cells) of the layers whose maps the losses read.

    Only down- and up-block layers count (:func:`guided_layers`). ``resolution=None`` picks the
    layers at 1/32 of the image side: latent factor ``32 / vae_scale_factor`` (4 for Stable
    Diffusion 1.x/2.x and SDXL, whose VAE downsamples by 8: 16x16 maps at 512 px, 24x24 at 768,
    32x32 at 1024). When the UNet has no layers there (a model with a smaller VAE factor, like
    the 64 px shapes model) or ``vae_scale_factor`` is not given, it picks the resolution whose
    longer side is closest to 16 (ties: the larger maps), which on SD and SDXL from 512 to
    1024 px is the same layers. An explicit ``resolution`` (map side) must exist in the down or up
    blocks.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        latent_hw: ``(h, w)`` of the latents.
        resolution: side of the maps to read, or ``None``.
        vae_scale_factor: image pixels per latent cell (the pipeline's ``vae_scale_factor``).
    """
    factors = sorted({layer.factor for layer in guided_layers(unet)})
    if not factors:
        raise ValueError(
            "the UNet has no cross-attention (attn2) layers in its down or up blocks: nothing to guide"
        )
    sides = {f: max(map_shape(latent_hw, f)) for f in factors}
    if resolution is None:
        if vae_scale_factor and IMAGE_TO_MAP / vae_scale_factor in factors:
            return IMAGE_TO_MAP // vae_scale_factor
        return min(factors, key=lambda f: (abs(sides[f] - FALLBACK_SIDE), -sides[f]))
    for f in factors:
        if sides[f] == resolution:
            return f
    raise ValueError(
        f"attention_resolution={resolution!r} does not exist in this UNet for latents {latent_hw}: "
        f"its down- and up-block cross-attention layers have map sides {sorted(set(sides.values()))}"
    )


def map_side(
    unet, latent_hw: tuple[int, int], resolution: int | None = None, vae_scale_factor: int | None = None
) -> int:
    """The longer side of the maps :func:`select_factor` picks (an explicit ``attention_resolution``)."""
    return max(map_shape(latent_hw, select_factor(unet, latent_hw, resolution, vae_scale_factor)))


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

    @property
    def recorded(self) -> dict[str, torch.Tensor]:
        """The last recorded ``(B, H*W, T)`` probabilities of each layer (a new dict)."""
        return dict(self._probs)

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


def attention_probabilities(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask=None,
    temb: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(QK^T * scale + mask)`` of a diffusers ``Attention`` layer, averaged over heads.

    The queries and keys are the layer's own (``to_q`` / ``to_k``, LoRA layers included, norms and
    mask prepared as ``AttnProcessor2_0`` prepares them); the scores and the softmax are computed
    in float32 whatever the layer's dtype (what ``upcast_attention`` asks for, and more: an fp16
    product of unscaled queries and keys can overflow).

    Returns:
        `torch.Tensor` of shape `(B, N, T)`, float32: ``N`` query positions, ``T`` keys.
    """
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
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
    key = attn.to_k(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    return scores.softmax(dim=-1).mean(dim=1)


def _readable_processors() -> tuple[type, ...]:
    """Processor classes whose text attention is ``softmax(QK^T * scale + mask)`` of the layer's own
    ``to_q`` / ``to_k`` (diffusers' standard ones), so that :func:`attention_probabilities` is what
    they compute."""
    from diffusers.models import attention_processor as ap

    names = (
        "AttnProcessor",
        "AttnProcessor2_0",
        "XFormersAttnProcessor",
        "SlicedAttnProcessor",
        "AttnProcessorNPU",
        "FusedAttnProcessor2_0",
    )
    return tuple(getattr(ap, name) for name in names if hasattr(ap, name))


def check_processor(name: str, processor) -> None:
    """Raise unless ``processor`` (on layer ``name``) is one whose attention capture can record.

    Raises:
        ValueError: naming the layer, the processor's class and the classes that are supported.
    """
    readable = _readable_processors()
    if type(processor) not in readable:
        raise ValueError(
            f"layer {name!r} uses {type(processor).__name__}, whose attention ait2i cannot read: expected "
            f"one of {sorted(cls.__name__ for cls in readable)} on the guided cross-attention layers "
            "(e.g. call pipe.unet.set_default_attn_processor(), or unload the IP-Adapter)"
        )


class CaptureProcessor:
    """Wraps a layer's own processor: records its attention probabilities, returns its output.

    The output is exactly what the wrapped processor returns (it runs unchanged); the recorded
    probabilities are :func:`attention_probabilities` of the same inputs, averaged over heads, in
    float32. Only processors that :func:`check_processor` accepts are wrapped.
    """

    def __init__(self, processor, store: AttentionStore, name: str):
        self.processor = processor
        self.store = store
        self.name = name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        probs = attention_probabilities(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.store.record(self.name, probs)
        return self.processor(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )


# --- install and restore --------------------------------------------------------------------


class StopForward(Exception):
    """Raised after the last captured layer when the rest of the UNet pass is not needed."""


def _module(unet, processor_name: str):
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def capture_layers(
    unet,
    latent_hw: tuple[int, int] | int,
    resolution: int | None = None,
    vae_scale_factor: int | None = None,
    blocks: str = "down_up",
) -> tuple[CrossAttentionLayer, ...]:
    """The layers :func:`capture_attention` records for these arguments (see there), in execution order.

    Walking the UNet's processors to find them costs more than the swap itself (~1.3 ms on the
    tiny UNet): a caller that captures many passes of one run (``guidance.Guide``) finds them once
    and passes them as ``layers``.

    Raises:
        ValueError: no layer of ``blocks`` at the chosen map side.
    """
    if isinstance(latent_hw, int):
        latent_hw = (latent_hw, latent_hw)
    factor = select_factor(unet, latent_hw, resolution, vae_scale_factor)
    layers = tuple(layer for layer in guided_layers(unet, blocks) if layer.factor == factor)
    if not layers:
        raise ValueError(
            f"blocks={blocks!r}: the UNet has no cross-attention layers there at the map side "
            f"{max(map_shape(latent_hw, factor))}"
        )
    return layers


@contextmanager
def capture_attention(
    unet,
    latent_hw: tuple[int, int] | int,
    resolution: int | None = None,
    detach: bool = False,
    stop_early: bool = False,
    after_last: Callable[[], None] | None = None,
    vae_scale_factor: int | None = None,
    blocks: str = "down_up",
    layers: Sequence[CrossAttentionLayer] | None = None,
) -> Iterator[AttentionStore]:
    """Record cross-attention maps of ``unet`` at one resolution while the block runs.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (LoRA layers loaded or not).
        latent_hw: ``(h, w)`` of the latents the UNet will see (or one int for square latents).
        resolution: side of the maps to record; ``None`` picks the down- and up-block layers at
            1/32 of the image side (see :func:`select_factor`).
        detach: drop the autograd graph of the recorded maps (plain observation).
        stop_early: raise :class:`StopForward` right after the last recorded layer, so a caller
            that only needs the maps skips the rest of the UNet (catch it around the call).
        after_last: called right after the last recorded layer (e.g. to switch grad off for the
            rest of the pass), before ``stop_early`` applies.
        vae_scale_factor: image pixels per latent cell (for ``resolution=None``; see
            :func:`select_factor`).
        blocks: ``"down_up"`` records the down- and up-block layers of that resolution,
            ``"down"`` the down-block ones only (:func:`guided_layers`).
        layers: the layers to record, as :func:`capture_layers` returns them for these arguments
            (found once by a caller that captures many passes); ``None`` finds them here.

    Raises:
        ValueError: a recorded layer has a processor :func:`check_processor` refuses (before any
            processor changes).

    Yields:
        The :class:`AttentionStore`; read it with ``store.maps()``.
    """
    if isinstance(latent_hw, int):
        latent_hw = (latent_hw, latent_hw)
    if layers is None:
        layers = capture_layers(unet, latent_hw, resolution, vae_scale_factor, blocks)
    store = AttentionStore(
        [layer.name for layer in layers], map_shape(latent_hw, layers[0].factor), detach=detach
    )
    # Only the recorded layers change processor: the rest of the UNet is never touched.
    modules = [_module(unet, layer.name) for layer in layers]
    originals = [module.processor for module in modules]
    # Inside another capture (e.g. the maps a run returns), wrap what that capture wrapped, so
    # only this store records while this block runs.
    wrapped = [p.processor if isinstance(p, CaptureProcessor) else p for p in originals]
    for layer, processor in zip(layers, wrapped):
        check_processor(layer.name, processor)

    def _after_last(module, args, output):
        if after_last is not None:
            after_last()
        if stop_early:
            raise StopForward

    hook = modules[-1].register_forward_hook(_after_last) if (stop_early or after_last) else None
    try:
        for module, layer, processor in zip(modules, layers, wrapped):
            module.set_processor(CaptureProcessor(processor, store, layer.name))
        yield store
    finally:
        if hook is not None:
            hook.remove()
        for module, original in zip(modules, originals):
            module.set_processor(original)
