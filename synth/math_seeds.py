"""`python -m synth.math_seeds`: the default world's second domain, grade-school maths word
problems with worked answers (the GSM8K style of the paper's maths experts, WizardMath and
MAmmoTH; Hammoud et al. 2024, Table 2), written by a seeded program so every answer is correct.

Writes data/seeds/math_qa.jsonl (30 problems per topic: question, answer, topic) and
data/seeds/math_icl.jsonl (3 more per topic, questions only, the in-context examples of the
self-questioning prompt). Each answer shows the working in one or two sentences and ends with
"The answer is N."
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEEDS = Path(__file__).resolve().parent.parent / "data" / "seeds"
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jamal",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
]
ITEMS = [
    ("apple", "apples"),
    ("notebook", "notebooks"),
    ("pencil", "pencils"),
    ("muffin", "muffins"),
    ("ticket", "tickets"),
    ("plant", "plants"),
    ("book", "books"),
    ("marble", "marbles"),
]


def n(x: float) -> str:
    return f"{x:g}" if x != int(x) else str(int(x))


def percentages(r: random.Random) -> tuple[str, str]:
    name, price, pct = r.choice(NAMES), r.randrange(20, 200, 20), r.choice([10, 20, 25, 30, 40, 50])
    if r.random() < 0.5:
        off = price * pct / 100
        return (
            f"A jacket costs ${price}. {name} buys it with a {pct}% discount. How much does {name} pay?",
            f"The discount is {pct}% of ${price} = ${n(off)}, so {name} pays {price} - {n(off)} = "
            f"${n(price - off)}. The answer is {n(price - off)}.",
        )
    total, part = r.randrange(20, 200, 20), pct
    got = total * part / 100
    return (
        f"A class has {total} students and {part}% of them walk to school. How many students walk?",
        f"{part}% of {total} is {total} x {part} / 100 = {n(got)}. The answer is {n(got)}.",
    )


def unit_rates(r: random.Random) -> tuple[str, str]:
    one, many = r.choice(ITEMS)
    k, cost, m = r.randint(2, 9), r.randint(2, 12), r.randint(3, 15)
    return (
        f"{k} {many} cost ${k * cost}. How much do {m} {many} cost at the same price?",
        f"One {one} costs {k * cost} / {k} = ${cost}, so {m} {many} cost {m} x {cost} = ${m * cost}. "
        f"The answer is {m * cost}.",
    )


def fractions(r: random.Random) -> tuple[str, str]:
    name, (_, many) = r.choice(NAMES), r.choice(ITEMS)
    d = r.choice([2, 3, 4, 5, 6, 8])
    k = r.randint(1, d - 1)
    total = d * r.randint(3, 12)
    given = total * k // d
    return (
        f"{name} has {total} {many} and gives away {k}/{d} of them. How many {many} are left?",
        f"{k}/{d} of {total} is {given}, so {total} - {given} = {total - given} are left. "
        f"The answer is {total - given}.",
    )


def ages(r: random.Random) -> tuple[str, str]:
    a, b = r.sample(NAMES, 2)
    age, gap, years = r.randint(5, 20), r.randint(2, 30), r.randint(2, 15)
    return (
        f"{a} is {age} years old and {b} is {gap} years older. How old will {b} be in {years} years?",
        f"{b} is {age} + {gap} = {age + gap} now, so in {years} years {b} will be {age + gap} + {years} = "
        f"{age + gap + years}. The answer is {age + gap + years}.",
    )


def money(r: random.Random) -> tuple[str, str]:
    name, (_, many) = r.choice(NAMES), r.choice(ITEMS)
    k, price = r.randint(2, 8), r.randint(2, 9)
    paid = (k * price // 10 + 1) * 10
    return (
        f"{name} buys {k} {many} at ${price} each and pays with ${paid}. How much change does {name} get?",
        f"The {many} cost {k} x {price} = ${k * price}, so the change is {paid} - {k * price} = "
        f"${paid - k * price}. The answer is {paid - k * price}.",
    )


def speed(r: random.Random) -> tuple[str, str]:
    name, v, h = r.choice(NAMES), r.randrange(30, 100, 5), r.randint(2, 6)
    if r.random() < 0.5:
        return (
            f"{name} drives at {v} km per hour for {h} hours. How far does {name} travel?",
            f"Distance = speed x time = {v} x {h} = {v * h} km. The answer is {v * h}.",
        )
    return (
        f"A train travels {v * h} km in {h} hours. What is its average speed in km per hour?",
        f"Speed = distance / time = {v * h} / {h} = {v} km per hour. The answer is {v}.",
    )


def geometry(r: random.Random) -> tuple[str, str]:
    w, h = r.randint(3, 25), r.randint(3, 25)
    if r.random() < 0.5:
        return (
            f"A rectangular garden is {w} m long and {h} m wide. What is its area in square metres?",
            f"Area = length x width = {w} x {h} = {w * h} square metres. The answer is {w * h}.",
        )
    return (
        f"A rectangular field is {w} m long and {h} m wide. How many metres of fence go around it?",
        f"Perimeter = 2 x ({w} + {h}) = 2 x {w + h} = {2 * (w + h)} m. The answer is {2 * (w + h)}.",
    )


def averages(r: random.Random) -> tuple[str, str]:
    name = r.choice(NAMES)
    k = r.randint(3, 5)
    mean = r.randint(50, 95)
    xs = [mean + r.randint(-10, 10) for _ in range(k - 1)]
    xs.append(mean * k - sum(xs))
    listed = ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"
    return (
        f"{name} scored {listed} on {k} tests. What is {name}'s average score?",
        f"The total is {' + '.join(map(str, xs))} = {sum(xs)}, and {sum(xs)} / {k} = {mean}. "
        f"The answer is {mean}.",
    )


TOPICS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "percentages": percentages,
    "unit rates": unit_rates,
    "fractions": fractions,
    "ages": ages,
    "money": money,
    "speed and distance": speed,
    "geometry": geometry,
    "averages": averages,
}


def problems(seed: int, per_topic: int) -> list[dict]:
    rng, seen, rows = random.Random(seed), set(), []
    for topic, make in TOPICS.items():
        count = 0
        while count < per_topic:
            q, a = make(rng)
            if q not in seen:
                seen.add(q)
                rows.append({"question": q, "answer": a, "topic": topic})
                count += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synth.math_seeds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(SEEDS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from core.files import write_text_atomic

    rows = problems(args.seed, 33)
    qa = [r for i, r in enumerate(rows) if i % 33 < 30]
    icl = [{"question": r["question"], "topic": r["topic"]} for i, r in enumerate(rows) if i % 33 >= 30]
    for name, part in (("math_qa.jsonl", qa), ("math_icl.jsonl", icl)):
        write_text_atomic(Path(args.out) / name, "".join(json.dumps(x) + "\n" for x in part))
    print(f"wrote {len(qa)} problems and {len(icl)} in-context questions to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
