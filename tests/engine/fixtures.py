"""Tiny fixtures shared by the engine and server tests: a random-init `tiny` model and a small
byte-level BPE tokenizer trained here on a few lines of code (no downloads)."""

from __future__ import annotations

import torch

CODE = [
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
    "x = [1, 2, 3]\ny = {'a': 1, 'b': 2}\nz = (x, y)\n",
]


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import pre_tokenizers, trainers

    from nanoseek.data.tokenizer import SPECIAL_TOKENS, Tokenizer, new_bpe

    hf = new_bpe("code")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=[s for _, s in SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CODE * 4, trainer)
    return Tokenizer(hf)


def make_model(seed: int = 0):
    from nanoseek import ModelConfig, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.reset_parameters(seed=seed)
    return model.eval()


def save_model_dir(path, seed: int = 0):
    model, tok = make_model(seed), make_tokenizer()
    model.save_pretrained(path)
    tok.save(path)
    return model, tok
