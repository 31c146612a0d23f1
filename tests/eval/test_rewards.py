"""RL rewards (nanoseek/eval/rewards.py): the code reward through the HumanEval scoring path,
partial credit, shaping terms, the asynchronous interface and plug-in rewards."""

from __future__ import annotations

import math
import time

import pytest

from nanoseek.eval import humaneval
from nanoseek.eval.rewards import (
    CodeReward,
    PluginReward,
    RewardConfig,
    RewardError,
    load_reward,
    make_reward,
    split_test,
)

TIMEOUT_S = 1.0

# HumanEval/2 (truncate_number): program bodies, completion-protocol style (continue the prompt).
BODIES = {
    "correct": "    return number % 1.0\n",
    "wrong": "    return 0.0\n",
    # Exit tricks on a wrong body: a harness trusting exit codes would score them 1.
    "os._exit": "    return 0.0\n\n\nimport os\nos._exit(0)\n",
    "sys.exit": "    return 0.0\n\n\nimport sys\nsys.exit(0)\n",
    "SystemExit": "    raise SystemExit\n",
    "check": "    return 0.0\n\n\ndef check(candidate):\n    pass\n",
    "loop": "    while True:\n        pass\n",
}
EXPECTED = {"correct": 1.0, "wrong": 0.0, "os._exit": 0.0, "sys.exit": 0.0, "SystemExit": 0.0,
            "check": 0.0, "loop": 0.0}

# A hand-written task with 4 real asserts, one using a setup statement, and an `assert True`.
ADD = {
    "task_id": "add",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": ("def check(candidate):\n"
             "    assert candidate(1, 2) == 3\n"
             "    two = 2\n"
             "    assert candidate(two, two) == 4\n"
             "    assert candidate(0, 0) == 0\n"
             "    assert candidate(-1, 1) == 0\n"
             "    assert True, 'checks nothing'\n"),
}
ADD_BODIES = {"    return a + b\n": 1.0,        # all pass
              "    return abs(a) + b\n": 0.75,  # fails only (-1, 1)
              "    return 3\n": 0.25,           # passes only (1, 2)
              "    return a + b\n\n\nimport sys\nsys.exit(0)\n": 0.0,
              # Right on any single call, wrong from the second on: every split passes but the
              # whole test does not, so the share is capped at (k - 1) / k.
              "    calls.append(1)\n    return a + b if len(calls) < 2 else 0\n\n\ncalls = []\n": 0.75}


def as_answer(task: dict, body: str, fence: bool = True) -> str:
    """The chat protocol's answer for a body: the whole function, in a ```python block."""
    code = task["prompt"] + body
    return f"Here it is:\n```python\n{code}```\n" if fence else code


def rows(protocol: str, task: dict, bodies) -> list[str]:
    return [as_answer(task, b) if protocol == "chat" else b for b in bodies]


@pytest.fixture(scope="module")
def he2():
    return humaneval.load_problems()["HumanEval/2"]


@pytest.mark.parametrize("protocol", ["completion", "chat"])
def test_code_reward_correct_wrong_and_tampering(protocol, he2, best_sandbox):
    reward = CodeReward(RewardConfig(protocol=protocol, timeout_s=TIMEOUT_S), best_sandbox)
    t0 = time.monotonic()
    out = reward.score([he2] * len(BODIES), rows(protocol, he2, BODIES.values()))
    elapsed = time.monotonic() - t0
    got = {name: r["correct"] for name, r in zip(BODIES, out)}
    assert got == EXPECTED
    assert [r["pass"] for r in out] == list(EXPECTED.values())
    assert [r["total"] for r in out] == list(EXPECTED.values())  # no shaping by default
    # The infinite loop is cut at the timeout (+ the sandbox's grace), not left running.
    assert elapsed < TIMEOUT_S + best_sandbox.limits.grace_s + 5


