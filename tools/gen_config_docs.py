"""Write the settings table of docs/configuration.md from the code's settings lists.

    python tools/gen_config_docs.py           # rewrite the generated part of docs/configuration.md
    python tools/gen_config_docs.py --check   # exit 1 if it is stale (tests/unit/test_config_docs.py)

The table comes from `cortex.cli.SETTINGS` and `neuron.cli.SETTINGS` (the lists `common.config`
turns into flags, environment variables and TOML keys) plus ENV_ONLY below: variables read straight
from the environment. Only the part between the BEGIN/END markers is generated; the prose around it
is written by hand.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED: tools/gen_config_docs.py -->"
END = "<!-- END GENERATED: tools/gen_config_docs.py -->"

# (component, module with SETTINGS, environment prefix, subcommand the flags belong to)
COMPONENTS = [("cortex", "cortex.cli", "CORTEX", "cortex serve"), ("neuron", "neuron.cli", "NEURON", "neuron serve")]

# Variables read directly from the environment, not through a SETTINGS list:
# (variable, used by, default, meaning). tests/unit/test_config_docs.py checks that every
# CORTEX_*/NEURON_* name the code reads is in the table.
ENV_ONLY = [
    ("CORTEX_ADDRESS", "cortex client commands", "127.0.0.1:50051",
     "cortex address for `cortex nodes|models|load|unload|generate|forward` (flag `--cortex`)"),
    ("CORTEX_API_KEY", "cortex client commands", "(empty)",
     "API key the client commands send as `authorization: Bearer KEY` (flag `--api-key`); they also read "
     "CORTEX_TLS_CA, CORTEX_TLS_CERT and CORTEX_TLS_KEY (flags `--tls-ca`, `--tls-cert`, `--tls-key`) as the "
     "CA that verifies cortex and an optional client certificate"),
    ("NEURON_FUSED", "neuron", "auto",
     "fused CUDA kernels: auto (on GPUs when the model's shapes suit them), off, cuda, numpy (tests)"),
    ("LOG_FORMAT", "cortex, neuron", "", "overrides `log_format` of both servers (json or console)"),
]


def _default(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "(none)"
    if value == "":
        return "(empty)"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_of(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, "SETTINGS", None)


def table() -> str:
    rows = ["| Component | Environment variable | Flag | TOML key | Default | Meaning |",
            "| --- | --- | --- | --- | --- | --- |"]
    missing = []
    for component, module_name, prefix, command in COMPONENTS:
        settings = settings_of(module_name)
        if settings is None:
            missing.append(module_name)
            continue
        for s in settings:
            env = f"{prefix}_{s.name.upper()}"
            flag = f"`--{s.name.replace('_', '-')}`" if s.flag else ""
            if s.multiple:
                flag += " (repeatable; env: comma-separated)"
            kind = {float: "float", int: "int", bool: "bool"}.get(s.type, "")
            meaning = s.help + (f" ({kind})" if kind else "")
            rows.append(f"| {component} | `{env}` | {_cell(flag)} | `{s.name}` | `{_cell(_default(s.default))}` "
                        f"| {_cell(meaning)} |")
    for env, used_by, default, meaning in ENV_ONLY:
        rows.append(f"| {used_by} | `{env}` | | | {f'`{default}`' if default else ''} | {_cell(meaning)} |")
    if missing:
        raise SystemExit(f"cannot import {', '.join(missing)}: run from the repo root with the package installed")
    return "\n".join(rows) + "\n"


def render(current: str) -> str:
    generated = f"{BEGIN}\n{table()}{END}"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + generated + tail
    return current.rstrip("\n") + "\n\n" + generated + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    current = args.doc.read_text() if args.doc.exists() else "# Configuration\n"
    wanted = render(current)
    if args.check:
        if current != wanted:
            diff = difflib.unified_diff(current.splitlines(), wanted.splitlines(), "docs (now)", "docs (wanted)",
                                        lineterm="")
            print("\n".join(diff))
            print(f"\n{args.doc} is stale: run `python tools/gen_config_docs.py`", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(wanted)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
