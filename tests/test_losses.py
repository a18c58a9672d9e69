"""Pure loss functions on synthetic maps: properties, not magic numbers."""

from __future__ import annotations

import math

import pytest
import torch

from ait2i_ext import losses
from ait2i_ext.config import LossConfig

CFG = LossConfig()
SIZE = 16


def blob(
    center: tuple[float, float], size: int = SIZE, sigma: float = 1.0, mass: float = 1.0
) -> torch.Tensor:
    """A Gaussian blob of total ``mass`` centred at ``(y, x)`` on a ``size x size`` grid."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    g = torch.exp(-((ys - center[0]) ** 2 + (xs - center[1]) ** 2) / (2 * sigma**2))
    return g / g.sum() * mass


def batch(*maps: torch.Tensor) -> torch.Tensor:
    return torch.stack(maps).clone().requires_grad_(True)


def assert_unchanged_and_grad(fn, *inputs: torch.Tensor) -> torch.Tensor:
    """Calls ``fn``, checks the inputs are untouched and the gradient w.r.t. the first is finite, non-zero."""
    before = [x.detach().clone() for x in inputs]
    out = fn(*inputs)
    for x, b in zip(inputs, before, strict=True):
        assert torch.equal(x.detach(), b)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), inputs[0])
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    return out


def test_scaled_radius_scales_with_resolution():
    assert losses.scaled_radius(5.0, 16, 16) == 5.0
    assert losses.scaled_radius(5.0, 32, 16) == 10.0


def test_centroid_of_blob_and_point():
    m = torch.stack([blob((4.0, 11.0)), torch.zeros(SIZE, SIZE)])
    m[1, 2, 7] = 3.0
    c = losses.centroid(m)
    assert c.shape == (2, 2)
    torch.testing.assert_close(c[0], torch.tensor([4.0, 11.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(c[1], torch.tensor([2.0, 7.0]))


def test_centroid_of_empty_map_is_finite_with_finite_gradient():
    m = torch.zeros(1, 5, 7, requires_grad=True)
    c = losses.centroid(m)
    torch.testing.assert_close(c, torch.tensor([[2.0, 3.0]]))
    (grad,) = torch.autograd.grad(c.sum(), m)
    assert torch.isfinite(grad).all()


def test_ball_mask_is_strict_disc():
    mask = losses.ball_mask(torch.tensor([[5.0, 5.0]]), 16, 16, radius=2.0)
    assert mask.shape == (1, 16, 16)
    assert mask[0, 5, 5] == 1 and mask[0, 5, 6] == 1 and mask[0, 6, 6] == 1
    assert mask[0, 5, 7] == 0  # distance exactly r is outside
    assert mask.sum() == 9  # (0,0), 4 at distance 1, 4 at sqrt(2)


def test_peak_centroids_finds_separated_peaks_in_order():
    m = batch(blob((3.0, 3.0), mass=2.0) + blob((12.0, 12.0), mass=1.0))
    peaks, centroids = losses.peak_centroids(m, 2, radius=5.0)
    assert peaks.shape == centroids.shape == (1, 2, 2)
    assert not peaks.requires_grad and centroids.requires_grad
    torch.testing.assert_close(peaks[0], torch.tensor([[3.0, 3.0], [12.0, 12.0]]))
    torch.testing.assert_close(centroids[0], peaks[0], atol=0.05, rtol=0)


def test_peak_centroids_with_fewer_peaks_than_k_fall_back_to_first_peak():
    m = torch.zeros(1, SIZE, SIZE)
    m[0, 8, 8] = 1.0
    m.requires_grad_(True)
    peaks, centroids = losses.peak_centroids(m, 3, radius=5.0)
    assert torch.isfinite(centroids).all()
    assert (peaks == torch.tensor([8.0, 8.0])).all()
    torch.testing.assert_close(centroids, peaks)
    (grad,) = torch.autograd.grad(losses.aggregation_loss(m, 3, 5.0).sum(), m)
    assert torch.isfinite(grad).all()


def test_aggregation_prefers_one_compact_blob():
    compact = blob((8.0, 8.0), mass=2.0)
    split = blob((2.0, 2.0)) + blob((13.0, 13.0))
    m = batch(compact, split)
    loss = assert_unchanged_and_grad(
        lambda x: losses.aggregation_loss(x, CFG.top_k, CFG.aggregation_radius), m
    )
    assert loss.shape == (2,)
    assert loss[0] < loss[1]


def test_aggregation_is_scale_invariant_and_survives_zero_maps():
    m = blob((2.0, 2.0)) + blob((13.0, 13.0))
    loss = losses.aggregation_loss(torch.stack([m, 10 * m, torch.zeros_like(m)]), 3, 5.0)
    torch.testing.assert_close(loss[0], loss[1])
    assert loss[2] == 0


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_aggregation_any_k(k):
    m = batch(blob((2.0, 2.0)) + blob((13.0, 13.0)) + blob((2.0, 13.0)))
    loss = losses.aggregation_loss(m, k, 3.0)
    assert loss.shape == (1,) and torch.isfinite(loss).all() and loss.item() >= 0


def test_alignment_prefers_member_on_anchor_peak():
    anchor = blob((4.0, 4.0))
    on = blob((4.0, 4.0))
    off = blob((12.0, 12.0))
    members = batch(on, off)
    anchors = torch.stack([anchor, anchor])
    loss = assert_unchanged_and_grad(
        lambda m, a: losses.alignment_loss(m, a, CFG.top_k, CFG.alignment_radius), members, anchors
    )
    assert loss[0] < loss[1]


def test_alignment_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="anchor shape"):
        losses.alignment_loss(torch.rand(1, 8, 8), torch.rand(1, 16, 16), 3, 5.0)


@pytest.mark.parametrize("mode", ["euclidean", "cosine"])
def test_isolation_prefers_far_apart_groups(mode):
    apart = torch.stack([blob((2.0, 2.0)), blob((13.0, 13.0))])
    overlapping = torch.stack([blob((7.0, 7.0)), blob((8.0, 8.0))])
    maps = batch(apart, overlapping)
    loss = assert_unchanged_and_grad(lambda x: losses.isolation_loss(x, mode), maps)
    assert loss.shape == (2,)
    assert loss[0] < loss[1]


@pytest.mark.parametrize("mode", ["euclidean", "cosine"])
def test_isolation_of_one_group_is_zero(mode):
    loss = losses.isolation_loss(torch.rand(3, 1, 8, 8), mode)
    assert torch.equal(loss, torch.zeros(3))


def test_isolation_averages_over_pairs_of_three_groups():
    maps = torch.stack([blob((2.0, 2.0)), blob((13.0, 13.0)), blob((2.0, 13.0))])[None]
    loss = losses.isolation_loss(maps, "euclidean")
    pairs = [losses.isolation_loss(maps[:, list(p)], "euclidean") for p in ((0, 1), (0, 2), (1, 2))]
    torch.testing.assert_close(loss, sum(pairs) / 3)


@pytest.mark.parametrize("mode", ["euclidean", "cosine"])
def test_isolation_pair_weights_scale_each_pair(mode):
    maps = torch.stack([blob((2.0, 2.0)), blob((13.0, 13.0)), blob((2.0, 13.0))])[None]
    pairs = [losses.isolation_loss(maps[:, list(p)], mode) for p in ((0, 1), (0, 2), (1, 2))]
    weights = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    weighted = losses.isolation_loss(maps, mode, weights)
    torch.testing.assert_close(weighted, (0 * pairs[0] + 0.5 * pairs[1] + pairs[2]) / 3)


def test_above_floor_removes_the_median_and_passes_no_gradient_through_it():
    m = torch.full((1, 1, 4, 4), 0.1, requires_grad=True)
    with torch.no_grad():
        m[0, 0, 0, 0] = 0.7
    peaked = losses.above_floor(m)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 0, 0] = 0.6
    torch.testing.assert_close(peaked, expected)
    (grad,) = torch.autograd.grad(peaked[0, 0, 0, 0], m)
    assert grad[0, 0, 0, 0] == 1 and grad.sum() == 1  # the median is a constant


def test_box_pair_weights_free_disjoint_boxes_only():
    """A row of three boxes: no pair overlaps, so each gets ``disjoint_weight``; a box half inside
    another gets halfway to 1; a group without a box keeps isolation's full weight."""
    row = [(0.02, 0.34, 0.32, 0.66), (0.35, 0.34, 0.65, 0.66), (0.68, 0.34, 0.98, 0.66)]
    weights = losses.box_pair_weights(row, 0.0)
    torch.testing.assert_close(weights, torch.eye(3))
    weights = losses.box_pair_weights([(0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5), None], 0.2)
    torch.testing.assert_close(weights[0, 1], torch.tensor(0.6))
    assert torch.equal(weights, weights.T) and weights[2].eq(1).all()
    torch.testing.assert_close(losses.box_pair_weights(row, 1.0), torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"disjoint_weight=1.5 is invalid: expected a fraction in \[0, 1\]"):
        losses.box_pair_weights(row, 1.5)


