"""How the sparsified merges run fast: cached masks, one fused kernel, chunks.

`optimize.methods` states TIES and DARE as the papers do (`methods.ties`, three plain steps). A
search merges hundreds of candidates, so the execution here precomputes what does not change
between candidates and fuses the rest; tests/test_methods.py proves it equal to the plain steps.

- `MaskCache`: the magnitude threshold of every task vector for every density of the search grid
  (one sort gives them all, so a trim is one comparison), and DARE's drop noise per seed (the
  Bernoulli(d) keep mask is `noise <= keep_max(d)`).
- `sign_consensus`, `ties_delta`, `dare_delta`: TIES's elect + disjoint merge written with the
  positive and negative parts, one elementwise expression...
- `Fused`: ...compiled into one kernel (torch.compile) for real-size tensors; `elementwise`
  evaluates it in cache-sized chunks otherwise.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings

import torch

Tensor = torch.Tensor


class MaskCache:
    """Per (source, tensor): magnitude thresholds per density and DARE noise, computed once."""

    def __init__(self, seed: int = 0, density_levels: tuple[float, ...] = ()):
        self.seed = seed
        self.density_levels = tuple(sorted(set(round(d, 6) for d in density_levels)))
        self._thresholds: dict[tuple[int, str], dict[float, float]] = {}
        self._noise: dict[tuple[int, str], Tensor] = {}

    def magnitude_threshold(self, i: int, name: str, tau: Tensor, density: float) -> float | None:
        """mergekit's `magnitude` keeps the k = max(1, int(d n)) largest |tau|: the k-th largest
        |tau| is the threshold (None: keep all). Cached per (source, tensor, density)."""
        if density >= 1:
            return None
        cache = self._thresholds.setdefault((i, name), {})
        d = round(float(density), 6)
        if d not in cache:
            n = tau.numel()
            if n > BISECT_NUMEL:  # an embedding matrix: no n-sized temporaries
                cache[d] = kth_largest_abs(tau, max(1, int(d * n)))
                return cache[d]
            flat = tau.abs().flatten()
            wanted = [d] + [x for x in self.density_levels if x < 1 and x not in cache]
            if len(wanted) > 1:  # one sort gives the threshold of every grid density at once
                ordered = torch.sort(flat).values
                for x in wanted:
                    cache[x] = ordered[n - max(1, int(x * n))].item()
            else:
                cache[d] = torch.kthvalue(flat, n - max(1, int(d * n)) + 1).values.item()
        return cache[d]

    def magnitude_mask(self, i: int, name: str, tau: Tensor, density: float) -> Tensor | None:
        """TIES's trim as a keep mask (None: keep all)."""
        thr = self.magnitude_threshold(i, name, tau, density)
        return None if thr is None else tau.abs() >= thr

    def dare_noise(self, i: int, name: str, tau: Tensor) -> Tensor:
        """Uniform int16 noise drawn once per (seed, source, tensor): masks are nested across
        densities and cost one comparison."""
        key = (i, name)
        if key not in self._noise:
            gen = torch.Generator(device="cpu").manual_seed(stable_hash(self.seed, i, name))
            self._noise[key] = torch.randint(-(2**15), 2**15, tau.shape, generator=gen, dtype=torch.int16).to(
                tau.device
            )
        return self._noise[key]

    @staticmethod
    def dare_keep_max(density: float) -> int:
        """The largest noise value DARE keeps: P(noise <= it) = density, an int16 itself (so the
        comparison stays in int16: 32767 keeps all)."""
        return min(2**15 - 1, max(-(2**15), round(density * 2**16) - 2**15 - 1))

    def dare_mask(self, i: int, name: str, tau: Tensor, density: float) -> Tensor | None:
        """DARE's Bernoulli(density) keep mask (None: keep all)."""
        if density >= 1:
            return None
        return self.dare_noise(i, name, tau) <= self.dare_keep_max(density)


BISECT_NUMEL = 1 << 26  # above this (64M entries), thresholds by bisection: a sort would take 12 B/entry
_BITS = {  # a non-negative float's bit pattern, read as an integer, grows with its value
    torch.float32: (torch.int32, 0x7F800000),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
}


