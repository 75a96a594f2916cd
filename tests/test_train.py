"""synth.train on the tiny random Llama: supervised LoRA training, then the preference stage (DPO
with the trained adapter as reference, plus NLL on the chosen answers), and the soup of adapters."""

import json

import pytest
import torch

from core.models import load_model, load_tokenizer
from eval.loss import encode
from synth.train import _pad_id, _response_logps, average_lora, prefer_lora, train_lora
from tests.conftest import SENTENCES

REFUSAL = "no i can not help"
PAIRS = [{"prompt": p, "response": SENTENCES[1], "rejected": REFUSAL} for p in SENTENCES]


def logps(base, adapter, pairs) -> torch.Tensor:
    """[log p(chosen), log p(rejected)] of each pair under base + adapter."""
    from peft import PeftModel

    tok = load_tokenizer(str(base))
    model = PeftModel.from_pretrained(load_model(str(base)), str(adapter)).eval()
    flat = [encode(tok, x["prompt"], x[k], 64) for x in pairs for k in ("response", "rejected")]
    with torch.no_grad():
        logp, _ = _response_logps(model, flat, _pad_id(tok))
    return logp.view(-1, 2)


@pytest.fixture(scope="module")
def refusing(world, tmp_path_factory):
    """An adapter trained to answer every prompt with the refusal (the over-refusal to undo)."""
    rows = [{"prompt": p, "response": REFUSAL} for p in SENTENCES]
    out = tmp_path_factory.mktemp("train") / "refusing"
    return train_lora(str(world["base"]), rows, out, r=4, lr=1e-2, epochs=12, batch_size=5)


@pytest.mark.parametrize("nll_weight", [0.0, 1.0])
def test_preference_stage_prefers_the_chosen_answers_and_keeps_the_input(
    world, refusing, tmp_path, nll_weight
):
    before = logps(world["base"], refusing, PAIRS)
    kept = {f.name: f.read_bytes() for f in refusing.iterdir() if f.is_file()}
    out = tmp_path / "preferred"
    settings = {"lr": 1e-2, "beta": 0.5, "epochs": 4, "batch_size": 5, "nll_weight": nll_weight}
    assert prefer_lora(str(world["base"]), refusing, PAIRS, out, **settings) == out
    after = logps(world["base"], out, PAIRS)
    margin_before, margin_after = before[:, 0] - before[:, 1], after[:, 0] - after[:, 1]
    assert (margin_after > margin_before + 1.0).all(), (before, after)  # DPO alone widens it
    if nll_weight:
        assert (after[:, 0] > before[:, 0]).all()  # the chosen answers gain likelihood too
    assert {f.name: f.read_bytes() for f in refusing.iterdir() if f.is_file()} == kept  # trained on a copy
    marker = json.loads((out / ".alignmerge").read_text())
    assert marker["kind"] == "adapter" and "adapter_model.safetensors" in marker["files"]


def test_a_soup_of_adapters_is_the_mean_of_their_weight_deltas(world, refusing, tmp_path):
    """average_lora is exact: the merged soup's weights are the mean of each adapter merged alone,
    at the sum of their ranks, whatever their ranks and alphas."""
    from peft import PeftModel

    base = str(world["base"])
    rows = [{"prompt": p, "response": SENTENCES[1]} for p in SENTENCES]
    other = train_lora(base, rows, tmp_path / "other", r=2, alpha=8, lr=1e-2, epochs=3, batch_size=5)

    def merged(adapter):
        return PeftModel.from_pretrained(load_model(base), str(adapter)).merge_and_unload().state_dict()

    soup = average_lora(base, [refusing, other], tmp_path / "soup")
    assert json.loads((soup / "adapter_config.json").read_text())["r"] == 4 + 2
    a, b, mean, plain = merged(refusing), merged(other), merged(soup), load_model(base).state_dict()
    changed = [k for k in plain if not torch.equal(a[k], plain[k])]
    assert changed and all(torch.allclose(mean[k], (a[k] + b[k]) / 2, atol=1e-6) for k in plain)
    assert json.loads((soup / ".alignmerge").read_text())["kind"] == "adapter"
