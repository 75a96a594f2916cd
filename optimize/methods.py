"""Merge methods on task vectors, with mergekit's semantics (mergekit 0.1.5 is the test oracle).

Notation (docs/method.md §1): theta_base, tau_t = theta_t - theta_base, per-group coefficients
w_t (weight), d_t (density), t (interpolation). For one tensor in group g (docs/method.md §2):

  task_arithmetic  theta = base + lambda * sum_t w_t tau_t             (/ sum_t w_t if normalize)
  linear           theta = sum_t w_t theta_t / sum_t w_t               (no division if not normalize)
  ties             tau'_t = top-d_t magnitudes of tau_t; elect sign s = sign(sum_t w_t tau'_t);
                   theta = base + lambda * sum_t w_t tau'_t [sign agrees with s]
                                         (/ sum_t w_t [agrees] per element if normalize)
  dare_ties        as ties, with tau'_t = tau_t * Bernoulli(d_t) / d_t     (DARE: 1/(1-p) rescale)
  dare_linear      as task_arithmetic, with the DARE tau'_t
  slerp            theta = slerp(theta_1, theta_2; t) over each whole tensor (t=0 -> source 1)
  mergealign       theta = base + lambda_g tau_domain + (1 - lambda_g) tau_align   (lambda_g = t)

Each method's facts (name, searched fields, default normalize) are declared once in
`optimize.registry`. `ties` below is TIES in its three plain steps; the classes run it through
`optimize.kernels` (cached masks, one fused kernel), which the tests prove equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from optimize.deltas import Delta, rows
from optimize.kernels import (
    CHUNK,
    Fused,
    MaskCache,
    add_elementwise,
    dare_delta,
    row_blocks,
    scalar,
    sign_fixed_dots,
    ties_delta,
    ties_grad_dots,
)
from optimize.registry import MERGE_METHODS

Tensor = torch.Tensor


@dataclass
class Candidate:
    """One point of the search: per-source, per-group coefficients ([n_sources, n_groups]) or,
    for slerp / mergealign, one interpolation value per group ([n_groups])."""

    weight: np.ndarray | None = None
    density: np.ndarray | None = None
    t: np.ndarray | None = None


def ties(
    base: Tensor, taus: list[Tensor], weights, densities, normalize: bool, lambda_: float = 1.0
) -> Tensor:
    """TIES-merging of one tensor (docs/method.md §2.3), as mergekit does it."""
    # 1. Trim: keep the top-d_t share of each task vector's entries by magnitude.
    trimmed = []
    for tau, d in zip(taus, densities):
        k = max(1, int(d * tau.numel()))
        threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
        trimmed.append(tau if d >= 1 else torch.where(tau.abs() >= threshold, tau, 0.0))
    weighted = torch.stack([w * tau for w, tau in zip(weights, trimmed)])
    # 2. Elect: each entry's sign is the sign of the weighted sum (mergekit's "sum"; 0 counts +).
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    # 3. Disjoint merge: sum only the entries that agree with the elected sign.
    agree = torch.sign(weighted) == sign
    merged = (weighted * agree).sum(0)
    if normalize:
        w = torch.tensor([float(x) for x in weights], dtype=base.dtype).view(-1, *[1] * base.dim())
        div = (w * agree).sum(0)
        merged = merged / torch.where(div == 0, 1.0, div)
    return base + lambda_ * merged


class MergeMethod:
    """Writes the merge of one tensor into `out`; `name` keys its facts in the registry. A method
    whose merge is linear in its coefficients once the masks are fixed also gives the gradient of
    a loss with respect to them (`coefficient_grad`, docs/method.md §5.5)."""

    name: str
    searched: tuple[str, ...]  # from the registry: which Candidate fields the search fills
    grad_field: str | None  # from the registry: the Candidate field `coefficient_grad` differentiates
    # True: `merge` also takes a 16-bit `out` (the working model's tensor itself) and rounds each
    # entry once, so no float32 buffer of the tensor's size is needed (docs/memory.md).
    rounds_once = False
    # True: `merge` takes the stored deltas (a LoRA one factored) and reads them a row block at a
    # time (`optimize.deltas.rows`); False: it gets them as full tensors.
    reads_rows = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.searched = MERGE_METHODS[cls.name].searched
        cls.grad_field = MERGE_METHODS[cls.name].grad_field

    def __init__(
        self,
        normalize: bool | None = None,
        lambda_: float = 1.0,
        seed: int = 0,
        density_levels: tuple[float, ...] = (),
        roles: tuple[str, ...] = (),
    ):
        self.normalize = MERGE_METHODS[self.name].normalize if normalize is None else normalize
        self.lambda_, self.seed, self.roles = lambda_, seed, roles
        self.masks = MaskCache(seed, density_levels)

    def merge(
        self, name: str, g: int, base: Tensor, taus: list[Tensor | None], c: Candidate, out: Tensor
    ) -> None:
        """Write the merged tensor into `out` (float32), computing in float32: `base` and `taus`
        may come in a 16-bit store dtype."""
        raise NotImplementedError

    def coefficient_grad(
        self, name: str, g: int, base: Tensor, taus: list[Tensor | None], c: Candidate, grad: Tensor
    ) -> np.ndarray:
        """dL/d(grad_field) in group g through this tensor, given grad = dL/dtheta (any float dtype)."""
        raise NotImplementedError(f"merge method {self.name} has no gradient")

    def depends(self, present: list[bool]) -> bool:
        """Whether a tensor that these sources change (`present`, per source) depends on the
        coefficients once merged (its gradient is needed)."""
        return any(present)


def _dots(grad: Tensor, directions: list[Tensor | None], masks=None, scales=None) -> np.ndarray:
    """<grad, scale_t * mask_t * d_t> for every direction (0 for an absent one), a chunk at a
    time in float32 (no full-size copy of a 16-bit tensor), summed in float64."""
    flat, out = grad.reshape(-1), np.zeros(len(directions))
    masks, scales = masks or [None] * len(directions), scales or [1.0] * len(directions)
    for start in range(0, flat.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        g = flat[part].float()
        for i, (d, m) in enumerate(zip(directions, masks)):
            if d is not None:
                v = d.reshape(-1)[part].float()
                out[i] += float(torch.dot(g, v if m is None else v * m.reshape(-1)[part])) * scales[i]
    return out


def _normalized_grad(w: np.ndarray, p: np.ndarray) -> np.ndarray:
    """d/dw_j of sum_t p_t w_t / sum_s w_s = (p_j - sum_t p_t w_t / S) / S (S = 1 when ~0, as in
    `_normalized`)."""
    s = w.sum()
    if abs(s) < 1e-8:
        return p
    return (p - (p * w).sum() / s) / s


def _normalized(w: np.ndarray) -> np.ndarray:
    s = w.sum()
    return w / (s if abs(s) >= 1e-8 else 1.0)


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"

    def coefficients(self, c: Candidate, g: int) -> np.ndarray:
        w = c.weight[:, g]
        return self.lambda_ * (_normalized(w) if self.normalize else w)

    rounds_once = True

    def direction_dots(self, name, g, taus, c, grad) -> np.ndarray:
        """<grad, direction_t>, with theta = base + sum_t coefficient_t * direction_t."""
        return _dots(grad, taus)

    def coefficient_grad(self, name, g, base, taus, c, grad):
        p = self.direction_dots(name, g, taus, c, grad)
        return self.lambda_ * (_normalized_grad(c.weight[:, g], p) if self.normalize else p)

    reads_rows = True

    def merge(self, name, g, base, taus, c, out):
        coefs = self.coefficients(c, g)
        terms = [(tau, float(k)) for tau, k in zip(taus, coefs) if tau is not None and k != 0]
        for start, stop in row_blocks(out.shape, CHUNK):
            part = out[start:stop]  # a 16-bit model: the sum in float32, rounded once
            acc = part if part.dtype == torch.float32 else torch.empty_like(part, dtype=torch.float32)
            acc.copy_(base[start:stop])
            for tau, k in terms:
                acc.add_(rows(tau, start, stop), alpha=k)
            if acc is not part:
                part.copy_(acc)


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

    def coefficient_grad(self, name, g, base, taus, c, grad):
        w, p = c.weight[:, g], _dots(grad, taus)
        if self.normalize and abs(w.sum()) >= 1e-8:  # theta = base + sum_t w_t tau_t / S
            return _normalized_grad(w, p)
        return p + _dots(grad, [base])[0]  # theta = sum_t w_t (base + tau_t)

    def depends(self, present):
        return not self.normalize or super().depends(present)  # base * sum(w): every tensor moves


class DareLinear(TaskArithmetic):
    name = "dare_linear"
    rounds_once = False
    reads_rows = False

    def merge(self, name, g, base, taus, c, out):
        out.copy_(base)
        for i, (tau, coef) in enumerate(zip(taus, self.coefficients(c, g))):
            if tau is None or coef == 0:
                continue
            d = float(c.density[i, g])
            mask = self.masks.dare_mask(i, name, tau, d)
            if mask is None:
                out.add_(tau, alpha=float(coef))
            else:
                out.add_(tau * mask, alpha=float(coef) / d)

    def direction_dots(self, name, g, taus, c, grad):
        """The directions are the dropped and rescaled task vectors, m_t * tau_t / d_t."""
        masks = [
            None if t is None else self.masks.dare_mask(i, name, t, float(c.density[i, g]))
            for i, t in enumerate(taus)
        ]
        scales = [1.0 if m is None else 1 / float(c.density[i, g]) for i, m in enumerate(masks)]
        return _dots(grad, taus, masks, scales)


class Ties(MergeMethod):
    """`ties` above, with cached trim thresholds and the fused kernel of `optimize.kernels`."""

    name = "ties"
    rounds_once = True  # base + lambda * delta: one addition per entry
    delta = staticmethod(ties_delta)
    fused = Fused(ties_delta)
    fused_grad: Fused | None = Fused(ties_grad_dots)  # the gradient search's inner products

    reads_rows = True

    def operands(self, i: int, name: str, tau: Delta, density: float, w: float):
        """Per source: the tensors of the trim (read a row block at a time) and its scalars (0-d)."""
        return [tau], [self.threshold(i, name, tau, density), scalar(w, tau)]

    def threshold(self, i: int, name: str, tau: Delta, density: float) -> Tensor:
        """The trim's magnitude threshold as a 0-d tensor (0: every entry kept)."""
        thr = self.masks.magnitude_threshold(i, name, tau, density)
        return scalar(0.0 if thr is None else thr, tau)

    def kept(self, i: int, name: str, tau: Tensor, density: float, part: slice) -> Tensor:
        """tau'_t on the flat entries `part`: the trimmed task vector, in float32."""
        thr = self.masks.magnitude_threshold(i, name, tau, density)
        t = tau.view(-1)[part].float()
        return t if thr is None else torch.where(t.abs() >= thr, t, 0.0)

    def merge(self, name, g, base, taus, c, out):
        w = c.weight[:, g]
        used = [i for i, tau in enumerate(taus) if tau is not None and w[i] != 0]
        ops = [self.operands(i, name, taus[i], float(c.density[i, g]), float(w[i])) for i in used]
        tensors = [list(x) for x in zip(*(t for t, _ in ops))]  # per argument, one per source
        scalars = [list(x) for x in zip(*(s for _, s in ops))]
        for start, stop in row_blocks(out.shape):
            part = out[start:stop]
            part.copy_(base[start:stop])
            if used:
                block = [[rows(t, start, stop).reshape(-1) for t in arg] for arg in tensors]
                add_elementwise(part, self.fused, self.delta, block, scalars, self.normalize, self.lambda_)

    def coefficient_grad(self, name, g, base, taus, c, grad):
        present = [i for i, tau in enumerate(taus) if tau is not None]
        out = np.zeros(len(taus))
        if not present:
            return out
        weights = [scalar(float(c.weight[i, g]), grad) for i in present]
        flat = grad.reshape(-1)
        if self.fused_grad is not None and flat.numel() >= Fused.MIN_NUMEL:
            thresholds = [self.threshold(i, name, taus[i], float(c.density[i, g])) for i in present]
            flat_taus = [taus[i].reshape(-1) for i in present]
            dots = self.fused_grad(flat_taus, thresholds, weights, flat, self.normalize)
            if dots is not None:
                out[present] = dots.double().cpu().numpy()
                return self.lambda_ * out
        for start in range(0, flat.numel(), CHUNK):
            part = slice(start, start + CHUNK)
            kept = [self.kept(i, name, taus[i], float(c.density[i, g]), part) for i in present]
            dots = sign_fixed_dots(kept, weights, flat[part].float(), self.normalize)
            out[present] += dots.double().cpu().numpy()
        return self.lambda_ * out


