"""``arbiter serve --metrics``: Prometheus text through prometheus-client (imported here only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .._types import Priority

if TYPE_CHECKING:
    from ._sessions import SessionHost

__all__ = ["Metrics"]


class _StateCollector(Collector):
    """Reads the daemon's last snapshot at every scrape (from the server's thread)."""

    def __init__(self) -> None:
        self.host: SessionHost | None = None

    def collect(self) -> Iterator[Any]:
        host = self.host
        if host is None:
            return
        state = host.last_state
        stats = host.last_stats
        budget = host.arbiter.config.vram_budget
        for name, doc, value in (
            ("gpu_arbiter_vram_budget_bytes", "The VRAM budget", budget),
            ("gpu_arbiter_granted_bytes", "Memory granted to holders", state.vram_used),
            ("gpu_arbiter_external_bytes", "Memory used by non-clients", state.external_used),
            ("gpu_arbiter_waiting_requests", "Requests waiting", state.waiting),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        outcomes = CounterMetricFamily(
            "gpu_arbiter_allocations", "Allocation requests by outcome", labels=["outcome"]
        )
        outcomes.add_metric(["granted"], stats.successful_allocations)
        outcomes.add_metric(["failed"], stats.failed_allocations)
        outcomes.add_metric(["cancelled"], stats.cancelled)
        yield outcomes
        yield CounterMetricFamily(
            "gpu_arbiter_preemptions", "Holders preempted", value=stats.preemptions
        )
        quality = GaugeMetricFamily(
            "gpu_arbiter_quality_target", "Quality target of a NORMAL request", labels=["family"]
        )
        quality.add_metric(["llm"], state.llm_quality)
        quality.add_metric(["diffusion"], state.diffusion_quality)
        yield quality


class Metrics:
    """Serves ``/metrics`` on ``host:port`` in a thread (prometheus-client's own server).

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self._collector = _StateCollector()
        self.registry.register(self._collector)
        self.wait_seconds = Histogram(
            "gpu_arbiter_wait_seconds",
            "Seconds a granted request waited",
            ["priority"],
            registry=self.registry,
        )
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)

    def attach(self, host: SessionHost) -> None:
        """Read ``host``'s figures and count its grants' waits."""
        self._collector.host = host
        host.on_grant = self._observe

    def _observe(self, priority: Priority, waited: float) -> None:
        self.wait_seconds.labels(priority.name.lower()).observe(waited)