def test_isolation_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        losses.isolation_loss(torch.rand(1, 2, 8, 8), "manhattan")


def test_smooth_preserves_constant_and_spreads_a_spike():
    const = torch.full((1, 8, 8), 0.3)
    torch.testing.assert_close(losses.smooth(const, CFG.smoothing_kernel, CFG.smoothing_sigma), const)
    spike = torch.zeros(1, 8, 8)
    spike[0, 4, 4] = 1.0
    out = losses.smooth(spike, CFG.smoothing_kernel, CFG.smoothing_sigma)
    assert out.shape == spike.shape and spike[0, 4, 4] == 1.0
    assert 0 < out[0, 4, 4] < 1 and out[0, 4, 5] > 0 and out[0, 4, 6] == 0
    torch.testing.assert_close(out.sum(), spike.sum())


def test_existence_is_driven_by_the_weakest_group():
    strong = torch.zeros(SIZE, SIZE)
    strong[5, 5] = 0.9
    weak = torch.full((SIZE, SIZE), 0.1)
    maps = batch(torch.stack([strong, strong]), torch.stack([strong, weak]))
    loss = assert_unchanged_and_grad(losses.existence_loss, maps)
    torch.testing.assert_close(loss, torch.tensor([0.1, 0.9]))
    assert losses.existence_loss(torch.full((1, 2, 4, 4), 2.0)).item() == 0


