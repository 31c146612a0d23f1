"""MinHash signatures and the near-duplicate index, checked against exact Jaccard similarity and
against datasketch's own MinHash as independent oracles."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from nanoseek.data.dedup import (NUM_PERM, NearDupIndex, content_digest, jaccard_estimate, ngram_hashes, signature,
                                 signature_from_shingles, token_hashes)
from tests.data.fixture_corpus import py_code

_TOKEN = re.compile(rb"[A-Za-z0-9_\x80-\xff]+|[^A-Za-z0-9_\x80-\xff \t\n\r\x0b\x0c]")


def _shingles(text: str, k: int = 5) -> set[tuple[bytes, ...]]:
    toks = _TOKEN.findall(text.encode())
    return {tuple(toks[i:i + k]) for i in range(len(toks) - k + 1)}


def test_tokens_ignore_whitespace_and_match_a_regex_tokenizer():
    a = "def f(x):\n    return x+1\n"
    b = "def   f( x ):\n\treturn x + 1"
    assert np.array_equal(token_hashes(a), token_hashes(b))
    text = py_code(3) + "naïve = '日本語'  # ünïcode\n"
    toks = _TOKEN.findall(text.encode())
    th = token_hashes(text)
    assert th.size == len(toks)
    # Equal tokens hash equally, different tokens (almost surely) differently.
    by_tok = {}
    for t, h in zip(toks, th.tolist()):
        by_tok.setdefault(t, set()).add(h)
    assert all(len(v) == 1 for v in by_tok.values())
    assert len({next(iter(v)) for v in by_tok.values()}) == len(by_tok)
    assert token_hashes("").size == 0 and token_hashes("   \n").size == 0


def test_long_tokens_hash_by_ends_and_length():
    assert token_hashes("abcdefghijklmnop")[0] != token_hashes("abcdefghijklmnoq")[0]
    assert token_hashes("a" * 20)[0] != token_hashes("a" * 21)[0]


def test_ngram_hashes_match_a_direct_computation():
    th = token_hashes(py_code(1))
    g = ngram_hashes(th, 5)
    assert g.size == th.size - 4
    # Equal windows -> equal hashes, wherever they are.
    windows = [tuple(th[i:i + 5].tolist()) for i in range(th.size - 4)]
    seen = {}
    for w, h in zip(windows, g.tolist()):
        assert seen.setdefault(w, h) == h
    assert len(set(g.tolist())) == len(set(windows))
    assert ngram_hashes(th[:3], 5).size == 0 and ngram_hashes(th[:3], 5, short=True).size == 1


def _mutate(text: str, rng: random.Random, frac: float) -> str:
    lines = text.splitlines()
    for i in rng.sample(range(len(lines)), int(len(lines) * frac)):
        lines[i] = f"    value_{rng.randint(0, 10**6)} = {rng.random()}"
    return "\n".join(lines)


def test_signature_estimates_jaccard():
    from datasketch import MinHash

    rng = random.Random(0)
    errs, ds_errs = [], []
    for seed in range(40):
        a = py_code(seed, 30)
        b = _mutate(a, rng, rng.uniform(0.0, 0.6))
        sa, sb = _shingles(a), _shingles(b)
        exact = len(sa & sb) / len(sa | sb)
        errs.append(jaccard_estimate(signature(a), signature(b)) - exact)
        ma, mb = MinHash(num_perm=NUM_PERM), MinHash(num_perm=NUM_PERM)
        ma.update_batch([b" ".join(s) for s in sa])
        mb.update_batch([b" ".join(s) for s in sb])
        ds_errs.append(ma.jaccard(mb) - exact)
    errs, ds_errs = np.abs(errs), np.abs(ds_errs)
    # Unbiased with the usual MinHash error (std ~ sqrt(J(1-J)/128) <= 0.044): no worse than datasketch.
    assert errs.mean() < 0.035 and errs.max() < 0.15
    assert errs.mean() < ds_errs.mean() + 0.015


def test_signature_densifies_small_sets():
    s = signature_from_shingles(np.array([1 << 60, 5 << 58], dtype=np.uint64))
    assert s.shape == (NUM_PERM,) and s.dtype == np.uint32
    assert signature_from_shingles(np.empty(0, dtype=np.uint64)) is None
    assert signature("x") is not None and jaccard_estimate(signature("x = 1"), signature("x = 1")) == 1.0


def test_near_dup_index():
    idx = NearDupIndex(threshold=0.7)
    base = py_code(11, 20)
    rng = random.Random(1)
    assert idx.add(0, signature(base)) is None
    assert idx.add(1, signature(_mutate(base, rng, 0.05))) == 0           # near copy
    assert idx.add(2, signature(py_code(12, 20))) is None                 # unrelated
    assert idx.add(3, signature(_mutate(base, rng, 0.8))) is None         # mostly rewritten
    assert len(idx) == 3 and idx.bands * idx.rows <= NUM_PERM


def test_content_digest():
    assert content_digest(b"a") == content_digest(b"a") != content_digest(b"b")
    assert len(content_digest(b"")) == 16


@pytest.mark.parametrize("text", ["", "x", "αβγ", "\x00\x01"])
def test_degenerate_inputs(text):
    th = token_hashes(text)
    assert th.dtype == np.uint64
