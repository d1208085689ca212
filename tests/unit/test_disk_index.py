"""The disk tier's names and SQLite index: hostile names, damaged files, round trips (no MLX)."""

import logging

import pytest

from worker.disk_index import DAMAGED_SUFFIX, INDEX_FILE, DiskEntry, DiskIndex, entry_name, is_entry_name


def entry(tokens, namespace="", **fields) -> DiskEntry:
    return DiskEntry(entry_name(namespace, tokens), namespace, tokens, {len(tokens): ("prompt_end", True)},
                     fields.get("nbytes", 100), "c0ffee", fields.get("last_used", 1.0))  # fmt: skip


def test_names_are_hex_digests_of_namespace_and_tokens():
    name = entry_name("", [1, 2, 3])
    assert is_entry_name(name) and len(name) == 32 + len(".ckpt")
    assert entry_name("ab", [1, 2, 3]) != name != entry_name("", [1, 2, 4])
    assert entry_name("a", [1, 2, 3]) == entry_name("a", [1, 2, 3])


@pytest.mark.parametrize("name", ["../../file", "/etc/passwd", "a/b.ckpt", "..", "", "x" * 32 + ".ckpt",
                                  "0" * 32 + ".ckpt/..", "0" * 31 + ".ckpt", "0" * 32 + ".CKPT", None, 7])
def test_anything_else_is_not_an_entry_name(name):
    assert not is_entry_name(name)


def test_rows_round_trip_and_a_row_for_a_foreign_name_is_dropped(tmp_path, caplog):
    index = DiskIndex(tmp_path)
    assert index.open() == []
    kept = entry([5, 6, 7], namespace="f" * 64, last_used=2.5)
    index.put(kept)
    index.put(entry([8, 9]))
    index.delete(entry([8, 9]).name)
    index._conn.execute("INSERT INTO entries VALUES ('../../file', '', x'', '[]', 1, '', 0)")
    index.put(DiskEntry(entry_name("", [1]), "", [2], {}, 1, "", 0))  # a name its tokens do not give
    index.close()
    again = DiskIndex(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert again.open() == [kept]
    assert "'../../file'" in caplog.text and not again.damaged
    rows = again._conn.execute("SELECT name FROM entries").fetchall()
    assert rows == [(kept.name,)]


@pytest.mark.parametrize("damage", [b"not a database" * 300, b"SQLite format 3\x00" + b"\xff" * 5000])
def test_a_damaged_index_is_moved_aside_and_a_new_one_works(tmp_path, damage):
    (tmp_path / INDEX_FILE).write_bytes(damage)
    (tmp_path / f"{INDEX_FILE}-wal").write_bytes(b"a stale log that must not be replayed")
    index = DiskIndex(tmp_path)
    assert index.open() == [] and index.damaged
    assert (tmp_path / f"{INDEX_FILE}{DAMAGED_SUFFIX}").read_bytes() == damage
    index.put(entry([1, 2]))
    index.close()
    assert DiskIndex(tmp_path).open() == [entry([1, 2])]
