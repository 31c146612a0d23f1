"""Token shards: `nanoseek data tokenize` and the packing / fill-in-the-middle loader.

    nanoseek data tokenize --corpus runs/corpus --tokenizer runs/tokenizer --out runs/shards
    >>> from nanoseek.data.shards import TokenLoader
    >>> loader = TokenLoader("runs/shards", "train", batch_size=8, seq_len=1024, fim_rate=0.5)
    >>> batch = next(loader)       # input_ids, labels, doc_ids: [8, 1024] tensors
    >>> state = loader.state_dict()  # ... later: loader.load_state_dict(state) resumes exactly

On disk (SHARDDIR):
  {split}/shard-NNNNN.tokens.npy   1-D uint16 (vocab <= 65536) or uint32: the documents' tokens,
                                   concatenated, *without* BOS/EOS (added at load time)
  {split}/shard-NNNNN.docs.npy     int64 offsets, length ndocs + 1: document i is
                                   tokens[docs[i]:docs[i + 1]]
  plan.json                        the chunking of the corpus into shards (for resuming)
  index.json                       shard list, counts, dtype, special ids, tokenizer fingerprint
                                   and corpus content digest; written last: marks completion
Each shard is the tokenization of one ~16 MB slice of a corpus file, written to a temporary
name and renamed, so an interrupted run resumes by redoing only the missing shards, and the
output is identical whatever the number of worker processes.

Loader. Documents are shuffled per epoch (seeded), dealt round-robin to ranks (rank r of W
gets documents r, r+W, ... of the permutation: disjoint, and deterministic given the seed),
wrapped as BOS + tokens + EOS (or a FIM rearrangement), concatenated, and cut into rows of
seq_len + 1 tokens with stride seq_len (nanoGPT-style packing; no padding, no token dropped).
  input_ids[b, t] = stream[b*T + t],  labels[b, t] = stream[b*T + t + 1]
labels are -100 where the target is the first token of a document (nothing in the previous
document predicts it); doc_ids[b, t] numbers the documents within a row from 0, so the model
can restrict attention and KV compression to the current document.

FIM (Bavarian et al. 2022; DeepSeek-Coder's PSM layout, see tokenizer.py): with probability
fim_rate a document is split at two uniformly random token positions into prefix/middle/suffix
and rearranged, as SPM with probability fim_spm_rate, else PSM:
    PSM: BOS <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle EOS
    SPM: BOS <｜fim▁begin｜> <｜fim▁hole｜> suffix <｜fim▁end｜> prefix middle EOS
Every random choice is a pure function of (seed, epoch, document), so the loader's whole state
is a stream position (epoch, document cursor, token offset): `load_state_dict` resumes with
exactly the batches an uninterrupted loader would have produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from nanoseek.jsonl import iter_lines

IGNORE_INDEX = -100
_PLAN = "plan.json"
_INDEX = "index.json"


# ---------------------------------------------------------------------------------------------
# Tokenization

def _chunks(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of ~chunk_bytes, each starting at a line start."""
    size = path.stat().st_size
    out, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            end = min(size, start + chunk_bytes)
            if end < size:
                f.seek(end)
                f.readline()
                end = f.tell()
            out.append((start, end))
            start = end
    return out


_TW: dict = {}


def _init_tokenize_worker(tokenizer_dir: str) -> None:
    from nanoseek.data.tokenizer import load_tokenizer

    _TW["tok"] = load_tokenizer(tokenizer_dir)


def _corpus_records(src: str, start: int, end: int):
    """The records of corpus file `src` whose lines start in [start, end) (_chunks' ranges). The
    corpus is ours, so a bad line is an error, not a skip."""
    with open(src, "rb") as f:
        for ln in iter_lines(f, start=start, end=end):
            if ln.error is not None:
                raise ValueError(f"{src} @byte {ln.offset}: {ln.error}")
            yield ln.obj


