"""`nanoseek report RUN_DIR`: report.md with a table of the run and matplotlib PNG plots.

    nanoseek report runs/speedrun/train
    >>> from nanoseek.train.report import write_report
    >>> write_report("runs/speedrun/train")      # -> runs/speedrun/train/report.md

Reads what the trainer writes (metrics.jsonl, summary.json, train_config.json, samples.jsonl)
and produces
    report.md          config, parameters, tokens, time, final losses, val bpb, throughput, MFU,
                       the last sample completions
    loss.png           training loss terms (CE, MTP) per step, with validation loss points
    bpb.png            validation bits-per-byte per step
    expert_load.png    routed-expert load (share of tokens) per expert, per layer, at the end,
                       and the max/mean imbalance of each layer over training
and, when `nanoseek eval` results live below the run directory, an Evaluation section (a table
per task, pass@k curve, per-problem pass-rate histogram; see nanoseek/eval/report.py), and,
when RUN/post_training.json exists (the speedrun writes it), a section per post-training stage
(SFT, ...): its loss curve and held-out pass@1 / syntax-valid rate before and after it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nanoseek.jsonl import read_jsonl


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a log a kill may have cut mid-line (the torn line is skipped); [] if absent."""
    return list(read_jsonl(path, skip_invalid=True)) if path.is_file() else []


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _warmup(cfg: dict, steps) -> str:
    """The warm-up the trainer applied: capped at a fifth of the run (trainer.py)."""
    w = cfg.get("warmup_steps")
    if w is None or not steps:
        return str(w)
    return str(min(w, max(1, steps // 5)))


def make_plots(run_dir: Path, steps: list[dict], evals: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        x = [r["step"] for r in steps]
        ax.plot(x, [r["ce"] for r in steps if "ce" in r] or [r["loss"] for r in steps], label="train CE", lw=1)
        if all("mtp" in r for r in steps):
            ax.plot(x, [r["mtp"] for r in steps], label="train MTP CE", lw=1, alpha=0.7)
        if evals:
            ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="val CE")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.set_title("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "loss.png", dpi=110)
        plt.close(fig)
        made.append("loss.png")
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([e["step"] for e in evals], [e["val_bpb"] for e in evals], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.set_title("validation bits per byte")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "bpb.png", dpi=110)
        plt.close(fig)
        made.append("bpb.png")
    with_load = [r for r in steps if r.get("expert_load")]
    if with_load:
        last = with_load[-1]["expert_load"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for i, row in enumerate(last):
            tot = sum(row) or 1
            a1.plot(range(len(row)), [v / tot for v in row], "o-", label=f"routed layer {i}", lw=1)
        a1.axhline(1 / len(last[0]), color="k", ls="--", lw=0.8, label="uniform")
        a1.set_xlabel("expert")
        a1.set_ylabel("share of routed tokens")
        a1.set_title(f"expert load at step {with_load[-1]['step']}")
        a1.legend(fontsize=7)
        xs = [r["step"] for r in with_load]
        for i in range(len(last)):
            a2.plot(xs, [r["expert_imbalance"][i] for r in with_load], lw=1, label=f"layer {i}")
        a2.set_xlabel("step")
        a2.set_ylabel("max / mean load")
        a2.set_title("expert-load imbalance")
        a2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        made.append("expert_load.png")
    return made


def _series(ax, steps: list[dict], keys: list[str], style: str = "-") -> None:
    for k in keys:
        pts = [(r["step"], r[k]) for r in steps if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), style, lw=1, label=k, **({"marker": "."} if style == "-" and len(pts) < 30 else {}))


def objective_plots(run_dir: Path, steps: list[dict], evals: list[dict]) -> list[str]:
    """RL (reward terms, held-out pass@k, entropy / clipping / KL, time split) and distillation
    (KL per teacher, held-out KL) plots, when the run has those metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if any("reward" in r for r in steps):
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
        _series(a1, steps, sorted({k for r in steps for k in r if k.startswith("reward")} | {"pass_rate"}))
        _series(a1, evals, sorted({k for e in evals for k in e if k.startswith("heldout_")} - {"heldout_tasks"}), "o-")
        a1.set_title("reward per term (train) and held-out")
        _series(a2, steps, ["entropy", "clip_fraction", "approx_kl", "k3_kl", "zero_var_groups", "truncated"])
        a2.set_title("policy")
        _series(a3, steps, ["generation_s", "scoring_wait_s", "dt"])
        a3.set_title("step time (s)")
        for a in (a1, a2, a3):
            a.set_xlabel("step")
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "rl.png", dpi=110)
        plt.close(fig)
        made.append("rl.png")
    if any("kl" in r for r in steps):
        fig, ax = plt.subplots(figsize=(7, 4))
        _series(ax, steps, ["kl"] + sorted({k for r in steps for k in r if k.startswith("kl_teacher")}))
        _series(ax, evals, sorted({k for e in evals for k in e if k.startswith("heldout_kl")}), "o-")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.set_title("reverse KL to the teachers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "kl.png", dpi=110)
        plt.close(fig)
        made.append("kl.png")
    return made


def objective_rows(steps: list[dict], evals: list[dict]) -> list[tuple[str, str]]:
    """Report-table rows of RL / distillation runs: rewards, held-out results, time split."""
    rows: list[tuple[str, str]] = []
    tail = steps[-10:]

    def mean(k):
        v = [r[k] for r in tail if isinstance(r.get(k), (int, float))]
        return sum(v) / len(v) if v else None

    if any("reward" in r for r in steps):
        rows.append(("reward / pass rate (mean of last 10 steps)", f"{_fmt(mean('reward'))} / {_fmt(mean('pass_rate'))}"))
        gen, score, dt, data = mean("generation_s"), mean("scoring_wait_s"), mean("dt"), mean("data_s")
        if dt:
            upd = dt - (data or 0)
            rows.append(("step time split: generation / scoring wait / update",
                         f"{_fmt(gen)} s / {_fmt(score)} s / {_fmt(upd)} s of {_fmt(dt)} s"))
    if any("kl" in r for r in steps):
        rows.append(("reverse KL (mean of last 10 steps)", _fmt(mean("kl"))))
    held = [e for e in evals if any(k.startswith("heldout_") for k in e)]
    if held:
        last = held[-1]
        rows.append((f"held-out (step {last['step']})", ", ".join(
            f"{k[8:]} {_fmt(v)}" for k, v in sorted(last.items()) if k.startswith("heldout_") and k != "heldout_tasks")))
    return rows


POST_TRAINING_FILE = "post_training.json"


def _stage_plot(run: Path, name: str, stage_dir: Path) -> str | None:
    """Loss curve of a post-training run (train CE per step, val loss points) as PNG in `run`."""
    recs = _read_jsonl(stage_dir / "metrics.jsonl")
    steps = [r for r in recs if ("ce" in r or "reward" in r) and "event" not in r]
    evals = [r for r in recs if r.get("event") == "eval" and "val_loss" in r]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if "reward" in steps[0]:          # an RL stage: its reward terms
        _series(ax, steps, sorted(k for k in steps[0] if k.startswith("reward") or k == "pass_rate"))
        ax.set_ylabel("mean reward per term")
    else:
        ax.plot([r["step"] for r in steps], [r["ce"] for r in steps], lw=1, label="train CE (assistant tokens)")
        if evals:
            ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="held-out CE")
        ax.set_ylabel("nats / token")
    ax.set_xlabel("step")
    ax.set_title(f"{name} loss" if "reward" not in steps[0] else f"{name} reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = f"{name.lower()}_loss.png"
    fig.savefig(run / out, dpi=110)
    plt.close(fig)
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _stage_lines(run: Path, st: dict, tasks: dict) -> list[str]:
    name = st["name"]
    lines = [f"## {name}", ""]
    summ = st.get("summary") or {}
    data = summ.get("sft_data") or {}
    if summ:
        val = summ.get("val") or {}
        shown = f"held-out CE {_fmt(val.get('val_loss'))}" if "val_loss" in val else ", ".join(
            f"held-out {k[8:]} {_fmt(v)}" for k, v in sorted(val.items()) if k.startswith("heldout_") and k != "heldout_tasks")
        lines += [f"{summ.get('steps')} steps, {_fmt(summ.get('tokens'))} tokens in "
                  f"{_fmt(summ.get('train_seconds'))} s ({_fmt(summ.get('tok_per_s'))} tok/s); {shown or '-'}"
                  + (f"; {data.get('examples')} training conversations, "
                     f"{data.get('val_examples')} held out" if data else "") + ".", ""]
        rl_steps = [r for r in _read_jsonl(Path(st["run_dir"]) / "metrics.jsonl") if "reward" in r and "event" not in r]
        if rl_steps:
            a, b = rl_steps[0], rl_steps[-1]
            terms = sorted(k for k in b if k.startswith("reward_") or k == "pass_rate")
            lines += ["Training reward, first -> last step: " + ", ".join(
                [f"total {_fmt(a['reward'])} -> {_fmt(b['reward'])}"] +
                [f"{k.removeprefix('reward_')} {_fmt(a.get(k))} -> {_fmt(b.get(k))}" for k in terms]) + ".", ""]
    plot = _stage_plot(run, name, Path(st["run_dir"])) if st.get("run_dir") else None
    if plot:
        lines += [f"![{name} loss]({plot})", ""]
    lines += [f"Held-out mined tasks ({st.get('n_tasks', '-')} of {_fmt(tasks.get('held_out'))}; greedy):", "",
              "| protocol | pass@1 before | pass@1 after | syntax-valid before | syntax-valid after |",
              "|---|---|---|---|---|"]
    before, after = st.get("before") or {}, st.get("after") or {}
    for proto in sorted(set(before) | set(after)):
        b, a = before.get(proto) or {}, after.get(proto) or {}
        lines.append(f"| {proto} | {_pct(b.get('pass@1'))} | {_pct(a.get('pass@1'))} | "
                     f"{_pct(b.get('syntax_valid'))} | {_pct(a.get('syntax_valid'))} |")
    lines.append("")
    for smp in (st.get("samples") or [])[:2]:
        lines += [f"Sample answer after {name} (`{smp['task_id']}`):", "", "````", smp["answer"].strip(), "````", ""]
    return lines


def post_training_section(run: Path) -> list[str]:
    """Sections for the post-training stages recorded in RUN/post_training.json (written by the
    speedrun): per stage its loss curve, and held-out pass@1 / syntax-valid rate before and after.

    post_training.json: {"tasks": {"held_out": N, ...}, "stages": [{"name": "SFT", "run_dir": ...,
    "summary": {...}, "n_tasks": n, "before": {protocol: {"pass@1", "syntax_valid", "n"}},
    "after": {...}, "samples": [{"task_id", "answer"}]}]}"""
    path = run / POST_TRAINING_FILE
    if not path.is_file():
        return []
    info = json.loads(path.read_text(encoding="utf-8"))
    lines: list[str] = []
    for st in info.get("stages", []):
        lines += _stage_lines(run, st, info.get("tasks") or {})
    return lines


def write_report(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir)
    recs = _read_jsonl(run / "metrics.jsonl")
    if not recs:
        raise FileNotFoundError(f"{run} has no metrics.jsonl: not a nanoseek training run (or it has not started)")
    steps = [r for r in recs if "loss" in r and "event" not in r]
    all_evals = [r for r in recs if r.get("event") == "eval"]
    evals = [r for r in all_evals if "val_loss" in r]         # RL / distillation evals carry other keys
    start = next((r for r in recs if r.get("event") == "start"), {})
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    cfg = json.loads((run / "train_config.json").read_text()) if (run / "train_config.json").is_file() else {}
    samples = _read_jsonl(run / "samples.jsonl")
    plots = make_plots(run, steps, evals) + objective_plots(run, steps, all_evals)

    last = steps[-1] if steps else {}
    tail = steps[-10:]

    def tail_mean(k):
        vals = [r[k] for r in tail if k in r]
        return sum(vals) / len(vals) if vals else None

    rows = [
        ("model", cfg.get("model") or f"depth {cfg.get('depth')}"),
        ("parameters (total / activated)", f"{_fmt(start.get('params'))} / {_fmt(start.get('activated_params'))}"),
        ("device / world size / autocast", f"{start.get('device', '-')} / {start.get('world', '-')} / {start.get('autocast', '-')}"),
        ("sequence length / batch tokens", f"{cfg.get('seq_len', '-')} / {_fmt(start.get('batch_tokens'))}"),
        ("steps / tokens", f"{_fmt(last.get('step'))} / {_fmt(last.get('tokens'))}"),
        ("training time (s) / wall time (s)", f"{_fmt(summary.get('train_seconds'))} / {_fmt(summary.get('wall_seconds'))}"),
        ("peak LR / schedule", f"{_fmt(cfg.get('lr'))} / warm-up {_warmup(cfg, last.get('step'))} steps, "
                               f"{cfg.get('decay_shape')} decay over last {cfg.get('decay_frac')}"),
        ("final train loss (mean of last 10 steps)", _fmt(tail_mean("loss"))),
        ("  CE / MTP / balance / indexer KL", " / ".join(_fmt(tail_mean(k)) for k in ("ce", "mtp", "balance", "indexer"))),
        ("val loss (nats/token)", _fmt(evals[-1]["val_loss"]) if evals else "-"),
        ("**val bits per byte**", f"**{_fmt(evals[-1]['val_bpb'])}**" if evals else "-"),
        ("throughput (tokens/s)", _fmt(summary.get("tok_per_s") or tail_mean("tok_per_s"))),
        ("MFU", f"{100 * (summary.get('mfu') or tail_mean('mfu') or 0):.2f}% of "
                f"{(start.get('peak_flops') or 0) / 1e12:.3g} TFLOP/s"),
        ("expert imbalance max/mean (last step, per layer)", ", ".join(f"{v:.2f}" for v in last.get("expert_imbalance", []))),
    ]
    rows += objective_rows(steps, all_evals)
    lines = [f"# Training report: {run.name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines.append("")
    for p in plots:
        lines += [f"![{p[:-4]}]({p})", ""]
    if samples:
        final_step = samples[-1]["step"]
        lines += [f"## Samples (greedy, step {final_step})", ""]
        for s in [s for s in samples if s["step"] == final_step]:
            lines += ["```python", s["prompt"] + s["completion"], "```", ""]
    # results of `nanoseek eval ...` written inside the run directory (tables + pass@k plots)
    from ..eval.report import eval_section

    eval_lines, _ = eval_section(run)
    lines += eval_lines
    lines += post_training_section(run)
    lines += ["## Configuration", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    out = run / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
