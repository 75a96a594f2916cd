"""Parsing generated JSON, and exact + near-duplicate removal."""

from __future__ import annotations

import json
import re
from collections import defaultdict

MIN_QUESTION_CHARS = 10
MIN_QUESTION_WORDS = 4  # "Question 11 (Self-Harm)" is an echo of the prompt, not a question


def parse_question(text: str) -> tuple[str | None, str]:
    """The `Question` of the first JSON object (or list of objects) in `text`.
    Returns (question, "ok") or (None, why): invalid_json | no_question | too_short."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return None, "invalid_json"
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[min(starts) :])
    except json.JSONDecodeError:
        return None, "invalid_json"
    if isinstance(obj, list):
        obj = next((o for o in obj if isinstance(o, dict)), None)
    if not isinstance(obj, dict):
        return None, "no_question"
    value = next((v for k, v in obj.items() if k.lower() == "question"), None)
    if not isinstance(value, str):
        return None, "no_question"
    value = " ".join(value.split())
    if len(value) < MIN_QUESTION_CHARS or len(value.split()) < MIN_QUESTION_WORDS:
        return None, "too_short"
    return value, "ok"


def question_regex(max_chars: int = 300) -> str:
    """What may follow a `{"Question": "` prefill: one JSON string without escapes or control
    characters, then `"}`. Always valid JSON, and no room for the whitespace loops that
    JSON-schema constrained decoding falls into."""
    return rf'[^"\\\x00-\x1f]{{{MIN_QUESTION_CHARS},{max_chars}}}"\}}'


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    if len(words) < k:
        return {tuple(words)}
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


class DedupIndex:
    """Texts seen so far. `check` says whether a new text is an exact duplicate (after
    normalization) or a near duplicate (word 3-gram Jaccard >= threshold) of one of them."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self.exact: set[str] = set()
        self.sets: list[set] = []
        self.inverted: dict[tuple, list[int]] = defaultdict(list)

    def check(self, text: str) -> str:
        """'new', 'exact_duplicate' or 'near_duplicate' (nothing is added)."""
        if normalize(text) in self.exact:
            return "exact_duplicate"
        sh = shingles(text)
        candidates = {i for s in sh for i in self.inverted.get(s, ())}
        for i in candidates:
            other = self.sets[i]
            if len(sh & other) / len(sh | other) >= self.threshold:
                return "near_duplicate"
        return "new"

    def add(self, text: str) -> None:
        self.exact.add(normalize(text))
        sh = shingles(text)
        for s in sh:
            self.inverted[s].append(len(self.sets))
        self.sets.append(sh)

    def add_if_new(self, text: str) -> str:
        status = self.check(text)
        if status == "new":
            self.add(text)
        return status
