"""`nanoseek data tasks`: verified code tasks mined from the fixture sources.

The fixture (tests/fixtures/task_sources/ABOUT.txt) is a folder of three projects: an MIT package
of pure helpers with doctests (plus impure, trivial and constant ones), a GPL package, and a module
with HumanEval/0 pasted in; the tests add a wheel. Mined code runs only in the sandbox: here too,
every check of a solution goes through `nanoseek.eval` scoring.
"""

from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path

import pytest

from nanoseek.data import tasks as mt
from nanoseek.eval import humaneval
from nanoseek.eval.sandbox import Sandbox
from nanoseek.eval.verify import ProblemFileTask, load_problem_file, mine_tasks, output_paths

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "task_sources"
KEPT = {"slugify", "count_vowels", "run_length", "digit_sum", "clamp", "collatz_steps", "initials"}
NEVER = {"echo", "read_words", "roll_dice", "stamp", "square_sign", "swap_case_words", "reverse_words",
         "has_close_elements"}

WHEEL_MODULE = '''"""String helpers shipped in a wheel."""


def initials(name: str) -> str:
    """Upper-case initials of the words of a name, without separators.

    >>> initials("ada lovelace")
    'AL'
    """
    return "".join(w[0].upper() for w in name.split())
'''


def _wheel(tmp: Path) -> Path:
    path = tmp / "wheelpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("wheelpkg/__init__.py", '"""A fixture wheel with one pure helper module."""\n')
        zf.writestr("wheelpkg/strings.py", WHEEL_MODULE)
        zf.writestr("wheelpkg-1.0.dist-info/METADATA",
                    "Metadata-Version: 2.4\nName: wheelpkg\nVersion: 1.0\nLicense-Expression: MIT\n")
    return path


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox("auto", warn=False)


@pytest.fixture(scope="module")
def mined(tmp_path_factory, sandbox):
    tmp = tmp_path_factory.mktemp("mined")
    sources = [str(FIXTURE), str(_wheel(tmp))]
    out = tmp / "tasks.jsonl"
    m = mine_tasks(sources, out, sft_out=tmp / "sft.jsonl", workers=1, progress=False, sandbox=sandbox)
    paths = output_paths(out)
    rows = [json.loads(x) for p in (paths["train"], paths["heldout"]) for x in p.read_text().splitlines()]
    return {"sources": sources, "out": out, "paths": paths, "manifest": m, "rows": rows, "sft": tmp / "sft.jsonl"}


def test_keeps_pure_functions_and_drops_the_rest(mined):
    rows, m = mined["rows"], mined["manifest"]
    assert {r["entry_point"] for r in rows} == KEPT
    text = json.dumps(rows) + mined["sft"].read_text()
    for name in NEVER:
        assert name not in text
    d = m["dropped"]
    assert d["license_copyleft"]["functions"] == 2          # the GPL package + the SPDX-marked file
    assert d["contaminated"]["functions"] == 1 and "has_close_elements" in d["contaminated"]["examples"][0]
    assert d["touches_io_time_random"]["functions"] == 3     # open + read, random, time
    assert "echo" in d["trivial_body_passes"]["examples"][0]
    assert "square_sign" in d["constant_output"]["examples"][0]
    seen = m["counts"]["functions_seen"]
    assert seen == len(KEPT) + sum(v["functions"] for v in d.values())   # every function accounted for
    assert m["kept_share"]["of_functions"] == round(len(KEPT) / seen, 4)


def test_output_is_humaneval_shaped(mined):
    rows, paths = mined["rows"], mined["paths"]
    for r in rows:
        assert set(r) == {"task_id", "prompt", "entry_point", "canonical_solution", "test", "source", "license",
                          "split"}
        assert r["task_id"].startswith("Mined/") and r["license"] == "MIT"
        assert r["prompt"].rstrip().endswith('"""')                # signature + docstring, body to complete
        fn = [n for n in ast.parse(r["prompt"] + r["canonical_solution"]).body if isinstance(n, ast.FunctionDef)]
        assert fn[-1].name == r["entry_point"]
        assert "def check(candidate):" in r["test"] and r["test"].count("assert _same(") >= 3
    slug = next(r for r in rows if r["entry_point"] == "slugify")
    assert slug["prompt"].startswith("import re\n") and "_WORD = re.compile" in slug["prompt"]   # helper context
    assert "assert _same(candidate('Hello, World!'), 'hello-world')" in slug["test"]             # from the doctest
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "heldout"]
    assert train and held and len(train) + len(held) == len(rows)
    assert mined["manifest"]["counts"]["train"] == len(train)
    assert paths["manifest"].is_file() and paths["heldout"].name == "tasks.heldout.jsonl"
    sft = [json.loads(x) for x in mined["sft"].read_text().splitlines()]
    assert {s["task_id"] for s in sft} == {r["task_id"] for r in train}      # train split only
    for s, r in zip(sft, train):
        user, assistant = s["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert r["entry_point"] in user["content"]
        assert assistant["content"].startswith("```python\n") and assistant["content"].endswith("\n```")
        assert f"def {r['entry_point']}(" in assistant["content"]


def _trivial(row: dict) -> list[str]:
    first = next(ln for ln in row["canonical_solution"].splitlines() if ln.strip())
    ind = first[: len(first) - len(first.lstrip())]
    fn = [n for n in ast.parse(row["prompt"] + "    pass\n").body if isinstance(n, ast.FunctionDef)][-1]
    return [f"{ind}return None\n", f"{ind}pass\n", f"{ind}return {fn.args.args[0].arg}\n", f"{ind}return 0\n",
            f"{ind}return ''\n"]


def test_canonical_passes_and_trivial_bodies_fail_in_the_sandbox(mined, sandbox, tmp_path):
    problems = {}
    for p in (mined["paths"]["train"], mined["paths"]["heldout"]):
        problems.update(load_problem_file(p))
    good = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    s = humaneval.score(good, problems, sandbox=sandbox, ks=(1,), progress=False)
    assert s["pass@1"] == 1.0 and s["n_problems"] == len(KEPT)
    bad = [{"task_id": t, "completion": body} for t, p in problems.items() for body in _trivial(p)]
    s = humaneval.score(bad, problems, sandbox=sandbox, ks=(1,), progress=False)
    assert s["statuses"].get("passed", 0) == 0


def test_deterministic_and_reused(mined, sandbox, tmp_path):
    again = mine_tasks(mined["sources"], tmp_path / "tasks.jsonl", workers=1, progress=False, sandbox=sandbox)
    for key in ("train", "heldout"):
        assert output_paths(tmp_path / "tasks.jsonl")[key].read_bytes() == mined["paths"][key].read_bytes()
    assert again["counts"]["verified"] == mined["manifest"]["counts"]["verified"]
    reused = mine_tasks(mined["sources"], mined["out"], sft_out=mined["sft"], workers=1, progress=False,
                        sandbox=sandbox)
    assert reused["created"] == mined["manifest"]["created"]      # a finished run is not redone


def test_cli_capped_run_and_eval_problems(tmp_path, capsys, mined):
    from nanoseek.cli import main

    out = tmp_path / "t.jsonl"
    assert main(["data", "tasks", "--source", str(FIXTURE), "--out", str(out), "--max-tasks", "2",
                 "--held-out-fraction", "0", "--workers", "1", "--quiet"]) == 0
    assert "2 train" in capsys.readouterr().out
    m = json.loads(output_paths(out)["manifest"].read_text())
    assert m["counts"]["verified"] == 2 and m["dropped"]["over_max_tasks"]["functions"] >= 0
    # `nanoseek eval humaneval --problems` scores mined tasks.
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": r["canonical_solution"]}) + "\n"
                               for r in rows))
    assert main(["eval", "humaneval", "--problems", str(out), "--samples", str(samples), "--k", "1",
                 "--out", str(tmp_path / "res"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "res" / "summary.json").read_text())["pass@1"] == 1.0
    capsys.readouterr()
    assert main(["data", "tasks", "--source", str(tmp_path / "nope"), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: source not found") and "Traceback" not in err and err.count("\n") == 1
    assert main(["eval", "humaneval", "--problems", str(tmp_path / "nope.jsonl"), "--samples", str(samples)]) == 2


def test_reference_runs_survive_a_function_that_kills_the_interpreter(sandbox):
    from nanoseek.eval.verify import record_outputs

    good = "def inc(x):\n    return x + 1\n"
    items = [{"id": "a", "program": good, "cases": ["inc(1)", "inc(2)"]},
             {"id": "boom", "program": "import os\n\ndef boom(x):\n    os._exit(3)\n", "cases": ["boom(1)"]},
             {"id": "b", "program": good, "cases": ["inc(5)"]}]
    runs, failed = record_outputs(items, sandbox, batch_size=3)
    assert failed == {"boom": "crashed"}          # crashed again when retried alone
    outcomes = {k: [[o[:2] for o in run.values()] for run in v] for k, v in runs.items()}   # without seconds
    assert outcomes == {"a": [[("ok", "2"), ("ok", "3")]] * 2, "b": [[("ok", "6")]] * 2}


def test_problem_file_task_plugs_into_generation(mined, sandbox, tmp_path):
    from nanoseek.eval.tasks import run_task

    problems = load_problem_file(mined["paths"]["train"])

    def complete(prompts, n, **kw):       # a "model" that knows the answers
        by_prompt = {p["prompt"]: p["canonical_solution"] for p in problems.values()}
        return [[by_prompt[p]] * n for p in prompts]

    task = ProblemFileTask(problems_path=str(mined["paths"]["train"]), sandbox=sandbox, ks=(1,), progress=False,
                           limit=2)
    s = run_task(task, complete, out_dir=tmp_path, progress=False)
    assert s["pass@1"] == 1.0 and s["n_problems"] == 2


# ---------------------------------------------------------------------------------------------
# Units (no sandbox)

MODULE = '''from __future__ import annotations
import math
import os
from .sibling import helper2

LIMIT = 10
TABLE = [1]
TABLE.append(2)
try:
    import json as fast_json
except ImportError:
    fast_json = None


def _scale(x):
    return x * LIMIT


def scaled_root(x: float) -> float:
    """Square root of x scaled by the module's LIMIT constant."""
    return math.sqrt(_scale(x))


def cwd_name(x):
    """Name of the current working directory followed by x."""
    return os.getcwd() + str(x)


def from_table(i: int) -> int:
    """Look an entry up in the module's table of values."""
    return TABLE[i]


def uses_relative(x):
    """Call a helper imported relatively from a sibling module."""
    return helper2(x)


def dumps_fast(x):
    """Serialise x with whichever JSON module imported at start-up."""
    return fast_json.dumps(x)


def count_up(n: int):
    """Yield the integers from zero up to n, one at a time."""
    yield from range(n)


@staticmethod
def decorated(x):
    """A decorated function is not a task (the decorator may change it)."""
    return x
'''


def test_extract_candidates_filters_and_context():
    cands, seen, drops = mt.extract_candidates(MODULE, group="g", path="pkg/mod.py", license="MIT")
    assert seen == 7 and [c.name for c in cands] == ["scaled_root"]
    c = cands[0]
    assert c.prompt.startswith("from __future__ import annotations\nimport math\n")
    assert "LIMIT = 10" in c.prompt and "def _scale(x):" in c.prompt and "TABLE" not in c.prompt
    assert c.prompt.endswith('    """Square root of x scaled by the module\'s LIMIT constant."""\n')
    assert c.body == "    return math.sqrt(_scale(x))\n" and c.module == "pkg.mod"
    assert dict(drops.counts) == {"touches_io_time_random": 1, "mutated_at_import": 1, "relative_import": 1,
                                  "conditional_definition": 1, "generator": 1, "decorated": 1}
    _, _, d = mt.extract_candidates(MODULE, group="g", path="pkg/mod.py", license="GPL-3.0-only")
    assert dict(d.counts) == {"license_copyleft": 7}


def test_make_cases_deterministic_per_seed():
    (c,) = mt.extract_candidates(WHEEL_MODULE, group="g", path="w/strings.py", license="MIT")[0]
    a, b, other = mt.make_cases(c, 0), mt.make_cases(c, 0), mt.make_cases(c, 1)
    assert [x.expr for x in a] == [x.expr for x in b] != [x.expr for x in other]
    assert a[0].kind == "doctest" and a[0].expr == 'initials("ada lovelace")' and a[0].want == "'AL'"
    for x in a[1:]:                                                     # `name: str` -> strings
        (arg,) = ast.parse(x.expr, mode="eval").body.args
        assert isinstance(ast.literal_eval(arg), str)


SET_MODULE = '''
def only_in_first(a: set[str], b: set[str], pick: str) -> list[str]:
    """Sorted strings of a that are not in b, then pick if it is in both."""
    return sorted(a - b) + ([pick] if pick in a and pick in b else [])
'''

_CASES_SCRIPT = """
import json, sys
from nanoseek.data import tasks as mt
(c,) = mt.extract_candidates(sys.argv[1], group="g", path="m.py", license="MIT")[0]
print(json.dumps([k.expr for k in mt.make_cases(c, 0)]))
"""


def test_make_cases_do_not_depend_on_the_hash_seed():
    # Set-valued arguments: their repr, and picking one of their elements, follow the string hash
    # seed of the process; the generated cases (and so the written tests) must not.
    import os
    import subprocess
    import sys

    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", _CASES_SCRIPT, SET_MODULE], env=env, capture_output=True,
                           text=True, check=True)
        outs.append(json.loads(r.stdout))
    assert outs[0] == outs[1] and any("{" in e for e in outs[0])


def _runs(*per_run):
    return [{i: o for i, o in enumerate(r)} for r in per_run]


def test_assemble_task_rules():
    (c,) = mt.extract_candidates(WHEEL_MODULE, group="g", path="w/strings.py", license="MIT")[0]
    cases = [mt.Case('initials("ada lovelace")', "doctest", want="'AL'")] + [
        mt.Case(f"initials({s!r})", "generated") for s in ("a b", "x", "p q r")]
    ok = [("ok", "'AL'", 0.001), ("ok", "'AB'", 0.001), ("ok", "'X'", 0.001), ("ok", "'PQR'", 0.001)]
    task = mt.assemble_task(c, cases, _runs(ok, ok))
    assert isinstance(task, dict) and task["entry_point"] == "initials"
    assert "assert _same(candidate('ada lovelace'), 'AL')" in task["test"]
    assert mt.assemble_task(c, cases, _runs(ok, ok[:1] + [("ok", "'BA'", 0.0)] + ok[2:])) == "nondeterministic"
    # A limit hit in one run only (machine load) is no evidence of nondeterminism: the case is skipped.
    task = mt.assemble_task(c, cases, _runs(ok, [("raise", "MemoryError", 0.0)] + ok[1:]))
    assert isinstance(task, dict) and "ada lovelace" not in task["test"]
    assert mt.assemble_task(c, cases, _runs([("ok", "'XX'", 0.0)] + ok[1:], [("ok", "'XX'", 0.0)] + ok[1:])) \
        == "doctest_mismatch"
    same = [("ok", "'A'", 0.0)] * 4
    bad_doc = [mt.Case(x.expr, "generated") for x in cases]
    assert mt.assemble_task(c, bad_doc, _runs(same, same)) == "constant_output"
    raised = [("raise", "TypeError", 0.0)] * 4
    assert mt.assemble_task(c, cases, _runs(raised, raised)) == "too_few_cases"


def test_test_literals_and_split():
    assert mt.literal([set(), {2, 1}, (1,), {"k": b"x"}, 0.5]) == "[_b.set(), {1, 2}, (1,), {'k': b'x'}, 0.5]"
    tasks = [{"_meta": {"group": f"g{i % 10}", "module": f"m{i}", "key": str(i)}} for i in range(100)]
    train, held = mt.split_tasks(tasks, 0.2, seed=0)
    assert len(train) + len(held) == 100 and 10 <= len(held) <= 30
    assert not {t["_meta"]["group"] for t in train} & {t["_meta"]["group"] for t in held}
    assert mt.split_tasks(tasks, 0.2, seed=0) == (train, held) and mt.split_tasks(tasks, 0.0, seed=0)[1] == []
