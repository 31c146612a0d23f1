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
