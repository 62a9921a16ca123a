"""The code stays ruff-clean (the version is pinned in the test extra, so rules do not drift)."""

import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "forkserver", "tests", "load"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_class_over_350_lines_and_no_function_over_60():
    """The size rule of docs/architecture.md: a class or function past it does too much."""
    import ast

    package = ROOT / "forkserver"
    too_big = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and lines > 350 or \
                    isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and lines > 60:
                too_big.append(f"{path.relative_to(package)}: {node.name} ({lines} lines)")
    assert too_big == []
