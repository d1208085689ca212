"""The disk tier's index: one SQLite row per checkpoint file, and the names the tier gives files.

Why SQLite (standard library, WAL mode) rather than one JSON file: adding or
removing an entry is one small transaction, not a rewrite of every entry (the
shutdown save wrote the whole index once per sequence), and a crash mid-write
leaves the last committed state. Commits use synchronous=NORMAL: after a power
loss the last few rows may be missing, which costs nothing, because every
checkpoint file's header holds its own namespace, tokens and points and a file
no row claims is indexed again from its header (`worker.disk_tier`).

So the index is a cache of the files' headers, never their owner: an index
that cannot be read is moved aside and rebuilt from the files, and nothing is
deleted because a row is missing. Names come only from `entry_name`; a row
naming anything else (`../../file`) is dropped with a warning and its name is
never opened or deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from time import time

import numpy as np

log = logging.getLogger("mlx_cache_proxy.worker")

INDEX_FILE = "index.sqlite"
DAMAGED_SUFFIX = ".damaged"
SCHEMA_VERSION = 1
SUFFIX = ".ckpt"
_NAME = re.compile(r"[0-9a-f]{32}\.ckpt")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    name TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    tokens BLOB NOT NULL,
    points TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    last_used REAL NOT NULL
)
"""


def token_bytes(tokens: list[int]) -> bytes:
    return np.asarray(tokens, dtype="<i8").tobytes()


def entry_name(namespace: str, tokens: list[int]) -> str:
    """The file name of a sequence: 32 hex digits of SHA-256 over namespace and tokens."""
    digest = hashlib.sha256(namespace.encode() + b"\0" + token_bytes(tokens))
    return digest.hexdigest()[:32] + SUFFIX


def is_entry_name(name: object) -> bool:
    """True only for names `entry_name` can produce: no separator, no dot-dot, nothing outside the directory."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


@dataclass
class DiskEntry:
    name: str  # file name in the tier's directory, from entry_name(namespace, tokens)
    namespace: str
    tokens: list[int]
    points: dict[int, tuple[str, bool]]  # position -> (restore kind, logits stored)
    nbytes: int
    checksum: str
    last_used: float = field(default_factory=time)


def points_json(points: dict[int, tuple[str, bool]]) -> list:
    return [[p, k, lg] for p, (k, lg) in sorted(points.items())]


def points_from_json(value: list) -> dict[int, tuple[str, bool]]:
    return {int(p): (str(k), bool(lg)) for p, k, lg in value}


class DiskIndex:
    """The rows, behind one connection and one lock (the model thread and the writer both use it).

    A failing index write (a full disk) is logged and otherwise ignored: the
    file it describes is indexed again from its header at the next start.
    """

    def __init__(self, directory: Path):
        self.path = directory / INDEX_FILE
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._failing = False
        self.damaged = False  # the index could not be read at open: it was rebuilt from the files

    def open(self) -> list[DiskEntry]:
        """Open (or create) the index and return its valid rows; a damaged index is moved aside."""
        try:
            return self._open()
        except sqlite3.OperationalError as exc:
            # Cannot read or write it now (I/O error, full disk): not proof of damage, so keep the file.
            log.warning("disk cache index %s unusable (%s); working from the files' headers", self.path, exc)
            self._close_conn()
            self.damaged = True
            return []
        except sqlite3.DatabaseError as exc:
            log.warning("disk cache index %s damaged (%s); moved aside, rebuilding it from the files", self.path, exc)
            self._close_conn()
            self._move_aside()
            self.damaged = True
            try:
                self._connect()
            except sqlite3.Error as again:
                log.warning("disk cache index %s cannot be created (%s); working without one", self.path, again)
                self._close_conn()
            return []

    def _open(self) -> list[DiskEntry]:
        conn = self._connect()
        (check,) = conn.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        rows = conn.execute("SELECT name, namespace, tokens, points, nbytes, checksum, last_used FROM entries").fetchall()
        entries, bad = [], []
        for row in rows:
            entry = _entry_from_row(row)
            if entry is None:
                log.warning("disk cache index: ignoring a row naming %r (not a name this tier gives, "
                            "or fields that do not match it)", row[0])  # fmt: skip
                bad.append(row[0])
            else:
                entries.append(entry)
        for name in bad:
            self._execute("DELETE FROM entries WHERE name = ?", (name,))
        return entries

    def _connect(self) -> sqlite3.Connection:
        for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            if path.is_symlink():  # SQLite would follow it out of the directory
                log.warning("disk cache index: %s is a symbolic link; removed", path)
                path.unlink()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn = conn
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(_SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return conn

    def _move_aside(self) -> None:
        # The WAL and shared-memory files belong to the damaged database: never replay them into a new one.
        for suffix in ("-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        try:
            self.path.replace(f"{self.path}{DAMAGED_SUFFIX}")
        except OSError:
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------- writes

    def put(self, entry: DiskEntry) -> None:
        self._execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
            (entry.name, entry.namespace, token_bytes(entry.tokens), json.dumps(points_json(entry.points)),
             entry.nbytes, entry.checksum, entry.last_used),
        )  # fmt: skip

    def put_many(self, entries: list[DiskEntry]) -> None:
        """Rows rebuilt from files, in one transaction."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute("BEGIN")
                for e in entries:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (e.name, e.namespace, token_bytes(e.tokens), json.dumps(points_json(e.points)),
                         e.nbytes, e.checksum, e.last_used),
                    )  # fmt: skip
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._note_failure(exc)
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass

    def delete(self, name: str) -> None:
        self._execute("DELETE FROM entries WHERE name = ?", (name,))

    def touch(self, name: str, last_used: float) -> None:
        self._execute("UPDATE entries SET last_used = ? WHERE name = ?", (last_used, name))

    def close(self) -> None:
        with self._lock:
            self._close_conn()

    def _execute(self, sql: str, args: tuple) -> None:
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute(sql, args)
            except sqlite3.Error as exc:
                self._note_failure(exc)
                return
            self._failing = False

    def _note_failure(self, exc: sqlite3.Error) -> None:
        if not self._failing:  # once per run of failures, not once per entry
            log.warning("disk cache index write failed (%s); its files are indexed again at the next start", exc)
        self._failing = True

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None


def _entry_from_row(row: tuple) -> DiskEntry | None:
    name, namespace, tokens, points, nbytes, checksum, last_used = row
    if not is_entry_name(name) or not isinstance(namespace, str) or not isinstance(tokens, bytes):
        return None
    try:
        token_list = np.frombuffer(tokens, dtype="<i8").tolist()
        entry = DiskEntry(name, namespace, token_list, points_from_json(json.loads(points)), int(nbytes),
                          str(checksum), float(last_used))  # fmt: skip
    except (ValueError, TypeError):
        return None
    return entry if entry_name(namespace, token_list) == name else None
