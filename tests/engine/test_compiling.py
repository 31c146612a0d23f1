"""The engine's default decode compilation (engine/compiling.py): when "auto" compiles, that it
compiles the decode step only, where inductor's cache goes, and that a failing compiler falls
back to eager with a warning and the same tokens.

(The suite runs with NANOSEEK_COMPILE=0, tests/conftest.py, so other tests decode eagerly; the
compiled numbers themselves are tests/model/test_compile.py's subject.)
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import compiling
from nanoseek.engine.generate import generate
from nanoseek.model.transformer import _call_block, compile_failure


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", hc_sinkhorn_iters=3)).eval()


def test_resolve_compile(monkeypatch):
    assert compiling.resolve_compile(True) is True and compiling.resolve_compile(False) is False
    monkeypatch.setenv("NANOSEEK_COMPILE", "off")
    assert compiling.resolve_compile(None) is False
    monkeypatch.delenv("NANOSEEK_COMPILE")
    monkeypatch.setattr(compiling, "has_cxx_compiler", lambda: False)
    assert compiling.resolve_compile(None) is False            # CPU without a C++ compiler: eager
    assert compiling.resolve_compile(None, "cuda") is True
    monkeypatch.setattr(compiling, "has_cxx_compiler", lambda: True)
    assert compiling.resolve_compile(None) is True


def test_auto_compiles_decode_only_with_a_persistent_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOSEEK_COMPILE", raising=False)
    # torch's own default (which importing dynamo writes into the environment) counts as unset
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))
    monkeypatch.setattr(compiling, "has_cxx_compiler", lambda: True)
    model = _tiny()
    assert compiling.compile_for_decoding(model, None) is True
    assert model.blocks_compiled
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # a user's choice wins
    compiling.use_persistent_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    # uncached calls (training, scoring) stay eager; one-token cached steps take the compiled path
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert model._block_runner(model._context(ids, None)) is _call_block
    assert not model._runs_compiled_step(model._context(ids, None))
    cache = model.new_cache(1, 16)
    assert not model._runs_compiled_step(model._context(ids, cache))  # a prefill chunk
    assert model._runs_compiled_step(model._context(ids[:, :1], cache))
    # an explicit False never compiles; an already compiled model is left as it is
    assert compiling.compile_for_decoding(_tiny(), False) is False
    assert compiling.compile_for_decoding(model, False) is True
    # an explicit True compiles the decode step only, too: the model still trains eagerly
    forced = _tiny()
    assert compiling.compile_for_decoding(forced, True) is True
    assert forced.blocks_compiled
    assert forced._block_runner(forced._context(ids, None)) is _call_block
    assert not forced._runs_compiled_step(forced._context(ids, None))
    assert forced._runs_compiled_step(forced._context(ids[:, :1], forced.new_cache(1, 16)))


def test_failing_compiler_falls_back_to_eager():
    model = _tiny(1)
    prompt = torch.randint(0, model.config.vocab_size, (12,)).tolist()
    expected = generate(model, prompt, 6, compile=False)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model.compile_blocks(backend=broken_backend, decode_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = generate(model, prompt, 6)
    assert got == expected
    fallback = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "running eagerly" in str(w.message)]
    assert fallback
    # the warning says why: the backend's own error, not just dynamo's wrapper naming the backend
    assert "RuntimeError: no C++ compiler here" in fallback[0], fallback[0]
    assert not model.blocks_compiled


def test_compile_failure_names_the_compiler_error():
    """A C++ compile error inside inductor reaches us wrapped by dynamo; the one-line reason is the
    compiler's first `error:` line, not the wrapper's "backend='inductor' raised:"."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError

    output = ("/root/.cache/nanoseek/inductor/mv/cmv6.main.cpp: In function 'void kernel_0()':\n"
              "/root/.cache/nanoseek/inductor/mv/cmv6.main.cpp:4970:46: error: 'at::vec' has not been declared\n"
              " 4970 |     auto tmp32 = at::vec::Vectorized<float>::loadu(out_ptr47);\n")

    def inductor(gm, example_inputs):
        return gm

    wrapped = BackendCompilerFailed(inductor, CppCompileError(["g++", "cmv6.main.cpp"], output), None)
    assert str(wrapped).splitlines()[0] == "backend='inductor' raised:"  # what the warning used to show
    assert compile_failure(wrapped) == "BackendCompilerFailed <- CppCompileError: error: 'at::vec' has not been declared"
    assert compile_failure(RuntimeError("boom\nsecond line")) == "RuntimeError: boom"
    chained = ValueError("outer")
    chained.__cause__ = KeyError("the cause")
    assert compile_failure(chained) == "ValueError <- KeyError: 'the cause'"


