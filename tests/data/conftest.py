"""Session fixtures for the data-pipeline tests: the fixture corpus, a tokenizer, and shards,
each built once (see fixture_corpus.py for what is planted)."""

from __future__ import annotations

import pytest

from tests.data.fixture_corpus import FIXTURE_OPTIONS, make_fixture


@pytest.fixture(scope="session")
def fixture_sources(tmp_path_factory) -> list[str]:
    return make_fixture(tmp_path_factory.mktemp("fixture"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, fixture_sources):
    from nanoseek.data.build import build_corpus

    out = tmp_path_factory.mktemp("built") / "corpus"
    manifest = build_corpus(out, fixture_sources, workers=1, progress=False, **FIXTURE_OPTIONS)
    return out, manifest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus):
    from nanoseek.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(corpus[0], 600, out, progress=False)
    return out


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, corpus, tokenizer_dir):
    from nanoseek.data.shards import tokenize_corpus

    out = tmp_path_factory.mktemp("shards") / "shards"
    tokenize_corpus(corpus[0], tokenizer_dir, out, workers=1, chunk_mb=0.004, progress=False)
    return out
