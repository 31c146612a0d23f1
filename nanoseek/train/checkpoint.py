"""Training checkpoints: atomic, keep-last-N, nothing unpickled.

    RUN/checkpoints/step-00000100/
        config.json, model.safetensors     the model, in nanoseek's interchange format
                                           (loads with Transformer.from_pretrained)
        tokenizer.json, ...,               the run's tokenizer and generation_config.json, when it has a
        generation_config.json             tokenizer (nanoseek.train.export.ModelDirFiles)
        train_state.safetensors            optimizer state, LR-schedule position, data-loader
                                           positions, RNG states, trainer counters
    >>> from nanoseek.train.checkpoint import latest_checkpoint, load_tree
    >>> tree = load_tree(latest_checkpoint("runs/x") / "train_state.safetensors")

Atomicity: a checkpoint is written under `checkpoints/.tmp-step-N-PID/`, every file fsync'ed,
then the directory is renamed to `step-N` (rename is atomic on POSIX) and the parent fsync'ed.
A `kill -9` at any moment therefore leaves either the old set of `step-*` directories or the
old set plus one complete new one; leftover `.tmp-*` directories are ignored and swept by the
next save.

`train_state.safetensors` stores arbitrary nested state (dicts with int or str keys, lists,
numbers, strings, tensors): tensors become safetensors entries, the structure is JSON in the
file's metadata. Loading never runs pickle (the issue's `weights_only` requirement, met by
construction).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_FILE = "train_state.safetensors"
CHECKSUMS = "checksums.json"
_PREFIX = "step-"


def _encode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode_key(k), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _encode_key(k):
    if isinstance(k, (bool, int, str)):
        return k
    raise TypeError(f"checkpoint dict keys must be int or str, got {type(k).__name__}")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        raise ValueError("malformed checkpoint tree")
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_tree(obj, path: str | os.PathLike) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    save_file(tensors, str(path), metadata={"format": "nanoseek-train-state", "tree": json.dumps(tree)})


def load_tree(path: str | os.PathLike):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "nanoseek-train-state":
            raise ValueError(f"{path} is not a nanoseek training-state file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:  # (a tree nested ~1,000 deep is a RecursionError in json or in _decode: malformed too)
        return _decode(json.loads(meta.get("tree", "")), tensors)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: malformed checkpoint tree ({type(e).__name__}: {e})"[:500]) from None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(d: Path) -> None:
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(d)


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit() \
                and (p / STATE_FILE).is_file() and (p / "config.json").is_file():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, state: dict, keep_last: int = 3,
                    tokenizer=None) -> Path:
    """Atomically write checkpoint `step` (model + state tree) and prune to the newest keep_last.
    With a tokenizer (anything with `.save(dir)`), its files go into the checkpoint too, so every
    step checkpoint is a model directory that `nanoseek generate/chat/serve` load alone."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):          # debris of an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    save_tree(state, tmp / STATE_FILE)
    write_checksums(tmp)
    _fsync_tree(tmp)
    if final.exists():                          # re-saving the same step: move the old one aside first
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_state(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's state dict (internal names) from a checkpoint directory, exact dtypes kept."""
    from nanoseek.checkpoint import official_to_state_dict, read_official_tensors

    return official_to_state_dict(read_official_tensors(Path(ckpt_dir)))


# ---------------------------------------------------------------------------------------------
# Integrity: every checkpoint carries the SHA-256 of its files; resume takes the newest intact one

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(ckpt_dir: str | os.PathLike) -> None:
    """checksums.json: size and SHA-256 of every other file of the checkpoint (written last)."""
    d = Path(ckpt_dir)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(d.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    (d / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1) + "\n")


def checkpoint_problem(ckpt_dir: str | os.PathLike) -> str | None:
    """Why a checkpoint cannot be resumed from (a missing, truncated or altered file), or None.
    Checkpoints written before checksums existed are checked for readable safetensors headers."""
    d = Path(ckpt_dir)
    sums = d / CHECKSUMS
    if sums.is_file():
        try:
            files = json.loads(sums.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{CHECKSUMS} is unreadable"
        for name, want in files.items():
            p = d / name
            if not p.is_file():
                return f"{name} is missing"
            if p.stat().st_size != want["bytes"]:
                return f"{name} has {p.stat().st_size} bytes, {want['bytes']} were written"
            if _sha256(p) != want["sha256"]:
                return f"{name} does not match its checksum"
        if not any(n.startswith("model") and n.endswith(".safetensors") for n in files):
            return "no model weights"
        return None
    for p in [d / STATE_FILE, *sorted(d.glob("model*.safetensors"))]:
        try:
            with safe_open(str(p), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - any failure to read the header means damaged
            return f"{p.name} is unreadable ({type(e).__name__})"
    if not list(d.glob("model*.safetensors")):
        return "no model weights"
    return None


def latest_intact_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint that passes checkpoint_problem, [(newer damaged checkpoint, why)])."""
    skipped: list[tuple[Path, str]] = []
    for d in reversed(checkpoint_dirs(run_dir)):
        why = checkpoint_problem(d)
        if why is None:
            return d, skipped
        skipped.append((d, why))
    return None, skipped