class DareTies(Ties):
    name = "dare_ties"
    delta = staticmethod(dare_delta)
    fused = Fused(dare_delta)
    fused_grad = None  # its operands are not the trim's: eager, in chunks

    def operands(self, i, name, tau, density, w):
        noise = self.masks.dare_noise(i, name, tau)
        # an int16 bound: against a 0-d int64 one the comparison would still run in int16 (the
        # noise's dtype), and 2**15 would wrap to -2**15 and drop everything
        keep_max = torch.tensor(
            self.masks.dare_keep_max(min(density, 1.0)), dtype=torch.int16, device=tau.device
        )
        return [tau, noise], [keep_max, scalar(w / min(density, 1.0), tau), scalar(w, tau)]

    def kept(self, i, name, tau, density, part):
        t = tau.view(-1)[part].float()
        if density >= 1:
            return t
        noise = self.masks.dare_noise(i, name, tau).view(-1)[part]
        return torch.where(noise <= self.masks.dare_keep_max(density), t, 0.0) / density


class Slerp(MergeMethod):
    """Spherical interpolation between the two sources' full weights, per tensor, as mergekit:
    nearly collinear tensors (|cos| > 0.9995) fall back to linear interpolation."""

    name = "slerp"
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
        base = base.float()
        tau_a, tau_b = (tau.float() if tau is not None else torch.zeros_like(base) for tau in taus)
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

    def coefficient_grad(self, name, g, base, taus, c, grad):
        # d coefficient_t / dt = lambda (domain) or -lambda (alignment)
        p = _dots(grad, taus)
        return self.lambda_ * sum(x if r == "domain" else -x for x, r in zip(p, self.roles))

    def coefficients(self, c, g):
        t = float(c.t[g])
        return self.lambda_ * np.array([t if r == "domain" else 1 - t for r in self.roles])


METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (Linear, TaskArithmetic, Ties, DareTies, DareLinear, Slerp, MergeAlign)
}
