"""`nanoseek distill` (nanoseek/train/distill.py): on-policy distillation on the one loop -- the
held-out full-vocabulary KL to the teacher falls, several teachers and the sampled estimator
run, a teacher with another tokenizer is refused, resume is exact, and 2 processes (DDP or
FSDP) follow one."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.train.checkpoint import latest_checkpoint, load_model_state
from nanoseek.train.distill import DistillConfig, DistillObjective, distill_train_config
from nanoseek.train.objectives import reverse_kl
from nanoseek.train.rollouts import rollout_tensors, sample_rollouts
from nanoseek.train.trainer import TrainConfig, train

from .conftest import assert_same_model, torchrun

NAMES = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "items", "result", "index"]


@pytest.fixture(scope="module")
def models(train_data, tmp_path_factory):
    """(student dir: random tiny; teacher dirs: two tiny models pre-trained on the fixture
    corpus with different seeds; prompts file with a .heldout twin)."""
    from nanoseek.train.export import write_model_dir

    shards, tok_dir = train_data
    root = tmp_path_factory.mktemp("distill")
    teachers = []
    for seed, steps in ((1, 40), (2, 25)):
        run = root / f"teacher{seed}"
        train(TrainConfig(run_dir=str(run), shard_dir=str(shards), tokenizer_dir=str(tok_dir), model="tiny",
                          depth=None, seq_len=64, micro_batch=4, max_steps=steps, lr=1e-2, warmup_steps=2,
                          eval_every=0, eval_tokens=256, progress=False, tensorboard=False, peak_tflops=1.0,
                          sample_prompts=[], seed=seed))
        teachers.append(run / "model")
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    write_model_dir(Transformer(ModelConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size)), tok,
                    root / "student")
    rows = []
    for i in range(40):
        a, b, c = random.Random(i).sample(NAMES, 3)
        rows.append({"prompt": f"def {a}_{i}({b}, {c}):\n"})
    rows[5] = {"messages": [{"role": "user", "content": "Write a helper."}]}    # chat prompts work too
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (root / "p.heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    return root / "student", teachers, root / "p.jsonl"


def heldout_kl(student_dir, teacher_dir, prompts_file) -> float:
    """Full-vocabulary KL(student || teacher) per completion token on the student's own samples
    (fixed seed) of the held-out prompts."""
    from nanoseek.engine.loading import load_model_and_tokenizer

    student, tok = load_model_and_tokenizer(student_dir)
    teacher = Transformer.from_pretrained(teacher_dir).eval()
    prompts = [tok.encode(json.loads(x)["prompt"], add_bos=True) for x in Path(prompts_file).read_text().splitlines()]
    b = rollout_tensors(sample_rollouts(student, tok, prompts, n=2, max_new_tokens=24, seed=5), tok.pad_id)
    pos = b["labels"] != -100
    with torch.no_grad():
        return float(reverse_kl(student(b["input_ids"])[pos][None], teacher(b["input_ids"])[pos][None]))


def cfgs(models, out, **kw):
    student, teachers, prompts = models
    dc = DistillConfig(prompts=str(prompts), teachers=[str(teachers[0])], prompts_per_step=8, max_new_tokens=24,
                       **kw.pop("dc", {}))
    loop = dict(max_steps=4, lr=1e-2, eval_every=0, progress=False, tensorboard=False, peak_tflops=1.0)
    loop.update(kw)
    return distill_train_config(str(student), str(out), **loop), dc


def records(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_distill_kl_to_the_teacher_falls_by_more_than_a_third(models, tmp_path):
    student, teachers, prompts = models
    held = prompts.with_name("p.heldout.jsonl")
    cfg, dc = cfgs(models, tmp_path / "run", max_steps=30, eval_every=15)
    s = train(cfg, DistillObjective(dc))
    before = heldout_kl(student, teachers[0], held)
    after = heldout_kl(tmp_path / "run" / "model", teachers[0], held)
    assert after < before * 2 / 3, (before, after)
    recs = records(tmp_path / "run")
    assert all(k in recs[0] for k in ("kl", "kl_teacher0", "entropy", "response_len", "generation_s", "teacher_s"))
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [15, 30]
    assert evals[-1]["heldout_kl_teacher0"] < evals[0]["heldout_kl_teacher0"] * 1.5
    assert s["model_dir"]
    from nanoseek.train.report import write_report

    report = write_report(tmp_path / "run").read_text()
    assert "](kl.png)" in report and "reverse KL (mean of last 10 steps)" in report


def test_two_teachers_through_the_cli_and_the_sampled_estimator(models, tmp_path, capsys):
    student, teachers, prompts = models
    argv = ["distill", "--student", str(student), "--teacher", str(teachers[0]), "--teacher", str(teachers[1]),
            "--weights", "0.7,0.3", "--prompts", str(prompts), "--out", str(tmp_path / "two"),
            "--prompts-per-step", "4", "--max-new-tokens", "12", "--max-steps", "2", "--eval-every", "0",
            "--peak-tflops", "1", "--no-progress"]
    assert main(argv) == 0
    assert "heldout_kl" in capsys.readouterr().out
    summ = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert {"heldout_kl_teacher0", "heldout_kl_teacher1", "heldout_kl_mixture"} <= set(summ["val"])
    # the weighted KL is >= the KL to the mixture (they differ by a log-normaliser >= 0)
    assert summ["val"]["heldout_kl"] >= summ["val"]["heldout_kl_mixture"] - 1e-6
    bad = ["distill", str(student), "--teacher", str(teachers[0]), "--teacher", str(teachers[1]), "--weights",
           "0.5,0.6", "--prompts", str(prompts), "--out", str(tmp_path / "bad"), "--max-steps", "1"]
    assert main(bad) == 2
    assert "sum to 1" in capsys.readouterr().err
    cfg, dc = cfgs(models, tmp_path / "sampled", max_steps=2, dc={"estimator": "sampled"})
    recs = records(tmp_path / "sampled") if train(cfg, DistillObjective(dc)) else []
    assert len(recs) == 2 and all(r["loss"] == r["loss"] for r in recs)   # finite (not NaN)


def test_a_teacher_with_another_tokenizer_is_refused(models, train_data, tmp_path, capsys):
    from nanoseek.data.tokenizer import train_tokenizer

    student, teachers, prompts = models
    other = tmp_path / "other"
    shutil.copytree(teachers[0], other)
    corpus = Path(train_data[0]).parent / "corpus"
    train_tokenizer(corpus, 600, tmp_path / "tok600", progress=False)
    for f in ("tokenizer.json", "tokenizer_config.json", "nanoseek_tokenizer.json"):
        shutil.copy(tmp_path / "tok600" / f, other / f)
    assert main(["distill", str(student), "--teacher", str(other), "--prompts", str(prompts),
                 "--out", str(tmp_path / "x"), "--max-steps", "1", "--no-progress"]) == 2
    assert "another tokenizer than the student" in capsys.readouterr().err


class _Crash(DistillObjective):
    def __call__(self, model, batch, phase):
        if phase["step"] == 3:
            raise RuntimeError("simulated crash")
        return super().__call__(model, batch, phase)


def test_distill_resume_is_bitwise_identical(models, tmp_path):
    a, b = tmp_path / "straight", tmp_path / "crashed"
    cfg, dc = cfgs(models, a, max_steps=4, ckpt_every=2)
    train(cfg, DistillObjective(dc))
    cfg, dc = cfgs(models, b, max_steps=4, ckpt_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, _Crash(dc))
    cfg, dc = cfgs(models, b, max_steps=4, ckpt_every=2, resume=True)
    train(cfg, DistillObjective(dc))
    ra, rb = records(a), records(b)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for k in ("loss", "kl", "kl_teacher0", "grad_norm", "response_len"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
    sa, sb = load_model_state(latest_checkpoint(a)), load_model_state(latest_checkpoint(b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distill_torchrun_two_processes_match_one(models, tmp_path, mode):
    """The step's prompts split over 2 ranks give the same batches, losses and weights as one
    process over 2 micro-steps. Under FSDP each rank samples from its unsharded copy of the
    student, refreshed after every update (a stale copy changes the later steps' samples and
    so their losses), and the held-out evaluation runs it on every rank mid-run."""
    student, teachers, prompts = models
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    # fp32 Newton-Schulz: Muon splits its matrices over the ranks, and bf16 iterations round
    # differently in another batch (~1e-3 in the weights after 3 steps); fp32 makes them comparable
    cfg, dc = cfgs(models, tmp_path / "single", max_steps=3, eval_every=2, muon_ns_dtype="float32",
                   dc={"micro_steps": 2})
    dc.prompts_per_step, dc.max_new_tokens, dc.eval_prompts = 4, 12, 4
    train(cfg, DistillObjective(dc))
    torch.set_num_threads(n)
    torchrun(["distill", str(student), "--teacher", str(teachers[0]), "--prompts", str(prompts),
              "--out", str(tmp_path / mode), "--prompts-per-step", "4", "--max-new-tokens", "12", "--eval-prompts", "4",
              "--max-steps", "3", "--lr", "1e-2", "--eval-every", "2", "--muon-ns-dtype", "float32",
              "--peak-tflops", "1", "--no-progress", *(["--fsdp"] if mode == "fsdp" else [])],
             tmp_path, 29525 if mode == "ddp" else 29526)
    rd, rs = records(tmp_path / mode), records(tmp_path / "single")
    assert len(rd) == len(rs) == 3
    for x, y in zip(rd, rs):
        assert x["response_len"] == y["response_len"]               # the same samples, split over ranks
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
        assert x["kl_teacher0"] == pytest.approx(y["kl_teacher0"], rel=1e-4, abs=1e-5)
    evals = [e for e in map(json.loads, (tmp_path / mode / "metrics.jsonl").read_text().splitlines())
             if e.get("event") == "eval"]
    assert [e["step"] for e in evals] == [2, 3] and all(e["heldout_kl_teacher0"] > 0 for e in evals)
    assert_same_model(tmp_path / mode / "model", tmp_path / "single" / "model")
