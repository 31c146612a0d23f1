"""ruff (pyproject.toml [tool.ruff]) is clean over nanoseek/, tests/ and benchmarks/.

ruff is a [dev] dependency (pinned in constraints.txt); without it the test skips outside CI and
fails in CI (CI=true), where scripts/setup.sh installs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    exe = Path(sys.executable).with_name("ruff")
    if exe.is_file():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    try:
        import ruff  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "ruff"]


def test_ruff_is_clean():
    ruff = _ruff()
    if ruff is None:
        skip_unless_ci("ruff is not installed (pip install -c constraints.txt -e '.[dev]')")
    r = subprocess.run(ruff + ["check", "--no-cache", "--output-format", "concise", "nanoseek", "tests", "benchmarks"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"ruff found problems (fix them, or `ruff check --fix`):\n{r.stdout}{r.stderr}"


# DEVELOPERS' brief: "functions stay short enough to read at once (split anything near 100 lines)"
MAX_FUNCTION_LINES = 100


def test_no_function_is_longer_than_a_screenful():
    import ast

    long = []
    for path in sorted([*(ROOT / "nanoseek").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "split these:\n" + "\n".join(long)
