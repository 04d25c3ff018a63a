"""Device stores: where the VRAM tier puts fragments.

`TorchDeviceStore` copies fragments into CUDA tensors; it is used when the optional
extra ``gpu-arbiter[torch]`` is installed and a GPU is present (``torch`` is imported
only then, never at package import). `HostDeviceStore` is the stand-in everywhere
else: it keeps a private host copy per fragment, made and dropped at the same moments
and charged the same bytes as the CUDA copy would be. Every method blocks (it copies
memory) and runs in a worker thread.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

from ._buffer import Buffer

__all__ = ["DeviceStore", "HostDeviceStore", "TorchDeviceStore", "open_device_store"]


class DeviceStore(Protocol):
    """What the VRAM tier needs from a device."""

    name: str

    def place(self, data: Buffer) -> Any:
        """Copy ``data`` to the device; returns the device copy."""
        ...

    def read_back(self, handle: Any) -> Buffer:
        """Copy a device copy back to host memory, as immutable bytes."""
        ...

    def charge(self, size: int) -> int:
        """Bytes the arbiter is charged for a fragment of ``size`` bytes."""
        ...


class HostDeviceStore:
    """The stand-in device: a private, immutable host copy of each fragment."""

    __slots__ = ()

    name = "host"

    def place(self, data: Buffer) -> bytes:
        """A copy of ``data`` (a real upload copies too)."""
        return bytes(data)

    def read_back(self, handle: Any) -> Buffer:
        """The host copy itself (immutable)."""
        assert isinstance(handle, bytes)
        return handle

    def charge(self, size: int) -> int:
        """Exactly ``size`` bytes, like a ``uint8`` CUDA tensor of that many elements."""
        return size


class TorchDeviceStore:
    """CUDA tensors of ``uint8`` on ``device``.

    Args:
        torch: the imported ``torch`` module.
        device: the ``torch.device`` to place fragments on.
    """

    __slots__ = ("_device", "_torch")

    name = "torch"

    def __init__(self, torch: Any, device: Any) -> None:
        self._torch = torch
        self._device = device

    def place(self, data: Buffer) -> Any:
        """A ``uint8`` tensor on the device holding ``data``."""
        torch = self._torch
        if len(data) == 0:
            return torch.empty(0, dtype=torch.uint8, device=self._device)
        with warnings.catch_warnings():
            # frombuffer warns about read-only buffers; the host tensor is only read.
            warnings.simplefilter("ignore", UserWarning)
            host = torch.frombuffer(data, dtype=torch.uint8)
        return host.to(self._device, copy=True)

    def read_back(self, handle: Any) -> Buffer:
        """The tensor's bytes, copied to host memory."""
        return bytes(handle.cpu().numpy().tobytes())

    def charge(self, size: int) -> int:
        """``size`` bytes: a ``uint8`` tensor's storage."""
        return size


def open_device_store(device: int | str) -> DeviceStore:
    """`TorchDeviceStore` when torch and a CUDA GPU are there, else `HostDeviceStore`.

    Imports ``torch`` (slow: call it from a worker thread). ``device`` is the arbiter's
    device: an index, or a uuid (then the current CUDA device is used).
    """
    try:
        import torch
    except ImportError:
        return HostDeviceStore()
    try:
        if not torch.cuda.is_available():
            return HostDeviceStore()
        index = device if isinstance(device, int) else torch.cuda.current_device()
        return TorchDeviceStore(torch, torch.device("cuda", index))
    except Exception:
        # A broken CUDA setup must not break the cache: it falls back to the stand-in.
        return HostDeviceStore()
