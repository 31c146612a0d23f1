"""One spelling per idea across subcommands: every alias parses to the canonical flag's dest, the
training loop's flags are generated from TrainConfig, and `--help` shows defaults."""

from __future__ import annotations

import dataclasses

import pytest

from nanoseek.cli import build_parser, main

# (command line prefix, canonical spelling, old spelling, value or None for a switch)
ALIASES = [
    ("train --out o --shards s", "--max-steps", "--steps", "5"),
    ("train --out o --shards s", "--seq-len", "--max-seq-len", "64"),
    ("train --out o --shards s", "--no-progress", "--quiet", None),
    ("sft m --data d --out o", "--no-progress", "--quiet", None),
    ("rl m --tasks t --out o", "--max-steps", "--steps", "5"),
    ("distill m --teacher t --prompts p --out o", "--student", "--model", "m2"),
    ("speedrun", "--max-tasks", "--tasks", "7"),
    ("speedrun", "--corpus-mb", "--max-mb", "3"),
    ("generate --model m", "--max-new-tokens", "--max-new-tokens", "3"),
    ("serve m", "--max-num-seqs", "--max-batch", "3"),
    ("serve m", "--max-model-len", "--max-len", "512"),
    ("serve m", "--served-model-name", "--model-name", "coder"),
    ("eval humaneval", "--seed", "--gen-seed", "3"),
    ("eval humaneval", "--max-num-seqs", "--batch-size", "3"),
    ("eval humaneval-fim", "--seed", "--gen-seed", "3"),
    ("eval humaneval-fim", "--no-progress", "--quiet", None),
    ("eval insecure-code", "--max-num-seqs", "--batch-size", "3"),
    ("eval bpb --model m --shards s", "--micro-batch", "--batch-size", "3"),
    ("eval bpb --model m --shards s", "--no-progress", "--quiet", None),
    ("data build --out o", "--no-progress", "--quiet", None),
    ("data tokenize --corpus c --tokenizer t --out o", "--no-progress", "--quiet", None),
    ("data tasks --out o", "--no-progress", "--quiet", None),
    ("tokenizer train --corpus c --out o", "--no-progress", "--quiet", None),
    ("info tiny", "--max-model-len", "--context", "1024"),
]


def _parse(line: str):
    ns = vars(build_parser().parse_args(line.split()))
    ns.pop("func", None)                         # a fresh lambda per parser
    return ns


@pytest.mark.parametrize("prefix,canonical,alias,value", ALIASES)
def test_alias_parses_like_the_canonical_flag(prefix, canonical, alias, value):
    tail = [] if value is None else [value]
    a = _parse(" ".join([prefix, canonical, *tail]))
    b = _parse(" ".join([prefix, alias, *tail]))
    base = _parse(prefix)
    assert a == b
    assert a != base, f"{canonical} changed nothing"


def test_data_build_max_bytes_is_max_kb_in_bytes():
    a = _parse("data build --out o --max-bytes 2048")
    b = _parse("data build --out o --max-kb 2")
    assert a["max_kb"] == b["max_kb"] == 2
    assert _parse("data build --out o")["max_kb"] == 1024


def test_every_train_config_field_has_a_flag():
    from nanoseek.train import cli as tcli
    from nanoseek.train.trainer import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    mirrored = set(tcli._LOOP_FLAGS) | set(tcli._TRAIN_FLAGS)
    assert mirrored <= names                     # no flag for a field that no longer exists
    assert names - mirrored == set(tcli.NOT_FLAGS)
    dests = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for name, spec in {**tcli._LOOP_FLAGS, **tcli._TRAIN_FLAGS}.items():
        assert spec.get("dest", name) in dests, name


def test_loop_flags_keep_trainconfig_defaults_unless_given():
    from nanoseek.train.cli import config_from_args
    from nanoseek.train.trainer import TrainConfig

    cfg = config_from_args(build_parser().parse_args("train --out o --shards s".split()))
    assert cfg == TrainConfig(run_dir="o", shard_dir="s")
    cfg = config_from_args(build_parser().parse_args(
        "train --out o --shards s --steps 3 --quiet --compile --prompt x --final-lr-frac 0.05".split()))
    assert (cfg.max_steps, cfg.progress, cfg.compile, cfg.sample_prompts, cfg.final_lr_frac) == (
        3, False, "inductor", ["x"], 0.05)


