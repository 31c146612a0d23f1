"""HumanEval infilling: published subset sizes, exact reconstruction, scoring of middles."""

from __future__ import annotations

import pytest

from nanoseek.eval import fim, humaneval
from nanoseek.eval.sandbox import Sandbox


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


@pytest.fixture(scope="module")
def tasks(problems):
    return {s: fim.build_tasks(s, problems) for s in fim.SUBSETS}


def test_published_subset_sizes(tasks):
    assert len(tasks["single-line"]) == 1033
    assert len(tasks["multi-line"]) == 5815


def test_construction_is_exact_and_deterministic(problems, tasks):
    for subset, ts in tasks.items():
        assert len({t["task_id"] for t in ts}) == len(ts)
        for t in ts:
            p = problems[t["problem_id"]]
            # prefix + middle + suffix is exactly the original program
            assert t["prompt"] + t["canonical_solution"] + t["suffix"] == p["prompt"] + p["canonical_solution"]
            assert t["prompt"].startswith(p["prompt"])
            assert t["canonical_solution"].strip()  # never an empty/blank span
        assert fim.build_tasks(subset, problems) == ts
    single = {t["task_id"]: t for t in tasks["single-line"]}
    # one masked line, no line break inside (only the one before it, when not the first line)
    for t in single.values():
        assert "\n" not in t["canonical_solution"].lstrip("\n")
    first = single["SingleLineInfilling/HumanEval/0/L0"]
    assert first["canonical_solution"] == "    for idx, elem in enumerate(numbers):"
    assert first["suffix"].startswith("\n        for idx2, elem2 in enumerate(numbers):")
    multi = {t["task_id"]: t for t in tasks["multi-line"]}
    m = multi["MultiLineInfilling/HumanEval/0/L2_L3"]
    assert m["canonical_solution"] == "\n            if idx != idx2:\n                distance = abs(elem - elem2)"
    assert m["prompt"].endswith("for idx2, elem2 in enumerate(numbers):")


def test_fim_prompt_format(problems):
    fmt = fim.FimFormat("<PRE>", "<SUF>", "<MID>")
    prompts = fim.build_prompts(["single-line"], problems, fmt=fmt)
    p = prompts[0]
    assert p["prompt"] == "<PRE>" + p["prefix"] + "<SUF>" + p["suffix"] + "<MID>"
    default = fim.build_prompts(["single-line"], problems)[0]["prompt"]
    assert default.startswith("<｜fim▁begin｜>") and default.endswith("<｜fim▁end｜>")


def test_scoring_canonical_and_wrong_middles(problems, tasks):
    # A deterministic spread of tasks over all problems keeps this fast.
    single = tasks["single-line"][::41]
    multi = tasks["multi-line"][::233]
    samples = [{"task_id": t["task_id"], "completion": t["canonical_solution"]} for t in single + multi]
    # a wrong middle: the return line of HumanEval/53 (add) replaced
    samples.append({"task_id": "SingleLineInfilling/HumanEval/53/L0", "completion": "    return x - y"})
    summary = fim.score(samples, problems, sandbox=Sandbox("auto", warn=False), progress=False)
    s, m = summary["subsets"]["single-line"], summary["subsets"]["multi-line"]
    assert s["n_tasks"] == len(single) + 1 and m["n_tasks"] == len(multi)
    assert m["pass@1"] == 1.0
    assert s["pass@1"] == pytest.approx(len(single) / (len(single) + 1))
    assert s["n_tasks_published"] == 1033 and m["n_tasks_published"] == 5815
