"""Exact and near-duplicate detection for the code corpus (MinHash + LSH).

Used by `nanoseek data build` (see docs/data.md). Two layers, as in The Stack / StarCoder
(Kocetkov et al. 2022; Li et al. 2023, sec. 3.4):

* exact dedup: a 128-bit BLAKE2b digest of the cleaned text; the first copy wins;
* near dedup: MinHash signatures over 5-gram shingles of code tokens (identifier runs and
  single punctuation characters, whitespace ignored), indexed with `datasketch.MinHashLSH`;
  a candidate is a duplicate when its estimated Jaccard similarity with an already kept
  document is >= the threshold (default 0.7, StarCoder's setting).

Why the signatures are not computed with `datasketch.MinHash.update_batch`: it hashes each
shingle in a Python loop and then applies 128 permutations to every shingle, which measured
~4 ms for a 10 KB file on the 2-core reference machine (2.5 MB/s per core) -- slower than the
whole rest of the pipeline. Instead we compute *one permutation hashing* with rotation
densification (Li, Owen & Zhang, NeurIPS 2012; Shrivastava & Li, ICML 2014): one 64-bit hash
per shingle, the top 7 bits pick one of 128 bins, the minimum inside each bin is the bin's
value, and empty bins borrow from the next non-empty bin. For every bin the collision
probability of two sets equals their Jaccard similarity, which is what LSH banding needs; the
cost is one sort per document. The signatures are then wrapped in `datasketch` objects and
banded by `datasketch.MinHashLSH`. `benchmarks/bench_data.py` prints both speeds.

All hashing is vectorised with numpy, a handful of array operations per file: token hashes
are read straight from the byte buffer (see `token_hashes`), and n-gram hashes come from a
prefix sum over the token hashes (`sum t_j * R^(i-j)` over a window, computed as a difference
of a cumulative sum, modulo 2**64). The same token hashes feed the decontamination n-grams in
`clean.py`.

Try it:
    >>> from nanoseek.data.dedup import signature, jaccard_estimate
    >>> a = signature("def add(a, b):\\n    return a + b\\n" * 20)
    >>> jaccard_estimate(a, a)
    1.0
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = [
    "token_hashes", "ngram_hashes", "signature", "jaccard_estimate", "content_digest",
    "NearDupIndex", "NUM_PERM", "SHINGLE", "DEFAULT_THRESHOLD",
]

NUM_PERM = 128          # MinHash bins (signature length)
SHINGLE = 5             # tokens per shingle (StarCoder: 5-grams)
DEFAULT_THRESHOLD = 0.7  # Jaccard similarity above which two files are near-duplicates

_U64 = np.uint64
_MASK32 = np.uint64(0xFFFFFFFF)

# Byte classes: 0 = whitespace, 1 = word byte, 2 = punctuation. Bytes >= 0x80 (UTF-8 lead and
# continuation bytes) count as word bytes, so a non-ASCII identifier or a CJK comment word is
# one token, never a stream of punctuation.
_CLASS = np.full(256, 2, dtype=np.int8)
for _c in b" \t\n\r\x0b\x0c":
    _CLASS[_c] = 0
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _CLASS[_c] = 1
_CLASS[0x80:] = 1

# Odd multipliers: an odd R is invertible modulo 2**64, which the n-gram prefix-sum trick needs.
_R = 0x9E3779B97F4A7C15          # golden-ratio constant
_LAST_MIX = np.uint64(0x9E3779B97F4A7C15)
_LEN_MIX = np.uint64(0xC2B2AE3D27D4EB4F)
_PREFIX_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=_U64)


class _Powers:
    """Cached arrays R**i and R**-i (mod 2**64), grown on demand (per process)."""

    def __init__(self, base: int):
        self.base = base
        self.inv = pow(base, -1, 1 << 64)
        self.pow = np.ones(1, dtype=_U64)
        self.ipow = np.ones(1, dtype=_U64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pow) < n:
            size = max(n, 2 * len(self.pow), 4096)
            self.pow = self._series(self.base, size)
            self.ipow = self._series(self.inv, size)
        return self.pow[:n], self.ipow[:n]

    @staticmethod
    def _series(base: int, size: int) -> np.ndarray:
        # Doubling construction keeps this vectorised: out[k:2k] = out[0:k] * base**k.
        out = np.empty(size, dtype=_U64)
        out[0] = 1
        k, step = 1, base
        while k < size:
            m = min(k, size - k)
            np.multiply(out[:m], _U64(step), out=out[k:k + m])
            k += m
            step = (step * step) % (1 << 64)
        return out


_TOK_POW = _Powers(_R)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads every input bit over the whole word."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def token_hashes(data: bytes | str) -> np.ndarray:
    """64-bit hashes of the code tokens of `data`, in order.

    A token is a maximal run of word bytes ([A-Za-z0-9_] or any byte >= 0x80) or a single
    punctuation byte; whitespace separates tokens and is otherwise ignored, so re-indenting or
    re-wrapping code does not change its tokens. A token's hash mixes its length, its first
    8 bytes and (if longer than 8) its last 8 bytes, read as little-endian words straight from
    the buffer: exact for tokens up to 16 bytes, and a long identifier that differs only in
    its middle is rare enough not to matter for deduplication.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    n = len(data)
    if n == 0:
        return np.empty(0, dtype=_U64)
    buf = data + bytes(8)
    c = np.take(_CLASS, np.frombuffer(buf, dtype=np.uint8, count=n))
    w = c == 1
    punct = c == 2
    start = punct.copy()
    start[0] |= w[0]
    start[1:] |= w[1:] & ~w[:-1]
    end = punct
    end[-1] |= w[-1]
    end[:-1] |= w[:-1] & ~w[1:]
    s = np.flatnonzero(start)
    if s.size == 0:
        return np.empty(0, dtype=_U64)
    e = np.flatnonzero(end) + 1
    # words[i] = bytes[i:i+8] as a little-endian uint64 (an overlapping zero-copy view).
    words = np.ndarray(shape=(n + 1,), dtype="<u8", buffer=buf, strides=(1,))
    length = e - s
    first = words[s] & _PREFIX_MASKS[np.minimum(length, 8)]
    last = np.where(length > 8, words[np.maximum(e - 8, 0)], _U64(0))
    h = first ^ (last * _LAST_MIX) ^ (length.astype(_U64) * _LEN_MIX)
    return _fmix64(h)


