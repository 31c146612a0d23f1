#!/usr/bin/env bash
# Installs what the eval sandbox (nanoseek/eval/sandbox.py) needs for full isolation:
# bubblewrap (`bwrap`). Idempotent: does nothing when bwrap already works.
#
#   bash scripts/setup_sandbox.sh
#
# As root on Debian/Ubuntu it runs `apt-get install -y bubblewrap`. Without root (or without
# apt) it installs nothing and says how to; the sandbox then falls back to the `unshare` level
# (util-linux, present on almost every Linux) or, failing that, to no isolation, and says so in
# every result. `nanoseek eval sandbox` shows which level is in force.
set -uo pipefail
cd "$(dirname "$0")/.."

bwrap_works() {
    command -v bwrap >/dev/null 2>&1 &&
        bwrap --unshare-all --die-with-parent --ro-bind / / --dev /dev --proc /proc true >/dev/null 2>&1
}

if bwrap_works; then
    echo "[sandbox] bubblewrap works: $(bwrap --version)"
elif ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[sandbox] installing bubblewrap (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq bubblewrap >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; }
    if bwrap_works; then
        echo "[sandbox] bubblewrap installed: $(bwrap --version)"
    else
        echo "[sandbox] WARNING: could not install a working bubblewrap; model-written code will run" \
             "with weaker isolation (see docs/eval.md)" >&2
    fi
elif command -v bwrap >/dev/null 2>&1; then
    echo "[sandbox] WARNING: bwrap is installed but cannot create namespaces here (unprivileged user" \
         "namespaces disabled, or a container without them); see docs/eval.md" >&2
else
    echo "[sandbox] WARNING: bubblewrap is not installed and this script is not root." >&2
    echo "[sandbox]          Install it for full isolation:  sudo apt-get install bubblewrap" >&2
    echo "[sandbox]          (Fedora: sudo dnf install bubblewrap; Arch: sudo pacman -S bubblewrap)" >&2
fi

if [ -x .venv/bin/python ] && .venv/bin/python -c "import nanoseek.eval.sandbox" 2>/dev/null; then
    level=$(.venv/bin/python -c "from nanoseek.eval.sandbox import best_isolation; print(best_isolation())" 2>/dev/null)
    echo "[sandbox] isolation level in force: ${level:-unknown}"
fi
exit 0
