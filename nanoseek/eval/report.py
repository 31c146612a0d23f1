"""Evaluation results in the run report: a table per task and PNG plots (matplotlib).

`nanoseek report RUN_DIR` calls `eval_section(RUN_DIR)`, which finds every `summary.json`
written by `nanoseek eval` below RUN_DIR (e.g. RUN_DIR/eval_humaneval/summary.json, as
`--model RUN_DIR/...` writes by default, or any `--out` inside the run directory) and renders

    humaneval       problems, samples, pass@k, isolation; passk.png (pass@k for every k the
                    samples allow) and pass_rate_hist.png (per-problem pass rate histogram)
    humaneval-fim   pass@1 per subset (single-line / multi-line) against the published sizes
    insecure-code   insecure rate, and the rate per CWE
    bpb             bits per byte, tokens, bytes

    >>> from nanoseek.eval.report import eval_section
    >>> lines, pngs = eval_section("runs/speedrun")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TASKS = ("humaneval", "humaneval-fim", "insecure-code", "bpb")


def find_summaries(run_dir: str | os.PathLike, max_depth: int = 3) -> list[tuple[Path, dict]]:
    run_dir = Path(run_dir)
    found = []
    for path in sorted(run_dir.rglob("summary.json")):
        if len(path.relative_to(run_dir).parts) > max_depth + 1:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("task") in TASKS:
            found.append((path, data))
    return found


def _f(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _plot_humaneval(summary: dict, out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .passk import mean_pass_at_k

    per = summary.get("per_problem") or {}
    if not per:
        return []
    ns = [p["n"] for p in per.values()]
    cs = [p["correct"] for p in per.values()]
    made = []
    ks = list(range(1, min(ns) + 1))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ks, [mean_pass_at_k(ns, cs, k) for k in ks], "o-")
    ax.set(xlabel="k", ylabel="pass@k", title=f"HumanEval pass@k ({len(ns)} problems)", ylim=(0, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_passk.png", dpi=110)
    plt.close(fig)
    made.append(f"{stem}_passk.png")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist([c / n for n, c in zip(ns, cs)], bins=10, range=(0, 1))
    ax.set(xlabel="pass rate of a problem (correct / samples)", ylabel="problems",
           title="HumanEval per-problem pass rate")
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_pass_rate_hist.png", dpi=110)
    plt.close(fig)
    made.append(f"{stem}_pass_rate_hist.png")
    return made


def eval_section(run_dir: str | os.PathLike, plots: bool = True) -> tuple[list[str], list[str]]:
    """Markdown lines for the report and the PNG files written into run_dir."""
    run_dir = Path(run_dir)
    found = find_summaries(run_dir)
    if not found:
        return [], []
    lines = ["## Evaluation", ""]
    pngs: list[str] = []
    for path, s in found:
        where = path.parent.relative_to(run_dir)
        task = s["task"]
        lines.append(f"### {task} (`{where}`)")
        lines.append("")
        if task == "humaneval":
            ks = sorted((k for k in s if k.startswith("pass@")), key=lambda k: int(k[5:]))
            lines.append("| problems | samples | " + " | ".join(ks) + " | isolation |")
            lines.append("|---|---|" + "---|" * len(ks) + "---|")
            lines.append(f"| {s.get('n_problems')} | {s.get('n_samples')} | "
                         + " | ".join(_f(s[k]) for k in ks) + f" | {s.get('isolation')} |")
            if plots:
                made = _plot_humaneval(s, run_dir, str(where).replace(os.sep, "_"))
                pngs += made
                lines += [""] + [f"![{m}]({m})" for m in made]
        elif task == "humaneval-fim":
            lines.append("| subset | tasks | published | pass@1 |")
            lines.append("|---|---|---|---|")
            for name, sub in s.get("subsets", {}).items():
                lines.append(f"| {name} | {sub.get('n_tasks')} | {sub.get('n_tasks_published')} | "
                             f"{_f(sub.get('pass@1'))} |")
        elif task == "insecure-code":
            lines.append(f"insecure rate **{_f(s.get('insecure_rate'))}** "
                         f"({s.get('n_insecure')} of {s.get('n_samples')} completions flagged"
                         + (f"; detector `{s['detector']}`" if s.get("detector") else "") + ")")
            dets = s.get("per_detector") or {}
            if dets:
                lines += ["", "| detector | flagged | rate |", "|---|---|---|"]
                lines += [f"| {d} | {v['n_insecure']} | {_f(v['rate'])} |" for d, v in dets.items()]
            per = s.get("per_cwe") or {}
            if per:
                lines += ["", "| CWE | flagged | rate |", "|---|---|---|"]
                lines += [f"| {c} | {v['n_insecure']} | {_f(v['rate'])} |" for c, v in per.items()]
        elif task == "bpb":
            lines.append(f"bits per byte **{_f(s.get('bpb'))}** on split `{s.get('split')}` "
                         f"({s.get('tokens')} tokens, {s.get('bytes')} bytes)")
        lines.append("")
    return lines, pngs
