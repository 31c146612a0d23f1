import os
from pathlib import Path

import pytest

# The engine compiles the decode step by default (engine/compiling.py); the suite decodes eagerly
# unless a test asks (tests/model/test_compile.py, tests/engine/test_compiling.py), so that it
# does not wait for inductor's code generation in every engine test.
os.environ.setdefault("NANOSEEK_COMPILE", "0")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "fixtures" / "reference"
SHARED_REFERENCE = REPO.parent / "shared" / "reference"  # the project's machines and CI only


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (a script, not a package) as a module, for tests of its parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def in_ci() -> bool:
    """CI=true: what CI runs must not silently skip what the set-up is meant to provide."""
    return os.environ.get("CI", "").lower() == "true"


def skip_unless_ci(reason: str):
    """pytest.skip(reason) on a developer's machine; pytest.fail in CI (CI=true), where the
    set-up (scripts/setup.sh) provides the thing and its absence is a bug, not a reason to skip."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this must be available in CI; see scripts/setup.sh)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_reference():
    """The official reference facts (configs, checkpoint key list, a chat-encoding vector), kept in
    tests/fixtures/reference so that a clone of the repository alone runs the interop tests;
    tests/test_reference_fixtures.py keeps them byte-identical with ../shared/reference."""
    return REFERENCE
