"""Tokenizer: special ids, lossless round trips (property tests), fast path == `tokenizers`,
transformers compatibility, byte lengths for bits-per-byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nanoseek.data.tokenizer import CODE_PATTERN, SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from tests.data.fixture_corpus import read_corpus

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_special_tokens_have_stable_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.id_to_token(0) == "<｜begin▁of▁sentence｜>" and tok.id_to_token(1) == "<｜end▁of▁sentence｜>"
    for i, (name, s) in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i
        if not name.startswith("placeholder"):
            assert getattr(tok, f"{name}_id") == i
        assert tok.encode(s, allow_special=True) == [i]          # one id each
    names = {s for _, s in SPECIAL_TOKENS}
    for s in ("<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>", "<think>", "</think>", "｜DSML｜",
              "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", "<｜▁pad▁｜>", "<｜action｜>", "<｜query｜>",
              "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜extracted_url｜>", "<｜read_url｜>"):
        assert s in names
    assert tok.vocab_size == 600


def test_special_strings_in_documents_stay_text(tok):
    text = "s = '<｜end▁of▁sentence｜>'  # and <think>\n"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    ids = tok.encode("<｜User｜>hi<｜Assistant｜>", allow_special=True)
    assert ids[0] == tok.user_id and tok.assistant_id in ids
    assert tok.encode("x", add_bos=True, add_eos=True)[::len(tok.encode("x")) + 1] == [tok.bos_id, tok.eos_id]
    ids = [tok.bos_id, *tok.encode("def f(): pass"), tok.eos_id]
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜>def f(): pass<｜end▁of▁sentence｜>"
    assert tok.decode(ids, skip_special=True) == "def f(): pass"


@_SETTINGS
@given(text=st.text(max_size=300))
def test_roundtrip_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == tok.encode_reference(text)                   # tiktoken fast path == tokenizers


@_SETTINGS
@given(data=st.binary(max_size=300))
def test_roundtrip_bytes(tok, data):
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


@_SETTINGS
@given(text=st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b\x0c\u00a0\u2028\u3000abc_019()[]:'\"é😀中")), max_size=200))
def test_fast_path_matches_tokenizers_on_whitespace_heavy_text(tok, text):
    assert tok.encode(text) == tok.encode_reference(text)


def test_roundtrip_real_files(tok, corpus):
    docs = read_corpus(corpus[0])
    import nanoseek.data.build as build_mod

    extra = [Path(build_mod.__file__).read_text(encoding="utf-8"), Path(json.__file__).read_text(encoding="utf-8")]
    for text in [d["content"] for d in docs] + extra:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == tok.encode_reference(text)
        assert sum(tok.token_byte_lengths()[ids]) == len(text.encode("utf-8"))


def test_token_byte_lengths(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths.dtype.kind == "i"
    assert (lengths[: len(SPECIAL_TOKENS)] == 0).all()
    for i in range(len(SPECIAL_TOKENS), tok.vocab_size):
        assert lengths[i] == len(tok.decode_bytes([i])) > 0


def test_code_pretokenizer_groups_indentation_and_digits(tok):
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(CODE_PATTERN), behavior="isolated")
    pieces = [p for p, _ in split.pre_tokenize_str("if x:\n        y = 1234567.append(z_2)\n        w = y\n    return w\n")]
    assert ":\n" in pieces and "        " in pieces   # after punctuation: "):\n" then the indentation
    assert "\n    " in pieces                          # after a word: line break + indentation
    assert ["123", "456", "7"] == [p for p in pieces if p.isdigit()]
    assert ".append" in pieces and "(z_2" in pieces and " y" in pieces


def test_loads_in_transformers(tokenizer_dir, tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    text = "def add(a, b):\n    return a + b  # ünïcode 😀\n"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert hf.convert_tokens_to_ids("<｜fim▁hole｜>") == tok.fim_hole_id


def test_save_load_and_metadata(tmp_path, tok, tokenizer_dir):
    tok.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    text = "for i in range(10):\n\tprint(i)\n"
    assert again.encode(text) == tok.encode(text)
    meta = json.loads((Path(tokenizer_dir) / "nanoseek_tokenizer.json").read_text())
    assert meta["special_tokens"]["<｜begin▁of▁sentence｜>"] == 0
    assert meta["val"]["bytes_per_token"] > 1.0
    assert "{prefix}" in meta["fim_layouts"]["psm"]


def test_a_hostile_metadata_file_is_a_clear_error(tmp_path, tok):
    """nanoseek_tokenizer.json comes with a model directory someone else wrote: JSON nested past
    json's recursion limit was a RecursionError traceback; now a ValueError naming the file."""
    tok.save(tmp_path / "copy")
    (tmp_path / "copy" / "nanoseek_tokenizer.json").write_text('{"val": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(ValueError, match=r"nanoseek_tokenizer\.json: not valid JSON \(nested too deeply\)"):
        load_tokenizer(tmp_path / "copy")


def test_hf_fallback_when_tiktoken_disabled(monkeypatch, tokenizer_dir, tok):
    monkeypatch.setenv("NANOSEEK_NO_TIKTOKEN", "1")
    slow = load_tokenizer(tokenizer_dir)
    assert not slow.fast and tok.fast
    text = "x = {'k': [1, 2, 3]}\n" * 3 + "<think>"
    assert slow.encode(text) == tok.encode(text)
    assert slow.decode_bytes(slow.encode_bytes(b"\xff\xfeok")) == b"\xff\xfeok"


def test_training_is_reused_and_validates(tmp_path, corpus, tokenizer_dir):
    meta = train_tokenizer(corpus[0], 600, tokenizer_dir, progress=False)   # same settings: reused
    assert meta["vocab_size"] == 600
    with pytest.raises(FileExistsError):
        train_tokenizer(corpus[0], 700, tokenizer_dir, progress=False)
    with pytest.raises(ValueError):
        train_tokenizer(corpus[0], 100, tmp_path / "t", progress=False)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


def test_plain_baseline_trains(tmp_path, corpus):
    meta = train_tokenizer(corpus[0], 600, tmp_path / "plain", pretokenizer="plain", progress=False)
    tok = load_tokenizer(tmp_path / "plain")
    text = "class A:\n    pass\n"
    assert tok.decode(tok.encode(text)) == text and tok.encode(text) == tok.encode_reference(text)
    assert meta["pretokenizer"] == "plain" and meta["val"]["bytes_per_token"] > 1.0
    assert np.all(tok.token_byte_lengths()[:2] == 0)
