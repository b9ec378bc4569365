import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamlab.algorithms.maml import MAML
from mamlab.analysis import studies as st
from mamlab.config import resolve_config
from mamlab.errors import MamlabError
from mamlab.evaluate import eval_generator
from mamlab.experiments import build_family, build_model
from mamlab.tasks.base import TaskBatch


@pytest.fixture(scope="module")
def config():
    return resolve_config("sinusoid", None, {"hidden": [8, 8], "iterations": 1})


@pytest.fixture(scope="module")
def batch(config):
    return st.episodes(build_family(config, "test"), 12, 5, 7, eval_generator(0))


def _learners(config):
    torch.manual_seed(1)
    a = st.Learner("A", st.random_init_model(config, 1), config, "maml")
    b = st.Learner("B", st.random_init_model(config, 2), config, "pretrain")
    return [a, b, st.anil_learner(a), st.Learner("R", st.random_init_model(config, 0), config, "random")]


def test_every_learner_sees_the_same_episodes(config, batch, monkeypatch):
    seen: dict[str, list[torch.Tensor]] = {"support": [], "query": []}
    adapt, predict = MAML.adapt, MAML.predict

    def spy_adapt(self, support_x, support_y, *args, **kwargs):
        seen["support"].append((id(self.model), id(self.inner_params), support_x, support_y))
        return adapt(self, support_x, support_y, *args, **kwargs)

    def spy_predict(self, params, x):
        seen["query"].append((id(self.model), id(self.inner_params), x))
        return predict(self, params, x)

    monkeypatch.setattr(MAML, "adapt", spy_adapt)
    monkeypatch.setattr(MAML, "predict", spy_predict)
    learners = _learners(config)
    st.adaptation_curves(learners, batch, 2)
    first_calls = {}
    for model_id, inner, sx, sy in seen["support"]:
        first_calls.setdefault((model_id, inner), (sx, sy))
    assert len(first_calls) == len(learners)  # each learner adapted ...
    for sx, sy in first_calls.values():  # ... on the very same support tensors
        assert torch.equal(sx, batch.support_x) and torch.equal(sy, batch.support_y)
    queries = [x for _, _, x in seen["query"] if x.shape == batch.query_x.shape]
    assert len(queries) == len(learners) * 3 and all(torch.equal(q, batch.query_x) for q in queries)


def test_step_zero_is_the_unadapted_loss(config, batch):
    learner = _learners(config)[0]
    scores = st.adaptation_scores(learner, batch, 3)
    with torch.no_grad():
        direct = torch.stack([F.mse_loss(learner.model(batch.query_x[i]), batch.query_y[i])
                              for i in range(batch.num_tasks)]).double()
        support = torch.stack([F.mse_loss(learner.model(batch.support_x[i]), batch.support_y[i])
                               for i in range(batch.num_tasks)]).double()
    assert torch.allclose(scores.query_loss[:, 0], direct, rtol=1e-6)
    assert torch.allclose(scores.support_loss[:, 0], support, rtol=1e-6)
    assert scores.query_loss.shape == (batch.num_tasks, 4)
    curves = st.adaptation_curves([learner], batch, 3)
    assert curves["learners"]["A"]["query_loss"][0].mean == pytest.approx(float(direct.mean()))


def test_random_init_is_reproducible_by_seed_and_leaves_the_global_rng(config):
    state = torch.get_rng_state()
    a, b, c = (st.random_init_model(config, s) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)
    for (ka, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), ka
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values(),
                                                         strict=True))


def test_anil_leaves_the_body_unchanged(config, batch):
    learner = st.anil_learner(_learners(config)[0])
    assert learner.inner_params == ["4.weight", "4.bias"]
    r = st.representation_change([learner], batch, 3)["learners"][learner.name]
    assert r["param_layers"] == ["0 Linear", "2 Linear", "4 Linear"]
    for est in r["param_change"][:-1]:
        assert est.mean == 0.0 and est.ci == 0.0 and est.n == batch.num_tasks
    assert r["param_change"][-1].mean > 0
    for est in r["cka"][:-1]:  # the body's representations are exactly those of θ
        assert est.mean == pytest.approx(1.0, abs=1e-9)


