"""Code tasks asked in chat: a HumanEval-shaped task becomes a user request, the model answers
(a function in a fenced code block), and the answer is scored by exactly the HumanEval scoring
path of `nanoseek eval humaneval` (the same sandbox, test and `check(entry_point)`).

Scoring a whole function with the HumanEval harness: the program is the task's prompt (imports,
signature, docstring) closed with a `pass` body, then the answer's code, then the test. The
answer's definition of `entry_point` replaces the stub; an answer that defines nothing leaves
the stub, which returns None and fails (the mined tasks are kept only when such bodies fail).

    >>> from nanoseek.eval.chat_code import evaluate_chat, evaluate_completion
    >>> evaluate_chat(model, tok, problems)          # {"pass@1", "syntax_valid", "n", ...}
    >>> evaluate_completion(model, tok, problems)    # base-model protocol: continue the prompt

Used by the speedrun's before/after-SFT table and by RL's code reward (issue "Post-training II").
"""

from __future__ import annotations

import re
import textwrap

from ..data.tasks import sft_example
from . import humaneval
from .sandbox import Sandbox

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The code of an answer: its first ```python (or unlabeled) fenced block; the whole text
    when it has no fence. An unclosed fence (a generation cut by the token limit) counts."""
    for m in _FENCE.finditer(text):
        if m.group(1).lower() in ("", "python", "py", "python3"):
            return m.group(2)
    return text


def syntax_valid(code: str) -> bool:
    """True when `code` is non-empty Python that parses (humaneval.parse_error: a degenerate
    answer nested past the parser's limits is invalid, not a crash of the evaluation)."""
    return bool(code.strip()) and humaneval.parse_error(code) is None


def stub_prompt(problem: dict) -> str:
    """The task's prompt closed with a `pass` body (a complete, failing definition)."""
    prompt = problem["prompt"].rstrip("\n") + "\n"
    indent = "    "
    for line in prompt.splitlines():
        if line.lstrip().startswith(("def ", "async def ")) and \
                re.match(rf"\s*(async\s+)?def\s+{re.escape(problem['entry_point'])}\b", line):
            indent = line[: len(line) - len(line.lstrip())] + "    "
    return prompt + indent + "pass\n\n"


def request_for(problem: dict) -> str:
    """The user message that asks for a task's function: the task's own "request" if it has one;
    else, for a task with a canonical solution, the request its SFT example would make
    (nanoseek.data.tasks.sft_example: the phrasing chat SFT teaches); else the prompt as code."""
    if problem.get("request"):
        return problem["request"]
    if problem.get("canonical_solution") is not None and problem.get("entry_point"):
        try:
            return sft_example({"task_id": "", "source": "", "license": "", **problem})["messages"][0]["content"]
        except (SyntaxError, ValueError, IndexError, AttributeError):
            pass   # a prompt sft_example cannot parse: fall back to the prompt as code
    return ("Complete this Python function. Answer with the whole function in a ```python code block.\n\n"
            f"```python\n{textwrap.dedent(problem['prompt']).rstrip()}\n```")


def score_answers(problems: dict[str, dict], answers: list[dict], *, sandbox: Sandbox | None = None,
                  progress: bool = False, workers: int | None = None) -> dict:
    """Score chat answers [{task_id, answer}] with the HumanEval harness; adds the share of
    answers whose code parses ("syntax_valid") and per-sample records."""
    stubbed = {t: {**p, "prompt": stub_prompt(p)} for t, p in problems.items()}
    samples = [{"task_id": a["task_id"], "completion": extract_code(a["answer"])} for a in answers]
    summary = humaneval.score(samples, stubbed, sandbox=sandbox, ks=(1,), progress=progress, workers=workers,
                              allow_incomplete=True)
    summary["syntax_valid"] = sum(syntax_valid(s["completion"]) for s in samples) / max(1, len(samples))
    return summary


def _generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
              batch_size: int, stop: list[str] | None) -> list[str]:
    from ..engine.generate import generate_full

    texts: list[str] = []
    for i in range(0, len(prompts), batch_size):
        res = generate_full(model, prompts[i:i + batch_size], max_new_tokens, temperature=temperature,
                            seed=seed + i, stop=stop, tokenizer=tokenizer, compile=False)
        texts += [c.text for c in res]
    return texts


def evaluate_chat(model, tokenizer, problems: dict[str, dict], *, max_new_tokens: int = 256,
                  temperature: float = 0.0, seed: int = 0, batch_size: int = 8, sandbox: Sandbox | None = None,
                  progress: bool = False) -> dict:
    """pass@1 and syntax-valid rate of a chat model on `problems`: each is asked in chat mode
    (request_for), the answer's code is scored (score_answers)."""
    from ..chat_format import encode_ids

    ids = [encode_ids([{"role": "user", "content": request_for(p)}], tokenizer, thinking_mode="chat")[0]
           for p in problems.values()]
    texts = _generate(model, tokenizer, ids, max_new_tokens, temperature, seed, batch_size, None)
    answers = [{"task_id": t, "answer": a} for t, a in zip(problems, texts)]
    s = score_answers(problems, answers, sandbox=sandbox, progress=progress)
    return {"protocol": "chat", "pass@1": s["pass@1"], "syntax_valid": s["syntax_valid"],
            "n": len(answers), "statuses": s["statuses"], "samples": answers}


def evaluate_completion(model, tokenizer, problems: dict[str, dict], *, max_new_tokens: int = 256,
                        temperature: float = 0.0, seed: int = 0, batch_size: int = 8,
                        sandbox: Sandbox | None = None, progress: bool = False) -> dict:
    """The base-model protocol (HumanEval's): continue the prompt, cut at the Codex stop
    sequences, score prompt + completion; syntax-valid = prompt + completion parses."""
    ids = [tokenizer.encode(p["prompt"], add_bos=True) for p in problems.values()]
    texts = _generate(model, tokenizer, ids, max_new_tokens, temperature, seed, batch_size, humaneval.STOP)
    samples = [{"task_id": t, "completion": humaneval.truncate(c)} for t, c in zip(problems, texts)]
    s = humaneval.score(samples, problems, sandbox=sandbox, ks=(1,), progress=progress, allow_incomplete=True)
    valid = sum(syntax_valid(problems[x["task_id"]]["prompt"] + x["completion"]) for x in samples)
    return {"protocol": "completion", "pass@1": s["pass@1"], "syntax_valid": valid / max(1, len(samples)),
            "n": len(samples), "statuses": s["statuses"], "samples": samples}
