"""The objective: maps per group -> weighted losses, on synthetic attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ait2i_ext import losses
from ait2i_ext.config import LossConfig
from ait2i_ext.objective import LossTerms, compute_losses, existence_maps, group_maps, group_radii
from ait2i_ext.tokens import TokenGroup

N, H, W, T = 2, 16, 16, 77
EOT = 7  # "<bos> a red cat and a dog <eot>"
CAT = TokenGroup("cat", main=3, members=(2,))
DOG = TokenGroup("dog", main=6)
TERMS = ("isolation", "aggregation", "alignment", "existence", "box", "split")
WEIGHTS = {
    "isolation": "w_isolation",
    "aggregation": "w_aggregation",
    "alignment": "w_alignment",
    "existence": "w_existence",
    "box": "w_box",
    "split": "w_split",
}


def random_attention(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(N, H, W, T, generator=gen) * 3, dim=-1).to(dtype)


def test_group_maps_picks_main_tokens():
    attn = random_attention()
    maps = group_maps(attn, [CAT, DOG])
    assert maps.shape == (N, 2, H, W)
    assert torch.equal(maps[:, 0], attn[..., 3]) and torch.equal(maps[:, 1], attn[..., 6])


def _attend_and_excite():
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import (
        pipeline_stable_diffusion_attend_and_excite as ae,
    )

    return ae


def test_smoothing_is_attend_and_excites_gaussian_smoothing():
    ae = _attend_and_excite()
    maps = random_attention()[..., 3]
    padded = torch.nn.functional.pad(maps[:, None], (1, 1, 1, 1), mode="reflect")
    expected = ae.GaussianSmoothing(channels=1, kernel_size=3, sigma=0.5)(padded)[:, 0]
    torch.testing.assert_close(losses.smooth(maps, 3, 0.5), expected)


@pytest.mark.parametrize("tokens", ["all", "words"])
def test_existence_maps_match_attend_and_excites_maxima(tokens):
    """``"all"``: diffusers' Attend-and-Excite as it is (softmax over tokens ``1:-1``); ``"words"``:
    the same code given only the tokens up to the end-of-text token (softmax over the words)."""
    ae = _attend_and_excite().StableDiffusionAttendAndExcitePipeline
    attn = random_attention()
    cfg = LossConfig(existence_tokens=tokens)
    maxima = existence_maps(attn, [CAT, DOG], EOT, cfg).amax(dim=(2, 3))
    for n in range(N):
        image = attn[n].clone() if tokens == "all" else attn[n, :, :, : EOT + 1].clone()
        expected = torch.stack(ae._compute_max_attention_per_index(image, [CAT.main, DOG.main]))
        torch.testing.assert_close(maxima[n], expected)
    other = LossConfig(existence_tokens="words" if tokens == "all" else "all")
    assert not torch.allclose(maxima, existence_maps(attn, [CAT, DOG], EOT, other).amax(dim=(2, 3)))


def test_compute_losses_shapes_grad_and_inputs_unchanged():
    attn = random_attention().requires_grad_(True)
    before = attn.detach().clone()
    groups = [dataclasses.replace(CAT, box=(0, 0, 0.5, 1)), DOG]
    terms = compute_losses(attn, groups, EOT, LossConfig(w_split=1.0))
    assert torch.equal(attn.detach(), before)
    for field in dataclasses.fields(LossTerms):
        value = getattr(terms, field.name)
        assert value.shape == (N,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    for name in TERMS:
        assert getattr(terms, name).abs().sum() > 0, name
    (grad,) = torch.autograd.grad(terms.total.sum(), attn)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    floats = terms.as_floats()
    assert set(floats) == {"total", *TERMS} and all(isinstance(v, float) for v in floats.values())


def test_total_is_the_weighted_sum_and_zero_weight_removes_a_term():
    attn = random_attention()
    groups = [dataclasses.replace(CAT, box=(0, 0, 0.5, 1)), dataclasses.replace(DOG, box=(0.5, 0, 1, 1))]
    cfg = LossConfig(
        w_isolation=0.5, w_aggregation=1.5, w_existence=2.0, w_alignment=3.0, w_box=4.0, w_split=5.0
    )
    terms = compute_losses(attn, groups, EOT, cfg)
    expected = sum(getattr(cfg, WEIGHTS[name]) * getattr(terms, name) for name in TERMS)
    torch.testing.assert_close(terms.total, expected)
    for name in TERMS:
        zeroed = compute_losses(attn, groups, EOT, dataclasses.replace(cfg, **{WEIGHTS[name]: 0.0}))
        torch.testing.assert_close(
            zeroed.total, terms.total - getattr(cfg, WEIGHTS[name]) * getattr(terms, name)
        )


def test_one_group_has_zero_isolation_and_no_box_without_boxes():
    terms = compute_losses(random_attention(), [CAT], EOT, LossConfig())
    assert torch.equal(terms.isolation, torch.zeros(N))
    assert torch.equal(terms.box, torch.zeros(N))
    assert (terms.aggregation > 0).all()


def test_boxes_can_be_disabled():
    groups = [dataclasses.replace(CAT, box=(0, 0, 0.5, 1)), DOG]
    attn = random_attention()
    assert (compute_losses(attn, groups, EOT, LossConfig()).box > 0).all()
    assert torch.equal(
        compute_losses(attn, groups, EOT, LossConfig(), boxes_enabled=False).box, torch.zeros(N)
    )


def test_group_without_members_has_zero_alignment():
    terms = compute_losses(random_attention(), [DOG], EOT, LossConfig())
    assert torch.equal(terms.alignment, torch.zeros(N))


def test_isolation_mode_comes_from_config():
    attn = random_attention()
    euclid = compute_losses(attn, [CAT, DOG], EOT, LossConfig(isolation="euclidean")).isolation
    cosine = compute_losses(attn, [CAT, DOG], EOT, LossConfig(isolation="cosine")).isolation
    assert not torch.allclose(euclid, cosine)


def test_fp16_input_gives_fp32_losses():
    attn = random_attention(dtype=torch.float16)
    terms = compute_losses(attn, [CAT, DOG], EOT, LossConfig())
    assert all(v.dtype == torch.float32 for v in dataclasses.asdict(terms).values())
    reference = compute_losses(attn.float(), [CAT, DOG], EOT, LossConfig())
    torch.testing.assert_close(terms.total, reference.total)


def test_separated_attention_scores_lower_than_overlapping():
    def attention(cat_at, dog_at):
        attn = torch.full((1, H, W, T), 1e-3)
        attn[0, cat_at[0] - 2 : cat_at[0] + 2, cat_at[1] - 2 : cat_at[1] + 2, CAT.main] = 1.0
        attn[0, cat_at[0] - 2 : cat_at[0] + 2, cat_at[1] - 2 : cat_at[1] + 2, CAT.members[0]] = 1.0
        attn[0, dog_at[0] - 2 : dog_at[0] + 2, dog_at[1] - 2 : dog_at[1] + 2, DOG.main] = 1.0
        return attn

    cfg = LossConfig()
    apart = compute_losses(attention((3, 3), (12, 12)), [CAT, DOG], EOT, cfg)
    together = compute_losses(attention((7, 7), (8, 8)), [CAT, DOG], EOT, cfg)
    assert apart.isolation < together.isolation
    assert apart.total < together.total


@pytest.mark.parametrize(
    ("groups", "eot", "match"),
    [
        ([TokenGroup("cat", main=80)], EOT, "token index 80 of group 'cat'"),
        ([TokenGroup("cat", main=3, members=(9,))], EOT, "token index 9 of group 'cat'"),
        ([TokenGroup("bos", main=0)], EOT, "token index 0"),
        ([CAT], 77, "eot_index=77"),
        ([CAT], 1, "eot_index=1"),
        ([], EOT, "groups is empty"),
    ],
)
def test_compute_losses_validates_indices(groups, eot, match):
    with pytest.raises(ValueError, match=match):
        compute_losses(random_attention(), groups, eot, LossConfig())


def test_compute_losses_validates_attention_shape():
    with pytest.raises(ValueError, match=r"\(N, H, W, T\)"):
        compute_losses(torch.rand(H, W, T), [CAT], EOT, LossConfig())


def test_group_maps_validates_token_range():
    with pytest.raises(ValueError, match="T=77"):
        group_maps(random_attention(), [TokenGroup("x", main=77)])


def test_radii_scale_with_map_size():
    # A 32x32 map of the 16x16 layout upsampled gives the same aggregation as the 16x16 map.
    attn = torch.full((1, H, W, T), 1e-3)
    attn[0, 2:4, 2:4, DOG.main] = 1.0
    attn[0, 12:14, 12:14, DOG.main] = 0.5
    big = attn.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    fixed = LossConfig(radius_mode="fixed")
    small = compute_losses(attn, [DOG], EOT, fixed).aggregation
    large = compute_losses(big, [DOG], EOT, fixed).aggregation
    torch.testing.assert_close(small, large, atol=0.03, rtol=0)


def test_batched_terms_equal_the_per_group_sums():
    """compute_losses batches every map into one call; it must equal the loss of each map summed."""
    torch.manual_seed(0)
    attn = torch.rand(3, 16, 16, 20).softmax(-1)
    groups = [TokenGroup("a", 2, (3,)), TokenGroup("b", 5, ()), TokenGroup("c", 8, (9, 10))]
    cfg = LossConfig(radius_mode="fixed")
    terms = compute_losses(attn, groups, 12, cfg)
    main = group_maps(attn, groups)
    agg = sum(losses.aggregation_loss(main[:, g], cfg.top_k, cfg.aggregation_radius) for g in range(3))
    align = sum(
        losses.alignment_loss(attn[..., m], main[:, g], cfg.top_k, cfg.alignment_radius)
        for g, group in enumerate(groups)
        for m in group.members
    )
    assert torch.allclose(terms.aggregation, agg, atol=1e-6)
    assert torch.allclose(terms.alignment, align, atol=1e-6)


def test_box_members_pull_attribute_maps_into_their_groups_box():
    cat_box, dog_box = (0, 0, 0.5, 1), (0.5, 0, 1, 1)
    groups = [dataclasses.replace(CAT, box=cat_box), dataclasses.replace(DOG, box=dog_box)]
    attn = random_attention()
    cfg = LossConfig(box_members=True)
    masks = losses.box_masks([cat_box, cat_box, dog_box], H, W)  # cat's "red" shares the cat's box
    maps = attn[..., [3, 2, 6]].permute(0, 3, 1, 2)
    expected = losses.box_loss(maps, masks, cfg.box_centroid_weight, cfg.box_leak_weight, cfg.box_power)
    torch.testing.assert_close(compute_losses(attn, groups, EOT, cfg).box, expected)
    # "red" all in the dog's box costs the member term, not the main-token term
    moved = attn.clone()
    moved[..., 2] = 0
    moved[:, :, W // 2 :, 2] = 1
    off = LossConfig(box_members=False)
    assert torch.equal(
        compute_losses(moved, groups, EOT, off).box, compute_losses(attn, groups, EOT, off).box
    )
    assert (compute_losses(moved, groups, EOT, cfg).box > compute_losses(attn, groups, EOT, cfg).box).all()


def _two_subjects(cat_side: int, dog_side: int) -> torch.Tensor:
    """Attention with a ``cat_side``-cell square cat and a ``dog_side``-cell square dog."""
    attn = torch.full((1, H, W, T), 1e-3)
    attn[0, 1 : 1 + cat_side, 1 : 1 + cat_side, CAT.main] = 1.0
    attn[0, 8 : 8 + dog_side, 8 : 8 + dog_side, DOG.main] = 1.0
    return attn


def test_adaptive_radii_follow_each_subjects_blob_and_fixed_radii_do_not():
    main = group_maps(_two_subjects(2, 6), [CAT, DOG])
    fixed = group_radii(main, LossConfig(radius_mode="fixed", aggregation_radius=2.5, alignment_radius=3.0))
    assert fixed[0].tolist() == [[2.5, 2.5]] and fixed[1].tolist() == [[3.0, 3.0]]
    cfg = LossConfig(radius_mode="adaptive", aggregation_factor=1.0, alignment_factor=1.5, radius_share="own")
    aggregation, alignment = group_radii(main, cfg)
    assert aggregation[0, 1] == pytest.approx(3 * aggregation[0, 0])  # 6 cells wide vs 2
    torch.testing.assert_close(alignment, 1.5 * aggregation)
    # the same subjects on a map of twice the resolution: twice the radii, in its cells
    big = group_maps(_two_subjects(2, 6).repeat_interleave(2, 1).repeat_interleave(2, 2), [CAT, DOG])
    torch.testing.assert_close(group_radii(big, cfg)[0], 2 * aggregation)


def test_adaptive_mode_gives_the_per_group_sums_with_each_groups_radius():
    attn = _two_subjects(2, 6)
    attn[0, 12:14, 1:3, CAT.members[0]] = 1.0
    cfg = LossConfig(radius_mode="adaptive", radius_share="own")
    terms = compute_losses(attn, [CAT, DOG], EOT, cfg)
    main = group_maps(attn, [CAT, DOG])
    radii = [cfg.aggregation_factor * losses.blob_radius(main[:, g], cfg.radius_level) for g in range(2)]
    agg = sum(losses.aggregation_loss(main[:, g], cfg.top_k, radii[g]) for g in range(2))
    align = losses.alignment_loss(
        attn[..., CAT.members[0]],
        main[:, 0],
        cfg.top_k,
        cfg.alignment_factor / cfg.aggregation_factor * radii[0],
    )
    torch.testing.assert_close(terms.aggregation, agg)
    torch.testing.assert_close(terms.alignment, align)
    assert not torch.equal(
        terms.aggregation, compute_losses(attn, [CAT, DOG], EOT, LossConfig(radius_mode="fixed")).aggregation
    )


def test_calibrated_radii_are_measured_as_adaptive_ones_and_given_radii_replace_them():
    """``"calibrated"`` measures as ``"adaptive"`` (on a run's first pass); radii passed in are used as
    they are, whatever the mode (a calibrated run's held radii), and must be one per image and group."""
    attn = _two_subjects(2, 6)
    attn[0, 12:14, 1:3, CAT.members[0]] = 1.0
    main = group_maps(attn, [CAT, DOG])
    adaptive, calibrated = LossConfig(radius_mode="adaptive"), LossConfig(radius_mode="calibrated")
    for got, want in zip(group_radii(main, calibrated), group_radii(main, adaptive)):
        torch.testing.assert_close(got, want)
    held = (main.new_tensor([[1.5, 4.0]]), main.new_tensor([[2.0, 5.0]]))
    given = compute_losses(attn, [CAT, DOG], EOT, calibrated, radii=held)
    assert not torch.equal(given.aggregation, compute_losses(attn, [CAT, DOG], EOT, calibrated).aggregation)
    agg = sum(losses.aggregation_loss(main[:, g], calibrated.top_k, held[0][:, g]) for g in range(2))
    align = losses.alignment_loss(attn[..., CAT.members[0]], main[:, 0], calibrated.top_k, held[1][:, 0])
    torch.testing.assert_close(given.aggregation, agg)
    torch.testing.assert_close(given.alignment, align)
    fixed = LossConfig(radius_mode="fixed", aggregation_radius=1.5, alignment_radius=2.0)
    torch.testing.assert_close(
        compute_losses(
            attn,
            [CAT, DOG],
            EOT,
            calibrated,
            radii=(held[0][:, :1].repeat(1, 2), held[1][:, :1].repeat(1, 2)),
        ).total,
        compute_losses(attn, [CAT, DOG], EOT, fixed).total,
    )
    with pytest.raises(
        ValueError,
        match=r"radii of shapes \[\(1, 1\), \(1, 2\)\] are invalid: expected two of shape \(1, 2\)",
    ):
        compute_losses(attn, [CAT, DOG], EOT, calibrated, radii=(held[0][:, :1], held[1]))


@pytest.mark.parametrize(
    "field, value, match",
    [
        (
            "radius_mode",
            "auto",
            "radius_mode='auto' is invalid: expected 'fixed', 'adaptive' or 'calibrated'",
        ),
        ("aggregation_factor", 0.0, "aggregation_factor=0.0 is invalid: expected a number > 0"),
        ("alignment_factor", -1.0, "alignment_factor=-1.0 is invalid"),
        ("radius_level", 1.5, r"radius_level=1.5 is invalid: expected a fraction in \(0, 1\]"),
        ("w_split", -1.0, "w_split=-1.0 is invalid: expected a weight >= 0"),
        ("split_factor", 0.0, "split_factor=0.0 is invalid: expected a number > 0"),
        ("split_level", 1.0, r"split_level=1.0 is invalid: expected a fraction in \[0, 1\)"),
    ],
)
def test_radius_fields_are_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**{field: value})


def test_box_existence_reads_a_boxed_groups_map_inside_its_box_only():
    """With ``box_existence`` a subject whose attention peaks outside its box does not exist for the
    existence term; unboxed groups and the other terms read as before."""
    cat_box, dog_box = (0, 0, 0.5, 1), (0.5, 0, 1, 1)
    attn = torch.full((1, H, W, T), 0.01)
    attn[0, 4, 12, 3] = 1.0  # the cat's peak, in the dog's half
    attn[0, 4, 12, 6] = 1.0  # the dog's, in its own half
    boxed = [dataclasses.replace(CAT, box=cat_box), dataclasses.replace(DOG, box=dog_box)]
    on, off = LossConfig(box_existence=True), LossConfig()
    inside = compute_losses(attn, boxed, EOT, on)
    anywhere = compute_losses(attn, boxed, EOT, off)
    assert inside.existence > anywhere.existence + 0.1
    scaled = existence_maps(attn, boxed, EOT, on)
    expected = 1 - (scaled[0, 0] * losses.box_masks([cat_box], H, W)[0]).max()
    torch.testing.assert_close(inside.existence, expected.view(1))
    for name in ("isolation", "aggregation", "alignment", "box"):
        assert torch.equal(getattr(inside, name), getattr(anywhere, name))
    unboxed = [CAT, DOG]
    assert torch.equal(
        compute_losses(attn, unboxed, EOT, on).existence, compute_losses(attn, unboxed, EOT, off).existence
    )
    with pytest.raises(ValueError, match="box_existence"):
        LossConfig(box_existence=1)


def _assert_other_terms_equal(a: LossTerms, b: LossTerms) -> None:
    """Every term but the box term is the same in ``a`` and ``b`` (a box option changed only that)."""
    for name in ("isolation", "aggregation", "alignment", "existence"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_box_maps_words_reads_where_a_word_wins_not_its_diffuse_share():
    """A subject's probability is spread over the whole image and only wins inside its box: the raw
    maps' in-box share is about the box's area, the maps after the softmax over the words put it in
    the box, so ``box_maps="words"`` gives a much lower box term; the other terms are unchanged."""
    cat_box = (0, 0, 0.5, 0.5)
    attn = torch.full((1, H, W, T), 0.02)
    attn[..., 3] = 0.1  # the cat's token: the same share everywhere ...
    attn[0, : H // 2, : W // 2, 3] = 0.12  # ... a little more in its box, where it beats every word
    attn[0, :, :, 4] = 0.11  # "and" wins everywhere else
    attn[0, : H // 2, : W // 2, 4] = 0.05
    boxed = [dataclasses.replace(CAT, box=cat_box, members=())]
    raw = compute_losses(attn, boxed, EOT, LossConfig())
    words = compute_losses(attn, boxed, EOT, LossConfig(box_maps="words"))
    assert words.box < raw.box - 0.3
    _assert_other_terms_equal(words, raw)
    with pytest.raises(
        ValueError, match="box_maps='soft' is invalid: expected 'raw', 'words', 'peaked' or 'softmax'"
    ):
        LossConfig(box_maps="soft")


def _cat_over_a_floor():
    """The cat's map: a floor everywhere and its object in its box (the top-left quarter)."""
    attn = torch.full((1, H, W, T), 0.02)
    attn[..., 3] = 0.1
    attn[0, 2:6, 2:6, 3] = 0.5
    return attn, [dataclasses.replace(CAT, box=(0, 0, 0.5, 0.5), members=())]


def test_box_maps_peaked_reads_the_map_above_its_floor():
    """The cat's map: a floor everywhere and its object in its box; the raw map's in-box share is
    small (the floor outside counts), the map less its median puts it all in the box."""
    attn, boxed = _cat_over_a_floor()
    raw = compute_losses(attn, boxed, EOT, LossConfig())
    peaked = compute_losses(attn, boxed, EOT, LossConfig(box_maps="peaked"))
    assert peaked.box < raw.box - 0.3
    _assert_other_terms_equal(peaked, raw)


def test_box_maps_softmax_ignores_the_floor_and_puts_the_peak_in_the_box():
    """The cat's map as above: its softmax over the cells puts nearly all of it in the box, whatever
    the floor (the same map with a higher floor gives the same box term)."""
    attn, boxed = _cat_over_a_floor()
    raw = compute_losses(attn, boxed, EOT, LossConfig())
    soft = compute_losses(attn, boxed, EOT, LossConfig(box_maps="softmax"))
    assert soft.box < raw.box - 0.5 and float(soft.box) < 0.05
    _assert_other_terms_equal(soft, raw)
    higher = attn.clone()
    higher[..., 3] += 0.2
    torch.testing.assert_close(
        compute_losses(higher, boxed, EOT, LossConfig(box_maps="softmax")).box, soft.box
    )
    with pytest.raises(ValueError, match="box_temperature=0.0 is invalid: expected a number > 0"):
        LossConfig(box_maps="softmax", box_temperature=0.0)


def test_box_energy_extent_replaces_the_centroid_pull_only():
    """``box_energy="extent"`` changes the box term (:func:`~ait2i_ext.losses.box_extent_loss`), no other."""
    attn = torch.rand(2, H, W, T, generator=torch.Generator().manual_seed(0))
    boxed = [dataclasses.replace(CAT, box=(0, 0, 0.5, 0.5)), dataclasses.replace(DOG, box=(0.5, 0, 1, 1))]
    centroid = compute_losses(attn, boxed, EOT, LossConfig())
    extent = compute_losses(attn, boxed, EOT, LossConfig(box_energy="extent"))
    assert not torch.allclose(extent.box, centroid.box)
    _assert_other_terms_equal(extent, centroid)


def test_box_far_weight_adds_the_distance_pull_to_the_centroid_energy_only():
    """``box_far_weight`` reaches :func:`~ait2i_ext.losses.box_loss` (off by default), no other term."""
    attn = torch.rand(2, H, W, T, generator=torch.Generator().manual_seed(0))
    boxed = [dataclasses.replace(CAT, box=(0, 0, 0.3, 0.3)), dataclasses.replace(DOG, box=(0.5, 0, 1, 1))]
    base = compute_losses(attn, boxed, EOT, LossConfig())
    far = compute_losses(attn, boxed, EOT, LossConfig(box_far_weight=2.0))
    assert (far.box > base.box + 0.01).all()
    _assert_other_terms_equal(far, base)
    with pytest.raises(ValueError, match="box_far_weight=-1.0 is invalid: expected a weight >= 0"):
        LossConfig(box_far_weight=-1.0)


def test_box_isolation_weight_frees_groups_in_disjoint_boxes_from_isolation():
    """``box_isolation_weight`` scales the isolation term between groups whose boxes do not overlap
    (1, the default: as without boxes); without boxes it changes nothing."""
    attn = torch.rand(2, H, W, T, generator=torch.Generator().manual_seed(0))
    boxed = [dataclasses.replace(CAT, box=(0, 0, 0.4, 1)), dataclasses.replace(DOG, box=(0.6, 0, 1, 1))]
    full = compute_losses(attn, boxed, EOT, LossConfig())
    half = compute_losses(attn, boxed, EOT, LossConfig(box_isolation_weight=0.5))
    torch.testing.assert_close(half.isolation, full.isolation / 2)
    torch.testing.assert_close(half.total, full.total - LossConfig().w_isolation * full.isolation / 2)
    assert torch.equal(
        compute_losses(attn, boxed, EOT, LossConfig(box_isolation_weight=0.0)).isolation, torch.zeros(2)
    )
    unboxed = compute_losses(attn, [CAT, DOG], EOT, LossConfig(box_isolation_weight=0.0))
    assert torch.equal(unboxed.isolation, compute_losses(attn, [CAT, DOG], EOT, LossConfig()).isolation)
    with pytest.raises(
        ValueError, match=r"box_isolation_weight=2.0 is invalid: expected a fraction in \[0, 1\]"
    ):
        LossConfig(box_isolation_weight=2.0)


def test_split_term_costs_a_subject_drawn_twice_and_is_off_by_default():
    # The cat's map: one blob (image 0) or the same blob plus a second one far away (image 1).
    attn = torch.full((2, H, W, T), 1e-3)
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")

    def disc(y, x):
        return (((ys - y) ** 2 + (xs - x) ** 2) < 4).float()

    attn[0, ..., CAT.main] += disc(4, 4)
    attn[1, ..., CAT.main] += disc(4, 4) + 0.8 * disc(11, 11)
    attn[..., DOG.main] += disc(11, 4)
    assert torch.equal(compute_losses(attn, [CAT, DOG], EOT, LossConfig()).split, torch.zeros(2))
    terms = compute_losses(attn, [CAT, DOG], EOT, LossConfig(w_split=1.0))
    assert terms.split[0] < 0.01 < 0.1 < terms.split[1]


@pytest.mark.parametrize("mode", ["adaptive", "calibrated"])
def test_shared_radius_gives_every_subject_of_an_image_the_smallest_size(mode):
    """``radius_share="min"``: one radius per image, its subjects' smallest blob size (as fixed radii
    are one for all), times the factors; ``"own"`` keeps each subject's."""
    main = group_maps(_two_subjects(2, 6), [CAT, DOG])
    own = group_radii(
        main, LossConfig(radius_mode=mode, aggregation_factor=1.0, alignment_factor=1.5, radius_share="own")
    )
    shared = group_radii(
        main, LossConfig(radius_mode=mode, aggregation_factor=1.0, alignment_factor=1.5, radius_share="min")
    )
    assert own[0][0, 1] == pytest.approx(3 * own[0][0, 0])
    for got, each in zip(shared, own):
        torch.testing.assert_close(got, each[:, :1].expand(-1, 2))
    with pytest.raises(ValueError, match="radius_share='max' is invalid"):
        LossConfig(radius_share="max")
