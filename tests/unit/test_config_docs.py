"""docs/configuration.md's settings table is generated from the code and must be current."""
from __future__ import annotations

import re

from tests.helpers import ROOT
from tools import gen_config_docs


def test_configuration_table_is_current():
    doc = gen_config_docs.DOC.read_text()
    assert gen_config_docs.render(doc) == doc, "docs/configuration.md is stale: run `python tools/gen_config_docs.py`"


def test_every_environment_variable_the_code_reads_is_documented():
    doc = gen_config_docs.DOC.read_text()
    literal = re.compile(r"""["'`]((?:CORTEX|NEURON)_[A-Z0-9_]+)["'`]""")
    read = set()
    for package in ("cortex", "neuron", "common"):
        for path in (ROOT / package).rglob("*.py"):
            if "/v1/" in path.as_posix():
                continue
            read |= set(literal.findall(path.read_text()))
    undocumented = sorted(name for name in read if f"`{name}`" not in doc)
    assert not undocumented, f"read by the code but not in docs/configuration.md: {undocumented} (add to ENV_ONLY)"
