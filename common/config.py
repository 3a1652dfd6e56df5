"""Layered settings: CLI flags, then environment variables (PREFIX_NAME), then a TOML file, then
defaults. Flags are declared with default=None so "not given" is distinguishable from a value.

Every value is checked where it came from (type, choices, minimum) and a bad one raises ConfigError,
whose message is one line naming the source (flag, env variable or file key): the CLIs print it and
exit 2, as argparse does for a bad flag."""
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
    minimum: float | None = None   # numbers: the smallest value allowed


class ConfigError(Exception):
    """A setting cannot be used as given; the message is one line for the operator."""


EXIT_USAGE = 2  # what a CLI exits with on a ConfigError (argparse's code for a bad command line)
_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


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


def _type_name(s: Setting) -> str:
    return _TYPE_NAMES.get(s.type, "a string")


def _from_string(s: Setting, raw: str, source: str) -> Any:
    try:
        if s.type is bool:
            if raw.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(raw)
            return raw.strip().lower() in _TRUE
        if s.multiple:
            return [s.type(v.strip()) for v in raw.split(",") if v.strip()]
        return s.type(raw)
    except ValueError:
        raise ConfigError(f"{source}={raw!r} is not {_type_name(s)}") from None


def _from_file(s: Setting, value: Any, source: str) -> Any:
    """A TOML value: of the setting's type (an integer is a number too), a list for a repeatable one."""
    def one(v: Any) -> Any:
        ok = {bool: isinstance(v, bool), int: isinstance(v, int) and not isinstance(v, bool),
              float: isinstance(v, (int, float)) and not isinstance(v, bool)}.get(s.type, isinstance(v, str))
        if not ok:
            raise ConfigError(f"{source} = {v!r} is not {_type_name(s)}")
        return float(v) if s.type is float else s.type(v)

    if s.multiple:
        return [one(v) for v in (value if isinstance(value, list) else [value])]
    return one(value)


def _check(s: Setting, value: Any, source: str) -> None:
    for v in value if s.multiple else [value]:
        if s.choices and v not in s.choices:
            raise ConfigError(f"{source} {v!r} is not one of {', '.join(map(str, s.choices))}")
        if s.minimum is not None and v < s.minimum:
            raise ConfigError(f"{source} {v!r} is below its minimum {s.minimum:g}")


def read_config_file(path: str, settings: list[Setting]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML: {err}") from None
    unknown = set(values) - {s.name for s in settings}
    if unknown:
        raise ConfigError(f"--config {path}: unknown settings {sorted(unknown)}; known: {sorted(s.name for s in settings)}")
    return values


def resolve(args: argparse.Namespace, settings: list[Setting], env_prefix: str, config_file: str | None = None) -> dict[str, Any]:
    """Return {name: value} with precedence flags > env > TOML file > default. Raises ConfigError."""
    file_values = read_config_file(config_file, settings) if config_file else {}
    values: dict[str, Any] = {}
    for s in settings:
        flag_value = getattr(args, s.name, None)
        env_name = f"{env_prefix}_{s.name.upper()}"
        env = os.environ.get(env_name)
        if flag_value is not None:
            value, source = flag_value, f"--{s.name.replace('_', '-')}"
        elif env is not None and env != "":
            value, source = _from_string(s, env, env_name), env_name
        elif s.name in file_values:
            source = f"{config_file}: {s.name}"
            value = _from_file(s, file_values[s.name], source)
        else:
            value, source = s.default, f"the default of {s.name}"
        _check(s, value, source)
        values[s.name] = value
    return values


def listen_setting(default: str) -> Setting:
    return Setting("listen", default, "address to serve on (HOST:PORT; port 0 picks a free one)")


# What every server process takes besides its own settings: shutdown, scripting and logging.
SERVER_SETTINGS = [
    Setting("drain_seconds", 10.0, "on SIGTERM, how long in-flight requests may finish", type=float),
    Setting("port_file", "", "write the bound port to this file once serving (for scripts and tests)"),
    Setting("log_level", "info", "debug, info, warning, error", choices=("debug", "info", "warning", "error")),
    Setting("log_format", "auto", "json, console or auto (console on a terminal)",
            choices=("json", "console", "auto")),
]
