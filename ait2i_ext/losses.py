"""The AI-T2I losses as pure functions on attention maps (``docs/method.md``, Losses and Layout).

Conventions shared by every function here:

- A map is a float tensor of shape ``(N, H, W)`` (``N`` images in the batch); a stack of maps, one
  per token group, is ``(N, G, H, W)``. Maps are non-negative (attention probabilities).
- Coordinates are ``(y, x)`` in grid cells: cell ``(i, j)`` sits at ``(i, j)``, so a map spans
  ``[0, H - 1] x [0, W - 1]``.
- Distances are Euclidean. Every loss returns one value per image, shape ``(N,)``, and is lower
  when the maps look more like what the method asks for.
- Weights, radii and modes are arguments; their defaults live in :class:`ait2i_ext.config.LossConfig`.
- Inputs are never modified and never moved; results live on the inputs' device and dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import BoxReduce, IsolationMode, PeakSource


def scaled_radius(radius: float, size: int, reference_resolution: int) -> float:
    """A radius given in cells of a ``reference_resolution`` map, converted to a ``size`` map.

    ``LossConfig`` radii are tuned on 16x16 maps (SD 1.x at 512 px); a 32x32 map (SDXL at 1024 px)
    covers the same image with twice as many cells, so it needs twice the radius.

    Args:
        radius (`float`): radius in cells of the reference map.
        size (`int`): side ``H`` of the map the radius is used on.
        reference_resolution (`int`): side of the map ``radius`` was given for.
    """
    return radius * size / reference_resolution


def blob_radius(m: torch.Tensor, level: float) -> torch.Tensor:
    """Size of each map's blobs: the radius ``sqrt(n / pi)`` of a disc of ``n`` cells, where ``n``
    counts the cells that rise above the map's median by at least ``level`` of its peak's rise.

    Measured from the median, the diffuse attention every token gets everywhere does not count, so
    the size is the subject's (on the shapes model it follows the drawn object's size from the early
    guided steps on; ``docs/method.md``). It is dimensionless in the map's values (scaling a map
    changes nothing) and in cells of this map, so it follows how big a model draws its subjects, at
    any map resolution. A uniform disc of radius ``R`` covering less than half the map gives about
    ``R``; a Gaussian blob of standard deviation ``s`` about ``s sqrt(2 ln(1 / level))`` (1.18 s at
    ``level=0.5``). The choice carries no gradient.

    Args:
        m (`torch.Tensor` of shape `(N, H, W)`): non-negative maps.
        level (`float`): share of the peak's rise above the median, in ``(0, 1]``.

    Returns:
        `torch.Tensor` of shape `(N,)`, detached, at least ``sqrt(1 / pi)`` (the peak cell alone).
    """
    if not 0 < level <= 1:
        raise ValueError(f"level={level!r} is invalid: expected a number in (0, 1]")
    flat = m.detach().flatten(1)
    base = flat.median(dim=1, keepdim=True).values
    rise = flat - base
    cells = (rise >= level * rise.amax(dim=1, keepdim=True)).sum(dim=1).clamp(min=1)
    return torch.sqrt(cells.to(m.dtype) / math.pi)


def _grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``(H, W, 2)`` tensor of cell coordinates ``(y, x)`` in the dtype and on the device of ``like``.

    One tensor per size, dtype and device, made once and shared (read it, never write to it): a
    guided pass asks for it a dozen times, and on small maps making it cost as much as using it.
    """
    return _coordinates(height, width, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _coordinates(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in any later pass
        ys = torch.arange(height, dtype=dtype, device=device)
        xs = torch.arange(width, dtype=dtype, device=device)
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


def _diagonal(height: int, width: int) -> float:
    """Longest distance between two cells of an ``H x W`` grid (1 for a single cell, never 0)."""
    return max(math.hypot(height - 1, width - 1), 1.0)


def centroid(m: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Centre of mass ``c(M) = sum_p p M[p] / sum_p M[p]`` of each map.

    Args:
        m (`torch.Tensor` of shape `(N, H, W)`): non-negative maps.
        fallback (`torch.Tensor` of shape `(N, 2)`, *optional*): returned for maps without mass.
            Defaults to the centre of the grid.

    Returns:
        `torch.Tensor` of shape `(N, 2)`: ``(y, x)`` per map; differentiable w.r.t. ``m``, finite
        (also in its gradient) when a map is all zeros.
    """
    n, height, width = m.shape
    mass = m.sum(dim=(1, 2))
    has_mass = mass > torch.finfo(m.dtype).tiny
    weighted = torch.einsum("nhw,hwc->nc", m, _grid(height, width, m))
    # Dividing by 1 where there is no mass keeps the unused branch of `where` finite, so its
    # gradient (multiplied by 0) stays finite too.
    safe_mass = torch.where(has_mass, mass, torch.ones_like(mass))
    if fallback is None:
        fallback = m.new_tensor([(height - 1) / 2, (width - 1) / 2]).expand(n, 2)
    return torch.where(has_mass[:, None], weighted / safe_mass[:, None], fallback.to(m.dtype))


def ball_mask(center: torch.Tensor, height: int, width: int, radius: float | torch.Tensor) -> torch.Tensor:
    """Ball masks ``B_r(p)``: 1 on the cells ``q`` with ``|q - p| < r``, 0 elsewhere.

    Args:
        center (`torch.Tensor` of shape `(N, 2)`): ball centres ``p`` as ``(y, x)`` in cells.
        height (`int`), width (`int`): grid size ``H``, ``W``.
        radius (`float` or `torch.Tensor` of shape `(N,)`): ``r`` in cells, one for all balls or one
            per ball.

    Returns:
        `torch.Tensor` of shape `(N, H, W)`, in ``center``'s floating dtype (float32 for integer
        centres).
    """
    if not center.is_floating_point():
        center = center.float()
    dist = torch.linalg.vector_norm(_grid(height, width, center)[None] - center[:, None, None, :], dim=-1)
    if isinstance(radius, torch.Tensor):
        radius = radius.detach().to(dist.dtype)[:, None, None]
    return (dist < radius).to(center.dtype)


def _argmax_cell(m: torch.Tensor) -> torch.Tensor:
    """``(y, x)`` of the largest cell of each ``(N, H, W)`` map, as a detached ``(N, 2)`` float tensor."""
    width = m.shape[-1]
    flat = m.detach().flatten(1).argmax(dim=1)
    return torch.stack((flat // width, flat % width), dim=-1).to(m.dtype)


def peak_centroids(
    m: torch.Tensor, k: int, radius: float | torch.Tensor, source: PeakSource = "remaining"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy top-``k`` peak regions of each map.

    For ``i = 1..k``: ``p_i`` is the argmax of what remains of the map (no gradient through the
    choice), ``c_i`` is the centroid inside ``B_r(p_i)`` (differentiable) of the remaining map
    (``source="remaining"``: a region is cut out once, so later regions do not count mass already
    claimed by an earlier one) or of the full map (``source="full"``, the authors' code: one wide
    blob then yields centroids near its own centre), then ``B_r(p_i)`` is removed from the
    remaining map.

    When nothing is left (a map with fewer than ``k`` separated peaks, e.g. one blob inside the
    first ball), the missing ``p_i`` and ``c_i`` are set to ``p_1``: they add nothing to the losses
    built on them, and never produce NaN.

    Args:
        m (`torch.Tensor` of shape `(N, H, W)`): non-negative maps.
        k (`int`): number of peaks ``K``.
        radius (`float` or `torch.Tensor` of shape `(N,)`): ball radius ``r`` in cells of this map,
            one for all maps or one per map (e.g. from :func:`blob_radius`).
        source (`str`): ``"remaining"`` or ``"full"``: the map the centroids are taken from.

    Returns:
        `tuple`: ``peaks`` (`torch.Tensor` of shape `(N, k, 2)`, detached) and ``centroids``
        (`torch.Tensor` of shape `(N, k, 2)`), both ``(y, x)`` in cells.
    """
    if source not in ("remaining", "full"):
        raise ValueError(f"source={source!r} is invalid: expected 'remaining' or 'full'")
    _, height, width = m.shape
    remaining = m
    first_peak = None
    peaks, centroids = [], []
    for _ in range(k):
        peak = _argmax_cell(remaining)
        ball = ball_mask(peak, height, width, radius)
        if first_peak is None:
            first_peak = peak
        c = centroid((remaining if source == "remaining" else m) * ball, fallback=first_peak)
        if peaks:
            empty = (remaining.detach().sum(dim=(1, 2)) <= torch.finfo(m.dtype).tiny)[:, None]
            peak = torch.where(empty, first_peak, peak)
            c = torch.where(empty, first_peak, c)
        centroids.append(c)
        peaks.append(peak)
        remaining = remaining * (1 - ball)
    return torch.stack(peaks, dim=1), torch.stack(centroids, dim=1)


def _peak_spread(anchor: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``sum_i |anchor - c_i| + sum_{2 <= i < j <= k} |c_i - c_j|`` per image, shape ``(N,)``.

    For ``k = 3`` the second sum is the reference ``|c_2 - c_3|``; for ``k > 3`` every pair of
    secondary centroids is pulled together; for ``k < 3`` it is empty.
    """
    to_anchor = torch.linalg.vector_norm(centroids - anchor[:, None, :], dim=-1).sum(dim=1)
    secondary = centroids[:, 1:]
    pairs = torch.triu_indices(secondary.shape[1], secondary.shape[1], offset=1, device=centroids.device)
    between = torch.linalg.vector_norm(secondary[:, pairs[0]] - secondary[:, pairs[1]], dim=-1).sum(dim=1)
    return to_anchor + between


def aggregation_loss(
    m: torch.Tensor, k: int, radius: float | torch.Tensor, source: PeakSource = "remaining"
) -> torch.Tensor:
    """Aggregation ``L_agg``: pulls the secondary blobs of a map onto its main peak.

    ``L_agg = [sum_{i=1..k} |sg(p_1) - c_i| + sum_{2 <= i < j <= k} |c_i - c_j|] / D`` with
    ``D = sqrt((H - 1)^2 + (W - 1)^2)`` and ``p_i``, ``c_i`` from :func:`peak_centroids`.

    Args:
        m (`torch.Tensor` of shape `(N, H, W)`): non-negative maps (a subject token's attention).
        k (`int`): number of peak regions ``K``.
        radius (`float` or `torch.Tensor` of shape `(N,)`): ball radius ``r`` in cells of this map
            (see :func:`scaled_radius`), or one per map (:func:`blob_radius`).
        source (`str`): where the centroids come from (see :func:`peak_centroids`).

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    peaks, centroids = peak_centroids(m, k, radius, source)
    return _peak_spread(peaks[:, 0], centroids) / _diagonal(*m.shape[-2:])


def alignment_loss(
    member: torch.Tensor,
    anchor: torch.Tensor,
    k: int,
    radius: float | torch.Tensor,
    source: PeakSource = "remaining",
) -> torch.Tensor:
    """Group-member alignment ``L_align``: pulls a member token's blobs onto its subject's peak.

    The form of :func:`aggregation_loss` on ``member``'s peak regions, with ``p_1`` the argmax of
    ``anchor`` (the group's main noun map) instead of the member's own.

    Args:
        member (`torch.Tensor` of shape `(N, H, W)`): map of an attribute, identifier, alias or
            other sub-word piece of the group.
        anchor (`torch.Tensor` of shape `(N, H, W)`): map of the group's main token.
        k (`int`): number of peak regions ``K``.
        radius (`float` or `torch.Tensor` of shape `(N,)`): ball radius ``r`` in cells of this map,
            or one per map.
        source (`str`): where the centroids come from (see :func:`peak_centroids`).

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    if member.shape != anchor.shape:
        raise ValueError(
            f"member shape {tuple(member.shape)} does not match anchor shape {tuple(anchor.shape)}"
        )
    _, centroids = peak_centroids(member, k, radius, source)
    return _peak_spread(_argmax_cell(anchor), centroids) / _diagonal(*member.shape[-2:])


def split_loss(m: torch.Tensor, radius: float | torch.Tensor, level: float) -> torch.Tensor:
    """Split ``L_split``: a map's peaked mass away from its strongest peak, as a share of its mass.

    ``rise = max(0, M - t)`` with the cut ``t = median + level (max - median)`` (no gradient through
    the cut; the diffuse attention every token gets everywhere does not count), and
    ``L_split = sum_{|q - p_1| >= r} rise[q] / sum_q M[q]`` with ``p_1`` the map's argmax. One
    blob within ``r`` of its peak costs nothing; a second blob of the same subject elsewhere costs
    what rises above the cut there, so descending the loss drains the weaker blob. (Dividing by the
    map's whole mass, not by the risen mass, keeps the gradient of the order of the other terms':
    the risen mass of an early, flat map is small.)
    (:func:`aggregation_loss` reads only ``k`` centroids: two blobs each inside a peak ball look
    gathered to it once the centroids sit at the balls' centres.)

    Args:
        m (`torch.Tensor` of shape `(N, H, W)`): non-negative maps (a subject token's attention).
        radius (`float` or `torch.Tensor` of shape `(N,)`): ``r`` in cells of this map, one for all
            maps or one per map (e.g. a multiple of :func:`blob_radius`).
        level (`float`): the cut's share of the peak's rise above the median, in ``[0, 1)``.

    Returns:
        `torch.Tensor` of shape `(N,)`, in ``[0, 1)``; 0 for a flat map.
    """
    if not 0 <= level < 1:
        raise ValueError(f"level={level!r} is invalid: expected a number in [0, 1)")
    _, height, width = m.shape
    flat = m.detach().flatten(1)
    base = flat.median(dim=1).values
    cut = base + level * (flat.amax(dim=1) - base)
    rise = (m - cut[:, None, None]).clamp(min=0)
    away = 1 - ball_mask(_argmax_cell(m), height, width, radius)
    total = m.sum(dim=(1, 2)).clamp(min=torch.finfo(m.dtype).tiny)
    return (rise * away).sum(dim=(1, 2)) / total


def _pairs(num_groups: int, device: torch.device) -> torch.Tensor:
    return torch.triu_indices(num_groups, num_groups, offset=1, device=device)


def isolation_loss(
    maps: torch.Tensor, mode: IsolationMode = "euclidean", pair_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Isolation ``L_iso`` between the groups' maps, averaged over pairs of groups.

    - ``"euclidean"``: ``1 - |c(A_i) - c(A_j)| / sqrt(H^2 + W^2)``, low when the centroids are far
      apart.
    - ``"cosine"``: the cosine similarity ``<vec A_i, vec A_j> / (|A_i| |A_j|)``, low when the maps
      do not overlap. (``docs/method.md`` writes ``1 - cos``; that is a distance to maximise, so
      the minimised loss is the similarity itself.)

    Args:
        maps (`torch.Tensor` of shape `(N, G, H, W)`): one non-negative map per group.
        mode (`str`): ``"euclidean"`` or ``"cosine"``.
        pair_weights (`torch.Tensor` of shape `(G, G)`, *optional*): each pair's term is multiplied
            by ``pair_weights[i, j]`` (``i < j``) before the mean, e.g. :func:`box_pair_weights`.

    Returns:
        `torch.Tensor` of shape `(N,)`; zeros when ``G < 2``.
    """
    n, num_groups, height, width = maps.shape
    if mode not in ("euclidean", "cosine"):
        raise ValueError(f"mode={mode!r} is invalid: expected 'euclidean' or 'cosine'")
    if num_groups < 2:
        return maps.new_zeros(n)
    i, j = _pairs(num_groups, maps.device)
    if mode == "euclidean":
        centres = centroid(maps.flatten(0, 1)).view(n, num_groups, 2)
        dist = torch.linalg.vector_norm(centres[:, i] - centres[:, j], dim=-1)
        terms = 1 - dist / math.hypot(height, width)
    else:
        vectors = maps.flatten(2)
        terms = F.cosine_similarity(vectors[:, i], vectors[:, j], dim=-1)
    if pair_weights is not None:
        terms = terms * pair_weights.to(terms)[i, j]
    return terms.mean(dim=1)


def smooth(m: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Gaussian smoothing exactly as Attend-and-Excite's ``GaussianSmoothing`` (reflect padding).

    Its kernel is ``exp(-((x - mean) / (2 sigma))^2)`` (that code's form, kept so that existence
    values match it), normalised to sum 1.

    Args:
        m (`torch.Tensor` of shape `(N, H, W)`): maps; ``H`` and ``W`` must exceed ``kernel // 2``.
        kernel (`int`): odd kernel side.
        sigma (`float`): the kernel's ``sigma``.

    Returns:
        `torch.Tensor` of shape `(N, H, W)`.
    """
    mean = (kernel - 1) / 2
    x = torch.arange(kernel, dtype=m.dtype, device=m.device)
    ramp = torch.exp(-(((x - mean) / (2 * sigma)) ** 2))
    weight = ramp[:, None] * ramp[None, :]
    weight = (weight / weight.sum())[None, None]
    pad = kernel // 2
    padded = F.pad(m[:, None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, weight)[:, 0]


def existence_loss(token_maps: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite's existence term ``max(0, 1 - min_g max_p A_g[p])``.

    Args:
        token_maps (`torch.Tensor` of shape `(N, G, H, W)`): per-group maps, already softmaxed over
            tokens and smoothed by the caller (see ``objective.existence_maps``).

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    weakest = token_maps.amax(dim=(2, 3)).amin(dim=1)
    return (1 - weakest).clamp(min=0)


def box_masks(boxes: torch.Tensor | Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """Cells of an ``H x W`` grid covered by each layout box.

    A cell belongs to a box when its centre ``((x + 0.5) / W, (y + 0.5) / H)`` lies inside it
    (edges included). A box too small to contain any cell centre gets the cell holding its centre.

    Args:
        boxes (`torch.Tensor` of shape `(G, 4)` or a sequence of 4-tuples): ``(x0, y0, x1, y1)``
            normalised to ``[0, 1]`` with ``x0 <= x1`` and ``y0 <= y1``.
        height (`int`), width (`int`): grid size.

    Returns:
        `torch.Tensor` of shape `(G, H, W)`, float, on ``boxes``' device (float32 unless ``boxes``
        is a floating tensor).
    """
    boxes = torch.as_tensor(boxes)
    if not boxes.is_floating_point():
        boxes = boxes.float()
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"boxes of shape {tuple(boxes.shape)} are invalid: expected (G, 4) as (x0, y0, x1, y1)"
        )
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    valid = (x0 >= 0) & (y0 >= 0) & (x1 <= 1) & (y1 <= 1) & (x0 <= x1) & (y0 <= y1)
    if not bool(valid.all()):
        raise ValueError(
            f"boxes={boxes.tolist()!r} are invalid: expected (x0, y0, x1, y1) in [0, 1] with x0 <= x1, y0 <= y1"
        )
    ys = (torch.arange(height, dtype=boxes.dtype, device=boxes.device) + 0.5) / height
    xs = (torch.arange(width, dtype=boxes.dtype, device=boxes.device) + 0.5) / width
    inside_y = (ys[None] >= y0[:, None]) & (ys[None] <= y1[:, None])
    inside_x = (xs[None] >= x0[:, None]) & (xs[None] <= x1[:, None])
    masks = inside_y[:, :, None] & inside_x[:, None, :]
    # Cell holding the box centre, for boxes that cover no cell centre.
    cy = ((y0 + y1) / 2 * height).long().clamp(0, height - 1)
    cx = ((x0 + x1) / 2 * width).long().clamp(0, width - 1)
    nearest = torch.zeros_like(masks)
    nearest[torch.arange(len(boxes), device=boxes.device), cy, cx] = True
    empty = ~masks.flatten(1).any(dim=1)
    return torch.where(empty[:, None, None], nearest, masks).to(boxes.dtype)


def above_floor(maps: torch.Tensor) -> torch.Tensor:
    """Each map less its median over the cells (a constant: no gradient through it), floored at 0.

    A raw cross-attention map gives every token a floor everywhere; a box term reading the raw map
    counts that floor as mass outside the box, so its share moves little while the object moves.

    Args:
        maps (`torch.Tensor` of shape `(N, G, H, W)`): non-negative maps.

    Returns:
        `torch.Tensor` of the same shape.
    """
    floor = maps.detach().flatten(2).median(dim=-1).values[..., None, None]
    return (maps - floor).clamp(min=0)


def spatial_softmax(maps: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each map's softmax over its cells at ``temperature`` times its peak's rise over its median
    (a constant: no gradient through it).

    A floor added everywhere changes nothing (the softmax and the rise ignore it); a cell
    ``temperature`` of the rise below the strongest weighs ``e`` times less.

    Args:
        maps (`torch.Tensor` of shape `(N, G, H, W)`): non-negative maps.
        temperature (`float`): > 0, as a fraction of each map's rise.

    Returns:
        `torch.Tensor` of the same shape, each map summing to 1.
    """
    flat = maps.flatten(2)
    still = flat.detach()
    rise = still.amax(dim=-1, keepdim=True) - still.median(dim=-1, keepdim=True).values
    return torch.softmax(flat / (temperature * rise.clamp_min(1e-12)), dim=-1).view_as(maps)


def box_pair_weights(boxes: Sequence[Sequence[float] | None], disjoint_weight: float) -> torch.Tensor:
    """``(G, G)`` isolation weights for the pairs of groups, from their layout boxes.

    A pair of boxed groups whose boxes do not overlap gets ``disjoint_weight`` (their boxes already
    keep them apart; isolation's push apart would pull a row of boxes onto other rows), rising
    linearly to 1 with the overlap's share of the smaller box; a pair with an unboxed group gets 1.

    Args:
        boxes: one ``(x0, y0, x1, y1)`` box or ``None`` per group.
        disjoint_weight (`float`): the weight of two disjoint boxes, in ``[0, 1]``.

    Returns:
        `torch.Tensor` of shape `(G, G)`, float32, symmetric.
    """
    if not 0 <= disjoint_weight <= 1:
        raise ValueError(f"disjoint_weight={disjoint_weight!r} is invalid: expected a fraction in [0, 1]")
    num_groups = len(boxes)
    weights = torch.ones(num_groups, num_groups)
    for a in range(num_groups):
        for b in range(num_groups):
            if a == b or boxes[a] is None or boxes[b] is None:
                continue
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
            overlap = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
            smaller = min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0))
            share = overlap / smaller if smaller > 0 else 1.0
            weights[a, b] = disjoint_weight + (1 - disjoint_weight) * share
    return weights


def box_loss(
    maps: torch.Tensor,
    masks: torch.Tensor,
    centroid_weight: float,
    leak_weight: float = 1.0,
    power: float = 1.0,
    far_weight: float = 0.0,
    *,
    groups: Sequence[int] | None = None,
    reduce: BoxReduce = "mean",
) -> torch.Tensor:
    """Layout term: each group's attention inside its own box and out of the other groups' boxes.

    Per group ``g`` with total mass ``S_g`` and ``d(p)`` the distance of cell ``p`` to box ``g`` (0
    inside, in units of the grid's diagonal)::

        (1 - mass(M_g in box_g) / S_g) ** power
          + leak_weight * mass(M_g in the other boxes, outside box_g) / S_g
          + centroid_weight * |c(M_g) - c(box_g)| / sqrt((H - 1)^2 + (W - 1)^2)
          + far_weight * sum_p d(p) M_g[p] / S_g

    averaged over the groups (or with ``reduce="max"`` the worst group's, :func:`reduce_box_energy`),
    where ``c(box_g)`` is the centre of the cells the box covers. With
    ``power=2`` the first term is the energy of training-free layout guidance (Chen et al. 2023).
    The last term pulls far mass harder than near mass: an object drawn above a box at the image's
    centre, while the map's centre of mass sits on the box's, still gets a pull (the centroid term
    gives it none). Every group passed in must have a box: select the boxed groups before calling.

    Args:
        maps (`torch.Tensor` of shape `(N, G, H, W)`): non-negative maps of the boxed groups.
        masks (`torch.Tensor` of shape `(G, H, W)`): their boxes, from :func:`box_masks`.
        centroid_weight (`float`): weight of the centroid-to-box-centre pull.
        leak_weight (`float`): weight of the mass a group puts in the other groups' boxes.
        power (`float`): exponent of the outside-own-box share.
        far_weight (`float`): weight of the distance-weighted outside mass (0: none).
        groups, reduce: how the maps' energies become one per image (:func:`reduce_box_energy`).

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    n, num_groups, height, width = maps.shape
    _check_masks(maps, masks)
    masks = masks.to(maps.dtype)
    total = maps.sum(dim=(2, 3)).clamp(min=torch.finfo(maps.dtype).tiny)
    inside = (maps * masks).sum(dim=(2, 3)) / total
    leaked = (maps * _other_boxes(masks)).sum(dim=(2, 3)) / total
    box_centres = centroid(masks)
    map_centres = centroid(maps.flatten(0, 1)).view(n, num_groups, 2)
    offset = torch.linalg.vector_norm(map_centres - box_centres, dim=-1) / _diagonal(height, width)
    energy = (1 - inside).clamp(min=0) ** power + leak_weight * leaked + centroid_weight * offset
    if far_weight:
        energy = energy + far_weight * (maps * _box_distance(masks)).sum(dim=(2, 3)) / total
    return reduce_box_energy(energy, groups, reduce, inside)


def box_extent_loss(
    maps: torch.Tensor,
    masks: torch.Tensor,
    distance_weight: float,
    side_level: float,
    leak_weight: float = 1.0,
    power: float = 1.0,
    side_weight: float = 1.0,
    *,
    groups: Sequence[int] | None = None,
    reduce: BoxReduce = "mean",
) -> torch.Tensor:
    """Layout term that asks for the mass inside the box and reaching its sides, not filling it.

    Per group ``g`` with total mass ``S_g``, ``d(p)`` the distance of cell ``p`` to box ``g`` (0
    inside, in units of the grid's diagonal) and ``P_side`` the map, divided by its peak, at the
    box's outermost row or column on that side (its strongest cell across the box; the peak is a
    constant, so the side term only raises the sides)::

        (1 - mass(M_g in box_g) / S_g) ** power
          + leak_weight * mass(M_g in the other boxes, outside box_g) / S_g
          + distance_weight * sum_p d(p) M_g[p] / S_g
          + side_weight * mean over the 4 sides of max(0, side_level - P_side) / side_level

    averaged over the groups (``groups``, ``reduce``: as :func:`box_loss`). The first term is layout guidance's energy (Chen et al. 2023: a
    gradient wherever the mass is); the distance term pulls far mass harder than near mass, so a map
    spread around a box whose centre is the box's centre still moves toward it (the centroid pull of
    :func:`box_loss` gives it nothing); the side term is BoxDiff's corner constraint made loose: the
    object must touch each side, so it spans the box, but a triangle in a square box costs nothing.

    Args:
        maps (`torch.Tensor` of shape `(N, G, H, W)`): non-negative maps of the boxed groups.
        masks (`torch.Tensor` of shape `(G, H, W)`): their boxes, from :func:`box_masks`.
        distance_weight (`float`): weight of the distance-weighted outside mass.
        side_level (`float`): share of the map's peak each side must reach, in ``(0, 1]``.
        leak_weight (`float`): weight of the mass a group puts in the other groups' boxes.
        power (`float`): exponent of the outside-own-box share.
        side_weight (`float`): weight of the side term (0: the map need not reach the sides).
        groups, reduce: how the maps' energies become one per image (:func:`reduce_box_energy`).

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    n, num_groups, height, width = maps.shape
    _check_masks(maps, masks)
    if not 0 < side_level <= 1:
        raise ValueError(f"side_level={side_level!r} is invalid: expected a fraction in (0, 1]")
    masks = masks.to(maps.dtype)
    tiny = torch.finfo(maps.dtype).tiny
    total = maps.sum(dim=(2, 3)).clamp(min=tiny)
    inside = (maps * masks).sum(dim=(2, 3)) / total
    leaked = (maps * _other_boxes(masks)).sum(dim=(2, 3)) / total
    far = (maps * _box_distance(masks)).sum(dim=(2, 3)) / total
    # The sides rise toward the peak; the peak is not pushed down to meet them (the object would fade).
    peak = maps.detach().amax(dim=(2, 3), keepdim=True).clamp(min=tiny)
    sides = _box_sides(maps / peak, masks)  # (N, G, 4)
    short = ((side_level - sides).clamp(min=0) / side_level).mean(dim=-1)
    share = (1 - inside).clamp(min=0) ** power
    energy = share + leak_weight * leaked + distance_weight * far + side_weight * short
    return reduce_box_energy(energy, groups, reduce, inside)


def reduce_box_energy(
    energy: torch.Tensor,
    groups: Sequence[int] | None = None,
    reduce: BoxReduce = "mean",
    inside: torch.Tensor | None = None,
) -> torch.Tensor:
    """One box energy per image from each map's: ``"mean"`` over the maps, or ``"max"``: the energy
    of the group whose maps hold the least of their mass in their box (Attend-and-Excite's most
    neglected token, with boxes: only the box whose object lags pulls, so the first-named object's
    strong map does not take every step), each group's maps averaged.

    Args:
        energy (`torch.Tensor` of shape `(N, M)`): one energy per image and map.
        groups (sequence of `int`, length ``M``): the group of each map (``None``: one map per group).
        reduce (`str`): ``"mean"`` or ``"max"``.
        inside (`torch.Tensor` of shape `(N, M)`): each map's in-box share, which picks the group for
            ``"max"`` (``None``: the group with the highest energy).

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    if reduce == "mean":
        return energy.mean(dim=1)
    if reduce != "max":
        raise ValueError(f"reduce={reduce!r} is invalid: expected 'mean' or 'max'")
    index = torch.arange(energy.shape[1], device=energy.device) if groups is None else torch.as_tensor(groups)
    index = index.to(energy.device)
    if index.shape != energy.shape[1:]:
        raise ValueError(f"groups of length {len(index)} do not match the {energy.shape[1]} maps' energies")
    per_group = _group_mean(energy, index)
    lag = per_group.detach() if inside is None else -_group_mean(inside.detach(), index)
    worst = lag.argmax(dim=1, keepdim=True)
    return per_group.gather(1, worst).squeeze(1)


def _group_mean(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(N, K)``: the mean of ``values`` ``(N, M)`` over the columns of each group ``index`` ``(M,)``."""
    num = int(index.max()) + 1
    sums = values.new_zeros(values.shape[0], num).index_add(1, index, values)
    return sums / torch.bincount(index, minlength=num).clamp(min=1).to(values.dtype)


def _box_distance(masks: torch.Tensor) -> torch.Tensor:
    """``(G, H, W)``: each cell's distance to the cells of each box, over the grid's diagonal."""
    _, height, width = masks.shape
    rows, cols = masks.amax(dim=2), masks.amax(dim=1)  # (G, H), (G, W): the box's rows and columns
    ys = torch.arange(height, dtype=masks.dtype, device=masks.device)
    xs = torch.arange(width, dtype=masks.dtype, device=masks.device)
    dy = _gap(ys, rows)
    dx = _gap(xs, cols)
    return torch.sqrt(dy[:, :, None] ** 2 + dx[:, None, :] ** 2) / _diagonal(height, width)


def _gap(positions: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``(G, L)``: distance of each position to the span of the positions where ``inside`` is 1."""
    first, last = _span(inside)
    return (first[:, None] - positions[None]).clamp(min=0) + (positions[None] - last[:, None]).clamp(min=0)


def _span(inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index where each row of the 0/1 ``(G, L)`` ``inside`` is 1 (as ``inside``'s dtype)."""
    length = inside.shape[1]
    first = inside.argmax(dim=1)
    last = length - 1 - inside.flip(1).argmax(dim=1)
    return first.to(inside.dtype), last.to(inside.dtype)


def _box_sides(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(N, G, 4)``: the strongest value of each map on its box's top row, bottom row, left column
    and right column (across the box's span)."""
    rows, cols = masks.amax(dim=2), masks.amax(dim=1)  # (G, H), (G, W)
    across_rows = (maps * rows[None, :, :, None]).amax(dim=2)  # (N, G, W): max over the box's rows
    across_cols = (maps * cols[None, :, None, :]).amax(dim=3)  # (N, G, H): max over the box's columns
    top, bottom = (i.long() for i in _span(rows))
    left, right = (i.long() for i in _span(cols))
    by_row = across_cols.gather(2, torch.stack([top, bottom], dim=1)[None].expand(maps.shape[0], -1, -1))
    by_col = across_rows.gather(2, torch.stack([left, right], dim=1)[None].expand(maps.shape[0], -1, -1))
    return torch.cat([by_row, by_col], dim=2)


def _check_masks(maps: torch.Tensor, masks: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless ``masks`` is ``(G, H, W)`` for ``maps`` of shape ``(N, G, H, W)``."""
    if masks.shape != maps.shape[1:]:
        raise ValueError(f"masks of shape {tuple(masks.shape)} are invalid: expected {tuple(maps.shape[1:])}")


def _other_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(G, H, W)``: per group, the union of the other groups' boxes minus its own box."""
    return (masks.sum(dim=0, keepdim=True) - masks).clamp(max=1) * (1 - masks)


def _topk_mean(values: torch.Tensor, weights: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the ``ceil(fraction * count)`` largest ``values`` where ``weights`` is 1, per row.

    ``values`` and ``weights`` are ``(N, G, P)``; ``weights`` is 0/1 and the same for every image.
    Cells outside the selection are pushed below every selected value, so ``topk`` never picks them
    while at least ``k`` cells are selected; rows with no cell give 0.
    """
    counts = weights[0].sum(dim=-1)  # (G,)
    k_max = max(1, int(math.ceil(fraction * float(counts.max()))))
    masked = torch.where(weights > 0, values, values.new_full((), -1.0))
    top = masked.topk(min(k_max, values.shape[-1]), dim=-1).values  # (N, G, k_max)
    ks = (fraction * counts).ceil().clamp(min=1)  # (G,)
    keep = (torch.arange(top.shape[-1], device=values.device)[None] < ks[:, None]).to(values.dtype)
    keep = keep * (counts > 0).to(values.dtype)[:, None]
    return (top.clamp(min=0) * keep).sum(dim=-1) / ks


def box_topk_loss(maps: torch.Tensor, masks: torch.Tensor, fraction: float) -> torch.Tensor:
    """BoxDiff's inner- and outer-box constraints on the strongest cells of each map.

    Per group ``g``, with ``top_P(S)`` the mean of the largest ``ceil(P |S|)`` values of ``M_g`` over
    the cells ``S``::

        (1 - top_P(box_g)) + top_P(outside box_g)

    averaged over the groups: the box must hold strong responses over a share ``P`` of its cells
    (which asks for an object the size of the box, not a dot) and nothing strong may sit outside.
    Meant for maps in ``[0, 1]`` (``objective.existence_maps``).

    Args:
        maps (`torch.Tensor` of shape `(N, G, H, W)`): maps of the boxed groups, values in ``[0, 1]``.
        masks (`torch.Tensor` of shape `(G, H, W)`): their boxes, from :func:`box_masks`.
        fraction (`float`): ``P`` in ``(0, 1]``.

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    n, num_groups, _, _ = maps.shape
    _check_masks(maps, masks)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} is invalid: expected a number in (0, 1]")
    values = maps.flatten(2)
    inside = masks.to(maps.dtype).flatten(1).expand(n, num_groups, -1)
    inner = 1 - _topk_mean(values, inside, fraction)
    outer = _topk_mean(values, 1 - inside, fraction)
    return (inner + outer).mean(dim=1)
