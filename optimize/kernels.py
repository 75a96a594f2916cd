"""How the sparsified merges run fast: cached masks, one fused kernel, chunks.

`optimize.methods` states TIES and DARE as the papers do (`methods.ties`, three plain steps). A
search merges hundreds of candidates, so the execution here precomputes what does not change
between candidates and fuses the rest; tests/test_methods.py proves it equal to the plain steps.

- `MaskCache`: the magnitude threshold of every task vector for every density of the search grid
  (one radix selection gives them all, so a trim is one comparison), and DARE's drop noise per seed (the
  Bernoulli(d) keep mask is `noise <= keep_max(d)`).
- `sign_consensus`, `ties_delta`, `dare_delta`: TIES's elect + disjoint merge written with the
  positive and negative parts, one elementwise expression...
- `Fused`: ...compiled into one kernel (torch.compile) for real-size tensors; `add_elementwise`
  evaluates it eagerly in cache-sized chunks otherwise. The methods call it on row blocks
  (`row_blocks`), so its result and a LoRA delta multiplied out stay small.
- `sign_fixed_dots`, `ties_grad_dots`: the gradient search's inner products for TIES (signs held
  fixed, docs/method.md §5.5), fused the same way: one pass over the task vectors per step.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings

import torch

from optimize.deltas import Delta, LowRank, rows

Tensor = torch.Tensor


class MaskCache:
    """Per (source, tensor): magnitude thresholds per density and DARE noise, computed once."""

    def __init__(self, seed: int = 0, density_levels: tuple[float, ...] = ()):
        self.seed = seed
        self.density_levels = tuple(sorted(set(round(d, 6) for d in density_levels)))
        self._thresholds: dict[tuple[int, str], dict[float, float]] = {}
        self._noise: dict[tuple[int, str], Tensor] = {}

    def magnitude_threshold(self, i: int, name: str, tau: Delta, density: float) -> float | None:
        """mergekit's `magnitude` keeps the k = max(1, int(d n)) largest |tau|: the k-th largest
        |tau| is the threshold (None: keep all). Cached per (source, tensor, density); the first
        call finds every grid density's at once."""
        if density >= 1:
            return None
        cache = self._thresholds.setdefault((i, name), {})
        d = round(float(density), 6)
        if d not in cache:
            wanted = sorted({d} | {x for x in self.density_levels if x < 1} - cache.keys())
            n = math.prod(tau.shape)
            cache.update(zip(wanted, kth_largest_abs(tau, [max(1, int(x * n)) for x in wanted])))
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


BLOCK = 1 << 20  # entries per block when a merge walks a tensor by rows: a LoRA delta is multiplied
# out, and the fused kernel's float32 result written, 4 MB at a time, whatever the model's size


def row_blocks(shape: tuple[int, ...], entries: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) row ranges of a tensor of `shape`, each of at most `entries` (default BLOCK)
    entries, or one row."""
    width = math.prod(shape[1:])
    step = max(1, (entries or BLOCK) // max(width, 1))
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def kth_largest_abs(delta: Delta, ks: list[int], block: int | None = None) -> list[float]:
    """The k-th largest |delta| for each k in `ks`, exactly, without sorting (a sort would take 12
    B per entry): a non-negative float's bit pattern, read as an integer, grows with its value, so
    a histogram of the high 16 bits finds the bucket holding each k-th largest, and for float32 a
    histogram of the low 16 bits within that bucket finds the entry (radix selection). Two passes
    over the delta's row blocks (a LoRA delta is multiplied out a block at a time, twice).
    Other dtypes (float64 in tests) are sorted."""
    dtype = torch.float32 if isinstance(delta, LowRank) else delta.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        ordered = torch.sort(delta.abs().flatten()).values
        return [ordered[delta.numel() - k].item() for k in ks]
    wide = dtype == torch.float32

    def bits():  # |delta|'s bit patterns, a row block at a time
        for start, stop in row_blocks(delta.shape, block):
            yield rows(delta, start, stop).abs().view(torch.int32 if wide else torch.int16).reshape(-1)

    def select(hist: Tensor, k: int) -> tuple[int, int]:
        """The bucket holding the k-th largest, and that entry's rank within the bucket."""
        at_least = hist.flip(0).cumsum(0).flip(0)  # entries in this bucket or above
        bucket = int((at_least >= k).sum()) - 1
        above = int(at_least[bucket + 1]) if bucket + 1 < hist.numel() else 0
        return bucket, k - above

    high = sum(torch.bincount(b >> 16 if wide else b, minlength=1 << 15) for b in bits())
    picks = [select(high, k) for k in ks]
    if not wide:
        patterns = [bucket for bucket, _ in picks]
    else:
        low = dict.fromkeys({bucket for bucket, _ in picks}, 0)
        for b in bits():
            for bucket in low:
                low[bucket] = low[bucket] + torch.bincount(b[(b >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
        patterns = [(bucket << 16) | select(low[bucket], rank)[0] for bucket, rank in picks]
    int_dtype = torch.int32 if wide else torch.int16
    return [torch.tensor(p, dtype=int_dtype).view(dtype).item() for p in patterns]


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


def sign_fixed_dots(kept: list[Tensor], weights: list[Tensor], grad: Tensor, normalize: bool) -> Tensor:
    """d<grad, TIES delta>/dw_t for every source, the elected signs held fixed (docs/method.md §5.5).
    With a_t = [sign(w_t tau'_t) is the elected sign]: <grad, a_t tau'_t> without normalize, and
    <grad, a_t (tau'_t - delta)> / sum_s w_s a_s with it. A zero weight counts with the sign of
    tau'_t: the derivative as w_t grows from 0. `kept`: the trimmed (or dropped and rescaled) task
    vectors tau'_t in float32; `weights`: 0-d tensors."""
    weighted = [w * t for w, t in zip(weights, kept)]
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    agree = [torch.sign(torch.where(w != 0, wt, t)) == elected for w, wt, t in zip(weights, weighted, kept)]
    if not normalize:
        return torch.stack([(grad * torch.where(a, t, 0.0)).sum() for a, t in zip(agree, kept)])
    div = sum(w * a for w, a in zip(weights, agree))
    safe = torch.where(div == 0, 1.0, div)
    delta = sum(wt * a for wt, a in zip(weighted, agree)) / safe
    scaled = torch.where(div == 0, 0.0, grad / safe)
    return torch.stack([(scaled * torch.where(a, t - delta, 0.0)).sum() for a, t in zip(agree, kept)])


def ties_grad_dots(taus, thresholds, weights, grad: Tensor, normalize: bool) -> Tensor:
    """`sign_fixed_dots` of TIES from the operands of `ties_delta` (fused into one kernel)."""
    kept = [torch.where(t.abs() >= th, t.float(), 0.0) for t, th in zip(taus, thresholds)]
    return sign_fixed_dots(kept, weights, grad.float(), normalize)


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
    """out += alpha * fn(*tensors, *scalars, normalize), fused for real-size tensors, else (or
    where compiling failed) eagerly in chunks. `tensors` holds, per argument of `fn`, one flat
    tensor per source."""
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
