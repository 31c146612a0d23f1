"""Self-contained model directories (nanoseek.train.export): one directory, loadable with no
other argument by `nanoseek generate` and by transformers' Auto classes."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, tokenizer_fingerprint
from nanoseek.train.checkpoint import load_tree, save_checkpoint
from nanoseek.train.export import (
    GENERATION_CONFIG, TOKENIZER_FILES, ModelDirFiles, SelfContained, copy_tokenizer_files, generation_config_json,
    write_model_dir, write_model_files,
)
from tests.model.conftest import perturbed

TEXTS = [
    "def alpha_1(beta, gamma):\n    beta = beta + gamma\n    return beta\n",
    "if x:\n\tpass  # tabs,   spaces\r\n    12345678 __init__ int64 0x1F",
    "héllo wörld — naïve café, 你好世界, Ελληνικά, emoji 🙂🚀\u200b",
    "a <think> b </think> <｜User｜>x<｜Assistant｜> <｜fim▁hole｜> <｜end▁of▁sentence｜>",
    "",
]
PARITY_TOL = 1e-4  # tests/model/test_transformers_parity.py


@pytest.fixture(scope="module")
def tokenizer_dir(train_data):
    return train_data[1]


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    # index_topk >= #compressed entries: transformers' tie-breaking cannot change the selection
    config = ModelConfig.from_preset("tiny", vocab_size=load_tokenizer(tokenizer_dir).vocab_size, index_topk=64)
    torch.manual_seed(0)
    return perturbed(Transformer(config), seed=5).eval()


@pytest.fixture(scope="module")
def model_dir(model, tokenizer_dir, tmp_path_factory):
    return write_model_dir(model, tokenizer_dir, tmp_path_factory.mktemp("export") / "final")


def test_directory_contents(model_dir, tokenizer_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert names == {"config.json", "model.safetensors", GENERATION_CONFIG, *TOKENIZER_FILES}
    assert not list(model_dir.parent.glob(".tmp-*"))
    # byte-for-byte copy: shards made with the original tokenizer are recognised as matching
    assert tokenizer_fingerprint(model_dir) == tokenizer_fingerprint(tokenizer_dir)
    gen = json.loads((model_dir / GENERATION_CONFIG).read_text())
    assert gen == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "do_sample": False, "max_new_tokens": 128}


def test_transformers_model_has_our_logits(model, model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert type(hf).__name__ == "DeepseekV4ForCausalLM"
    assert next(hf.parameters()).dtype == torch.float32  # config.json's dtype, no argument needed
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = model(ids), hf(ids).logits
    assert expected.abs().mean() > 0.05
    assert (got - expected).abs().max().item() <= PARITY_TOL
    # generation_config.json is picked up: greedy decoding, our ids; transformers would save it as is
    gc = hf.generation_config
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id, gc.do_sample) == (0, 1, 2, False)
    gc.validate(strict=True)
    prompt = ids[:1, :12]
    with torch.no_grad():
        hf_new = hf.generate(prompt, max_new_tokens=6)[0, 12:].tolist()
    from nanoseek.engine import generate_full

    ours = generate_full(model, prompt[0].tolist(), 6)[0].tokens
    assert [t for t in hf_new if t != gc.eos_token_id] == ours


def test_transformers_tokenizer_matches(model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for _, s in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(s) == tok.special_tokens[s], s
    assert sorted(hf.all_special_ids) == sorted(tok.special_tokens.values())
    for text in TEXTS:
        # transformers maps special-token strings to their ids (nanoseek's allow_special=True) ...
        ids = hf.encode(text)  # and adds no BOS: nanoseek prepends it itself
        assert ids == tok.encode(text, allow_special=True), text
        # ... unless asked to split them, which is nanoseek's default for document text
        assert hf.encode(text, split_special_tokens=True) == tok.encode(text), text
        assert hf.decode(ids) == text == tok.decode(ids)
    assert "<think>" not in hf.decode(tok.encode("<think>x", allow_special=True), skip_special_tokens=True)


def test_generate_cli_needs_no_tokenizer_argument(model, model_dir, capsys):
    from nanoseek.cli import main
    from nanoseek.engine import generate_full

    tok = load_tokenizer(model_dir)
    prompt = "def alpha_1(beta, gamma):\n"
    assert main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    want = generate_full(model, [tok.bos_id] + tok.encode(prompt), 6, tokenizer=tok)[0].text
    assert capsys.readouterr().out == prompt + want + "\n"


def test_sampling_overrides():
    tok = type("T", (), {"bos_id": 0, "eos_id": 1, "pad_id": 2})()
    sampled = generation_config_json(tok, {"temperature": 0.6, "top_p": 0.95})
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.6 and sampled["top_p"] == 0.95
    assert sampled["top_k"] == 0  # nanoseek's "off"; transformers' unset default would be 50
    greedy = generation_config_json(tok, {"temperature": 0, "max_new_tokens": 512})
    assert greedy["do_sample"] is False and greedy["max_new_tokens"] == 512
    assert not {"temperature", "top_p", "top_k"} & set(greedy)
    transformers = pytest.importorskip("transformers")
    for d in (sampled, greedy):  # what transformers' own save_pretrained would accept
        transformers.GenerationConfig(**d).validate(strict=True)


class _View:
    """Like the trainer's FSDP view: config + state_dict + save_pretrained and nothing else."""

    def __init__(self, model):
        self.config, self._model, self.calls = model.config, model, []

    def state_dict(self):
        raise AssertionError("export must only call save_pretrained")

    def save_pretrained(self, path):
        self.calls.append(path)
        self._model.save_pretrained(path)