def test_a_later_group_failing_to_compile_finishes_the_step_eagerly():
    """The first decode graph compiles, the second (tiny's last group) does not: after one
    compiled group the step finishes eagerly, the model is uncompiled, the tokens are eager's.
    (A failure in the first group, with groups after it: test_failing_compiler_falls_back_to_eager.)"""
    model = _tiny(1)  # tiny: 4 blocks -> 2 decode graphs
    prompt = torch.randint(0, model.config.vocab_size, (12,)).tolist()
    expected = generate(model, prompt, 6, compile=False)
    seen = []

    def second_fails(gm, example_inputs):
        seen.append(gm)
        if len(seen) == 2:
            raise RuntimeError("no C++ compiler for this one")
        return gm.forward

    model.compile_blocks(backend=second_fails, decode_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = generate(model, prompt, 6)
    assert got == expected and len(seen) == 2
    assert any(issubclass(w.category, RuntimeWarning) and "running eagerly" in str(w.message) for w in caught)
    assert not model.blocks_compiled


def test_compiled_decode_only_matches_eager():
    """decode_only with dynamo tracing (backend="eager": no code generation, fast): same tokens."""
    model = _tiny(2)
    prompt = torch.randint(0, model.config.vocab_size, (10,)).tolist()
    expected = generate(model, prompt, 6, compile=False)
    model.compile_blocks(backend="eager", decode_only=True)
    assert generate(model, prompt, 6) == expected
    assert model.blocks_compiled


def test_decode_capacity_buckets_only_compiled_models():
    model = _tiny()
    assert [compiling.decode_capacity(model, n) for n in (1, 77, 5000)] == [1, 77, 5000]  # eager: just enough
    model.compile_blocks(backend="eager", decode_only=True)
    need = [1, 576, 1024, 1025, 3000, 8192, 8193, 20000]
    assert [compiling.decode_capacity(model, n) for n in need] == [1024, 1024, 1024, 2048, 4096, 8192, 16384, 24576]
    with pytest.raises(ValueError):
        compiling.decode_capacity(model, 0)


def test_compiled_generate_reuses_its_graphs_across_lengths():
    """Calls of different prompt + new-token lengths in one bucket run the graphs the first call
    compiled (with caches sized to each call, every new length was a new graph: ~50 s of inductor
    in a fresh process); tokens equal eager's, and the cache is the bucket's size."""
    from torch._dynamo.utils import counters

    from nanoseek.engine.generate import generate_full

    model = _tiny(3)
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (7, 40, 23)]
    expected = [generate(model, p, n, compile=False, stop_on_eos=False) for p, n in zip(prompts, (5, 9, 30))]
    model.compile_blocks(backend="eager", decode_only=True)
    counters.clear()
    got = []
    for i, (p, n) in enumerate(zip(prompts, (5, 9, 30))):
        res = generate_full(model, p, n, stop_on_eos=False)[0]
        got.append(res.tokens)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0
            cache = model.new_cache(1, compiling.DECODE_MIN_CAPACITY)
            assert res.cache_bytes == 2 * cache.nbytes()  # the batch cache and the prefill scratch
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation for the other lengths
    assert got == expected


