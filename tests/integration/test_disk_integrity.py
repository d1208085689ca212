"""Disk tier integrity with a real tiny model: hostile index rows, damaged indexes, namespaces, the shutdown save.

Each damage case restarts the tier on the same directory and checks what a user
would notice: every intact checkpoint still restores (with cold-run tokens), and
nothing outside the tier's own files is read or removed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from tests.integration.test_disk_tier import config, run, words
from worker.disk_format import read_header
from worker.disk_index import INDEX_FILE, entry_name, is_entry_name, token_bytes
from worker.disk_lock import CacheDirLocked
from worker.disk_tier import DiskTier
from worker.engine import EngineConfig, load_engine
from worker.state_codec import SavedPoint

WARNINGS = "mlx_cache_proxy.worker"


def tier_dir(root: Path) -> Path:
    (only,) = [p for p in root.iterdir() if p.is_dir()]
    return only


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return str(tiny_model("qwen3_next"))


@pytest.fixture(scope="module")
def cold(model):
    return load_engine(model, EngineConfig(cache_enabled=False, prefill_step=64))


def saved_conversations(model: str, disk: Path, count: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts run and saved at shutdown; returns each prompt."""
    rng = random.Random(seed)
    engine = load_engine(model, config(disk))
    prompts = [words(rng, 70) for _ in range(count)]
    for prompt in prompts:
        run(engine, prompt)
    engine.close()
    return prompts


def assert_all_restore(engine, cold, prompts: list[list[int]]) -> None:
    for prompt in prompts:
        longer = prompt + [11, 12, 13]
        tokens, facts = run(engine, longer)
        assert facts.restored_from_disk and facts.cached_tokens >= len(prompt), facts
        assert tokens == run(cold, longer)[0]


# ------------------------------------------------------------------ names


class OpenedPaths:
    """Every path the process opens (an audit hook: nothing faked, nothing patched)."""

    active: list[str] | None = None

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.active is not None and event == "open" and args and isinstance(args[0], (str, Path)):
            cls.active.append(os.path.abspath(str(args[0])))


sys.addaudithook(OpenedPaths.hook)


def test_a_row_naming_a_path_outside_the_tier_is_ignored_never_read_nor_removed(model, cold, tmp_path, caplog):
    disk = tmp_path / "disk"
    prompts = saved_conversations(model, disk, 1)
    root = tier_dir(disk)
    outside = tmp_path / "precious.txt"  # root/../../precious.txt
    outside.write_text("not a checkpoint")
    linked = tmp_path / "linked.bin"
    linked.write_text("not a checkpoint either")
    (root / entry_name("", [1, 2, 3])).symlink_to(linked)  # our pattern, but pointing outside
    with sqlite3.connect(root / INDEX_FILE) as db:
        db.execute("INSERT INTO entries VALUES (?, '', ?, '[[3, \"prompt_end\", true]]', 10, '', 0)",
                   ("../../precious.txt", token_bytes([5, 6, 7])))  # fmt: skip
        db.execute("INSERT INTO entries VALUES (?, '', ?, '[[3, \"prompt_end\", true]]', 10, '', 0)",
                   ("/etc/hostname", token_bytes([5, 6, 8])))  # fmt: skip

    OpenedPaths.active = opened = []
    try:
        with caplog.at_level(logging.WARNING, logger=WARNINGS):
            engine = load_engine(model, config(disk))
            _, facts = run(engine, [5, 6, 7, 9])
            assert not facts.restored_from_disk
            assert_all_restore(engine, cold, prompts)
            engine.close()
    finally:
        OpenedPaths.active = None
    assert outside.read_text() == "not a checkpoint" and linked.read_text() == "not a checkpoint either"
    assert str(outside) not in opened and str(linked) not in opened and "/etc/hostname" not in opened
    assert (root / entry_name("", [1, 2, 3])).is_symlink()  # not ours to remove either
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'../../precious.txt'" in messages and "'/etc/hostname'" in messages
    with sqlite3.connect(root / INDEX_FILE) as db:
        names = {name for (name,) in db.execute("SELECT name FROM entries")}
    assert names and all(is_entry_name(name) for name in names)  # the hostile rows are gone


