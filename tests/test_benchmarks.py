"""The benchmarks are scripts that no test runs whole (they take minutes on the embedded model), so an API
rename can break them silently. Every name they import from monoscope, at the top or inside a function,
must exist, and every script must answer --help."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("bench_*.py"))


def _monoscope_imports(path: Path) -> list[tuple[str, str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "monoscope":
            found.extend((node.module, alias.name, node.lineno) for alias in node.names)
    return found


def _resolves(module: str, name: str) -> bool:
    if hasattr(importlib.import_module(module), name):
        return True
    try:  # a submodule not imported by its package's __init__
        importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return False
    return True


def test_there_are_benchmarks():
    assert len(BENCHMARKS) >= 5, BENCHMARKS


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_every_monoscope_name_a_benchmark_imports_exists(path):
    imports = _monoscope_imports(path)
    assert imports, f"{path.name} imports nothing from monoscope"
    missing = [
        f"line {line}: from {module} import {name}" for module, name, line in imports if not _resolves(module, name)
    ]
    assert not missing, f"{path.name}: " + "; ".join(missing)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_every_benchmark_answers_help(path):
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
