"""The chat page at `/` (nanoseek/serve/static), driven in headless Chromium through selenium
against a real `nanoseek serve` subprocess on the tiny test model: tokens stream into the page,
the thinking toggle reaches the request and shows a collapsible reasoning part, Stop ends the
stream and frees the server's slot, the API key is needed and sent, history is multi-turn, model
text stays text. A failing test saves a screenshot (its path is printed).

Needs Debian's `chromium` + `chromium-driver` (scripts/setup_browser.sh installs them as root)
and selenium; without them the tests skip, or fail when CI=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import urllib.request

import pytest

from tests.conftest import skip_unless_ci
from tests.serve.conftest import API_KEY, MODEL_NAME, start_server

INSTALL = "apt-get install -y chromium chromium-driver (as root; or scripts/setup_browser.sh) and pip install selenium"

# Records every fetch the page makes (url, parsed JSON body, Authorization header): how the tests
# see what the page sends. Installed after each page load.
SPY_FETCH = """
if (!window.__requests) {
  window.__requests = [];
  const realFetch = window.fetch;
  window.fetch = function (url, opts) {
    const h = (opts && opts.headers) || {};
    let body = null;
    try { body = opts && opts.body ? JSON.parse(opts.body) : null; } catch (e) {}
    window.__requests.push({url: String(url), body: body, auth: h["Authorization"] || null});
    return realFetch.apply(this, arguments);
  };
}
"""

# Every length the last assistant answer's text takes, as the DOM changes (MutationObserver).
WATCH_LENGTHS = """
window.__lengths = [];
const obs = new MutationObserver(() => {
  const all = document.querySelectorAll('.msg.assistant');
  if (!all.length) return;
  const last = all[all.length - 1];
  const n = last.querySelector('.content').textContent.length
          + (last.querySelector('.reasoning-content') || {textContent: ''}).textContent.length;
  const L = window.__lengths;
  if (!L.length || L[L.length - 1] !== n) L.push(n);
});
obs.observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def _browser_paths():
    chrome = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(p)), None)
    return chrome, driver


def _missing(why: str):
    # skips on a developer's machine, fails in CI (CI=true), where scripts/setup.sh installs the browser
    skip_unless_ci(f"chat page test needs a browser: {why}; install with: {INSTALL}")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed")
    chrome, driver_path = _browser_paths()
    if chrome is None or driver_path is None:
        _missing(f"chromium={chrome}, chromedriver={driver_path}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1200,900", "--disable-extensions", "--no-first-run"):
        opts.add_argument(a)
    d = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    d.set_script_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def page_server(model_dir):
    # longer answers than the shared server allows, so that Stop lands mid-stream
    yield from start_server(model_dir[0], extra=["--max-tokens-limit", "1000"], name="chat_page")