# ------------------------------------------------------------------ a damaged index


def damage_index(root: Path, how: str) -> None:
    path = root / INDEX_FILE
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped-pages":
        pages = bytearray(data)
        for i in range(4096, len(pages)):  # every page after the schema's: the rows and their key index
            pages[i] ^= 0x5A
        path.write_bytes(bytes(pages))
    elif how == "deleted":
        path.unlink()
    elif how == "old-json-index":
        path.unlink()
        (root / "index.json").write_text('{"version": 1, "entries": [{"name": "../../x"')


@pytest.mark.parametrize("how", ["truncate", "garbage", "empty", "flipped-pages", "deleted", "old-json-index"])
def test_a_damaged_index_leaves_every_intact_checkpoint_loadable(model, cold, tmp_path, caplog, how):
    disk = tmp_path / "disk"
    prompts = saved_conversations(model, disk, 3, seed=1)
    root = tier_dir(disk)
    files = sorted(p.name for p in root.glob("*.ckpt"))
    assert len(files) == 3
    damage_index(root, how)

    with caplog.at_level(logging.INFO, logger=WARNINGS):
        engine = load_engine(model, config(disk))
        engine.disk.lookup([1])  # reads the index
    assert sorted(p.name for p in root.glob("*.ckpt")) == files  # nothing was removed
    assert engine.disk.stats().entries == 3
    assert_all_restore(engine, cold, prompts)
    engine.close()
    if how in ("truncate", "garbage", "flipped-pages"):
        assert (root / f"{INDEX_FILE}.damaged").exists()  # kept aside, for a look
        assert any("damaged" in r.getMessage() for r in caplog.records)
    # The rebuilt index is used as is at the next start: nothing to read from headers again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=WARNINGS):
        again = load_engine(model, config(disk))
        again.disk.lookup([1])
    assert again.disk.stats().entries == len(list(root.glob("*.ckpt"))) > 3  # the restored turns were saved too
    assert not any("indexed again" in r.getMessage() for r in caplog.records)
    again.close()


def test_a_file_no_row_claims_is_indexed_again_and_a_damaged_header_goes_alone(model, cold, tmp_path):
    disk = tmp_path / "disk"
    prompts = saved_conversations(model, disk, 3, seed=2)
    root = tier_dir(disk)
    (root / INDEX_FILE).unlink()
    (victim,) = [p for p in root.glob("*.ckpt") if read_header(p)["tokens"][: len(prompts[0])] == prompts[0]]
    data = bytearray(victim.read_bytes())
    data[20:40] = b"\xff" * 20  # inside the JSON header
    victim.write_bytes(bytes(data))
    (root / ".tmp-leftover").write_bytes(b"half a write")

    engine = load_engine(model, config(disk))
    engine.disk.lookup([1])
    assert not victim.exists() and not (root / ".tmp-leftover").exists()
    assert engine.disk.stats().entries == 2 and engine.disk.stats().corrupt == 1
    assert_all_restore(engine, cold, prompts[1:])
    engine.close()


# ------------------------------------------------------------------ namespaces


