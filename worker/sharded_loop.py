"""The model loop of a sharded worker's ranks (see `worker.sharded` for the design).

Rank 0 runs `LeaderLoop`: the usual `ModelLoop`, except that each turn's commands
and aborts come through `Lockstep.exchange` and a request's abort is read from the
turn's agreed set, not from its live event (which the IO thread may set mid-step).
The other ranks run `FollowerLoop`: the same loop over the same turns, with no
socket; what they would send is dropped.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from protocol.messages import Error, Evict, Generate, Message, Result, Shutdown
from worker.main import STOP_POLL_S, ModelLoop, engine_config
from worker.io_loop import StopFlag
from worker.memory import apply_memory_limit
from worker.sharded import Lockstep, RankLost, Ranks

log = logging.getLogger("mlx_cache_proxy.worker")


class _Dropped:
    """A follower's outbox: only rank 0 talks to the proxy."""

    def put(self, _message: Message) -> None:
        pass


class LeaderLoop(ModelLoop):
    def __init__(self, engine, inbox, outbox, book, stop: StopFlag, io, max_batch: int, lockstep: Lockstep):
        super().__init__(engine, inbox, outbox, book, stop, io, max_batch)
        self.lockstep = lockstep

    def run(self) -> str:
        reason = super().run()
        self.lockstep.ranks.farewell()
        return reason

    def _stopping(self) -> bool:
        return self.lockstep.stopping  # agreed at the last exchange, so every rank leaves at the same turn

    def _take_commands(self, block: bool) -> Optional[str]:
        commands = self.lockstep.exchange(block, self.stop.requested, STOP_POLL_S)
        for command in commands:
            if isinstance(command, Generate):
                rid = command.request_id
                self._queue(command, lambda rid=rid: rid in self.lockstep.aborted or self.lockstep.stopping)
            elif isinstance(command, Evict):
                self._evict(command)
            elif isinstance(command, Shutdown):
                return "shutdown"
        return None

    def _emit(self, message: Message) -> None:
        super()._emit(message)
        if isinstance(message, (Result, Error)) and message.request_id is not None:
            self.lockstep.finished(message.request_id)


class FollowerLoop(LeaderLoop):
    def __init__(self, engine, stop: StopFlag, max_batch: int, lockstep: Lockstep):
        super().__init__(engine, None, _Dropped(), None, stop, None, max_batch, lockstep)

    def _emit(self, message: Message) -> None:
        pass

    def _send_stats(self) -> None:
        self._stats_due = False


def load_sharded_engine(args: Any, ranks: Ranks):
    """The engine over this rank's shard; every rank calls it at the same point (it runs collectives)."""
    from worker.engine import load_engine

    config = engine_config(args)
    if config.disk_dir:
        if ranks.rank == 0:
            log.warning("the disk tier is off in a sharded worker (a file would hold one rank's part); "
                        "ignoring --cache-dir")  # fmt: skip
        config.disk_dir = ""
    engine = load_engine(args.model, config, model_id=args.model_id, ranks=ranks)
    ranks.seed_random()
    return engine


def run_follower(args: Any, ranks: Ranks, stop: StopFlag) -> int:
    """A rank > 0: load its shard, then follow rank 0's turns until the worker stops."""
    try:
        engine = load_sharded_engine(args, ranks)
    except Exception:
        log.exception("rank %d: failed to load %s", ranks.rank, args.model)
        return 1
    apply_memory_limit(engine.memory_limit)
    log.info("rank %d of %d: holding its shard of %s", ranks.rank, ranks.size, engine.model_id)
    try:
        reason = FollowerLoop(engine, stop, args.max_batch, Lockstep(ranks, None)).run()
    except RankLost as exc:
        log.error("rank %d: %s; stopping", ranks.rank, exc)
        return 1
    log.info("rank %d stopping: %s", ranks.rank, reason)
    return 0
