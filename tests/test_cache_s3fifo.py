"""The byte-accounted S3-FIFO policy: invariants under random traffic, pins, scan resistance."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arbiter.cache._s3fifo import S3FifoPolicy

operations = st.lists(
    st.tuples(
        st.sampled_from(["get", "get", "get", "pin", "unpin", "remove", "resize"]),
        st.integers(0, 30),  # key
        st.integers(1, 400),  # size (fixed per key below) or new capacity
    ),
    max_size=300,
)


@settings(deadline=None)  # max_examples from the profile (tests/conftest.py)
@given(operations, st.integers(0, 1500))
def test_invariants_hold_under_any_traffic(ops: list[tuple[str, int, int]], capacity: int) -> None:
    policy = S3FifoPolicy(capacity, small_share=0.1, ghost_share=0.9, max_frequency=3)
    sizes: dict[str, int] = {}
    held: dict[str, int] = {}
    pins: dict[str, int] = {}
    for op, key_number, value in ops:
        key = f"k{key_number}"
        size = sizes.setdefault(key, value)
        if op == "get":
            pinned_before = {k for k, n in pins.items() if n}
            evicted = policy.admit(key, size)
            if evicted is None:
                assert key not in policy
                assert size > policy.capacity - policy.pinned_bytes
            else:
                assert not (set(evicted) & pinned_before), "a pinned key was evicted"
                for victim in evicted:
                    del held[victim]
                    pins.pop(victim, None)
                held[key] = size
        elif op == "pin" and key in held:
            policy.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif op == "unpin":
            policy.unpin(key)
            if pins.get(key):
                pins[key] -= 1
        elif op == "remove":
            assert policy.remove(key) == (key in held)
            held.pop(key, None)
            pins.pop(key, None)
        elif op == "resize":
            for victim in policy.resize(value * 3):
                assert not pins.get(victim)
                del held[victim]
        assert sorted(policy.keys()) == sorted(held)
        assert policy.bytes_held == sum(held.values())
        pinned = sum(held[k] for k, n in pins.items() if n and k in held)
        assert policy.pinned_bytes == pinned
        # Never over capacity, except by pinned bytes after a shrink.
        assert policy.bytes_held <= max(policy.capacity, pinned)


def test_a_key_larger_than_the_capacity_bypasses_without_evicting() -> None:
    policy = S3FifoPolicy(100)
    assert policy.admit("a", 60) == []
    assert policy.admit("huge", 101) is None
    assert "a" in policy and "huge" not in policy and policy.bytes_held == 60


def test_pins_shrink_what_can_be_admitted() -> None:
    policy = S3FifoPolicy(100)
    policy.admit("a", 70)
    policy.pin("a")
    assert policy.admit("b", 40) is None  # 40 > 100 - 70 pinned
    assert policy.admit("c", 30) == []
    policy.unpin("a")
    assert policy.admit("b", 40) is not None
    with pytest.raises(KeyError):
        policy.pin("nobody")


def test_re_used_small_entries_move_to_main_and_survive_a_scan() -> None:
    policy = S3FifoPolicy(1000, small_share=0.1)
    for key in ("hot1", "hot2", "hot3"):
        policy.admit(key, 100)
        policy.touch(key)
    for i in range(50):  # a one-time scan, ten times the cache
        policy.admit(f"scan{i}", 100)
    assert {"hot1", "hot2", "hot3"} <= set(policy.keys())


def test_ghost_hits_go_straight_to_main() -> None:
    policy = S3FifoPolicy(1000, small_share=0.1)
    for i in range(10):
        policy.admit(f"a{i}", 100)
    assert policy.admit("b", 100) == ["a0"]  # the oldest unused entry leaves for the ghost
    assert policy.admit("a0", 100) == ["a1"]  # a0 is back soon: it enters main
    for i in range(20):
        policy.admit(f"scan{i}", 100)
    assert "a0" in policy
    assert "a1" not in policy


def scan_resistance_misses(policy_factory: str) -> int:
    """Missed bytes of a hot set re-read between one-time scans, S3-FIFO vs LRU."""
    capacity = 1000
    lru: OrderedDict[str, int] = OrderedDict()
    policy = S3FifoPolicy(capacity)
    missed = 0
    trace = []
    for round_ in range(30):
        trace += [f"hot{i}" for i in range(6)]
        trace += [f"scan{round_}-{i}" for i in range(8)]
    for key in trace:
        if policy_factory == "s3fifo":
            if not policy.touch(key):
                missed += 100
                policy.admit(key, 100)
        else:
            if key in lru:
                lru.move_to_end(key)
            else:
                missed += 100
                lru[key] = 100
                while sum(lru.values()) > capacity:
                    lru.popitem(last=False)
    return missed


def test_s3fifo_misses_less_than_lru_when_scans_interleave_a_hot_set() -> None:
    assert scan_resistance_misses("s3fifo") < 0.7 * scan_resistance_misses("lru")
