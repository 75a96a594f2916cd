"""Merge methods on task vectors, with mergekit's semantics (mergekit 0.1.5 is the test oracle).

Notation (papers.md §1.3): theta_base, tau_t = theta_t - theta_base, per-group coefficients
w_t (weight), d_t (density), t (interpolation). For one tensor in group g:

  task_arithmetic  theta = base + lambda * sum_t w_t tau_t             (/ sum_t w_t if normalize)
  linear           theta = sum_t w_t theta_t / sum_t w_t               (no division if not normalize)
  ties             tau'_t = top-d_t magnitudes of tau_t; elect sign s = sign(sum_t w_t tau'_t);
                   theta = base + lambda * sum_t w_t tau'_t [sign agrees with s]
                                         (/ sum_t w_t [agrees] per element if normalize)
  dare_ties        as ties, with tau'_t = tau_t * Bernoulli(d_t) / d_t     (DARE: 1/(1-p) rescale)
  dare_linear      as task_arithmetic, with the DARE tau'_t
  slerp            theta = slerp(theta_1, theta_2; t) over each whole tensor (t=0 -> source 1)
  mergealign       theta = base + lambda_g tau_domain + (1 - lambda_g) tau_align   (lambda_g = t)

Everything that does not change between candidates is computed once and cached: the magnitude
thresholds of every tau for every density on the search grid (so a TIES trim is one comparison),
the DARE drop noise per seed (a mask for density d is `noise < d`), and the SLERP angles. A TIES
candidate is one elementwise expression per tensor (`ties_delta`), compiled into one fused kernel
for real-size tensors (`Fused`), evaluated in chunks otherwise.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass
class Candidate:
    """One point of the search: per-source, per-group coefficients ([n_sources, n_groups]) or,
    for slerp / mergealign, one interpolation value per group ([n_groups])."""

    weight: np.ndarray | None = None
    density: np.ndarray | None = None
    t: np.ndarray | None = None


class MergeMethod:
    name: str
    searched: tuple[str, ...] = ("weight",)  # which Candidate fields the search fills

    def __init__(
        self,
        normalize: bool,
        lambda_: float = 1.0,
        seed: int = 0,
        density_levels: tuple[float, ...] = (),
        roles: tuple[str, ...] = (),
    ):
        self.normalize, self.lambda_, self.seed = normalize, lambda_, seed
        self.density_levels = tuple(sorted(set(round(d, 6) for d in density_levels)))
        self.roles = roles
        self._thresholds: dict[tuple[int, str], dict[float, float]] = {}
        self._noise: dict[tuple[int, str], Tensor] = {}

    def merge(
        self, name: str, g: int, base: Tensor, taus: list[Tensor | None], c: Candidate, out: Tensor
    ) -> None:
        """Write the merged tensor (float32) into `out`."""
        raise NotImplementedError

    # ---- sparsification, cached --------------------------------------------------------------
    def magnitude_threshold(self, i: int, name: str, tau: Tensor, density: float) -> float | None:
        """mergekit's `magnitude` keeps the k = max(1, int(d n)) largest |tau|: the k-th largest
        |tau| is the threshold (None: keep all). Cached per (source, tensor, density)."""
        if density >= 1:
            return None
        cache = self._thresholds.setdefault((i, name), {})
        d = round(float(density), 6)
        if d not in cache:
            flat = tau.abs().flatten()
            n = flat.numel()
            wanted = [d] + [x for x in self.density_levels if x < 1 and x not in cache]
            if len(wanted) > 1:  # one sort gives the threshold of every grid density at once
                ordered = torch.sort(flat).values
                for x in wanted:
                    cache[x] = ordered[n - max(1, int(x * n))].item()
            else:
                cache[d] = torch.kthvalue(flat, n - max(1, int(d * n)) + 1).values.item()
        return cache[d]

    def magnitude_mask(self, i: int, name: str, tau: Tensor, density: float) -> Tensor | None:
        thr = self.magnitude_threshold(i, name, tau, density)
        return None if thr is None else tau.abs() >= thr

    def dare_noise(self, i: int, name: str, tau: Tensor) -> Tensor:
        """Uniform int16 noise drawn once per (seed, source, tensor): the Bernoulli(d) keep mask
        is `noise < cutoff(d)`, so masks are nested across densities and cost one comparison."""
        key = (i, name)
        if key not in self._noise:
            gen = torch.Generator(device="cpu").manual_seed(_stable_hash(self.seed, i, name))
            self._noise[key] = torch.randint(-(2**15), 2**15, tau.shape, generator=gen, dtype=torch.int16).to(
                tau.device
            )
        return self._noise[key]

    @staticmethod
    def dare_cutoff(density: float) -> int:
        return round(density * 2**16) - 2**15

    def dare_mask(self, i: int, name: str, tau: Tensor, density: float) -> Tensor | None:
        if density >= 1:
            return None
        return self.dare_noise(i, name, tau) < self.dare_cutoff(density)


def _stable_hash(*parts) -> int:
    """A seed from (seed, source, tensor name) that, unlike hash(), is the same in every process."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _normalized(w: np.ndarray) -> np.ndarray:
    s = w.sum()
    return w / (s if abs(s) >= 1e-8 else 1.0)


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"

    def coefficients(self, c: Candidate, g: int) -> np.ndarray:
        w = c.weight[:, g]
        return self.lambda_ * (_normalized(w) if self.normalize else w)

    def merge(self, name, g, base, taus, c, out):
        out.copy_(base)
        for tau, coef in zip(taus, self.coefficients(c, g)):
            if tau is not None and coef != 0:
                out.add_(tau, alpha=float(coef))


