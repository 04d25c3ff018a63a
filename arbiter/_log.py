"""The library's one logger: warnings always, routine events only when structlog is configured.

An unconfigured structlog prints every level to stdout; a library must stay quiet about
routine events (a grant, a retry, a placement) unless its user asked for logs. Only
structlog's sync methods are used (its ``a*`` methods are asyncio-only).
"""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["debug", "log", "note"]

log = structlog.get_logger("arbiter")


def note(event: str, **fields: Any) -> None:
    """Log a routine event at info level, only when structlog is configured."""
    if structlog.is_configured():
        log.info(event, **fields)


def debug(event: str, **fields: Any) -> None:
    """Log a routine event at debug level, only when structlog is configured.

    Hot paths test ``structlog.is_configured()`` themselves before building fields.
    """
    if structlog.is_configured():
        log.debug(event, **fields)
