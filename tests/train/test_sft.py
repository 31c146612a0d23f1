"""SFT on the one trainer loop (nanoseek/train/sft.py): packing and labels, turn-boundary
splitting, weights, overfitting one conversation, exact resume, 2-process DDP == 1 process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.train.checkpoint import latest_checkpoint, load_model_state
from nanoseek.train.sft import (SFTConfig, SFTData, SFTObjective, epoch_order, fit_conversation, pack_rows,
                                parse_data_spec, render, row_tensors, sft_train_config)
from nanoseek.train.trainer import train

from .conftest import torchrun

ANSWER = "def add(a, b):\n    return a + b"
CONVERSATION = {"messages": [{"role": "user", "content": "Write add."},
                             {"role": "assistant", "content": ANSWER}]}


@pytest.fixture(scope="module")
def base_model(train_data, tmp_path_factory):
    """A random tiny model directory (weights + the fixture tokenizer), the SFT starting point."""
    from nanoseek.train.export import write_model_dir

    _, tok_dir = train_data
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size))
    out = tmp_path_factory.mktemp("base") / "model"
    write_model_dir(model, tok, out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def sft_cfg(base_model, out, **kw):
    base = dict(seq_len=64, micro_batch=2, max_steps=4, lr=3e-3, warmup_steps=1, eval_every=0,
                progress=False, tensorboard=False, peak_tflops=1.0, sample_prompts=[], ckpt_every=0)
    base.update(kw)
    return sft_train_config(str(base_model), str(out), **base)


def conversations(n: int) -> list[dict]:
    ops = [("add", "+"), ("sub", "-"), ("mul", "*")]
    out = []
    for i in range(n):
        name, op = ops[i % 3]
        out.append({"messages": [{"role": "user", "content": f"Write {name}{i}."},
                                 {"role": "assistant", "content": f"def {name}{i}(a, b):\n    return a {op} b"}]})
    return out


# ------------------------------------------------------------------------- data plumbing

def test_data_spec_and_weighted_epochs():
    assert parse_data_spec("a.jsonl") == ("a.jsonl", 1.0)
    assert parse_data_spec("dir:x/a.jsonl:0.5") == ("dir:x/a.jsonl", 0.5)
    with pytest.raises(ValueError):
        parse_data_spec("a.jsonl:-1")
    w = [2.0] * 10 + [0.5] * 1000
    counts = np.bincount(epoch_order(w, seed=0, epoch=0), minlength=len(w))
    assert (counts[:10] == 2).all()                        # integer weight: exactly that many copies
    assert 400 < counts[10:].sum() < 600 and counts[10:].max() == 1   # half, sampled
    assert not np.array_equal(epoch_order(w, 0, 0), epoch_order(w, 0, 1))   # reshuffled per epoch
    assert np.array_equal(epoch_order(w, 0, 3), epoch_order(w, 0, 3))       # deterministic


def test_rows_labels_and_documents_by_hand():
    ex = [(np.array([0, 5, 6, 7]), np.array([False, False, True, True])),
          (np.array([0, 8, 9]), np.array([False, True, True]))]
    rows = pack_rows(np.array([0, 1]), np.array([4, 3]), capacity=8)
    assert rows == [[0, 1]]
    b = row_tensors(ex, rows, seq_len=7, pad_id=2)
    assert b["input_ids"].tolist() == [[0, 5, 6, 7, 0, 8, 9]]
    # targets: 6 and 7 (masked true), then nothing across the boundary (BOS is not a target), 8, 9
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 8, 9, -100]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert b["token_mask"].all()                                            # a full row: no padding
    b = row_tensors(ex, [[1], [0]], seq_len=5, pad_id=2)                   # padded rows
    assert b["input_ids"].tolist() == [[0, 8, 9, 2, 2], [0, 5, 6, 7, 2]]
    assert b["token_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 4 + [False]]
    assert pack_rows(np.array([0, 1, 0]), np.array([4, 3]), capacity=6) == [[0], [1], [0]]


def test_long_conversations_split_at_turns_or_dropped(train_data):
    tok = load_tokenizer(train_data[1])
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(3):
        msgs += [{"role": "user", "content": f"question {i} " + "x " * 10},
                 {"role": "assistant", "content": f"answer {i} " + "y " * 10}]
    whole = len(render(msgs, tok)[0])
    one_turn = len(render(msgs[:3], tok)[0])
    pieces, split, dropped = fit_conversation(msgs, lambda m: render(m, tok), capacity=whole - 1)
    assert split == 2 and dropped == 0 and len(pieces) == 2
    texts = [tok.decode(ids) for ids, _ in pieces]
    assert all(t.startswith(tok.decode([tok.bos_id]) + "Be brief.") for t in texts)   # system prompt kept
    assert "answer 0" in texts[0] and "answer 2" in texts[1] and "answer 2" not in texts[0]
    assert all(len(ids) <= whole - 1 for ids, _ in pieces)
    # a turn longer than the row alone is dropped, the others kept
    long = msgs[:1] + [{"role": "user", "content": "z " * 200}, {"role": "assistant", "content": "w"}] + msgs[3:]
    pieces, split, dropped = fit_conversation(long, lambda m: render(m, tok), capacity=one_turn + 4)
    assert dropped == 1 and all("z z" not in tok.decode(ids) for ids, _ in pieces)
    assert fit_conversation(msgs, lambda m: render(m, tok), capacity=whole) == ([render(msgs, tok)], 0, 0)


def test_sft_data_counts_invalid_lines_and_holds_out(train_data, tmp_path):
    tok = load_tokenizer(train_data[1])
    f = write_jsonl(tmp_path / "d.jsonl", conversations(60))
    with open(f, "a") as fh:
        fh.write("not json\n" + json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    data = SFTData(SFTConfig(data=[str(f)], val_fraction=0.2), tok, capacity=65, seed=0)
    data.finalize()
    st = data.stats
    assert st["conversations"] == 62 and st["invalid"] == 2 and len(data.errors) == 2
    assert st["examples"] + st["val_examples"] == 60 and 3 <= st["val_examples"] <= 25
    assert st["trained_tokens"] == sum(int(m.sum()) for _, m in data.train)
    again = SFTData(SFTConfig(data=[str(f)], val_fraction=0.2), tok, capacity=65, seed=0)
    assert [x.tolist() for x, _ in again.val] == [x.tolist() for x, _ in data.val]   # deterministic split


def test_loader_steps_over_empty_epochs_and_refuses_starved_shards(train_data, tmp_path):
    from nanoseek.train.sft import SFTLoader

    tok = load_tokenizer(train_data[1])
    f = write_jsonl(tmp_path / "d.jsonl", conversations(2))
    data = SFTData(SFTConfig(data=[f"{f}:0.3"], val_fraction=0.0), tok, capacity=65, seed=0)
    # with weight 0.3 some epochs hold no example at all: the loader moves on instead of stopping
    ld = SFTLoader(data, 1, 64, 0, 1, seed=1, pad_id=tok.pad_id)
    assert any(len(ld.rows(e)) == 0 for e in range(20))
    batches = [next(ld) for _ in range(10)]
    assert all(b["input_ids"].shape == (1, 64) for b in batches)
    # a shard that can never get a row is a clear error, not a bare StopIteration
    one = SFTData(SFTConfig(data=[str(write_jsonl(tmp_path / "one.jsonl", conversations(1)))], val_fraction=0.0),
                  tok, capacity=65)
    with pytest.raises(ValueError, match="got no row"):
        next(SFTLoader(one, 1, 64, 1, 2, seed=0, pad_id=tok.pad_id))


# ------------------------------------------------------------------------- training

def test_sft_overfits_one_conversation_and_writes_a_model_dir(base_model, tmp_path):
    from nanoseek.engine.loading import load_model_and_tokenizer
    from nanoseek.engine.generate import generate_full

    data = write_jsonl(tmp_path / "one.jsonl", [CONVERSATION])
    out = tmp_path / "sft"
    s = train(sft_cfg(base_model, out, max_steps=60, micro_batch=1, lr=1e-2, warmup_steps=5),
              SFTObjective(SFTConfig(data=[str(data)])))
    recs = records(out)
    assert recs[-1]["ce"] < 0.1 * recs[0]["ce"], (recs[0]["ce"], recs[-1]["ce"])
    # the model directory loads with no other argument, and greedy chat gives the answer back
    model, tok = load_model_and_tokenizer(out / "model")
    assert s["model_dir"] == str(out / "model") and (out / "model" / "generation_config.json").is_file()
    prompt = render(CONVERSATION["messages"][:1], tok)[0]
    [c] = generate_full(model, [prompt], 32, tokenizer=tok)
    assert c.text == ANSWER


class _Crash(SFTObjective):
    def __call__(self, model, batch, phase):
        if phase["step"] == 4:
            raise RuntimeError("simulated crash")
        return super().__call__(model, batch, phase)


def test_sft_resume_is_bitwise_identical(base_model, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", conversations(40)))
    a, b = tmp_path / "straight", tmp_path / "crashed"
    train(sft_cfg(base_model, a, max_steps=6, ckpt_every=3), SFTObjective(SFTConfig(data=[data])))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(sft_cfg(base_model, b, max_steps=6, ckpt_every=3), _Crash(SFTConfig(data=[data])))
    train(sft_cfg(base_model, b, max_steps=6, ckpt_every=3, resume=True), SFTObjective(SFTConfig(data=[data])))
    ra, rb = records(a), records(b)
    assert [r["step"] for r in rb] == list(range(1, 7))
    for x, y in zip(ra, rb):
        for k in ("loss", "ce", "mtp", "grad_norm", "lr", "pack_fill"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
    sa, sb = load_model_state(latest_checkpoint(a)), load_model_state(latest_checkpoint(b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sft_torchrun_two_processes_match_one(base_model, tmp_path, mode):
    data = str(write_jsonl(tmp_path / "d.jsonl", conversations(40)))
    single = tmp_path / "single"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    # (fp32 Newton-Schulz: Muon batches its matrices differently over 2 ranks, and bf16 rounds
    # differently in another batch)
    train(sft_cfg(base_model, single, max_steps=3, batch_tokens=256, muon_ns_dtype="float32"),
          SFTObjective(SFTConfig(data=[data])))
    torch.set_num_threads(n)
    torchrun(["sft", str(base_model), "--data", data, "--out", str(tmp_path / mode), "--seq-len", "64",
              "--micro-batch", "2", "--batch-tokens", "256", "--max-steps", "3", "--lr", "3e-3", "--warmup-steps", "1",
              "--eval-every", "0", "--muon-ns-dtype", "float32", "--peak-tflops", "1", "--no-progress",
              *(["--fsdp"] if mode == "fsdp" else [])], tmp_path, 29521 if mode == "ddp" else 29522, timeout=240)
    rd, rs = records(tmp_path / mode), records(single)
    assert len(rd) == len(rs) == 3
    for x, y in zip(rd, rs):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
        assert x["expert_load"] == y["expert_load"]
    assert (tmp_path / mode / "model" / "tokenizer.json").is_file()


def test_every_rank_runs_as_many_validation_batches(train_data, tmp_path):
    """Under FSDP each validation forward is a collective: ranks with fewer held-out rows pad
    with target-free batches instead of leaving the others waiting."""
    from types import SimpleNamespace

    from nanoseek.train.parallelize import Dist

    tok = load_tokenizer(train_data[1])
    obj = SFTObjective(SFTConfig(data=[str(write_jsonl(tmp_path / "d.jsonl", conversations(60)))],
                                 val_fraction=0.05))
    cfg = SimpleNamespace(micro_batch=1, seq_len=64, seed=0, progress=False)
    run = SimpleNamespace(cfg=cfg, tokenizer=tok, dist=Dist(0, 1))
    obj.data = SFTData(obj.cfg, tok, 65, seed=0)
    world = len(obj.data.val) + 1                      # more ranks than held-out rows: the last gets none
    counts, targets = [], []
    for rank in range(world):
        run.dist = Dist(rank, world)
        bs = list(obj.val_batches(run))
        counts.append(len(bs))
        targets.append(sum(int((b["labels"] != -100).sum()) for b in bs))
    assert len(set(counts)) == 1 and counts[0] >= 1
    assert targets[-1] == 0 and sum(targets) == sum(int(m[1:].sum()) for _, m in obj.data.val)


def test_accumulated_micro_batches_weigh_every_target_token_alike():
    """Two micro-batches with 12 and 2 target tokens accumulate to the gradient of the one batch
    that holds both (the mean over all 14 targets), as the trainer runs them: the step's total
    in phase["loss_units"] (Objective.loss_units), each loss divided by the accumulation count."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).double().train()
    obj = SFTObjective(SFTConfig(), balance_alpha=0.0, indexer_weight=0.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    labels = torch.full((2, 16), -100)
    labels[0, 2:14], labels[1, 5:7] = ids[0, 3:15], ids[1, 6:8]
    batch = lambda rows: {"input_ids": ids[rows], "labels": labels[rows]}   # noqa: E731

    def grads(parts, weighted=True):
        model.zero_grad(set_to_none=True)
        phase = {"mtp_weight": 0.0}
        if weighted:
            phase.update(loss_units=sum(obj.loss_units(batch(p)) for p in parts), loss_shards=len(parts))
        for p in parts:
            (obj(model, batch(p), phase)["loss"] / len(parts)).backward()
        return {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    whole, split = grads([slice(0, 2)]), grads([slice(0, 1), slice(1, 2)])
    assert obj.loss_units(batch(slice(0, 2))) == 14 and whole.keys() == split.keys()
    # (to fp32 rounding: the model keeps its router and head softmax in fp32 even in float64)
    for n in whole:
        torch.testing.assert_close(split[n], whole[n], rtol=1e-4, atol=1e-7)
    plain = grads([slice(0, 1), slice(1, 2)], weighted=False)   # a mean per micro-batch: reweighted
    assert (plain["head.weight"] - whole["head.weight"]).abs().max() > 100 * 1e-7
