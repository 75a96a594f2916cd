"""Merge methods against the reference implementation (mergekit 0.1.5) on a tiny model, through
our own mergekit.yaml export, so the export is checked at the same time."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit.sparsify import magnitude
from safetensors.torch import load_file

from optimize.config import validate_config
from optimize.context import prepare
from optimize.export import mergekit_config, mergekit_paths
from optimize.methods import Candidate, DareLinear, DareTies, Ties
from tests.conftest import world_config


def random_candidate(groups: int, seed: int = 0) -> Candidate:
    rng = np.random.default_rng(seed)
    return Candidate(
        weight=rng.uniform(0.1, 1.0, (2, groups)),
        density=rng.choice([0.3, 0.5, 1.0], (2, groups)),
        t=rng.uniform(0, 1, groups),
    )


@pytest.mark.parametrize(
    "method,normalize,lora",
    [
        ("task_arithmetic", None, False),
        ("linear", None, False),
        ("ties", None, False),
        ("ties", False, True),
        ("slerp", None, False),
        ("mergealign", None, False),
    ],
)
def test_matches_mergekit(world, tmp_path, monkeypatch, method, normalize, lora):
    raw = world_config(world, tmp_path / "run")
    raw["merge"] = {"method": method, "normalize": normalize}
    if lora:
        raw["sources"][1]["path"] = str(world["lora"])
    cfg = validate_config(raw)
    ctx = prepare(cfg)
    cand = random_candidate(ctx.base.groups.n)
    ctx.merger.apply(cand)
    ours = {n: p.detach().clone() for n, p, _ in ctx.merger.params}
    cfg.run_dir.mkdir(parents=True)
    base_path, source_paths = mergekit_paths(cfg, cfg.run_dir)
    mk = mergekit_config(cfg, ctx.base.groups, list(ours), cand, base_path, source_paths)
    monkeypatch.chdir(cfg.run_dir)  # the exported paths are relative to the run folder
    run_merge(
        MergeConfiguration.model_validate(mk),
        str(tmp_path / "out"),
        # the flags the recipe's header gives for LoRA sources (mergekit's base+adapter form)
        MergeOptions(
            quiet=True,
            write_model_card=False,
            lora_merge_cache=str(tmp_path / "lora_cache"),
            lora_merge_dtype="float32",
        ),
    )
    theirs = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        theirs.update(load_file(f))
    assert set(theirs) == set(ours)
    for n, t in ours.items():
        torch.testing.assert_close(t, theirs[n].float(), rtol=1e-5, atol=1e-6, msg=n)
    # the candidate really moved the model away from the base
    assert any(not torch.equal(ours[n], ctx.base.weights[n]) for n in ours)


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 0.9])
def test_ties_cached_trim_equals_mergekit_magnitude(density):
    tau = torch.randn(300, 70, generator=torch.Generator().manual_seed(1))
    method = Ties(normalize=True, density_levels=(0.1, 0.5, 0.9))
    ours = tau * method.masks.magnitude_mask(0, "w", tau, density)
    torch.testing.assert_close(ours, magnitude(tau, density))
    # served from the cache the second time, same answer
    assert (0, "w") in method.masks._thresholds
    torch.testing.assert_close(tau * method.masks.magnitude_mask(0, "w", tau, density), ours)


@pytest.mark.parametrize("cls", [DareTies, DareLinear])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
def test_dare_keep_rate_and_rescale(cls, density):
    tau = torch.randn(400, 500, generator=torch.Generator().manual_seed(2))
    method = cls(normalize=False, seed=7)
    mask = method.masks.dare_mask(0, "w", tau, density)
    keep = mask.float().mean().item()
    assert abs(keep - density) < 0.005  # 200k Bernoulli draws: 0.005 is > 4 standard deviations
    base = torch.zeros_like(tau)
    out = torch.empty_like(tau)
    cand = Candidate(weight=np.ones((1, 1)), density=np.full((1, 1), density))
    method.merge("w", 0, base, [tau], cand, out)
    kept = out != 0
    assert torch.equal(kept, mask)
    # surviving entries are rescaled by 1 / (1 - p) = 1 / density: the expectation is unbiased
    torch.testing.assert_close(out[kept], tau[kept] / density)
    assert abs(out.sum().item() - tau.sum().item()) < 0.05 * tau.abs().sum().item()


def test_dare_masks_are_seeded_and_nested():
    tau = torch.randn(100, 100)
    a, b, c = (
        DareTies(normalize=False, seed=1),
        DareTies(normalize=False, seed=1),
        DareTies(normalize=False, seed=2),
    )
    assert torch.equal(a.masks.dare_mask(0, "w", tau, 0.5), b.masks.dare_mask(0, "w", tau, 0.5))
    assert not torch.equal(a.masks.dare_mask(0, "w", tau, 0.5), c.masks.dare_mask(0, "w", tau, 0.5))
    assert not torch.equal(a.masks.dare_mask(0, "w", tau, 0.5), a.masks.dare_mask(1, "w", tau, 0.5))
    # a higher density keeps a superset: masks come from one cached noise tensor
    assert torch.all(a.masks.dare_mask(0, "w", tau, 0.3) <= a.masks.dare_mask(0, "w", tau, 0.6))


def test_ties_sign_election_by_hand():
    base = torch.zeros(4)
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    t2 = torch.tensor([2.0, 1.0, -1.0, -1.0])
    out = torch.empty(4)
    m = Ties(normalize=False)
    m.merge("w", 0, base, [t1, t2], Candidate(weight=np.ones((2, 1)), density=np.ones((2, 1))), out)
    # elected signs: +, -, +, -  -> keep agreeing entries only
    torch.testing.assert_close(out, torch.tensor([3.0, -2.0, 3.0, -1.0]))
    Ties(normalize=True).merge(
        "w", 0, base, [t1, t2], Candidate(weight=np.ones((2, 1)), density=np.ones((2, 1))), out
    )
    torch.testing.assert_close(out, torch.tensor([1.5, -2.0, 3.0, -1.0]))


@pytest.mark.parametrize("cls,normalize", [(Ties, False), (Ties, True), (DareTies, False)])
def test_fused_kernel_equals_the_eager_merge(world, tmp_path, monkeypatch, cls, normalize):
    """The torch.compile'd TIES/DARE kernel (used on real-size tensors) gives the eager, chunked
    result on every tensor of the tiny model, the mergekit-checked one above."""
    from optimize.kernels import Fused

    ctx = prepare(validate_config(world_config(world, tmp_path / "run")))
    cand = random_candidate(ctx.base.groups.n, seed=3)
    ctx.merger.method = cls(normalize=normalize, seed=1, density_levels=(0.3, 0.5))
    monkeypatch.setattr(Fused, "MIN_NUMEL", 1 << 60)  # eager everywhere
    ctx.merger.apply(cand)
    eager = {n: p.detach().clone() for n, p, _ in ctx.merger.params}
    monkeypatch.setattr(Fused, "MIN_NUMEL", 0)  # fused everywhere
    monkeypatch.setattr(Fused, "enabled", True)
    ctx.merger.apply(cand)
    assert Fused.enabled and cls.fused.compiled is not None  # it compiled (no eager fallback)
    for n, p, _ in ctx.merger.params:
        torch.testing.assert_close(p.detach(), eager[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_ties_execution_equals_the_three_plain_steps(monkeypatch, normalize, fused):
    """The cached, chunked or compiled TIES of `Ties.merge` gives what `methods.ties` (trim,
    elect, disjoint merge, as written in the paper) gives, zero and negative weights included."""
    from optimize.kernels import Fused
    from optimize.methods import ties

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(300, 250, generator=gen)  # 75k entries: above Fused.MIN_NUMEL
    taus = [torch.randn(300, 250, generator=gen) * s for s in (1.0, 0.5, 2.0)]
    weights, densities = np.array([[0.7], [-0.3], [1.2]]), np.array([[0.3], [0.5], [1.0]])
    monkeypatch.setattr(Fused, "enabled", fused)
    method = Ties(normalize=normalize, lambda_=0.8, density_levels=(0.3, 0.5))
    out = torch.empty_like(base)
    method.merge("w", 0, base, taus, Candidate(weight=weights, density=densities), out)
    plain = ties(base, taus, weights[:, 0], densities[:, 0], normalize, lambda_=0.8)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, base)


@pytest.mark.parametrize("fused", [False, True])
def test_dare_ties_at_density_one_keeps_every_entry(monkeypatch, fused):
    """DARE keeps all at density 1: DARE-TIES is then TIES without a trim. (A keep bound of 2**15
    compared with int16 noise wrapped to -2**15 and dropped the whole source.)"""
    from optimize.kernels import Fused

    gen = torch.Generator().manual_seed(6)
    base = torch.randn(300, 250, generator=gen)
    taus = [torch.randn(300, 250, generator=gen) for _ in range(2)]
    cand = Candidate(weight=np.array([[0.7], [0.4]]), density=np.ones((2, 1)))
    monkeypatch.setattr(Fused, "enabled", fused)
    dare, plain = torch.empty_like(base), torch.empty_like(base)
    DareTies(normalize=False, density_levels=(1.0,)).merge("w", 0, base, taus, cand, dare)
    Ties(normalize=False, density_levels=(1.0,)).merge("w", 0, base, taus, cand, plain)
    torch.testing.assert_close(dare, plain, rtol=1e-6, atol=1e-6)


def test_a_path_mergekit_would_misread_is_said(world, tmp_path, capsys):
    """mergekit reads '+' as base+LoRA and '@' as repo@revision: such a path in mergekit.yaml
    failed only when the user ran mergekit-yaml."""
    odd = shutil.copytree(world["b"], tmp_path / "v1+fix@2" / "b")
    raw = world_config(world, tmp_path / "run")
    raw["sources"][1]["path"] = str(odd)
    cfg = validate_config(raw)
    cfg.run_dir.mkdir(parents=True)
    _, sources = mergekit_paths(cfg, cfg.run_dir)
    err = capsys.readouterr().err
    assert f"{odd}, whose '+' or '@' mergekit reads as base+LoRA or repo@revision" in err
    assert sources[1].endswith("v1+fix@2/b") and "ln -s" in err
    mergekit_paths(cfg, cfg.run_dir, start=cfg.run_dir / "merged")  # merged/'s own recipe: said once
    assert "mergekit reads" not in capsys.readouterr().err
