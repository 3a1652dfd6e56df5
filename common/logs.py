"""structlog setup: JSON lines in containers (no terminal), readable console output on a TTY."""
from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """fmt: "json", "console" or "auto" (console on a terminal, JSON otherwise)."""
    fmt = os.environ.get("LOG_FORMAT", fmt)
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
