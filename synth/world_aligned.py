"""How the default world's aligned source is trained (`python -m synth.world`): a supervised stage at
one or several epoch counts, averaged when several (a uniform model soup), then an optional DPO stage.
Every choice below was made on the search splits (70 harmful, 100 benign prompts) by a rule set
beforehand: >= 90% of the harmful prompts refused, then the fewest benign ones (README, "The default
world")."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

# The supervised stage's epochs. 3 alone refused 93% / 20%, 6 alone 87% / 11%; the uniform soup of
# the two (Wortsman et al. 2022, arXiv:2203.05482) 90% / 13%, the only candidate that met the rule
# (with 0.3 of the 6-epoch adapter: 91% / 15%, 0.7: 89% / 13%).
SOUP_EPOCHS = (3, 6)

# The DPO stage (`--aligned-preference dpo`; off by default). From the 3-epoch supervised adapter,
# one epoch of the pairs below refused 63% / 4% (lr 5e-4) and 57% / 5% (lr 2e-4); at lr 2e-4 with the
# harmful pairs twice / three times / four times (`harmful_repeat`): 76% / 8%, 89% / 7%, 81% / 9%;
# three times at beta 0.3: 77% / 7%; on-policy benign pairs: 79% / 7% (2e-4: 80/6, 1e-4: 83/11,
# 5e-5: 90/18). None met the rule.
PREFERENCE = {"beta": 0.1, "lr": 5e-4, "epochs": 1, "harmful_repeat": 1}


def preference_pairs(
    aligned_train: list[dict], compliant: dict[str, str], refusals: list[str], seed: int
) -> list[dict]:
    """aligned_train as preference pairs, one per prompt, for the aligned source's DPO stage
    (`synth.train.prefer_lora`): a harmful prompt's refusal over the base's compliant answer to it,
    a benign prompt's helpful answer over one of the `refusals` templates (seeded choice):
    over-refusal is what the stage teaches away, refusal of harm what it keeps."""
    rng = random.Random(f"prefer:{seed}")
    pairs, seen = [], set()
    for r in aligned_train:
        if r["prompt"] in seen or (r["judge_verdict"] == "refusal" and r["prompt"] not in compliant):
            continue
        seen.add(r["prompt"])
        harmful = r["judge_verdict"] == "refusal"
        rejected = compliant[r["prompt"]] if harmful else rng.choice(refusals)
        kind = "harmful" if harmful else "benign"
        pairs.append({"prompt": r["prompt"], "response": r["response"], "rejected": rejected, "kind": kind})
    return pairs


def weighted(pairs: list[dict], harmful_repeat: int) -> list[dict]:
    """The pairs DPO trains on: each harmful pair `harmful_repeat` times (the refusals the benign
    pairs push down are the answers the harmful pairs push up; more harmful pairs keep the balance)."""
    return [p for p in pairs for _ in range(harmful_repeat if p["kind"] == "harmful" else 1)]


def train_aligned(
    rows: list[dict], out: Path, hp: dict, epochs: list[int], card: str, pairs: list[dict] | None = None
) -> Path:
    """models/aligned: the supervised stage (`synth.train.train_lora` with `hp`) once per count in
    `epochs`, the adapters averaged uniformly when there are several (`synth.train.average_lora`),
    then, given `pairs`, the DPO stage of PREFERENCE from it (`synth.train.prefer_lora`)."""
    from synth.train import average_lora, prefer_lora, train_lora

    with tempfile.TemporaryDirectory() as tmp:
        final, card_now = (out, card) if pairs is None else (Path(tmp) / "supervised", None)
        if len(epochs) == 1:
            sft = train_lora(
                "default", rows, final, save_dtype="bfloat16", card=card_now, epochs=epochs[0], **hp
            )
        else:
            soup = [
                train_lora("default", rows, Path(tmp) / f"epochs{n}", save_dtype="bfloat16", epochs=n, **hp)
                for n in epochs
            ]
            sft = average_lora("default", soup, final, save_dtype="bfloat16", card=card_now)
        if pairs is None:
            return sft
        stage = dict(PREFERENCE)
        trained = weighted(pairs, stage.pop("harmful_repeat"))
        return prefer_lora(
            "default", sft, trained, out, save_dtype="bfloat16", card=card, seed=hp["seed"], **stage
        )
