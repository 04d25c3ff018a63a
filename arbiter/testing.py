"""Public helpers for testing code that uses gpu-arbiter, without a GPU.

`FakeGpu` is a scriptable GPU memory probe: give it to an ``Arbiter`` instead of the NVML
probe, then move its figures by hand to play other processes taking and freeing memory,
or make its reads fail to play a driver outage::

    from arbiter import Arbiter, ArbiterConfig, GiB
    from arbiter.testing import FakeGpu

    fake = FakeGpu(total=24 * GiB)
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(20), probe=fake)
    async with arbiter:                  # the poller now reads `fake`
        fake.external_used = 6 * GiB     # another process took 6 GiB
        ...                              # within two poll intervals, state().external_used == 6 GiB
        fake.fail_next(3)                # the next three reads raise; the poller backs off

Per-process figures: ``fake.set_process_memory(pid, n)`` plays process ``pid`` using
``n`` bytes; it counts as external unless ``pid`` is in ``fake.own_pids`` (as a daemon
sets its clients' pids on its probe).
"""

from __future__ import annotations

import anyio
import anyio.lowlevel

from ._checks import check_bytes, check_count, check_pids
from ._gpu import GpuProbeError, GpuReading

__all__ = ["FakeGpu"]


class FakeGpu:
    """A GPU that exists only in memory; implements the ``MemoryProbe`` protocol.

    Every ``await fake.read()`` is a checkpoint and returns a `GpuReading` of the figures
    as they are at that moment: ``total``, ``used = ours + external_used``, and, when
    ``per_process`` is true, ``ours`` and ``external`` (else both ``None``, as on a driver
    without per-process accounting, where the arbiter takes ``used`` minus what it granted).
    The figures can be changed at any time, from any task.

    Args:
        total: the device's memory in bytes, > 0.
        external_used: bytes other processes use, >= 0.
        ours: bytes this process uses (as the driver would see it), >= 0.
        per_process: whether readings report ``ours`` and ``external``.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``total`` <= 0, a negative figure, or ``ours + external_used > total``.
    """

    __slots__ = (
        "_closed",
        "_error",
        "_external_used",
        "_failures_left",
        "_ours",
        "_own_pids",
        "_per_process",
        "_processes",
        "_reads",
        "_total",
    )

    def __init__(
        self,
        total: int,
        *,
        external_used: int = 0,
        ours: int = 0,
        per_process: bool = True,
    ) -> None:
        self._total = check_bytes("total", total)
        if total == 0:
            raise ValueError("total must be > 0 bytes, got 0")
        self._external_used = 0
        self._ours = 0
        self._processes: dict[int, int] = {}
        self._own_pids: frozenset[int] = frozenset()
        self._per_process = True
        self.external_used = external_used
        self.ours = ours
        self.per_process = per_process
        self._reads = 0
        self._failures_left = 0
        self._error: Exception | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"FakeGpu(total={self._total}, external_used={self._external_used}, "
            f"ours={self._ours}, reads={self._reads})"
        )

    @property
    def total(self) -> int:
        """The device's memory in bytes (fixed at construction)."""
        return self._total

    @property
    def external_used(self) -> int:
        """Bytes other processes use. Settable.

        Raises:
            TypeError, ValueError: not an int >= 0, or ``ours + external_used > total``.
        """
        return self._external_used

    @external_used.setter
    def external_used(self, value: int) -> None:
        check_bytes("external_used", value)
        if value + self._ours > self._total:
            raise ValueError(
                f"external_used {value} + ours {self._ours} exceeds total {self._total}"
            )
        self._external_used = value

    @property
    def ours(self) -> int:
        """Bytes this process uses on the device. Settable.

        Raises:
            TypeError, ValueError: not an int >= 0, or ``ours + external_used > total``.
        """
        return self._ours

    @ours.setter
    def ours(self, value: int) -> None:
        check_bytes("ours", value)
        if value + self._external_used > self._total:
            raise ValueError(
                f"ours {value} + external_used {self._external_used} exceeds total {self._total}"
            )
        self._ours = value

    @property
    def own_pids(self) -> frozenset[int]:
        """Pids whose memory (`set_process_memory`) counts as ours, not external. Settable.

        Raises:
            TypeError: not a set of ints.
        """
        return self._own_pids

    @own_pids.setter
    def own_pids(self, pids: frozenset[int]) -> None:
        self._own_pids = check_pids("own_pids", pids)

    def set_process_memory(self, pid: int, used: int) -> None:
        """Play process ``pid`` using ``used`` bytes of the device (0 removes it).

        Raises:
            TypeError, ValueError: ``pid`` not an int > 0, ``used`` not an int >= 0, or the
                figures would exceed ``total``.
        """
        check_count("pid", pid, minimum=1)
        check_bytes("used", used)
        others = sum(n for p, n in self._processes.items() if p != pid)
        if self._ours + self._external_used + others + used > self._total:
            raise ValueError(f"process {pid} using {used} would exceed total {self._total}")
        if used:
            self._processes[pid] = used
        else:
            self._processes.pop(pid, None)

    @property
    def per_process(self) -> bool:
        """Whether readings report ``ours`` and ``external`` (else ``None``). Settable."""
        return self._per_process

    @per_process.setter
    def per_process(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"per_process must be a bool, got {value!r}")
        self._per_process = value

    @property
    def reads(self) -> int:
        """How many reads were attempted, the failed ones included."""
        return self._reads

    @property
    def closed(self) -> bool:
        """Whether `aclose` was called."""
        return self._closed

    def fail_next(self, n: int = 1, error: Exception | None = None) -> None:
        """Make the next ``n`` reads raise ``error`` (by default a fresh ``GpuProbeError``
        each time). Replaces any failures still pending; ``n=0`` cancels them.

        Raises:
            TypeError: ``n`` is not an int, or ``error`` is not an ``Exception`` or ``None``.
            ValueError: ``n`` < 0.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {n!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        if error is not None and not isinstance(error, Exception):
            raise TypeError(f"error must be an Exception instance or None, got {error!r}")
        self._failures_left = n
        self._error = error

    def reading(self) -> GpuReading:
        """What a read would return now, without counting it or failing."""
        own = sum(n for pid, n in self._processes.items() if pid in self._own_pids)
        others = sum(self._processes.values()) - own
        ours = self._ours + own
        external = self._external_used + others
        return GpuReading(
            total=self._total,
            used=ours + external,
            ours=ours if self._per_process else None,
            external=external if self._per_process else None,
        )

    async def read(self) -> GpuReading:
        """The figures now, after a checkpoint.

        Raises:
            GpuProbeError (or the error given to `fail_next`): a failure was scripted.
            anyio.ClosedResourceError: the fake was closed.
        """
        await anyio.lowlevel.checkpoint()
        if self._closed:
            raise anyio.ClosedResourceError
        self._reads += 1
        if self._failures_left:
            self._failures_left -= 1
            raise self._error or GpuProbeError("FakeGpu: scripted read failure")
        return self.reading()

    async def aclose(self) -> None:
        """Mark the fake closed; later reads raise ``anyio.ClosedResourceError``. Idempotent."""
        self._closed = True
        await anyio.lowlevel.checkpoint()
