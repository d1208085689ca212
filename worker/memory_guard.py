"""The out-of-memory guard: estimate what a request needs before it runs.

No MLX here: the proxy refuses hopeless requests with the same estimate before
queueing them (`proxy.guards`); the worker applies it again with its restore plan.

On a Mac an MLX process that runs out of unified memory is killed outright, so a
request that cannot fit is refused with a typed error instead, after the pool
has given back what it can.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import CacheLayout, MemoryStats


class InsufficientMemory(MemoryError):
    """The request cannot fit in the memory budget even with the pool emptied."""

    def __init__(self, needed: int, available: int, limit: int):
        self.needed, self.available, self.limit = needed, available, limit
        super().__init__(
            f"this request needs about {mib(needed)} MiB but only {mib(available)} MiB of the "
            f"{mib(limit)} MiB memory budget is free; send a shorter prompt or fewer max_tokens"
        )


@dataclass(frozen=True)
class MemoryNeed:
    kv_bytes: int  # full-attention KV the request adds (and a forked prefix copy)
    snapshot_bytes: int  # checkpoints it will take
    activation_bytes: int  # the peak of one prefill chunk

    @property
    def total(self) -> int:
        return self.kv_bytes + self.snapshot_bytes + self.activation_bytes


def estimate_need(
    layout: CacheLayout,
    tokens_to_compute: int,
    max_tokens: int,
    copied_prefix_tokens: int,
    checkpoints: int,
    activation_bytes: int,
) -> MemoryNeed:
    kv = (tokens_to_compute + max_tokens + copied_prefix_tokens) * layout.kv_bytes_per_token
    return MemoryNeed(kv, (checkpoints + 1) * layout.snapshot_bytes, activation_bytes)


def default_memory_limit(stats: MemoryStats) -> int:
    """The device's recommended working set (Apple GPU), else 90% of physical memory."""
    if stats.recommended_working_set > 0:
        return stats.recommended_working_set
    return int(stats.device_total * 0.9)


# The pool's default share of what the model leaves under the memory limit; the rest is for the
# running requests' KV and activations (the guard evicts the pool first when they need more).
CACHE_SHARE = 0.75
MIN_CACHE_BYTES = 256 << 20


def default_cache_bytes(memory_limit: int, resident_bytes: int) -> int:
    """The checkpoint pool's budget when none is given: CACHE_SHARE of the memory left after the model.

    On a 128 GB Mac (a ~96 GiB working set) serving Qwen3-Next-80B-A3B at 4 bits (~42 GiB)
    that is ~40 GiB: a dozen 60K-token conversations or ~25 8K-token ones with their
    checkpoints (README, "Real-model arithmetic").
    """
    return max(MIN_CACHE_BYTES, int(CACHE_SHARE * (memory_limit - resident_bytes)))


def mib(n: int) -> str:
    return f"{max(0, n) / 2**20:.1f}"