@pytest.mark.parametrize("flag, expected", [(None, []), ("--enforce-eager", []), ("--compile", [True])])
def test_cli_compile_flags(tmp_path, monkeypatch, flag, expected):
    """`nanoseek generate` (one short generation): auto stays eager, --enforce-eager never compiles
    (also not through generate_stream's own default), --compile compiles the decode step
    unconditionally (decode_only=True: the uncached calls stay eager)."""
    from nanoseek.cli import main
    from tests.engine.fixtures import save_model_dir

    save_model_dir(tmp_path / "m")
    monkeypatch.delenv("NANOSEEK_COMPILE", raising=False)
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compiling, "has_cxx_compiler", lambda: True)
    calls, real = [], Transformer.compile_blocks

    def record(self, decode_only=False, **kw):  # dynamo tracing only: no code generation
        calls.append(decode_only)
        return real(self, backend="eager", decode_only=decode_only)

    monkeypatch.setattr(Transformer, "compile_blocks", record)
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "def f", "--max-new-tokens", "2"]
    assert main(args + ([flag] if flag else [])) == 0
    assert calls == expected


def test_chat_compiles_the_decode_step_while_the_first_message_is_typed(tmp_path, monkeypatch, capsys):
    """`nanoseek chat` with a compiled model warms its decode step in a background thread
    started before the first prompt, in the bucket of a short prompt + --max-new-tokens, and
    joins it before the first turn; the answers are eager's. Eager: no thread."""
    import importlib
    import threading

    from nanoseek import chat_format
    from nanoseek.cli import main
    from nanoseek.engine.generate import generate_full
    from nanoseek.engine.loading import load_model_and_tokenizer
    from tests.engine.fixtures import save_model_dir

    gen_mod = importlib.import_module("nanoseek.engine.generate")  # (the package's `generate` is the function)
    save_model_dir(tmp_path / "m")
    monkeypatch.delenv("NANOSEEK_COMPILE", raising=False)
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compiling, "has_cxx_compiler", lambda: True)
    real_compile, real_warm = Transformer.compile_blocks, gen_mod.warm_up_decode
    monkeypatch.setattr(Transformer, "compile_blocks",
                        lambda self, decode_only=False, **kw: real_compile(self, backend="eager", decode_only=decode_only))
    warmed = []

    def warm(model, need):
        warmed.append((threading.current_thread().name, need, model.blocks_compiled))
        real_warm(model, need)
        warmed.append("done")

    monkeypatch.setattr(gen_mod, "warm_up_decode", warm)
    turns = []

    def typed(prompt=""):  # the warm-up is under way (or done) when the first message is read
        turns.append(any(t.name == "nanoseek-warm-up" for t in threading.enumerate()) or "done" in warmed)
        return ["hello", "", "/exit"][len(turns) - 1]

    monkeypatch.setattr("builtins.input", typed)
    assert main(["chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "5"]) == 0
    assert turns[0] and warmed[0] == ("nanoseek-warm-up", 64 + 5, True) and warmed[-1] == "done"
    model, tok = load_model_and_tokenizer(str(tmp_path / "m"), compile=False)
    ids = tok.encode(chat_format.encode_messages([{"role": "user", "content": "hello"}]), allow_special=True)
    assert capsys.readouterr().out == "assistant> " + generate_full(model, ids, 5, tokenizer=tok)[0].text + "\n"
    warmed.clear()
    turns.clear()
    assert main(["chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "5", "--enforce-eager"]) == 0
    assert warmed == []


def test_one_shot_generate_compiles_only_long_outputs():
    from nanoseek.engine.cli import ONE_SHOT_COMPILE_MIN_TOKENS, one_shot_compile

    assert one_shot_compile(None, 64) is False
    assert one_shot_compile(None, ONE_SHOT_COMPILE_MIN_TOKENS) is None  # auto
    assert one_shot_compile(True, 8) is True and one_shot_compile(False, 4096) is False
