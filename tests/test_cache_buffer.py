"""FragmentBuffer: bytes built in place must come out as ordinary, immutable bytes."""

from __future__ import annotations

import sys

import pytest

from arbiter.cache._buffer import FragmentBuffer


def test_freeze_hands_out_bytes_owned_once_and_shuts_the_writable_view() -> None:
    buffer = FragmentBuffer(1 << 20)
    view = buffer.view()
    buffer.populate(0, 1 << 20)
    view[:5] = b"hello"
    view[-1:] = b"!"
    data = buffer.freeze()
    assert type(data) is bytes
    assert data[:5] == b"hello" and data[-1:] == b"!" and len(data) == 1 << 20
    # One reference here, one for getrefcount's argument: none leaked by the C API calls.
    assert sys.getrefcount(data) == 2
    assert hash(data) == hash(bytes(data))
    with pytest.raises(ValueError):
        view[:1] = b"x"  # the view was released: the bytes cannot change any more
    assert data[:1] == b"h"


def test_a_closed_buffer_refuses_writes_and_close_is_idempotent() -> None:
    buffer = FragmentBuffer(4096)
    view = buffer.view()
    buffer.close()
    buffer.close()
    with pytest.raises(ValueError):
        view[:1] = b"x"
