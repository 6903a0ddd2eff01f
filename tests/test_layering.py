"""Imports go one way: cli -> scheduler -> offload (offload knows nothing of schedules or models,
the scheduler nothing of the command line)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"offload": ("scheduler", "cli", "bench"), "scheduler": ("cli", "bench"), "cli": ("bench",)}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports (at module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    wrong = {f"{path.relative_to(ROOT)} imports {name}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for name in imported_packages(path) & set(FORBIDDEN[package])}
    assert not wrong, sorted(wrong)
