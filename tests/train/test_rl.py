"""`nanoseek rl` (nanoseek/train/rl.py): GRPO on the one loop with engine rollouts -- a toy
plug-in reward is learned, zero-variance groups are dropped and counted, the code reward runs
end to end, resume is exact and 2-process DDP equals one process."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.train.checkpoint import latest_checkpoint, load_model_state
from nanoseek.train.rl import RLConfig, RLObjective, rl_train_config
from nanoseek.train.rollouts import rollout_tensors, sample_rollouts
from nanoseek.train.trainer import train

from .conftest import assert_same_model, torchrun

NAMES = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "items", "result", "index"]
REWARD = ("def share_a(task, completion):\n    return completion.count('a') / max(1, len(completion))\n\n\n"
          # constant on odd-numbered prompts: their groups have zero variance and leave the loss
          "def share_a_even(task, completion):\n"
          "    if int(task['prompt'].split('(')[0].rsplit('_', 1)[1]) % 2:\n        return 1.0\n"
          "    return share_a(task, completion)\n")


@pytest.fixture(scope="module")
def setup(train_data, tmp_path_factory):
    """(random tiny model dir, prompts file with a .heldout twin, plug-in reward spec)."""
    from nanoseek.train.export import write_model_dir

    root = tmp_path_factory.mktemp("rl")
    tok = load_tokenizer(train_data[1])
    torch.manual_seed(0)
    write_model_dir(Transformer(ModelConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size)), tok,
                    root / "base")
    rows = []
    for i in range(40):
        a, b, c = random.Random(i).sample(NAMES, 3)
        rows.append({"prompt": f"def {a}_{i}({b}, {c}):\n"})
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (root / "p.heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    (root / "reward.py").write_text(REWARD)
    return root / "base", root / "p.jsonl", f"{root / 'reward.py'}:share_a"


def rl_cfg(setup, out, **kw):
    base, prompts, reward = setup
    rl = RLConfig(tasks=str(prompts), reward=reward, protocol="completion", group_size=8, prompts_per_step=4,
                  max_new_tokens=16, overlong="none", eval_samples=4, **kw.pop("rl", {}))
    loop = dict(max_steps=4, lr=1e-2, eval_every=0, progress=False, tensorboard=False, peak_tflops=1.0)
    loop.update(kw)
    return rl_train_config(str(base), str(out), rl, **loop), rl


def records(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def heldout_reward(model_dir, prompts: list[str]) -> float:
    """Mean share of 'a' over 8 samples of each held-out prompt (fixed seeds)."""
    from nanoseek.engine.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    outs = sample_rollouts(model, tok, [tok.encode(p, add_bos=True) for p in prompts], n=8, max_new_tokens=16,
                           seed=123)
    return sum(r.text.count("a") / max(1, len(r.text)) for r in outs) / len(outs)


def test_rollout_tensors_align_targets_and_sampler_logprobs(setup):
    base, _, _ = setup
    from nanoseek.engine.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(base)
    outs = sample_rollouts(model, tok, [[tok.bos_id, 5, 6], [tok.bos_id, 7]], n=2, max_new_tokens=5, seed=1)
    assert [r.group for r in outs] == [0, 0, 1, 1] and all(len(r.tokens) == len(r.logprobs) for r in outs)
    b = rollout_tensors(outs, tok.pad_id)
    for i, r in enumerate(outs):
        p, c = len(r.prompt), len(r.tokens)
        assert b["labels"][i, p - 1:p - 1 + c].tolist() == r.tokens        # completion tokens are the targets
        assert (b["labels"][i, :p - 1] == -100).all() and (b["labels"][i, p - 1 + c:] == -100).all()
        assert b["token_mask"][i, :p + c].all() and not b["token_mask"][i, p + c:].any()   # the padding
        # the sampler's log-probs are the model's own (temperature 1, no filtering)
        with torch.no_grad():
            lp = torch.log_softmax(model(b["input_ids"][i:i + 1, :p - 1 + c]).float(), -1)[0]
        want = lp[torch.arange(p - 1, p - 1 + c), torch.tensor(r.tokens)]
        torch.testing.assert_close(b["sampler_logprobs"][i, p - 1:p - 1 + c], want, atol=2e-4, rtol=0)
    # same seed, same rollouts; another seed, others
    again = sample_rollouts(model, tok, [[tok.bos_id, 5, 6], [tok.bos_id, 7]], n=2, max_new_tokens=5, seed=1)
    assert [r.tokens for r in again] == [r.tokens for r in outs]


@pytest.mark.parametrize("sampling", [dict(temperature=0.5), dict(temperature=1.3, top_k=5), dict(top_p=0.5)])
def test_sampler_logprobs_are_of_the_distribution_sampled_from(setup, sampling):
    """With a temperature or a cut, the importance weight against the sampler needs the log-prob of
    the distribution each token was drawn from (log_softmax of the filtered logits / T), not the
    model's raw one (what the OpenAI API reports)."""
    from nanoseek.engine.loading import load_model_and_tokenizer
    from nanoseek.engine.sampling import filter_logits

    model, tok = load_model_and_tokenizer(setup[0])
    outs = sample_rollouts(model, tok, [[tok.bos_id, 5, 6]], n=3, max_new_tokens=6, seed=2, **sampling)
    b = rollout_tensors(outs, tok.pad_id)
    args = (sampling.get("temperature", 1.0), sampling.get("top_k", 0), sampling.get("top_p", 1.0))
    for i, r in enumerate(outs):
        p, c = len(r.prompt), len(r.tokens)
        with torch.no_grad():
            logits = model(b["input_ids"][i:i + 1, :p - 1 + c]).float()[0, p - 1:]
        want = [torch.log_softmax(filter_logits(row, *args), -1)[t] for row, t in zip(logits, r.tokens)]
        raw = [torch.log_softmax(row, -1)[t] for row, t in zip(logits, r.tokens)]
        torch.testing.assert_close(b["sampler_logprobs"][i, p - 1:p - 1 + c], torch.stack(want), atol=2e-4, rtol=0)
        assert max(abs(float(a - w)) for a, w in zip(raw, want)) > 1e-2   # (the raw ones would differ)


