"""Accuracy on a domain: multiple choice by option log-likelihood (each option scored as the whole
assistant answer to the question), and exact final answers of greedy generations for questions
whose reference ends "The answer is N", as in GSM8K (Cobbe et al. 2021, arXiv:2110.14168) (docs/eval.md)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from core.errors import DataError
from eval.data import json_lines
from eval.loss import Scorer

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def read_mcq(path: str | Path) -> list[dict]:
    """Questions of a JSONL file: {"question", "options": [>= 2 strings], "answer": index or letter}."""
    path = Path(path)
    fix = (
        'each line must be a JSON object {"question": "...", "options": ["...", "..."], '
        '"answer": 0} (answer: index from 0, or a letter A, B, ...)'
    )
    if not path.is_file():
        raise DataError(f"MCQ file not found: {path}")
    out = []
    for n, row in json_lines(path, fix):
        try:
            q, options, answer = row["question"], row["options"], row["answer"]
        except (KeyError, TypeError) as err:
            raise DataError(f"{path} line {n}: {type(err).__name__}: {err}; {fix}") from None
        if isinstance(answer, str) and answer.strip().upper() in LETTERS and len(answer.strip()) == 1:
            answer = LETTERS.index(answer.strip().upper())
        good_options = (
            isinstance(options, list)
            and len(options) >= 2
            and all(isinstance(o, str) and o.strip() for o in options)
        )
        good_answer = isinstance(answer, int) and not isinstance(answer, bool) and good_options
        if not (isinstance(q, str) and q.strip() and good_answer and 0 <= answer < len(options)):
            raise DataError(f"{path} line {n}: bad question, options or answer in {str(row)[:100]!r}; {fix}")
        out.append({"question": q, "options": options, "answer": answer})
    if not out:
        raise DataError(f"{path}: no questions; {fix}")
    return out


def option_logprobs(model, tokenizer, questions: list[dict], max_length: int, batch_tokens: int, device: str):
    """Per option, flat over questions: the sum of its tokens' log-probs and their mean, the
    option being the whole assistant answer to the question (its end-of-turn token included,
    the same for every option). Scored with `Scorer`, batched by length."""
    rows = [{"prompt": q["question"], "response": o} for q in questions for o in q["options"]]
    scorer = Scorer(tokenizer, {"mcq": rows}, max_length, batch_tokens, device)
    if scorer.skipped["mcq"]:
        raise DataError(f"{scorer.skipped['mcq']} MCQ options do not fit in data.max_length={max_length}")
    mean = -np.asarray(scorer.example_losses(model)["mcq"])
    n_tokens = np.array([len(e.input_ids) - e.n_prompt for e in scorer.examples["mcq"]])
    return mean * n_tokens, mean


def mcq_scores(questions: list[dict], total: np.ndarray, mean: np.ndarray) -> dict:
    """Accuracy: share of questions whose highest-scoring option is the answer; `accuracy` by the
    summed log-likelihood, `accuracy_norm` by the per-token mean (length-normalized)."""
    bounds = np.cumsum([0] + [len(q["options"]) for q in questions])
    answers = np.array([q["answer"] for q in questions])

    def accuracy(scores):
        picks = np.array([np.argmax(scores[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        return float(np.mean(picks == answers))

    return {"n": len(questions), "accuracy": accuracy(total), "accuracy_norm": accuracy(mean)}


# Tokens of an answer graded by its final number (the default world's longest maths reference: 48).
EXACT_TOKENS = 64
# A number: with thousands separators ("1,200"), decimal (".5", "12.50") or whole; minus or "−".
NUMBER = r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+)"
STATED = re.compile(rf"answer is:?[\s*$]*({NUMBER})", re.IGNORECASE)  # "The answer is **$40**"


def _value(number: str) -> float:
    return float(number.replace(",", "").replace("\u2212", "-"))


def final_number(text: str) -> float | None:
    """The number after the last "answer is", else the last number of `text` (None: no number)."""
    found = STATED.findall(text) or re.findall(NUMBER, text)
    return _value(found[-1]) if found else None


def exact_answer_questions(rows: list[dict]) -> tuple[list[str], list[float]] | None:
    """(prompts, answers) when every reference of `rows` states its answer ("The answer is N"), the
    sign of a domain graded by its final answer; None otherwise."""
    if not rows or not all(STATED.search(r["response"]) for r in rows):
        return None
    return [r["prompt"] for r in rows], [final_number(r["response"]) for r in rows]


def graded_domains(domain_rows: list[dict]) -> dict[str, tuple[list[str], list[float]]]:
    """The domains of a test split graded by final answers (`exact_answer_questions`): name (the
    rows' `domain`, or "domain") -> (prompts, expected numbers)."""
    names = dict.fromkeys(r.get("domain") or "domain" for r in domain_rows)
    by_name = {n: [r for r in domain_rows if (r.get("domain") or "domain") == n] for n in names}
    return {n: q for n, rows in by_name.items() if (q := exact_answer_questions(rows))}


def exact_accuracy(answers: list[str], expected: list[float]) -> float:
    """Share of `answers` whose final number equals the expected one."""
    found = [final_number(a) for a in answers]
    return sum(f is not None and abs(f - e) < 1e-6 for f, e in zip(found, expected)) / len(expected)