def test_split_test_keeps_setup_and_skips_constant_asserts():
    parts = split_test(ADD["test"])
    assert len(parts) == 4                       # `assert True` is not a unit
    for p in parts:
        assert p.startswith(ADD["test"].rstrip("\n"))  # the original test is kept verbatim
        tail = p[len(ADD["test"].rstrip("\n")):]
        assert tail.count("assert candidate") == 1 and "two = 2" in tail
    assert "candidate(two, two)" in parts[1]
    # Fewer than two units, or no check function: binary scoring.
    assert split_test("def check(candidate):\n    assert candidate(1) == 1\n    assert True\n") == ()
    assert split_test("assert 1 == 1\nassert 2 == 2\n") == ()
    assert len(split_test(humaneval.load_problems()["HumanEval/0"]["test"])) == 7


@pytest.mark.parametrize("protocol", ["completion", "chat"])
def test_partial_credit_share_and_async_matches_batch(protocol, best_sandbox):
    cfg = RewardConfig(protocol=protocol, partial_credit=True, timeout_s=TIMEOUT_S)
    completions = rows(protocol, ADD, ADD_BODIES)
    with CodeReward(cfg, best_sandbox) as reward:
        batch = reward.score([ADD] * len(completions), completions)
        futures = [reward.submit(ADD, c) for c in completions]
        asynchronous = reward.gather(futures)
    assert [r["correct"] for r in batch] == list(ADD_BODIES.values())
    assert [r["pass"] for r in batch] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert asynchronous == batch
    # Binary (the default) on the same completions: only the all-pass one scores.
    binary = CodeReward(RewardConfig(protocol=protocol, timeout_s=TIMEOUT_S), best_sandbox)
    assert [r["correct"] for r in binary.score([ADD] * len(completions), completions)] == [1, 0, 0, 0, 0]


def test_shaping_terms_logged_separately_and_summed(best_sandbox):
    cfg = RewardConfig(protocol="chat", syntax=0.1, format=0.2, length=0.01, length_target=100,
                       timeout_s=TIMEOUT_S)
    good = ADD["prompt"] + "    return a + b\n"
    answers = [
        f"```python\n{good}```",                      # correct, parses, fenced
        good,                                         # correct, parses, no fence
        "I cannot do that." + " sorry" * 30,          # prose: no code, too long
        "```python\ndef add(a, b:\n    return a\n```",  # fenced but a syntax error
    ]
    expected = [  # correct, syntax, format, length (chars beyond 100, negated)
        (1.0, 1.0, 1.0, min(0, 100 - len(answers[0]))),
        (1.0, 1.0, 0.0, min(0, 100 - len(answers[1]))),
        (0.0, 0.0, 0.0, 100 - len(answers[2])),
        (0.0, 0.0, 1.0, 0.0),
    ]
    assert len(answers[2]) > 100 and len(answers[3]) <= 100
    out = CodeReward(cfg, best_sandbox).score([ADD] * 4, answers)
    for r, (c, s, f, n) in zip(out, expected):
        assert (r["correct"], r["syntax"], r["format"], r["length"]) == (c, s, f, n)
        assert r["total"] == pytest.approx(c + 0.1 * s + 0.2 * f + 0.01 * n)
    # Explicit lengths (e.g. generated tokens) replace the character count.
    out = CodeReward(cfg, best_sandbox).score([ADD] * 2, answers[:2], lengths=[90, 130])
    assert [r["length"] for r in out] == [0.0, -30.0]
    assert out[1]["total"] == pytest.approx(1.0 + 0.1 + 0.0 - 0.3)


def test_completion_protocol_syntax_and_config_checks(best_sandbox):
    cfg = RewardConfig(protocol="completion", syntax=0.5, timeout_s=TIMEOUT_S)
    out = CodeReward(cfg, best_sandbox).score([ADD, ADD], ["    return a + b\n", "    return (a +\n"])
    assert [(r["correct"], r["syntax"], r["format"]) for r in out] == [(1.0, 1.0, 0.0), (0.0, 0.0, 0.0)]
    assert [r["total"] for r in out] == [1.5, 0.0]
    with pytest.raises(ValueError, match="chat protocol only"):
        RewardConfig(protocol="completion", format=0.1)
    with pytest.raises(ValueError, match="protocol"):
        RewardConfig(protocol="fim")
    with pytest.raises(RewardError, match="entry_point, test.*only 'prompt'"):
        CodeReward(cfg, best_sandbox).score([{"task_id": "t", "prompt": "x"}], ["y"])