class Linear(MergeMethod):
    name = "linear"

    def merge(self, name, g, base, taus, c, out):
        w = c.weight[:, g]
        # sum_t w_t (base + tau_t) / div = base * sum(w) / div + sum_t w_t tau_t / div
        div = (w.sum() if abs(w.sum()) >= 1e-8 else 1.0) if self.normalize else 1.0
        out.copy_(base).mul_(float(w.sum() / div))
        for tau, wt in zip(taus, w):
            if tau is not None and wt != 0:
                out.add_(tau, alpha=float(wt / div))


class DareLinear(TaskArithmetic):
    name = "dare_linear"
    searched = ("weight", "density")

    def merge(self, name, g, base, taus, c, out):
        out.copy_(base)
        for i, (tau, coef) in enumerate(zip(taus, self.coefficients(c, g))):
            if tau is None or coef == 0:
                continue
            d = float(c.density[i, g])
            mask = self.dare_mask(i, name, tau, d)
            if mask is None:
                out.add_(tau, alpha=float(coef))
            else:
                out.add_(tau * mask, alpha=float(coef) / d)


def sign_consensus(weighted: list[Tensor], weights: list[Tensor], normalize: bool) -> Tensor:
    """TIES's disjoint merge of the trimmed, weighted task vectors: the elected sign of an entry
    is that of their sum (mergekit's "sum" consensus) and only the entries of that sign are
    summed; with `normalize`, divided by the weights of the sources that agree. Written with
    the positive and negative parts, it is one elementwise expression (it fuses into one pass)."""
    positive = sum(d.clamp(min=0) for d in weighted)
    negative = sum(d.clamp(max=0) for d in weighted)
    up = positive + negative >= 0
    mixed = torch.where(up, positive, negative)
    if normalize:
        # mergekit divides by sum_t w_t [agrees]: sources without a delta in this tensor or
        # trimmed here never agree, so they are left out of the divisor too.
        div = torch.where(
            up,
            sum(w * (d > 0) for d, w in zip(weighted, weights)),
            sum(w * (d < 0) for d, w in zip(weighted, weights)),
        )
        mixed = mixed / torch.where(div == 0, 1.0, div)
    return mixed


def ties_delta(taus, thresholds, weights, normalize: bool) -> Tensor:
    """sum over agreeing sources of w_t * (tau_t where |tau_t| >= its magnitude threshold)."""
    weighted = [torch.where(t.abs() >= th, t, 0.0) * w for t, th, w in zip(taus, thresholds, weights)]
    return sign_consensus(weighted, weights, normalize)


def dare_delta(taus, noises, cutoffs, scales, weights, normalize: bool) -> Tensor:
    """As ties_delta, with DARE's random drop (noise < cutoff keeps) and rescale (w / d)."""
    weighted = [torch.where(n < c, t, 0.0) * s for t, n, c, s in zip(taus, noises, cutoffs, scales)]
    return sign_consensus(weighted, weights, normalize)


class Fused:
    """A merge expression compiled into one fused elementwise kernel (torch.compile): TIES on
    SmolLM2-135M goes from ~1.45 s to ~0.2 s per candidate (BENCHMARKS.md). Compiled once per
    process and number of sources (~15 s, cached on disk by Inductor). If compiling fails (no
    C++ compiler, say) it warns once and returns None: the caller evaluates eagerly.
    `ALIGNMERGE_COMPILE=0` turns it off."""

    MIN_NUMEL = 1 << 16  # smaller tensors (tiny test models) stay eager: nothing to gain
    enabled = os.environ.get("ALIGNMERGE_COMPILE", "1") != "0"

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args) -> Tensor | None:
        if not Fused.enabled:
            return None
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True)
            return self.compiled(*args)
        except Exception as err:  # any compiler failure: stay correct, go eager
            warnings.warn(
                f"torch.compile of {self.fn.__name__} failed ({err}); merging eagerly (slower)",
                stacklevel=2,
            )
            Fused.enabled = False
            return None


