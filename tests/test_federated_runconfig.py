"""RunConfig: the validated contract between whoever creates a run and the runner."""

from __future__ import annotations

import json
import math

import pytest

from restwise.server.runconfig import RunConfig, RunConfigError

BASE = dict(name="trial", rounds=3, population=10, sampling="poisson", sampling_rate=0.5, target_epsilon=3.0)


def test_round_trip_through_json_is_identity():
    cfg = RunConfig.from_dict({**BASE, "secagg_num_neighbours": 4, "secagg_threshold": 3})
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.secagg_threshold == 3 and isinstance(again.secagg_threshold, int)
    default = RunConfig.from_dict(BASE)
    assert RunConfig.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    assert default.secagg_threshold == 0.6 and default.secagg_num_neighbours == 32


def test_json_numbers_are_coerced_only_when_exact():
    cfg = RunConfig.from_dict({**BASE, "rounds": 3.0, "clip_norm": 2, "secagg_threshold": 0.6})
    assert cfg.rounds == 3 and isinstance(cfg.rounds, int)
    assert cfg.clip_norm == 2.0 and isinstance(cfg.clip_norm, float)
    assert cfg.secagg_threshold == 0.6
    with pytest.raises(RunConfigError) as err:
        RunConfig.from_dict({**BASE, "rounds": 2.5})
    assert err.value.field == "rounds"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": True}, "rounds"),
        ({"model": "gpt"}, "model"),
        ({"sampling": "stratified"}, "sampling"),
        ({"sampling_rate": None}, "sampling_rate"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"cohort_size": 4}, "cohort_size"),
        ({"sampling": "fixed", "sampling_rate": None}, "cohort_size"),
        ({"sampling": "fixed", "sampling_rate": None, "cohort_size": 11}, "cohort_size"),
        ({"noise_multiplier": 1.0}, "target_epsilon"),
        ({"target_epsilon": None}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": None, "noise_multiplier": 0.3}, "noise_multiplier"),
        ({"delta": 0.0}, "delta"),
        ({"clip_norm": math.inf}, "clip_norm"),
        ({"clip_norm": math.nan}, "clip_norm"),
        ({"secagg_threshold": 5, "secagg_num_neighbours": 4}, "secagg_threshold"),
        ({"secagg_threshold": 2.5}, "secagg_threshold"),
        ({"max_dropout_fraction": 0.5}, "max_dropout_fraction"),
        ({"round_timeout_s": 0}, "round_timeout_s"),
        ({"dataset": "mystery"}, "dataset"),
        ({"persons": 5}, "population"),
        ({"noise": "none"}, "noise"),
        ({"noise": "distributed", "secure_aggregation": False}, "secure_aggregation"),
        ({"sampling_rate": 0.01}, "sampling_rate"),
        ({"colour": "red"}, "colour"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_values_name_their_field(change, field):
    with pytest.raises(RunConfigError) as err:
        RunConfig.from_dict({**BASE, **change})
    assert err.value.field == field
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith(field + ":")


def test_missing_required_field_is_named():
    data = dict(BASE)
    del data["population"]
    with pytest.raises(RunConfigError) as err:
        RunConfig.from_dict(data)
    assert err.value.field == "population"


def test_derived_sampling_values():
    poisson = RunConfig.from_dict(BASE)
    assert poisson.expected_cohort == 5.0 and poisson.sampling_probability == 0.5
    fixed = RunConfig.from_dict({**BASE, "sampling": "fixed", "sampling_rate": None, "cohort_size": 4})
    assert fixed.expected_cohort == 4.0 and fixed.sampling_probability == 0.4
    # 30% of 10 may drop: 7 must survive; of 7 sampled, floor(2.1) = 2 may drop.
    assert poisson.min_survivors(10) == 7
    assert poisson.min_survivors(7) == 5
    assert RunConfig.from_dict({**BASE, "max_dropout_fraction": 0.0}).min_survivors(6) == 6


def test_central_noise_without_secure_aggregation_is_allowed():
    cfg = RunConfig.from_dict({**BASE, "noise": "central", "secure_aggregation": False})
    assert cfg.noise == "central" and not cfg.secure_aggregation