def ngram_hashes(tokens: np.ndarray, n: int, short: bool = False) -> np.ndarray:
    """Hashes of every run of `n` consecutive token hashes (vectorised prefix-sum trick).

    With `short=True` a sequence with fewer than `n` tokens yields one hash of the whole
    sequence (so tiny files still get a MinHash signature); otherwise it yields nothing.
    """
    m = tokens.size
    if m < n:
        if not short or m == 0:
            return np.empty(0, dtype=_U64)
        n = m
    rpow, ipow = _TOK_POW.get(m)
    d = np.empty(m + 1, dtype=_U64)
    d[0] = 0
    np.cumsum(tokens * ipow, out=d[1:])
    idx = np.arange(m - n + 1)
    g = (d[idx + n] - d[idx]) * rpow[idx]
    return _fmix64(g ^ _U64(n))


_BIN_BITS = 7
assert 1 << _BIN_BITS == NUM_PERM
_BIN_SHIFT = _U64(64 - _BIN_BITS)
_BIN_STARTS = np.arange(NUM_PERM, dtype=_U64) << _BIN_SHIFT
_BIN_IDS = np.arange(NUM_PERM)
_ROT = np.uint64(0x9E3779B1)


def signature_from_shingles(shingles: np.ndarray) -> np.ndarray | None:
    """One-permutation MinHash with rotation densification -> uint32[NUM_PERM], or None if empty."""
    if shingles.size == 0:
        return None
    gs = np.sort(shingles)
    idx = np.searchsorted(gs, _BIN_STARTS)
    valid = idx < gs.size
    vals = gs[np.minimum(idx, gs.size - 1)]
    valid &= (vals >> _BIN_SHIFT).astype(np.int64) == _BIN_IDS
    # Top 32 bits of the 57-bit in-bin value: the order inside the bin is preserved.
    sig = (vals >> _U64(64 - _BIN_BITS - 32)) & _MASK32
    nz = np.flatnonzero(valid)
    if nz.size < NUM_PERM:
        # Empty bin i takes the value of the next non-empty bin j (circularly), offset by the
        # distance so that two sets only collide there when they collide in bin j *and* have
        # the same empty-bin pattern (Shrivastava & Li 2014, "rotation" densification).
        pos = np.searchsorted(nz, _BIN_IDS)
        pos[pos == nz.size] = 0
        j = nz[pos]
        dist = ((j - _BIN_IDS) % NUM_PERM).astype(_U64)
        sig = (sig[j] + dist * _ROT) & _MASK32
    return sig.astype(np.uint32)


def signature(text: str | bytes, shingle: int = SHINGLE) -> np.ndarray | None:
    """MinHash signature (uint32[NUM_PERM]) of a document's code-token shingles."""
    return signature_from_shingles(ngram_hashes(token_hashes(text), shingle, short=True))


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of agreeing bins: an unbiased estimate of the Jaccard similarity."""
    return float(np.count_nonzero(a == b)) / a.size


def content_digest(data: bytes) -> bytes:
    """128-bit digest used for exact deduplication."""
    return hashlib.blake2b(data, digest_size=16).digest()


class _Sig:
    """The two attributes `datasketch.MinHashLSH` reads from a MinHash: `hashvalues`, len()."""

    __slots__ = ("hashvalues",)

    def __init__(self, hashvalues: np.ndarray):
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


class NearDupIndex:
    """Streaming near-duplicate filter: `add(key, sig)` returns the key of an earlier near-copy
    (and does not index the new document) or None (and indexes it).

    Banding (number of bands b and rows r) is chosen by `datasketch.MinHashLSH` to minimise
    false positives + false negatives at `threshold`; LSH candidates are then verified with
    the full signature, so the reported duplicates all have estimated Jaccard >= threshold.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sigs: dict[int, np.ndarray] = {}

    @property
    def bands(self) -> int:
        return self.lsh.b

    @property
    def rows(self) -> int:
        return self.lsh.r

    def add(self, key: int, sig: np.ndarray) -> int | None:
        m = _Sig(sig)
        best = None
        for cand in self.lsh.query(m):
            if jaccard_estimate(self.sigs[cand], sig) >= self.threshold and (best is None or cand < best):
                best = cand
        if best is not None:
            return best
        self.lsh.insert(key, m, check_duplication=False)
        self.sigs[key] = sig
        return None

    def __len__(self) -> int:
        return len(self.sigs)
