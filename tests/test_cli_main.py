"""`nanoseek` itself (nanoseek/cli.py): --version, and one error path -- a user error prints one
line and exits 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

import nanoseek
from nanoseek.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nanoseek {nanoseek.__version__}"


def test_a_missing_model_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "generate", "--model", "/nonexistent", "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: /nonexistent") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_a_missing_extra_is_named(monkeypatch, capsys):
    import argparse

    def needs_fastapi(args):
        import fastapi  # noqa: F401

    monkeypatch.setitem(sys.modules, "fastapi", None)       # as if the [serve] extra were absent
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, argv=None: argparse.Namespace(func=needs_fastapi))
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "[serve]" in err and "pip install" in err and len(err.strip().splitlines()) == 1