def _tokenize_chunk(job: dict) -> dict:
    """Tokenize one corpus slice into one shard (runs in a worker)."""
    tok = _TW["tok"]
    dtype = np.dtype(job["dtype"])
    pieces, lengths, nbytes = [], [], 0
    for rec in _corpus_records(job["src"], job["start"], job["end"]):
        text = rec["content"]
        ids = tok.encode_to_numpy(text, dtype=np.uint32)
        # Check ~1/verify_every of the documents, chosen by content id (not by position, so
        # small shards are not over-sampled).
        if job["verify_every"] and tok.fast and int(rec.get("id", "0")[:8] or "0", 16) % job["verify_every"] == 0:
            ref = tok.encode_reference(text)
            if ids.tolist() != ref:
                raise RuntimeError(f"fast tokenizer disagrees with `tokenizers` on a document of {job['src']}; "
                                   f"rerun with NANOSEEK_NO_TIKTOKEN=1 and report this bug")
        pieces.append(ids.astype(dtype, copy=False))
        lengths.append(len(ids))
        nbytes += len(text.encode("utf-8"))
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
    docs = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=docs[1:])
    out = Path(job["out"])
    tmp_t, tmp_d = out.with_name(out.name + ".tokens.tmp.npy"), out.with_name(out.name + ".docs.tmp.npy")
    np.save(tmp_t, tokens)
    np.save(tmp_d, docs)
    # the shard's source bytes, so that a resumed run's index counts bytes per token over all shards
    out.with_name(out.name + ".meta.json").write_text(json.dumps({"bytes": nbytes, "tokens": int(tokens.size)}))
    os.replace(tmp_t, out.with_name(out.name + ".tokens.npy"))
    os.replace(tmp_d, out.with_name(out.name + ".docs.npy"))  # last: marks the shard complete
    return {"name": job["name"], "tokens": int(tokens.size), "docs": len(lengths), "bytes": nbytes}


