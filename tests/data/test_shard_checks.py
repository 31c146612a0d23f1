"""Damaged shards are one clear error naming the file: garbage files, offsets that do not match
the tokens, token ids outside the vocabulary (issue "Reliability and security", item 9)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from nanoseek.data.shards import ShardSet, TokenLoader
from tests.data.conftest import corpus, fixture_sources, shard_dir, tokenizer_dir  # noqa: F401  (fixtures)


def _copy(shard_dir, tmp_path):  # noqa: F811
    dst = tmp_path / "shards"
    shutil.copytree(shard_dir, dst)
    name = ShardSet(dst, "train").names[0]
    return dst, name


def test_garbage_shard_file_is_named(shard_dir, tmp_path):  # noqa: F811
    dst, name = _copy(shard_dir, tmp_path)
    (dst / f"{name}.tokens.npy").write_bytes(b"this is not numpy")
    with pytest.raises(ValueError, match=f"{name}.tokens.npy: not a readable shard file"):
        ShardSet(dst, "train")


def test_offsets_that_do_not_match_are_refused(shard_dir, tmp_path):  # noqa: F811
    dst, name = _copy(shard_dir, tmp_path)
    offsets = np.load(dst / f"{name}.docs.npy")
    offsets[-1] += 5
    np.save(dst / f"{name}.docs.npy", offsets)
    with pytest.raises(ValueError, match=f"{name}.docs.npy: document offsets do not match"):
        ShardSet(dst, "train")


def test_token_ids_outside_the_vocabulary_are_refused(shard_dir, tmp_path):  # noqa: F811
    dst, name = _copy(shard_dir, tmp_path)
    toks = np.load(dst / f"{name}.tokens.npy")
    toks[3] = np.iinfo(toks.dtype).max
    np.save(dst / f"{name}.tokens.npy", toks)
    loader = TokenLoader(dst, "train", batch_size=2, seq_len=32, shuffle=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        for _ in range(50):
            next(loader)


def test_bytes_per_token_counts_every_shard_after_a_resume(tmp_path, corpus, tokenizer_dir):  # noqa: F811
    """A resumed `data tokenize` used to compute bytes_per_token from the re-written shards only."""
    from nanoseek.data.shards import tokenize_corpus

    out = tmp_path / "s"
    first = tokenize_corpus(corpus[0], tokenizer_dir, out, workers=1, chunk_mb=0.004, progress=False)
    (out / "index.json").unlink()
    sorted(out.glob("train/*.docs.npy"))[1].unlink()         # one shard to redo, the others reused
    again = tokenize_corpus(corpus[0], tokenizer_dir, out, workers=1, chunk_mb=0.004, progress=False)
    assert again["bytes_per_token"] == first["bytes_per_token"] and first["bytes_per_token"] > 1


def test_a_shard_emptied_by_a_crash_is_redone(tmp_path, corpus, tokenizer_dir):  # noqa: F811
    """A resumed `data tokenize` whose shard files a crash left empty (renamed, never written to
    disk) redoes that shard instead of stopping on numpy's EOFError."""
    from nanoseek.data.shards import tokenize_corpus

    out = tmp_path / "s"
    first = tokenize_corpus(corpus[0], tokenizer_dir, out, workers=1, chunk_mb=0.004, progress=False)
    (out / "index.json").unlink()
    shard = sorted(out.glob("train/*.docs.npy"))[1]
    shard.write_bytes(b"")
    shard.with_name(shard.name.replace(".docs.npy", ".tokens.npy")).write_bytes(b"")
    again = tokenize_corpus(corpus[0], tokenizer_dir, out, workers=1, chunk_mb=0.004, progress=False)
    assert again["splits"] == first["splits"] and shard.stat().st_size > 0
