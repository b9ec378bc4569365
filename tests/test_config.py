import math

import pytest

from mamlab.config import TrainConfig, meta_lr_at, resolve_config, task_defaults
from mamlab.errors import MamlabError


def test_precedence_defaults_file_flags() -> None:
    c = resolve_config("sinusoid", {"inner_lr": 0.05, "meta_batch": 5}, {"meta_batch": 7, "seed": None})
    assert (c.inner_lr, c.meta_batch, c.seed, c.iterations) == (0.05, 7, 0, 70000)
    assert c.phase == [0.0, math.pi]


def test_omniglot_defaults_follow_the_papers() -> None:
    assert task_defaults("omniglot", 5)["inner_lr"] == 0.4 and task_defaults("omniglot", 5)["meta_batch"] == 32
    twenty = task_defaults("omniglot", 20)
    assert (twenty["inner_steps"], twenty["inner_lr"], twenty["meta_batch"]) == (5, 0.1, 16)


def test_round_trip_and_unknown_keys() -> None:
    c = resolve_config("linear-regression", None, {"dim": 3})
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(MamlabError, match="f.toml: unknown key 'bogus'"):
        resolve_config("sinusoid", {"bogus": 1}, None, source="f.toml")
    with pytest.raises(MamlabError, match="task 'omniglot' does not match the command's task 'sinusoid'"):
        resolve_config("sinusoid", {"task": "omniglot"})


@pytest.mark.parametrize("override, match", [
    ({"hidden": [0]}, "hidden must be a list of positive integers"),
    ({"x_range": [1.0]}, "x_range must be two finite numbers"),
    ({"method": "reptile"}, "unknown method 'reptile'; allowed: maml, pretrain"),
    ({"split": "full"}, "unknown split 'full'"),
    ({"validation_fraction": 1.0}, "validation_fraction must be in \\(0, 1\\)"),
    ({"val_every": 0}, "val_every must be an integer > 0"),
])
def test_validation(override: dict, match: str) -> None:
    with pytest.raises(MamlabError, match=match):
        resolve_config("sinusoid", None, override)


def test_cosine_schedule_runs_from_beta_down_to_zero() -> None:
    c = resolve_config("sinusoid", None, {"iterations": 100, "meta_lr": 0.01, "lr_schedule": "cosine"})
    rates = [meta_lr_at(c, i) for i in range(1, 101)]
    assert rates[0] == 0.01 and all(a > b for a, b in zip(rates[:-1], rates[1:], strict=True))
    assert rates[50] == pytest.approx(0.005) and 0 < rates[-1] < 1e-5  # iteration 51 is half way
    constant = resolve_config("sinusoid", None, {"iterations": 100, "meta_lr": 0.01})
    assert {meta_lr_at(constant, i) for i in (1, 50, 100)} == {0.01}