def test_representation_change_reports_every_layer_with_cis(config, batch):
    r = st.representation_change(_learners(config)[:1], batch, 2)["learners"]["A"]
    assert r["layers"] == ["0 Linear", "1 ReLU", "2 Linear", "3 ReLU", "4 Linear"]
    for est in r["cka"] + r["cca"]:
        assert 0.0 <= est.mean <= 1.0 and math.isfinite(est.ci)


def test_paired_and_finite_estimates():
    e = st.estimate_finite([1.0, float("nan"), 3.0, float("inf")])
    assert (e.mean, e.n) == (2.0, 2)
    assert math.isnan(st.estimate_finite([1.0]).ci)
    d = st.paired_estimate(np.array([2.0, 3.0, 5.0]), np.array([1.0, 2.0, 4.0]))
    assert (d.mean, d.ci, d.n) == (1.0, 0.0, 3)


def test_sinusoid_shift_bands(config):
    cond = st.sinusoid_shift_conditions(config, 5, 3, 4, seed=0)
    assert list(cond) == ["amplitude", "phase", "x"]
    labels = [lab for lab, _ in cond["amplitude"]]
    assert labels == ["train [0.1, 5]", "[5, 6]", "[6, 8]", "[8, 10]"]
    x_far = cond["x"][-1][1]
    assert x_far.support_x.min() >= 8 and x_far.query_x.max() <= 10
    amp_far = cond["amplitude"][-1][1]
    assert amp_far.query_y.abs().max() <= 10 + 1e-5
    again = st.sinusoid_shift_conditions(config, 5, 3, 4, seed=0)
    assert torch.equal(again["phase"][2][1].query_y, cond["phase"][2][1].query_y)  # seeded


def test_rotation_conditions():
    x = torch.rand(2, 3, 1, 6, 6)
    b = st.TaskBatch(x, torch.zeros(2, 3, dtype=torch.long), x.clone(), torch.zeros(2, 3, dtype=torch.long))
    cond = st.rotation_conditions(b)["rotation"]
    assert [lab for lab, _ in cond] == ["0°", "90°", "180°", "270°"]
    assert torch.equal(st.rotate_batch(cond[3][1], 1).support_x, x)
    with pytest.raises(st.MamlabError, match="image inputs"):
        st.rotate_batch(st.TaskBatch(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), torch.zeros(1, 2, 1),
                                     torch.zeros(1, 2, 1)), 1)


def test_meta_overfitting_curve_sorts_checkpoints(config, batch):
    ls = _learners(config)
    r = st.meta_overfitting_curve([(20, ls[1].model), (0, ls[0].model)], config, batch, batch, 2)
    assert r["iterations"] == [0, 20] and r["best_iteration"] in (0, 20)
    assert len(r["heldout_query_loss"]) == 2


def test_landscape_anil_head_curvature_does_not_move(config, batch):
    # MSE is quadratic in the head's parameters: its Hessian is the same at θ and θ'.
    learner = st.anil_learner(_learners(config)[0])
    r = st.landscape([learner], st.TaskBatch(batch.support_x[:3], batch.support_y[:3], batch.query_x[:3],
                                             batch.query_y[:3]), 2, iters=200, tol=1e-5)
    e = r["learners"][learner.name]
    assert e["sharpness_support_adapted"].mean == pytest.approx(e["sharpness_support_theta"].mean, rel=1e-4)
    assert len(e["grad_norm"]) == 3 and e["converged"].n == 9  # 3 tasks x 3 eigenvalues


def test_duplicate_learner_names_are_refused(config, batch):
    a = _learners(config)[0]
    with pytest.raises(st.MamlabError, match="unique"):
        st.adaptation_curves([a, a], batch, 1)


def test_the_divergence_rule():
    assert st.DIVERGENCE_FACTOR == 100.0
    d = st.diverged(torch.tensor([1.0, 150.0, math.inf, math.nan, 99.0]), torch.ones(5))
    assert d.tolist() == [False, True, True, True, False]