@pytest.mark.parametrize("cmd,expected", [
    (["train"], ["(default: 0.1)", "(default: 256)", "(default: from the model's width)", "(default: cosine)"]),
    (["sft"], ["(default: from the sft recipe and the model)"]),
    (["rl"], ["(default: 0.28)", "(default: mask)", "(default: from the rl recipe and the model)"]),
    (["distill"], ["--prompts-per-step PROMPTS_PER_STEP over all ranks (default: 8)"]),
    (["serve"], ["(default: 8000)", "(default: 8)"]),
    (["generate"], ["(default: 128)"]),
    (["eval", "humaneval"], ["(default: 1,10,100)", "(default: 8)"]),
    (["data", "build"], ["(default: 32)"]),
])
def test_help_shows_defaults(cmd, expected, capsys):
    with pytest.raises(SystemExit):
        main([*cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for e in expected:
        assert e in out, (cmd, e)


def test_rl_flags_are_generated_from_rlconfig():
    from nanoseek.train import cli as tcli
    from nanoseek.train.rl import RLConfig

    names = {f.name for f in dataclasses.fields(RLConfig)}
    assert names - set(tcli._RL_FLAGS) == set(tcli.RL_NOT_FLAGS)
    args = build_parser().parse_args("rl m --tasks t.jsonl --out o".split())
    assert tcli.config_from_flags(RLConfig, args, tcli._RL_FLAGS) == RLConfig(tasks="t.jsonl")
    args = build_parser().parse_args("rl m --tasks t --out o --group-size 4 --scale-by-std --overlong none "
                                     "--tis-cap 3 --reward-workers 2 --mtp-weight 0.5".split())
    rl = tcli.config_from_flags(RLConfig, args, tcli._RL_FLAGS)
    assert (rl.group_size, rl.scale_by_std, rl.overlong, rl.tis_cap, rl.reward_workers, rl.mtp_weight) == (
        4, True, "none", 3.0, 2, 0.0)
    assert tcli._loop_overrides(args)["mtp_weight"] == 0.5     # the loop's flag, as before


def _config_tables():
    from nanoseek.train import cli as tcli
    from nanoseek.train.distill import DistillConfig
    from nanoseek.train.rl import RLConfig
    from nanoseek.train.sft import SFTConfig

    # (subcommand, its required arguments, dataclass, flag table, fields with no flag on purpose)
    return [("sft", "m --data d --out o", SFTConfig, tcli._SFT_FLAGS, frozenset()),
            ("distill", "m --teacher t --prompts p --out o", DistillConfig, tcli._DISTILL_FLAGS, frozenset()),
            ("rl", "m --tasks t --out o", RLConfig, tcli._RL_FLAGS, tcli.RL_NOT_FLAGS)]


def _subparser(cmd: str):
    return build_parser()._subparsers._group_actions[0].choices[cmd]


@pytest.mark.parametrize("i", range(3))
def test_every_config_field_has_a_flag_whose_help_shows_its_default(i):
    import argparse

    cmd, _, cls, table, not_flags = _config_tables()[i]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(table) <= set(fields) and set(fields) - set(table) == set(not_flags)
    actions = {a.dest: a for a in _subparser(cmd)._actions}
    fmt = argparse.HelpFormatter(cmd)
    for name, spec in table.items():
        act = actions[spec.get("dest", name)]
        f = fields[name]
        d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert act.default == d, name
        if act.required:
            continue
        if d is None:
            shown = spec.get("none", "none")       # what None means, in words
        else:
            shown = ("on" if d else "off") if isinstance(d, bool) else d
        assert fmt._expand_help(act).endswith(f"(default: {shown})"), (name, act.help)


def test_existing_sft_and_distill_flag_names_still_parse():
    sft = {s for a in _subparser("sft")._actions for s in a.option_strings}
    assert {"--model", "--data", "--out", "--thinking-ratio", "--val-fraction", "--epochs"} <= sft
    distill = {s for a in _subparser("distill")._actions for s in a.option_strings}
    assert {"--student", "--model", "--teacher", "--weights", "--prompts", "--held-out", "--out",
            "--samples-per-prompt", "--prompts-per-step", "--micro-steps", "--max-new-tokens", "--temperature",
            "--estimator", "--kl-form", "--teacher-dtype", "--eval-prompts"} <= distill


def test_sft_and_distill_namespaces_build_their_configs():
    from nanoseek.train import cli as tcli
    from nanoseek.train.distill import DistillConfig
    from nanoseek.train.sft import SFTConfig

    for cmd, required, cls, table, _ in _config_tables():
        args = build_parser().parse_args(f"{cmd} {required}".split())
        base = {"sft": dict(data=["d"]), "distill": dict(teachers=["t"], prompts="p"), "rl": dict(tasks="t")}[cmd]
        assert tcli.config_from_flags(cls, args, table) == cls(**base), cmd
    args = build_parser().parse_args("sft m --out o --data a.jsonl:2 --data b.jsonl --thinking-ratio 0.5 "
                                     "--val-fraction 0 --max-val 3 --min-val-pool 0 --epochs 2".split())
    assert tcli.config_from_flags(SFTConfig, args, tcli._SFT_FLAGS) == SFTConfig(
        data=["a.jsonl:2", "b.jsonl"], thinking_ratio=0.5, val_fraction=0.0, max_val=3, min_val_pool=0, epochs=2.0)
    args = build_parser().parse_args(
        "distill --student s --out o --teacher a --teacher b --weights 0.7,0.3 --prompts p --held-out h "
        "--samples-per-prompt 2 --prompts-per-step 4 --micro-steps 2 --max-new-tokens 9 --temperature 0.5 "
        "--estimator sampled --kl-form sum --teacher-dtype bf16 --eval-prompts 3 --lr 0.01".split())
    assert tcli.config_from_flags(DistillConfig, args, tcli._DISTILL_FLAGS) == DistillConfig(
        prompts="p", held_out="h", teachers=["a", "b"], weights=[0.7, 0.3], samples_per_prompt=2,
        prompts_per_step=4, micro_steps=2, max_new_tokens=9, temperature=0.5, estimator="sampled", kl_form="sum",
        teacher_dtype="bf16", eval_prompts=3)
    assert tcli._loop_overrides(args) == {"lr": 0.01}            # the loop's flags stay TrainConfig's
    with pytest.raises(SystemExit):
        build_parser().parse_args("distill s --out o --teacher a --prompts p --weights 0.7,x".split())


def test_sft_command_gets_one_epoch_only_without_another_horizon(tmp_path, monkeypatch):
    from nanoseek.config import ModelConfig
    from nanoseek.train import trainer

    ModelConfig.from_preset("tiny").save_json(tmp_path / "config.json")
    seen = []
    monkeypatch.setattr(trainer, "train", lambda cfg, objective: seen.append((cfg, objective.cfg)) or {})
    assert main(["sft", str(tmp_path), "--data", "d.jsonl", "--out", str(tmp_path / "o"), "--max-val", "9"]) == 0
    assert main(["sft", "--model", str(tmp_path), "--data", "d.jsonl", "--out", str(tmp_path / "o"),
                 "--max-steps", "5"]) == 0
    (c1, s1), (c2, s2) = seen
    assert (s1.epochs, s1.max_val, c1.max_steps) == (1.0, 9, None)
    assert (s2.epochs, s2.max_val, c2.max_steps) == (None, 256, 5)


# (command line, the out-of-range flag and value): argparse refuses each with one usage line that
# names the flag, before the command runs (before, --limit -1 scored all but the last problem,
# --max-mb -1 built an empty corpus, --port 99999 was a traceback)
OUT_OF_RANGE = [
    ("data build --out o", "--max-mb", "-1"),
    ("data build --out o", "--val-fraction", "2"),
    ("data build --out o", "--workers", "0"),
    ("data tokenize --corpus c --tokenizer t --out o", "--chunk-mb", "0"),
    ("data tasks --out o", "--held-out-fraction", "1"),
    ("tokenizer train --corpus c --out o", "--min-frequency", "0"),
    ("generate --model m --prompt x", "--threads", "0"),
    ("generate --model m --prompt x", "--chunk-size", "0"),
    ("serve m", "--port", "99999"),
    ("serve m", "--max-num-seqs", "0"),
    ("serve m", "--shutdown-timeout", "nan"),
    ("eval humaneval", "--limit", "-1"),
    ("eval humaneval", "--timeout", "0"),
    ("eval bpb --model m --shards s", "--seq-len", "0"),
    ("speedrun", "--minutes", "0"),
    ("info tiny", "--max-model-len", "0"),
]


@pytest.mark.parametrize("prefix,flag,value", OUT_OF_RANGE)
def test_out_of_range_numbers_are_usage_errors(prefix, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*prefix.split(), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and "must be" in err and f"got {value}" in err, err
    assert "Traceback" not in err


def test_range_types():
    import argparse

    from nanoseek._argparse import int_at_least, number_in

    assert int_at_least(1)("3") == 3 and int_at_least(0, 5)("5") == 5 and number_in(0, 1)("1") == 1.0
    assert number_in(0, open_lo=True)("1e-9") == 1e-9
    for parse, text, says in ((int_at_least(1), "0", "an integer >= 1"), (int_at_least(0, 5), "6", "<= 5"),
                              (int_at_least(1), "1.5", "not an integer"), (number_in(0, 1, open_hi=True), "1", "< 1"),
                              (number_in(0, open_lo=True), "0", "> 0"), (number_in(0), "inf", "finite"),
                              (number_in(0), "nan", "finite"), (number_in(0), "x", "not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse(text)
