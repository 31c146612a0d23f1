"""License detection and policy for the code corpus.

Used by `nanoseek data build` (docs/data.md). A document's license comes from, in order of
precedence: an `SPDX-License-Identifier:` line in the file's first lines, the license column of
a table source, the package metadata of its wheel / sdist / installed distribution
(`License-Expression` (PEP 639), trove classifiers, `License:`), or the license file / manifest
(`pyproject.toml`, `package.json`, `Cargo.toml`) at its repository root.

Everything is normalised to SPDX identifiers and classified as one of
    permissive | weak_copyleft | copyleft | proprietary | unknown
following the categories of The Stack's license filter (Kocetkov et al. 2022): the default
policy keeps only `permissive`. SPDX expressions are honoured: `A OR B` is as permissive as its
most permissive side, `A AND B` as restrictive as its most restrictive side.

    >>> from nanoseek.data.licenses import classify
    >>> classify("MIT OR GPL-3.0-only"), classify("BSD-3-Clause AND LGPL-2.1-or-later")
    ('permissive', 'weak_copyleft')
"""

from __future__ import annotations

import json
import re
from email.parser import HeaderParser

CATEGORIES = ("permissive", "weak_copyleft", "copyleft", "proprietary", "unknown")
_RANK = {c: i for i, c in enumerate(CATEGORIES)}  # lower = more permissive

# Canonical SPDX id -> category.
_SPDX = {
    **{k: "permissive" for k in (
        "MIT", "MIT-0", "BSD-2-Clause", "BSD-3-Clause", "BSD-3-Clause-Clear", "BSD-4-Clause", "0BSD",
        "Apache-2.0", "Apache-1.1", "ISC", "PSF-2.0", "Python-2.0", "Unlicense", "CC0-1.0", "Zlib",
        "BSL-1.0", "WTFPL", "HPND", "UPL-1.0", "NCSA", "PostgreSQL", "X11", "Artistic-2.0", "CC-BY-4.0",
        "AFL-3.0", "MIT-CMU", "Unicode-3.0", "Unicode-DFS-2016", "blessing", "curl", "libpng-2.0", "OpenSSL",
        "Beerware", "BlueOak-1.0.0", "CNRI-Python", "ECL-2.0", "NTP", "FTL", "bzip2-1.0.6", "JSON")},
    **{k: "weak_copyleft" for k in (
        "LGPL-2.0-only", "LGPL-2.0-or-later", "LGPL-2.1-only", "LGPL-2.1-or-later", "LGPL-3.0-only",
        "LGPL-3.0-or-later", "MPL-1.1", "MPL-2.0", "EPL-1.0", "EPL-2.0", "CDDL-1.0", "CDDL-1.1",
        "CPL-1.0", "EUPL-1.1", "EUPL-1.2", "OSL-3.0", "CC-BY-SA-4.0", "MS-RL")},
    **{k: "copyleft" for k in (
        "GPL-1.0-only", "GPL-1.0-or-later", "GPL-2.0-only", "GPL-2.0-or-later", "GPL-3.0-only",
        "GPL-3.0-or-later", "AGPL-1.0-only", "AGPL-3.0-only", "AGPL-3.0-or-later", "SSPL-1.0")},
    **{k: "proprietary" for k in ("LicenseRef-Proprietary", "BUSL-1.1", "CC-BY-NC-4.0", "CC-BY-NC-SA-4.0",
                                  "Elastic-2.0", "Commons-Clause")},
}
_SPDX_LOWER = {k.lower(): k for k in _SPDX}