# ---------------------------------------------------------------------- stability (edge of stability)
def _linear_learner(alpha: float, execution: str = "auto", dim: int = 3, seed: int = 0):
    """A linear model y = wᵀx (no bias) in float64, adapted by MAML with step size ``alpha``."""
    cfg = resolve_config("linear-regression", None, {"dim": dim, "inner_lr": alpha, "execution": execution})
    torch.manual_seed(seed)
    model = build_model(cfg).double()
    return st.Learner("linear", model, cfg, "maml"), cfg


def _scaled_linear_tasks(scales, shots: int = 4, queries: int = 6, dim: int = 3, seed: int = 0):
    """Linear tasks y = aᵢᵀx whose inputs are scaled by ``scales[i]`` (curvature ∝ scale²), float64."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.tensor(scales, dtype=torch.float64).view(-1, 1, 1)
    xs = torch.randn(len(scales), shots, dim, generator=gen, dtype=torch.float64) * s
    xq = torch.randn(len(scales), queries, dim, generator=gen, dtype=torch.float64) * s
    a = torch.randn(len(scales), dim, 1, generator=gen, dtype=torch.float64)
    return TaskBatch(xs, xs @ a, xq, xq @ a)


def _closed_form_top(batch: TaskBatch) -> np.ndarray:
    """λ_max of the support MSE's Hessian (2/K) XᵀX per task, by a dense eigensolver in float64."""
    x = batch.support_x.double()
    hess = 2.0 / x.shape[1] * x.transpose(1, 2) @ x
    return torch.linalg.eigvalsh(hess)[:, -1].numpy()


@pytest.mark.parametrize("execution", ["auto", "loop"])
def test_support_sharpness_matches_the_closed_form_of_linear_regression(execution):
    learner, _ = _linear_learner(0.1, execution)
    batch = _scaled_linear_tasks([0.5, 1.0, 1.5, 2.0, 3.0])
    lam, ok = st.support_sharpness(learner, batch, iters=2000, tol=1e-10)
    assert ok.all()
    np.testing.assert_allclose(lam, _closed_form_top(batch), rtol=1e-8)


def test_support_sharpness_agrees_with_per_task_power_iteration_on_a_network():
    from mamlab.analysis.landscape import top_hessian_eigenvalue
    from mamlab.core.params import forward, parameters_of

    config = resolve_config("sinusoid", None, {"hidden": [8, 8], "iterations": 1})
    learner = st.Learner("net", st.random_init_model(config, 3).double(), config, "maml")
    batch = st.episodes(build_family(config, "test"), 6, 5, 5, eval_generator(0)).to(dtype=torch.float64)
    lam, ok = st.support_sharpness(learner, batch, iters=3000, tol=1e-10)
    theta = parameters_of(learner.model)
    ref = [top_hessian_eigenvalue(lambda p, i=i: F.mse_loss(forward(learner.model, p, batch.support_x[i]),
                                                           batch.support_y[i]),
                                  theta, iters=3000, tol=1e-10, generator=torch.Generator().manual_seed(i)
                                  ).eigenvalue for i in range(batch.num_tasks)]
    assert ok.all()
    np.testing.assert_allclose(lam, ref, rtol=1e-6)


def _hand_divergence(batch: TaskBatch, w0: torch.Tensor, alpha: float, steps: int) -> np.ndarray:
    """``[T, steps + 1]`` diverged flags by a plain loop: GD on the support MSE, query MSE vs step 0."""
    out = np.zeros((batch.num_tasks, steps + 1), dtype=bool)
    for i in range(batch.num_tasks):
        xs, ys, xq, yq = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
        w = w0.clone()
        q0 = float(((xq @ w - yq) ** 2).mean())
        for s in range(1, steps + 1):
            w = w - alpha * (2.0 / xs.shape[0]) * xs.T @ (xs @ w - ys)
            q = float(((xq @ w - yq) ** 2).mean())
            out[i, s] = not math.isfinite(q) or q > st.DIVERGENCE_FACTOR * q0
    return out


