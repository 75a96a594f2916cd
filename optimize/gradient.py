"""`search.sampler: gradient`: projected Adam on the merge coefficients, with exact gradients
(docs/method.md §5.5).

For the methods whose merge is linear in the weights once the masks and TIES's elected signs are
fixed, one backward pass through the working model gives dL/dtheta, and

    dL/dw_(t,g) = sum over group g's tensors of < dL/dtheta, d theta / dw_(t,g) >

(`MergeMethod.coefficient_grad`; for task arithmetic d theta / dw_(t,g) = lambda tau_t). No copy
of the model per source and no autograd through the merge. The parametrization maps it to the
Optuna parameters (`SearchSpace.param_gradient`).

Each step is a trial of the study: the candidate is merged in place and the whole search split is
scored with gradients on, so a trial's value is the exact objective, comparable with every other
sampler's trials (reports, plots, resume and many workers work unchanged). With
search.gradient.minibatches M > 1, a trial is scored like a black-box one (the whole split, no
graph: its exact value), and between two trials the descent takes M Adam steps, each from the
gradient of one minibatch (1/M of every set): a step costs a forward and a backward pass over
1/M of the data. Densities stay at the
starting point's: the best trial of the study when it has one (refining a black-box search's
best: run tpe first, then gradient on the same study), else the initial point. A resumed descent
restarts Adam from the study's best trial.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager

import numpy as np
import optuna

from eval.loss import means
from optimize.objective import check_minibatches, loss_weights, make_trial
from optimize.study import ranked
from optimize.workers import ProgressBar, n_finished


class Adam:
    """Adam (Kingma & Ba, arXiv 1412.6980) on named coordinates, projected onto their bounds."""

    def __init__(self, lr: float, bounds: dict[str, tuple[float, float]], betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.bounds, (self.b1, self.b2), self.eps = lr, bounds, betas, eps
        self.m = dict.fromkeys(bounds, 0.0)
        self.v = dict.fromkeys(bounds, 0.0)
        self.t = 0

    def step(self, params: dict[str, float], grad: dict[str, float]) -> dict[str, float]:
        self.t += 1
        out = dict(params)
        for k, (low, high) in self.bounds.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * grad[k]
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * grad[k] ** 2
            m_hat, v_hat = self.m[k] / (1 - self.b1**self.t), self.v[k] / (1 - self.b2**self.t)
            out[k] = float(np.clip(params[k] - self.lr * m_hat / (math.sqrt(v_hat) + self.eps), low, high))
        return out


@contextmanager
def gradients_on(params):
    """`.grad` accumulates for `params` inside the block, and is freed after it."""
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


class GradientScore:
    """The trial's scoring. With one minibatch, the gradient of the objective at the trial's point
    comes from the same pass (`self.grad`); with more, the scoring is plain (the steps follow the
    trial, `minibatch_steps`). `self.params`: the point scored, None when its loss was not finite."""

    def __init__(self, ctx):
        self.ctx, self.grad, self.params = ctx, None, None
        self.weights = loss_weights(ctx.cfg.search)
        self.minibatches = ctx.cfg.search.gradient.minibatches
        self.differentiated = ctx.merger.changed()  # the same parameters at every step
        check_minibatches(ctx.cfg.search, ctx.scorer.examples)  # the examples max_length kept

    def __call__(self, trial, model, candidate, on_batch):
        if self.minibatches > 1:
            scores = self.ctx.scorer.score(model)  # no pruning: the descent goes on from every point
        else:
            with gradients_on(self.differentiated):
                scores = self.ctx.scorer.score(model, backward=self.weights)
                self.grad = self.param_gradient(candidate)
            trial.set_user_attr("grad_norm", float(np.linalg.norm(list(self.grad.values()))))
        finite_losses = all(math.isfinite(v) for v in means(scores[0]).values())
        self.params = dict(trial.params) if finite_losses else None  # (a waiting trial may run before ours)
        return scores

    def param_gradient(self, candidate) -> dict[str, float]:
        """dObjective/d(each Optuna parameter of the descended field), from the model's `.grad`."""
        per_group = self.ctx.merger.gradient(candidate)
        return self.ctx.space.param_gradient(self.ctx.merger.method.grad_field, per_group)

    def minibatch_steps(self, adam: Adam, params: dict[str, float], deadline=None) -> dict[str, float] | None:
        """One Adam step per minibatch from `params`, each on the gradient of that minibatch's
        objective at the point reached, fewer if `deadline` (time.monotonic) passes (None if a
        gradient was not finite)."""
        ctx = self.ctx
        for fold in range(self.minibatches):
            if fold and deadline is not None and time.monotonic() >= deadline:
                break  # the point reached is still scored: its steps are paid for
            candidate = ctx.space.decode(params)
            model = ctx.merger.apply(candidate)
            with gradients_on(self.differentiated):
                ctx.scorer.minibatch_backward(model, self.weights, fold, self.minibatches)
                grad = self.param_gradient(candidate)
            if not finite(grad):
                print(
                    f"[alignmerge] gradient: minibatch {fold}'s gradient is not finite; stopping",
                    file=sys.stderr,
                )
                return None
            params = adam.step(params, grad)
        return params


def finite(grad: dict[str, float] | None) -> bool:
    return grad is not None and bool(np.isfinite(list(grad.values())).all())


def start_point(study: optuna.Study, space, search) -> dict[str, float]:
    """The best complete trial's parameters (a black-box search refined; `optimize.study.ranked`:
    the best feasible one under search.constrain), else the initial point."""
    initial = space.initial_params()
    best = ranked(study, search)
    return initial | {k: v for k, v in best[0].params.items() if k in initial} if best else initial


def descend(study: optuna.Study, ctx, callbacks=()) -> None:
    """Projected Adam until the study holds search.n_trials finished trials: one step after each
    trial, or one per minibatch (search.gradient.minibatches)."""
    s = ctx.cfg.search
    deadline = time.monotonic() + s.timeout_s if s.timeout_s else None
    params, attrs = start_point(study, ctx.space, s), {}
    score = GradientScore(ctx)
    adam = Adam(s.gradient.lr, ctx.space.field_bounds(ctx.merger.method.grad_field))
    trial_fn = make_trial(ctx, score=score)
    bar = ProgressBar(s.n_trials, n_finished(study))
    try:
        while n_finished(study) < s.n_trials:  # the deadline is checked after each trial
            score.grad = score.params = None
            study.enqueue_trial(params, user_attrs={"gradient_step": adam.t, **attrs})
            study.optimize(trial_fn, n_trials=1, callbacks=[bar, *callbacks])
            if n_finished(study) >= s.n_trials or (deadline is not None and time.monotonic() >= deadline):
                return
            if score.params is None or (score.minibatches == 1 and not finite(score.grad)):
                print(
                    "[alignmerge] gradient: the last trial gave no gradient (see its fail_reason: a "
                    "non-finite loss, or other workers took the last slots); stopping",
                    file=sys.stderr,
                )
                return
            t0 = time.perf_counter()
            if score.minibatches > 1:
                params = score.minibatch_steps(adam, score.params, deadline)
            else:
                params = adam.step(score.params, score.grad)
            if params is None:
                return
            attrs = {"steps_s": round(time.perf_counter() - t0, 4)} if score.minibatches > 1 else {}
    finally:
        bar.close()