# Free-text names (License: fields, classifiers, short manifest strings) -> SPDX id.
_ALIASES = [
    (r"^(the )?mit( license)?( \(mit\))?$|^expat( license)?$|^mit/x11$|osi approved :: mit license", "MIT"),
    (r"mit no attribution|^mit-0$", "MIT-0"),
    (r"apache( software)?( license)?,? ?(version )?2(\.0)?|^apache$|^apache( software)? license$|asl 2", "Apache-2.0"),
    (r"^(new |modified |revised )?bsd( license)?( \(new\))?$|bsd 3|3-clause bsd|bsd-3|^bsd-new$|^bsd license"
     r"|^new bsd", "BSD-3-Clause"),
    (r"bsd 2|2-clause bsd|simplified bsd|freebsd|bsd-2", "BSD-2-Clause"),
    (r"python software foundation|^psf|^psfl|python license", "PSF-2.0"),
    (r"^isc( license)?|isc license \(iscl\)", "ISC"),
    (r"unlicense|public domain", "Unlicense"),
    (r"cc0", "CC0-1.0"),
    (r"zlib", "Zlib"),
    (r"boost software license|^bsl", "BSL-1.0"),
    (r"mozilla public license 2|^mpl[- ]?2|mpl 2\.0", "MPL-2.0"),
    (r"mozilla public license 1\.1|^mpl[- ]?1\.1", "MPL-1.1"),
    (r"lesser general public license v3|lgpl ?v?3|^lgpl-3", "LGPL-3.0-or-later"),
    (r"lesser general public license v2|lgpl ?v?2|^lgpl-2|library or lesser general public license", "LGPL-2.1-or-later"),
    (r"^lgpl$|lesser general public license", "LGPL-2.1-or-later"),
    (r"affero|agpl", "AGPL-3.0-or-later"),
    (r"general public license v3|gpl ?v?3|^gpl-3", "GPL-3.0-or-later"),
    (r"general public license v2|gpl ?v?2|^gpl-2", "GPL-2.0-or-later"),
    (r"^gpl$|^gnu gpl$|general public license", "GPL-2.0-or-later"),
    (r"eclipse public license 2|^epl-2", "EPL-2.0"),
    (r"eclipse public license|^epl", "EPL-1.0"),
    (r"historical permission notice|hpnd", "HPND"),
    (r"universal permissive", "UPL-1.0"),
    (r"artistic license 2|artistic-2", "Artistic-2.0"),
    (r"proprietary|commercial|all rights reserved|other/proprietary", "LicenseRef-Proprietary"),
]
_ALIASES = [(re.compile(p), spdx) for p, spdx in _ALIASES]

# Fingerprints of full license texts (LICENSE / COPYING files, long License: fields).
_TEXT_FINGERPRINTS = [
    ("GNU AFFERO GENERAL PUBLIC LICENSE", "AGPL-3.0-or-later"),
    ("GNU LESSER GENERAL PUBLIC LICENSE", "LGPL-2.1-or-later"),
    ("GNU LIBRARY GENERAL PUBLIC LICENSE", "LGPL-2.0-or-later"),
    ("GNU GENERAL PUBLIC LICENSE", "GPL-2.0-or-later"),
    ("Mozilla Public License Version 2.0", "MPL-2.0"),
    ("Mozilla Public License, v. 2.0", "MPL-2.0"),
    ("Eclipse Public License", "EPL-2.0"),
    ("Apache License", "Apache-2.0"),
    ("PYTHON SOFTWARE FOUNDATION LICENSE", "PSF-2.0"),
    ("Permission is hereby granted, free of charge, to any person obtaining", "MIT"),
    ("Redistribution and use in source and binary forms", "BSD-3-Clause"),
    ("Permission to use, copy, modify, and/or distribute this software for any", "ISC"),
    ("Permission to use, copy, modify, and distribute this software for any", "ISC"),
    ("This is free and unencumbered software released into the public domain", "Unlicense"),
    ("Boost Software License", "BSL-1.0"),
    ("CC0 1.0 Universal", "CC0-1.0"),
    ("This software is provided 'as-is', without any express or implied", "Zlib"),
]

LICENSE_FILE_RE = re.compile(r"^(LICEN[CS]E|COPYING|COPYRIGHT|UNLICENSE)([.\-_].*)?$", re.IGNORECASE)
_SPDX_HEADER = re.compile(r"SPDX-License-Identifier:\s*([A-Za-z0-9.+\-() ]+?)\s*(?:\*/|-->|$)", re.MULTILINE)


def normalize(name: str | None) -> str | None:
    """Free-text or SPDX license name -> SPDX expression (None if unrecognised)."""
    if not name:
        return None
    name = name.strip().strip(";,")
    if not name or name.upper() in ("UNKNOWN", "NONE", "NOASSERTION", "OTHER"):
        return None
    if len(name) > 200 or "\n" in name.strip():
        return from_text(name)
    expr = _normalize_expression(name)
    if expr:
        return expr
    low = name.lower()
    for pat, spdx in _ALIASES:
        if pat.search(low):
            return spdx
    return None


def _normalize_expression(name: str) -> str | None:
    """Normalise a syntactically valid SPDX expression; None if any id is unknown."""
    tokens = re.findall(r"\(|\)|[^\s()]+", name)
    out = []
    for t in tokens:
        up = t.upper()
        if t in "()" or up in ("AND", "OR", "WITH"):
            out.append(up if t not in "()" else t)
            continue
        canon = _SPDX_LOWER.get(t.lower()) or _SPDX_LOWER.get(t.lower().removesuffix("+"))
        if canon is None:
            if out and out[-1] == "WITH":  # exception names (e.g. Classpath-exception-2.0)
                out.append(t)
                continue
            if t.lower().startswith("licenseref-"):
                out.append(t)
                continue
            # Deprecated short ids: GPL-2.0, GPL-2.0+, LGPL-3.0 ...
            m = re.fullmatch(r"(A?L?GPL)-(\d\.\d)(\+?)", t, re.IGNORECASE)
            if not m:
                return None
            canon = f"{m.group(1).upper()}-{m.group(2)}-{'or-later' if m.group(3) else 'only'}"
            if canon not in _SPDX:
                return None
        out.append(canon)
    return " ".join(out).replace("( ", "(").replace(" )", ")")


