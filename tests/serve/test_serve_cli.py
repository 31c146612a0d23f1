"""`nanoseek serve` lives in nanoseek/serve/cli.py: the model as a positional argument (--model
still accepted) and vLLM's spellings as aliases."""

from __future__ import annotations

from nanoseek.cli import _COMMAND_MODULES, build_parser


def test_serve_is_owned_by_the_serve_package():
    assert "nanoseek.serve.cli" in _COMMAND_MODULES
    import nanoseek.engine.cli as engine_cli

    assert not hasattr(engine_cli, "cmd_serve")


def test_positional_model_and_vllm_aliases():
    a = build_parser().parse_args(["serve", "runs/ckpt", "--max-model-len", "64", "--max-num-seqs", "2",
                                   "--served-model-name", "coder", "--shutdown-timeout", "3"])
    assert (a.model_pos, a.max_len, a.max_batch, a.model_name, a.shutdown_timeout) == ("runs/ckpt", 64, 2, "coder", 3)
    b = build_parser().parse_args(["serve", "--model", "runs/ckpt", "--max-len", "32", "--max-batch", "3",
                                   "--model-name", "m"])
    assert (b.model, b.max_len, b.max_batch, b.model_name) == ("runs/ckpt", 32, 3, "m")


def test_serve_warms_a_compiled_decode_step_before_opening_its_port(capsys):
    """serve() compiles the decode graphs (Engine.warm_up) before uvicorn starts, and says so;
    an eager model starts at once, silently."""
    import torch

    from nanoseek.engine import Engine
    from nanoseek.serve.app import warm_up
    from tests.engine.fixtures import make_model

    eager = make_model(0)
    engine = Engine(eager, max_batch=2, max_len=32)
    warm_up(engine, eager)
    assert capsys.readouterr().out == "" and engine.runner.steps == 0
    torch._dynamo.reset()
    try:
        compiled = make_model(0).compile_blocks(backend="eager", decode_only=True)
        engine = Engine(compiled, max_batch=2, max_len=32)
        calls = []  # (what Engine.warm_up runs is tests/engine/test_engine.py's subject)
        engine.runner.warm_up = lambda: calls.append(1) or 4
        warm_up(engine, compiled)
        out = capsys.readouterr().out
        assert calls == [1] and "compiling the decode step" in out and "decode step ready in" in out
    finally:
        torch._dynamo.reset()