REWARD_SOURCE = '''
def brevity(task, completion):
    return 1.0 / (1 + len(completion)) + len(task["prompt"])

def nan(task, completion):
    return float("nan")

def text(task, completion):
    return "1.0"

def boom(task, completion):
    raise KeyError("entry_point")
'''


def test_plugin_from_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_rl_rewards.py").write_text(REWARD_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    f = tmp_path / "sub" / "file_rewards.py"
    f.parent.mkdir()
    f.write_text(REWARD_SOURCE.replace("1.0 / (1 + len(completion))", "2.0 * len(completion)"))
    tasks = [{"prompt": "ab"}, {"prompt": "abcd"}]   # plug-ins need only a prompt
    from_module = make_reward("my_rl_rewards:brevity")
    from_file = make_reward(f"{f}:brevity")
    assert isinstance(from_module, PluginReward) and isinstance(from_file, PluginReward)
    assert from_module.score(tasks, ["xyz", ""]) == [{"total": 2.25, "plugin": 2.25},
                                                      {"total": 5.0, "plugin": 5.0}]
    assert from_file.score(tasks, ["xyz", ""]) == [{"total": 8.0, "plugin": 8.0},
                                                    {"total": 4.0, "plugin": 4.0}]
    assert from_file.gather([from_file.submit(tasks[0], "xyz")]) == [{"total": 8.0, "plugin": 8.0}]
    assert isinstance(make_reward("code", RewardConfig(protocol="completion")), CodeReward)


def test_a_sandbox_that_cannot_run_raises_instead_of_scoring_zero():
    """A reward job the sandbox itself cannot run (status "error") is retried once, then raises
    SandboxError -- batch and asynchronous alike -- rather than giving the completion reward 0."""
    from nanoseek.eval.common import SandboxError
    from nanoseek.eval.sandbox import Sandbox

    broken = Sandbox("none", warn=False, python="/nonexistent/python3")
    reward = CodeReward(RewardConfig(protocol="completion", timeout_s=TIMEOUT_S), broken)
    with pytest.raises(SandboxError, match="could not run a reward job"):
        reward.score([ADD], ["    return a + b\n"])
    with pytest.raises(SandboxError):
        reward.submit(ADD, "    return a + b\n").result(timeout=60)
    reward.close()


def test_plugin_errors_are_clear(tmp_path):
    f = tmp_path / "r.py"
    f.write_text(REWARD_SOURCE)
    task = {"task_id": "t/1", "prompt": "p"}
    with pytest.raises(RewardError, match=r"r\.py:nan.*nan.*t/1.*finite number"):
        make_reward(f"{f}:nan").score([task], ["c"])
    with pytest.raises(RewardError, match=r"r\.py:text.*'1\.0' \(str\).*finite number"):
        make_reward(f"{f}:text").score([task], ["c"])
    with pytest.raises(RewardError, match=r"r\.py:boom.*raised on task t/1: KeyError"):
        make_reward(f"{f}:boom").score([task], ["c"])
    with pytest.raises(RewardError, match="finite number"):
        make_reward(f"{f}:nan").submit(task, "c").result()
    with pytest.raises(RewardError, match="module:function"):
        load_reward("no_colon_here")
    with pytest.raises(RewardError, match="has no attribute 'missing'"):
        load_reward(f"{f}:missing")
    with pytest.raises(RewardError, match="no such file"):
        load_reward(f"{tmp_path}/absent.py:fn")
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:fn")
    assert load_reward("math:isfinite") is math.isfinite
