"""The disk tier: stored sequences that outlive the process and outgrow memory.

Sequences evicted from the memory pool, and the whole pool at shutdown, are
written as checkpoint files (see `disk_format`) under a directory named by the
model fingerprint (weights, config, tokenizer, chat template), so another model
never reads them. Writes happen on a background thread: the model thread only
hands over evaluated arrays.

Integrity, and why each rule is there:
- Each file's header holds its namespace, tokens and points, so a file describes
  itself. The index (`disk_index`, SQLite in WAL mode, one row per file) only
  saves reading every header at start-up: when it is damaged it is moved aside
  and rebuilt from the files, and a file no row claims (a crash between the
  file and its row) is indexed again. No single damaged file, index or
  checkpoint, costs more than itself.
- Names are `disk_index.entry_name(namespace, tokens)`: 32 hex digits and
  `.ckpt`. Nothing else is ever opened or deleted; a row naming anything else
  is ignored with a warning. Temporary files and files of that pattern whose
  header cannot be read are removed at start-up (the directory lock makes them
  this process's own leftovers).
- An exclusive lock (`disk_lock`) on the directory for the tier's life: a
  second worker on it is refused at start-up, since two would each remove the
  other's files.
- A write that fails (ENOSPC, EIO, EFBIG, EDQUOT, ...) frees the sequence's
  host memory, removes its temp file, leaves the index and counts in
  `DiskStats.write_failures`; nothing waits in RAM for a disk that is full.
- The shutdown save is one file and one row per sequence, and `close` takes a
  deadline: what is still queued then is dropped (and reported), not written
  past the stop grace.

Namespaces (a string, "" by default) partition the tier: a lookup sees only
entries saved under its own namespace, and the namespace is part of the name.
"""

from __future__ import annotations

import errno
import heapq
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.messages import DiskStats
from worker.disk_format import TEMP_PREFIX, CorruptEntry, read_entry, read_header, write_entry
from worker.disk_index import DiskEntry, DiskIndex, entry_name, is_entry_name, points_from_json, points_json
from worker.disk_lock import DirectoryLock
from worker.state_codec import SavedPoint, export_sequence, from_host, from_ready, host_ready, import_at
from worker.trie import TokenTrie

log = logging.getLogger("mlx_cache_proxy.worker")

OLD_INDEX = "index.json"  # the JSON index of earlier versions; replaced by disk_index
JOIN_SLACK_S = 2.0  # past the deadline, how long close() waits for a write already under way


@dataclass(frozen=True)
class DiskHit:
    entry: DiskEntry
    position: int
    kind: str


@dataclass(frozen=True)
class WriteProgress:
    """Cumulative writer figures; the shutdown report is the difference of two."""

    written: int = 0
    written_bytes: int = 0
    failed: int = 0
    skipped: int = 0  # still queued at the deadline
    pending: int = 0  # queued now


@dataclass(frozen=True)
class _Write:
    name: str
    namespace: str
    tokens: list[int]
    arrays: dict  # name -> (evaluated mx array, dtype name), see state_codec.host_ready
    meta: dict
    points: dict[int, tuple[str, bool]]
    estimate: int  # bytes of the arrays, held in memory until written


