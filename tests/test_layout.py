"""The code's floors (README, "How the code is laid out"): every import points down.

  0  core       imports nothing of ours
  1  eval       core
  2  synth      eval, core         optimize  eval, core        (never each other)
  3  the applications eval.run (+ run_inputs), optimize.demo, optimize.ablate, synth.world (+ world_card):
     anything below;
     nothing imports them but their own parts

Function-local imports count too, and no two modules import each other, directly or in a ring.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": 0, "eval": 1, "synth": 2, "optimize": 2}
APPS = {"eval.run", "eval.run_inputs", "optimize.demo", "optimize.ablate", "synth.world", "synth.world_card"}
CLIS = [
    "optimize.search",
    "optimize.sweep",
    "optimize.demo",
    "optimize.ablate",
    "eval.run",
    "synth.generate",
    "synth.world",
]


def modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).glob("*.py"))
        if p.name != "__init__.py"
    }


def imports_of(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    known = modules()
    return {n for n in out if n in known} | {n.rsplit(".", 1)[0] for n in out if n not in known and "." in n}


def floor(module: str) -> int:
    return 3 if module in APPS else PACKAGES[module.split(".")[0]]


def test_every_import_points_down():
    known = modules()
    wrong = []
    for mod, path in known.items():
        for dep in imports_of(path) & set(known):
            same_package = dep.split(".")[0] == mod.split(".")[0]
            if dep in APPS and dep != mod and mod not in APPS:
                wrong.append(f"{mod} imports the application {dep}")
            elif not same_package and floor(dep) >= floor(mod):
                wrong.append(f"{mod} (floor {floor(mod)}) imports {dep} (floor {floor(dep)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    known = modules()
    graph = {m: imports_of(p) & set(known) - {m} for m, p in known.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d) :] + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_module_over_400_lines_without_a_reason():
    long = []
    for mod, path in modules().items():
        text = path.read_text()
        if text.count("\n") > 400 and "longer than 400 lines because" not in text[:2000]:
            long.append(f"{mod}: {text.count(chr(10))} lines")
    assert not long, long


@pytest.mark.parametrize("cli", CLIS)
def test_every_command_starts(cli):
    """`python -m <cli> --help` in a fresh interpreter: the module imports on its own."""
    done = subprocess.run([sys.executable, "-m", cli, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def console_scripts() -> dict[str, str]:
    """alignmerge's console scripts, as the installed package declares them: name -> module."""
    dist = importlib.metadata.distribution("alignmerge")
    return {e.name: e.value.split(":")[0] for e in dist.entry_points if e.group == "console_scripts"}


def test_every_command_is_a_console_script_too():
    scripts = console_scripts()
    assert sorted(scripts.values()) == sorted(CLIS)
    assert all(name.startswith("alignmerge-") for name in scripts)


@pytest.mark.parametrize("cli", CLIS)
def test_every_flag_says_what_it_does(cli):
    parser = importlib.import_module(cli).build_parser()
    silent = [a.option_strings for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not silent, f"{cli}: flags without help text: {silent}"


def test_console_script_runs_outside_the_repository(tmp_path):
    script = shutil.which("alignmerge-search", path=str(Path(sys.executable).parent))
    assert script, "alignmerge-search is not installed beside this Python (pip install -e .)"
    done = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "--config" in done.stdout, done.stderr[-2000:]


def test_logs_go_to_stderr():
    """A command's stdout is its result (the report's path: `core.cli.run_cli` prints it), so
    every other print and tqdm.write in the packages names its stream; scripts' `__main__`
    blocks are exempt."""
    loose = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            exempt = {
                id(n)
                for block in tree.body
                if isinstance(block, ast.If) and "__main__" in ast.unparse(block.test)
                for n in ast.walk(block)
            }
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or id(node) in exempt:
                    continue
                name = ast.unparse(node.func)
                if name in ("print", "tqdm.write") and not any(k.arg == "file" for k in node.keywords):
                    loose.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert [entry.split(":")[0] for entry in loose] == ["core/cli.py"], loose  # run_cli's result
