"""One request never hurts another, and shutdown ends every request in OpenAI's shape: a real
`nanoseek serve` subprocess, random parameter combinations sent while normal requests stream,
and SIGTERM with requests in flight."""

from __future__ import annotations

import http.client
import json
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve.conftest import API_KEY, MODEL_NAME, start_server
from tests.serve.test_app import expected, raw


@pytest.fixture(scope="module")
def fuzz_server(model_dir):
    yield from start_server(model_dir[0], extra=["--max-concurrent", "8", "--max-batch", "4"], name="fuzz")


def health(server) -> dict:
    return json.loads(raw(server, "GET", "/health")[1])


def stream_lines(server, body, on_first=None):
    """POST a streaming request; returns the list of `data:` payloads (raw strings)."""
    host, port = server["base"][len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    r = conn.getresponse()
    if r.status != 200:
        return r.status, [r.read().decode()]
    out = []
    for line in r:
        if line.startswith(b"data: "):
            out.append(line[6:].strip().decode())
            if on_first is not None and len(out) == 1:
                on_first()
    conn.close()
    return 200, out


def random_body(rng: random.Random) -> dict:
    b = {"model": MODEL_NAME, "prompt": rng.choice(["x", "def f(", "import os\n", [1, 2, 3]]),
         "max_tokens": rng.choice([0, 1, 5, 12]),
         "temperature": rng.choice([0, 1e-300, 5e-324, 1e-45, 1e-5, 0.7, 2.0]),
         "top_p": rng.choice([1e-300, 1e-45, 1e-8, 0.5, 1.0]),
         "top_k": rng.choice([0, 1, 3, 10**9]),
         "seed": rng.choice([None, 0, 2**63 - 3, 2**63, -5]),
         "n": rng.choice([1, 2]), "stop": rng.choice([None, "", "\n", ["a", "b"], ["x"] * 5]),
         "logprobs": rng.choice([None, 0, 5])}
    return {k: v for k, v in b.items() if v is not None}


def test_random_parameters_never_hurt_normal_streams(fuzz_server, model_dir):
    tok = model_dir[2]
    prompts = ["def fib(n):\n", "class Stack:\n", "for i in range(10):\n"]
    wants = [expected(model_dir, [tok.bos_id] + tok.encode(p), 24).text for p in prompts]
    stop = threading.Event()
    bad = []

    def fuzz(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            body = random_body(rng)
            if rng.random() < 0.5:
                status, lines = stream_lines(fuzz_server, body)
                ok = status in (400, 429) or (lines[-1] == "[DONE]" and "error" not in lines[-2])
            else:
                status, payload = raw(fuzz_server, "POST", "/v1/completions", body)
                ok = status in (200, 400, 429) and ("error" in json.loads(payload)) == (status != 200)
            if not ok:
                bad.append((body, status))

    def normal(i):
        _, lines = stream_lines(fuzz_server, {"model": MODEL_NAME, "prompt": prompts[i], "max_tokens": 24,
                                              "temperature": 0})
        assert lines[-1] == "[DONE]"
        return "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1])

    with ThreadPoolExecutor(6) as ex:
        fuzzers = [ex.submit(fuzz, s) for s in range(3)]
        try:
            for _ in range(2):
                assert list(ex.map(normal, range(3), timeout=180)) == wants
        finally:
            stop.set()
        for f in fuzzers:
            f.result(timeout=120)
    assert not bad, bad[:3]
    deadline = time.monotonic() + 20
    while (h := health(fuzz_server))["in_flight"] or h["http_in_flight"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.1)


def test_poisoned_requests_release_their_slots(fuzz_server):
    poison = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 3, "temperature": 1e-300, "top_p": 1e-300}
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda i: raw(fuzz_server, "POST", "/v1/completions", poison)[0], range(8)))
    assert all(s == 200 for s in got), got
    h = health(fuzz_server)
    assert h["in_flight"] == 0 and h["http_in_flight"] == 0
    for _ in range(10):  # more than --max-concurrent: none is turned away by a leaked slot
        assert raw(fuzz_server, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 1})[0] == 200
    log = fuzz_server["log"]
    log.seek(0)
    assert "Traceback" not in log.read()


def test_sigterm_drains_then_ends_requests_in_openai_shape(model_dir):
    gen = start_server(model_dir[0], extra=["--max-tokens-limit", "500", "--shutdown-timeout", "2"], name="shutdown")
    srv = next(gen)
    try:
        long = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 500, "temperature": 0}
        started = threading.Barrier(3)
        with ThreadPoolExecutor(3) as ex:
            plain = ex.submit(raw, srv, "POST", "/v1/completions", long)
            stream = ex.submit(stream_lines, srv, long, started.wait)
            short = ex.submit(stream_lines, srv, {**long, "max_tokens": 6}, started.wait)
            started.wait(timeout=60)
            while health(srv)["in_flight"] < 2:
                time.sleep(0.05)
            srv["proc"].send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(OSError):  # no longer accepting
                raw(srv, "GET", "/health")
            status, payload = plain.result(timeout=60)
            s_status, lines = stream.result(timeout=60)
            _, short_lines = short.result(timeout=60)
        assert status == 503 and json.loads(payload)["error"]["code"] == "server_shutting_down"
        assert s_status == 200 and lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["error"]["code"] == "server_shutting_down"
        assert short_lines[-1] == "[DONE]" and json.loads(short_lines[-2])["choices"][0]["finish_reason"]
        assert srv["proc"].wait(30) in (0, -signal.SIGTERM)  # (uvicorn re-raises the signal it caught)
    finally:
        gen.close()
