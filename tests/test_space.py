import numpy as np
import optuna
import pytest

from core.errors import ConfigError
from optimize.config import validate_config
from optimize.methods import METHODS
from optimize.sources import layer_groups
from optimize.space import SearchSpace

NAMES = (
    ["model.embed_tokens.weight"]
    + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)]
    + ["model.norm.weight", "lm_head.weight"]
)
GROUPS = layer_groups(NAMES)  # embed, 6 layers, norm, lm_head


def space(parametrization, method="ties", **search):
    cfg = validate_config(
        {
            "name": "x",
            "merge": {"method": method},
            "sources": [
                {"name": "a", "path": "p", "role": "alignment"},
                {"name": "b", "path": "q", "role": "domain"},
            ],
            "search": {"parametrization": parametrization, **search},
        }
    )
    return SearchSpace(cfg, GROUPS, METHODS[method].searched)


def test_counts_per_parametrization():
    assert space("global").n_params == 4  # weight + density per source
    assert space("layerwise").n_params == 4 * 9
    assert space("blocks:3").n_params == 4 * (3 + 3)  # 3 layer blocks + embed, norm, lm_head
    assert space("gradient:4").n_params == 4 * 4
    assert space("layerwise", method="slerp").n_params == 9  # one t per group


def test_blocks_and_gradient_expand_to_groups():
    s = space("blocks:3", method="mergealign")
    params = {
        "t.block0": 0.1,
        "t.block1": 0.5,
        "t.block2": 0.9,
        "t.embed": 0.0,
        "t.norm": 0.7,
        "t.lm_head": 1.0,
    }
    c = s.decode(params)
    np.testing.assert_allclose(c.t, [0.0, 0.1, 0.1, 0.5, 0.5, 0.9, 0.9, 0.7, 1.0])
    g = space("gradient:2", method="mergealign").decode({"t.cp0": 0.0, "t.cp1": 1.0})
    np.testing.assert_allclose(g.t, np.linspace(0, 1, 9))


def test_densities_stay_on_the_cache_grid():
    s = space("layerwise", density=[0.15, 0.9], density_step=0.1)
    assert s.density_levels == (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        c = s.suggest(study.ask())
        assert np.all(np.isin(np.round(c.density, 6), s.density_levels))
        assert c.weight.shape == (2, 9)


def test_initial_point_and_grid():
    s = space("global")
    c = s.decode(s.initial_params())
    np.testing.assert_allclose(c.weight, 0.5)  # 1 / number of sources, like mergekit-evolve
    np.testing.assert_allclose(c.density, 1.0)
    grid = space("global", sampler="grid", grid=[0.25, 0.5, 1.0]).grid()
    assert grid["weight[a]"] == [0.25, 0.5, 1.0] and grid["density[b]"] == [0.25, 0.5, 1.0]


def test_too_many_blocks_or_control_points():
    with pytest.raises(ConfigError, match="more blocks than the model has layers"):
        space("blocks:7")
    assert space("gradient:9").n_params == 4 * 9  # one per group, like layerwise
    with pytest.raises(ConfigError, match=r"gradient:10 asks for more control points .* groups \(9\)"):
        space("gradient:10")
    with pytest.raises(ValueError, match="is not one of"):  # not a million names, nor int('9' * 5000)
        space("gradient:1000000")


def test_toward_alignment_moves_every_parameter_linearly_to_the_alignment_source_alone():
    s = space("gradient:2", density_step=0.1)
    start = {n: 0.4 if n.startswith("weight") else 0.5 for names in s.params.values() for n in names}
    assert s.toward_alignment(start, 0.0) == start
    end = s.toward_alignment(start, 1.0)
    for axis, names in s.params.items():
        for n in names:
            expected = {
                ("weight", "a"): 1.0,  # the alignment source at full weight ...
                ("density", "a"): 1.0,  # ... untrimmed
                ("weight", "b"): 0.0,  # the domain source gone
                ("density", "b"): 0.5,  # (its density is then moot and stays)
            }[axis.field, axis.source]
            assert end[n] == pytest.approx(expected)
    mid = s.toward_alignment(start, 0.25)
    assert mid["weight[a].cp0"] == pytest.approx(0.4 + 0.25 * 0.6)
    assert mid["weight[b].cp1"] == pytest.approx(0.4 * 0.75)
    assert mid["density[a].cp0"] == pytest.approx(0.6)  # 0.625, snapped to the density grid
    c = s.decode(s.toward_alignment(start, 0.5))  # a valid point of the space
    np.testing.assert_allclose(c.weight[0], 0.7)
    t_only = space("global", method="mergealign").toward_alignment({"t": 0.8}, 0.5)
    assert t_only == {"t": pytest.approx(0.4)}  # t -> 0: all alignment vector
    assert space("global", method="slerp").toward_alignment({"t": 0.8}, 0.5) == {"t": pytest.approx(0.4)}
    cfg = validate_config(  # slerp from a domain source to the aligned one: t -> 1
        {
            "name": "x",
            "merge": {"method": "slerp"},
            "sources": [
                {"name": "b", "path": "q", "role": "domain"},
                {"name": "a", "path": "p", "role": "alignment"},
            ],
            "search": {"parametrization": "global"},
        }
    )
    second = SearchSpace(cfg, GROUPS, METHODS["slerp"].searched)
    assert second.toward_alignment({"t": 0.2}, 0.5) == {"t": pytest.approx(0.6)}
