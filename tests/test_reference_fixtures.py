"""tests/fixtures/reference holds the official facts the interop tests read (so a clone alone runs
them); where the project's ../shared/reference exists (its machines, CI), every fixture must be
byte-identical with its copy there."""

from __future__ import annotations

import pytest

from .conftest import REFERENCE, SHARED_REFERENCE

FILES = ["deepseek-v4-flash.config.json", "deepseek-v4-pro.config.json", "hf-tiny-checkpoint-keys.txt",
         "chat-encoding/official-test-3.json", "chat-encoding/official-test-3.txt"]


@pytest.mark.parametrize("name", FILES)
def test_fixture_is_present(name):
    assert (REFERENCE / name).is_file(), f"tests/fixtures/reference/{name} is missing"


@pytest.mark.parametrize("name", FILES)
def test_fixture_is_byte_identical_with_the_shared_reference(name):
    shared = SHARED_REFERENCE / name
    if not shared.is_file():
        pytest.skip(f"{shared} not here (only the project's machines have ../shared/reference)")
    assert (REFERENCE / name).read_bytes() == shared.read_bytes(), \
        f"tests/fixtures/reference/{name} differs from {shared}: copy it from there"
