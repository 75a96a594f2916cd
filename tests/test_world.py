"""The default world's data: splits from the seed files are disjoint, balanced and seeded."""

from collections import Counter

from synth.world import HARM_SPLIT, MED_SPLIT, splits_from_seeds


def test_splits_are_disjoint_balanced_and_seeded():
    s = splits_from_seeds(0)
    assert s == splits_from_seeds(0)
    assert s["alignment_search"] != splits_from_seeds(1)["alignment_search"]
    prompts = {k: {r["prompt"] for r in v} for k, v in s.items()}
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    for split in ("alignment_search", "alignment_test"):
        per_cat = Counter(r["category"] for r in s[split])
        assert len(per_cat) == 14 and set(per_cat.values()) == {HARM_SPLIT[split]}
        assert all(r["response"] and r["judge_verdict"] == "refusal" for r in s[split])
    for split in ("domain_search", "domain_test"):
        assert set(Counter(r["category"] for r in s[split]).values()) == {MED_SPLIT[split]}
    assert Counter(r["category"] for r in s["benign"]) == {"risky_looking": 35, "ordinary": 15}
