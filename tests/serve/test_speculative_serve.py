"""`nanoseek serve --speculative 2`: the official `openai` client gets exactly the greedy output
of plain decoding (spec off, computed in this process) for completions and chat, streaming and
not, alone and with concurrent requests; /health and usage report the speculation."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from nanoseek import chat_format
from nanoseek.engine import generate_full
from tests.serve.conftest import API_KEY, MODEL_NAME, start_server


@pytest.fixture(scope="module")
def spec_server(model_dir):
    yield from start_server(model_dir[0], ["--speculative", "2", "--max-batch", "4"], name="spec_server")


@pytest.fixture(scope="module")
def client(spec_server):
    return openai.OpenAI(base_url=spec_server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def plain(model_dir, ids, n, **kw):
    """What the server returns without speculation (EOS stops, as the server's requests do)."""
    _, model, tok = model_dir
    return generate_full(model, ids, n, tokenizer=tok, stop=[tok.eos_id], stop_on_eos=False, **kw)[0]


def health(server) -> dict:
    req = urllib.request.Request(server["base"] + "/health", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def test_completions_equal_plain_greedy(client, model_dir, spec_server):
    tok = model_dir[2]
    prompt = "def fib(n):\n"
    want = plain(model_dir, [tok.bos_id] + tok.encode(prompt), 14, logprobs=True)
    before = health(spec_server)["speculative"]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=14, temperature=0, logprobs=1)
    assert r.choices[0].text == want.text
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)
    d = r.usage.completion_tokens_details
    assert r.usage.completion_tokens == len(want.tokens)
    assert d.accepted_prediction_tokens + d.rejected_prediction_tokens >= len(want.tokens) // 3 > 0
    after = health(spec_server)["speculative"]
    assert after["rounds"] > before["rounds"] and after["drafted"] > before["drafted"]
    assert 0 <= after["acceptance_rate"] <= 1 and after["tokens_per_call"] >= 1
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=14, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens_details.rejected_prediction_tokens >= 0


def test_chat_equal_plain_greedy(client, model_dir):
    tok = model_dir[2]
    messages = [{"role": "user", "content": "Add two numbers."}]
    ids = tok.encode(chat_format.encode_messages(messages), allow_special=True)
    want = chat_format.parse_completion(plain(model_dir, ids, 12).text, "chat")["content"]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want
    content = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0, stream=True))
    assert content == want


def test_concurrent_requests_and_seeds(client, model_dir):
    """Requests of different lengths overlap (batched plain steps, then the survivor alone:
    speculative rounds); greedy outputs equal plain decoding; seeded sampling is reproducible."""
    tok = model_dir[2]
    prompts = ["import os\n", "class Stack:\n", "x = [1, 2"]
    lens = [20, 4, 9]
    wants = [plain(model_dir, [tok.bos_id] + tok.encode(p), n).text for p, n in zip(prompts, lens)]

    def run(i):
        return "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL_NAME, prompt=prompts[i], max_tokens=lens[i], temperature=0, stream=True))

    with ThreadPoolExecutor(3) as ex:
        assert list(ex.map(run, range(3), timeout=180)) == wants
    kw = dict(model=MODEL_NAME, prompt="def f(x):", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
