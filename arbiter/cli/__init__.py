"""The ``arbiter`` command line: ``detect``, ``simulate``, ``serve`` and ``status``.

Bad input (a usage error, a missing or malformed trace, a bad size) ends with exit
status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._args import UsageError, build_parser
from ._trace import BUILTIN_MINUTES, Trace, TraceError, builtin_trace, load_trace

if TYPE_CHECKING:
    import argparse

    from rich.progress import Progress, TaskID

    from ._record import SchedulerResult

__all__ = ["main"]

# Below this much real time a simulation shows no progress bar.
PROGRESS_AFTER_S = 1.0
_CLI_MODULES = {"rich", "matplotlib", "trio"}


def main(argv: list[str] | None = None) -> int:
    """Run ``arbiter`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command in ("serve", "status"):
            return _run_daemon_command(args)
        from rich.console import Console

        if args.command == "detect":
            from ._detect import run_detect

            return run_detect(Console(), as_json_output=args.json)
        return _run_simulate(args)
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, TraceError) as exc:
        return _fail(str(exc))
    except ModuleNotFoundError as exc:
        if exc.name not in _CLI_MODULES:
            raise
        return _fail(f"{exc.name} is missing: pip install 'gpu-arbiter[cli]'")
    except KeyboardInterrupt:
        return 130


def _run_daemon_command(args: argparse.Namespace) -> int:
    # Neither needs the cli extra (rich, trio): serve runs on asyncio.
    if args.command == "serve":
        from ._serve import run_serve

        return run_serve(args)
    from ._status import run_status

    return run_status(args)


def _fail(message: str) -> int:
    print(f"arbiter: error: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace) -> Trace:
    if args.trace is not None:
        for option in ("seed", "minutes"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option} applies to the built-in trace, not to --trace")
        return load_trace(args.trace)
    minutes = BUILTIN_MINUTES if args.minutes is None else args.minutes
    return builtin_trace(seed=0 if args.seed is None else args.seed, minutes=minutes)


def _run_simulate(args: argparse.Namespace) -> int:
    from .._types import GiB
    from ._report import as_json, print_report
    from ._simulate import SCHEDULERS, simulate

    if args.plot is not None:
        folder = Path(args.plot).resolve().parent
        if not folder.is_dir():
            raise UsageError(f"cannot write plot {args.plot}: no folder {folder}")
    trace = _load(args)
    budget = round(args.vram_gb * GiB)
    schedulers = [SCHEDULERS[name] for name in args.policies]
    show_progress = not args.json and sys.stderr.isatty()
    results: list[SchedulerResult] = []
    with _LazyProgress(len(trace.rows) * len(schedulers), enabled=show_progress) as bar:
        for scheduler in schedulers:
            bar.describe(scheduler.name)
            results.extend(simulate(trace, [scheduler], budget, progress=bar.advance))
    if args.plot is not None:
        from ._plot import write_plot

        try:
            write_plot(args.plot, trace, budget, results)
        except OSError as exc:
            raise UsageError(f"cannot write plot {args.plot}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(as_json(args.vram_gb, results)))
        return 0
    from rich.console import Console

    console = Console()
    print_report(console, trace, args.vram_gb, results)
    if args.plot is not None:
        console.print(f"Plot written to {args.plot}")
    return 0


class _LazyProgress:
    """A rich progress bar on stderr that appears only once a run has taken a second."""

    __slots__ = ("_bar", "_description", "_done", "_enabled", "_started", "_task", "_total")

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._total = total
        self._enabled = enabled
        self._done = 0
        self._description = ""
        self._started = time.perf_counter()  # real time: the bar is for the person waiting
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> _LazyProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def describe(self, name: str) -> None:
        """Name the scheduler being simulated."""
        self._description = f"simulating {name}"
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=self._description)

    def advance(self, jobs: int) -> None:
        """Count ``jobs`` more jobs as done."""
        self._done += jobs
        if self._bar is None:
            if not self._enabled or time.perf_counter() - self._started < PROGRESS_AFTER_S:
                return
            self._start()
        assert self._bar is not None and self._task is not None
        self._bar.update(self._task, completed=self._done)

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        columns: list[Any] = [
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ]
        self._bar = Progress(*columns, console=Console(stderr=True), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self._description, total=self._total)
