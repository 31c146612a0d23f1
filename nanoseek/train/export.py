"""Self-contained model directories: weights, tokenizer and generation defaults in one place.

Every model nanoseek writes for use is one directory that loads with no other argument, in
nanoseek (`nanoseek generate|chat|serve --model DIR`) and in transformers
(`AutoModelForCausalLM.from_pretrained(DIR)`, `AutoTokenizer.from_pretrained(DIR)`):

    DIR/config.json, model.safetensors        Transformer.save_pretrained (nanoseek/checkpoint.py)
        tokenizer.json, tokenizer_config.json nanoseek.data.tokenizer (transformers' fast tokenizer)
        nanoseek_tokenizer.json               nanoseek's tokenizer metadata
        generation_config.json                BOS/EOS/PAD ids + nanoseek's default sampling

    >>> from nanoseek.train.export import write_model_dir
    >>> write_model_dir(model, "runs/tokenizer", "runs/x/final")        # atomic, returns the Path
    >>> write_model_dir(model, tok, "out", generation_config={"temperature": 0.6, "top_p": 0.95})

Inside a directory that is already being written atomically (a training checkpoint), use
`write_model_files`, or give `save_checkpoint` `tokenizer=ModelDirFiles(tokenizer)` (its
`save(dir)` writes the tokenizer files and generation_config.json) or the model as
`SelfContained(model, tokenizer)` (its `save_pretrained(dir)` writes everything), so every
step checkpoint is loadable alone.

`model` is anything with `config` and `save_pretrained(path)` (a Transformer, or the trainer's
view of FSDP-gathered tensors); nothing else of it is touched. `tokenizer` is a loaded
`Tokenizer` or a tokenizer directory; from a directory the files are copied byte for byte, so
`tokenizer_fingerprint` of the model directory equals that of the tokenizer the shards were
made with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nanoseek.data.tokenizer import Tokenizer, load_tokenizer
from nanoseek.train.checkpoint import _fsync_dir, _fsync_tree

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "nanoseek_tokenizer.json")

# `nanoseek generate`'s defaults (engine/cli.py _add_sampling_args): greedy, no top-k/top-p cut.
DEFAULT_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 128}
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")


# ----------------------------------------------------------------------------- generation config
def generation_config_json(tokenizer: Tokenizer, overrides: dict | None = None) -> dict:
    """The generation_config.json content: special ids + sampling defaults in transformers' terms.

    `overrides` may use nanoseek's terms (temperature 0 = greedy) or transformers' keys (any
    other key is written as given). transformers has no "temperature 0": greedy is
    `do_sample: false`, and sampling-only keys are then left out, because transformers warns
    about them (and its own save_pretrained refuses to write them) when do_sample is false.
    """
    s = {**DEFAULT_SAMPLING, **(overrides or {})}
    if "do_sample" not in s:
        s["do_sample"] = float(s["temperature"]) > 0
    if not s["do_sample"]:
        for k in _SAMPLING_ONLY:
            s.pop(k, None)
    # top_k 0 means "off" in transformers too, but its unset default is 50: keep the 0 explicit.
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {**ids, **s}


# ----------------------------------------------------------------------------- tokenizer files
def copy_tokenizer_files(tokenizer: Tokenizer | str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Put the tokenizer files into `dst` (created if needed); returns the paths written.

    A directory is copied byte for byte (tokenizer.json is required, the other two are copied
    when present; a directory without tokenizer_config.json is re-saved so transformers can
    load it). A Tokenizer object is written with `Tokenizer.save`.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(dst)
    else:
        src = Path(tokenizer)
        src = src.parent if src.is_file() else src     # load_tokenizer also takes tokenizer.json itself
        if not (src / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {src}; train one with `nanoseek tokenizer train`")
        if not (src / "tokenizer_config.json").is_file():
            load_tokenizer(src).save(dst)
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
                shutil.copyfile(src / name, dst / name)
    return [dst / n for n in TOKENIZER_FILES if (dst / n).is_file()]


def _as_tokenizer(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    return tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)


def _check_compatible(config, tok: Tokenizer) -> None:
    """Refuse a directory that would fail on load: ids beyond the embedding, or a BOS/EOS that the
    model was not trained with (config.json is what transformers and the official code read)."""
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")
    for name in ("bos", "eos"):
        want, got = getattr(config, f"{name}_token_id", None), getattr(tok, f"{name}_id")
        if want is not None and want != got:
            raise ValueError(f"config.json {name}_token_id is {want} but the tokenizer's is {got}")


# ----------------------------------------------------------------------------- writing
def write_model_files(model, tokenizer: Tokenizer | str | os.PathLike, path: str | os.PathLike, *,
                      generation_config: dict | None = None) -> Path:
    """Write weights, tokenizer and generation_config.json into `path` in place (not atomic:
    for a directory the caller is already writing atomically)."""
    path = Path(path)
    SelfContained(model, tokenizer, generation_config).save_pretrained(path)
    return path


def write_model_dir(model, tokenizer: Tokenizer | str | os.PathLike, out_dir: str | os.PathLike, *,
                    generation_config: dict | None = None) -> Path:
    """Atomically write a self-contained model directory at `out_dir`; returns its Path.

    Written under `.tmp-NAME-PID` next to it, fsync'ed, then renamed into place (as training
    checkpoints are), so a crash leaves the old directory or the new one, never a mix. An existing
    model directory at `out_dir` is replaced; any other non-empty directory is refused.
    """
    writer = SelfContained(model, tokenizer, generation_config)  # checks before anything is written
    final = Path(out_dir)
    if final.exists() and not (final / "config.json").is_file() and any(final.iterdir()):
        raise FileExistsError(f"{final} exists and is not a model directory; refusing to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)     # debris of an interrupted write by a process of our pid
    try:
        writer.save_pretrained(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():      # a directory cannot be renamed over a non-empty one: move the old aside
        old = final.parent / f".tmp-old-{final.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class ModelDirFiles:
    """The files of a model directory besides the weights: tokenizer files + generation_config.json.

    Its `save(dir)` fits `save_checkpoint(..., tokenizer=...)`, which calls `.save(tmp_dir)` inside
    its own atomic write; `config` (the model's), if given, is checked against the tokenizer once
    here rather than at every checkpoint. The tokenizer is loaded once.
    """

    def __init__(self, tokenizer: Tokenizer | str | os.PathLike, generation_config: dict | None = None,
                 config=None):
        self.source = tokenizer
        self.tokenizer = _as_tokenizer(tokenizer)
        if config is not None:
            _check_compatible(config, self.tokenizer)
        self.generation_config = generation_config_json(self.tokenizer, generation_config)

    def save(self, directory: str | os.PathLike) -> None:
        copy_tokenizer_files(self.source, directory)
        _write_json(Path(directory) / GENERATION_CONFIG, self.generation_config)


class SelfContained:
    """A model whose `save_pretrained(path)` also writes the tokenizer and generation_config.json.

    For code that only calls `model.save_pretrained` inside its own atomic temp directory:
        save_checkpoint(run_dir, step, SelfContained(model, tokenizer_dir), state)
    """

    def __init__(self, model, tokenizer: Tokenizer | str | os.PathLike, generation_config: dict | None = None):
        self.model = model
        self.files = ModelDirFiles(tokenizer, generation_config, model.config)

    @property
    def config(self):
        return self.model.config

    def save_pretrained(self, path: str | os.PathLike) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.files.save(path)