def test_box_masks_cover_cell_centres_and_never_empty():
    masks = losses.box_masks(
        torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.31, 0.31]]), 8, 8
    )
    assert masks.shape == (3, 8, 8)
    assert masks[0].sum() == 4 * 2 and masks[0, :2, :4].all()
    assert masks[1].all()
    assert masks[2].sum() == 1 and masks[2, 2, 2] == 1


def test_box_masks_reject_bad_boxes():
    with pytest.raises(ValueError, match="x0 <= x1"):
        losses.box_masks([(0.6, 0.0, 0.4, 1.0)], 8, 8)
    with pytest.raises(ValueError, match=r"\(G, 4\)"):
        losses.box_masks([(0.0, 0.0, 1.0)], 8, 8)


def test_box_loss_lower_inside_own_box():
    masks = losses.box_masks([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], SIZE, SIZE)
    inside = torch.stack([blob((4.0, 4.0)), blob((12.0, 12.0))])
    swapped = torch.stack([blob((12.0, 12.0)), blob((4.0, 4.0))])
    outside = torch.stack([blob((4.0, 12.0)), blob((12.0, 4.0))])  # in nobody's box
    maps = batch(inside, swapped, outside)
    loss = assert_unchanged_and_grad(lambda m: losses.box_loss(m, masks, CFG.box_centroid_weight), maps)
    assert loss.shape == (3,)
    assert loss[0] < loss[2] < loss[1]  # in the other group's box is worst
    assert loss[0] < 0.1


def test_box_loss_centroid_term_prefers_box_centre():
    masks = losses.box_masks([(0.0, 0.0, 1.0, 1.0)], SIZE, SIZE)
    maps = torch.stack([blob((7.5, 7.5)), blob((1.0, 1.0))])[:, None]
    loss = losses.box_loss(maps, masks, centroid_weight=1.0)
    assert loss[0] < loss[1]
    torch.testing.assert_close(
        losses.box_loss(maps, masks, centroid_weight=0.0), torch.zeros(2), atol=1e-6, rtol=0
    )


def test_losses_keep_dtype():
    m = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert losses.isolation_loss(m).dtype == torch.float64
    assert losses.aggregation_loss(m[:, 0], 3, 2.0).dtype == torch.float64
    assert math.isfinite(losses.existence_loss(m).sum().item())