class DiskTier:
    def __init__(self, directory: Path, budget_bytes: int, ops: Any):
        self.dir = directory
        self.budget_bytes = budget_bytes
        self.ops = ops
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dir_lock = DirectoryLock(self.dir)
        self._dir_lock.acquire()  # raises CacheDirLocked: at start-up, before anything is read or removed
        self._index = DiskIndex(self.dir)
        # Cumulative figures (the protocol's DiskStats is built from them on demand).
        self.hits = self.read_bytes = self.written_bytes = self.corrupt = 0
        self.written = self.write_failures = self.skipped = 0
        self.load_seconds = 0.0
        self._entries: dict[str, DiskEntry] = {}
        self._tries: dict[str, TokenTrie] = {}  # namespace -> its entries
        self._held = 0  # bytes of the entries (estimates for pending ones)
        self._by_age: list[tuple[float, str]] = []  # lazy min-heap of (last_used, name) for the budget
        self._lock = threading.Lock()  # guards the entries: the writer thread updates them
        self._loaded = False
        # Queued writes are indexed at once and loaded from memory until written:
        # the next request often wants what the last one evicted.
        self._pending: dict[str, _Write] = {}
        self._pending_bytes = 0
        self._deadline: float | None = None  # time.monotonic() after which queued writes are dropped
        self._closed = False
        self._writes: queue.Queue[_Write | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="disk-writer", daemon=True)
        self._writer.start()
        # Figures for "is loading faster than recomputing?", refined by measurement.
        self.read_bytes_per_s = 500e6

    # ------------------------------------------------------------- lookup / load (model thread)

    def lookup(self, prompt: list[int], namespace: str = "") -> DiskHit | None:
        """The deepest saved point usable for `prompt` (one token left to compute unless logits were saved)."""
        self._ensure_loaded()
        n = len(prompt)
        with self._lock:
            trie = self._tries.get(namespace)
            if trie is None:
                return None
            match = trie.match(prompt)
            if not self.ops.needs_snapshots:
                return self._kv_only_hit(trie, match, n)
            for depth, holders in match.checkpoints(n):
                hit = self._hit(depth, holders, need_logits=depth == n)
                if hit is not None:
                    return hit
        return None

    def _hit(self, depth: int, holders: dict, need_logits: bool) -> DiskHit | None:
        for name, (kind, has_logits) in holders.items():
            if has_logits or not need_logits:
                return DiskHit(self._entries[name], depth, kind)
        return None

    def _kv_only_hit(self, trie: TokenTrie, match, n: int) -> DiskHit | None:
        for depth, holders in match.checkpoints(n):
            if depth == n and (hit := self._hit(depth, holders, need_logits=True)) is not None:
                return hit
        depth = min(match.length, n - 1)
        node = match.node_at(depth) if depth > 0 else None
        if node is None:
            return None
        _, name = next(iter(trie.entries_under(node)))
        return DiskHit(self._entries[name], depth, "trim")

    def load(self, hit: DiskHit) -> tuple[list, Any, Any] | None:
        """(cache at the hit's position, logits or None, snapshot or None); None when the file is bad."""
        start = time.perf_counter()
        name = hit.entry.name
        with self._lock:
            pending = self._pending.get(name)
        try:
            if pending is not None:
                arrays, meta = from_ready(pending.arrays), pending.meta
            else:
                header, host = read_entry(self._path(name))
                if header.get("checksum_of") != name:
                    raise CorruptEntry(f"{name}: header names another entry")
                arrays, meta = from_host(host), header["meta"]
            cache, logits, snapshot = import_at(self.ops, arrays, meta, hit.position)
        except CorruptEntry as exc:
            log.warning("disk checkpoint skipped and removed: %s", exc)
            self.corrupt += 1
            self._forget(name)
            return None
        except (KeyError, ValueError) as exc:
            # A complete file that does not hold this point: rewritten for the same tokens since
            # the lookup, or its row is stale (a lost update). A miss, not damage: the file's
            # header is the truth, so the entry is indexed again from it.
            log.info("disk checkpoint %s changed since the lookup (%s); recomputing", name, exc)
            if pending is None:
                self._refresh(name)
            return None
        elapsed = time.perf_counter() - start
        size = hit.entry.nbytes
        self.read_bytes_per_s = 0.5 * self.read_bytes_per_s + 0.5 * size / max(elapsed, 1e-6)
        self.hits += 1
        self.read_bytes += size
        self.load_seconds += elapsed
        now = time.time()
        with self._lock:
            if self._entries.get(name) is hit.entry:
                hit.entry.last_used = now
                heapq.heappush(self._by_age, (now, name))
        if pending is None:
            self._index.touch(name, now)
        return cache, logits, snapshot

    def stats(self) -> DiskStats:
        with self._lock:
            entries, held, pending = len(self._entries), self._held, self._pending_bytes
        return DiskStats(
            entries=entries,
            bytes=held,
            capacity_bytes=self.budget_bytes,
            hits=self.hits,
            read_bytes=self.read_bytes,
            written_bytes=self.written_bytes,
            load_seconds=self.load_seconds,
            corrupt=self.corrupt,
            write_failures=self.write_failures,
            pending_bytes=pending,
        )

    def progress(self) -> WriteProgress:
        with self._lock:
            pending = len(self._pending)
        return WriteProgress(self.written, self.written_bytes, self.write_failures, self.skipped, pending)

    def load_seconds_estimate(self, hit: DiskHit) -> float:
        return hit.entry.nbytes / self.read_bytes_per_s

    # ------------------------------------------------------------- save (model thread -> writer)

    def save(self, tokens: list[int], cache: list, points: list[SavedPoint], namespace: str = "") -> bool:
        """Queue a sequence for writing; returns at once (False: not queued)."""
        if self.budget_bytes <= 0 or not tokens or self._closed:
            return False
        self._ensure_loaded()
        arrays, meta = export_sequence(self.ops, cache, len(tokens), points)
        saved = {p.position: (p.kind, p.logits is not None) for p in points}
        ready = host_ready(arrays)
        estimate = sum(a.nbytes for a, _ in ready.values())
        job = _Write(entry_name(namespace, tokens), namespace, list(tokens), ready, meta, saved, estimate)
        with self._lock:
            old = self._pending.pop(job.name, None)
            if old is not None:
                self._pending_bytes -= old.estimate
            self._remove_locked(job.name)
            self._add_locked(DiskEntry(job.name, namespace, job.tokens, job.points, estimate, checksum=""))
            self._pending[job.name] = job
            self._pending_bytes += estimate
        self._writes.put(job)
        return True

    def close(self, deadline: float | None = None) -> None:
        """Finish queued writes (those still queued at `deadline`, a time.monotonic(), are dropped), then stop."""
        self._closed = True
        self._deadline = deadline
        self._writes.put(None)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) + JOIN_SLACK_S
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.warning("disk tier: a write was still under way at the deadline; its temp file goes at the next start")
            return  # the process exits soon; the kernel drops the lock then
        self._index.close()
        self._dir_lock.release()

    def _write_loop(self) -> None:
        while True:
            job = self._writes.get()
            if job is None:
                return
            try:
                self._write(job)
            except OSError as exc:
                self._fail(job, f"{errno.errorcode.get(exc.errno or 0, 'OSError')}: {exc.strerror or exc}")
            except Exception as exc:
                log.exception("writing a disk checkpoint failed")
                self._fail(job, f"{type(exc).__name__}: {exc}")
            job = None  # drop the arrays now, not when the next job arrives

    def _write(self, job: _Write) -> None:
        with self._lock:
            if self._pending.get(job.name) is not job:
                return  # replaced by a newer save of the same tokens, which will be written
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._drop_pending_locked(job)
                self.skipped += 1
                return
        header = {
            "checksum_of": job.name,
            "namespace": job.namespace,
            "tokens": job.tokens,
            "points": points_json(job.points),
            "meta": job.meta,
        }
        nbytes, checksum = write_entry(self._path(job.name), header, job.arrays)
        self.written_bytes += nbytes
        self.written += 1
        with self._lock:
            entry = self._entries.get(job.name)
            current = self._pending.get(job.name) is job
            if current:
                del self._pending[job.name]
                self._pending_bytes -= job.estimate
                if entry is not None:
                    self._held += nbytes - entry.nbytes
                    entry.nbytes, entry.checksum = nbytes, checksum
            doomed = self._over_budget_locked()
            for victim in doomed:
                self._remove_locked(victim)
        if current and entry is not None:
            self._index.put(entry)
        for victim in doomed:
            self._index.delete(victim)
            self._path(victim).unlink(missing_ok=True)

    def _fail(self, job: _Write, reason: str) -> None:
        """A write that did not complete: free its memory, take it out of the index, count it."""
        self.write_failures += 1
        with self._lock:
            current = self._pending.get(job.name) is job
            if current:
                self._drop_pending_locked(job)
        log.warning("disk checkpoint %s not written (%s); dropped from memory and the index", job.name, reason)
        if current:
            # An older file of the same name no longer matches what the index says was saved.
            self._index.delete(job.name)
            self._path(job.name).unlink(missing_ok=True)

    def _drop_pending_locked(self, job: _Write) -> None:
        del self._pending[job.name]
        self._pending_bytes -= job.estimate
        self._remove_locked(job.name)

    # ------------------------------------------------------------- index

    def _path(self, name: str) -> Path:
        if not is_entry_name(name):  # entries only ever come from entry_name(); a guard, not a filter
            raise ValueError(f"not a disk checkpoint name: {name!r}")
        return self.dir / name

    def _ensure_loaded(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            rows = self._index.open()
            files = self._scan()
            for entry in rows:
                if entry.name in files:
                    self._add_locked(entry)
                else:
                    self._index.delete(entry.name)  # its file is gone
            unclaimed = sorted(files - set(self._entries))
            adopted = [e for e in map(self._adopt, unclaimed) if e is not None]
            for entry in adopted:
                self._add_locked(entry)
            doomed = self._over_budget_locked()
            for victim in doomed:
                self._remove_locked(victim)
        self._index.put_many(adopted)
        for victim in doomed:
            self._index.delete(victim)
            self._path(victim).unlink(missing_ok=True)
        if unclaimed or self._index.damaged:
            log.info(
                "disk tier %s: %d entries from the index, %d indexed again from their headers, %d unreadable removed",
                self.dir, len(rows), len(adopted), len(unclaimed) - len(adopted),
            )  # fmt: skip

    def _scan(self) -> set[str]:
        """Names of the checkpoint files present; removes this tier's crash leftovers (temp files)."""
        names = set()
        for path in self.dir.iterdir():
            if path.name.startswith(TEMP_PREFIX) or path.name == OLD_INDEX:
                if path.name == OLD_INDEX:
                    log.info("disk tier %s: removing the index of an earlier version", self.dir)
                if path.is_symlink() or path.is_file():
                    path.unlink(missing_ok=True)  # a link goes, never what it points to
                else:
                    log.warning("disk tier: %s is not a file; left alone", path)
            elif is_entry_name(path.name):
                if path.is_symlink() or not path.is_file():
                    log.warning("disk tier: %s is not a regular file; ignored", path)
                else:
                    names.add(path.name)
        return names

    def _adopt(self, name: str) -> DiskEntry | None:
        """The entry a file's header describes; an unreadable file of our own pattern is removed."""
        path = self.dir / name
        try:
            header = read_header(path)
            namespace, tokens = header["namespace"], header["tokens"]
            if header.get("checksum_of") != name or not isinstance(namespace, str) or not isinstance(tokens, list):
                raise CorruptEntry(f"{name}: header does not describe this entry")
            tokens = [int(t) for t in tokens]
            if entry_name(namespace, tokens) != name:
                raise CorruptEntry(f"{name}: header names other tokens")
            points = points_from_json(header["points"])
            stat = path.stat()
        except (CorruptEntry, KeyError, TypeError, ValueError, AttributeError, RecursionError, OSError) as exc:
            log.warning("disk checkpoint removed, its header is unreadable (or of an earlier version): %s", exc)
            self.corrupt += 1
            path.unlink(missing_ok=True)
            return None
        return DiskEntry(name, namespace, tokens, points, stat.st_size, checksum="", last_used=stat.st_mtime)

    def _add_locked(self, entry: DiskEntry) -> None:
        self._entries[entry.name] = entry
        self._held += entry.nbytes
        heapq.heappush(self._by_age, (entry.last_used, entry.name))
        trie = self._tries.setdefault(entry.namespace, TokenTrie())
        trie.attach_entry(entry.tokens, entry.name)
        for position, point in entry.points.items():
            if position <= len(entry.tokens):
                node = trie.insert(entry.tokens[:position])
                node.checkpoints.setdefault(position, {})[entry.name] = point

    def _remove_locked(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        self._held -= entry.nbytes
        trie = self._tries[entry.namespace]
        node = trie.insert(entry.tokens)
        # A point on a shared path may have been saved by other entries too: drop only this one's claim.
        for n in trie.path_to(node):
            for depth, holders in list(n.checkpoints.items()):
                holders.pop(name, None)
                if not holders:
                    del n.checkpoints[depth]
        trie.detach_entry(node, name)
        if not trie.root.children:
            del self._tries[entry.namespace]

    def _over_budget_locked(self) -> list[str]:
        """Least recently used first, until the entries fit the budget (a heap: no sort per write)."""
        doomed: list[str] = []
        held = self._held
        waiting: list[tuple[float, str]] = []
        while held > self.budget_bytes and self._by_age:
            used, name = heapq.heappop(self._by_age)
            entry = self._entries.get(name)
            if entry is None or entry.last_used != used or name in doomed:
                continue  # stale: removed, or used since
            if name in self._pending:
                waiting.append((used, name))  # written first, judged after
                continue
            doomed.append(name)
            held -= entry.nbytes
        for item in waiting:
            heapq.heappush(self._by_age, item)
        if len(self._by_age) > 2 * len(self._entries) + 64:  # drop stale items now and then
            self._by_age = [(e.last_used, n) for n, e in self._entries.items()]
            heapq.heapify(self._by_age)
        return doomed

    def _refresh(self, name: str) -> None:
        """The entry as its file's header describes it (a row that promised more is replaced)."""
        entry = self._adopt(name)  # an unreadable file is removed
        with self._lock:
            self._remove_locked(name)
            if entry is not None:
                self._add_locked(entry)
        if entry is not None:
            self._index.put(entry)
        else:
            self._index.delete(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._remove_locked(name)
        self._index.delete(name)
        self._path(name).unlink(missing_ok=True)
