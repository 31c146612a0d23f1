"""The OpenAI-compatible server, in a subprocess, driven by the official `openai` client and by
raw HTTP. Expected outputs come from `generate_full` on the same weights in this process."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from nanoseek import chat_format
from nanoseek.engine import fill_in_middle, generate_full
from tests.serve.conftest import API_KEY, MODEL_NAME


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def expected(model_dir, ids, n):
    _, model, tok = model_dir
    return generate_full(model, ids, n, tokenizer=tok, stop=[tok.eos_id], stop_on_eos=False)[0]


def raw(server, method, path, body=None, headers=None, key=API_KEY):
    host, port = server["base"][len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, payload


def test_models_list_and_openapi(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    status, body = raw(server, "GET", "/openapi.json", key=None)
    paths = json.loads(body)["paths"]
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(paths)


def test_completion_plain_and_streaming(client, model_dir):
    tok = model_dir[2]
    prompt = "def fib(n):\n"
    want = expected(model_dir, [tok.bos_id] + tok.encode(prompt), 12)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) + 1
    assert r.usage.completion_tokens == len(want.tokens)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.tokens)


def test_completion_logprobs_n_and_seed(client, model_dir):
    tok = model_dir[2]
    r = client.completions.create(model=MODEL_NAME, prompt="x = [", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    want = generate_full(model_dir[1], [tok.bos_id] + tok.encode("x = ["), 6, tokenizer=tok, logprobs=True)[0]
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)
    # greedy: the chosen token is the most likely alternative (the dict is keyed by token text,
    # so two byte tokens that both print as U+FFFD share one entry)
    for t, chosen in zip(lp.top_logprobs, lp.token_logprobs):
        assert 1 <= len(t) <= 2 and max(t.values()) == pytest.approx(chosen, abs=1e-6)
    a = client.completions.create(model=MODEL_NAME, prompt="import", max_tokens=8, temperature=1.0, seed=3, n=2)
    b = client.completions.create(model=MODEL_NAME, prompt="import", max_tokens=8, temperature=1.0, seed=3, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]


def test_completion_with_suffix_is_fim(client, model_dir):
    _, model, tok = model_dir
    prefix, suffix = "def add(a, b):\n    return ", "\n"
    want = fill_in_middle(model, tok, prefix, suffix, max_new_tokens=10)
    r = client.completions.create(model=MODEL_NAME, prompt=prefix, suffix=suffix, max_tokens=10, temperature=0)
    assert r.choices[0].text == want


def test_chat_completion_plain_streaming_and_thinking(client, model_dir):
    _, model, tok = model_dir
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    for mode in ("chat", "thinking"):
        ids = tok.encode(chat_format.encode_messages(messages, thinking_mode=mode), allow_special=True)
        want = chat_format.parse_completion(expected(model_dir, ids, 10).text, mode)
        extra = {"thinking": mode == "thinking"}
        r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0,
                                           extra_body=extra)
        msg = r.choices[0].message
        assert msg.role == "assistant" and msg.content == want["content"]
        assert r.usage.prompt_tokens == len(ids)
        if mode == "thinking":
            assert msg.model_extra["reasoning_content"] == want["reasoning_content"]
        content, reasoning = "", ""
        for c in client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0,
                                                stream=True, extra_body=extra):
            d = c.choices[0].delta
            content += d.content or ""
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        assert content == want["content"] and reasoning == want["reasoning_content"]


def test_defaults_stay_within_the_token_limit_and_usage_counts_the_prompt_once(client, model_dir):
    """A request without max_tokens gets the server's default, capped at its --max-tokens-limit
    (128 here, below the chat default of 256), not a 400; with n choices the prompt is counted
    once (as OpenAI and vLLM count it), the completions all together."""
    tok = model_dir[2]
    messages = [{"role": "user", "content": "Write a long story."}]
    ids = tok.encode(chat_format.encode_messages(messages), allow_special=True)
    one = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=1.0, seed=5)
    assert 0 < one.usage.completion_tokens <= 128
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=1.0, seed=5, n=2)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == len(ids)
    assert one.usage.completion_tokens < r.usage.completion_tokens <= 2 * 128
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    c = client.completions.create(model=MODEL_NAME, prompt=["def f(", "import o"], max_tokens=3, n=2, seed=1)
    assert len(c.choices) == 4 and c.usage.prompt_tokens == sum(len(tok.encode(p)) + 1 for p in ("def f(", "import o"))


def test_chat_with_tools_encodes_dsml(client, model_dir, server):
    tools = [{"type": "function", "function": {"name": "run", "description": "run code",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "hi"}]
    tok = model_dir[2]
    ids = tok.encode(chat_format.encode_messages(messages, tools=tools), allow_special=True)
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=tools, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids) > len(tok.encode(chat_format.encode_messages(messages),
                                                              allow_special=True))


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body = raw(server, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x"}, key=None)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_sixteen_concurrent_streaming_clients(client, model_dir):
    tok = model_dir[2]
    prompts = [f"def f{i}(x):\n    return x * {i}\n" + "#" * (i % 5) for i in range(16)]
    wants = [expected(model_dir, [tok.bos_id] + tok.encode(p), 8 + i % 5).text for i, p in enumerate(prompts)]

    def run(i):
        text, reason = "", None
        for c in client.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=8 + i % 5,
                                           temperature=0, stream=True):
            text += c.choices[0].text
            reason = c.choices[0].finish_reason or reason
        return text, reason

    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(run, range(16), timeout=180))
    assert [g[0] for g in got] == wants
    assert all(g[1] in ("length", "stop") for g in got)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"model": MODEL_NAME, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL_NAME}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL_NAME, "prompt": [5] * 1100}, 400, "prompt"),  # > 1023 prompt tokens
    ({"model": MODEL_NAME, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": [5, 99999]}, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL_NAME, "prompt": "x" * 70000}, 413, None),
])
def test_malformed_requests_get_json_errors(server, body, status, param):
    got, payload = raw(server, "POST", "/v1/completions", body)
    err = json.loads(payload)["error"]
    assert got == status, err
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    if param:
        assert err["param"] == param
    got, payload = raw(server, "POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "wizard"}]})
    assert got == 400 and json.loads(payload)["error"]["param"] == "messages"
    for calls in (["x"], [{"function": "f"}], [{"id": 3, "function": {"arguments": "{}"}}]):   # malformed tool calls
        messages = [{"role": "assistant", "content": "", "tool_calls": calls}, {"role": "user", "content": "hi"}]
        got, payload = raw(server, "POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": messages})
        assert got == 400 and json.loads(payload)["error"]["param"] == "messages", payload
    got, payload = raw(server, "GET", "/v1/nothing")
    assert got == 404 and "error" in json.loads(payload)
    assert raw(server, "GET", "/health", key=None)[0] == 200 and server["proc"].poll() is None


def test_client_disconnect_cancels_generation(server):
    before = json.loads(raw(server, "GET", "/health")[1])["decoded_tokens"]
    host, port = server["base"][len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": MODEL_NAME, "prompt": "x", "max_tokens": 128, "stream": True, "temperature": 0}),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.sock.close()  # hang up mid-stream
    conn.close()
    deadline = time.monotonic() + 30
    while True:
        h = json.loads(raw(server, "GET", "/health")[1])
        if h["in_flight"] == 0 and h["active"] == 0:
            break
        assert time.monotonic() < deadline, f"generation not cancelled: {h}"
        time.sleep(0.1)
    # it stopped before its 128 tokens (the engine ran only this request meanwhile)
    assert h["decoded_tokens"] - before < 127
    server["log"].seek(0)
    assert "Traceback" not in server["log"].read()  # a client hanging up is no error
