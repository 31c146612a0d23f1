"""Token shards and the packing / FIM loader: shard contents, resume, determinism, boundaries,
FIM layouts, per-rank disjointness, exact resume of the loader; no stale tokenizer or shards for
a rebuilt corpus."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from nanoseek.data.shards import IGNORE_INDEX, ShardSet, TokenLoader, load_index, tokenize_corpus
from nanoseek.data.tokenizer import load_tokenizer
from tests.data.fixture_corpus import SECRETS


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _corpus_docs(corpus_dir, split):
    m = json.loads((corpus_dir / "manifest.json").read_text())
    return [json.loads(line)["content"] for name in m["files"][split]
            for line in (corpus_dir / name).read_text().splitlines()]


def test_shards_hold_the_corpus(shard_dir, corpus, tok):
    idx = load_index(shard_dir)
    assert idx["dtype"] == "uint16" and idx["vocab_size"] == tok.vocab_size
    for split in ("train", "val"):
        shards = ShardSet(shard_dir, split)
        texts = _corpus_docs(corpus[0], split)
        assert len(shards) == len(texts) == idx["splits"][split]["docs"]
        decoded = [tok.decode(shards.doc(i)) for i in range(len(shards))]
        assert decoded == texts
        assert shards.tokens[0].dtype == np.uint16
        blob = "".join(decoded)
        assert not any(s in blob for s in SECRETS.values())
    assert len(idx["splits"]["train"]["shards"]) > 1      # small chunk size -> several shards


def test_tokenize_resumes_and_is_deterministic(tmp_path, shard_dir, corpus, tokenizer_dir):
    out = tmp_path / "s"
    tokenize_corpus(corpus[0], tokenizer_dir, out, workers=2, chunk_mb=0.004, progress=False)
    ref = {p.relative_to(shard_dir): p.read_bytes() for p in shard_dir.rglob("*.npy")}
    got = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.npy")}
    assert got == ref                                       # 2 workers == 1 worker, byte for byte
    # Simulate an interruption: the index and one shard are missing.
    (out / "index.json").unlink()
    victim = sorted(out.glob("train/*.docs.npy"))[1]
    victim.unlink()
    idx = tokenize_corpus(corpus[0], tokenizer_dir, out, workers=1, chunk_mb=0.004, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.npy")} == ref
    assert idx["splits"] == load_index(shard_dir)["splits"]
    # Finished: reused as is; a different tokenizer/corpus is refused.
    assert tokenize_corpus(corpus[0], tokenizer_dir, out, chunk_mb=0.004, progress=False) == idx
    with pytest.raises(FileExistsError):
        tokenize_corpus(corpus[0], tokenizer_dir, out, chunk_mb=1.0, progress=False)


def test_packing_respects_boundaries(shard_dir, tok):
    loader = TokenLoader(shard_dir, "train", batch_size=3, seq_len=64, seed=1, tokenizer=tok)
    docs = loader.rank_documents(0)
    expected = np.concatenate([[tok.bos_id, *loader.shards.doc(g), tok.eos_id] for g in docs])
    n = 6
    batches = list(itertools.islice(loader, n))
    stream = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches])
    assert np.array_equal(stream, expected[: stream.size])
    for b in batches:
        x, y, d = b["input_ids"], b["labels"], b["doc_ids"]
        assert x.dtype == torch.int64 and y.dtype == torch.int64 and d.dtype == torch.int32
        assert x.shape == y.shape == d.shape == (3, 64)
        # Next-token labels, except where the target opens a new document (BOS).
        ok = y != IGNORE_INDEX
        assert torch.equal(y[:, :-1][ok[:, :-1]], x[:, 1:][ok[:, :-1]])
        assert torch.equal(~ok, torch.cat([x[:, 1:], y[:, -1:]], 1) == tok.bos_id)
        assert (d[:, 0] == 0).all() and ((d[:, 1:] - d[:, :-1]) >= 0).all()
        # doc_ids increase exactly at BOS tokens (every document starts with one).
        assert torch.equal(d[:, 1:] != d[:, :-1], x[:, 1:] == tok.bos_id)


def test_fim_rearranges_losslessly(shard_dir, tok):
    loader = TokenLoader(shard_dir, "train", batch_size=2, seq_len=128, seed=3, fim_rate=1.0, fim_spm_rate=0.5,
                         tokenizer=tok)
    layouts = set()
    for g in loader.rank_documents(0):
        orig = loader.shards.doc(g).astype(np.int64)
        doc = loader.document(0, g)
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id and doc[1] == tok.fim_begin_id
        body = doc[2:-1]
        if body[0] == tok.fim_hole_id:                      # SPM: hole suffix end prefix middle
            layouts.add("spm")
            end = int(np.flatnonzero(body == tok.fim_end_id)[0])
            suffix, rest = body[1:end], body[end + 1:]
            rebuilt = np.concatenate([rest, suffix])        # prefix + middle + suffix
        else:                                               # PSM: prefix hole suffix end middle
            layouts.add("psm")
            hole = int(np.flatnonzero(body == tok.fim_hole_id)[0])
            end = int(np.flatnonzero(body == tok.fim_end_id)[0])
            prefix, suffix, middle = body[:hole], body[hole + 1:end], body[end + 1:]
            rebuilt = np.concatenate([prefix, middle, suffix])
        assert np.array_equal(rebuilt, orig)
        assert tok.decode(rebuilt) == tok.decode(orig)
    assert layouts == {"psm", "spm"}
    # Same seed -> same rearrangement; fim_rate=0 -> plain documents.
    again = TokenLoader(shard_dir, "train", batch_size=2, seq_len=128, seed=3, fim_rate=1.0, tokenizer=tok)
    g = loader.rank_documents(0)[0]
    assert np.array_equal(again.document(0, g), loader.document(0, g))
    plain = TokenLoader(shard_dir, "train", batch_size=2, seq_len=128, seed=3, tokenizer=tok)
    assert tok.fim_begin_id not in plain.document(0, g)


def test_ranks_are_disjoint_and_cover_everything(shard_dir):
    world = 3
    loaders = [TokenLoader(shard_dir, "train", 2, 32, rank=r, world_size=world, seed=7) for r in range(world)]
    parts = [set(ld.rank_documents(0).tolist()) for ld in loaders]
    assert all(not (a & b) for a, b in itertools.combinations(parts, 2))
    assert set.union(*parts) == set(range(len(loaders[0].shards)))
    first = [next(ld)["input_ids"] for ld in loaders]
    assert not torch.equal(first[0], first[1])
    # Different epochs shuffle differently; the same seed reproduces.
    assert loaders[0].rank_documents(1).tolist() != loaders[0].rank_documents(0).tolist() or len(parts[0]) < 2
    twin = TokenLoader(shard_dir, "train", 2, 32, rank=0, world_size=world, seed=7)
    assert torch.equal(next(twin)["input_ids"], first[0])
    with pytest.raises(ValueError):
        TokenLoader(shard_dir, "train", 2, 32, rank=3, world_size=3)


def test_rank_defaults_come_from_torchrun_env(monkeypatch, shard_dir):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ld = TokenLoader(shard_dir, "train", 2, 32)
    assert (ld.rank, ld.world_size) == (1, 2)


@pytest.mark.parametrize("fim_rate", [0.0, 0.5])
def test_resume_is_exact(shard_dir, fim_rate):
    kw = dict(batch_size=2, seq_len=48, seed=5, fim_rate=fim_rate)
    ref = TokenLoader(shard_dir, "train", **kw)
    # Enough batches to cross several documents and an epoch boundary.
    n = 2 * (ref.shards.num_tokens // (2 * 48)) + 5
    expected = [next(ref) for _ in range(n)]
    a = TokenLoader(shard_dir, "train", **kw)
    for _ in range(n // 2):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))          # survives a JSON round trip
    b = TokenLoader(shard_dir, "train", **kw)
    b.load_state_dict(state)
    for want in expected[n // 2:]:
        got = next(b)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert b.state_dict()["epoch"] >= 1
    with pytest.raises(ValueError, match="does not match"):
        TokenLoader(shard_dir, "train", **dict(kw, seed=6)).load_state_dict(state)


def test_val_loader_reads_everything_once(shard_dir, tok):
    ld = TokenLoader(shard_dir, "val", batch_size=4, seq_len=40, tokenizer=tok)
    assert not ld.loop and not ld.shuffle
    batches = list(ld)
    assert len(batches) == len(ld)
    assert list(ld) == []                                   # exhausted until reset()
    shards = ld.shards
    expected = np.concatenate([[tok.bos_id, *shards.doc(i), tok.eos_id] for i in range(len(shards))])
    x = torch.cat([b["input_ids"].reshape(-1) for b in batches]).numpy()
    assert np.array_equal(x[: expected.size], expected)
    assert (x[expected.size:] == tok.pad_id).all()          # the last row is padded
    labels = torch.cat([b["labels"].reshape(-1) for b in batches]).numpy()
    real = labels[labels != IGNORE_INDEX]
    # Every real token except the BOS of each document is a target exactly once.
    assert real.size == expected.size - len(shards)
    ld.reset()
    assert len(list(ld)) == len(batches)


def test_tokenize_verifies_the_fast_path(tmp_path, corpus, tokenizer_dir, monkeypatch):
    idx = tokenize_corpus(corpus[0], tokenizer_dir, tmp_path / "a", workers=1, verify_every=1, progress=False)
    assert idx["splits"]["train"]["docs"] > 0
    from nanoseek.data.tokenizer import Tokenizer

    monkeypatch.setattr(Tokenizer, "encode_reference", lambda self, text: [0])
    with pytest.raises(RuntimeError, match="disagrees"):
        tokenize_corpus(corpus[0], tokenizer_dir, tmp_path / "b", workers=1, verify_every=1, progress=False)


def test_large_vocabularies_use_uint32(tmp_path, corpus, tokenizer_dir, shard_dir, monkeypatch):
    import nanoseek.data.tokenizer as tokmod

    real = tokmod.load_tokenizer

    def big(path):
        t = real(path)
        t.vocab_size = 70_000          # pretend: ids no longer fit in uint16
        return t

    monkeypatch.setattr(tokmod, "load_tokenizer", big)
    idx = tokenize_corpus(corpus[0], tokenizer_dir, tmp_path / "s32", workers=1, chunk_mb=0.004, progress=False)
    assert idx["dtype"] == "uint32"
    a, b = ShardSet(tmp_path / "s32", "train"), ShardSet(shard_dir, "train")
    assert a.tokens[0].dtype == np.uint32 and len(a) == len(b)
    assert all(np.array_equal(a.doc(i), b.doc(i)) for i in range(len(a)))


def test_a_rebuilt_corpus_gets_no_stale_tokenizer_or_shards(tmp_path):
    """`data build --force` over an edited source keeps the settings fingerprint but not the
    content digest: the tokenizer and shards made from the earlier build are refused (before:
    silently reused), and redone with force they hold the new corpus."""
    from nanoseek.data.build import build_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from tests.data.fixture_corpus import MIT_TEXT, py_code

    src = tmp_path / "proj"
    src.mkdir()
    (src / "LICENSE").write_text(MIT_TEXT)
    for i in range(4):
        (src / f"m{i}.py").write_text(py_code(800 + i))
    corpus, tok_dir, out = tmp_path / "corpus", tmp_path / "tok", tmp_path / "shards"
    opts = dict(workers=1, progress=False, decontaminate=False, near_dedup=False, val_fraction=0.0)
    m1 = build_corpus(corpus, [str(src)], **opts)
    train_tokenizer(corpus, 320, tok_dir, progress=False)
    tokenize_corpus(corpus, tok_dir, out, workers=1, progress=False)

    (src / "m0.py").write_text(py_code(899))
    m2 = build_corpus(corpus, [str(src)], force=True, **opts)
    assert m2["fingerprint"] == m1["fingerprint"] and m2["content_digest"] != m1["content_digest"]
    with pytest.raises(FileExistsError, match="another corpus"):
        train_tokenizer(corpus, 320, tok_dir, progress=False)
    with pytest.raises(FileExistsError, match="another corpus"):
        tokenize_corpus(corpus, tok_dir, out, workers=1, progress=False)
    assert train_tokenizer(corpus, 320, tok_dir, force=True, progress=False)["settings"]["corpus"] == m2["content_digest"]
    idx = tokenize_corpus(corpus, tok_dir, out, workers=1, force=True, progress=False)
    assert idx["settings"]["corpus"] == m2["content_digest"]
    tok, shards = load_tokenizer(tok_dir), ShardSet(out, "train")
    assert sorted(tok.decode(shards.doc(i)) for i in range(len(shards))) == sorted(_corpus_docs(corpus, "train"))
    assert py_code(899) in {tok.decode(shards.doc(i)) for i in range(len(shards))}