def test_divergence_counts_and_the_two_by_two_table_match_a_hand_loop():
    alpha = 0.05
    learner, _ = _linear_learner(alpha)
    # inputs scaled so that α·λ_max runs from well below 2 to well above it
    scales = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    batches = {k: _scaled_linear_tasks(scales, shots=k, seed=k) for k in (2, 4)}
    (w,) = learner.model.parameters()  # the linear model's one weight [1, dim]
    w0 = w.detach().T.clone()
    r = st.divergence_and_sharpness(learner, batches, steps=(1, 5, 10), iters=2000, tol=1e-10)
    assert r["shots"] == [2, 4] and r["steps"] == [1, 5, 10] and r["two_over_alpha"] == pytest.approx(40.0)
    seen_both = False
    for i, k in enumerate((2, 4)):
        hand = _hand_divergence(batches[k], w0, alpha, 10)
        sharp = _closed_form_top(batches[k]) > 2 / alpha
        assert r["diverged"][i] == [int(hand[:, s].sum()) for s in (1, 5, 10)]
        assert r["sharp"][i] == int(sharp.sum())
        for j, s in enumerate((1, 5, 10)):
            d = hand[:, s]
            assert r["contingency"][i][j] == {"sharp_diverged": int((sharp & d).sum()),
                                              "sharp_stable": int((sharp & ~d).sum()),
                                              "flat_diverged": int((~sharp & d).sum()),
                                              "flat_stable": int((~sharp & ~d).sum())}
        seen_both = seen_both or (0 < hand[:, 10].sum() < len(hand))
        # on a quadratic, GD at α diverges only along eigenvalues above 2/α: no flat task diverges
        assert r["contingency"][i][-1]["flat_diverged"] == 0
    assert seen_both  # the case is not trivial: some tasks diverge after 10 steps, others do not


def test_stability_contingency_counts_and_checks_shapes():
    sharp = np.array([True, True, False, False, True])
    div = np.array([True, False, True, False, True])
    assert st.stability_contingency(sharp, div) == {"sharp_diverged": 2, "sharp_stable": 1,
                                                    "flat_diverged": 1, "flat_stable": 1}
    with pytest.raises(MamlabError, match="one length"):
        st.stability_contingency(sharp, div[:3])


def test_sharpness_trajectory_sorts_checkpoints_and_counts_tasks_above_two_over_alpha():
    alpha = 0.05
    learner, cfg = _linear_learner(alpha)
    batch = _scaled_linear_tasks([0.5, 1.0, 2.0, 3.0, 4.0])
    other, _ = _linear_learner(alpha, seed=5)  # another θ: a linear model's Hessian does not depend on θ
    r = st.sharpness_trajectory([(20, other.model), (0, learner.model)], cfg, batch, iters=2000, tol=1e-10)
    top = _closed_form_top(batch)
    assert r["iterations"] == [0, 20] and r["two_over_alpha"] == pytest.approx(40.0)
    for est, mx, above in zip(r["sharpness"], r["sharpness_max"], r["above_two_over_alpha"], strict=True):
        assert est.mean == pytest.approx(top.mean(), rel=1e-8)
        assert mx == pytest.approx(top.max(), rel=1e-8)
        assert above == int((top > 2 / alpha).sum()) and 0 < above < len(top)


def test_stability_skips_runs_without_a_single_step_size():
    config = resolve_config("sinusoid", None, {"hidden": [8, 8], "iterations": 1}, algorithm="metasgd")
    learner = st.Learner("Meta-SGD", st.random_init_model(config, 1), config, "metasgd")
    assert st.single_inner_lr(learner) is None
    batch = st.episodes(build_family(config, "test"), 4, 5, 5, eval_generator(0))
    r = st.stability([(learner, [])], {5: batch}, {5: batch}, (1, 2))
    assert r["runs"] == {} and "no single inner step size" in r["skipped"]["Meta-SGD"]
    with pytest.raises(MamlabError, match="no single inner step size"):
        st.divergence_and_sharpness(learner, {5: batch}, (1,))
