"""Maps per group -> losses: the AI-T2I objective on one captured attention tensor.

``compute_losses`` takes the averaged cross-attention probabilities ``(N, H, W, T)`` and the prompt's
token groups, picks each group's maps, and combines the pure losses of :mod:`ait2i_ext.losses` with
the weights of a :class:`~ait2i_ext.config.LossConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from . import losses
from .config import LossConfig
from .tokens import TokenGroup


@dataclass(frozen=True)
class LossTerms:
    """The objective and its unweighted terms, one value per image, each of shape ``(N,)``.

    ``total`` is the weighted sum; the other fields are the raw terms (``aggregation`` and
    ``alignment`` already summed over groups and members). Terms that do not apply (isolation with
    one group, box without boxes, split with ``w_split=0``) are zeros.
    """

    total: torch.Tensor
    isolation: torch.Tensor
    aggregation: torch.Tensor
    alignment: torch.Tensor
    existence: torch.Tensor
    box: torch.Tensor
    split: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """Batch means of every field as Python floats, for logging."""
        return {f.name: float(getattr(self, f.name).detach().mean()) for f in fields(self)}


def _check_attention(attn: torch.Tensor) -> None:
    if attn.ndim != 4:
        raise ValueError(f"attention of shape {tuple(attn.shape)} is invalid: expected (N, H, W, T)")


def _check_groups(groups: Sequence[TokenGroup], low: int, high: int, expected: str) -> None:
    if len(groups) == 0:
        raise ValueError("groups is empty: expected at least one TokenGroup")
    for group in groups:
        for index in group.indices:
            if not low <= index < high:
                raise ValueError(
                    f"token index {index} of group {group.name!r} is invalid: expected {low} <= index < {high} "
                    f"({expected})"
                )


def _check_eot(eot_index: int, num_tokens: int) -> None:
    if not 1 < eot_index < num_tokens:
        raise ValueError(
            f"eot_index={eot_index!r} is invalid: expected 1 < eot_index < {num_tokens} (the end-of-text "
            f"token after at least one word, within the T={num_tokens} tokens of the attention)"
        )


def group_maps(attn: torch.Tensor, groups: Sequence[TokenGroup]) -> torch.Tensor:
    """The main token's map of each group.

    Args:
        attn (`torch.Tensor` of shape `(N, H, W, T)`): cross-attention probabilities per token.
        groups (`Sequence[TokenGroup]`): the prompt's token groups.

    Returns:
        `torch.Tensor` of shape `(N, G, H, W)`.
    """
    _check_attention(attn)
    num_tokens = attn.shape[-1]
    _check_groups(groups, 0, num_tokens, f"the attention has T={num_tokens} tokens")
    return attn[..., [group.main for group in groups]].permute(0, 3, 1, 2)


def existence_maps(
    attn: torch.Tensor, groups: Sequence[TokenGroup], eot_index: int, cfg: LossConfig
) -> torch.Tensor:
    """Each group's main map as Attend-and-Excite's existence term reads it.

    The word tokens ``1 .. eot_index - 1`` (``cfg.existence_tokens="words"``: start, end and
    padding tokens cannot absorb the attention) or tokens ``1 .. T - 2`` (``"all"``, as diffusers'
    Attend-and-Excite slices ``1:-1``) are scaled by ``cfg.softmax_scale`` and softmaxed over
    tokens, then each group's main map is smoothed with ``cfg.smoothing_kernel`` /
    ``cfg.smoothing_sigma``.

    Args:
        attn (`torch.Tensor` of shape `(N, H, W, T)`): cross-attention probabilities per token.
        groups (`Sequence[TokenGroup]`): the prompt's token groups (indices of word tokens).
        eot_index (`int`): index of the prompt's end-of-text token.
        cfg (`LossConfig`): scale and smoothing.

    Returns:
        `torch.Tensor` of shape `(N, G, H, W)`.
    """
    _check_attention(attn)
    _check_eot(eot_index, attn.shape[-1])
    _check_groups(groups, 1, eot_index, f"a word token, before eot_index={eot_index}")
    return word_maps(attn, [group.main for group in groups], eot_index, cfg)


def word_maps(attn: torch.Tensor, indices: Sequence[int], eot_index: int, cfg: LossConfig) -> torch.Tensor:
    """The maps of the tokens ``indices`` after the existence term's softmax over the words, smoothed
    (:func:`existence_maps` for any word tokens; ``box_maps="words"`` reads them too).

    Args:
        attn (`torch.Tensor` of shape `(N, H, W, T)`): cross-attention probabilities per token.
        indices (`Sequence[int]`): word tokens, each in ``1 .. eot_index - 1``.

    Returns:
        `torch.Tensor` of shape `(N, K, H, W)`, ``K = len(indices)``, values in ``[0, 1]``.
    """
    last = eot_index if cfg.existence_tokens == "words" else attn.shape[-1] - 1
    words = torch.softmax(attn[..., 1:last] * cfg.softmax_scale, dim=-1)
    maps = words[..., [i - 1 for i in indices]].permute(0, 3, 1, 2)
    n, count, height, width = maps.shape
    smoothed = losses.smooth(
        maps.reshape(n * count, height, width), cfg.smoothing_kernel, cfg.smoothing_sigma
    )
    return smoothed.view(n, count, height, width)


def group_radii(main: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's aggregation and alignment radius, in cells of the maps' grid.

    ``cfg.radius_mode="fixed"``: ``cfg.aggregation_radius`` / ``cfg.alignment_radius`` scaled from
    ``cfg.reference_resolution`` to the maps' height, the same for every map. ``"adaptive"`` and
    ``"calibrated"``: ``cfg.aggregation_factor`` / ``cfg.alignment_factor`` times
    :func:`~ait2i_ext.losses.blob_radius` of the group's main map (a group's members are aligned with
    the radius of their subject; with ``cfg.radius_share="min"`` every group of an image takes the
    smallest size among them); ``"calibrated"`` measures them so on a run's first guided pass and
    the run then passes them in (``compute_losses(radii=...)``).

    Args:
        main (`torch.Tensor` of shape `(N, G, H, W)`): the groups' main maps.
        cfg (`LossConfig`): the mode and its radii or factors.

    Returns:
        `tuple`: aggregation and alignment radii, each a detached `torch.Tensor` of shape `(N, G)`.
    """
    n, num_groups, height, width = main.shape
    if cfg.radius_mode in ("adaptive", "calibrated"):
        size = losses.blob_radius(main.reshape(n * num_groups, height, width), cfg.radius_level)
        size = size.view(n, num_groups)
        if cfg.radius_share == "min":  # one radius per image: its subjects' smallest size
            size = size.amin(dim=1, keepdim=True).expand(n, num_groups)
        return cfg.aggregation_factor * size, cfg.alignment_factor * size
    fixed = [
        losses.scaled_radius(r, height, cfg.reference_resolution)
        for r in (cfg.aggregation_radius, cfg.alignment_radius)
    ]
    return tuple(main.new_full((n, num_groups), r) for r in fixed)