@pytest.mark.parametrize("radius", [2.5, 5.0])
def test_full_map_centroids_penalise_one_wide_blob_less(radius):
    """One subject drawn large: with the earlier peak regions removed, the later "peaks" sit on the
    blob's rim and their centroids are pulled outwards; from the full map they fall back towards
    its centre (the authors' form)."""
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((ys - 7.5) ** 2 + (xs - 7.5) ** 2) / (2 * 4.0**2))[None]
    remaining = losses.aggregation_loss(blob, 3, radius, "remaining")
    full = losses.aggregation_loss(blob, 3, radius, "full")
    assert float(full) < float(remaining)
    peaks_r, _ = losses.peak_centroids(blob, 3, radius, "remaining")
    peaks_f, _ = losses.peak_centroids(blob, 3, radius, "full")
    assert torch.equal(peaks_r, peaks_f)  # same peaks: only the centroids' source differs
    with pytest.raises(ValueError, match="source='nearest' is invalid"):
        losses.peak_centroids(blob, 3, radius, "nearest")


def test_box_loss_power_and_leak_weight():
    masks = losses.box_masks([(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)], SIZE, SIZE)
    half = torch.stack([blob((8.0, 4.0)) + blob((8.0, 12.0)), blob((8.0, 12.0))])[None]  # group 0: half in
    plain = losses.box_loss(half, masks, centroid_weight=0.0)
    squared = losses.box_loss(half, masks, centroid_weight=0.0, power=2.0)
    no_leak = losses.box_loss(half, masks, centroid_weight=0.0, leak_weight=0.0)
    # group 0: outside share 0.5 and leaked share 0.5; group 1 fully in its box
    torch.testing.assert_close(plain, torch.tensor([(0.5 + 0.5) / 2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(squared, torch.tensor([(0.25 + 0.5) / 2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(no_leak, torch.tensor([0.5 / 2]), atol=1e-4, rtol=0)


def test_box_loss_gradient_moves_mass_into_the_box():
    masks = losses.box_masks([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], SIZE, SIZE)
    maps = batch(torch.stack([blob((8.0, 8.0), sigma=3.0), blob((8.0, 8.0), sigma=3.0)]))
    for power in (1.0, 2.0):
        loss = losses.box_loss(maps, masks, centroid_weight=1.0, power=power)
        (grad,) = torch.autograd.grad(loss.sum(), maps)
        stepped = (maps - 0.5 * grad / grad.abs().max() * maps.detach().max()).clamp(min=0)
        share = (stepped * masks).sum(dim=(2, 3)) / stepped.sum(dim=(2, 3))
        before = (maps.detach() * masks).sum(dim=(2, 3)) / maps.detach().sum(dim=(2, 3))
        assert (share > before).all()


def test_box_topk_loss_prefers_a_box_filled_inside():
    masks = losses.box_masks([(0.0, 0.0, 0.5, 0.5)], SIZE, SIZE)
    filled = masks[0].clone()  # the whole box at 1
    dot = torch.zeros(SIZE, SIZE)
    dot[3, 3] = 1.0  # one strong cell inside: too small an object
    outside = torch.roll(masks[0], shifts=(8, 8), dims=(0, 1))  # the box's twin in the other corner
    maps = batch(filled[None], dot[None], outside[None])
    loss = assert_unchanged_and_grad(lambda m: losses.box_topk_loss(m, masks, 0.2), maps)
    assert loss.shape == (3,)
    assert loss[0] < loss[1] < loss[2]
    values = loss.detach().tolist()
    assert values[0] == pytest.approx(0.0, abs=1e-6) and values[2] == pytest.approx(2.0, abs=1e-6)


def test_box_topk_loss_gradient_raises_inside_and_lowers_outside():
    masks = losses.box_masks([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], SIZE, SIZE)
    maps = batch(torch.full((2, SIZE, SIZE), 0.5))
    (grad,) = torch.autograd.grad(losses.box_topk_loss(maps, masks, 0.5).sum(), maps)
    inside, outside = grad[:, masks.bool()], grad[:, ~masks.bool()]
    assert (grad * masks <= 0).all() and (grad * (1 - masks) >= 0).all()
    assert inside.lt(0).any() and outside.gt(0).any()


def test_box_topk_loss_rejects_bad_input():
    masks = losses.box_masks([(0.0, 0.0, 0.5, 0.5)], SIZE, SIZE)
    with pytest.raises(ValueError, match="fraction"):
        losses.box_topk_loss(torch.rand(1, 1, SIZE, SIZE), masks, 0.0)
    with pytest.raises(ValueError, match="masks"):
        losses.box_topk_loss(torch.rand(1, 2, SIZE, SIZE), masks, 0.2)


def triangle_in(mask: torch.Tensor) -> torch.Tensor:
    """An upright triangle with its apex on the top row of ``mask``'s box and its base on the bottom
    row, as wide as the box: about half of the box's cells."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    top, bottom, left, right = (int(v) for v in (ys.min(), ys.max(), xs.min(), xs.max()))
    middle, rows = (left + right) / 2, bottom - top + 1
    out = torch.zeros_like(mask)
    for i in range(rows):
        half = (i + 1) / rows * (right - left + 1) / 2
        for x in range(left, right + 1):
            out[top + i, x] = float(abs(x - middle) <= half)
    return out


def test_box_extent_loss_costs_nothing_for_a_triangle_in_a_square_box():
    """An object need not fill its box: a triangle spanning its square box costs ~0 (the centroid
    energy asks for a square: its centre of mass is below the box's), a dot in the box, which does
    not reach the sides, and the same triangle outside the box cost more."""
    masks = losses.box_masks([(0.25, 0.25, 0.75, 0.75)], SIZE, SIZE)
    triangle = triangle_in(masks[0])
    assert 0.35 < float(triangle.sum() / masks[0].sum()) < 0.7
    dot = torch.zeros(SIZE, SIZE)
    dot[7:9, 7:9] = 1.0
    outside = torch.roll(triangle, shifts=(0, 7), dims=(0, 1))
    maps = batch(triangle[None], dot[None], outside[None])
    loss = assert_unchanged_and_grad(lambda m: losses.box_extent_loss(m, masks, 1.0, 0.5, power=2.0), maps)
    loss = loss.detach()
    assert loss.shape == (3,)
    assert float(loss[0]) == pytest.approx(0.0, abs=1e-6)
    assert loss[0] < loss[1] - 0.5 and loss[0] < loss[2] - 0.5
    assert float(losses.box_loss(maps[:1].detach(), masks, centroid_weight=1.0, power=2.0)) > 0.02


def middle_of_a_row() -> tuple[torch.Tensor, torch.Tensor]:
    """The middle box of a row of three and a map drawn above and below it (centred on the box)."""
    boxes = [(0.02, 0.34, 0.32, 0.66), (0.35, 0.34, 0.65, 0.66), (0.68, 0.34, 0.98, 0.66)]
    masks = losses.box_masks(boxes, SIZE, SIZE)[1:2]
    spread = torch.full((SIZE, SIZE), 0.01)
    spread[0:4, 6:10] = 1.0
    spread[12:16, 6:10] = 1.0
    return masks, batch(spread[None])


def test_box_extent_loss_pulls_mass_toward_a_centred_box():
    """A row of three boxes, the middle object's mass above and below its box (centre of mass on
    the box's centre: the centroid pull gives nothing): the gradient raises the box's cells and lowers
    far cells more than near ones, so descending it moves the mass toward the box."""
    masks, maps = middle_of_a_row()
    (grad,) = torch.autograd.grad(losses.box_extent_loss(maps, masks, 1.0, 0.5).sum(), maps)
    column = grad[0, 0, :, 8]
    ys = torch.nonzero(masks[0, :, 8]).flatten()
    assert (column[ys] < 0).all()
    assert column[0] > column[2] and column[15] > column[13] and column[0] > 0 and column[15] > 0
    stepped = (maps - 0.5 * grad / grad.abs().max()).clamp(min=0)
    share = (stepped * masks).sum() / stepped.sum()
    assert share > (maps * masks).sum() / maps.sum()


def test_box_loss_far_weight_pulls_far_mass_harder_toward_a_centred_box():
    """The middle box of a row, the object drawn above and below it (the map's centre of mass on the
    box's centre): ``far_weight`` makes the far rows cost more than the near ones, so descending moves
    the mass toward the box; 0 (the default) is the energy without it."""
    masks, maps = middle_of_a_row()

    def column(**kwargs):
        (grad,) = torch.autograd.grad(losses.box_loss(maps, masks, 1.0, **kwargs).sum(), maps)
        return grad[0, 0, :, 8]

    plain, far = column(), column(far_weight=1.0)
    added = far - plain
    assert added[0] > added[2] and added[15] > added[13] and added[0] > 0 and added[15] > 0
    assert far[0] > far[2] and far[15] > far[13]
    ys = torch.nonzero(masks[0, :, 8]).flatten()
    assert (far[ys] < 0).all()
    torch.testing.assert_close(column(far_weight=0.0), plain)


def test_box_extent_loss_raises_the_sides_never_lowers_the_peak():
    """A dot in the middle of its box misses the sides: descending the side term spreads it toward
    them and never lowers its peak (a lowered peak is a fading object)."""
    masks = losses.box_masks([(0.25, 0.25, 0.75, 0.75)], SIZE, SIZE)
    dot = masks[0] * 0.1  # a faint haze over the box, under half the peak at its sides
    dot[7:9, 7:9] = 1.0
    maps = batch(dot[None])
    (grad,) = torch.autograd.grad(losses.box_extent_loss(maps, masks, 0.0, 0.5).sum(), maps)
    inside = grad[0, 0][masks[0].bool()]
    assert (grad[0, 0, 7:9, 7:9] <= 0).all()
    assert (inside <= 0).all() and inside.lt(0).any()


def test_box_extent_loss_rejects_bad_input():
    masks = losses.box_masks([(0.0, 0.0, 0.5, 0.5)], SIZE, SIZE)
    with pytest.raises(ValueError, match="side_level=0.0 is invalid"):
        losses.box_extent_loss(torch.rand(1, 1, SIZE, SIZE), masks, 1.0, 0.0)
    with pytest.raises(ValueError, match="masks"):
        losses.box_extent_loss(torch.rand(1, 2, SIZE, SIZE), masks, 1.0, 0.5)
    with pytest.raises(ValueError, match="box_energy='ratio' is invalid: expected 'centroid' or 'extent'"):
        LossConfig(box_energy="ratio")


def disc(center: tuple[float, float], radius: float, size: int = SIZE) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return ((ys - center[0]) ** 2 + (xs - center[1]) ** 2 < radius**2).float()


@pytest.mark.parametrize("size", [16, 32, 64])
def test_blob_radius_follows_the_blob_size_at_any_map_scale(size):
    """Blobs of two sizes on maps of three scales: the radius doubles with the blob, whatever the
    grid and the map's values; a fixed radius (scaled_radius) does not depend on the blob at all."""
    unit = size / 16  # cells per cell of a 16x16 map
    centre = ((size - 1) / 2, (size - 1) / 2)
    small, large = blob(centre, size, sigma=1.0 * unit), blob(centre, size, sigma=2.0 * unit)
    r_small, r_large = losses.blob_radius(torch.stack([small, 7 * large]), 0.5)
    assert r_large / r_small == pytest.approx(2.0, rel=0.15)
    # about a Gaussian's half-height radius, s sqrt(2 ln 2) = 1.18 s, in cells of this map
    assert r_small == pytest.approx(1.18 * unit, rel=0.3)
    fixed = losses.scaled_radius(CFG.aggregation_radius, size, CFG.reference_resolution)
    assert fixed == losses.scaled_radius(CFG.aggregation_radius, size, CFG.reference_resolution)


def test_blob_radius_of_a_disc_is_its_radius_and_has_no_gradient():
    m = torch.stack([disc((8.0, 8.0), 3.0), disc((8.0, 8.0), 6.0) * 0.2]) + 0.01
    m.requires_grad_(True)
    r = losses.blob_radius(m, 0.5)
    assert not r.requires_grad
    torch.testing.assert_close(r, torch.tensor([3.0, 6.0]), atol=0.25, rtol=0)
    with pytest.raises(ValueError, match="level=0 is invalid"):
        losses.blob_radius(m, 0)


def test_per_map_radii_equal_one_call_per_map():
    maps = torch.stack([blob((3.0, 3.0)) + blob((12.0, 12.0)), blob((8.0, 4.0), sigma=2.5)])
    radii = torch.tensor([2.0, 4.5])
    masks = losses.ball_mask(torch.tensor([[5.0, 5.0], [5.0, 5.0]]), SIZE, SIZE, radii)
    assert masks[0].sum() < masks[1].sum()
    together = losses.aggregation_loss(maps, 3, radii)
    alone = torch.cat([losses.aggregation_loss(maps[i : i + 1], 3, float(radii[i])) for i in range(2)])
    torch.testing.assert_close(together, alone)
    anchors = maps.flip(0)
    together = losses.alignment_loss(maps, anchors, 3, radii)
    alone = torch.cat(
        [losses.alignment_loss(maps[i : i + 1], anchors[i : i + 1], 3, float(radii[i])) for i in range(2)]
    )
    torch.testing.assert_close(together, alone)


def test_the_first_peak_region_scales_with_the_subjects_only_with_the_blobs_radius():
    """Two subjects of size ``unit`` side by side (4 ``unit`` apart), at three sizes: with the
    adaptive radius (the default factor times ``blob_radius``) the ball around the first peak holds
    the same share of its subject at every size and nothing of the neighbour. A fixed radius suits
    one size only: 8 cells take in the neighbour of the smallest pair and a fraction of the largest
    subject."""
    size = 96
    peak = torch.tensor([[24.0, 48.0]])
    adaptive, fixed = [], []
    for unit in (2.0, 4.0, 8.0):
        one, other = blob((24.0, 48.0), size, sigma=unit), blob((24.0 + 4 * unit, 48.0), size, sigma=unit)
        radius = CFG.aggregation_factor * losses.blob_radius((1.5 * one + other)[None], CFG.radius_level)
        for r, out in ((radius, adaptive), (8.0, fixed)):
            ball = losses.ball_mask(peak, size, size, r)[0]
            out.append((float((ball * one).sum()), float((ball * other).sum())))
    own = [o for o, _ in adaptive]
    assert max(own) - min(own) < 0.1 and min(own) > 0.3
    assert all(n < 0.01 for _, n in adaptive)
    assert fixed[0][1] > 0.3  # the small pair: the neighbour is inside
    assert fixed[0][0] > 0.95 and fixed[2][0] < 0.5  # all of a small subject, part of a large one


def test_split_costs_a_second_blob_and_its_gradient_drains_the_weaker_one():
    one = blob((4, 4), mass=1.8)
    two = blob((4, 4)) + blob((11, 11), mass=0.8)  # same mass, split in two
    m = batch(one, two)
    out = assert_unchanged_and_grad(lambda x: losses.split_loss(x, 3.0, 0.3), m)
    assert out[0] < 1e-6 < 0.05 < out[1] < 0.45
    (grad,) = torch.autograd.grad(losses.split_loss(m, 3.0, 0.3).sum(), m)
    # Descending moves mass out of the weaker blob (positive gradient there) into the stronger one.
    assert grad[1, 11, 11] > 0 > grad[1, 4, 4]


def test_split_is_zero_for_one_blob_and_flat_maps_and_scale_invariant():
    one = blob((7, 7), sigma=1.5)
    flat = torch.full((SIZE, SIZE), 0.1)
    two = blob((3, 3)) + blob((12, 12), mass=0.5)
    out = losses.split_loss(torch.stack([one, flat, two, 5 * two]), torch.tensor([4.0, 4.0, 3.0, 3.0]), 0.3)
    assert out[0] < 1e-6 and out[1] == 0
    torch.testing.assert_close(out[2], out[3])
    with pytest.raises(ValueError, match=r"level=1.0 is invalid: expected a number in \[0, 1\)"):
        losses.split_loss(one[None], 3.0, 1.0)


def test_split_sees_two_blobs_that_aggregation_with_k_2_sees_as_gathered():
    # Two blobs, each inside one of the k peak balls: centroids sit on the peaks, so aggregation only
    # reads their distance; moving the weaker blob's mass onto the first blob lowers split to 0.
    two = blob((4, 4)) + blob((11, 11), mass=0.9)
    one = blob((4, 4), mass=1.9)
    assert losses.split_loss(two[None], 3.0, 0.3) > 0.05
    assert losses.split_loss(one[None], 3.0, 0.3) < 1e-6


def test_the_coordinate_grid_is_made_once_and_serves_passes_with_grad_after_inference_mode():
    """The losses ask for the cell grid a dozen times per guided pass: one tensor per size is made
    and shared, also when it was first made under ``torch.inference_mode`` (the one later used in a
    pass with grad must be a plain tensor, or the backward refuses it)."""
    losses._coordinates.cache_clear()
    with torch.inference_mode():
        first = losses._grid(7, 5, torch.zeros(1))
        losses.aggregation_loss(torch.rand(2, 7, 5), 3, 2.0)
    assert losses._grid(7, 5, torch.ones(3)) is first
    assert first[3, 4].tolist() == [3.0, 4.0] and not first.is_inference()
    m = torch.rand(2, 7, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(losses.aggregation_loss(m, 3, 2.0).sum(), m)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert losses._grid(7, 5, torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


def test_spatial_softmax_sums_to_one_drops_the_floor_and_sharpens_with_a_lower_temperature():
    maps = torch.stack([blob((4.0, 4.0)) + 0.05, blob((10.0, 12.0), sigma=2.0) + 0.2])[:, None]
    soft = losses.spatial_softmax(maps, 0.1)
    torch.testing.assert_close(soft.sum(dim=(2, 3)), torch.ones(2, 1))
    torch.testing.assert_close(losses.spatial_softmax(maps + 0.3, 0.1), soft)
    peak = soft.flatten(2).amax(-1)
    assert (losses.spatial_softmax(maps, 0.05).flatten(2).amax(-1) > peak).all()
    assert (peak > (maps / maps.sum(dim=(2, 3), keepdim=True)).flatten(2).amax(-1)).all()


def test_reduce_box_energy_max_takes_the_group_with_the_least_in_its_box():
    """``reduce="max"``: the energy of the group whose maps hold the least of their mass in their box
    (each group's maps averaged); ``"mean"`` is the mean over the maps, as before."""
    energy = torch.tensor([[0.2, 0.4, 0.9, 0.5], [0.8, 0.6, 0.1, 0.3]], requires_grad=True)
    groups = [0, 0, 1, 2]  # group 0 has two maps (a noun and its attribute)
    inside = torch.tensor([[0.5, 0.3, 0.1, 0.6], [0.1, 0.1, 0.4, 0.2]])
    torch.testing.assert_close(losses.reduce_box_energy(energy, groups), energy.mean(dim=1))
    worst = losses.reduce_box_energy(energy, groups, "max", inside)
    torch.testing.assert_close(worst, torch.tensor([0.9, 0.7]))  # group 1; group 0 ((0.8 + 0.6) / 2)
    (grad,) = torch.autograd.grad(worst.sum(), energy)
    assert grad.tolist() == [[0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]]  # only the lagging group pulls
    # without shares: the highest energy
    torch.testing.assert_close(losses.reduce_box_energy(energy, groups, "max"), torch.tensor([0.9, 0.7]))
    with pytest.raises(ValueError, match="reduce='min' is invalid: expected 'mean' or 'max'"):
        losses.reduce_box_energy(energy, groups, "min")
    with pytest.raises(ValueError, match="groups of length 3 do not match the 4 maps"):
        losses.reduce_box_energy(energy, [0, 1, 2], "max")


def test_box_losses_with_reduce_max_pull_only_the_group_outside_its_box():
    masks = losses.box_masks([(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)], SIZE, SIZE)
    maps = torch.stack([blob((8.0, 4.0)), blob((8.0, 4.0))])[None].requires_grad_(True)  # group 1 is out
    for loss in (
        losses.box_loss(maps, masks, 1.0, reduce="max"),
        losses.box_extent_loss(maps, masks, 1.0, 0.5, reduce="max"),
    ):
        (grad,) = torch.autograd.grad(loss.sum(), maps)
        assert grad[0, 0].abs().sum() == 0 and grad[0, 1].abs().sum() > 0
    mean = losses.box_loss(maps, masks, 1.0)
    torch.testing.assert_close(losses.box_loss(maps, masks, 1.0, groups=[0, 1], reduce="mean"), mean)
    with pytest.raises(ValueError, match="box_reduce='min' is invalid: expected 'mean' or 'max'"):
        LossConfig(box_reduce="min")
