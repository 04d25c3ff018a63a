"""The errors gpu-arbiter raises.

Every error below derives from ``ArbiterError``; invalid arguments are not
ours and raise ``TypeError`` or ``ValueError`` at the call instead.

* ArbiterError
  * InsufficientMemory - the smallest acceptable size exceeds the whole budget
  * InsufficientQuality - only a lower quality than ``min_quality`` was to be had
  * AllocationTimeout (also a ``TimeoutError``) - the request waited its whole timeout
  * Preempted - a higher priority took this allocation's memory
  * ShuttingDown - the arbiter is closing or closed
  * ArbiterUnavailable - no arbiter daemon answers, or it did not come back within the ttl
  * SessionLost - the daemon ended this client's session; its allocations are gone
  * GpuProbeError - the GPU could not be read (NVML failed, the device is gone)
  * FragmentError
    * IntegrityError - a fragment's bytes do not match its manifest entry
    * FragmentUnavailable - no tier or origin could deliver a fragment
"""

from __future__ import annotations

import math

from ._types import format_bytes

__all__ = [
    "AllocationTimeout",
    "ArbiterError",
    "ArbiterUnavailable",
    "FragmentError",
    "FragmentUnavailable",
    "GpuProbeError",
    "InsufficientMemory",
    "InsufficientQuality",
    "IntegrityError",
    "Preempted",
    "SessionLost",
    "ShuttingDown",
]


class ArbiterError(Exception):
    """The root of every error the library raises."""


class InsufficientMemory(ArbiterError):
    """A request can never fit: its smallest acceptable size exceeds the VRAM budget."""

    def __init__(self, requested: int, available: int) -> None:
        self.requested = requested
        self.available = available
        super().__init__(f"requested {format_bytes(requested)}, budget {format_bytes(available)}")

    def __reduce__(self) -> tuple[type[InsufficientMemory], tuple[int, int]]:
        return (type(self), (self.requested, self.available))


class InsufficientQuality(ArbiterError):
    """The timeout passed while only a quality below ``min_quality`` could be granted."""

    def __init__(self, minimum: float, available: float) -> None:
        self.minimum = minimum
        self.available = available
        # Rounded down (0.677 must not read as the 0.68 it fell short of), but not by
        # float error (0.6819999999999999 is 0.682).
        shown = math.floor(available * 1000 + 1e-6) / 1000
        super().__init__(f"min_quality {minimum:g} not met, best available {shown:.3f}")

    def __reduce__(self) -> tuple[type[InsufficientQuality], tuple[float, float]]:
        return (type(self), (self.minimum, self.available))


class AllocationTimeout(ArbiterError, TimeoutError):
    """The request waited its whole timeout without being granted."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"not granted within {timeout:g} s")

    def __reduce__(self) -> tuple[type[AllocationTimeout], tuple[float]]:
        return (type(self), (self.timeout,))


class Preempted(ArbiterError):
    """A higher-priority request took this allocation's memory."""


class ShuttingDown(ArbiterError):
    """The arbiter is closing or closed."""


class ArbiterUnavailable(ArbiterError):
    """No arbiter daemon answers on the socket, or it went away and did not come back
    within the ttl (a `RemoteArbiter`'s allocations are then gone)."""


class SessionLost(ArbiterError):
    """The daemon ended this client's session (it was silent past the ttl, as a stopped
    process is); its allocations and waiting requests are gone."""


class GpuProbeError(ArbiterError):
    """A GPU could not be read (NVML failed, the device is gone). The cause is chained."""


class FragmentError(ArbiterError):
    """A fragment could not be served."""


class IntegrityError(FragmentError):
    """A fragment's bytes do not match its manifest entry, from every tier tried."""


class FragmentUnavailable(FragmentError):
    """No tier or origin could deliver a fragment, after retries."""
