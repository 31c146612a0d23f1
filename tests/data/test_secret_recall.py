"""Secret recall against a maintained rule set: detect-secrets' plugins are the oracle.

tests/fixtures/secrets/ holds 50+ FAKE credentials of 20+ kinds planted in the file kinds code
repositories carry (.py, .js, .ts, .sh, .env, .yaml, .ini, .cfg, .json, .toml, .ipynb); planted.json
lists them. For each one, detect-secrets must flag it (so the planted string really is a secret
by a maintained rule set, not by our own regexes) and `redact_secrets` must remove it.

detect-secrets reads a file by its extension; shell and .env assignments are INI syntax to it
once `export` is dropped, and a notebook is the Python of its cells, so those files are also
scanned in that view (the rules are detect-secrets' own either way).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanoseek.data.clean import find_secrets, redact_secrets

ds = pytest.importorskip("detect_secrets", reason="detect-secrets is the oracle (pip install detect-secrets)")
from detect_secrets.core.scan import scan_file  # noqa: E402
from detect_secrets.settings import default_settings  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "secrets"
PLANTED = json.loads((FIX / "planted.json").read_text())


def _views(path: Path, tmp: Path) -> list[Path]:
    """The file, plus the view detect-secrets understands for shell / .env / notebooks."""
    views = [path]
    if path.suffix in (".sh", ".env"):
        lines = [ln.removeprefix("export ") for ln in path.read_text().splitlines()]
        views.append(tmp / (path.stem + "_view.ini"))
        views[-1].write_text("[env]\n" + "\n".join(lines) + "\n")
    elif path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        views.append(tmp / (path.stem + "_view.py"))
        views[-1].write_text("\n".join("".join(c["source"]) for c in cells))
    return views


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views")
    found: dict[str, list[tuple[str, str]]] = {}
    with default_settings():
        for name in sorted({p["file"] for p in PLANTED}):
            found[name] = [(s.type, s.secret_value or "") for v in _views(FIX / name, tmp) for s in scan_file(str(v))]
    return found


def _confirmed(p: dict, found: list[tuple[str, str]]) -> bool:
    if p["kind"] == "private_key":       # the plugin reports the BEGIN line; the planted value is the body
        return any(t == "Private Key" for t, _ in found)
    if p["kind"] == "gitlab_token":      # the GitLab plugin reports only its prefix group ("glpat")
        return any(t == "GitLab Token" and p["value"].startswith(v) for t, v in found)
    return any(v and (p["value"] in v or v in p["value"]) and len(v) >= min(8, len(p["value"])) for _, v in found)


def test_fixture_is_big_and_varied():
    assert len(PLANTED) >= 50
    assert len({p["kind"] for p in PLANTED}) >= 20
    assert {Path(p["file"]).suffix for p in PLANTED} >= {".py", ".js", ".ts", ".sh", ".env", ".yaml", ".ini", ".cfg",
                                                         ".json", ".toml", ".ipynb"}


def test_every_planted_secret_is_a_secret_by_detect_secrets(oracle):
    missed = [(p["file"], p["kind"]) for p in PLANTED if not _confirmed(p, oracle[p["file"]])]
    assert not missed, f"detect-secrets does not flag: {missed}"


def test_redaction_recall_is_total():
    leaked = []
    for name in sorted({p["file"] for p in PLANTED}):
        text = (FIX / name).read_text()
        red, counts = redact_secrets(text)
        leaked += [(name, p["kind"]) for p in PLANTED if p["file"] == name and p["value"] in red]
        assert not find_secrets(red) or all(k == "EMAIL" for *_, k in find_secrets(red)), name
    recall = 1 - len(leaked) / len(PLANTED)
    assert not leaked, f"recall {recall:.1%}; leaked {leaked}"


@pytest.mark.parametrize("line", [
    "key = KEY_SIZE_256",                       # a constant's name
    "token: Token.NAME_OR_NUMBER",              # an attribute chain
    "KEY = 0x9E3779B97F4A7C15",                 # a hex constant
    "password = password_hash(pw)",             # a call
    "api_key=$(cat /run/secrets/api_key)",      # shell substitution
    "token_url: https://auth.example.org/oauth2/token2",
    "key_file = /etc/ssl/private/server2.pem",
    "secret_key = os.environ['SECRET_KEY']",
    "for key, value in items2.items():",
    "password: str = field(default='')",
])
def test_bare_assignments_in_clean_code_are_left_alone(line):
    assert redact_secrets(line)[1] == {}
