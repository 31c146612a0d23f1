"""Byte-level BPE tokenizer with code-aware pre-tokenization and the DeepSeek-V4 special tokens.

    nanoseek tokenizer train --corpus runs/corpus --vocab-size 32768 --out runs/tokenizer
    >>> from nanoseek.data.tokenizer import load_tokenizer
    >>> tok = load_tokenizer("runs/tokenizer")
    >>> tok.decode(tok.encode("def f(x):\\n    return x\\n")) == "def f(x):\\n    return x\\n"
    True

Training uses the Hugging Face `tokenizers` library (`BpeTrainer`) on the train split of a
corpus built by `nanoseek data build`; the result is a standard `tokenizer.json` +
`tokenizer_config.json` that `transformers.PreTrainedTokenizerFast` loads as is.

Special tokens come first, with fixed ids (BOS = 0 and EOS = 1 as in DeepSeek-V4's config.json);
see SPECIAL_TOKENS. Ids 19-31 are reserved placeholders so that a later special token never
shifts the ordinary vocabulary. Document text is always encoded with special-token *strings*
treated as plain text (a file that contains "<think>" cannot inject a control token); only
`encode(..., allow_special=True)` maps them to their ids, for chat templates.

Pre-tokenization (CODE_PATTERN, then byte-level mapping) is designed for source code:
  * numbers split into groups of at most 3 digits (as DeepSeek-V3 / GPT-4 do);
  * identifiers keep their digits and underscores (`int64`, `__init__`) and may take one
    leading space or symbol (` self`, `.append`, `(x`);
  * indentation is never cut: after a word, the line break(s) and the next line's indentation
    form one piece ("\n        "); after punctuation the line break joins the punctuation
    ("):\n") and the indentation is a piece of its own, so BPE learns whole-indentation tokens
    instead of GPT-2's "7 spaces + ' return'" split;
  * other runs of spaces/tabs stay together (measured better than GPT-2's look-ahead rule).
No look-around is used, so the same pattern runs in tiktoken's regex engine unchanged.

Fast path: when the merges are consistent (each merged token has one producing merge whose
order matches its id, always true for `BpeTrainer` output) encoding runs through `tiktoken`
built from the same vocabulary, which gives identical ids (checked at tokenize time and in
tests) at ~4x the speed of `tokenizers` on the 2-core reference machine.

Fill-in-the-middle layouts (used by shards.py) follow DeepSeek-Coder's PSM format:
    PSM: <BOS><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>{middle}<EOS>
    SPM: <BOS><｜fim▁begin｜><｜fim▁hole｜>{suffix}<｜fim▁end｜>{prefix}{middle}<EOS>
(SPM is the suffix-first variant of Bavarian et al. 2022, "Efficient Training of Language
Models to Fill in the Middle", appendix D, written with DeepSeek's three FIM tokens.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from nanoseek.chat_format import VOCABULARY_SPECIALS
from nanoseek.jsonl import read_json

# (attribute name, token string). Order = id. One definition: the chat format's vocabulary
# (DeepSeek's strings: full-width "｜" (U+FF5C) and "▁" (U+2581)).
SPECIAL_TOKENS: list[tuple[str, str]] = list(VOCABULARY_SPECIALS)
NUM_SPECIAL = len(SPECIAL_TOKENS)

CODE_PATTERN = (
    r"\p{N}{1,3}"                                              # digits, in groups of <= 3
    r"|[^\r\n\p{L}\p{M}\p{N}_]?[\p{L}\p{M}_][\p{L}\p{M}\p{N}_]*"  # identifier, 1 leading space/symbol
    r"| ?[^\s\p{L}\p{M}\p{N}_]+[\r\n]*"                        # operators / punctuation (+ line breaks)
    r"|\s*[\r\n][ \t]*"                                        # line break(s) + next line's indentation
    r"|[ \t]+"                                                 # other runs of blanks
    r"|\s+"
)
# What `tokenizers.pre_tokenizers.ByteLevel(use_regex=True)` splits on (GPT-2's pattern): the
# "plain BPE" baseline the benchmark compares against.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

FIM_LAYOUTS = {
    "psm": "<BOS><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>{middle}<EOS>",
    "spm": "<BOS><｜fim▁begin｜><｜fim▁hole｜>{suffix}<｜fim▁end｜>{prefix}{middle}<EOS>",
}
_META = "nanoseek_tokenizer.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_SURROGATE_RUN = re.compile("[\udc80-\udcff]+")


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with nanoseek's conventions.

    Attributes `bos_id`, `eos_id`, `pad_id`, `user_id`, `assistant_id`, `latest_reminder_id`,
    `think_begin_id`, `think_end_id`, `dsml_id`, `fim_begin_id`, `fim_hole_id`, `fim_end_id`,
    `action_id`, `query_id`, `authority_id`, `domain_id`, `title_id`, `extracted_url_id`,
    `read_url_id` hold the special ids; `special_tokens` maps every special string to its id.
    """

    def __init__(self, hf, meta: dict | None = None):
        self.hf = hf
        self.meta = meta or {}
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.special_tokens: dict[str, int] = {}
        for tok in hf.get_added_tokens_decoder().values():
            if tok.special:
                self.special_tokens[tok.content] = hf.token_to_id(tok.content)
        for name, s in SPECIAL_TOKENS:
            tid = hf.token_to_id(s)
            if tid is None and not name.startswith("placeholder"):
                raise ValueError(f"tokenizer has no {s!r} token; it was not trained by nanoseek")
            setattr(self, f"{name}_id", tid)
        # Raw bytes of every id (special tokens: their UTF-8 string).
        id_bytes: list[bytes] = [b""] * self.vocab_size
        for s, i in hf.get_vocab(with_added_tokens=True).items():
            if s in self.special_tokens:
                id_bytes[i] = s.encode("utf-8")
            else:
                try:
                    id_bytes[i] = bytes(_CHAR_TO_BYTE[c] for c in s)
                except KeyError:
                    raise ValueError(f"token {s!r} is not byte-level BPE; nanoseek needs a byte-level tokenizer") from None
        self._id_bytes = id_bytes
        self._byte_ids = [hf.token_to_id(_BYTE_TO_CHAR[b]) for b in range(256)]
        # Document text: special-token strings are plain text.
        from tokenizers import Tokenizer as HFTokenizer

        serialized = hf.to_str()
        self._hf_text = HFTokenizer.from_str(serialized)
        self._hf_text.encode_special_tokens = True
        self._tt = self._make_tiktoken(json.loads(serialized))

    # -- construction ------------------------------------------------------------------------
    @staticmethod
    def _pattern(spec: dict) -> str | None:
        """The split regex of the pre-tokenizer, if it is one nanoseek knows how to replicate."""
        pt = spec.get("pre_tokenizer") or {}
        if pt.get("type") == "ByteLevel" and pt.get("use_regex", True) and not pt.get("add_prefix_space"):
            return GPT2_PATTERN
        if pt.get("type") == "Sequence":
            seq = pt.get("pretokenizers", [])
            if (len(seq) == 2 and seq[0].get("type") == "Split" and seq[0].get("behavior") == "Isolated"
                    and seq[1].get("type") == "ByteLevel" and not seq[1].get("use_regex", True)
                    and not seq[1].get("add_prefix_space")):
                return seq[0]["pattern"].get("Regex")
        return None

    def _make_tiktoken(self, spec: dict):
        """A tiktoken Encoding with the same vocabulary, merges and split regex, or None."""
        if os.environ.get("NANOSEEK_NO_TIKTOKEN"):
            return None
        try:
            import tiktoken
        except ImportError:
            return None
        pattern = self._pattern(spec)
        model = spec["model"]
        if pattern is None or model.get("type") != "BPE" or spec.get("normalizer") is not None:
            return None
        vocab, merges = model["vocab"], model["merges"]
        # Equivalence with tiktoken's "lowest-rank concatenation first" rule needs every merged
        # token to come from exactly one merge, in id order.
        last = -1
        seen = set()
        for m in merges:
            a, b = m if isinstance(m, list) else m.split(" ", 1)
            tid = vocab.get(a + b)
            if tid is None or tid <= last or tid in seen:
                return None
            seen.add(tid)
            last = tid
        ranks = {self._id_bytes[i]: i for s, i in vocab.items() if s not in self.special_tokens}
        if len(ranks) != len(vocab) - sum(1 for s in vocab if s in self.special_tokens):
            return None
        try:
            return tiktoken.Encoding("nanoseek", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=dict(self.special_tokens))
        except Exception:  # noqa: BLE001 - an unsupported pattern: fall back to `tokenizers`
            return None

    @property
    def fast(self) -> bool:
        """True when encoding runs through tiktoken."""
        return self._tt is not None

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings are plain text unless allow_special."""
        if self._tt is not None:
            ids = self._tt.encode(text, allowed_special="all") if allow_special else self._tt.encode_ordinary(text)
        else:
            ids = (self.hf if allow_special else self._hf_text).encode(text, add_special_tokens=False).ids
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Encode documents (special-token strings as text)."""
        if self._tt is not None:
            if num_threads <= 1:
                return [self._tt.encode_ordinary(t) for t in texts]
            return self._tt.encode_ordinary_batch(texts, num_threads=num_threads)
        return [e.ids for e in self._hf_text.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_to_numpy(self, text: str, dtype=np.uint32) -> np.ndarray:
        if self._tt is not None:
            return self._tt.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).astype(dtype, copy=False)
        return np.asarray(self.encode(text), dtype=dtype)

    def encode_reference(self, text: str) -> list[int]:
        """Encode with `tokenizers` itself (the source of truth the fast path is checked against)."""
        return self._hf_text.encode(text, add_special_tokens=False).ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of arbitrary bytes: bytes that are not valid UTF-8 become byte tokens."""
        text = data.decode("utf-8", "surrogateescape")
        ids: list[int] = []
        pos = 0
        for m in _SURROGATE_RUN.finditer(text):
            if m.start() > pos:
                ids += self.encode(text[pos:m.start()])
            ids += [self._byte_ids[ord(c) - 0xDC00] for c in m.group()]
            pos = m.end()
        if pos < len(text):
            ids += self.encode(text[pos:])
        return ids

    # -- decoding ----------------------------------------------------------------------------
    def decode_bytes(self, ids) -> bytes:
        """Exact bytes of a token sequence (special tokens as their UTF-8 strings)."""
        ids = [int(i) for i in ids]
        if self._tt is not None:
            return self._tt.decode_bytes(ids)
        return b"".join(self._id_bytes[i] for i in ids)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of a token sequence; invalid UTF-8 (a sequence cut mid-character) becomes U+FFFD."""
        if skip_special:
            ids = [int(i) for i in ids if int(i) not in self._special_ids]
        return self.decode_bytes(ids).decode("utf-8", "replace")

    @property
    def _special_ids(self) -> set[int]:
        return set(self.special_tokens.values())

    # -- vocabulary --------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for special tokens): for bits-per-byte metrics."""
        out = np.array([len(b) for b in self._id_bytes], dtype=np.int64)
        out[list(self._special_ids)] = 0
        return out

    def __len__(self) -> int:
        return self.vocab_size

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and nanoseek_tokenizer.json."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / "tokenizer.json"))
        specials = [s for _, s in SPECIAL_TOKENS]
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[0][1],
            "eos_token": SPECIAL_TOKENS[1][1],
            "pad_token": SPECIAL_TOKENS[2][1],
            "unk_token": None,
            "additional_special_tokens": specials[3:],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        meta = dict(self.meta)
        meta.setdefault("format", "nanoseek-tokenizer")
        meta["special_tokens"] = {s: i for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])}
        meta["fim_layouts"] = FIM_LAYOUTS
        tmp = d / (_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, d / _META)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer directory (tokenizer.json [+ tokenizer_config.json, nanoseek_tokenizer.json])."""
    from tokenizers import Tokenizer as HFTokenizer

    d = Path(path)
    f = d / "tokenizer.json" if d.is_dir() else d
    if not f.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}; train one with `nanoseek tokenizer train`")
    meta_path = f.parent / _META
    # (a model directory is data from whoever wrote it: a bad file is a ValueError naming it)
    meta = read_json(meta_path) if meta_path.is_file() else {}
    return Tokenizer(HFTokenizer.from_file(str(f)), meta)


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """Hash of tokenizer.json: shards record it so they are never read with another tokenizer."""
    d = Path(path)
    f = d / "tokenizer.json" if d.is_dir() else d
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Training

def new_bpe(pretokenizer: str = "code"):
    """An untrained byte-level BPE `tokenizers.Tokenizer` with the chosen pre-tokenizer."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE())
    if pretokenizer == "code":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CODE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pretokenizer == "plain":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"unknown pretokenizer {pretokenizer!r} (expected 'code' or 'plain')")
    tok.decoder = decoders.ByteLevel()
    return tok