def _shard_done(out_dir: Path, name: str) -> dict | None:
    d, t = out_dir / f"{name}.docs.npy", out_dir / f"{name}.tokens.npy"
    if not (d.is_file() and t.is_file()):
        return None
    try:
        docs = np.load(d, mmap_mode="r")
        tokens = np.load(t, mmap_mode="r")
    except (OSError, ValueError, EOFError):   # (EOFError: an empty file, e.g. cut by a crash)
        return None
    if docs.size == 0 or int(docs[-1]) != tokens.size:
        return None
    nbytes = None
    try:
        meta = json.loads((out_dir / f"{name}.meta.json").read_text())
        if meta.get("tokens") == int(tokens.size):
            nbytes = int(meta["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass   # a shard written before byte counts were kept: left out of bytes_per_token
    return {"name": name, "tokens": int(tokens.size), "docs": int(docs.size - 1), "bytes": nbytes, "reused": True}


def tokenize_corpus(corpus_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                    workers: int | None = None, chunk_mb: float = 16.0, verify_every: int = 1009,
                    force: bool = False, progress: bool = True) -> dict:
    """Tokenize every split of a corpus into memory-mapped shards; return the index (see module doc).

    Resumes an interrupted run; returns the existing index if this exact job already finished
    (same tokenizer, same corpus contents: shards of an earlier build of the corpus are refused
    unless force). Every `verify_every`-th document is also encoded with `tokenizers` and must match.
    """
    from nanoseek.data.build import corpus_id, load_manifest
    from nanoseek.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    manifest = load_manifest(corpus_dir)
    tok = load_tokenizer(tokenizer_dir)
    # "corpus": the digest of the corpus' contents, so shards of an earlier build are never reused
    settings = {"corpus": corpus_id(manifest), "tokenizer": tokenizer_fingerprint(tokenizer_dir),
                "chunk_mb": chunk_mb}
    out = Path(out_dir)
    index_path = out / _INDEX
    if index_path.is_file() and not force:
        idx = json.loads(index_path.read_text())
        if idx.get("settings") == settings:
            if progress:
                print(f"shards in {out} are already complete (index.json); reusing them", file=sys.stderr)
            return idx
        raise FileExistsError(f"{out} holds shards of another corpus/tokenizer; pass --force to redo them")
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    plan = _plan(out, Path(corpus_dir), manifest, settings, dtype, chunk_mb, force)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    todo = []
    for j in plan["jobs"]:
        done = _shard_done(out, j["name"])
        if done:
            results[j["name"]] = done
        else:
            todo.append({**j, "src": str(Path(corpus_dir) / j["file"]), "out": str(out / j["name"]),
                         "dtype": plan["dtype"], "verify_every": verify_every})
    if progress and results:
        print(f"resuming: {len(results)} of {len(plan['jobs'])} shards already done", file=sys.stderr)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    _run_jobs(todo, str(tokenizer_dir), workers, progress, results)
    elapsed = time.perf_counter() - t0

    splits = {}
    for split in ("train", "val"):
        shards = [results[j["name"]] for j in plan["jobs"] if j["split"] == split]
        shards = [s for s in shards if s["docs"] > 0]
        splits[split] = {
            "shards": [s["name"] for s in shards],
            "tokens": sum(s["tokens"] for s in shards),
            "docs": sum(s["docs"] for s in shards),
        }
    counted = [r for r in results.values() if r["bytes"] is not None]
    all_bytes, all_tokens = sum(r["bytes"] for r in counted), sum(r["tokens"] for r in counted)
    new_bytes = sum(r["bytes"] for r in counted if not r.get("reused"))
    index = {
        "format": "nanoseek-shards",
        "settings": settings,
        "dtype": plan["dtype"],
        "vocab_size": tok.vocab_size,
        "special_ids": {k: getattr(tok, f"{k}_id") for k in ("bos", "eos", "pad", "fim_begin", "fim_hole", "fim_end")},
        "splits": splits,
        "source_bytes": manifest["counts"]["kept_bytes"],
        "bytes_per_token": round(all_bytes / all_tokens, 4) if all_tokens else None,
        "timing": {"seconds": round(elapsed, 2), "workers": workers,
                   "mb_per_s": round(new_bytes / 1e6 / max(elapsed, 1e-9), 2) if new_bytes else None},
    }
    tmp = out / (_INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, index_path)
    return index


def _plan(out: Path, corpus_dir: Path, manifest: dict, settings: dict, dtype: str, chunk_mb: float,
          force: bool) -> dict:
    """The plan of a run in `out`: the partial run's if one with these settings is there, else a
    new one (with force, whatever was there is removed first)."""
    index_path, plan_path = out / _INDEX, out / _PLAN
    if force and out.exists():
        for p in [index_path, plan_path]:
            if p.exists():
                p.unlink()
        for split in ("train", "val"):
            if (out / split).is_dir():
                shutil.rmtree(out / split)
    if out.exists() and any(out.iterdir()) and not plan_path.is_file():
        raise FileExistsError(f"{out} exists and is not a nanoseek shard directory; refusing to write into it")
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        if plan["settings"] != settings:
            raise FileExistsError(f"{out} holds a partial run for another corpus/tokenizer; pass --force")
    else:
        jobs = []
        for split in ("train", "val"):
            k = 0
            for name in manifest["files"][split]:
                for start, end in _chunks(corpus_dir / name, int(chunk_mb * 1e6)):
                    jobs.append({"split": split, "name": f"{split}/shard-{k:05d}", "file": name, "start": start, "end": end})
                    k += 1
        plan = {"settings": settings, "dtype": dtype, "jobs": jobs}
        out.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
    return plan


def _run_jobs(todo: list[dict], tokenizer_dir: str, workers: int, progress: bool, results: dict) -> None:
    """Tokenize the shards still to do (in worker processes when workers > 1) into `results`."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(j["end"] - j["start"] for j in todo), unit="B", unit_scale=True,
                   desc="data tokenize", file=sys.stderr)
    try:
        if workers == 1 or len(todo) <= 1:
            _init_tokenize_worker(tokenizer_dir)
            for j, r in zip(todo, map(_tokenize_chunk, todo)):
                results[r["name"]] = r
                if bar is not None:
                    bar.update(j["end"] - j["start"])
        else:
            from nanoseek.data.build import mp_context

            with mp_context().Pool(workers, initializer=_init_tokenize_worker, initargs=(tokenizer_dir,)) as pool:
                for j, r in zip(todo, pool.imap(_tokenize_chunk, todo, chunksize=1)):
                    results[r["name"]] = r
                    if bar is not None:
                        bar.update(j["end"] - j["start"])
    finally:
        if bar is not None:
            bar.close()


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """np.load of a shard file; a missing or garbage file is one clear error naming it."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: shard file missing (run `nanoseek data tokenize` again)") from None
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable shard file ({e})") from None
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{path}: not a token shard (dtype {arr.dtype})")
    return arr


def load_index(shard_dir: str | os.PathLike) -> dict:
    p = Path(shard_dir) / _INDEX
    if not p.is_file():
        raise FileNotFoundError(f"{shard_dir} has no index.json: run `nanoseek data tokenize` (or let it finish)")
    return json.loads(p.read_text())


# ---------------------------------------------------------------------------------------------
# Loading

class ShardSet:
    """The documents of one split, memory-mapped: `doc(i)` is a read-only token array."""

    def __init__(self, shard_dir: str | os.PathLike, split: str):
        self.index = load_index(shard_dir)
        if split not in self.index["splits"]:
            raise ValueError(f"unknown split {split!r}; have {sorted(self.index['splits'])}")
        names = self.index["splits"][split]["shards"]
        self.names = list(names)
        self.vocab_size = int(self.index["vocab_size"])
        self.tokens = [_load_npy(Path(shard_dir) / f"{n}.tokens.npy", mmap=True) for n in names]
        offsets = [_load_npy(Path(shard_dir) / f"{n}.docs.npy") for n in names]
        for n, o, t in zip(names, offsets, self.tokens):
            if o.ndim != 1 or o.size < 1 or int(o[0]) != 0 or int(o[-1]) != t.size or bool((np.diff(o) < 0).any()):
                raise ValueError(f"{Path(shard_dir) / n}.docs.npy: document offsets do not match the token file "
                                 f"(damaged shards: run `nanoseek data tokenize` again)")
        self.doc_shard = np.concatenate([np.full(o.size - 1, i, dtype=np.int32) for i, o in enumerate(offsets)]) \
            if offsets else np.empty(0, dtype=np.int32)
        self.doc_start = np.concatenate([o[:-1] for o in offsets]) if offsets else np.empty(0, dtype=np.int64)
        self.doc_end = np.concatenate([o[1:] for o in offsets]) if offsets else np.empty(0, dtype=np.int64)
        self.fingerprint = hashlib.sha256(json.dumps([self.index["settings"], split]).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return int(self.doc_start.size)

    def doc(self, i: int) -> np.ndarray:
        k = self.doc_shard[i]
        t = self.tokens[k][self.doc_start[i]:self.doc_end[i]]
        # ids past the vocabulary would index outside the embedding table: damaged shards, or
        # shards of another tokenizer (checked per document, as it is read: no full pass at start)
        if t.size and int(t.max()) >= self.vocab_size:
            raise ValueError(f"{self.names[k]}.tokens.npy: token id {int(t.max())} in document {i} is outside the "
                             f"vocabulary ({self.vocab_size}); the shards are damaged or from another tokenizer")
        return t

    @property
    def num_tokens(self) -> int:
        return int((self.doc_end - self.doc_start).sum())


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


class TokenLoader:
    """Packed next-token batches from token shards (see module docstring).

    Iterating yields dicts of CPU tensors (moved to `device` if given):
      input_ids  LongTensor[B, T]   labels  LongTensor[B, T] (-100 = ignore)   doc_ids IntTensor[B, T]
    Defaults: train shuffles and loops forever; other splits read once in order, the last
    batch padded (pad_id, labels -100) and possibly with fewer rows. rank / world_size default
    to $RANK / $WORLD_SIZE (as set by torchrun), else 0 / 1.
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, rank: int | None = None,
                 world_size: int | None = None, seed: int = 0, fim_rate: float = 0.0, fim_spm_rate: float = 0.5,
                 tokenizer=None, shuffle: bool | None = None, loop: bool | None = None, device=None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be >= 1")
        if not 0.0 <= fim_rate <= 1.0 or not 0.0 <= fim_spm_rate <= 1.0:
            raise ValueError("fim_rate and fim_spm_rate must be in [0, 1]")
        self.shards = ShardSet(shard_dir, split)
        self.split = split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.world_size = world_size if world_size is not None else _env_int("WORLD_SIZE", 1)
        self.rank = rank if rank is not None else _env_int("RANK", 0)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if len(self.shards) < self.world_size:
            raise ValueError(f"split {split!r} has {len(self.shards)} documents, fewer than {self.world_size} ranks")
        self.seed = seed
        self.fim_rate, self.fim_spm_rate = fim_rate, fim_spm_rate
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.loop = (split == "train") if loop is None else loop
        self.device = device
        ids = dict(self.shards.index["special_ids"])
        if tokenizer is not None:
            ids = {k: getattr(tokenizer, f"{k}_id") for k in ids}
            if tokenizer.vocab_size != self.shards.index["vocab_size"]:
                raise ValueError("the tokenizer does not match these shards (different vocabulary size)")
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]
        self.fim_begin, self.fim_hole, self.fim_end = ids["fim_begin"], ids["fim_hole"], ids["fim_end"]
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._doc_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self.reset()

    # -- positions ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Go back to the start of epoch 0."""
        self._pos = (0, 0, 0)   # (epoch, index into this rank's document order, token offset)
        self._exhausted = False
        self.batches = 0

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.shards)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, perm[self.rank::self.world_size])
        return self._order_cache[1]

    def rank_documents(self, epoch: int = 0) -> np.ndarray:
        """Global indices of the documents this rank reads in `epoch`, in order."""
        return self._order(epoch).copy()

    # -- documents ---------------------------------------------------------------------------
    def document(self, epoch: int, gidx: int) -> np.ndarray:
        """The token sequence of document `gidx` as fed in `epoch`: BOS + (FIM of) tokens + EOS."""
        key = (epoch, int(gidx))
        if self._doc_cache is not None and self._doc_cache[0] == key:
            return self._doc_cache[1]
        toks = self.shards.doc(int(gidx)).astype(np.int64)
        body = [toks]
        if self.fim_rate > 0:
            rng = np.random.default_rng([self.seed, epoch, int(gidx), 0x46494D])  # "FIM"
            if rng.random() < self.fim_rate:
                a, b = np.sort(rng.integers(0, toks.size + 1, size=2))
                prefix, middle, suffix = toks[:a], toks[a:b], toks[b:]
                if rng.random() < self.fim_spm_rate:
                    body = [[self.fim_begin, self.fim_hole], suffix, [self.fim_end], prefix, middle]
                else:
                    body = [[self.fim_begin], prefix, [self.fim_hole], suffix, [self.fim_end], middle]
        doc = np.concatenate([[self.bos], *body, [self.eos]]).astype(np.int64)
        self._doc_cache = (key, doc)
        return doc

    def _gather(self, n: int):
        """Up to n stream tokens from the current position, their doc-start flags, and the
        position reached after `batch_size * seq_len` of them."""
        epoch, cur, off = self._pos
        toks, starts, have = [], [], 0
        stride = self.batch_size * self.seq_len
        next_pos = None
        while have < n:
            order = self._order(epoch)
            if cur >= len(order):
                if not self.loop:
                    break
                epoch, cur, off = epoch + 1, 0, 0
                continue
            doc = self.document(epoch, order[cur])
            take = doc[off: off + n - have]
            st = np.zeros(take.size, dtype=bool)
            st[0] = off == 0
            if next_pos is None and have + take.size > stride:
                next_pos = (epoch, cur, off + stride - have)
            toks.append(take)
            starts.append(st)
            have += take.size
            off += take.size
            if off >= doc.size:
                cur, off = cur + 1, 0
            if next_pos is None and have == stride:
                next_pos = (epoch, cur, off)
        if next_pos is None:
            next_pos = (epoch, cur, off)
        return (np.concatenate(toks) if toks else np.empty(0, dtype=np.int64),
                np.concatenate(starts) if starts else np.empty(0, dtype=bool), next_pos)

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._exhausted:
            raise StopIteration
        B, T = self.batch_size, self.seq_len
        stream, starts, next_pos = self._gather(B * T + 1)
        if stream.size < B * T + 1:        # end of a non-looping split
            if stream.size < 2:
                self._exhausted = True
                raise StopIteration
            B = -(-(stream.size - 1) // T)
            pad = B * T + 1 - stream.size
            real = np.concatenate([np.ones(stream.size, dtype=bool), np.zeros(pad, dtype=bool)])
            stream = np.concatenate([stream, np.full(pad, self.pad, dtype=np.int64)])
            starts = np.concatenate([starts, np.zeros(pad, dtype=bool)])
            if pad:
                starts[stream.size - pad] = True   # padding is its own segment
            self._exhausted = True
        else:
            real = None
        x = stream[:B * T].reshape(B, T)
        y = stream[1:B * T + 1].reshape(B, T).copy()
        y[starts[1:B * T + 1].reshape(B, T)] = IGNORE_INDEX
        if real is not None:
            y[~real[1:B * T + 1].reshape(B, T)] = IGNORE_INDEX
        sx = starts[:B * T].reshape(B, T)
        doc_ids = np.cumsum(sx, axis=1, dtype=np.int32) - sx[:, :1].astype(np.int32)
        self._pos = next_pos
        self.batches += 1
        import torch

        batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(x)),
                 "labels": torch.from_numpy(y),
                 "doc_ids": torch.from_numpy(doc_ids)}
        if self.device is not None:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def __len__(self) -> int:
        """Number of batches in one pass (non-looping loaders only)."""
        if self.loop:
            raise TypeError("a looping (train) loader has no length")
        docs = self._order(0)
        n = int((self.shards.doc_end[docs] - self.shards.doc_start[docs]).sum()) + 2 * docs.size
        if self.fim_rate > 0:
            n = sum(self.document(0, g).size for g in docs)
        rows = -(-(n - 1) // self.seq_len) if n >= 2 else 0
        return -(-rows // self.batch_size)

    # -- checkpointing -----------------------------------------------------------------------
    def _config(self) -> dict:
        return {"split": self.split, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "fim_rate": self.fim_rate, "fim_spm_rate": self.fim_spm_rate, "shuffle": self.shuffle,
                "shards": self.shards.fingerprint}

    def state_dict(self) -> dict:
        epoch, cur, off = self._pos
        return {"epoch": epoch, "cursor": cur, "offset": off, "exhausted": self._exhausted,
                "batches": self.batches, "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`. The position is a token position, so batch_size and
        seq_len may differ from the saved run; everything that decides the order may not."""
        mine, theirs = self._config(), state.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(f"loader state does not match this loader: {diff} (saved, current)")
        self._pos = (int(state["epoch"]), int(state["cursor"]), int(state["offset"]))
        self._exhausted = bool(state.get("exhausted", False))
        self.batches = int(state.get("batches", 0))
