"""Configuration by component: run, task and algorithm options; defaults, files, flags; 0.1.0 files."""

import json
import math
from pathlib import Path

import pytest

from mamlab.config import TrainConfig, load_preset, meta_lr_at, presets, resolve_config
from mamlab.errors import MamlabError

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1_0"


def test_precedence_defaults_file_flags() -> None:
    c = resolve_config("sinusoid", {"inner_lr": 0.05, "meta_batch": 5}, {"meta_batch": 7, "seed": None})
    assert (c.inner_lr, c.meta_batch, c.seed, c.iterations) == (0.05, 7, 0, 70000)
    assert c.phase == [0.0, math.pi]
    assert c.task_options["phase"] == [0.0, math.pi] and c.algorithm_options["inner_lr"] == 0.05


def test_omniglot_defaults_follow_the_papers() -> None:
    five = resolve_config("omniglot", None, {"data": "x"})
    assert (five.inner_lr, five.meta_batch, five.inner_steps) == (0.4, 32, 1)
    twenty = resolve_config("omniglot", None, {"data": "x", "ways": 20})
    assert (twenty.inner_steps, twenty.inner_lr, twenty.meta_batch) == (5, 0.1, 16)
    # the file's ways decides the defaults too
    assert resolve_config("omniglot", {"ways": 20, "data": "x"}).meta_batch == 16


def test_round_trip_and_only_what_applies() -> None:
    c = resolve_config("linear-regression", None, {"dim": 3})
    d = c.to_dict()
    assert TrainConfig.from_dict(d) == c
    assert set(d) == {"format", "task", "algorithm", "run", "task_options", "algorithm_options"}
    assert "amplitude" not in d["task_options"] and "ways" not in d["task_options"]
    p = resolve_config("sinusoid", None, {"method": "pretrain"})  # mamlab 0.1.0's key
    assert p.algorithm == "pretrain" and set(p.algorithm_options) == {"inner_lr", "inner_steps"}
    with pytest.raises(AttributeError, match="not an option of task 'sinusoid' or algorithm 'pretrain'"):
        _ = p.first_order


def test_sections_in_a_file() -> None:
    values = {"task": "sinusoid", "algorithm": "fomaml", "run": {"meta_batch": 3},
              "task_options": {"hidden": [5]}, "algorithm_options": {"inner_steps": 2}}
    c = resolve_config("sinusoid", values)
    assert (c.algorithm, c.meta_batch, c.hidden, c.inner_steps) == ("fomaml", 3, [5], 2)
    # the flags win over the file, the algorithm named by the command wins over the file's
    c = resolve_config("sinusoid", values, {"meta_batch": 4}, algorithm="maml")
    assert (c.algorithm, c.meta_batch) == ("maml", 4)


