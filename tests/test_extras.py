"""The lean install: the base commands need no extra, and a missing extra is one line naming it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from nanoseek import _extras
from nanoseek._extras import MissingExtra, explain, require


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(MissingExtra) as ei:
        require("fastapi", "serve", what="nanoseek serve")
    msg = str(ei.value)
    assert "\n" not in msg and "[serve]" in msg and "pip install 'nanoseek[serve]'" in msg
    assert "nanoseek serve needs" in msg and isinstance(ei.value, ImportError)


def test_require_defaults_to_the_table_and_returns_the_module(monkeypatch):
    assert require("json") is __import__("json")
    monkeypatch.setitem(sys.modules, "datasketch", None)
    with pytest.raises(MissingExtra, match=r"\[data\]"):
        require("datasketch")


def test_explain_turns_an_import_error_of_an_optional_module_into_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError) as ei:
        import matplotlib  # noqa: F401
    assert explain(ei.value) == _extras.message("matplotlib", "eval")
    assert explain(ImportError("x", name="no_such_module_abc")) is None
    assert explain(ValueError("x")) is None


def test_every_optional_module_names_a_declared_extra():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = set(extras["project"]["optional-dependencies"])
    assert {"data", "train", "eval", "serve", "all", "dev"} <= declared
    assert set(_extras.OPTIONAL.values()) <= declared


BLOCK = textwrap.dedent("""
    import sys
    for name in {optional!r}:
        sys.modules[name] = None   # the base install: no extra is there
    from nanoseek.cli import main
    rc = main({argv!r})
    leaked = sorted(n for n in {optional!r} if sys.modules.get(n) is not None)
    assert not leaked, leaked
    sys.exit(rc)
""")


def test_base_commands_run_without_any_extra():
    optional = sorted(_extras.OPTIONAL)
    for argv in (["info", "tiny"], ["generate", "--help"]):
        r = subprocess.run([sys.executable, "-c", BLOCK.format(optional=optional, argv=argv)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"nanoseek {' '.join(argv)} without extras:\n{r.stdout}\n{r.stderr}"


def test_keep_freed_memory_applies_once_on_glibc(monkeypatch):
    """The trainer's malloc setting: applied on Linux/glibc (this project's machines), switchable off."""
    import sys

    from nanoseek import _runtime

    monkeypatch.setattr(_runtime, "_done", False)
    monkeypatch.setenv("NANOSEEK_KEEP_FREED_MEMORY", "0")
    assert _runtime.keep_freed_memory() is False and _runtime._done is False
    monkeypatch.delenv("NANOSEEK_KEEP_FREED_MEMORY")
    expected = sys.platform.startswith("linux")
    assert _runtime.keep_freed_memory() is expected
    assert _runtime.keep_freed_memory() is expected  # idempotent