def test_rl_toy_reward_more_than_doubles_on_held_out_prompts(setup, tmp_path):
    base, prompts, _ = setup
    held = [json.loads(x)["prompt"] for x in (prompts.parent / "p.heldout.jsonl").read_text().splitlines()]
    cfg, rl = rl_cfg(setup, tmp_path / "run", max_steps=20, eval_every=10)
    s = train(cfg, RLObjective(rl))
    before, after = heldout_reward(base, held), heldout_reward(tmp_path / "run" / "model", held)
    assert after > 2 * before, (before, after)
    recs = records(tmp_path / "run")
    for k in ("reward", "reward_plugin", "entropy", "clip_fraction", "response_len", "zero_var_groups",
              "generation_s", "scoring_wait_s", "data_s", "pg_loss", "balance"):
        assert all(k in r for r in recs), k
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert [e["step"] for e in evals] == [10, 20] and evals[-1]["heldout_tasks"] == 8
    assert s["model_dir"] and (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    # the report shows the RL numbers and plots
    from nanoseek.train.report import write_report

    report = write_report(tmp_path / "run").read_text()
    assert "](rl.png)" in report and (tmp_path / "run" / "rl.png").read_bytes()[:4] == b"\x89PNG"
    assert "step time split: generation / scoring wait / update" in report
    assert f"reward {evals[-1]['heldout_reward']:.4g}" in report


def test_zero_variance_groups_are_dropped_and_counted(setup, tmp_path):
    base, prompts, _ = setup
    const = tmp_path / "const.py"
    const.write_text("def one(task, completion):\n    return 1.0\n")
    cfg, rl = rl_cfg(setup, tmp_path / "run", max_steps=2)
    rl.reward = f"{const}:one"
    obj = RLObjective(rl)
    s = train(cfg, obj)
    recs = records(tmp_path / "run")
    assert all(r["zero_var_groups"] == 1.0 and r["pg_loss"] == 0.0 for r in recs)
    assert s["zero_variance_groups"] == 2 * 4


class _Crash(RLObjective):
    def __call__(self, model, batch, phase):
        if phase["step"] == 3:
            raise RuntimeError("simulated crash")
        return super().__call__(model, batch, phase)


def test_rl_resume_is_bitwise_identical(setup, tmp_path):
    """A crashed and resumed run equals a straight one: metrics, weights and the summary's
    zero-variance total (which counts the steps before the crash too)."""
    base, prompts, reward = setup
    setup = (base, prompts, reward.replace(":share_a", ":share_a_even"))   # some zero-variance groups
    a, b = tmp_path / "straight", tmp_path / "crashed"
    cfg, rl = rl_cfg(setup, a, max_steps=4, ckpt_every=2)
    straight = train(cfg, RLObjective(rl))
    cfg, rl = rl_cfg(setup, b, max_steps=4, ckpt_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, _Crash(rl))
    cfg, rl = rl_cfg(setup, b, max_steps=4, ckpt_every=2, resume=True)
    resumed = train(cfg, RLObjective(rl))
    assert straight["zero_variance_groups"] > 0
    assert resumed["zero_variance_groups"] == straight["zero_variance_groups"]
    ra, rb = records(a), records(b)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for k in ("loss", "pg_loss", "reward", "entropy", "grad_norm", "response_len"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
    sa, sb = load_model_state(latest_checkpoint(a)), load_model_state(latest_checkpoint(b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_rl_torchrun_two_processes_match_one(setup, tmp_path, mode):
    """2 processes (rollouts split across ranks) follow one process step by step. Under FSDP the
    rollouts come from each rank's unsharded copy of the policy, refreshed after every update:
    a stale copy would sample steps 2-3 from older weights and change their rewards. Two updates
    per batch also score the old log-probs with it, and the held-out evaluation samples on every
    rank in the middle of the run."""
    base, prompts, reward = setup
    reward = reward.replace(":share_a", ":share_a_even")   # some zero-variance groups, on both ranks' shares
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    # fp32 Newton-Schulz: Muon splits its matrices over the ranks, and bf16 iterations round
    # differently in another batch; fp32 keeps the weights comparable to 1e-4
    cfg, rl = rl_cfg(setup, tmp_path / "single", max_steps=4, eval_every=2, muon_ns_dtype="float32",
                     rl={"micro_steps": 2, "updates_per_batch": 2})
    rl.reward = reward
    single = train(cfg, RLObjective(rl))
    torch.set_num_threads(n)
    torchrun(["rl", str(base), "--tasks", str(prompts), "--reward", reward, "--protocol", "completion",
              "--out", str(tmp_path / mode), "--group-size", "8", "--prompts-per-step", "4", "--max-new-tokens", "16",
              "--overlong", "none", "--max-steps", "4", "--updates-per-batch", "2", "--eval-samples", "4",
              "--lr", "1e-2", "--eval-every", "2", "--muon-ns-dtype", "float32", "--peak-tflops", "1", "--no-progress",
              *(["--fsdp"] if mode == "fsdp" else [])], tmp_path, 29523 if mode == "ddp" else 29524)
    rd, rs = records(tmp_path / mode), records(tmp_path / "single")
    assert len(rd) == len(rs) == 4
    for x, y in zip(rd, rs):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-6)        # the same rollouts, split over ranks
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
        assert x["expert_load"] == y["expert_load"]
    evals = [e for e in map(json.loads, (tmp_path / mode / "metrics.jsonl").read_text().splitlines())
             if e.get("event") == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and all(0 <= e["heldout_reward"] <= 1 for e in evals)
    # the run's total counts every rank's groups, not rank 0's alone
    dist = json.loads((tmp_path / mode / "summary.json").read_text())
    assert single["zero_variance_groups"] > 0
    assert dist["zero_variance_groups"] == single["zero_variance_groups"]
    assert_same_model(tmp_path / mode / "model", tmp_path / "single" / "model")


def test_rl_code_reward_refuses_unscorable_tasks_before_training(setup, tmp_path):
    """A task whose test is not Python (or which has none) stops the code reward at set-up with
    the task's id, before any model work, instead of a traceback at its first reward."""
    from nanoseek.eval import humaneval

    base, _, _ = setup
    good = list(humaneval.load_problems().values())[0]
    for bad, why in ((dict(good, task_id="mine/7", test="def check(c):\n    assert c(\n"), "not valid Python"),
                     ({k: v for k, v in good.items() if k != "test"} | {"task_id": "mine/8"}, "string fields test")):
        (tmp_path / "t.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        rl = RLConfig(tasks=str(tmp_path / "t.jsonl"), group_size=2, prompts_per_step=1, max_new_tokens=4)
        cfg = rl_train_config(str(base), str(tmp_path / "run"), rl, max_steps=1, progress=False, tensorboard=False)
        with pytest.raises(ValueError, match=rf"cannot score task '{bad['task_id']}': .*{why}"):
            train(cfg, RLObjective(rl))
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_rl_code_reward_end_to_end(setup, tmp_path):
    """Chat protocol on two HumanEval problems with the sandboxed code reward: the loop runs,
    every term is logged, held-out pass@k is evaluated."""
    from nanoseek.eval import humaneval

    base, _, _ = setup
    probs = list(humaneval.load_problems().values())[:3]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probs[:2]))
    (tmp_path / "t.heldout.jsonl").write_text(json.dumps(probs[2]) + "\n")
    rl = RLConfig(tasks=str(tmp_path / "t.jsonl"), group_size=2, prompts_per_step=2, max_new_tokens=8,
                  eval_samples=2, syntax_weight=0.1, overlong="penalty")
    cfg = rl_train_config(str(base), str(tmp_path / "run"), rl, max_steps=1, eval_every=0, progress=False,
                          tensorboard=False, peak_tflops=1.0)
    obj = RLObjective(rl)
    try:
        s = train(cfg, obj)
    finally:
        obj.close()
    [rec] = records(tmp_path / "run")
    for k in ("reward", "pass_rate", "reward_correct", "reward_syntax", "reward_format", "reward_overlong"):
        assert k in rec, k
    assert rec["pass_rate"] == 0.0              # a random tiny model writes no working function
    assert s["val"]["heldout_pass@1"] == 0.0 and "heldout_pass@2" in s["val"]
