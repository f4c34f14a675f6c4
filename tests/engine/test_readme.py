"""The README stays true: its Python blocks run as written, its command lines use
commands and flags that exist, and .ci/run runs its two set-up commands."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


PY_BLOCKS = [b for b in _blocks("python") if not b.startswith("# needs:")]


@pytest.mark.parametrize("index", range(len(PY_BLOCKS)))
def test_python_blocks_run_as_written(tmp_path, index):
    proc = subprocess.run([sys.executable, "-c", PY_BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README python block {index} failed:\n{PY_BLOCKS[index]}\n{proc.stderr[-3000:]}"


def test_every_block_that_needs_a_file_says_where_it_comes_from():
    needing = [b for b in _blocks("python") if b.startswith("# needs:")]
    assert needing and all(len(b.splitlines()[0]) > len("# needs: x") for b in needing)


def test_command_lines_use_existing_commands_and_flags():
    from rexfast.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    lines = [line for block in _blocks("bash") for line in block.splitlines()]
    commands = [line.split("#")[0].strip() for line in lines if re.match(r"^\s*(\.venv/bin/)?(rexfast|torchrun)\b", line)]
    assert commands
    for command in commands:
        words = shlex.split(command)
        words = words[words.index("rexfast") + 1:] if "rexfast" in words else []
        if not words:
            continue
        sub = subparsers[words[0]]
        known = {opt for action in sub._actions for opt in action.option_strings}
        for word in words[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"README: `rexfast {words[0]}` has no {word}"


def test_ci_runs_the_two_setup_commands():
    setup = _blocks("bash")[0].strip().splitlines()
    assert len(setup) == 2, "the README opens with exactly two set-up commands"
    ci = (ROOT / ".ci" / "run").read_text()
    for command in setup:
        assert command.strip() in ci, f".ci/run does not run: {command}"
    assert "pytest -m slow" in ci