def test_replace_view_and_refusals(model, tokenizer_dir, tmp_path):
    out = tmp_path / "m"
    view = _View(model)
    write_model_dir(view, load_tokenizer(tokenizer_dir), out, generation_config={"temperature": 0.7})
    assert len(view.calls) == 1
    write_model_dir(model, tokenizer_dir, out)  # an existing model directory is replaced whole
    assert json.loads((out / GENERATION_CONFIG).read_text())["do_sample"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_model_dir(model, tokenizer_dir, other)
    assert (other / "keep.txt").read_text() == "x"
    small = ModelConfig.from_preset("tiny", vocab_size=64)
    with pytest.raises(ValueError, match="tokenizer has"):
        write_model_dir(type("M", (), {"config": small})(), tokenizer_dir, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_step_checkpoint_is_self_contained(model, tokenizer_dir, tmp_path):
    from nanoseek.engine.loading import load_model_and_tokenizer

    ckpt = save_checkpoint(tmp_path, 7, SelfContained(model, tokenizer_dir), {"step": 7})
    assert load_tree(ckpt / "train_state.safetensors") == {"step": 7}
    loaded, tok = load_model_and_tokenizer(ckpt)  # no tokenizer argument
    assert tok.vocab_size == model.config.vocab_size
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    assert (ckpt / GENERATION_CONFIG).is_file()
    inplace = write_model_files(model, tokenizer_dir, tmp_path / "inplace")  # no temp dir, no rename
    assert load_model_and_tokenizer(inplace)[1].vocab_size == tok.vocab_size
    # the non-weight files alone (what save_checkpoint's tokenizer= argument takes), from a Tokenizer
    ModelDirFiles(load_tokenizer(tokenizer_dir), {"temperature": 0.5}).save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted([GENERATION_CONFIG, *TOKENIZER_FILES])
    assert tokenizer_fingerprint(tmp_path / "t") == tokenizer_fingerprint(tokenizer_dir)
    written = copy_tokenizer_files(tokenizer_dir / "tokenizer.json", tmp_path / "u")  # a file path works too
    assert [p.name for p in written] == list(TOKENIZER_FILES)