@pytest.fixture
def page(browser, page_server):
    """The chat page, freshly loaded with empty localStorage and the fetch spy installed."""
    browser.get(page_server["base"] + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(page_server["base"] + "/")
    browser.execute_script(SPY_FETCH)
    with screenshot_on_failure(browser, "page_load"):
        wait(lambda: browser.find_element("id", "model").text not in ("", "…"), "the model name to load")
    return browser


@contextlib.contextmanager
def screenshot_on_failure(driver, name: str):
    try:
        yield
    except BaseException:
        shot_dir = tempfile.mkdtemp(prefix="nanoseek-chat-page-")
        path = os.path.join(shot_dir, f"{name}.png")
        try:
            driver.save_screenshot(path)
            with open(os.path.join(shot_dir, f"{name}.html"), "w") as f:
                f.write(driver.page_source)
            print(f"\nchat page screenshot: {path} (and the page's HTML next to it)")
        except Exception as e:  # the browser itself may be gone
            print(f"\nchat page screenshot failed: {e!r}")
        raise


def wait(cond, what: str, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def health(server) -> dict:
    req = urllib.request.Request(server["base"] + "/health", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def state(d) -> str:
    return d.execute_script("return document.body.dataset.state")


def error_text(d) -> str:
    return d.execute_script("const e = document.getElementById('error'); return e.hidden ? '' : e.textContent")


def requests_sent(d) -> list[dict]:
    return [r for r in d.execute_script("return window.__requests") if r["url"].endswith("/v1/chat/completions")]


def set_settings(d, key=None, temperature=None, max_tokens=None):
    """Open Settings, type the values (a change event saves them), close Settings."""
    from selenium.webdriver.common.keys import Keys

    d.find_element("css selector", "#settings summary").click()
    for id_, v in (("api-key", key), ("temperature", temperature), ("max-tokens", max_tokens)):
        if v is not None:
            e = d.find_element("id", id_)
            e.clear()
            e.send_keys(str(v), Keys.TAB)
    d.find_element("css selector", "#settings summary").click()


def send(d, text: str):
    box = d.find_element("id", "input")
    box.clear()
    box.send_keys(text)
    d.find_element("id", "send").click()


def last_answer(d) -> dict:
    return d.execute_script("""
        const all = document.querySelectorAll('.msg.assistant');
        if (!all.length) return null;
        const m = all[all.length - 1], r = m.querySelector('details.reasoning');
        return {content: m.querySelector('.content').textContent, note: m.querySelector('.note').textContent,
                streaming: m.classList.contains('streaming'), has_reasoning: !!r, open: r ? r.open : null,
                reasoning: r ? r.querySelector('.reasoning-content').textContent : null};
    """)


def stream_to_end(d) -> list[int]:
    """Poll until the answer being streamed ends; the lengths WATCH_LENGTHS saw (then reset)."""
    polled = []
    while state(d) == "streaming" or not polled:
        a = last_answer(d)
        polled.append(len(a["content"]) if a else 0)
        assert len(polled) < 3000, "still streaming after a minute"
        time.sleep(0.02)
    return d.execute_script("const L = window.__lengths; window.__lengths = []; return L")


def wait_idle(d, timeout=30.0):
    wait(lambda: state(d) == "idle", "the answer to finish", timeout)


def test_page_is_served_offline(page_server):
    """/ is the page; its script and style come from this server (no CDN, works offline)."""
    with urllib.request.urlopen(page_server["base"] + "/", timeout=10) as r:
        html = r.read().decode()
        assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="app.js">' in html and 'href="style.css"' in html and "//" not in html
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        with urllib.request.urlopen(page_server["base"] + "/" + name, timeout=10) as r:
            data = r.read()
            assert r.status == 200 and kind in r.headers["content-type"]
            assert b"http:" not in data and b"https:" not in data  # nothing fetched from elsewhere


def test_key_needed_then_streams_multi_turn(page, page_server):
    d = page
    with screenshot_on_failure(d, "key_and_streaming"):
        assert "API key" in d.find_element("id", "model").text  # /v1/models said 401
        # no key: a clear error, the turn comes back to the input box to resend
        send(d, "def fib(n):")
        wait(lambda: error_text(d), "the missing-key error")
        assert "401" in error_text(d) and "API key" in error_text(d)
        assert d.find_element("id", "input").get_attribute("value") == "def fib(n):"
        assert d.find_elements("css selector", ".msg") == []
        assert state(d) == "idle" and requests_sent(d)[-1]["auth"] is None
        # with the key: it streams (the answer's text grows over several DOM updates)
        set_settings(d, key=API_KEY, temperature=1, max_tokens=200)
        assert not error_text(d)
        wait(lambda: d.find_element("id", "model").text == MODEL_NAME, "the model name (with the key)")
        d.execute_script(WATCH_LENGTHS)
        d.find_element("id", "send").click()
        for attempt in range(3):
            lengths = stream_to_end(d)
            a = last_answer(d)
            # a sampled answer the model itself ends within a token or two (its end-of-sequence
            # token drawn at temperature 1: ~1% of tries) cannot show streaming; ask again in a
            # new chat. A page that renders only at the end still fails: its answers are long.
            if attempt == 2 or len(a["content"]) >= 16 or a["note"] or len([n for n in lengths if n]) >= 3:
                break
            d.find_element("id", "new-chat").click()
            send(d, "def fib(n):")
        assert not error_text(d), error_text(d)
        grew = [n for n in lengths if n > 0]
        assert len(grew) >= 3 and grew == sorted(grew), f"answer did not stream: DOM lengths {lengths}"
        req = requests_sent(d)[-1]
        assert req["auth"] == f"Bearer {API_KEY}"
        assert req["body"]["stream"] is True and req["body"]["model"] == MODEL_NAME
        assert req["body"]["thinking"] is False and req["body"]["max_tokens"] == 200
        assert req["body"]["temperature"] == 1
        assert [m["role"] for m in req["body"]["messages"]] == ["user"]
        first = last_answer(d)
        assert first["content"] and not first["streaming"] and not first["has_reasoning"]
        # a second turn carries the first one
        send(d, "and now in Rust?")
        wait_idle(d)
        msgs = requests_sent(d)[-1]["body"]["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
        assert msgs[0]["content"] == "def fib(n):" and msgs[2]["content"] == "and now in Rust?"
        assert msgs[1]["content"]
        assert len(d.find_elements("css selector", ".msg.assistant")) == 2
        # settings persist (localStorage) across a reload
        d.refresh()
        assert d.find_element("id", "api-key").get_attribute("value") == API_KEY
        assert d.find_element("id", "max-tokens").get_attribute("value") == "200"


def test_thinking_toggle(page, page_server):
    d = page
    with screenshot_on_failure(d, "thinking"):
        # greedy: sampled at temperature 1, the random model's first token is EOS about once in
        # 400 answers (its 400-token vocabulary), an empty answer that failed the checks below
        set_settings(d, key=API_KEY, temperature=0, max_tokens=40)
        d.find_element("id", "thinking").click()
        send(d, "why is the sky blue?")
        wait_idle(d)
        assert not error_text(d), error_text(d)
        assert requests_sent(d)[-1]["body"]["thinking"] is True
        a = last_answer(d)
        # a random tiny model never closes </think>: its whole output is reasoning, collapsed
        assert a["has_reasoning"] and a["open"] is False
        assert a["reasoning"] or a["content"]
        d.find_element("css selector", ".msg.assistant details.reasoning summary").click()
        assert last_answer(d)["open"] is True
        # the toggle is remembered
        d.refresh()
        assert d.find_element("id", "thinking").is_selected()


def test_stop_mid_stream(page, page_server):
    d = page
    with screenshot_on_failure(d, "stop"):
        set_settings(d, key=API_KEY, temperature=0, max_tokens=1000)
        before = health(page_server)["decoded_tokens"]
        send(d, "x = [")
        wait(lambda: (last_answer(d) or {}).get("content"), "the first tokens")
        assert state(d) == "streaming"
        d.find_element("id", "stop").click()
        wait_idle(d, timeout=5)
        a = last_answer(d)
        assert a["note"] == "stopped" and not a["streaming"] and not error_text(d)
        assert d.find_element("id", "send").is_enabled() and not d.find_element("id", "stop").is_enabled()
        # the server noticed the disconnect and freed the slot, well before 1000 tokens
        h = wait(lambda: (lambda h: h if h["in_flight"] == 0 and h["active"] == 0 else None)(health(page_server)),
                 "the server to free the request's slot", timeout=30, every=0.1)
        assert h["decoded_tokens"] - before < 999
        # usable again: the next turn (with the stopped one in the history) works
        set_settings(d, max_tokens=8)
        send(d, "again")
        wait_idle(d)
        assert not error_text(d) and last_answer(d)["note"] in ("", "stopped at the max tokens limit")
        assert [m["role"] for m in requests_sent(d)[-1]["body"]["messages"]] == ["user", "assistant", "user"]


def test_model_text_is_text_and_code_blocks(page):
    """Model output is rendered with textContent: markup stays text; ``` fences become <pre><code>."""
    d = page
    with screenshot_on_failure(d, "rendering"):
        out = d.execute_script("""
            const m = document.getElementById('messages');
            // the same renderer the page uses, reached through a fake streamed answer
            const text = 'see:\\n```python\\ndef f():\\n    return "<b>x</b>"\\n```\\n<img src=x onerror="window.__xss=1">';
            const body = new ReadableStream({start(c) {
                const enc = new TextEncoder();
                const chunk = {choices: [{index: 0, delta: {content: text}, finish_reason: 'stop'}]};
                c.enqueue(enc.encode('data: ' + JSON.stringify(chunk) + '\\n\\ndata: [DONE]\\n\\n'));
                c.close();
            }});
            const real = window.fetch;
            window.fetch = (url, opts) => url.endsWith('/v1/chat/completions')
                ? Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}))
                : real(url, opts);
            return true;
        """)
        assert out
        send(d, "show me")
        wait_idle(d)
        assert not error_text(d), error_text(d)
        code = d.find_elements("css selector", ".msg.assistant .content pre code")
        assert len(code) == 1 and code[0].text == 'def f():\n    return "<b>x</b>"'
        assert code[0].get_attribute("class") == "language-python"
        assert d.find_elements("css selector", ".msg.assistant .content img") == []
        assert d.find_elements("css selector", ".msg.assistant .content b") == []
        assert d.execute_script("return window.__xss") is None
        assert '<img src=x onerror="window.__xss=1">' in last_answer(d)["content"]
