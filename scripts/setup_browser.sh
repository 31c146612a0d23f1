#!/usr/bin/env bash
# Installs the headless browser the chat-page test (tests/serve/test_chat_page.py) drives through
# selenium: Debian's `chromium` + `chromium-driver` (a matching chromedriver, no download at run
# time). Idempotent: does nothing when both are already there.
#
#   bash scripts/setup_browser.sh
#
# As root with apt-get it installs them quietly. Without root (or apt) it installs nothing and
# says how to. Exit status 0 when the browser and its driver are present afterwards, 1 when not
# (a warning: the test then skips, or fails in CI where CI=true).
set -uo pipefail

find_chrome() { command -v chromium || command -v chromium-browser || command -v google-chrome; }
find_driver() {
    command -v chromedriver || { [ -x /usr/lib/chromium/chromedriver ] && echo /usr/lib/chromium/chromedriver; }
}
have_browser() { find_chrome >/dev/null 2>&1 && find_driver >/dev/null 2>&1; }

if ! have_browser; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "[browser] installing chromium + chromium-driver (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 &&
                apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }
    else
        echo "[browser] WARNING: chromium / chromedriver missing and this script is not root (or has no apt-get)." >&2
        echo "[browser]          Install them for the chat-page test:  sudo apt-get install chromium chromium-driver" >&2
        exit 1
    fi
fi

if have_browser; then
    echo "[browser] $("$(find_chrome)" --version 2>/dev/null | head -1) | $("$(find_driver)" --version 2>/dev/null | head -1)"
else
    echo "[browser] WARNING: could not install chromium + chromium-driver; tests/serve/test_chat_page.py will skip" \
         "(and fail in CI)" >&2
    exit 1
fi