def kth_largest_abs(tau: Tensor, k: int, chunk: int = 1 << 24) -> float:
    """The k-th largest |tau|, exactly, without sorting: bisection over the bit patterns of
    non-negative floats (at most 31 passes), each pass counting in chunks."""
    int_dtype, top = _BITS[tau.dtype]
    flat = tau.reshape(-1)

    def at_least(bits: int) -> int:  # entries with |tau| >= the float of `bits`
        chunks = (flat[s : s + chunk] for s in range(0, flat.numel(), chunk))
        return sum(int((c.abs().view(int_dtype) >= bits).sum()) for c in chunks)

    lo, hi = 0, top  # at_least(lo) >= k holds; find the largest such bit pattern
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if at_least(mid) >= k else (lo, mid - 1)
    return torch.tensor(lo, dtype=int_dtype).view(tau.dtype).item()


def stable_hash(*parts) -> int:
    """A seed from (seed, source, tensor name) that, unlike hash(), is the same in every process."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sign_consensus(weighted: list[Tensor], weights: list[Tensor], normalize: bool) -> Tensor:
    """TIES's elect + disjoint merge of the trimmed, weighted task vectors: the elected sign of an
    entry is that of their sum and only the entries of that sign are summed; with `normalize`,
    divided by the weights of the sources that agree (sources trimmed here never agree)."""
    positive = sum(d.clamp(min=0) for d in weighted)
    negative = sum(d.clamp(max=0) for d in weighted)
    up = positive + negative >= 0
    mixed = torch.where(up, positive, negative)
    if normalize:
        div = torch.where(
            up,
            sum(w * (d > 0) for d, w in zip(weighted, weights)),
            sum(w * (d < 0) for d, w in zip(weighted, weights)),
        )
        mixed = mixed / torch.where(div == 0, 1.0, div)
    return mixed


def ties_delta(taus, thresholds, weights, normalize: bool) -> Tensor:
    """sum over agreeing sources of w_t * (tau_t where |tau_t| >= its magnitude threshold).
    Task vectors come in their store dtype and are read as float32 inside the kernel."""
    weighted = [torch.where(t.abs() >= th, t.float(), 0.0) * w for t, th, w in zip(taus, thresholds, weights)]
    return sign_consensus(weighted, weights, normalize)


def dare_delta(taus, noises, keep_maxes, scales, weights, normalize: bool) -> Tensor:
    """As ties_delta, with DARE's random drop (noise <= keep_max keeps) and rescale (w / d)."""
    weighted = [
        torch.where(n <= k, t.float(), 0.0) * s for t, n, k, s in zip(taus, noises, keep_maxes, scales)
    ]
    return sign_consensus(weighted, weights, normalize)


class Fused:
    """A merge expression compiled into one fused elementwise kernel (torch.compile): TIES on
    SmolLM2-135M goes from ~1.45 s to ~0.13 s per candidate (BENCHMARKS.md). Compiled once per
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
                print(
                    f"[alignmerge] compiling the fused merge kernel {self.fn.__name__} (once per process; "
                    "15-40 s on a small CPU)",
                    file=sys.stderr,
                )
                self.compiled = torch.compile(self.fn, dynamic=True)
            return self.compiled(*args)
        except Exception as err:  # any compiler failure: stay correct, go eager
            warnings.warn(
                f"torch.compile of {self.fn.__name__} failed ({err}); merging eagerly (slower)",
                stacklevel=2,
            )
            Fused.enabled = False
            return None


CHUNK = 1 << 18  # eager path: elements per chunk; the temporaries of one chunk stay in cache


def add_elementwise(out: Tensor, fused: Fused, fn, tensors, scalars, normalize: bool, alpha: float) -> None:
    """out += alpha * fn(*tensors, *scalars, normalize), fused for real-size tensors, else in
    chunks. `tensors` holds, per argument of `fn`, one flat tensor per source."""
    out_flat = out.view(-1)
    if out_flat.numel() >= Fused.MIN_NUMEL:
        delta = fused(*tensors, *scalars, normalize)
        if delta is not None:
            out_flat.add_(delta, alpha=alpha)
            return
    for start in range(0, out_flat.numel(), CHUNK):
        sl = slice(start, start + CHUNK)
        chunk = [[t[sl] for t in arg] for arg in tensors]
        out_flat[sl].add_(fn(*chunk, *scalars, normalize), alpha=alpha)


def scalar(x: float, like: Tensor) -> Tensor:
    """A float32 0-d tensor, so a compiled kernel is not specialized on the value."""
    return torch.tensor(float(x), dtype=torch.float32, device=like.device)
