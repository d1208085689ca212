"""The disk tier: stored sequences that outlive the process and outgrow memory.

Sequences evicted from the memory pool, and the whole pool at shutdown, are
written as checkpoint files (see `disk_format`) under a directory named by the
model fingerprint (weights, config, tokenizer, chat template), so another model
never reads them. An index (JSON, rewritten atomically) lists the entries; it
is read lazily, at the first lookup. Writes happen on a background thread:
the model thread only hands over evaluated arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.messages import DiskStats
from worker.disk_format import TEMP_PREFIX, CorruptEntry, read_entry, write_entry, write_json_atomic
from worker.state_codec import SavedPoint, export_sequence, from_host, from_ready, host_ready, import_at
from worker.trie import TokenTrie

log = logging.getLogger("mlx_cache_proxy.worker")

INDEX = "index.json"
INDEX_VERSION = 1
SUFFIX = ".ckpt"


@dataclass
class DiskEntry:
    name: str  # file name in the tier's directory
    tokens: list[int]
    points: dict[int, tuple[str, bool]]  # position -> (restore kind, logits stored)
    nbytes: int
    checksum: str
    last_used: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "points": [[p, k, lg] for p, (k, lg) in sorted(self.points.items())],
            "nbytes": self.nbytes,
            "checksum": self.checksum,
            "last_used": self.last_used,
        }

    @classmethod
    def from_json(cls, d: dict) -> DiskEntry:
        points = {int(p): (str(k), bool(lg)) for p, k, lg in d["points"]}
        return cls(d["name"], [int(t) for t in d["tokens"]], points, int(d["nbytes"]), d["checksum"], d["last_used"])


@dataclass(frozen=True)
class DiskHit:
    entry: DiskEntry
    position: int
    kind: str


def _entry_name(tokens: list[int]) -> str:
    return hashlib.sha256(array("q", tokens).tobytes()).hexdigest()[:32] + SUFFIX


@dataclass(frozen=True)
class _Write:
    name: str
    tokens: list[int]
    arrays: dict  # name -> (evaluated mx array, dtype name), see state_codec.host_ready
    meta: dict
    points: dict[int, tuple[str, bool]]


class DiskTier:
    def __init__(self, directory: Path, budget_bytes: int, ops: Any):
        self.dir = directory
        self.budget_bytes = budget_bytes
        self.ops = ops
        # Cumulative figures (the protocol's DiskStats is built from them on demand).
        self.hits = self.read_bytes = self.written_bytes = self.corrupt = 0
        self.load_seconds = 0.0
        self._entries: dict[str, DiskEntry] = {}
        self._trie = TokenTrie()
        self._lock = threading.Lock()  # guards the index: the writer thread updates it
        self._loaded = False
        # Queued writes are indexed at once and loaded from memory until written:
        # the next request often wants what the last one evicted.
        self._pending: dict[str, _Write] = {}
        self._writes: queue.Queue[_Write | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="disk-writer", daemon=True)
        self._writer.start()
        # Figures for "is loading faster than recomputing?", refined by measurement.
        self.read_bytes_per_s = 500e6

    # ------------------------------------------------------------- lookup / load (model thread)

    def lookup(self, prompt: list[int]) -> DiskHit | None:
        """The deepest saved point usable for `prompt` (one token left to compute unless logits were saved)."""
        self._ensure_loaded()
        n = len(prompt)
        with self._lock:
            match = self._trie.match(prompt)
            if not self.ops.needs_snapshots:
                return self._kv_only_hit(match, n)
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

    def _kv_only_hit(self, match, n: int) -> DiskHit | None:
        for depth, holders in match.checkpoints(n):
            if depth == n and (hit := self._hit(depth, holders, need_logits=True)) is not None:
                return hit
        depth = min(match.length, n - 1)
        node = match.node_at(depth) if depth > 0 else None
        if node is None:
            return None
        _, name = next(iter(self._trie.entries_under(node)))
        return DiskHit(self._entries[name], depth, "trim")

    def load(self, hit: DiskHit) -> tuple[list, Any, Any] | None:
        """(cache at the hit's position, logits or None, snapshot or None); None when the file is bad."""
        start = time.perf_counter()
        path = self.dir / hit.entry.name
        with self._lock:
            pending = self._pending.get(hit.entry.name)
        try:
            if pending is not None:
                arrays, meta = from_ready(pending.arrays), pending.meta
            else:
                header, host = read_entry(path)
                if header.get("checksum_of") != hit.entry.name:
                    raise CorruptEntry(f"{hit.entry.name}: header names another entry")
                arrays, meta = from_host(host), header["meta"]
            cache, logits, snapshot = import_at(self.ops, arrays, meta, hit.position)
        except CorruptEntry as exc:
            log.warning("disk checkpoint skipped and removed: %s", exc)
            self.corrupt += 1
            self._forget(hit.entry.name, delete=True)
            return None
        except (KeyError, ValueError) as exc:
            # A complete file that no longer holds this point: it was rewritten for the
            # same tokens since the lookup. A miss, not damage.
            log.info("disk checkpoint %s changed since the lookup (%s); recomputing", hit.entry.name, exc)
            return None
        elapsed = time.perf_counter() - start
        size = hit.entry.nbytes
        self.read_bytes_per_s = 0.5 * self.read_bytes_per_s + 0.5 * size / max(elapsed, 1e-6)
        self.hits += 1
        self.read_bytes += size
        self.load_seconds += elapsed
        with self._lock:
            hit.entry.last_used = time.time()
        return cache, logits, snapshot

    def stats(self) -> DiskStats:
        with self._lock:
            entries, held = len(self._entries), sum(e.nbytes for e in self._entries.values())
        return DiskStats(
            entries=entries,
            bytes=held,
            capacity_bytes=self.budget_bytes,
            hits=self.hits,
            read_bytes=self.read_bytes,
            written_bytes=self.written_bytes,
            load_seconds=self.load_seconds,
            corrupt=self.corrupt,
        )

    def load_seconds_estimate(self, hit: DiskHit) -> float:
        return hit.entry.nbytes / self.read_bytes_per_s

    # ------------------------------------------------------------- save (model thread -> writer)

    def save(self, tokens: list[int], cache: list, points: list[SavedPoint]) -> None:
        """Queue a sequence for writing; returns at once."""
        if self.budget_bytes <= 0 or not tokens:
            return
        self._ensure_loaded()
        arrays, meta = export_sequence(self.ops, cache, len(tokens), points)
        saved = {p.position: (p.kind, p.logits is not None) for p in points}
        job = _Write(_entry_name(tokens), list(tokens), host_ready(arrays), meta, saved)
        estimate = sum(a.nbytes for a, _ in job.arrays.values())
        with self._lock:
            self._remove_locked(job.name)
            self._add_locked(DiskEntry(job.name, job.tokens, job.points, estimate, checksum=""))
            self._pending[job.name] = job
        self._writes.put(job)

    def close(self, timeout: float = 100.0) -> None:
        """Finish queued writes, then stop the writer."""
        self._writes.put(None)
        self._writer.join(timeout)

    def _write_loop(self) -> None:
        while True:
            job = self._writes.get()
            if job is None:
                return
            try:
                self._write(job)
            except Exception:
                log.exception("writing a disk checkpoint failed; the entry is skipped")

    def _write(self, job: _Write) -> None:
        with self._lock:
            if self._pending.get(job.name) is not job:
                return  # replaced by a newer save of the same tokens, which will be written
        header = {"checksum_of": job.name, "tokens": len(job.tokens), "meta": job.meta}
        nbytes, checksum = write_entry(self.dir / job.name, header, job.arrays)
        self.written_bytes += nbytes
        with self._lock:
            entry = self._entries.get(job.name)
            if self._pending.get(job.name) is job:
                del self._pending[job.name]
                if entry is not None:
                    entry.nbytes, entry.checksum = nbytes, checksum
            doomed = self._over_budget_locked()
            for victim in doomed:
                self._remove_locked(victim)
            snapshot = self._index_json_locked()
        for victim in doomed:
            (self.dir / victim).unlink(missing_ok=True)
        write_json_atomic(self.dir / INDEX, snapshot)

    # ------------------------------------------------------------- index

    def _ensure_loaded(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            self.dir.mkdir(parents=True, exist_ok=True)
            entries = self._read_index()
            for entry in entries:
                if (self.dir / entry.name).exists():
                    self._add_locked(entry)
            listed = set(self._entries) | {INDEX}
        for path in self.dir.iterdir():  # leftovers of a crash: temp files, files never indexed
            if path.name not in listed and (path.name.startswith(TEMP_PREFIX) or path.suffix == SUFFIX):
                path.unlink(missing_ok=True)

    def _read_index(self) -> list[DiskEntry]:
        path = self.dir / INDEX
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text())
            if data.get("version") != INDEX_VERSION:
                return []
            return [DiskEntry.from_json(e) for e in data["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("disk cache index unreadable (%s); starting an empty one", exc)
            return []

    def _index_json_locked(self) -> dict:
        written = [e.to_json() for e in self._entries.values() if e.name not in self._pending]
        return {"version": INDEX_VERSION, "entries": written}

    def _add_locked(self, entry: DiskEntry) -> None:
        self._entries[entry.name] = entry
        self._trie.attach_entry(entry.tokens, entry.name)
        for position, point in entry.points.items():
            if position <= len(entry.tokens):
                node = self._trie.insert(entry.tokens[:position])
                node.checkpoints.setdefault(position, {})[entry.name] = point

    def _remove_locked(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        node = self._trie.insert(entry.tokens)
        # A point on a shared path may have been saved by other entries too: drop only this one's claim.
        for n in self._trie.path_to(node):
            for depth, holders in list(n.checkpoints.items()):
                holders.pop(name, None)
                if not holders:
                    del n.checkpoints[depth]
        self._trie.detach_entry(node, name)

    def _over_budget_locked(self) -> list[str]:
        total = sum(e.nbytes for e in self._entries.values())
        doomed = []
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if total <= self.budget_bytes:
                break
            if entry.name in self._pending:
                continue  # written first, judged after
            doomed.append(entry.name)
            total -= entry.nbytes
        return doomed

    def _forget(self, name: str, delete: bool) -> None:
        with self._lock:
            self._remove_locked(name)
            snapshot = self._index_json_locked()
        if delete:
            (self.dir / name).unlink(missing_ok=True)
        write_json_atomic(self.dir / INDEX, snapshot)
