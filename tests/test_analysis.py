"""eval.analysis on cases with known answers: cosine, distance, contribution, linear CKA."""

import math

import numpy as np
import pytest
import torch

from core.models import load_model, load_tokenizer
from eval.analysis import cka_profile, hidden_states, linear_cka, prompt_batches, weight_metrics
from optimize.sources import layer_groups
from tests.conftest import SENTENCES

OF_PARAM = {"g0.w": 0, "g1.w": 1, "g2.w": 2}


def test_cosine_identical_orthogonal_and_untouched_groups():
    e1, e2, v = torch.tensor([1.0, 0, 0]), torch.tensor([0, 3.0, 0]), torch.randn(5)
    a = {"g0.w": e1, "g1.w": v}
    b = {"g0.w": e2, "g1.w": 2 * v}  # g2 untouched by both
    cos = weight_metrics({"a": a, "b": b}, a, OF_PARAM, 3)["cosine"]["a ~ b"]
    assert cos[0] == pytest.approx(0, abs=1e-12)  # orthogonal
    assert cos[1] == pytest.approx(1)  # same direction
    assert math.isnan(cos[2])  # no task vector in that group
    same = weight_metrics({"a": a, "a2": dict(a)}, a, OF_PARAM, 3)["cosine"]["a ~ a2"]
    assert same[:2] == pytest.approx([1, 1])


def test_distance_coefficient_and_share_of_a_known_merge():
    t1 = {"g0.w": torch.tensor([1.0, 0, 0])}  # ||t1|| = 1
    t2 = {"g0.w": torch.tensor([0, 2.0, 0])}  # ||t2|| = 2, orthogonal to t1
    merged = {"g0.w": 0.3 * t1["g0.w"] + 0.7 * t2["g0.w"]}
    m = weight_metrics({"s1": t1, "s2": t2}, merged, OF_PARAM, 1)
    assert m["coefficient"]["s1"][0] == pytest.approx(0.3)
    assert m["coefficient"]["s2"][0] == pytest.approx(0.7)
    # ||tau_m - tau_1|| / ||tau_1|| = ||(-0.7, 1.4, 0)|| / 1
    assert m["distance"]["s1"][0] == pytest.approx(math.sqrt(0.49 + 1.96))
    assert m["distance"]["s2"][0] == pytest.approx(math.sqrt(0.09 + 0.36) / 2)
    assert m["share"]["s1"][0] == pytest.approx(0.3 / (0.3 + 1.4))
    assert m["share"]["s1"][0] + m["share"]["s2"][0] == pytest.approx(1)
    # the merged model equal to a source: distance 0 to it, coefficient 1
    m = weight_metrics({"s1": t1, "s2": t2}, t1, OF_PARAM, 1)
    assert m["distance"]["s1"][0] == pytest.approx(0) and m["coefficient"]["s1"][0] == pytest.approx(1)
    assert m["share"]["s1"][0] == pytest.approx(1)


def test_cka_known_values_and_invariances():
    # one feature each: linear CKA is the squared Pearson correlation, here (-sqrt(3)/2)^2
    assert linear_cka(
        torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [0.0]])
    ) == pytest.approx(0.75)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen)
    y = torch.randn(200, 12, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    assert linear_cka(x, x) == pytest.approx(1)
    assert linear_cka(x, 3.7 * x @ q) == pytest.approx(1)  # orthogonal transform + isotropic scaling
    base = linear_cka(x, y)
    assert base < 0.5  # independent noise is far from 1
    assert linear_cka(x @ q, 0.2 * y) == pytest.approx(base)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(base)  # centring
    # fewer samples than features (Gram form) and more (feature form) give the same value
    few_x, few_y = x[:6], y[:6]
    assert linear_cka(few_x, few_y) == pytest.approx(linear_cka(few_x.repeat(4, 1), few_y.repeat(4, 1)))


def test_hidden_state_cka_of_tiny_models(world):
    model, tok = load_model(world["base"]), load_tokenizer(world["base"])
    other = load_model(world["a"])
    groups = layer_groups([n for n, _ in model.named_parameters()])
    prompts = SENTENCES * 2
    feats = hidden_states(model, prompt_batches(tok, prompts, 64, batch_size=3), groups.layer_prefix)
    assert set(feats) == {"embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm"}
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) - 1 for t in rendered)
    assert feats["embed"].shape == (n_tokens, 64)
    again = hidden_states(model, prompt_batches(tok, prompts, 64, batch_size=4), groups.layer_prefix)
    same = cka_profile(feats, again, list(groups.names))
    assert np.allclose(same[:-1], 1) and math.isnan(same[-1])  # lm_head has no hidden state
    moved = cka_profile(
        feats, hidden_states(other, prompt_batches(tok, prompts, 64), groups.layer_prefix), list(groups.names)
    )
    assert np.all(moved[:-1] <= 1 + 1e-9) and np.nanmin(moved) < 0.999