class Ties(MergeMethod):
    name = "ties"
    searched = ("weight", "density")
    CHUNK = 1 << 18  # eager path: elements per chunk; the temporaries of one chunk stay in cache
    delta = staticmethod(ties_delta)
    fused = Fused(ties_delta)

    def operands(self, i: int, name: str, tau: Tensor, density: float, w: float):
        """Per source: the tensors of the trim (flattened) and its scalars (0-d tensors, so a
        compiled kernel is not specialized on their values)."""
        thr = self.magnitude_threshold(i, name, tau, density)
        return [tau.view(-1)], [_scalar(0.0 if thr is None else thr, tau), _scalar(w, tau)]

    def merge(self, name, g, base, taus, c, out):
        w = c.weight[:, g]
        used = [i for i, tau in enumerate(taus) if tau is not None and w[i] != 0]
        out.copy_(base)
        if not used:
            return
        ops = [self.operands(i, name, taus[i], float(c.density[i, g]), float(w[i])) for i in used]
        tensors = [list(x) for x in zip(*(t for t, _ in ops))]  # per argument, one per source
        scalars = [list(x) for x in zip(*(s for _, s in ops))]
        out_flat = out.view(-1)
        if out_flat.numel() >= Fused.MIN_NUMEL:
            delta = self.fused(*tensors, *scalars, self.normalize)
            if delta is not None:
                out_flat.add_(delta, alpha=self.lambda_)
                return
        for start in range(0, out_flat.numel(), self.CHUNK):
            sl = slice(start, start + self.CHUNK)
            chunk = [[t[sl] for t in arg] for arg in tensors]
            out_flat[sl].add_(self.delta(*chunk, *scalars, self.normalize), alpha=self.lambda_)


class DareTies(Ties):
    name = "dare_ties"
    delta = staticmethod(dare_delta)
    fused = Fused(dare_delta)

    def operands(self, i, name, tau, density, w):
        noise = self.dare_noise(i, name, tau).view(-1)
        keep_all = density >= 1
        cutoff = torch.tensor(2**15 if keep_all else self.dare_cutoff(density), device=tau.device)
        scale = w if keep_all else w / density
        return [tau.view(-1), noise], [cutoff, _scalar(scale, tau), _scalar(w, tau)]


def _scalar(x: float, like: Tensor) -> Tensor:
    return torch.tensor(float(x), dtype=like.dtype, device=like.device)


class Slerp(MergeMethod):
    """Spherical interpolation between the two sources' full weights, per tensor, as mergekit:
    nearly collinear tensors (|cos| > 0.9995) fall back to linear interpolation."""

    name = "slerp"
    searched = ("t",)
    DOT_THRESHOLD = 0.9995

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._angle: dict[str, float | None] = {}

    def angle(self, name: str, a: Tensor, b: Tensor) -> float | None:
        if name not in self._angle:
            na, nb = a.norm(), b.norm()
            na = na if na > 1e-8 else 1.0
            nb = nb if nb > 1e-8 else 1.0
            dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
            self._angle[name] = None if abs(dot) > self.DOT_THRESHOLD else float(np.arccos(dot))
        return self._angle[name]

    def merge(self, name, g, base, taus, c, out):
        t = float(c.t[g])
        tau_a, tau_b = (tau if tau is not None else torch.zeros_like(base) for tau in taus)
        theta = self.angle(name, base + tau_a, base + tau_b)
        if theta is None:
            ca, cb = 1 - t, t
        else:
            ca, cb = np.sin((1 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
        # ca * (base + tau_a) + cb * (base + tau_b), without materializing either model
        out.copy_(base).mul_(float(ca + cb)).add_(tau_a, alpha=float(ca)).add_(tau_b, alpha=float(cb))


class MergeAlign(TaskArithmetic):
    """Interpolation of one domain and one alignment vector (Thakkar et al.):
    theta = base + lambda * (t tau_domain + (1 - t) tau_align), t per group."""

    name = "mergealign"
    searched = ("t",)

    def coefficients(self, c, g):
        t = float(c.t[g])
        return self.lambda_ * np.array([t if r == "domain" else 1 - t for r in self.roles])


METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (Linear, TaskArithmetic, Ties, DareTies, DareLinear, Slerp, MergeAlign)
}
