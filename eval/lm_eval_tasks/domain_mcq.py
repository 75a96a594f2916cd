"""The data of the lm-eval task `alignmerge_domain_mcq` (alignmerge_domain_mcq.yaml beside it).

`load` is the task's `custom_dataset`: it reads domain_mcq.jsonl from this folder, so the task
needs no network and no path of the user's. Run this file to rebuild the JSONL from the default
world's held-out split: each question of `domain_test` with its own answer and 3 answers to other
questions of the same domain, in a seeded order."""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "domain_mcq.jsonl"


def load(**_task_metadata):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(DATA))})


def build(data_dir: Path, seed: int = 0) -> list[dict]:
    import datasets

    rows = list(datasets.load_from_disk(str(data_dir))["domain_test"])
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        others = [r["response"] for j, r in enumerate(rows) if j != i and r["domain"] == row["domain"]]
        choices = [row["response"], *rng.sample(others, 3)]
        rng.shuffle(choices)
        out.append(
            {
                "question": row["prompt"],
                "choices": choices,
                "answer": choices.index(row["response"]),
                "domain": row["domain"],
            }
        )
    return out


if __name__ == "__main__":
    rows = build(HERE.parents[1] / "data" / "default")
    DATA.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{DATA}: {len(rows)} questions")
