"""The sharded worker's turn exchange, on a one-rank group (the collectives are then identities)."""

from __future__ import annotations

import queue

import mlx.core as mx

from protocol.messages import Evict, Generate, SamplingParams, Shutdown
from worker.io_loop import RequestBook
from worker.sharded import Lockstep, Ranks, Turn, distributed_group


def _generate(rid: str) -> Generate:
    return Generate(rid, [1, 2, 3], SamplingParams(max_tokens=2), checkpoint_hints=[2], namespace="ns")


def test_a_turn_round_trips_its_commands_and_aborts():
    turn = Turn([_generate("a"), Evict(target_bytes=5 << 33), Shutdown()], ["b"])
    again = Turn.decode(turn.encode())
    assert again == turn
    assert Turn().encode() == b"" and Turn.decode(b"") == Turn()


def test_values_past_32_bits_are_agreed_exactly():
    ranks = Ranks(mx.distributed.init())
    assert ranks.gather(96 << 30) == [96 << 30]
    assert ranks.max(3) == 3 and ranks.min(123456789012) == 123456789012
    assert ranks.broadcast(b"\x00\xffabc", stop=True) == (b"\x00\xffabc", True)


def test_no_launcher_means_no_sharding(monkeypatch):
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_group() is None


def test_rank_zero_sends_no_request_aborted_while_queued_and_every_abort_so_far():
    inbox: queue.Queue = queue.Queue()
    book = RequestBook()
    for rid in ("kept", "dropped", "aborted"):
        book.enqueue(_generate(rid))
        inbox.put(_generate(rid))
    book.abort("dropped")  # answered by the IO thread while queued
    lockstep = Lockstep(Ranks(mx.distributed.init()), inbox, book)
    commands = lockstep.exchange(block=False, stop_requested=False, poll_s=0.01)
    assert [c.request_id for c in commands] == ["kept", "aborted"]
    book.abort("aborted")  # now running: its event is set
    assert lockstep.exchange(block=False, stop_requested=False, poll_s=0.01) == []
    assert lockstep.aborted == {"aborted"} and not lockstep.stopping
    lockstep.finished("aborted")
    lockstep.exchange(block=False, stop_requested=True, poll_s=0.01)
    assert lockstep.aborted == set() and lockstep.stopping


def test_the_two_mac_examples_parse():
    import json
    import plistlib
    from pathlib import Path

    sharded = Path(__file__).resolve().parents[2] / "deploy" / "sharded"
    plist = plistlib.loads((sharded / "com.mlx-cache-proxy.worker-rank.plist.example").read_bytes())
    assert plist["EnvironmentVariables"]["MLX_RANK"] == "0" and plist["ProgramArguments"][1] == "worker"
    assert [len(h["ips"]) for h in json.loads((sharded / "hostfile.json").read_text())["hosts"]] == [1, 1]
    assert len(json.loads((sharded / "ring-hosts.json").read_text())) == 2
