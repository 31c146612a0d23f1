"""Fixtures for the eval tests: sandboxes for every isolation level that works on this machine.

Levels that do not work here are skipped with the probe's reason, so the suite says plainly
which isolation it exercised. On the project's machines `scripts/setup_sandbox.sh` installs
bubblewrap, and both `bwrap` and `unshare` are tested: in CI (CI=true) a level that does not
work fails its tests instead of skipping them (tests/conftest.py skip_unless_ci).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from nanoseek.eval.sandbox import Limits, Sandbox, probe

from ..conftest import skip_unless_ci

ISOLATED = ("bwrap", "unshare")


def make_sandbox(level: str, **limits) -> Sandbox:
    ok, why = probe(level)
    if not ok:
        skip_unless_ci(f"isolation {level!r} unavailable here: {why}")
    return Sandbox(level, warn=False, limits=dataclasses.replace(Limits(), **limits))


@pytest.fixture(params=ISOLATED)
def isolated(request) -> Sandbox:
    """A sandbox with OS isolation (namespaces); 1.5 s program timeout keeps the suite fast."""
    return make_sandbox(request.param, timeout_s=1.5, grace_s=1.5)


@pytest.fixture(params=ISOLATED + ("none",))
def any_level(request) -> Sandbox:
    return make_sandbox(request.param, timeout_s=1.5, grace_s=1.5)


@pytest.fixture(scope="session")
def best_sandbox() -> Sandbox:
    """The strongest level here (used by the scoring tests)."""
    return Sandbox("auto", warn=False)


IS_ROOT = os.geteuid() == 0
