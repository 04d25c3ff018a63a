"""The cache's HTTP client: httpx, with reads of the socket wider than httpcore's 64 KiB.

A download's cost on the event loop is per read, not per byte: each read of the socket
goes through the loop, httpcore, h11 and httpx once, and httpcore asks for 64 KiB at a
time (on asyncio, anyio then cuts what the transport delivered, up to 256 KiB, into
64 KiB slices, copying the rest each time). Asking for `WIDE_READ` instead returns
whatever the socket holds, up to that, in one piece: measured on a plain-HTTP origin on
the 2-core dev box, the loop's CPU time per GiB falls from 2.0-2.7 s to 1.5 s (asyncio)
and from 1.8-1.9 s to 1.0-1.2 s (trio); asking for more than 256 KiB gains nothing more
(asyncio's transport reads 256 KiB at a time), and bigger reads hold the loop longer.
Over TLS a read returns one record (16 KiB) whatever is asked, so TLS connections keep
httpcore's reads.

httpx has no parameter for it; httpcore has one (``network_backend``) for its pool.
`new_client` gives httpx's transport a pool built with the same settings and a backend
that widens the reads; where httpx keeps its pool differently (another version), the
transport stays httpx's own and only the speed differs.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from .._types import KiB
from ._config import CacheConfig

__all__ = ["WIDE_READ", "new_client"]

# Bytes asked of the socket per read of a response. h11 and h2 take data of any length.
WIDE_READ = 256 * KiB

_SocketOptions = Iterable[httpcore.SOCKET_OPTION] | None


class _WideStream(httpcore.AsyncNetworkStream):
    """A connection of the inner backend whose reads ask for at least `WIDE_READ` bytes."""

    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max(max_bytes, WIDE_READ), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # Not widened: a TLS read returns one record (16 KiB) whatever is asked, and the
        # ssl module allocates what is asked before it shrinks it to what came.
        return await self._inner.start_tls(ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class WideReads(httpcore.AsyncNetworkBackend):
    """httpcore's network backend ``inner`` (anyio's by default, which serves asyncio
    and trio alike), its connections reading `WIDE_READ` bytes at a time."""

    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: _SocketOptions = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return _WideStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: _SocketOptions = None
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options
        )
        return _WideStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def new_client(
    config: CacheConfig, network_backend: httpcore.AsyncNetworkBackend | None = None
) -> httpx.AsyncClient:
    """The client for ``config``'s downloads (blocks for tens of ms: it loads the TLS
    trust store). ``network_backend`` is what `WideReads` wraps (tests record with it)."""
    limits = httpx.Limits(
        max_connections=config.max_concurrent_fetches,
        max_keepalive_connections=config.max_concurrent_fetches,
    )
    ssl_context = httpx.create_ssl_context()
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits)
    if isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        # What httpx builds for a transport without a proxy, with the backend added.
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=WideReads(network_backend),
        )
    # Proxies named by the environment still get httpx's own transports (mounts).
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(config.http_timeout),
        follow_redirects=True,
    )
