#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the pinned CPU build of torch, nanoseek
# (editable) with every extra and its test dependencies, at the exact versions of constraints.txt
# (pyproject.toml holds ranges). Safe to re-run; does nothing that is already done.
#
#   bash scripts/setup.sh            # nanoseek[all,dev]: every subsystem + test dependencies
#   NANOSEEK_NO_DEV=1 bash scripts/setup.sh   # nanoseek[all] only
#
# In CI (CI=true) a part the tests rely on that cannot be installed (CodeShield, the sandbox
# isolation tools) fails the set-up; elsewhere it is a warning and those tests skip.
#
# torch is installed FIRST and pinned (torch==2.13.0): an unpinned torch on a CPU-only Linux
# machine would pull a multi-GB CUDA build. On a GPU machine install the CUDA build of the same
# version before running this script (see README); the pin is then already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
CI_MODE=0
case "${CI:-}" in true|TRUE|True) CI_MODE=1 ;; esac
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.') else 1)" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0"
    "${PIP[@]}" install "torch==2.13.0"
fi
extra="[all,dev]"
[ "${NANOSEEK_NO_DEV:-0}" = "1" ] && extra="[all]"
echo "[setup] installing nanoseek${extra} (editable, constraints.txt)"
"${PIP[@]}" install -c constraints.txt -e ".${extra}"
# CodeShield (second insecure-code detector, nanoseek.eval.security) needs semgrep, whose
# opentelemetry pin conflicts with FastAPI's, so it gets its own environment (docs/eval.md).
CS=.venv/tools/codeshield
if ! "$CS/bin/python" -c "from importlib.metadata import version as v; assert (v('codeshield'), v('semgrep')) == ('1.0.1', '1.185.0')" 2>/dev/null; then
    echo "[setup] installing codeshield==1.0.1 + semgrep==1.185.0 into $CS"
    .venv/bin/python -m venv "$CS"
    # not fatal outside CI: without it only `--detector codeshield|both` is unavailable (a clear
    # error then) and tests/eval/test_security.py skips its CodeShield tests; in CI they must run
    if ! "$CS/bin/python" -m pip --disable-pip-version-check -q install codeshield==1.0.1 semgrep==1.185.0; then
        echo '[setup] WARNING: CodeShield could not be installed; nanoseek eval insecure-code then needs --detector bandit'
        [ "$CI_MODE" = "1" ] && { echo '[setup] CI=true: CodeShield is required in CI'; exit 1; }
    fi
fi
if [ -f scripts/setup_sandbox.sh ]; then
    if ! bash scripts/setup_sandbox.sh; then
        echo "[setup] sandbox isolation tools unavailable; see docs/eval.md"
        [ "$CI_MODE" = "1" ] && { echo '[setup] CI=true: the sandbox isolation tools are required in CI'; exit 1; }
    fi
fi
# headless Chromium + chromedriver (Debian packages) for the chat page's browser test
if [ -f scripts/setup_browser.sh ]; then
    if ! bash scripts/setup_browser.sh; then
        echo "[setup] chromium/chromedriver unavailable: tests/serve/test_chat_page.py will skip"
        [ "$CI_MODE" = "1" ] && { echo '[setup] CI=true: the browser for the chat-page test is required in CI'; exit 1; }
    fi
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, nanoseek; print("torch", torch.__version__, "| nanoseek", nanoseek.__version__)')"
