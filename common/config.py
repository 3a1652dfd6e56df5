"""Layered settings: CLI flags, then environment variables (PREFIX_NAME), then a TOML file, then
defaults. Flags are declared with default=None so "not given" is distinguishable from a value."""
from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Setting:
    name: str                      # attribute name, e.g. "listen" (flag --listen, env PREFIX_LISTEN)
    default: Any
    help: str
    type: Callable[[str], Any] = str
    multiple: bool = False         # flag may repeat; env value is comma-separated
    flag: bool = True
    choices: tuple = field(default=())


def add_settings(parser: argparse.ArgumentParser, settings: list[Setting], env_prefix: str) -> None:
    for s in settings:
        if not s.flag:
            continue
        env = f"{env_prefix}_{s.name.upper()}"
        kwargs: dict[str, Any] = {"default": None, "dest": s.name, "help": f"{s.help} (env {env}; default: {s.default!r})"}
        if s.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = s.type
            kwargs["action"] = "append" if s.multiple else "store"
        if s.choices:
            kwargs["choices"] = s.choices
        parser.add_argument(f"--{s.name.replace('_', '-')}", **kwargs)


def _from_string(s: Setting, raw: str) -> Any:
    if s.type is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if s.multiple:
        return [s.type(v.strip()) for v in raw.split(",") if v.strip()]
    return s.type(raw)


def resolve(args: argparse.Namespace, settings: list[Setting], env_prefix: str, config_file: str | None = None) -> dict[str, Any]:
    """Return {name: value} with precedence flags > env > TOML file > default."""
    file_values: dict[str, Any] = {}
    if config_file:
        with open(config_file, "rb") as f:
            file_values = tomllib.load(f)
        unknown = set(file_values) - {s.name for s in settings}
        if unknown:
            raise SystemExit(f"{config_file}: unknown settings {sorted(unknown)}; known: {sorted(s.name for s in settings)}")
    values: dict[str, Any] = {}
    for s in settings:
        flag_value = getattr(args, s.name, None)
        env = os.environ.get(f"{env_prefix}_{s.name.upper()}")
        if flag_value is not None:
            values[s.name] = flag_value
        elif env is not None and env != "":
            values[s.name] = _from_string(s, env)
        elif s.name in file_values:
            values[s.name] = file_values[s.name]
        else:
            values[s.name] = s.default
    return values


def listen_setting(default: str) -> Setting:
    return Setting("listen", default, "address to serve on (HOST:PORT; port 0 picks a free one)")


# What every server process takes besides its own settings: shutdown, scripting and logging.
SERVER_SETTINGS = [
    Setting("drain_seconds", 10.0, "on SIGTERM, how long in-flight requests may finish", type=float),
    Setting("port_file", "", "write the bound port to this file once serving (for scripts and tests)"),
    Setting("log_level", "info", "debug, info, warning, error"),
    Setting("log_format", "auto", "json, console or auto (console on a terminal)"),
]
