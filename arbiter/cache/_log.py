"""The cache's logger: warnings always, routine events only when the user configured structlog.

An unconfigured structlog prints every level to stdout; a library must stay quiet about
routine events (a retry, a placement) unless its user asked for logs.
"""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["log", "note"]

log = structlog.get_logger("arbiter")


def note(event: str, **fields: Any) -> None:
    """Log a routine event at info level, only when structlog is configured."""
    if structlog.is_configured():
        log.info(event, **fields)
