"""One checkpoint file: crash-safe to write, verified before it is read. No MLX here.

Layout: MAGIC, an 8-byte little-endian header length, a JSON header (caller's
fields plus an array table: name, dtype, shape, offset, nbytes), the raw array
bytes, and a trailing SHA-256 of everything before it. A truncated or altered
file fails the checksum and is never loaded.

Writes go to a temporary file in the same directory, are fsynced, then renamed
over the target, and the directory is fsynced: a crash leaves either the old
state or the new one, plus at most a stray temporary file that is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import IO, Callable

import numpy as np

MAGIC = b"MCPCKPT1"
_TRAILER = 32
TEMP_PREFIX = ".tmp-"


class CorruptEntry(Exception):
    """A file that is not a complete, unaltered checkpoint file."""


def write_entry(path: Path, header: dict, arrays: dict[str, tuple[np.ndarray, str]]) -> tuple[int, str]:
    """Write atomically; returns (bytes written, hex checksum)."""
    table, offset = [], 0
    for name, (data, dtype) in arrays.items():
        data = np.ascontiguousarray(data)
        table.append({"name": name, "np": data.dtype.str, "dtype": dtype, "shape": list(data.shape),
                      "offset": offset, "nbytes": data.nbytes})
        offset += data.nbytes
    head = json.dumps({**header, "arrays": table}, separators=(",", ":")).encode()
    digest = hashlib.sha256()

    def body(f) -> None:
        for chunk in (MAGIC, struct.pack("<Q", len(head)), head):
            f.write(chunk)
            digest.update(chunk)
        for data, _ in arrays.values():
            view = memoryview(np.ascontiguousarray(data)).cast("B")
            f.write(view)
            digest.update(view)
        f.write(digest.digest())

    _write_atomic(path, "wb", body)
    size = len(MAGIC) + 8 + len(head) + sum(np.asarray(d).nbytes for d, _ in arrays.values()) + _TRAILER
    return size, digest.hexdigest()


def read_entry(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, str]]]:
    """(header, name -> (array, mlx dtype name)); raises CorruptEntry on any damage."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptEntry(f"{path.name}: {exc}") from exc
    if len(data) < len(MAGIC) + 8 + _TRAILER or not data.startswith(MAGIC):
        raise CorruptEntry(f"{path.name}: not a checkpoint file, or truncated")
    body, trailer = data[:-_TRAILER], data[-_TRAILER:]
    if hashlib.sha256(body).digest() != trailer:
        raise CorruptEntry(f"{path.name}: checksum mismatch (truncated or altered)")
    (head_len,) = struct.unpack("<Q", body[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    try:
        header = json.loads(body[start : start + head_len])
        base = start + head_len
        arrays = {}
        if not isinstance(header, dict):
            raise TypeError("the header is not an object")
        for spec in header.pop("arrays"):
            raw = body[base + spec["offset"] : base + spec["offset"] + spec["nbytes"]]
            arrays[spec["name"]] = (np.frombuffer(raw, dtype=np.dtype(spec["np"])).reshape(spec["shape"]), spec["dtype"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CorruptEntry(f"{path.name}: bad header: {exc}") from exc
    return header, arrays


def read_header(path: Path, limit: int = 64 << 20) -> dict:
    """The JSON header alone, checksum not verified (`read_entry` verifies it when the entry is loaded).

    Cheap enough to run over every file when the index has to be rebuilt; raises
    CorruptEntry when the file does not even start like a checkpoint file.
    """
    try:
        with open(path, "rb") as f:
            start = f.read(len(MAGIC) + 8)
            if len(start) < len(MAGIC) + 8 or not start.startswith(MAGIC):
                raise CorruptEntry(f"{path.name}: not a checkpoint file, or truncated")
            (head_len,) = struct.unpack("<Q", start[len(MAGIC):])
            if head_len > limit:
                raise CorruptEntry(f"{path.name}: header of {head_len} bytes")
            head = f.read(head_len)
    except OSError as exc:
        raise CorruptEntry(f"{path.name}: {exc}") from exc
    try:
        header = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise CorruptEntry(f"{path.name}: bad header: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptEntry(f"{path.name}: bad header")
    header.pop("arrays", None)
    return header


def _write_atomic(path: Path, mode: str, body: Callable[[IO], None]) -> None:
    """Write through a temporary file in the same directory: fsync, rename over, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            body(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
