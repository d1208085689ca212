"""A sharded worker: one model across the ranks of `mlx.launch`, tensor-parallel.

Every rank loads the model with mlx-lm's own `Model.shard(group)`, so each rank's
caches (KV heads, recurrent state) and each checkpoint's snapshot hold that rank's
part. Every rank runs the same model loop in lockstep; only rank 0 binds the ZeroMQ
socket. At each turn of the loop rank 0 broadcasts the turn's inputs (the commands
it read, the requests aborted so far) and every rank contributes its stop flag; all
ranks then apply the same inputs in the same order. The pool, the step loop and the
decode batch are deterministic functions of those inputs, so each rank's pool takes
the same decisions (restore points, checkpoints, evictions) over its own arrays.

What could differ between ranks is agreed over the group instead of read locally:
the memory figures the guard decides on (`Ranks.max` / `Ranks.min`) and the random
seed. The shards must be the same size on every rank (heads divisible by the ranks),
or the pools' byte counts would part ways; start-up refuses otherwise. The disk tier
is off: a file would hold one rank's part.

If a rank dies the others cannot go on (a collective never completes); `mlx.launch`
stops the remaining ranks when one exits with an error, and the proxy then sees the
worker gone.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import msgpack
import numpy as np

import mlx.core as mx
from mlx_lm.generate import generation_stream

from protocol import codec
from protocol.messages import Evict, Generate, Message, Shutdown

log = logging.getLogger("mlx_cache_proxy.worker")

# Environment variables the launchers set on every rank (mlx.launch: ring, jaccl, nccl; mpirun: mpi).
_LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def distributed_group() -> Optional[Any]:
    """The mx.distributed group when started by a launcher with more than one rank, else None."""
    if not any(name in os.environ for name in _LAUNCH_ENV):
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


class RankLost(RuntimeError):
    """A collective failed: another rank is gone, and the sharded worker cannot go on without it."""


def _collective(array: mx.array, op) -> mx.array:
    # On the model's own stream: the ring matches collectives by their order, and a decode step may
    # still be running asynchronously (mlx-lm's batch evaluates the next step ahead); on another
    # stream a control exchange could overtake that step's all_sums on one rank and not the other.
    out = op(array, stream=generation_stream)
    try:
        mx.eval(out)
    except RuntimeError as exc:
        raise RankLost(f"another rank of this sharded worker is gone ({exc})") from exc
    return out


class Ranks:
    """Values every rank must agree on, computed over the group."""

    def __init__(self, group: Any):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()

    def gather(self, value: int) -> list[int]:
        """Every rank's `value` (a non-negative int below 2**62), in rank order."""
        parts = mx.array([value >> 31, value & 0x7FFFFFFF], dtype=mx.int32)
        flat = np.array(_collective(parts, lambda a, stream: mx.distributed.all_gather(a, group=self.group, stream=stream)))
        return [int(hi) << 31 | int(lo) for hi, lo in flat.reshape(-1, 2)]

    def max(self, value: int) -> int:
        return max(self.gather(max(0, value)))

    def min(self, value: int) -> int:
        return min(self.gather(max(0, value)))

    def require_equal(self, what: str, value: int) -> None:
        values = self.gather(value)
        if len(set(values)) > 1:
            raise ValueError(f"the ranks' shards differ in {what} ({values}): the model's heads must divide by {self.size}")

    def broadcast(self, data: bytes, stop: bool) -> tuple[bytes, bool]:
        """Rank 0's `data` on every rank, and whether any rank asked to stop."""
        head = mx.array([len(data) if self.rank == 0 else 0, int(stop)], dtype=mx.int32)
        size, stops = (int(v) for v in np.array(_collective(head, self._sum)))
        if size == 0:
            return b"", stops > 0
        body = np.frombuffer(data, dtype=np.uint8) if self.rank == 0 else np.zeros(size, dtype=np.uint8)
        # Every other rank adds zeros: the sum is rank 0's bytes.
        return bytes(np.array(_collective(mx.array(body), self._sum))), stops > 0

    def _sum(self, array: mx.array, stream) -> mx.array:
        return mx.distributed.all_sum(array, group=self.group, stream=stream)

    def farewell(self) -> None:
        """The last collective, after every rank has left the loop at the same turn.

        The ring can lose a collective's tail when a peer exits right after it; losing
        this one costs nothing, so the turn that ended the loop is never the last.
        """
        try:
            _collective(mx.array([1], dtype=mx.int32), self._sum)
        except RuntimeError as exc:
            log.debug("rank %d: the last collective failed (a peer already exited): %s", self.rank, exc)

    def seed_random(self) -> None:
        """The same random stream on every rank, so temperature sampling picks the same tokens."""
        seed = self.max(time.time_ns() & 0x3FFFFFFF if self.rank == 0 else 0)
        mx.random.seed(seed)


@dataclass
class Turn:
    """One turn's inputs, as rank 0 saw them."""

    commands: list[Message] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        if not self.commands and not self.aborted:
            return b""  # an idle turn sends one small collective
        return msgpack.packb({"c": [codec.encode(m) for m in self.commands], "a": self.aborted}, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "Turn":
        if not data:
            return cls()
        frame = msgpack.unpackb(data, raw=False)
        return cls([codec.decode(m) for m in frame["c"]], list(frame["a"]))


class Lockstep:
    """The turn exchange: rank 0 reads the inbox and broadcasts; the other ranks receive."""

    def __init__(self, ranks: Ranks, inbox: Optional[queue.Queue], book: Any = None):
        self.ranks = ranks
        self.inbox = inbox
        self.book = book
        self.abort_events: dict[str, Any] = {}  # rank 0: running request -> its abort event
        self.aborted: frozenset[str] = frozenset()
        self.stopping = False

    @property
    def leader(self) -> bool:
        return self.ranks.rank == 0

    def exchange(self, block: bool, stop_requested: bool, poll_s: float) -> list[Message]:
        """This turn's commands, the same on every rank; updates `aborted` and `stopping`."""
        turn = self._read(block, poll_s) if self.leader else Turn()
        data, stop = self.ranks.broadcast(turn.encode(), stop_requested)
        if not self.leader:
            turn = Turn.decode(data)
        self.aborted = frozenset(turn.aborted)
        self.stopping = self.stopping or stop
        return turn.commands

    def finished(self, request_id: str) -> None:
        self.abort_events.pop(request_id, None)

    def _read(self, block: bool, poll_s: float) -> Turn:
        commands: list[Message] = []
        while True:
            try:
                command = self.inbox.get(timeout=poll_s) if block else self.inbox.get_nowait()
            except queue.Empty:
                break
            block = False
            if isinstance(command, Generate):
                event = self.book.start(command.request_id)
                if event is None:
                    continue  # aborted while queued: the IO thread has answered it
                self.abort_events[command.request_id] = event
            elif not isinstance(command, (Evict, Shutdown)):
                log.error("model loop got an unexpected %s", command.KIND)
                continue
            commands.append(command)
        aborted = [rid for rid, event in self.abort_events.items() if event.is_set()]
        return Turn(commands, aborted)