def from_text(text: str) -> str | None:
    """Identify a full license text by fingerprint (first match wins; GPL family checked first)."""
    head = " ".join(text[:20000].split())
    for fp, spdx in _TEXT_FINGERPRINTS:
        if fp in head:
            if spdx == "GPL-2.0-or-later" and "Version 3" in head[:2000]:
                return "GPL-3.0-or-later"
            if spdx == "LGPL-2.1-or-later" and "Version 3" in head[:2000]:
                return "LGPL-3.0-or-later"
            if spdx == "AGPL-3.0-or-later":
                return spdx
            if spdx == "BSD-3-Clause" and "Neither the name" not in head and "names of its contributors" not in head:
                return "BSD-2-Clause"
            return spdx
    return None


def classify(expr: str | None) -> str:
    """SPDX expression -> category (see CATEGORIES)."""
    if not expr:
        return "unknown"
    tokens = re.findall(r"\(|\)|[^\s()]+", expr)
    pos = 0

    def parse_or() -> str:
        nonlocal pos
        best = parse_and()
        while pos < len(tokens) and tokens[pos] == "OR":
            pos += 1
            other = parse_and()
            best = min(best, other, key=_RANK.get)
        return best

    def parse_and() -> str:
        nonlocal pos
        worst = parse_atom()
        while pos < len(tokens) and tokens[pos] == "AND":
            pos += 1
            other = parse_atom()
            worst = max(worst, other, key=_RANK.get)
        return worst

    def parse_atom() -> str:
        nonlocal pos
        if pos >= len(tokens):
            return "unknown"
        t = tokens[pos]
        pos += 1
        if t == "(":
            c = parse_or()
            if pos < len(tokens) and tokens[pos] == ")":
                pos += 1
            cat = c
        else:
            cat = _SPDX.get(t, "proprietary" if t == "LicenseRef-Proprietary" else "unknown")
        if pos < len(tokens) and tokens[pos] == "WITH":
            pos += 2  # an exception relaxes linking terms but never makes GPL permissive
        return cat

    try:
        return parse_or()
    except (IndexError, KeyError):
        return "unknown"


def from_spdx_header(text: str) -> str | None:
    """License named by an `SPDX-License-Identifier:` line in the first 2 KB of a file."""
    if "SPDX-License-Identifier" not in text[:2048]:
        return None
    m = _SPDX_HEADER.search(text[:2048])
    return normalize(m.group(1)) if m else None


def from_metadata(metadata: str) -> str | None:
    """License of a wheel/sdist/installed distribution from its METADATA / PKG-INFO text."""
    msg = HeaderParser().parsestr(metadata)
    expr = normalize(msg.get("License-Expression"))
    if expr:
        return expr
    found = []
    for c in msg.get_all("Classifier") or []:
        if c.startswith("License ::"):
            leaf = c.split("::")[-1].strip()
            spdx = normalize(leaf) or normalize(c)
            if spdx and spdx not in found:
                found.append(spdx)
    if found:
        # Several license classifiers mean the user may pick any of them.
        return " OR ".join(found) if len(found) > 1 else found[0]
    return normalize(msg.get("License"))


def from_manifest(name: str, text: str) -> str | None:
    """License declared in a pyproject.toml, package.json, Cargo.toml or setup.cfg."""
    try:
        if name == "package.json":
            lic = json.loads(text).get("license")
            return normalize(lic if isinstance(lic, str) else (lic or {}).get("type"))
        if name in ("pyproject.toml", "Cargo.toml"):
            import tomllib

            data = tomllib.loads(text)
            sect = data.get("project") or data.get("package") or {}
            lic = sect.get("license")
            if isinstance(lic, dict):
                lic = lic.get("text")
            return normalize(lic) if isinstance(lic, str) else None
        if name == "setup.cfg":
            m = re.search(r"^license\s*=\s*(.+)$", text, re.MULTILINE)
            return normalize(m.group(1)) if m else None
    except (ValueError, AttributeError, TypeError, RecursionError, MemoryError):
        # (json and tomllib raise RecursionError for arrays nested ~1,000 deep: a manifest
        # that does not parse declares nothing, it does not stop the corpus build)
        return None
    return None


DEFAULT_POLICY = ("permissive",)
POLICIES = {
    "permissive": ("permissive",),
    "permissive+weak": ("permissive", "weak_copyleft"),
    "open": ("permissive", "weak_copyleft", "copyleft"),
    "any": CATEGORIES,
}
