"""The HTTP edges of the server, in process (FastAPI's TestClient over a real Engine on the tiny
model): each test is one reported defect of the old server, and fails on it."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from nanoseek.engine import Engine
from nanoseek.serve import create_app
from nanoseek.serve.protocol import ServeConfig
from tests.engine.fixtures import make_model, make_tokenizer

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app_parts():
    tok = make_tokenizer()
    engine = Engine(make_model(), tokenizer=tok, max_batch=4, max_len=128).start()
    yield engine, tok
    engine.stop()


def client(app_parts, **cfg) -> TestClient:
    engine, tok = app_parts
    base = dict(model_name="m", api_key=KEY, max_body_bytes=4096, max_tokens_limit=64)
    return TestClient(create_app(engine, tok, ServeConfig(**{**base, **cfg})))


def post(c, body, headers=AUTH, path="/v1/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.post(path, content=data, headers={"Content-Type": "application/json", **headers})


def test_lone_surrogate_is_a_400_not_a_500(app_parts):
    c = client(app_parts)
    for field in ('"model": "\\ud800"', '"model": "m", "prompt": "x\\udfff"'):
        r = post(c, ('{' + field + ', "prompt": "x"}' if "prompt" not in field else '{' + field + '}').encode())
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_string"
    r = post(c, b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}]}', path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"


def test_api_key_is_checked_before_the_body_is_parsed(app_parts):
    c = client(app_parts)
    r = post(c, b"{not json", headers={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post(c, b"{not json").status_code == 400


def test_json_error_has_no_character_offset_as_param(app_parts):
    r = post(client(app_parts), b'{"model": "m", "prompt": ')
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] is None and err["code"] == "json_invalid"


def test_oversize_chunked_body_is_413(app_parts):
    c = client(app_parts)

    def chunks():
        yield b'{"model": "m", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json", **AUTH})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_429_carries_retry_after(app_parts):
    r = post(client(app_parts, max_concurrent=0), {"model": "m", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("seed", [2**63, 2**64 + 5, -1])
def test_seeds_outside_63_bits_are_refused(app_parts, seed):
    r = post(client(app_parts), {"model": "m", "prompt": "x", "max_tokens": 1, "seed": seed})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_seeds_that_fit_are_reproducible(app_parts):
    c = client(app_parts)
    body = {"model": "m", "prompt": "def", "max_tokens": 8, "temperature": 1.0}
    a = [post(c, {**body, "seed": s}).json()["choices"][0]["text"] for s in (2**63 - 1, 2**63 - 1)]
    assert a[0] == a[1]


def test_docs_page_loads_nothing_from_a_cdn(app_parts):
    c = client(app_parts)
    r = c.get("/docs")
    assert r.status_code == 404 or "cdn" not in r.text.lower()
    assert c.get("/openapi.json").status_code == 200


def test_health_details_need_the_key(app_parts):
    c = client(app_parts)
    public = c.get("/health")
    assert public.status_code == 200 and public.json() == {"status": "ok"}
    full = c.get("/health", headers=AUTH).json()
    assert full["status"] == "ok" and {"in_flight", "active", "decoded_tokens"} <= set(full)


@pytest.mark.parametrize("kw", [{"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 5e-324, "top_p": 1e-45}])
def test_underflowing_parameters_get_an_answer(app_parts, kw):
    engine, _ = app_parts
    c = client(app_parts)
    r = post(c, {"model": "m", "prompt": "def f", "max_tokens": 4, **kw})
    assert r.status_code == 200, r.text
    greedy = post(c, {"model": "m", "prompt": "def f", "max_tokens": 4, "temperature": 0})
    assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert engine.stats()["in_flight"] == 0


def test_non_finite_numbers_are_400(app_parts):
    for lit in (b"NaN", b"Infinity"):
        r = post(client(app_parts), b'{"model": "m", "prompt": "x", "temperature": ' + lit + b"}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_tool_call_arguments_nested_past_json_recursion_limit_are_not_a_500(app_parts):
    """The history's tool-call arguments are re-encoded by the chat format, which parsed them
    with json.loads: 3,000 nested brackets raised RecursionError there (a 500). Now they are
    kept as one string argument, and the request goes on (here: to the prompt-length check)."""
    args = '{"a": ' + "[" * 3000 + "]" * 3000 + "}"
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    r = post(client(app_parts, max_body_bytes=1 << 16), {"model": "m", "messages": msgs, "max_tokens": 2},
             path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
