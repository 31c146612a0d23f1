"""`nanoseek generate` / `nanoseek chat` in-process on a saved tiny model + tokenizer."""

from __future__ import annotations

import pytest

from nanoseek import chat_format
from nanoseek.cli import main
from nanoseek.engine import fill_in_middle, generate_full
from tests.engine.fixtures import save_model_dir


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "model"
    model, tok = save_model_dir(d)
    return d, model, tok


def test_generate_prompt_and_fim(saved, capsys):
    d, model, tok = saved
    prompt = "def add(a, b):\n"
    assert main(["generate", "--model", str(d), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    want = generate_full(model, [tok.bos_id] + tok.encode(prompt), 8, tokenizer=tok)[0].text
    out = capsys.readouterr()
    assert out.out == prompt + want + "\n"
    assert "tok/s" in out.err
    assert main(["generate", "--model", str(d), "--fim-prefix", "x = ", "--fim-suffix", "\n",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == fill_in_middle(model, tok, "x = ", "\n", max_new_tokens=6) + "\n"


def test_generate_speculative(saved, capsys):
    d, model, tok = saved
    prompt = "class Stack:\n"
    assert main(["generate", "--model", str(d), "--prompt", prompt, "--max-new-tokens", "10",
                 "--speculative", "2"]) == 0
    out = capsys.readouterr()
    assert out.out == prompt + generate_full(model, [tok.bos_id] + tok.encode(prompt), 10, tokenizer=tok)[0].text + "\n"
    assert "drafts accepted" in out.err and "tokens per verification call" in out.err


def test_generate_errors(saved, tmp_path, capsys):
    assert main(["generate", "--model", str(saved[0])]) == 2
    capsys.readouterr()
    # a user error is one line and exit 2 (nanoseek.cli's one error path), not a traceback
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and len(err.strip().splitlines()) == 1


def test_generate_refuses_a_cache_beyond_the_free_memory(saved, monkeypatch, capsys):
    """An absurd --max-new-tokens: one line and exit 2 before anything is allocated (not the
    kernel's OOM killer), and before the prompt is echoed."""
    from nanoseek.model import cache as cache_module

    monkeypatch.setattr(cache_module, "available_memory", lambda device: 1 << 30)
    with pytest.warns(UserWarning, match="past the model's max_position_embeddings"):
        assert main(["generate", "--model", str(saved[0]), "--prompt", "x = ", "--max-new-tokens", "100000000"]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # nothing written: the error comes before the echoed prompt
    assert len(out.err.strip().splitlines()) == 1
    assert "100,000,00" in out.err and "GiB, more than the 1.0 GiB" in out.err and "built for 512 positions" in out.err


def test_chat_session(saved, monkeypatch, capsys):
    d, model, tok = saved
    lines = iter(["/think", "hello", "there", "", "/think", "/reset", "bye", "", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(d), "--max-new-tokens", "5"]) == 0
    cap = capsys.readouterr()
    assert "[thinking mode on]" in cap.err and "[thinking mode off]" in cap.err
    assert "[conversation cleared]" in cap.err
    # turn 1: multi-line message in thinking mode; turn 2: after /reset, a fresh chat-mode prompt
    first = generate_full(model, tok.encode(chat_format.encode_messages(
        [{"role": "user", "content": "hello\nthere"}], thinking_mode="thinking"), allow_special=True), 5,
        tokenizer=tok)[0].text
    second = generate_full(model, tok.encode(chat_format.encode_messages(
        [{"role": "user", "content": "bye"}]), allow_special=True), 5, tokenizer=tok)[0].text
    assert cap.out == "assistant> " + first.replace("</think>", "\n--- answer ---\n") + "\n" \
        + "assistant> " + second + "\n"


def test_generate_warns_past_the_models_positions(saved, capsys):
    """tiny is built for 512 positions: a call that can run past them warns (the CLI prints
    nanoseek's warnings as one "nanoseek: warning:" line); one that cannot does not."""
    import os
    import warnings

    from nanoseek.cli import _format_warning

    d = str(saved[0])
    with pytest.warns(UserWarning, match="can reach position 60.*max_position_embeddings=512"):
        assert main(["generate", "--model", d, "--prompt", "x = ", "--max-new-tokens", "600"]) == 0
    assert capsys.readouterr().out.startswith("x = ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["generate", "--model", d, "--prompt", "x = ", "--max-new-tokens", "4"]) == 0
    ours = os.path.join(os.sep, "x", "nanoseek", "engine", "cli.py")
    assert _format_warning("past it", UserWarning, ours, 7) == "nanoseek: warning: past it\n"
    assert "theirs.py:7: UserWarning: past it" in _format_warning("past it", UserWarning, "/x/theirs.py", 7)