def split_term(main: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The split term summed over groups: :func:`~ait2i_ext.losses.split_loss` of each main map, with
    the radius ``cfg.split_factor`` times its :func:`~ait2i_ext.losses.blob_radius` (at
    ``cfg.radius_level``) and the cut at ``cfg.split_level``.

    Args:
        main (`torch.Tensor` of shape `(N, G, H, W)`): the groups' main maps.
        cfg (`LossConfig`): the factor and the level.

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    n, num_groups, height, width = main.shape
    flat = main.reshape(n * num_groups, height, width)
    radius = cfg.split_factor * losses.blob_radius(flat, cfg.radius_level)
    return losses.split_loss(flat, radius, cfg.split_level).view(n, num_groups).sum(1)


def _boxed_tokens(group: TokenGroup, members: bool) -> tuple[int, ...]:
    """The tokens whose maps the box term pulls into ``group``'s box."""
    return group.indices if members else (group.main,)


def _box_energy(
    maps: torch.Tensor, masks: torch.Tensor, cfg: LossConfig, groups: Sequence[int] | None = None
) -> torch.Tensor:
    """The box term's energy ``cfg.box_energy`` of the boxed maps (each with its box's mask; ``groups``:
    each map's group, for ``cfg.box_reduce``)."""
    reduce = dict(groups=groups, reduce=cfg.box_reduce)
    if cfg.box_energy == "extent":
        return losses.box_extent_loss(
            maps,
            masks,
            cfg.box_distance_weight,
            cfg.box_side_level,
            cfg.box_leak_weight,
            cfg.box_power,
            cfg.box_side_weight,
            **reduce,
        )
    return losses.box_loss(
        maps, masks, cfg.box_centroid_weight, cfg.box_leak_weight, cfg.box_power, cfg.box_far_weight, **reduce
    )


def compute_losses(
    attn: torch.Tensor,
    groups: Sequence[TokenGroup],
    eot_index: int,
    cfg: LossConfig,
    boxes_enabled: bool = True,
    radii: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossTerms:
    """The AI-T2I objective on one captured attention tensor.

    - aggregation: sum over groups of :func:`~ait2i_ext.losses.aggregation_loss` of the main map
      (radius from :func:`group_radii`: fixed, or adaptive to the map's blob);
    - alignment: sum over groups and their members of :func:`~ait2i_ext.losses.alignment_loss` of
      the member's map anchored on the main map (its group's alignment radius);
    - isolation: :func:`~ait2i_ext.losses.isolation_loss` of the main maps (zero for one group; with
      boxes, each pair weighted by :func:`~ait2i_ext.losses.box_pair_weights` when
      ``cfg.box_isolation_weight`` < 1);
    - split: :func:`split_term` of the main maps (zero, and not computed, when ``cfg.w_split`` is 0);
    - existence: :func:`~ait2i_ext.losses.existence_loss` of :func:`existence_maps`;
    - box: :func:`~ait2i_ext.losses.box_loss` (or with ``cfg.box_energy="extent"``
      :func:`~ait2i_ext.losses.box_extent_loss`) over the groups with a ``box`` (their main maps, and
      with ``cfg.box_members`` their member tokens' maps too, each with the group's box; with
      ``cfg.box_maps="words"`` those maps after the softmax over the words), plus
      ``cfg.w_box_topk`` x :func:`~ait2i_ext.losses.box_topk_loss` of their :func:`existence_maps`
      (zero when no group has a box, or when ``boxes_enabled`` is ``False``). With
      ``cfg.box_existence`` the existence term reads a boxed group's map inside its box only.

    Fixed radii are given for ``cfg.reference_resolution`` and scaled to the map's height. Everything is
    computed in float32 whatever the dtype of ``attn``.

    Args:
        attn (`torch.Tensor` of shape `(N, H, W, T)`): cross-attention probabilities per token,
            averaged over layers and heads.
        groups (`Sequence[TokenGroup]`): the prompt's token groups; all indices must be word tokens
            (``1 <= index < eot_index``).
        eot_index (`int`): index of the prompt's end-of-text token.
        cfg (`LossConfig`): weights and geometry.
        boxes_enabled (`bool`): whether the groups' boxes add the box term.
        radii (`tuple`, *optional*): the aggregation and alignment radii, each of shape `(N, G)` in
            cells of these maps, instead of :func:`group_radii`'s (a ``"calibrated"`` run's held radii).

    Returns:
        `LossTerms`: the weighted total and every unweighted term, each of shape `(N,)`.
    """
    _check_attention(attn)
    _check_eot(eot_index, attn.shape[-1])
    _check_groups(groups, 1, eot_index, f"a word token, before eot_index={eot_index}")
    attn = attn.float()
    n, height, width, _ = attn.shape
    main = group_maps(attn, groups)

    # Every map of every group goes through one batched call (the losses are per map).
    num_groups = main.shape[1]
    flat_main = main.reshape(n * num_groups, height, width)
    if radii is not None and tuple(r.shape for r in radii) != ((n, num_groups),) * 2:
        shapes = [tuple(r.shape) for r in radii]
        raise ValueError(f"radii of shapes {shapes} are invalid: expected two of shape {(n, num_groups)}")
    aggregation_radius, alignment_radius = group_radii(main, cfg) if radii is None else radii
    aggregation = losses.aggregation_loss(flat_main, cfg.top_k, aggregation_radius.flatten(), cfg.peak_source)
    aggregation = aggregation.view(n, num_groups).sum(1)
    owners = [g for g, group in enumerate(groups) for _ in group.members]
    if owners:
        members = attn[..., [m for group in groups for m in group.members]].permute(0, 3, 1, 2)
        anchors = main[:, owners]
        alignment = losses.alignment_loss(
            members.reshape(-1, height, width),
            anchors.reshape(-1, height, width),
            cfg.top_k,
            alignment_radius[:, owners].flatten(),
            cfg.peak_source,
        )
        alignment = alignment.view(n, len(owners)).sum(1)
    else:
        alignment = attn.new_zeros(n)

    pair_weights = None
    if boxes_enabled and cfg.box_isolation_weight < 1 and any(g.box is not None for g in groups):
        pair_weights = losses.box_pair_weights([g.box for g in groups], cfg.box_isolation_weight)
    isolation = losses.isolation_loss(main, cfg.isolation, pair_weights)
    split = split_term(main, cfg) if cfg.w_split > 0 else attn.new_zeros(n)
    scaled = existence_maps(attn, groups, eot_index, cfg)
    boxed = [g for g, group in enumerate(groups) if group.box is not None] if boxes_enabled else []
    if boxed:
        boxes = torch.tensor([groups[g].box for g in boxed], dtype=attn.dtype, device=attn.device)
        masks = losses.box_masks(boxes, height, width)
    if boxed and cfg.box_existence:  # a boxed subject exists only by its attention inside its box
        inside = scaled.clone()
        inside[:, boxed] = scaled[:, boxed] * masks
        existence = losses.existence_loss(inside)
    else:
        existence = losses.existence_loss(scaled)

    if boxed:
        # With ``box_members`` a group's attribute and other member tokens share its box: one map each.
        tokens = [(k, i) for k, g in enumerate(boxed) for i in _boxed_tokens(groups[g], cfg.box_members)]
        indices = [i for _, i in tokens]
        if cfg.box_maps == "words":
            maps = word_maps(attn, indices, eot_index, cfg)
        else:
            maps = attn[..., indices].permute(0, 3, 1, 2)
        if cfg.box_maps == "peaked":
            maps = losses.above_floor(maps)
        elif cfg.box_maps == "softmax":
            maps = losses.spatial_softmax(maps, cfg.box_temperature)
        box = _box_energy(maps, masks[[k for k, _ in tokens]], cfg, [k for k, _ in tokens])
        if cfg.w_box_topk > 0:
            box = box + cfg.w_box_topk * losses.box_topk_loss(scaled[:, boxed], masks, cfg.box_topk_fraction)
    else:
        box = attn.new_zeros(n)

    total = (
        cfg.w_isolation * isolation
        + cfg.w_aggregation * aggregation
        + cfg.w_existence * existence
        + cfg.w_alignment * alignment
        + cfg.w_box * box
        + cfg.w_split * split
    )
    return LossTerms(
        total=total,
        isolation=isolation,
        aggregation=aggregation,
        alignment=alignment,
        existence=existence,
        box=box,
        split=split,
    )
