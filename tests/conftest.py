# ruff: noqa: E402 (bytecode caching is switched on before the imports below)
from __future__ import annotations

import sys

# pytest rewrites the asserts of every test module in every xdist worker (about 2 s of CPU
# each), and every worker and subprocess compiles the package; with PYTHONDONTWRITEBYTECODE
# set none of that work could be reused. The bytecode goes to __pycache__ folders (ignored
# by git), as it does without the variable.
sys.dont_write_bytecode = False

import gc
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import ssl

# What the tests need (hypothesis, httpx, structlog, arbiter) is imported where it is used,
# not here: xdist's controller loads this file too, runs no test, and starts its workers
# only once it is configured (those imports cost it about 0.2 s of CPU).


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own, which loads --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    """The markers; in a process that runs tests, the collector off until collection is
    over (see pytest_collection_finish).

    Property tests and state machines draw max_examples from the loaded profile. The
    default run stays bounded (one `python -m pytest -q` is the edit-test loop);
    hypothesis keeps every failing example in .hypothesis/ and replays it first, and a
    fresh seed each run covers new ground. `--hypothesis-profile=thorough` runs ten
    times as many."""
    _add_markers(config)
    controller = (  # xdist's: it only hands tests out (none without the xdist plugin)
        getattr(config.option, "dist", "no") != "no"
        and not config.option.collectonly
        and not hasattr(config, "workerinput")
    )
    if not controller:
        gc.disable()  # until collection is over: see pytest_collection_finish
    if controller and not config.getoption("hypothesis_profile", None):
        return
    from hypothesis import settings

    settings.register_profile("quick", max_examples=50, deadline=None)
    settings.register_profile("thorough", max_examples=500, deadline=None)
    settings.load_profile("quick")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the suite also runs without xdist
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Three workers per CPU for ``-n auto``: much of the suite waits on real processes and
    clocks, and the others run while some wait (with two per CPU, both of a core's
    workers were often waiting at once: the cores were idle a fifth of the run). At most
    16: each worker costs about a second of CPU to start (and grows to some 180 MiB), and
    the longest tests take a few seconds, so more would only start slower."""
    return min(3 * (os.cpu_count() or 1), 16)


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect: the chunks are of what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, tests marked ``real_processes`` start first on every worker: their waits
    on daemons and clients then overlap the CPU-bound tests, instead of a long one ending
    the run alone. Tests marked ``cpu_heavy`` come right after them, for the same reason.
    xdist's worksteal first hands each of its N workers one contiguous Nth of the items;
    the marked ones are dealt out to the heads of those chunks, each worker's
    ``real_processes`` ones first, in file order. Marked tests that share a module-scoped
    fixture (a daemon) are dealt as one hand, so that daemon starts on one worker, not on
    all of them, and so are the ``cpu_heavy`` tests of one file (which tend to share what
    they import: matplotlib costs each worker that imports it 0.4 s); each hand goes to
    the worker with the fewest tests of its mark so far. Other schedulers run the same
    tests in another order."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    workers = int(workerinput["workercount"])
    if workers < 2:
        return
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    dealt: set[pytest.Item] = set()
    for mark in ("real_processes", "cpu_heavy"):
        hands: dict[object, list[pytest.Item]] = {}
        for item in items:
            if item not in dealt and item.get_closest_marker(mark):
                shared = _module_scoped_fixtures(item)
                key = (item.path, shared) if shared or mark == "cpu_heavy" else item.nodeid
                hands.setdefault(key, []).append(item)
        counts = [0] * workers
        for hand in hands.values():
            worker = counts.index(min(counts))
            counts[worker] += len(hand)
            heads[worker] += hand
            dealt.update(hand)
    if not dealt:
        return
    rest = [item for item in items if item not in dealt]
    ordered: list[pytest.Item] = []
    remaining = len(items)
    for worker in range(workers):
        size = remaining // (workers - worker)  # the chunk xdist's worksteal sends first
        remaining -= size
        head = heads[worker]
        ordered += head + rest[: max(0, size - len(head))]
        del rest[: max(0, size - len(head))]
    ordered += rest
    assert len(ordered) == len(items)
    items[:] = ordered


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection built (every module, function and item of 2,000 tests) lives to
    the end of the run. The cyclic collector is off while it is built (its passes over
    the growing heap cost each worker about 0.1 s of its start), runs once, and the
    result is frozen: left out of the collector's full passes, which otherwise walk it
    again each time (the tests that call `gc.collect` most of all). Objects the tests
    make are collected as before."""
    gc.enable()
    gc.collect()
    gc.freeze()


