"""Generating evaluation samples with a nanoseek checkpoint: the `complete_fn` of `run_task`.

`model_complete_fn(model, tokenizer)` returns the callable `nanoseek.eval.tasks.run_task`
expects: prompts (text) -> n completions each (text), through the inference engine
(`nanoseek.engine.generate_full`: chunked prefill, batched decode, per-request seeds, stop
strings). Prompts get the BOS token the model was trained with. FIM prompts are written with
the special-token strings (`<｜fim▁begin｜>`...), so they are encoded with special tokens
enabled; ordinary code prompts are encoded as plain text (a literal "<think>" in code stays text).

    nanoseek eval humaneval --model runs/speedrun/checkpoint --n 1 --limit 20
"""

from __future__ import annotations

from ..engine.loading import load_model_and_tokenizer  # noqa: F401  (re-exported: the one loader)


def model_complete_fn(model, tokenizer, special_prompts: bool = False, batch_size: int = 8):
    """complete_fn(prompts, *, n, temperature, top_p, seed, max_new_tokens, stop) -> [[str] * n]."""
    from ..engine.generate import generate_full

    def complete(prompts: list[str], *, n: int, temperature: float, top_p: float, seed: int,
                 max_new_tokens: int, stop: list[str] | None = None) -> list[list[str]]:
        ids = [tokenizer.encode(p, add_bos=True, allow_special=special_prompts) for p in prompts]
        flat = [x for x in ids for _ in range(n)]  # n samples of each prompt, adjacent
        texts: list[str] = []
        for i in range(0, len(flat), batch_size):
            res = generate_full(model, flat[i : i + batch_size], max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed * 100_003 + i, stop=list(stop or []) or None,
                                tokenizer=tokenizer, compile=False)  # eager: a model mid-pipeline
            texts.extend(c.text for c in res)
        return [texts[j * n : (j + 1) * n] for j in range(len(prompts))]

    return complete
