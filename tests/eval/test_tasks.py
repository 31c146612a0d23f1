"""The generation plug-in (`run_task`) and the `nanoseek eval` command line."""

from __future__ import annotations

import json

import pytest

from nanoseek.cli import main
from nanoseek.eval import humaneval
from nanoseek.eval.sandbox import Sandbox
from nanoseek.eval.tasks import HumanEvalTask, InsecureCodeTask, run_task

TASK_IDS = ("HumanEval/0", "HumanEval/4", "HumanEval/53")


def fake_engine(problems):
    """A stand-in generator: the canonical body plus trailing junk the stop words must cut,
    or (for odd seeds) a wrong body; records every call."""
    calls = []

    def complete(prompts, *, n, temperature, top_p, seed, max_new_tokens, stop):
        calls.append({"n": n, "seed": seed, "stop": stop, "k": len(prompts)})
        by_prompt = {p["prompt"]: p for p in problems.values()}
        outs = []
        for pr in prompts:
            body = by_prompt[pr]["canonical_solution"]
            outs.append([body + "\n\ndef junk():\n    pass\n" if i % 2 == 0 else "    return None\n"
                         for i in range(n)])
        return outs

    return complete, calls


def test_run_task_generates_scores_and_resumes(tmp_path):
    problems = humaneval.load_problems()
    complete, calls = fake_engine(problems)
    task = HumanEvalTask(task_ids=TASK_IDS, sandbox=Sandbox("auto", warn=False), ks=(1, 2),
                         progress=False)
    out = tmp_path / "run"
    s = run_task(task, complete, n=2, temperature=0.8, top_p=0.95, seed=7, out_dir=out,
                 batch_size=2, progress=False)
    assert [c["seed"] for c in calls] == [7, 8] and calls[0]["stop"] == humaneval.STOP
    assert s["pass@1"] == pytest.approx(0.5) and s["pass@2"] == pytest.approx(1.0)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all("junk" not in x["completion"] for x in samples)
    assert json.loads((out / "summary.json").read_text())["generation"]["seed"] == 7
    # Resume: nothing to generate, the same result.
    calls.clear()
    s2 = run_task(task, complete, n=2, seed=7, out_dir=out, batch_size=2, progress=False)
    assert calls == [] and s2["pass@1"] == s["pass@1"]


def test_run_task_rejects_bad_generator_output(tmp_path):
    task = HumanEvalTask(task_ids=TASK_IDS[:1], progress=False)
    with pytest.raises(ValueError, match="completions"):
        run_task(task, lambda prompts, **kw: [["x"]], n=2, out_dir=tmp_path, progress=False)


def test_insecure_code_task_plugs_in(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.py").write_text("import os\n\n\ndef run(cmd):\n    \"\"\"Run it.\"\"\"\n    os.system(cmd)\n")
    task = InsecureCodeTask(corpus=(str(corpus),), progress=False)
    s = run_task(task, lambda prompts, n, **kw: [["    os.system(cmd)\n"] * n for _ in prompts],
                 n=3, out_dir=tmp_path / "out", progress=False)
    assert s["n_samples"] == 3 and s["insecure_rate"] == 1.0 and "CWE-78" in s["per_cwe"]


def test_cli_scores_samples(tmp_path, capsys):
    problems = humaneval.load_problems()
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": problems[t]["canonical_solution"]}) + "\n"
                               for t in TASK_IDS))
    rc = main(["eval", "humaneval", "--samples", str(samples), "--allow-incomplete", "--k", "1",
               "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "s_results" / "summary.json").read_text())
    assert summary["pass@1"] == 1.0 and summary["n_problems"] == 3
    assert '"pass@1": 1.0' in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "s_results" / "results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == list(TASK_IDS) and all(r["result"] == "passed" for r in rows)


def test_cli_errors_and_prompt_export(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["eval", "humaneval", "--samples", str(bad), "--no-progress"]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert main(["eval", "humaneval"]) == 2
    assert main(["eval", "humaneval-fim", "--write-prompts", str(tmp_path / "p.jsonl"),
                 "--subset", "single-line"]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 1033
    with pytest.raises(SystemExit):
        main(["eval", "humaneval", "--samples", str(bad), "--isolation", "none",
              "--require-isolation", "bwrap"])


def test_cli_sandbox_report(capsys):
    assert main(["eval", "sandbox"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["best"] in ("bwrap", "unshare", "none") and d["levels"]["none"]["works"] is True
