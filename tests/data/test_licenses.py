"""License normalisation (SPDX), classification of expressions, metadata and header parsing."""

from __future__ import annotations

import pytest

from nanoseek.data.licenses import (classify, from_manifest, from_metadata, from_spdx_header, from_text, normalize)
from tests.data.fixture_corpus import APACHE_TEXT, GPL_TEXT, MIT_TEXT


@pytest.mark.parametrize("name,spdx", [
    ("MIT", "MIT"), ("mit", "MIT"), ("MIT License", "MIT"), ("Apache 2.0", "Apache-2.0"),
    ("Apache Software License", "Apache-2.0"), ("BSD", "BSD-3-Clause"), ("new BSD License", "BSD-3-Clause"),
    ("Simplified BSD", "BSD-2-Clause"), ("PSF", "PSF-2.0"), ("GPL-2.0+", "GPL-2.0-or-later"),
    ("LGPLv3", "LGPL-3.0-or-later"), ("Mozilla Public License 2.0 (MPL 2.0)", "MPL-2.0"),
    ("GNU Affero General Public License v3", "AGPL-3.0-or-later"), ("Proprietary", "LicenseRef-Proprietary"),
    ("Apache-2.0 OR MIT", "Apache-2.0 OR MIT"), ("(MIT OR Apache-2.0) AND BSD-3-Clause", "(MIT OR Apache-2.0) AND BSD-3-Clause"),
    ("UNKNOWN", None), ("", None), ("some homemade terms", None),
])
def test_normalize(name, spdx):
    assert normalize(name) == spdx


@pytest.mark.parametrize("expr,cat", [
    ("MIT", "permissive"), ("Apache-2.0 AND BSD-3-Clause", "permissive"),
    ("MIT OR GPL-3.0-only", "permissive"), ("GPL-3.0-only OR MIT", "permissive"),
    ("MIT AND GPL-3.0-only", "copyleft"), ("BSD-3-Clause AND LGPL-2.1-or-later", "weak_copyleft"),
    ("(MIT OR GPL-2.0-only) AND MPL-2.0", "weak_copyleft"),
    ("GPL-2.0-or-later WITH Classpath-exception-2.0", "copyleft"),
    ("LicenseRef-Proprietary", "proprietary"), ("LicenseRef-Custom", "unknown"), (None, "unknown"),
    ("Apache-2.0 AND Apache-2.0 WITH LLVM-exception AND MIT", "permissive"),
])
def test_classify(expr, cat):
    assert classify(expr) == cat


def test_license_texts():
    assert from_text(MIT_TEXT) == "MIT"
    assert from_text(GPL_TEXT) == "GPL-3.0-or-later"
    assert from_text(APACHE_TEXT) == "Apache-2.0"
    assert from_text("Redistribution and use in source and binary forms ... Neither the name of") == "BSD-3-Clause"
    assert from_text("Redistribution and use in source and binary forms, with or without") == "BSD-2-Clause"
    assert from_text("All rights reserved. Do not copy.") is None


def test_metadata():
    assert from_metadata("Name: a\nLicense-Expression: MIT OR Apache-2.0\nLicense: GPL\n") == "MIT OR Apache-2.0"
    assert from_metadata("Name: a\nClassifier: License :: OSI Approved :: BSD License\n") == "BSD-3-Clause"
    assert from_metadata("Name: a\nClassifier: License :: OSI Approved :: MIT License\n"
                         "Classifier: License :: OSI Approved :: Apache Software License\n") == "MIT OR Apache-2.0"
    assert from_metadata("Name: a\nLicense: MPL-2.0\n") == "MPL-2.0"
    assert from_metadata("Name: a\nLicense: " + MIT_TEXT.replace("\n", "\n        ") + "\n") == "MIT"
    assert from_metadata("Name: a\nVersion: 1\n") is None


def test_manifests_and_headers():
    assert from_manifest("package.json", '{"name": "x", "license": "ISC"}') == "ISC"
    assert from_manifest("pyproject.toml", '[project]\nname = "x"\nlicense = "BSD-2-Clause"\n') == "BSD-2-Clause"
    assert from_manifest("pyproject.toml", '[project]\nlicense = {text = "MIT"}\n') == "MIT"
    assert from_manifest("Cargo.toml", '[package]\nname = "x"\nlicense = "MIT OR Apache-2.0"\n') == "MIT OR Apache-2.0"
    assert from_manifest("pyproject.toml", "not toml [") is None


def test_a_manifest_nested_past_the_parsers_limits_declares_nothing(tmp_path):
    """json and tomllib raise RecursionError (not ValueError) for arrays ~1,000 deep: such a
    package.json or pyproject.toml in a corpus directory stopped the build with a traceback.
    Now it declares no license, and the directory's license file still counts."""
    import json

    from nanoseek.data.sources import _dir_license

    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(RecursionError):  # the premise
        json.loads(deep)
    assert from_manifest("package.json", '{"license": "ISC", "x": ' + deep + "}") is None
    assert from_manifest("pyproject.toml", f'[project]\nlicense = "MIT"\nx = {deep}\n') is None
    (tmp_path / "package.json").write_text('{"license": "ISC", "x": ' + deep + "}")
    (tmp_path / "LICENSE").write_text(MIT_TEXT)
    assert _dir_license(str(tmp_path)) == "MIT"
    assert from_spdx_header("// SPDX-License-Identifier: GPL-2.0-only\nint x;\n") == "GPL-2.0-only"
    assert from_spdx_header("/* SPDX-License-Identifier: MIT */\n") == "MIT"
    assert from_spdx_header("x = 1\n" * 10) is None