def _sampled_texts(corpus_dir, split: str, max_bytes: int | None):
    """Documents of a split, sampled by content hash down to ~max_bytes (deterministic)."""
    from nanoseek.data.build import iter_documents, load_manifest

    total = load_manifest(corpus_dir)["split"][split]["bytes"]
    threshold = None if not max_bytes or total <= max_bytes else int(max_bytes / total * 2**64)
    for rec in iter_documents(corpus_dir, split):
        if threshold is None or int(rec["id"][:16], 16) < threshold:
            yield rec["content"]


def train_tokenizer(corpus_dir: str | os.PathLike, vocab_size: int, out_dir: str | os.PathLike, *,
                    pretokenizer: str = "code", max_train_mb: float | None = 100.0, min_frequency: int = 2,
                    eval_mb: float | None = 20.0, force: bool = False, progress: bool = True) -> dict:
    """Train a byte-level BPE on the corpus' train split; save it to out_dir; return its metadata.

    Reuses out_dir if it already holds a tokenizer trained with the same settings on the same
    corpus (same contents: `build.corpus_id`); one trained on another corpus, or on an earlier
    build of this one, is refused unless force. Reports bytes per token on (up to eval_mb of) the
    val split.
    """
    from tokenizers import trainers, pre_tokenizers

    from nanoseek.data.build import corpus_id, load_manifest

    if vocab_size < NUM_SPECIAL + 256 + 1:
        raise ValueError(f"vocab_size must be > {NUM_SPECIAL + 256} (specials + 256 byte tokens)")
    manifest = load_manifest(corpus_dir)
    # "corpus" is the digest of the corpus' contents: a rebuild over changed sources is another corpus
    settings = {"corpus": corpus_id(manifest), "vocab_size": vocab_size, "pretokenizer": pretokenizer,
                "max_train_mb": max_train_mb, "min_frequency": min_frequency}
    out = Path(out_dir)
    meta_path = out / _META
    if meta_path.is_file() and (out / "tokenizer.json").is_file() and not force:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old.get("settings") == settings:
            if progress:
                print(f"tokenizer in {out} is already trained with these settings; reusing it", file=sys.stderr)
            return old
        if {**(old.get("settings") or {}), "corpus": settings["corpus"]} == settings:
            raise FileExistsError(f"{out} holds a tokenizer trained on another corpus (or an earlier build of this "
                                  f"one, from other sources); pass --force to retrain it")
        raise FileExistsError(f"{out} holds a tokenizer trained with other settings; pass --force to retrain")
    t0 = time.perf_counter()
    tok = new_bpe(pretokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
        special_tokens=[s for _, s in SPECIAL_TOKENS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stats = {"docs": 0, "bytes": 0}

    def texts():
        for t in _sampled_texts(corpus_dir, "train", int(max_train_mb * 1e6) if max_train_mb else None):
            stats["docs"] += 1
            stats["bytes"] += len(t.encode("utf-8"))
            yield t

    tok.train_from_iterator(texts(), trainer)
    train_s = time.perf_counter() - t0
    if tok.get_vocab_size() < vocab_size:
        print(f"note: the corpus only supports {tok.get_vocab_size()} tokens (asked for {vocab_size})", file=sys.stderr)
    wrapped = Tokenizer(tok)
    meta = {
        "format": "nanoseek-tokenizer",
        "settings": settings,
        "pretokenizer": pretokenizer,
        "pattern": CODE_PATTERN if pretokenizer == "code" else GPT2_PATTERN,
        "vocab_size": wrapped.vocab_size,
        "trained_on": {"docs": stats["docs"], "bytes": stats["bytes"], "seconds": round(train_s, 1)},
    }
    if manifest["split"]["val"]["files"]:
        meta["val"] = evaluate(wrapped, corpus_dir, "val", eval_mb)
    wrapped.meta = meta
    out.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
        meta_path.unlink()  # the metadata file is the done-marker: remove it before rewriting
    wrapped.save(out)
    return json.loads(meta_path.read_text(encoding="utf-8"))


def evaluate(tok: Tokenizer, corpus_dir, split: str = "val", max_mb: float | None = 20.0) -> dict:
    """Bytes per token of `tok` on (a content-hash sample of) a corpus split."""
    nbytes = ntok = docs = 0
    t0 = time.perf_counter()
    for text in _sampled_texts(corpus_dir, split, int(max_mb * 1e6) if max_mb else None):
        nbytes += len(text.encode("utf-8"))
        ntok += len(tok.encode(text))
        docs += 1
    dt = time.perf_counter() - t0
    return {"split": split, "docs": docs, "bytes": nbytes, "tokens": ntok,
            "bytes_per_token": round(nbytes / max(ntok, 1), 4), "encode_mb_per_s": round(nbytes / 1e6 / max(dt, 1e-9), 2)}