def a_sequence(engine, tokens: list[int]) -> tuple[list, list[SavedPoint]]:
    """A real cache that has consumed `tokens`, and a restore point at its end."""
    cache = engine.model.make_cache()
    engine.model(mx.array([tokens]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache, [SavedPoint(len(tokens), "prompt_end", engine.ops.snapshot(cache, len(tokens)), None)]


def test_two_namespaces_never_see_each_others_entries_even_after_a_restart(model, tmp_path):
    engine = load_engine(model, EngineConfig(prefill_step=64))  # no disk tier of its own
    rng = random.Random(3)
    shared, only_a = words(rng, 40), words(rng, 40)
    cache, points = a_sequence(engine, shared)
    cache_a, points_a = a_sequence(engine, only_a)
    root = tmp_path / "tier"

    def check(tier: DiskTier) -> None:
        for ns in ("a" * 64, "b" * 64):
            hit = tier.lookup(shared + [1], namespace=ns)
            assert hit is not None and hit.entry.namespace == ns and tier.load(hit) is not None
        assert tier.lookup(only_a + [1], namespace="a" * 64) is not None
        assert tier.lookup(only_a + [1], namespace="b" * 64) is None
        assert tier.lookup(only_a + [1]) is None and tier.lookup(shared + [1]) is None  # "" saw nothing
        assert tier.lookup(shared + [1], namespace="c" * 64) is None

    tier = DiskTier(root, 1 << 30, engine.ops)
    tier.save(shared, cache, points, namespace="a" * 64)
    tier.save(shared, cache, points, namespace="b" * 64)
    tier.save(only_a, cache_a, points_a, namespace="a" * 64)
    check(tier)  # from memory, written or not
    tier.close()
    assert len(list(root.glob("*.ckpt"))) == 3  # the same tokens in two namespaces are two files
    restarted = DiskTier(root, 1 << 30, engine.ops)
    check(restarted)  # from the index
    restarted.close()
    (root / INDEX_FILE).unlink()
    rebuilt = DiskTier(root, 1 << 30, engine.ops)
    check(rebuilt)  # from the files' headers
    rebuilt.close()


# ------------------------------------------------------------------ the lock


def test_a_second_tier_on_the_same_directory_is_refused_until_the_first_closes(model, tmp_path):
    engine = load_engine(model, EngineConfig(prefill_step=64))
    first = DiskTier(tmp_path / "tier", 1 << 30, engine.ops)
    with pytest.raises(CacheDirLocked, match=rf"in use by another worker \(pid {os.getpid()}\)"):
        DiskTier(tmp_path / "tier", 1 << 30, engine.ops)
    first.close()
    DiskTier(tmp_path / "tier", 1 << 30, engine.ops).close()


# ------------------------------------------------------------------ the shutdown save


class Counted:
    """fsyncs and SQL statements of one tier's writes."""

    def __init__(self, monkeypatch, tier: DiskTier):
        self.fsyncs = self.statements = 0
        real = os.fsync

        def fsync(fd):
            self.fsyncs += 1
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        tier._index._conn.set_trace_callback(lambda _sql: self._statement())

    def _statement(self) -> None:
        self.statements += 1


def save_many(engine, root: Path, n: int, monkeypatch) -> tuple[float, Counted, DiskTier]:
    rng = random.Random(n)
    base = words(rng, 48)
    cache, points = a_sequence(engine, base)
    tier = DiskTier(root, 1 << 34, engine.ops)
    tier.lookup([1])  # opens the index
    with monkeypatch.context() as patch:
        counted = Counted(patch, tier)
        start = time.perf_counter()
        for i in range(n):
            tier.save(base[:-1] + [1000 + i], cache, points)  # n different names, the same arrays
        tier.close()
        return time.perf_counter() - start, counted, tier


def test_the_shutdown_save_is_linear_in_entries(model, tmp_path, monkeypatch):
    engine = load_engine(model, EngineConfig(prefill_step=64))
    n = 40
    t1, c1, tier1 = save_many(engine, tmp_path / "n", n, monkeypatch)
    t2, c2, tier2 = save_many(engine, tmp_path / "2n", 2 * n, monkeypatch)
    # One file (its fsync, the directory's) and one row a sequence: nothing grows with the index.
    assert c1.fsyncs == 2 * n and c2.fsyncs == 4 * n
    assert c1.statements == n and c2.statements == 2 * n
    assert tier2.progress().written == 2 * n and tier2.stats().pending_bytes == 0
    print(f"\nshutdown save: {n} entries {t1:.2f}s, {2 * n} entries {t2:.2f}s "
          f"({tier2.written_bytes / 1e6:.1f} MB)")  # fmt: skip
    assert t2 < 2.0 * t1 * 1.6 + 0.5  # linear, with this shared machine's noise


def test_the_shutdown_save_stops_at_its_deadline_and_says_what_it_saved(model, cold, tmp_path, caplog):
    disk = tmp_path / "disk"
    rng = random.Random(5)
    engine = load_engine(model, config(disk))
    prompts = [words(rng, 60) for _ in range(4)]
    for prompt in prompts:
        run(engine, prompt, max_tokens=1)
    with caplog.at_level(logging.INFO, logger=WARNINGS):
        engine.close(timeout_s=0.0)
    line = next(r.getMessage() for r in caplog.records if "disk tier: saved" in r.getMessage())
    assert line.startswith("disk tier: saved 0 of 4 sequences") and "4 at the deadline" in line
    assert engine.disk.stats().pending_bytes == 0

    again = load_engine(model, config(disk))
    for prompt in prompts:
        run(again, prompt, max_tokens=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=WARNINGS):
        again.close(timeout_s=60.0)
    line = next(r.getMessage() for r in caplog.records if "disk tier: saved" in r.getMessage())
    assert line.startswith("disk tier: saved 4 of 4 sequences") and "0 at the deadline, 0 failed" in line
    third = load_engine(model, config(disk))
    assert_all_restore(third, cold, prompts)
    third.close()


# ------------------------------------------------------------------ hostile entries in the directory


def test_links_named_like_the_lock_or_the_index_are_never_followed(model, cold, tmp_path):
    from worker.disk_lock import LOCK_FILE

    prompts = saved_conversations(model, tmp_path / "disk", 2)
    tier = tier_dir(tmp_path / "disk")
    victims = {}
    for name in (LOCK_FILE, INDEX_FILE, f"{INDEX_FILE}-wal"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious\n")
        (tier / name).unlink(missing_ok=True)
        (tier / name).symlink_to(victim)
        victims[name] = victim
    engine = load_engine(model, config(tmp_path / "disk"))
    assert_all_restore(engine, cold, prompts)  # rebuilt from the files' headers
    engine.close()
    for victim in victims.values():
        assert victim.read_text() == "precious\n"


def test_odd_entries_and_hostile_headers_cost_only_themselves(model, cold, tmp_path):
    from worker.disk_format import MAGIC
    import struct

    prompts = saved_conversations(model, tmp_path / "disk", 2)
    tier = tier_dir(tmp_path / "disk")
    (tier / ".tmp-a-directory").mkdir()  # where a temp file would be
    for i, header in enumerate((b"[" * 100_000, b"[1, 2, 3]", b'"a string"')):
        name = entry_name("", [900 + i])
        (tier / name).write_bytes(MAGIC + struct.pack("<Q", len(header)) + header + b"\0" * 64)
    (tier / INDEX_FILE).unlink()  # every file is read through its header
    engine = load_engine(model, config(tmp_path / "disk"))
    assert_all_restore(engine, cold, prompts)
    engine.close()
    assert (tier / ".tmp-a-directory").is_dir()
    assert not any((tier / entry_name("", [900 + i])).exists() for i in range(3))  # unreadable: removed


def test_a_row_that_promises_a_point_its_file_lacks_is_replaced_from_the_header(model, cold, tmp_path):
    import numpy as np

    prompts = saved_conversations(model, tmp_path / "disk", 1)
    tier = tier_dir(tmp_path / "disk")
    with sqlite3.connect(tier / INDEX_FILE) as db:
        (name, raw, points), = db.execute("SELECT name, tokens, points FROM entries").fetchall()
        stored = [int(t) for t in np.frombuffer(raw, dtype="<i8")]
        real = {p for p, _, _ in json.loads(points)}
        stale_at = len(stored) - 1  # on the stored path, deeper than the prompt end, not in the file
        assert stale_at not in real and stale_at > len(prompts[0])
        stale = json.loads(points) + [[stale_at, "hint", False]]
        db.execute("UPDATE entries SET points = ? WHERE name = ?", (json.dumps(stale), name))
    engine = load_engine(model, config(tmp_path / "disk"))
    follow_up = stored[:stale_at] + [11, 12]
    _, facts = run(engine, follow_up)
    assert not facts.restored_from_disk  # the promised point is not in the file: a miss
    engine.pool.clear()  # what that request stored in memory must not serve the next one
    tokens, facts = run(engine, follow_up)
    assert facts.restored_from_disk and facts.cached_tokens >= len(prompts[0]), facts  # the header's points
    assert tokens == run(cold, follow_up)[0]
    engine.close()
