"""The packages' layering (docs/architecture.md): neither process package imports the other, common/
imports neither, and the public API's proto imports nothing of the internal node API."""
from __future__ import annotations

import ast
import re

import pytest

from tests.helpers import ROOT


def imported_packages(package: str) -> dict[str, set[str]]:
    """{module path: top-level packages it imports} for every .py under ROOT/package."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [("neuron", {"cortex"}), ("cortex", {"neuron"}),
                                                ("common", {"cortex", "neuron"})])
def test_a_package_does_not_import_the_other_process(package, forbidden):
    offenders = {path: names & forbidden for path, names in imported_packages(package).items() if names & forbidden}
    assert not offenders, f"{package}/ imports {forbidden}: {offenders}"


def test_the_public_proto_imports_nothing_of_the_node_api():
    text = (ROOT / "protos" / "cortex" / "v1" / "cortex.proto").read_text()
    code = "\n".join(line.split("//")[0] for line in text.splitlines())
    assert not re.search(r'^\s*import\s+"', code, re.M), "cortex.proto imports another .proto"
    assert "neuron.v1." not in code
