"""search.sampler: gradient (docs/method.md §5.5): the gradient of every supported method against
finite differences, on single tensors with real sign conflicts and through the tiny model, and
the descent as trials of a study."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch

from core.errors import ConfigError
from optimize.config import validate_config
from optimize.context import check_inputs, prepare
from optimize.gradient import GradientScore
from optimize.methods import METHODS, Candidate, ties
from optimize.objective import loss_weights, weighted_loss
from optimize.search import run
from tests.conftest import world_config

N, S = 4096, 3
WEIGHTS = np.array([0.6, 0.0, 0.9])  # a zero weight: the derivative as it grows from 0
DENSITIES = np.array([[0.5], [0.7], [1.0]])


def tensors():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(N, generator=gen)
    taus = [torch.randn(N, generator=gen) * s for s in (1.0, 0.7, 1.3)]
    return base, taus, torch.randn(N, generator=gen)


def finite_differences(f, w: np.ndarray, eps: float) -> np.ndarray:
    out = []
    for j in range(len(w)):
        e = np.zeros(len(w))
        e[j] = eps
        out.append((f(w + e) - f(w - e)) / (2 * eps) if w[j] != 0 else (f(w + e) - f(w)) / eps)
    return np.array(out)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("name", ["task_arithmetic", "linear", "dare_linear"])
def test_linear_methods_gradient_is_exact(name, normalize):
    base, taus, grad = tensors()
    method = METHODS[name](normalize=normalize, lambda_=0.8, density_levels=(0.5, 0.7, 1.0))

    def f(w):  # <grad, theta(w)> with the method's own merge (float32)
        out = torch.empty(N)
        method.merge("x", 0, base, taus, Candidate(weight=w.reshape(S, 1), density=DENSITIES), out)
        return float(torch.dot(grad.double(), out.double()))

    got = method.coefficient_grad(
        "x", 0, base, taus, Candidate(weight=WEIGHTS.reshape(S, 1), density=DENSITIES), grad
    )
    np.testing.assert_allclose(got, finite_differences(f, WEIGHTS, 1e-3), rtol=5e-3, atol=0.05)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("name", ["ties", "dare_ties"])
def test_sign_elected_methods_gradient_is_exact_with_signs_fixed(name, normalize):
    """TIES's merge jumps where an elected sign flips, so the reference is the plain three-step
    `ties` in float64 with a step too small to flip any sign (checked)."""
    base, taus, grad = tensors()
    method = METHODS[name](normalize=normalize, lambda_=1.0, density_levels=(0.5, 0.7, 1.0))
    if name == "ties":
        kept, densities = [t.double() for t in taus], DENSITIES[:, 0]
    else:  # DARE's drop and rescale, then TIES at density 1
        kept = [method.kept(i, "x", taus[i], float(DENSITIES[i, 0]), slice(None)).double() for i in range(S)]
        densities = [1.0] * S

    def f(w):
        return float(torch.dot(grad.double(), ties(base.double(), kept, list(w), densities, normalize)))

    eps = 1e-6
    for j in range(S):
        for step in (-eps, eps):
            moved = WEIGHTS + step * np.eye(S)[j]
            trimmed = [
                t if d >= 1 else t * (t.abs() >= t.abs().kthvalue(N - int(d * N) + 1).values)
                for t, d in zip(kept, densities)
            ]
            flips = (sum(w * t for w, t in zip(moved, trimmed)) >= 0) != (
                sum(w * t for w, t in zip(WEIGHTS, trimmed)) >= 0
            )
            assert not flips.any(), "the finite-difference step flips an elected sign: use a smaller one"
    got = method.coefficient_grad(
        "x", 0, base, taus, Candidate(weight=WEIGHTS.reshape(S, 1), density=DENSITIES), grad
    )
    np.testing.assert_allclose(got, finite_differences(f, WEIGHTS, eps), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("normalize", [False, True])
def test_fused_ties_gradient_equals_the_eager_one(monkeypatch, normalize):
    """The torch.compile'd inner products of TIES (`kernels.ties_grad_dots`, used on real-size
    tensors) give the eager, chunked ones checked against finite differences above, with bf16
    task vectors and gradient as the working model holds them."""
    from optimize.kernels import Fused

    base, taus, grad = tensors()
    taus, grad = [t.bfloat16() for t in taus], grad.bfloat16()
    method = METHODS["ties"](normalize=normalize, density_levels=(0.5, 0.7, 1.0))
    cand = Candidate(weight=WEIGHTS.reshape(S, 1), density=DENSITIES)
    monkeypatch.setattr(Fused, "MIN_NUMEL", 1 << 60)  # eager
    eager = method.coefficient_grad("x", 0, base, taus, cand, grad)
    monkeypatch.setattr(Fused, "MIN_NUMEL", 0)  # fused
    monkeypatch.setattr(Fused, "enabled", True)
    fused = method.coefficient_grad("x", 0, base, taus, cand, grad)
    assert Fused.enabled and method.fused_grad.compiled is not None  # it compiled (no eager fallback)
    assert np.abs(eager).min() > 1  # the weights' gradients are far from 0
    np.testing.assert_allclose(fused, eager, rtol=1e-5)


def test_mergealign_gradient_is_exact():
    base, taus, grad = tensors()
    method = METHODS["mergealign"](lambda_=0.9, roles=("alignment", "domain", "domain"))

    def f(t):
        out = torch.empty(N)
        method.merge("x", 0, base, taus, Candidate(t=np.array([t])), out)
        return float(torch.dot(grad.double(), out.double()))

    got = method.coefficient_grad("x", 0, base, taus, Candidate(t=np.array([0.3])), grad)
    assert got == pytest.approx((f(0.3 + 1e-3) - f(0.3 - 1e-3)) / 2e-3, rel=5e-3, abs=0.05)


def objective(ctx, params):
    model = ctx.merger.apply(ctx.space.decode(params))
    return weighted_loss(ctx.cfg.search, ctx.scorer.losses(model))


@pytest.mark.parametrize(
    "merge, parametrization",
    [
        ({"method": "task_arithmetic", "normalize": True}, "layerwise"),
        ({"method": "linear", "normalize": False}, "global"),  # every tensor moves, not only the changed
        ({"method": "mergealign"}, "gradient:2"),
    ],
)
def test_model_gradient_matches_finite_differences(world, tmp_path, merge, parametrization):
    """Through the tiny model: backward pass, per-tensor chain, parametrization."""
    raw = world_config(
        world, tmp_path / "run", sampler="gradient", parametrization=parametrization, alpha=0.5
    )
    cfg = validate_config({**raw, "merge": merge})
    ctx = prepare(cfg)
    for tv in ctx.merger.task_vectors:  # x20: gradients well above the finite differences' noise
        for k in tv:
            tv[k] = tv[k] * 20
    rng = np.random.default_rng(0)
    params = {k: float(rng.uniform(0.2, 0.8)) for k in ctx.space.initial_params()}
    score = GradientScore(ctx)

    class Trial:  # what GradientScore needs of an Optuna trial
        def set_user_attr(self, *_):
            pass

    Trial.params = params
    score(Trial(), ctx.merger.apply(ctx.space.decode(params)), ctx.space.decode(params), None)
    names = list(score.grad)[:4]
    eps = 1e-3
    for name in names:
        up, down = dict(params), dict(params)
        up[name] += eps
        down[name] -= eps
        fd = (objective(ctx, up) - objective(ctx, down)) / (2 * eps)
        assert score.grad[name] == pytest.approx(fd, rel=0.01, abs=1e-4), name
    assert all(not p.requires_grad and p.grad is None for p in ctx.base.model.parameters())


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("normalize", [False, True])
def test_sparsified_methods_model_gradient_matches_finite_differences(world, tmp_path, name, normalize):
    """Through the tiny model, with source b's task vector turned to source a's signs: no elected
    sign can flip under the step, so the merge is smooth there and finite differences apply."""
    raw = world_config(
        world, tmp_path / "run", sampler="gradient", parametrization="global", density=[0.5, 1]
    )
    cfg = validate_config({**raw, "merge": {"method": name, "normalize": normalize}})
    ctx = prepare(cfg)
    a, b = ctx.merger.task_vectors
    for k in b:  # x20: the tiny model's loss barely moves with the 5% noise of its fine-tunes
        a[k] = a[k] * 20
        b[k] = b[k].abs() * 20 * torch.where(a[k] >= 0, 1.0, -1.0)
    params = {"weight[a]": 0.6, "density[a]": 0.5, "weight[b]": 0.4, "density[b]": 0.7}
    score = GradientScore(ctx)

    class Trial:
        def set_user_attr(self, *_):
            pass

    Trial.params = params
    score(Trial(), ctx.merger.apply(ctx.space.decode(params)), ctx.space.decode(params), None)
    for weight in ("weight[a]", "weight[b]"):
        up, down = dict(params), dict(params)
        up[weight] += 1e-3
        down[weight] -= 1e-3
        fd = (objective(ctx, up) - objective(ctx, down)) / 2e-3
        assert score.grad[weight] == pytest.approx(fd, rel=0.01, abs=1e-4), weight
        assert abs(fd) > 0.01  # a gradient the tolerance can tell from a wrong one
    assert set(score.grad) == {"weight[a]", "weight[b]"}  # densities are not descended


def test_gradient_descent_is_a_study_of_trials(world, tmp_path):
    """Steps are trials; a gradient run on a study that has black-box trials starts at its best."""
    raw = world_config(world, tmp_path / "run", sampler="random", n_trials=3, parametrization="gradient:2")
    raw["output"] = {"plots": False, "save_model": False, "references": False, "mergekit": False}
    run(validate_config(raw))
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    best = study.best_trial
    raw["search"] |= {"sampler": "gradient", "n_trials": 7, "gradient": {"lr": 0.1}}
    run(validate_config(raw))
    study = optuna.load_study(study_name="tiny", storage=storage)
    steps = [t for t in study.trials if "gradient_step" in t.user_attrs]
    assert [t.user_attrs["gradient_step"] for t in steps] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["grad_norm"] > 0 for t in steps)
    assert steps[0].params == best.params
    assert steps[0].value == pytest.approx(best.value, rel=1e-5)
    assert min(t.value for t in steps[1:]) < steps[0].value  # Adam went downhill
    assert steps[1].params != steps[0].params
    assert all(t.state.is_finished() for t in study.trials)  # nothing left waiting


def test_minibatch_descent_takes_a_step_per_minibatch_and_records_exact_values(world, tmp_path):
    """search.gradient.minibatches: 2 Adam steps between trials (outside them: a trial is scored
    like a black-box one); every trial's value is the objective of the whole search split at its
    point."""
    raw = world_config(world, tmp_path / "run", sampler="gradient", n_trials=3, parametrization="gradient:2")
    raw["search"]["gradient"] = {"lr": 0.1, "minibatches": 2}
    raw["output"] = {"plots": False, "save_model": False, "references": False, "mergekit": False}
    cfg = validate_config(raw)
    run(cfg)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    trials = study.trials
    assert [t.user_attrs["gradient_step"] for t in trials] == [0, 2, 4]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert [("steps_s" in t.user_attrs) for t in trials] == [False, True, True]
    assert trials[2].value < trials[0].value  # Adam went downhill
    ctx = prepare(cfg)
    for t in trials:
        assert t.value == pytest.approx(objective(ctx, t.params), rel=1e-5)
    raw["search"]["gradient"]["minibatches"] = 64  # more minibatches than examples: refused, clearly
    raw["search"]["n_trials"] = 4
    with pytest.raises(ConfigError, match="minibatches is 64, but the .* search set has"):
        check_inputs(validate_config(raw))  # before any model loads (it was after the sources)
    with pytest.raises(ConfigError, match="minibatches is 64, but the .* search set has"):
        ctx.cfg = validate_config(raw)
        GradientScore(ctx)  # the examples the scorer kept (max_length may drop rows)


def test_a_fresh_descent_starts_at_the_initial_point(world, tmp_path):
    raw = world_config(world, tmp_path / "run", sampler="gradient", n_trials=2)
    raw["output"] = {"plots": False, "save_model": False, "references": False, "mergekit": False}
    run(validate_config(raw))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert [t.user_attrs.get("gradient_step") for t in study.trials] == [0, 1]
    assert set(study.trials[0].params.values()) == {0.5}  # every weight 1/2


def test_gradient_config_errors(world, tmp_path):
    raw = world_config(world, tmp_path / "run", sampler="gradient")
    with pytest.raises(ConfigError, match="slerp is not"):
        validate_config({**raw, "merge": {"method": "slerp"}})
    with pytest.raises(ConfigError, match="single-objective"):
        validate_config(world_config(world, tmp_path / "run", sampler="gradient", objective="pareto"))
    assert loss_weights(validate_config(raw).search) == {"alignment": 1.0, "domain": 0.3}
