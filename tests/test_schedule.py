"""The schedule: which steps are guided, the shipped shapes model's schedule and the named presets."""

import pytest

from ait2i_ext import ScheduleConfig
from ait2i_ext.config import LossConfig, model_config, read_model_settings, write_model_settings
from ait2i_ext.shapes.model import SHAPES_LOSS, SHAPES_SCHEDULE, default_model_path


@pytest.mark.parametrize(
    "fraction, steps, expected",
    [(0.5, 25, tuple(range(12))), (0.5, 50, tuple(range(25))), (0.2, 25, tuple(range(5))), (0.0, 25, ())],
)
def test_guided_steps_are_the_first_fraction_of_the_steps(fraction, steps, expected):
    schedule = ScheduleConfig(guided_fraction=fraction)
    assert schedule.guided_steps(steps) == expected
    assert [i for i, size in enumerate(schedule.step_sizes(steps)) if size > 0] == list(expected)


def test_the_shipped_shapes_model_has_its_own_schedule_and_reference_restores_the_authors():
    model = default_model_path()
    assert read_model_settings(model)["schedule"] == {"guided_fraction": 0.2, "step_scale": 40.0}
    shipped = model_config(model).schedule
    assert shipped == SHAPES_SCHEDULE
    assert (shipped.guided_steps(25), shipped.step_scale) == ((0, 1, 2, 3, 4), 40.0)
    assert model_config(model).loss.aggregation_radius == 2.5  # the radii stay
    # pinned in its ait2i.json: the library default (calibrated) does not reach it
    assert model_config(model).loss.radius_mode == SHAPES_LOSS.radius_mode == "fixed"
    assert model_config(model).loss.w_split == SHAPES_LOSS.w_split == 2.0  # the split term is on
    reference = model_config(model, preset="reference").schedule
    assert (reference.guided_steps(25), reference.step_scale) == (tuple(range(12)), 20.0)


@pytest.mark.parametrize(
    "steps, expected",
    [(25, (0, 1)), (50, (0, 1, 2, 3)), (20, (0,))],  # 8 % of the steps, at least one from 13 steps on
)
def test_fast_preset_guides_few_steps_at_a_larger_step_over_any_models_schedule(tmp_path, steps, expected):
    write_model_settings(tmp_path, schedule={"guided_fraction": 0.6, "step_scale": 5.0})
    for model in (None, tmp_path, default_model_path()):
        fast = model_config(model, preset="fast").schedule
        assert (fast.guided_steps(steps), fast.step_scale) == (expected, 60.0), model
    assert model_config(tmp_path, preset="fast", schedule={"step_scale": 30.0}).schedule.step_scale == 30.0


def test_the_library_default_radii_need_no_per_model_setting():
    """Without an ``ait2i.json`` radius the radii come from the maps: calibrated on the first guided
    pass, 0.85 / 1.0 times the smallest blob size of an image's subjects (docs/method.md, tenth sitting)."""
    loss = LossConfig()
    assert (loss.radius_mode, loss.radius_share) == ("calibrated", "min")
    assert (loss.aggregation_factor, loss.alignment_factor) == (0.85, 1.0)
    assert model_config().loss.radius_mode == "calibrated"
