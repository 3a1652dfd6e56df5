"""Chat templates rendered in Jinja's sandbox with bounds on what a template can make the neuron do.

A checkpoint's template is code, and messages choose its inputs. The sandbox already refuses unsafe
attributes; on top of it every render has a deadline and budgets: `**` and `*` may not build huge
numbers or strings, all range() calls of one render share an iteration budget, function and macro
calls are counted, the output is capped, and {% include %} / {% import %} / {% extends %} are
refused (a template has nothing to include). Exceeding any of them is INVALID_ARGUMENT with what
was exceeded. Rendering runs on a worker thread (see neuron/server.py), never on the event loop.
"""
from __future__ import annotations

import functools
import json
import threading
import time
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox

from common.errors import InvalidArgument

RENDER_SECONDS = 2.0
MAX_OUTPUT_CHARS = 4 << 20
MAX_RANGE_ITEMS = 100_000       # all range() calls of one render together
MAX_CALLS = 200_000             # function, filter and macro calls of one render
MAX_RESULT_BITS = 1 << 16       # an int that `**` or `*` may produce
MAX_REPEAT_ITEMS = 1 << 20      # a string or list that `*` may produce


class TemplateLimit(InvalidArgument):
    def __init__(self, what: str):
        super().__init__(f"the model's chat template exceeded a limit while rendering this prompt: {what}; "
                         "shorten the conversation, or send prompt.text or prompt.tokens")


class _Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.range_left = MAX_RANGE_ITEMS
        self.calls_left = MAX_CALLS

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"rendering took longer than {self.seconds:g} s")

    def call(self) -> None:
        self.calls_left -= 1
        if self.calls_left < 0:
            raise TemplateLimit(f"more than {MAX_CALLS} calls")
        if self.calls_left % 256 == 0:
            self.check_time()

    def take_range(self, items: int) -> None:
        self.range_left -= items
        if self.range_left < 0:
            raise TemplateLimit(f"range() over more than {MAX_RANGE_ITEMS} items in all")
        self.check_time()


_current = threading.local()  # the budget of the render running on this thread


def _budget() -> _Budget:
    budget = getattr(_current, "budget", None)
    if budget is None:  # rendered outside render(): bounded all the same
        budget = _current.budget = _Budget(RENDER_SECONDS)
    return budget


def _bounded_range(*args):
    r = range(*args)
    _budget().take_range(len(r))
    return r


def _int_bits(value) -> int:
    return abs(value).bit_length() if isinstance(value, int) else 64


def _check_binop(operator: str, left, right) -> None:
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * _int_bits(left) > MAX_RESULT_BITS:
            raise TemplateLimit(f"{operator} would make a number of more than {MAX_RESULT_BITS} bits")
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_REPEAT_ITEMS:
                raise TemplateLimit(f"* would repeat a sequence to more than {MAX_REPEAT_ITEMS} items")
        if isinstance(left, int) and isinstance(right, int) and _int_bits(left) + _int_bits(right) > MAX_RESULT_BITS:
            raise TemplateLimit(f"* would make a number of more than {MAX_RESULT_BITS} bits")


class BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"**", "*"})

    def call_binop(self, context, operator, left, right):
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        _budget().call()
        return super().call(__context, __obj, *args, **kwargs)


def _refuse_loading(name: str):
    raise InvalidArgument(f"the model's chat template tries to include or import {name[:200]!r}; "
                          "templates may not load other templates")


def _raise_exception(message: str):
    # Templates call this to reject a conversation (e.g. roles that do not alternate).
    raise InvalidArgument(f"prompt.chat was rejected by the model's chat template: {str(message)[:500]}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII text; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                         loader=jinja2.FunctionLoader(_refuse_loading))
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _bounded_range
    return env.from_string(source)


def render(template: jinja2.Template, seconds: float = RENDER_SECONDS, **variables) -> str:
    """Render with this render's own budget and deadline; the output is capped as it is produced."""
    _current.budget = budget = _Budget(seconds)
    try:
        parts, size = [], 0
        for part in template.generate(**variables):
            size += len(part)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateLimit(f"the output grew past {MAX_OUTPUT_CHARS} characters")
            budget.check_time()
            parts.append(part)
        return "".join(parts)
    except RecursionError:
        raise TemplateLimit("macros recursed too deeply") from None
    except (MemoryError, OverflowError) as err:
        raise TemplateLimit(f"{type(err).__name__}") from None
    finally:
        _current.budget = None
