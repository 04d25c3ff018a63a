"""The ``arbiter`` command line: ``detect``, ``simulate``, ``serve`` and ``status``.

Bad input (a usage error, a missing or malformed trace, a bad size) ends with exit
status 2 and one line on stderr, never a traceback. Ctrl-C ends with exit status 130
and one line; a closed output pipe (``| head``) ends quietly with status 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._args import PLOT_FORMATS, UsageError, build_parser
from ._trace import BUILTIN_MINUTES, Trace, TraceError, builtin_trace, load_trace

if TYPE_CHECKING:
    import argparse

    from rich.console import Console
    from rich.progress import Progress, TaskID

    from ._record import SchedulerResult

__all__ = ["main"]

# Below this much real time a simulation shows no progress bar.
PROGRESS_AFTER_S = 1.0
# On a stderr that is no terminal, a line of progress this often (real seconds).
PROGRESS_LINE_EVERY_S = 10.0
_CLI_MODULES = {"rich", "matplotlib", "trio"}


def main(argv: list[str] | None = None) -> int:
    """Run ``arbiter`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            return _fail("choose a command: detect, simulate, serve or status (see --help)")
        if args.command in ("serve", "status"):
            return _run_daemon_command(args)
        if args.command == "detect":
            from ._detect import run_detect

            return run_detect(_pipe_console(), as_json_output=args.json)
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
        print("arbiter: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """The reader of stdout went away (``| head``): send what is left nowhere, so that
    flushing at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _pipe_console() -> Console:
    """A rich console that lets a closed pipe reach `main` (rich would exit with 1).
    rich is imported here: ``serve`` and ``status`` run without the cli extra."""
    from rich.console import Console

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    return PipeConsole()


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
        if args.minutes is not None:
            raise UsageError("--minutes applies to the built-in trace, not to --trace")
        return load_trace(args.trace)
    minutes = BUILTIN_MINUTES if args.minutes is None else args.minutes
    return builtin_trace(seed=args.seed, minutes=minutes)


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
    results: list[SchedulerResult] = []
    with _LazyProgress(len(trace.rows) * len(schedulers), tty=sys.stderr.isatty()) as bar:
        for scheduler in schedulers:
            bar.describe(scheduler.name)
            results.extend(
                simulate(trace, [scheduler], budget, progress=bar.advance, load_gbps=args.load_gbps)
            )
    if args.plot is not None:
        from ._plot import write_plot

        try:
            write_plot(args.plot, trace, budget, results, format=PLOT_FORMATS[_suffix(args.plot)])
        except OSError as exc:
            raise UsageError(f"cannot write plot {args.plot}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(as_json(args.vram_gb, trace, args.seed, results)))
        sys.stdout.flush()  # a closed pipe raises here, inside main
        return 0
    console = _pipe_console()
    print_report(console, trace, args.vram_gb, results)
    if args.plot is not None:
        console.print(f"Plot written to {args.plot}")
    sys.stdout.flush()
    return 0


def _suffix(path: str) -> str:
    return Path(path).suffix.lower()


class _LazyProgress:
    """Progress on stderr once a run has taken a while: a rich bar on a terminal, a plain
    line every `PROGRESS_LINE_EVERY_S` seconds otherwise (a pipe, a log file)."""

    __slots__ = (
        "_bar",
        "_description",
        "_done",
        "_last_line",
        "_started",
        "_task",
        "_total",
        "_tty",
    )

    def __init__(self, total: int, *, tty: bool) -> None:
        self._total = total
        self._tty = tty
        self._done = 0
        self._description = ""
        self._started = time.perf_counter()  # real time: the bar is for the person waiting
        self._last_line = self._started
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
        if self._done % 64:
            return  # the clock is read every 64 jobs: a job takes microseconds
        now = time.perf_counter()
        if not self._tty:
            if now - self._last_line >= PROGRESS_LINE_EVERY_S:
                self._last_line = now
                print(
                    f"arbiter: {self._description}: {self._done:,} of {self._total:,} jobs",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if self._bar is None:
            if now - self._started < PROGRESS_AFTER_S:
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
