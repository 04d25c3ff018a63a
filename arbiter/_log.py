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


class ArbiterLog:
    """The ``"arbiter"`` structlog logger, on stderr while structlog is unconfigured."""

    # The program's logger and the configuration it was made for. One proxy per
    # configuration: a proxy finalizes itself on first use when the configuration says
    # so (``cache_logger_on_first_use``), which a fresh proxy per call would never do.
    __slots__ = ("_made",)

    def __init__(self) -> None:
        self._made: tuple[tuple[object, object, object], Any] | None = None

    def _logger(self) -> Any:
        import structlog

        if not structlog.is_configured():
            # Built per call: warnings are rare, and sys.stderr may have been replaced.
            return structlog.wrap_logger(structlog.PrintLogger(sys.stderr))
        config = structlog.get_config()
        processors, wrapper_class = config["processors"], config["wrapper_class"]
        logger_factory = config["logger_factory"]
        made = self._made
        if made is not None:
            (made_processors, made_wrapper_class, made_logger_factory), logger = made
            if (
                made_processors is processors
                and made_wrapper_class is wrapper_class
                and made_logger_factory is logger_factory
            ):
                return logger
        logger = structlog.get_logger("arbiter")
        self._made = ((processors, wrapper_class, logger_factory), logger)
        return logger

    def debug(self, event: str, **fields: Any) -> None:
        """Log at debug level."""
        self._logger().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log at info level."""
        self._logger().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log at warning level."""
        self._logger().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log at error level."""
        self._logger().error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log at error level with the exception being handled."""
        self._logger().exception(event, **fields)


log = ArbiterLog()


def note(event: str, **fields: Any) -> None:
    """Log a routine event at info level, only when structlog is configured."""
    if configured():
        log.info(event, **fields)


def debug(event: str, **fields: Any) -> None:
    """Log a routine event at debug level, only when structlog is configured.

    Hot paths test `configured` themselves before building fields.
    """
    if configured():
        log.debug(event, **fields)
