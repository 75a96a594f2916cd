"""scripts/score_points.py on the tiny world: hand-picked merges scored per domain, bad points refused."""

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import SENTENCES, world_config, write_jsonl

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "score_points.py"


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600)


def test_points_are_scored_per_domain_and_bad_points_refused(world, tmp_path):
    rows = [{"prompt": p, "response": r, "domain": d} for p in SENTENCES for r, d in zip(SENTENCES[:2], "xy")]
    raw = world_config(world, tmp_path / "unused")
    raw["data"]["domain"] = str(write_jsonl(tmp_path / "domain.jsonl", rows))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = run("--config", str(config), "--point", "a=1", "--point", "a=0.5,b=0.5", "--point", "")
    assert done.returncode == 0, done.stderr
    table = done.stdout.strip().splitlines()
    assert table[0].startswith("| point | L alignment | L domain: x | L domain: y |") and len(table) == 5
    cells = [line.split(" | ") for line in table[2:]]
    assert [c[0] for c in cells] == ["| a 1", "| a 0.5, b 0.5", "| base"]
    assert len({tuple(c[1:]) for c in cells}) == 3  # three different models
    for bad, says in (
        (["--point", "c=1"], "no source 'c'"),
        (["--point", "a=x"], "is not a number"),
        (["--point", "a=nan"], "finite"),
        (["--point", "a=1", "--set", "merge.method=slerp"], "no weight per source"),
    ):
        refused = run("--config", str(config), *bad)
        assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr
