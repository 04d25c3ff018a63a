"""``arbiter serve``: the daemon of one GPU, on a Unix socket, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

from ._args import UsageError

__all__ = ["MAX_SOCKET_PATH", "run_serve"]

# sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107


def _import_structlog() -> Any:
    """structlog, imported without rich where nothing has loaded rich yet.

    structlog's console renderer and traceback helpers import rich when it is installed
    (about 40 ms of CPU, a fifth of the daemon's start, paid again at every restart);
    the daemon renders key=value lines and plain tracebacks, so rich is hidden while
    structlog loads (a ``None`` in ``sys.modules`` makes ``import rich`` fail as if it
    were not installed). A later ``import rich`` in this process loads it as usual."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        import structlog

        return structlog
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog
    finally:
        del sys.modules["rich"]
    return structlog


def _configure_logging() -> None:
    structlog = _import_structlog()

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Claim the socket (a refusal is one line, before any log line), then serve."""
    from .._config import ArbiterConfig
    from ..remote._daemon import DaemonConfig, DaemonRefused, claim_socket
    from ..remote._wire import default_socket_path

    if not sys.platform.startswith("linux"):
        raise UsageError("arbiter serve needs Linux (peer credentials on Unix sockets)")
    # Everything that can refuse the start comes before detection, which may log.
    device = ArbiterConfig().device
    path = Path(args.socket) if args.socket else default_socket_path(device)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(
            f"socket path too long for a Unix socket ({MAX_SOCKET_PATH} bytes): {path}"
        )
    daemon_config = DaemonConfig(socket=path, ttl=args.ttl, allow_uids=frozenset(args.allow_uid))
    metrics = None if args.metrics is None else _metrics(*args.metrics)
    # Last: it removes a stale socket and a handover, which a refused start must leave.
    try:
        claim = claim_socket(path, daemon_config.ttl)
    except DaemonRefused as exc:
        raise UsageError(str(exc)) from None
    try:
        config = (
            ArbiterConfig.auto_detect()
            if args.vram_gb is None
            else ArbiterConfig.for_vram_gb(args.vram_gb)
        )
        _configure_logging()
        try:
            anyio.run(_serve_until_signal, claim, config, daemon_config, metrics, backend="asyncio")
        except OSError as exc:
            raise UsageError(f"cannot serve {path}: {exc.strerror or exc}") from None
    finally:
        claim.release()
    return 0


def _metrics(host: str, port: int) -> Any:
    """The ``--metrics`` server, listening (before detection, which may log)."""
    try:
        from ..remote._metrics import Metrics
    except ImportError:
        raise UsageError(
            "--metrics needs prometheus-client: pip install 'gpu-arbiter[cli]'"
        ) from None
    try:
        return Metrics(host, port)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


async def _serve_until_signal(claim: Any, config: Any, daemon_config: Any, metrics: Any) -> None:
    from .._arbiter import Arbiter
    from .._gpu import open_default_probe
    from .._log import log
    from ..remote._daemon import serve

    probe = await open_default_probe(config.device)
    try:
        async with Arbiter(config, probe=probe) as arbiter, anyio.create_task_group() as tasks:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                on_host = None if metrics is None else metrics.attach
                await tasks.start(serve, claim, arbiter, daemon_config, probe, on_host)
                async for signum in signals:
                    log.info("daemon stopping", signal=signal.Signals(signum).name)
                    break
                tasks.cancel_scope.cancel()
    finally:
        if probe is not None:
            with anyio.CancelScope(shield=True):
                await probe.aclose()