@pytest.mark.parametrize("values, overrides, match", [
    ({"bogus": 1}, None, "f.toml: unknown option 'bogus'"),
    ({"task": "omniglot"}, None, "task 'omniglot' does not match the command's task 'sinusoid'"),
    ({"ways": 5}, None, "f.toml: option 'ways' applies to task omniglot, not to task 'sinusoid'"),
    (None, {"amplitude": [1, 2]}, None),  # fine for sinusoid
    (None, {"hidden": [0]}, "hidden must be a list of integers \\(each > 0\\)"),
    (None, {"x_range": [1.0]}, "x_range must be two finite numbers"),
    (None, {"method": "reptile"}, "unknown method 'reptile'; allowed: maml, pretrain"),
    (None, {"algorithm": "reptyle"}, "unknown algorithm 'reptyle'"),
    (None, {"val_every": 0}, "val_every must be an integer > 0"),
    (None, {"first_order": "no"}, "first_order must be true or false, got 'no'"),  # never coerced
    (None, {"meta_batch": 2.0}, "meta_batch must be an integer > 0, got 2.0"),
    (None, {"inner_lr": "0.1"}, "inner_lr must be a number > 0, got '0.1'"),
    (None, {"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
    (None, {"precision": "fp16"}, "unknown precision 'fp16'; allowed: fp32, tf32, bf16"),
])
def test_validation(values, overrides, match) -> None:
    if match is None:
        resolve_config("sinusoid", values, overrides, source="f.toml")
        return
    with pytest.raises(MamlabError, match=match) as e:
        resolve_config("sinusoid", values, overrides, source="f.toml")
    assert "\n" not in str(e.value)


def test_omniglot_options_are_checked() -> None:
    with pytest.raises(MamlabError, match="unknown split 'full'"):
        resolve_config("omniglot", None, {"data": "x", "split": "full"})
    with pytest.raises(MamlabError, match="validation_fraction must be in \\(0, 1\\)"):
        resolve_config("omniglot", None, {"data": "x", "validation_fraction": 1.0})
    # the data is needed to train, not to resolve (or print) a configuration
    assert resolve_config("omniglot", None, {"ways": 20}).meta_batch == 16


def test_with_options_changes_where_each_belongs() -> None:
    c = resolve_config("omniglot", None, {"data": "x", "ways": 20})
    d = c.with_options(ways=5, iterations=3, inner_lr=0.2)
    assert (d.ways, d.iterations, d.inner_lr) == (5, 3, 0.2) and c.ways == 20
    with pytest.raises(MamlabError, match="'amplitude' is not an option of task 'omniglot'"):
        c.with_options(amplitude=[1, 2])


def test_presets_resolve_to_the_readme_configurations() -> None:
    assert set(presets()) == {"omniglot-minimal-20way", "sinusoid-finn2017"}
    c = resolve_config("omniglot", load_preset("omniglot-minimal-20way"), {"data": "x"})
    assert (c.algorithm, c.ways, c.filters, c.queries, c.meta_batch, c.iterations) == ("fomaml", 20, 32, 3, 8, 7000)
    assert (c.inner_lr, c.inner_steps, c.meta_lr, c.lr_schedule, c.affine) == (0.1, 5, 0.002, "cosine", True)
    s = resolve_config("sinusoid", load_preset("sinusoid-finn2017"))
    assert (s.algorithm, s.inner_lr, s.iterations, s.hidden, s.first_order) == ("maml", 0.01, 70000, [40, 40], False)


@pytest.mark.parametrize("run", ["maml", "pretrain", "fomaml-lincls"])
def test_config_files_of_mamlab_0_1_0_load(run: str) -> None:
    values = json.loads((FIXTURES / run / "config.json").read_text())
    c = TrainConfig.from_dict(values, "config.json")
    expected = {"maml": ("sinusoid", "maml"), "pretrain": ("sinusoid", "pretrain"),
                "fomaml-lincls": ("linear-classification", "maml")}[run]
    assert (c.task, c.algorithm) == expected
    assert c.iterations == values["iterations"] and c.seed == values["seed"]
    assert c.inner_lr == values["inner_lr"] and c.inner_steps == values["inner_steps"]
    if run == "fomaml-lincls":
        assert c.first_order is True and c.dim == 5 and "amplitude" not in c.task_options
    assert c.method == values["method"]


def test_cosine_schedule_runs_from_beta_down_to_zero() -> None:
    c = resolve_config("sinusoid", None, {"iterations": 100, "meta_lr": 0.01, "lr_schedule": "cosine"})
    rates = [meta_lr_at(c, i) for i in range(1, 101)]
    assert rates[0] == 0.01 and all(a > b for a, b in zip(rates[:-1], rates[1:], strict=True))
    assert rates[50] == pytest.approx(0.005) and 0 < rates[-1] < 1e-5  # iteration 51 is half way
    constant = resolve_config("sinusoid", None, {"iterations": 100, "meta_lr": 0.01})
    assert {meta_lr_at(constant, i) for i in (1, 50, 100)} == {0.01}


def test_linear_schedule_and_the_outer_optimizer() -> None:
    c = resolve_config("sinusoid", None, {"iterations": 4, "meta_lr": 0.1, "lr_schedule": "linear",
                                          "meta_optimizer": "sgd"})
    assert [meta_lr_at(c, i) for i in range(1, 5)] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    with pytest.raises(MamlabError, match="unknown meta_optimizer 'rmsprop'; allowed: adam, sgd"):
        resolve_config("sinusoid", None, {"meta_optimizer": "rmsprop"})


def test_integers_must_fit_torch() -> None:
    with pytest.raises(MamlabError, match="seed must be an integer >= 0, got 9223372036854775808"):
        resolve_config("sinusoid", None, {"seed": 2**63})
    assert resolve_config("sinusoid", None, {"seed": 2**63 - 1}).seed == 2**63 - 1
