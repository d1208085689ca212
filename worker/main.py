"""`mlx-cache-proxy worker`: one MLX worker process.

Two threads. The main thread owns the model: it loads the engine, then runs
the step loop (`worker.step_loop`), taking commands from `inbox` (Generate,
Evict, Shutdown) between steps. The IO thread (`worker.io_loop`) owns the
ZeroMQ socket and everything that is answered without the model. Signal
handlers and the dead-parent check only set a `StopFlag`; the main loop sees
it, aborts the running requests, sends nothing more, closes the socket and
exits 0.

Up to `--max-batch` requests run at once, admitted in arrival order; the rest
wait in the step loop. An Abort of a request the model thread has not taken yet
is answered at once by the IO thread with a Result(finish_reason=abort,
generated_tokens=0) whose facts carry the prompt length and zeros. Shutdown
aborts the running requests and every queued one (each still gets its Result),
then the worker exits once those have been sent.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import re
import signal
import sys
import time
from typing import Optional

from protocol.messages import (
    PROTOCOL_VERSION,
    CacheLayout,
    Error,
    ErrorCode,
    Evict,
    Generate,
    Hello,
    Message,
    Result,
    Shutdown,
    Stats,
)
from protocol.curve import ServerKeys, is_loopback_endpoint
from worker.disk_lock import CacheDirLocked
from worker.io_loop import SHUTDOWN_LINGER_MS, Close, IOLoop, Outbox, Ready, RequestBook, StopFlag
from worker.engine import ContextLengthExceeded
from worker.step_loop import StepLoop
from worker.prefix_events import PrefixReporter
from worker.memory import apply_memory_limit, memory_stats
from worker.model_files import NotAModelDirectory

log = logging.getLogger("mlx_cache_proxy.worker")

# How often the idle main loop looks at the stop flag.
STOP_POLL_S = 0.1

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'8G' -> 8 GiB; suffixes K, M, G, T are powers of 1024 (an optional B or iB is allowed)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 8G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


# The shutdown save's deadline: it ends before the IO thread's grace (STOP_GRACE_S more) and the
# proxy's wait (proxy/serve.py WORKER_SAVE_TIMEOUT_S, 140 s) run out.
DISK_SAVE_GRACE_S = 120.0
# Chosen by measurement (tests/benchmarks/bench_batching.py); the proxy's --max-batch default is this one.
DEFAULT_MAX_BATCH = 8


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mlx-cache-proxy worker",
        description="Run one MLX worker: serve a model over a ZeroMQ ROUTER socket.",
    )
    parser.add_argument("--model", required=True, help="mlx-lm model directory or Hugging Face repo")
    parser.add_argument(
        "--endpoint", required=True,
        help="ZeroMQ endpoint to bind: ipc://PATH or tcp://HOST:PORT (a non-loopback host needs the CURVE keys)",
    )  # fmt: skip
    parser.add_argument(
        "--curve-secret-key", default=None, metavar="FILE",
        help="this worker's CURVE key pair (worker.key_secret from `mlx-cache-proxy keys`): the link is encrypted "
        "and only proxies whose public key --curve-allowed-keys lists may connect",
    )  # fmt: skip
    parser.add_argument(
        "--curve-allowed-keys", default=None, metavar="PATH",
        help="the proxies' public keys (a .key file, or a directory of them) this worker admits",
    )  # fmt: skip
    parser.add_argument("--model-id", default=None, help="the model name the proxy serves (default: from --model)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--cache-bytes", type=parse_bytes, default=None, help="checkpoint pool size, e.g. 512M or 8G")
    parser.add_argument("--checkpoint-interval", type=_positive_int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="disable prefix caching")
    parser.add_argument("--prefill-step", type=_positive_int, default=None)
    parser.add_argument(
        "--memory-limit",
        type=parse_bytes,
        default=None,
        help="memory budget for MLX, e.g. 48G (default: the device's recommended working set, "
        "else 90%% of physical memory); requests that would exceed it evict the pool, then are refused",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="directory of the disk tier (checkpoints that survive restarts); default: off for a bare worker",
    )
    parser.add_argument(
        "--disk-cache-bytes", type=parse_bytes, default=None, help="disk tier budget, e.g. 64G (0 turns it off)"
    )
    parser.add_argument(
        "--max-kv-size", type=_positive_int, default=None, help="cap on prompt + generated tokens (default: the model's)"
    )
    parser.add_argument(
        "--max-batch",
        type=_positive_int,
        default=DEFAULT_MAX_BATCH,
        help="requests run at once, their decode steps batched (1: one at a time)",
    )
    parser.add_argument("--heartbeat-interval", type=_positive_float, default=2.0, metavar="SECONDS")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--log-file", default=None, help="also log to this file (reopened after rotation)")
    parser.add_argument("--stderr-level", default="", type=str.upper, choices=["", "DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of stderr (default: --log-level)")
    return parser.parse_args(argv)


def engine_config(args: argparse.Namespace):
    from worker.engine import EngineConfig

    names = ("cache_bytes", "checkpoint_interval", "prefill_step", "memory_limit", "max_kv_size", "disk_cache_bytes")
    given = {name: getattr(args, name) for name in names}
    given["disk_dir"] = args.cache_dir
    return EngineConfig(cache_enabled=not args.no_cache, **{k: v for k, v in given.items() if v is not None})


def link_keys(args: argparse.Namespace) -> Optional[ServerKeys]:
    """The CURVE server keys, or None; raises ValueError for a half-given pair or an open endpoint without keys."""
    if (args.curve_secret_key is None) != (args.curve_allowed_keys is None):
        raise ValueError("--curve-secret-key and --curve-allowed-keys go together")
    if args.curve_secret_key is None:
        if not is_loopback_endpoint(args.endpoint):
            raise ValueError(
                f"refusing to bind {args.endpoint} without CURVE keys: anyone who reaches it could drive this "
                "worker; give --curve-secret-key and --curve-allowed-keys (see `mlx-cache-proxy keys`) "
                "or bind a loopback address"
            )
        return None
    return ServerKeys.load(args.curve_secret_key, args.curve_allowed_keys)


def install_signal_handlers(stop: StopFlag) -> None:
    def ask_to_stop(signum, _frame) -> None:
        stop.request(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, ask_to_stop)
    signal.signal(signal.SIGINT, ask_to_stop)
    # A file past RLIMIT_FSIZE must fail its write (EFBIG, handled like a full disk), not kill the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from worker.sharded import Ranks, distributed_group

    group = distributed_group()  # under mlx.launch with more than one rank: a sharded worker
    ranks = Ranks(group) if group is not None else None
    if ranks is not None and ranks.rank > 0:
        return _follow(args, ranks)
    try:
        keys = link_keys(args)
    except ValueError as exc:  # KeyFileError too
        print(f"mlx-cache-proxy worker: {exc}", file=sys.stderr)
        return 2
    from proxy.logs import setup_logging

    text_format = f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s"
    setup_logging(args.log_level, args.log_format, args.log_file or "", text_format, args.stderr_level)
    stop = StopFlag()
    install_signal_handlers(stop)

    inbox: queue.Queue[Message] = queue.Queue()
    outbox = Outbox()
    book = RequestBook()
    # The IO thread starts before the (slow) load, so a proxy can connect early; it gets Hello once we are ready.
    io = IOLoop(args.endpoint, inbox, outbox, book, stop, args.heartbeat_interval, args.parent_pid, keys)
    io.start()
    io.bound.wait()
    if io.bind_error is not None:
        log.error("cannot bind %s: %s", args.endpoint, io.bind_error)
        return 1
    try:
        return _run(args, io, inbox, outbox, book, stop, ranks)
    finally:
        outbox.put(Close(0))  # a backstop: the IO loop ends at the first Close it reads
        io.join(timeout=5.0)
        if not io.is_alive():
            outbox.close()


def _follow(args: argparse.Namespace, ranks) -> int:
    """A sharded worker's rank > 0: no socket; it follows rank 0's turns (worker/sharded_loop.py)."""
    from proxy.logs import setup_logging
    from worker.sharded_loop import run_follower

    text_format = f"%(asctime)s worker[{os.getpid()}] rank {ranks.rank} %(levelname)s %(message)s"
    setup_logging(args.log_level, args.log_format, args.log_file or "", text_format, args.stderr_level)
    stop = StopFlag()
    install_signal_handlers(stop)
    return run_follower(args, ranks, stop)


def _load(args, ranks):
    if ranks is None:
        from worker.engine import load_engine

        return load_engine(args.model, engine_config(args), model_id=args.model_id)
    from worker.sharded_loop import load_sharded_engine

    return load_sharded_engine(args, ranks)


def _model_loop(engine, inbox, outbox, book, stop, io, args, ranks) -> "ModelLoop":
    if ranks is None:
        return ModelLoop(engine, inbox, outbox, book, stop, io, args.max_batch)
    from worker.sharded import Lockstep
    from worker.sharded_loop import LeaderLoop

    return LeaderLoop(engine, inbox, outbox, book, stop, io, args.max_batch, Lockstep(ranks, inbox, book))


def _run(args, io: IOLoop, inbox, outbox: Outbox, book: RequestBook, stop: StopFlag, ranks=None) -> int:
    try:
        engine = _load(args, ranks)
    except (CacheDirLocked, NotAModelDirectory) as exc:
        log.error("%s", exc)  # one line: the cause is another process or the directory, not a bug here
        outbox.put(Error(ErrorCode.INTERNAL, str(exc)))
        outbox.put(Close(SHUTDOWN_LINGER_MS))
        return 1
    except Exception as exc:
        log.exception("failed to load %s", args.model)
        outbox.put(Error(ErrorCode.INTERNAL, f"failed to load model {args.model}: {exc}"))
        outbox.put(Close(SHUTDOWN_LINGER_MS))
        return 1
    apply_memory_limit(engine.memory_limit)
    io.pool_stats = engine.pool_stats()
    if engine.grammars is not None:
        io.compile_ahead = engine.grammars.compile_ahead
    outbox.put(Ready(_hello(engine, args)))
    _log_start(engine, args, io.pool_stats.capacity_bytes, ranks)

    try:
        reason = _model_loop(engine, inbox, outbox, book, stop, io, args, ranks).run()
    except Exception as exc:
        from worker.sharded import RankLost

        if ranks is None or not isinstance(exc, RankLost):
            raise
        log.error("%s; stopping (a sharded worker runs only with every rank up)", exc)  # one line, no traceback
        outbox.put(Close(0))
        return 1
    log.info("stopping: %s", reason)
    try:
        io.stop_grace_s += DISK_SAVE_GRACE_S  # saving is work, not a hang
        engine.close(DISK_SAVE_GRACE_S)  # the pool goes to the disk tier, if there is one, within the grace
    except Exception:
        log.exception("saving the pool to disk failed")
    # After Shutdown the last Results must still leave; after a stop nothing more is sent.
    outbox.put(Close(SHUTDOWN_LINGER_MS if reason == "shutdown" else 0))
    return 1 if io.failed else 0


def _hello(engine, args) -> Hello:
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        model_id=engine.model_id,
        context_limit=engine.context_limit,
        vocab_size=engine.vocab_size,
        layout=engine.layout,
        memory=memory_stats(0),
        cache_enabled=not args.no_cache,
        pool_capacity_bytes=engine.pool_stats().capacity_bytes,
        pid=os.getpid(),
        memory_limit=engine.memory_limit,
        activation_bytes=engine.activation_bytes,
        max_batch=args.max_batch,
    )


def _log_start(engine, args, capacity: int, ranks=None) -> None:
    log.info(
        "serving %s (%s%s) on %s; layout: %s; pool capacity %.1f MiB; up to %d requests at once%s",
        engine.model_id,
        args.model,
        f", sharded over {ranks.size} ranks, this one's part" if ranks is not None else "",
        args.endpoint + (" (CURVE)" if args.curve_secret_key else ""),
        _layout_summary(engine.layout),
        capacity / 2**20,
        args.max_batch,
        "" if not args.no_cache else " (cache disabled)",
    )


def _layout_summary(layout: CacheLayout) -> str:
    counts: dict[str, int] = {}
    for kind in layout.layer_kinds:
        counts[kind] = counts.get(kind, 0) + 1
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    text = f"{len(layout.layer_kinds)} layers ({kinds}), KV {layout.kv_bytes_per_token} B/token, snapshot {layout.snapshot_bytes} B"
    return text if layout.cacheable else f"{text}, uncached: {layout.uncached_reason}"


class ModelLoop:
    """The main thread's loop: commands from `inbox` between steps of the engine's step loop."""

    def __init__(self, engine, inbox, outbox: Outbox, book: RequestBook, stop: StopFlag, io: IOLoop, max_batch: int):
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.book = book
        self.stop = stop
        self.io = io
        self.steps = StepLoop(engine, max_batch)
        self._stats_due = False
        self._prefixes = PrefixReporter()
        self._session = 0  # the proxy session the prefix events were last sent in

    def run(self) -> str:
        """Serve until Shutdown or a stop request; returns why it ended."""
        while not self._stopping():
            if self._take_commands(block=not self.steps.busy) == "shutdown":
                self.steps.abort_all()
                self._send_stats()
                return "shutdown"
            if self.steps.busy:
                self._step()
            if self._stats_due or self._new_session():
                self._send_stats()
        self.steps.abort_all()  # keeps what they computed, for the disk tier; nothing more is sent
        return self.stop.reason or "stopped by another rank"

    def _stopping(self) -> bool:
        return self.stop.requested

    def _take_commands(self, block: bool) -> str | None:
        while True:
            try:
                command = self.inbox.get(timeout=STOP_POLL_S) if block else self.inbox.get_nowait()
            except queue.Empty:
                return None
            block = False
            if isinstance(command, Generate):
                self._submit(command)
            elif isinstance(command, Evict):
                self._evict(command)
            elif isinstance(command, Shutdown):
                return "shutdown"
            else:
                log.error("model loop got an unexpected %s", command.KIND)

    def _submit(self, request: Generate) -> None:
        abort_event = self.book.start(request.request_id)
        if abort_event is None:
            return  # aborted while queued: the IO thread has answered it
        self._queue(request, lambda: abort_event.is_set() or self.stop.requested)

    def _queue(self, request: Generate, should_abort) -> None:
        rid = request.request_id
        try:
            self.steps.submit(request, self._emit, should_abort)
        except ContextLengthExceeded as exc:
            self._reject(rid, ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc))
        except ValueError as exc:
            self._reject(rid, ErrorCode.BAD_REQUEST, str(exc))

    def _step(self) -> None:
        try:
            self.steps.step()
        except MemoryError as exc:
            log.error("a step ran out of memory: %s", exc)
            self.steps.fail_all(ErrorCode.INSUFFICIENT_MEMORY, str(exc) or "out of memory")
        except Exception as exc:
            log.exception("a step failed; failing the %d requests in it", self.steps.running)
            self.steps.fail_all(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _emit(self, message: Message) -> None:
        self.outbox.put(message)
        if isinstance(message, (Result, Error)) and message.request_id is not None:
            self.book.finish(message.request_id)
            self._stats_due = True
            if isinstance(message, Result):
                _log_result(message)

    def _reject(self, rid: str, code: ErrorCode, message: str) -> None:
        log.warning("request %s rejected: %s", rid, message)
        self._emit(Error(code, message, rid))

    def _new_session(self) -> bool:
        """A proxy connected since the prefix events were last sent (it needs the whole set)."""
        return self.io is not None and self.io.sessions != self._session  # a follower rank has no link

    def _send_stats(self) -> None:
        # Right behind a Result: the proxy's figures are current when the client reads its reply.
        self._stats_due = False
        pool = self.engine.pool_stats()
        self.io.pool_stats = pool
        self.outbox.put(Stats(memory=memory_stats(pool.bytes), pool=pool, running_requests=self.steps.running_ids()))
        self._send_prefix_events()

    def _send_prefix_events(self) -> None:
        """What the pool can restore now, as changes (the whole set for a new proxy session)."""
        reset = self.io.sessions != self._session
        self._session = self.io.sessions
        for message in self._prefixes.update(self.engine.stored_sequences(), reset=reset):
            self.outbox.put(message)

    def _evict(self, command: Evict) -> None:
        try:
            self.engine.evict_to(command.target_bytes)
        except Exception as exc:
            log.exception("evict_to(%d) failed", command.target_bytes)
            self.outbox.put(Error(ErrorCode.INTERNAL, f"evict failed: {type(exc).__name__}: {exc}"))
        log.info("evicted to %d bytes: pool holds %d", command.target_bytes, self.engine.pool_stats().bytes)
        # The proxy learns the new pool size without waiting for the next heartbeat.
        self._send_stats()


def _log_result(result: Result) -> None:
    f, t = result.facts, result.timings
    log.info(
        "request %s: %s; prompt %d, cached %d, recomputed %d, generated %d; restored to %d (%s); "
        "restore %.3fs, prefill %.3fs, ttft %.3fs, decode %.3fs, total %.3fs",
        result.request_id,
        result.finish_reason.value,
        f.prompt_tokens,
        f.cached_tokens,
        f.recomputed_tokens,
        result.generated_tokens,
        f.restore_point,
        f.restore_kind.value,
        t.restore_s,
        t.prefill_s,
        t.ttft_s,
        t.decode_s,
        t.total_s,
    )


if __name__ == "__main__":
    sys.exit(main())
