"""The library's one logger: warnings always, on stderr; routine events only when
structlog is configured.

An unconfigured structlog prints every level to stdout, where a library's warning
would mix into the program's own output (a CLI's JSON, a piped report). So until the
program configures structlog, `log` writes through structlog's default processors to
stderr; once it has, `log` is simply ``structlog.get_logger("arbiter")`` and the
program's configuration decides where everything goes. Routine events (a grant, a
retry, a placement) stay quiet unless the user asked for logs. Only structlog's sync
methods are used (its ``a*`` methods are asyncio-only).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["configured", "debug", "log", "note"]


def configured() -> bool:
    """Whether the program configured structlog. A program that never imported it has
    not, so this does not import it: structlog (and what its dev renderer loads) is a
    large part of ``import arbiter``, and a quiet library never needs it."""
    structlog = sys.modules.get("structlog")
    return structlog is not None and bool(structlog.is_configured())


# The program's logger and the configuration it was made for. One proxy per
# configuration: a proxy finalizes itself on first use when the configuration says so
# (``cache_logger_on_first_use``), which a fresh proxy per call would never do.
_configured_logger: tuple[tuple[object, ...], Any] | None = None


def _logger() -> Any:
    global _configured_logger
    import structlog

    if structlog.is_configured():
        config = structlog.get_config()
        made_for = (config["processors"], config["wrapper_class"], config["logger_factory"])
        cached = _configured_logger
        if cached is not None:
            processors, wrapper_class, logger_factory = cached[0]
            if (
                processors is made_for[0]
                and wrapper_class is made_for[1]
                and logger_factory is made_for[2]
            ):
                return cached[1]
        logger = structlog.get_logger("arbiter")
        _configured_logger = (made_for, logger)
        return logger
    # Built per call: warnings are rare, and sys.stderr may have been replaced since.
    return structlog.wrap_logger(structlog.PrintLogger(sys.stderr))


class ArbiterLog:
    """The ``"arbiter"`` structlog logger, on stderr while structlog is unconfigured."""

    __slots__ = ()

    def debug(self, event: str, **fields: Any) -> None:
        """Log at debug level."""
        _logger().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log at info level."""
        _logger().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log at warning level."""
        _logger().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log at error level."""
        _logger().error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log at error level with the exception being handled."""
        _logger().exception(event, **fields)


log = ArbiterLog()


def note(event: str, **fields: Any) -> None:
    """Log a routine event at info level, only when structlog is configured."""
    if configured():
        _logger().info(event, **fields)


def debug(event: str, **fields: Any) -> None:
    """Log a routine event at debug level, only when structlog is configured.

    Hot paths test `configured` themselves before building fields.
    """
    if configured():
        _logger().debug(event, **fields)
