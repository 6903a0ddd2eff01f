"""The README's ``offload-train plan`` examples are what the planner prints today: each example
command runs again (from a profile file: no measurement, the same on every machine) and its
output must equal the README's text, so a planner change that moves a number shows up here."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def readme_plan_examples() -> list[tuple[str, str]]:
    """(command, output) of every fenced block that starts with ``$ offload-train plan``."""
    lines = (ROOT / "README.md").read_text().split("\n")
    examples = []
    for i, line in enumerate(lines[:-1]):
        if line == "```" and lines[i + 1].startswith("$ offload-train plan "):
            end = lines.index("```", i + 2)
            examples.append((lines[i + 1][2:], "\n".join(lines[i + 2 : end])))
    return examples


EXAMPLES = readme_plan_examples()


def test_the_readme_has_plan_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize(("command", "expected"), EXAMPLES, ids=[f"example-{k}" for k in range(len(EXAMPLES))])
def test_a_readme_plan_example_prints_what_the_readme_shows(command, expected, tmp_path, monkeypatch, capsys):
    # run from a folder with the repository's configs, so the example's run folder lands there
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    code = main(shlex.split(command)[1:])
    out, err = capsys.readouterr()
    printed = out if code == 0 else "\n".join(line for line in err.splitlines() if line.startswith("offload-train:"))
    if printed.rstrip("\n") != expected:
        pytest.fail("the README's example is out of date; regenerate it with the command it shows:\n"
                    + "\n".join(f"{'-' if a else '+'} {line}" for a, line in _diff(expected, printed.rstrip("\n"))))


def _diff(old: str, new: str) -> list[tuple[bool, str]]:
    """The lines only in ``old`` (True) and only in ``new`` (False), in order."""
    import difflib

    return [(d.startswith("-"), d[2:]) for d in difflib.ndiff(old.split("\n"), new.split("\n")) if d[:1] in "+-"]
