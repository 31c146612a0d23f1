from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_reference():
    """../shared/reference next to the repository (present in CI and sessions)."""
    path = REPO.parent / "shared" / "reference"
    if not path.is_dir():
        pytest.skip(f"{path} not found (the project's shared reference data)")
    return path
