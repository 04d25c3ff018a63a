"""Sessions: tests (asyncio and trio), lint, typecheck, bench."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]


@nox.session(python=["3.11", "3.12", "3.13"])
def tests(session: nox.Session) -> None:
    """Every async test runs on asyncio and on trio (the anyio_backend fixture), on each
    Python the package supports: their frames and tracebacks keep different things alive."""
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, with the ASYNC, B, UP and PERF rule sets."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and the benchmarks."""
    session.install("-e", ".[cli,test]", "mypy")
    session.run("mypy", "--strict", "arbiter", "benchmarks")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Every benchmark, each comparing against a baseline measured in the same run."""
    session.install("-e", ".[cli,test]")
    for script in (
        "bench_allocation.py",
        "bench_preemption.py",
        "bench_poller.py",
        "bench_cache.py",
        "bench_simulate.py",
        "bench_remote.py",
    ):
        session.run("python", f"benchmarks/{script}", *session.posargs)
