"""Chat answers to code tasks scored through the HumanEval harness (nanoseek/eval/chat_code.py)."""

from __future__ import annotations

from nanoseek.eval import humaneval
from nanoseek.eval.chat_code import extract_code, request_for, score_answers, stub_prompt, syntax_valid


def test_extract_code_takes_the_first_python_fence():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1"
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code("```json\n{}\n```\n```py\ny = 2\n```") == "y = 2"     # other languages skipped
    assert extract_code("```python\ndef g():\n    return") == "def g():\n    return"  # cut by the token limit
    assert extract_code("def h(): pass") == "def h(): pass"                 # no fence: the text itself
    assert syntax_valid("def h(): pass") and not syntax_valid("def h(:") and not syntax_valid("  \n")


def test_syntax_valid_survives_degenerate_answers():
    """A model stuck repeating an operator writes code nested past the parser's limits: ast.parse
    then raises RecursionError or MemoryError (from ~3,000 nested unary minus signs), which must
    count as invalid instead of ending the evaluation. Valid code that Python warns about
    (`1if`) stays valid without a SyntaxWarning on the user's terminal."""
    import ast
    import warnings

    import pytest

    deep = ["-" * 3000 + "1", "a" + "+a" * 3000, "f" + "()" * 3000, "not " * 12000 + "x"]
    for code in deep:
        with pytest.raises((RecursionError, MemoryError)):  # the oracle: the parser itself gives up
            ast.parse(code)
        assert not syntax_valid(code) and not syntax_valid(f"```python\nx = {code}\n```".split("\n")[1])
    assert syntax_valid("-" * 100 + "1") and syntax_valid("a" + "+a" * 500)   # deep but within limits
    assert not syntax_valid("x = 1\0")                                         # NUL: ValueError in ast
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert syntax_valid("x = 1if 1 else 2")
    assert not seen, [str(w.message) for w in seen]


def test_stub_prompt_is_a_complete_failing_definition():
    p = humaneval.load_problems()["HumanEval/2"]
    stub = stub_prompt(p)
    ns: dict = {}
    exec(compile(stub, "<stub>", "exec"), ns)   # trusted HumanEval prompt: only defines a function
    assert ns[p["entry_point"]](3.5) is None
    # the phrasing chat SFT teaches (the mined SFT examples), else the prompt as code
    from nanoseek.data.tasks import sft_example

    sft = sft_example({**p, "source": "", "license": ""})["messages"][0]["content"]
    assert request_for(p) == sft and p["entry_point"] in sft
    bare = {k: v for k, v in p.items() if k != "canonical_solution"}
    assert "```python" in request_for(bare) and p["prompt"].strip() in request_for(bare)
    assert request_for({**p, "request": "Write it."}) == "Write it."


def test_answers_scored_like_humaneval():
    problems = {t: p for t, p in humaneval.load_problems().items() if t in ("HumanEval/0", "HumanEval/2")}
    full = {t: p["prompt"] + p["canonical_solution"] for t, p in problems.items()}
    answers = [
        {"task_id": "HumanEval/0", "answer": f"Here you go:\n```python\n{full['HumanEval/0']}```\n"},
        {"task_id": "HumanEval/2", "answer": "```python\ndef truncate_number(number):\n    return 0.0\n```"},
        {"task_id": "HumanEval/2", "answer": "I cannot help with that."},
        {"task_id": "HumanEval/0", "answer": "```python\nimport sys\nsys.exit(0)\n```"},
    ]
    s = score_answers(problems, answers)
    per = s["per_problem"]
    assert per["HumanEval/0"] == {"n": 2, "correct": 1}      # the right function passes, exit(0) does not
    assert per["HumanEval/2"] == {"n": 2, "correct": 0}      # wrong body and no code both fail
    assert s["syntax_valid"] == 3 / 4                        # the prose answer does not parse