def _module_scoped_fixtures(item: pytest.Item) -> tuple[str, ...]:
    """The names of the module-scoped fixtures ``item`` uses (none where pytest's
    fixture bookkeeping, `_fixtureinfo`, is not there to ask)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return ()
    return tuple(
        sorted(
            name
            for name, definitions in info.name2fixturedefs.items()
            if definitions and definitions[-1].scope == "module"
        )
    )


def _add_markers(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_processes: the test mostly waits on real daemon and client processes (under "
        "xdist it starts first on a worker, see pytest_collection_modifyitems)",
    )
    config.addinivalue_line(
        "markers",
        "cpu_heavy: the test takes a third of a second of CPU or more (under xdist it "
        "starts early on a worker, after the real_processes ones)",
    )
    config.addinivalue_line(
        "markers",
        "virtual_time: the trio variant runs on MockClock(autojump_threshold=0), so waits on "
        "the clock (grace, keep_alive, timeouts, poll intervals) take no real time; the "
        "asyncio variant stays on the real clock as a check of the real timers",
    )
    config.addinivalue_line(
        "markers",
        "real_gpu_probe: the arbiter may open the default NVML probe (tests of that path "
        "install a fake pynvml)",
    )


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str | tuple[str, dict[str, Any]]:
    """Every async test runs on both backends."""
    name = str(request.param)
    if name == "trio" and request.node.get_closest_marker("virtual_time") is not None:
        from trio.testing import MockClock

        # Threshold 0: the clock jumps to the next deadline as soon as every task is
        # blocked; `wait_all_tasks_blocked` waiters still wake first (trio's rule).
        return name, {"clock": MockClock(autojump_threshold=0)}
    return name


async def _no_probe(device: int | str = 0) -> None:
    return None


@pytest.fixture(autouse=True)
def _each_test_as_a_fresh_program(request: pytest.FixtureRequest) -> Iterator[None]:
    """What every test finds, and leaves behind for the next (one fixture, not one per
    concern: each function-scoped fixture adds pytest's bookkeeping to every one of
    2,000 tests, about 0.1 ms each here).

    - `Arbiter(config)` without ``probe=`` opens the default NVML probe inside
      ``async with``: on a machine with a GPU a test would read the real card. Unless
      a test asks for it (``real_gpu_probe``), the default probe is "no GPU" (the shell
      imports the function from `arbiter._gpu` when it starts the poller, so patching
      the package suffices).
    - Tests that capture logs configure structlog; later tests must find it as a
      program that never configured it does (warnings only, on stderr). A worker that
      has not imported structlog yet has nothing to reset."""
    patched: list[tuple[object, str, object]] = []
    if request.node.get_closest_marker("real_gpu_probe") is None:
        import arbiter._gpu

        patched.append((arbiter._gpu, "open_default_probe", arbiter._gpu.open_default_probe))
        arbiter._gpu.open_default_probe = _no_probe
    try:
        yield
    finally:
        for target, name, value in patched:
            setattr(target, name, value)
        structlog = sys.modules.get("structlog")
        if structlog is not None:
            structlog.reset_defaults()


@pytest.fixture(scope="session", autouse=True)
def _one_tls_trust_store() -> Iterator[None]:
    """Every `FragmentCache` with a ``cdn_url`` builds an httpx client, and building one
    loads the TLS trust store into a new `ssl.SSLContext`: about 20 ms of CPU, some 4 s
    over the suite, for tests that speak plain HTTP to 127.0.0.1. Here the clients of a
    worker share the first default context (an `ssl.SSLContext` serves any number of
    connections); the client is otherwise built as in production."""
    import httpx

    real = httpx.create_ssl_context
    shared: list[ssl.SSLContext] = []

    def create_ssl_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        if args or kwargs:
            return real(*args, **kwargs)
        if not shared:
            shared.append(real())
        return shared[0]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(httpx, "create_ssl_context", create_ssl_context)
        yield
