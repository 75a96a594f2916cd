import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import DataError
from eval.data import load_pairs
from eval.loss import Scorer, encode

ROWS = [
    {"prompt": "how do i make a good question", "response": "the answer is here"},
    {"prompt": "what is it", "response": "it is a question , you know that"},
    {"prompt": "can you help", "response": "sure"},
]


@pytest.fixture(scope="module")
def model_tok(world):
    return (
        AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(world["base"]),
    )


def reference_loss(model, tok, row) -> float:
    """HF's own loss with labels -100 on the prompt: what the paper's code computes."""
    msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    head = tok(
        tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, : len(head)] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def test_masks_the_prompt_and_matches_hf_loss(model_tok):
    model, tok = model_tok
    e = encode(tok, ROWS[0]["prompt"], ROWS[0]["response"], 1024)
    scored = tok.decode(list(e.input_ids[e.n_prompt :]))
    assert scored.startswith("the answer is here") and "how do" not in scored
    got = Scorer(tok, {"s": ROWS}).example_losses(model)["s"]
    want = [reference_loss(model, tok, r) for r in ROWS]
    order = sorted(
        range(3), key=lambda i: len(encode(tok, ROWS[i]["prompt"], ROWS[i]["response"], 1024).input_ids)
    )
    torch.testing.assert_close(torch.tensor(sorted(got)), torch.tensor(sorted(want)), rtol=1e-4, atol=1e-4)
    assert len(order) == 3


def test_padding_and_batch_size_do_not_change_the_loss(model_tok):
    model, tok = model_tok
    one = Scorer(tok, {"s": ROWS}, batch_tokens=16).losses(model)["s"]
    big = Scorer(tok, {"s": ROWS}, batch_tokens=4096).losses(model)["s"]
    assert len(Scorer(tok, {"s": ROWS}, batch_tokens=4096).batches) == 1
    assert abs(one - big) < 1e-4


def test_an_example_in_several_sets_is_scored_once(model_tok):
    """A domain's rows are also in "domain" (the demo's test sets): each distinct example is run
    once; every set's losses, masses and gradient are as if scored on its own."""
    model, tok = model_tok
    more = [{"prompt": "now", "response": "the answer"}, {"prompt": "what", "response": "sure , it is"}]
    sets = {"all": ROWS + more, "first": ROWS, "last": more[::-1] + more[:1]}
    shared = Scorer(tok, sets, refusal_tokens=[5, 6])
    assert sum(ids.shape[0] for _, ids, *_ in shared.batches) == 5
    losses, mass = shared.score(model)
    for name, rows in sets.items():
        alone_losses, alone_mass = Scorer(tok, {name: rows}, refusal_tokens=[5, 6]).score(model)
        torch.testing.assert_close(
            torch.tensor(losses[name]), torch.tensor(alone_losses[name]), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            torch.tensor(mass[name]), torch.tensor(alone_mass[name]), rtol=1e-5, atol=1e-5
        )
    weights = {"all": 0.5, "first": 1.0, "last": 2.0}
    model.zero_grad()
    shared.score(model, backward=weights)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for name, rows in sets.items():
        Scorer(tok, {name: rows}).score(model, backward={name: weights[name]})
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_minibatches_split_every_set_and_average_to_the_whole_gradient(model_tok):
    """search.gradient.minibatches: minibatch f of M holds each set's rows at positions i with
    i % M == f, a row shared by two sets counted in each (scored once); its gradient is the
    objective's on those rows alone, and with equal shares the minibatches' mean is the whole-set
    gradient (and their estimates' mean the objective)."""
    model, tok = model_tok
    more = [{"prompt": "now", "response": "the answer"}, {"prompt": "what", "response": "sure , it is"}]
    # 3 of b's rows are a's, at other positions: the minibatch of a shared row is its position in each set
    sets = {"a": [*ROWS, more[1]], "b": [more[0], ROWS[0], more[1], ROWS[2]]}
    weights = {"a": 1.0, "b": 0.3}
    scorer = Scorer(tok, sets)
    model.zero_grad()
    whole = sum(
        w * sum(v) / len(v)
        for w, v in zip(weights.values(), scorer.score(model, backward=weights)[0].values())
    )
    full = [p.grad.clone() for p in model.parameters()]
    estimates, per_fold = [], []
    for fold in range(2):
        model.zero_grad()
        estimates.append(scorer.minibatch_backward(model, weights, fold, 2))
        per_fold.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
        alone = {k: rows[fold::2] for k, rows in sets.items()}
        Scorer(tok, alone).score(model, backward=weights)
        for g, p in zip(per_fold[-1], model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert estimates[0] != pytest.approx(estimates[1], rel=1e-3)  # two different halves
    assert sum(estimates) / 2 == pytest.approx(whole, rel=1e-5)
    for g, a, b in zip(full, *per_fold):
        torch.testing.assert_close(g, (a + b) / 2, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_truncation_and_skips(model_tok):
    _, tok = model_tok
    assert encode(tok, "how do i make a good question " * 20, "sure", 16) is None
    with pytest.raises(ValueError, match="raise data.max_length"):
        Scorer(tok, {"s": [{"prompt": "how " * 50, "response": "sure"}]}, max_length=16)


def test_interleaves_sets_for_pruning(model_tok):
    _, tok = model_tok
    other = [{**r, "response": r["response"] + " again"} for r in ROWS]
    s = Scorer(tok, {"alignment": other * 4, "domain": ROWS}, batch_tokens=40)
    names = [b[0] for b in s.batches]
    assert "domain" in names[: len(names) // 2 + 1]


def test_data_files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "", "response": "b"}\n')
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert load_pairs(good) == [{"prompt": "a", "response": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2: not valid JSON"):
        load_pairs(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"missing field\(s\) \['prompt', 'response'\]"):
        load_pairs(nofield)
    with pytest.raises(DataError, match="data not found"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        load_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text('{"prompt": " ", "response": "b"}\n')
    with pytest.raises(DataError, match="no usable rows"), pytest.warns(UserWarning):
        load_pairs(tmp_path / "blank.jsonl")


def test_a_huge_row_is_cut_before_it_is_tokenized(model_tok, monkeypatch):
    """Only the text that can fit in max_length tokens is tokenized (a 50 MB row used to take a
    minute and GBs); the example is the same as from the whole text."""
    _, tok = model_tok
    long = "what is the answer you know that " * 300
    from eval import loss

    whole = encode(tok, "what is it", long, 64)
    seen = []
    real = type(tok).__call__
    monkeypatch.setattr(
        type(tok), "__call__", lambda self, text, **kw: seen.append(len(text)) or real(self, text, **kw)
    )
    assert encode(tok, "what is it", long * 1000, 64) == whole  # 10 MB of response
    assert max(seen) < 64 * loss.longest_token(tok) + 1000
    assert encode(tok, long * 1000, "sure", 64) is None  # a prompt longer than max_length
