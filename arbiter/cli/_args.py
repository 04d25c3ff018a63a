"""The argument parser: every usage error becomes one line and exit status 2."""

from __future__ import annotations

import argparse
import math
from pathlib import PurePath
from typing import NoReturn

from .._types import GiB
from ._trace import BUILTIN_MINUTES, MAX_GIB, MAX_SECONDS

__all__ = ["PLOT_FORMATS", "SCHEDULER_NAMES", "UsageError", "build_parser"]

SCHEDULER_NAMES = ("fifo", "priority", "adaptive")
# What ``--plot`` can write, by the file's suffix (matplotlib's names).
PLOT_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpg", ".jpeg": "jpg"}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise `UsageError` instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(text: str, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of {unit}, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of {unit} > 0, got {text!r}")
    return value


def _positive_gb(text: str) -> float:
    value = _positive(text, "GiB")
    if value > MAX_GIB:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_GIB} GiB, got {text!r}")
    if round(value * GiB) < 1:
        raise argparse.ArgumentTypeError(f"is less than one byte: {text!r}")
    return value


def _positive_minutes(text: str) -> float:
    value = _positive(text, "minutes")
    if value * 60 > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SECONDS / 60:.0f} minutes (a week)")
    return value


# Below this, reloading one model takes the simulator days of simulated time.
MIN_LOAD_GBPS = 0.01


def _load_gbps(text: str) -> float:
    value = _positive(text, "GiB per second")
    if value < MIN_LOAD_GBPS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_LOAD_GBPS} GiB/s, got {text!r}")
    return value


def _plot_path(text: str) -> str:
    if PurePath(text).suffix.lower() not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(f"must end in {', '.join(PLOT_FORMATS)}, got {text!r}")
    return text


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _schedulers(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in SCHEDULER_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown scheduler {name!r} (choose from {', '.join(SCHEDULER_NAMES)})"
            )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    """The ``arbiter`` parser with its ``detect`` and ``simulate`` commands."""
    from .. import __version__

    parser = _Parser(
        prog="arbiter",
        description="Share one GPU between an LLM server and a diffusion server.",
    )
    parser.add_argument("--version", action="version", version=f"gpu-arbiter {__version__}")
    # Not required: with no command, ``arbiter`` prints its usage.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    detect = commands.add_parser(
        "detect",
        help="show the GPUs found and the config auto_detect() would build",
        description="Show what GPU detection finds (NVML, nvidia-smi, rocm-smi) and the "
        "ArbiterConfig that ArbiterConfig.auto_detect() would build from it.",
    )
    detect.add_argument("--json", action="store_true", help="print one JSON object")

    simulate = commands.add_parser(
        "simulate",
        help="replay a workload trace through the real Arbiter in virtual time",
        description="Replay a workload trace (a built-in one by default) through the real "
        "Arbiter on a virtual GPU in virtual time, once per scheduler, and compare them.",
        epilog='Trace: JSON lines {"at": s, "workload": "llm_inference", "priority": '
        '"user_facing", "memory_gb": 6, "duration": 2.5, "min_memory_gb": 3, "timeout": 30, '
        '"preemptible": true, "resumable": false} (all but the first five optional).',
    )
    simulate.add_argument(
        "--vram-gb",
        type=_positive_gb,
        default=24.0,
        metavar="GB",
        help="the VRAM budget in GiB (default: 24)",
    )
    simulate.add_argument(
        "--trace",
        metavar="FILE",
        help="a JSON-lines trace, - for standard input (default: the built-in trace)",
    )
    simulate.add_argument(
        "--policies",
        type=_schedulers,
        default=list(SCHEDULER_NAMES),
        metavar="NAMES",
        help="comma-separated schedulers to compare (default: fifo,priority,adaptive)",
    )
    simulate.add_argument(
        "--plot",
        type=_plot_path,
        metavar="PNG",
        help="write a timeline figure (.png; also .svg, .pdf, .jpg)",
    )
    simulate.add_argument(
        "--load-gbps",
        type=_load_gbps,
        default=4.0,
        metavar="GBPS",
        help="how fast a preempted job reloads its memory, GiB/s (default: 4)",
    )
    simulate.add_argument("--json", action="store_true", help="print one JSON object")
    simulate.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="seed of the built-in trace and of any randomness of a run (default: 0)",
    )
    simulate.add_argument(
        "--minutes",
        type=_positive_minutes,
        default=None,
        metavar="M",
        help=f"length of the built-in trace in minutes (default: {BUILTIN_MINUTES:g})",
    )
    _add_daemon_commands(commands)
    return parser


# A shorter ttl leaves no time for a client's hello: every session would be refused.
MIN_TTL = 0.1


def _ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not MIN_TTL <= value <= 86_400:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_TTL} and at most a day (86400) seconds, got {text!r}"
        )
    return value


def _digits(text: str) -> bool:
    """Whether ``text`` is a plain decimal number (``str.isdigit`` takes any script's)."""
    return text.isascii() and text.isdigit()


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not _digits(port) or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, got {text!r}")
    return host, int(port)


# uid_t is 32 bits, and its last value means "no uid".
MAX_UID = 2**32 - 2


def _uid(text: str) -> int:
    if not _digits(text) or len(text) > 10 or int(text) > MAX_UID:
        raise argparse.ArgumentTypeError(
            f"must be a uid (an int from 0 to {MAX_UID}), got {text!r}"
        )
    return int(text)


def _socket(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must be a path, got ''")
    return text


def _add_daemon_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
    """Add ``serve`` and ``status`` to the parser's subcommands."""
    serve = commands.add_parser(
        "serve",
        help="serve this GPU's arbiter to other processes on a Unix socket",
        description="Run the one arbiter of a GPU and serve it to RemoteArbiter clients "
        "on a Unix socket until SIGTERM or SIGINT (Linux).",
    )
    serve.add_argument(
        "--socket", type=_socket, metavar="PATH", help="the socket (default: per device)"
    )
    serve.add_argument(
        "--vram-gb", type=_positive_gb, default=None, metavar="N", help="budget in GiB"
    )
    serve.add_argument(
        "--ttl", type=_ttl, default=10.0, metavar="S", help="session ttl (default: 10)"
    )
    serve.add_argument(
        "--metrics", type=_host_port, default=None, metavar="HOST:PORT", help="Prometheus"
    )
    serve.add_argument(
        "--allow-uid", type=_uid, nargs="+", default=[], metavar="UID", help="also serve UIDs"
    )
    status = commands.add_parser(
        "status",
        help="show the daemon's state, holders and waiters",
        description="Show what the arbiter daemon holds and who waits.",
    )
    status.add_argument(
        "--socket", type=_socket, metavar="PATH", help="the socket (default: per device)"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
