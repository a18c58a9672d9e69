"""The schedule: which steps are guided (``ScheduleConfig.guided_steps``) and the named presets."""

import pytest

from ait2i_ext import ScheduleConfig
from ait2i_ext.config import PRESETS, model_config, write_model_settings


@pytest.mark.parametrize(
    "fraction, stride, steps, expected",
    [
        (0.5, 1, 25, tuple(range(12))),  # the authors': the first half
        (0.4, 2, 25, (0, 2, 4, 6, 8)),
        (0.4, 2, 20, (0, 2, 4, 6)),
        (0.2, 4, 25, (0, 4)),
        (0.0, 3, 25, ()),
    ],
)
def test_guided_steps_take_every_stride_th_step_of_the_window(fraction, stride, steps, expected):
    schedule = ScheduleConfig(guided_fraction=fraction, guided_stride=stride)
    assert schedule.guided_steps(steps) == expected
    sizes = schedule.step_sizes(steps)
    assert [i for i, size in enumerate(sizes) if size > 0] == list(expected)


def test_stride_keeps_each_guided_steps_size():
    every, strided = ScheduleConfig(), ScheduleConfig(guided_stride=3)
    a, b = every.step_sizes(25), strided.step_sizes(25)
    assert [b[i] for i in (0, 3, 6, 9)] == [a[i] for i in (0, 3, 6, 9)]


@pytest.mark.parametrize("stride", [0, -1, 1.5, "2"])
def test_bad_stride_is_refused_naming_it(stride):
    with pytest.raises(ValueError, match="guided_stride"):
        ScheduleConfig(guided_stride=stride)


def test_reference_preset_restores_the_authors_schedule_over_a_models_stride(tmp_path):
    write_model_settings(tmp_path, schedule={"guided_fraction": 0.2, "guided_stride": 2, "step_scale": 40.0})
    assert model_config(tmp_path).schedule.guided_steps(25) == (0, 2, 4)
    reference = model_config(tmp_path, preset="reference").schedule
    assert reference.guided_steps(50) == tuple(range(25)) and reference.step_scale == 20.0
    assert set(PRESETS["reference"]["schedule"]) >= {"guided_fraction", "guided_stride", "step_scale"}
