"""A real `nanoseek serve` subprocess on a free loopback port, with a tiny random-init model and a
tokenizer trained in the test (tests/engine/fixtures.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from tests.engine.fixtures import save_model_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process generation (the reference outputs) on one intra-op thread: faster than two
    on a busy 2-core machine; restored after each module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

API_KEY = "test-key-123"
MODEL_NAME = "tiny-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "model"
    model, tok = save_model_dir(d)
    return d, model, tok


def start_server(d, extra=(), name="server"):
    """Start `nanoseek serve` on a free port; yields {"base", "proc", "log"}; stops it after."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(d), "--port", str(port),
           "--api-key", API_KEY, "--model-name", MODEL_NAME, "--threads", "1", "--max-batch", "16",
           "--max-len", "1024", "--max-tokens-limit", "128", "--max-body-bytes", "65536", "--log-level", "warning",
           *extra]
    log = open(d.parent / f"{name}.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"server did not come up in 90 s:\n{log.read()}")
        time.sleep(0.2)
    yield {"base": base, "proc": proc, "log": log}
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()


@pytest.fixture(scope="session")
def server(model_dir):
    yield from start_server(model_dir[0])
