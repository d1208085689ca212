"""The disk tier's damage cases through the whole service: real processes, sockets and files.

A conversation is saved by a SIGTERM'd service, the tier is damaged, and the
restarted service must still restore the conversation from disk; a second
service on the same cache dir is refused at start-up; a worker whose writes fail
(a real RLIMIT_FSIZE, so EFBIG) frees their memory and counts them in /metrics.
"""

from __future__ import annotations

import random
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import openai

from tests.e2e.conftest import REPO, Server, free_port, launch, running_proxy, stop, wait_healthy
from tests.e2e.test_metrics_and_guards import scrape, total
from worker.disk_index import INDEX_FILE, token_bytes

SYSTEM = {"role": "system", "content": "You answer in one line. " * 30}


def chat(server: Server, model: str, messages: list[dict]) -> tuple[str, int, int]:
    """(reply, cached tokens, prompt tokens)."""
    client = openai.OpenAI(base_url=server.base_url, api_key="x")
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    usage = reply.usage
    return reply.choices[0].message.content, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens


def tier_dir(root: Path) -> Path:
    (only,) = [p for p in root.iterdir() if p.is_dir()]
    return only


def test_each_damage_to_the_tier_leaves_the_conversation_restorable_after_a_restart(tiny_model, log_dir, tmp_path):
    model, disk = str(tiny_model), tmp_path / "disk"
    outside = tmp_path / "precious.txt"  # <disk>/<fingerprint>/../../precious.txt
    outside.write_text("keep me")
    history = [SYSTEM, {"role": "user", "content": "Tell me about rivers. " * 20}]
    with running_proxy(tiny_model, log_dir, "--cache-dir", str(disk), name="disk-first") as server:
        reply, _, first_prompt = chat(server, model, history)
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And about lakes?"}]
    root = tier_dir(disk)
    intact = sorted(p.name for p in root.glob("*.ckpt"))

    def hostile_rows() -> None:
        with sqlite3.connect(root / INDEX_FILE) as db:
            for name in ("../../precious.txt", "../../../etc/passwd"):
                db.execute("INSERT INTO entries VALUES (?, '', ?, '[[2, \"prompt_end\", true]]', 7, '', 0)",
                           (name, token_bytes([1, 2])))  # fmt: skip

    def truncated() -> None:
        data = (root / INDEX_FILE).read_bytes()
        (root / INDEX_FILE).write_bytes(data[: len(data) // 3])

    def garbage() -> None:
        (root / INDEX_FILE).write_bytes(random.Random(7).randbytes(20000))

    for damage in (hostile_rows, truncated, garbage):
        damage()
        with running_proxy(tiny_model, log_dir, "--cache-dir", str(disk), name=f"disk-{damage.__name__}") as server:
            _, cached, _ = chat(server, model, history)
            log = server.log()
        assert cached >= first_prompt, (damage.__name__, log[-3000:])
        assert set(intact) <= {p.name for p in root.glob("*.ckpt")}  # no intact checkpoint was removed
        assert outside.read_text() == "keep me"
    (hostile_log,) = log_dir.glob("disk-hostile_rows-*.log")
    assert "ignoring a row naming '../../precious.txt'" in hostile_log.read_text()


def test_a_second_service_on_the_same_cache_dir_is_refused_with_a_clear_error(tiny_model, log_dir, tmp_path):
    disk = ["--cache-dir", str(tmp_path / "disk")]
    with running_proxy(tiny_model, log_dir, *disk, name="lock-first") as first:
        port = free_port()
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--model", str(tiny_model), "--port", str(port), *disk]
        second = launch(argv, port, log_dir / f"lock-second-{port}.log")
        try:
            code = second.process.wait(120)
        finally:
            stop(second)
        assert code != 0
        lines = [line for line in second.log().splitlines() if "in use by another worker" in line]
        assert lines, second.log()[-3000:]
        first_worker_pid = [w["pid"] for w in health(first)["workers"]][0]
        assert f"(pid {first_worker_pid})" in lines[-1] and "its own --cache-dir" in lines[-1]
        assert "Traceback" not in second.log()
        chat(first, str(tiny_model), [{"role": "user", "content": "still here?"}])  # the first one is untouched


def health(server: Server) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{server.root}/health", timeout=10) as response:
        return json.loads(response.read())


FILE_LIMIT = 96 * 1024  # below one checkpoint of these prompts, above the worker's log and the index


def limited_worker(model: Path, port: int, disk: Path, log_path: Path) -> Server:
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))

    argv = [sys.executable, "-m", "proxy.cli", "worker", "--model", str(model), "--endpoint",
            f"tcp://127.0.0.1:{port}", "--cache-dir", str(disk), "--cache-bytes", "200K",
            "--heartbeat-interval", "0.5"]  # fmt: skip
    log = open(log_path, "wb")
    process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               preexec_fn=limit_file_size)  # fmt: skip
    log.close()
    return Server(process, port, log_path)


def test_failed_writes_free_their_memory_leave_the_index_and_are_counted(tiny_model, log_dir, tmp_path):
    model, disk = str(tiny_model), tmp_path / "disk"
    worker_port, port = free_port(), free_port()
    worker = limited_worker(tiny_model, worker_port, disk, log_dir / f"fsize-worker-{worker_port}.log")
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--worker", f"{model}=tcp://127.0.0.1:{worker_port}",
            "--port", str(port)]  # fmt: skip
    server = launch(argv, port, log_dir / f"fsize-proxy-{port}.log")
    rng = random.Random(11)
    try:
        wait_healthy(server)
        figures = []
        for i in range(8):  # every request evicts the one before: one checkpoint write each
            text = " ".join(rng.choice(["river", "lake", "sea", "hill", "stone", "rain"]) for _ in range(300))
            chat(server, model, [SYSTEM, {"role": "user", "content": f"{i} {text}"}])
            time.sleep(0.6)  # a heartbeat's Stats after the writer is done
            samples = scrape(server)
            figures.append({name: total(samples, f"mlx_cache_proxy_{name}", model=model) for name in (
                "disk_write_failures_total", "disk_entries", "disk_pending_bytes", "mlx_active_memory_bytes",
                "pool_bytes")})
        print("\n" + "\n".join(str(f) for f in figures))
        assert figures[-1]["disk_write_failures_total"] >= 6
        # Nothing piles up in RAM for a disk that takes nothing: at most the write under way is
        # pending (the figures are a request behind: a worker sends Stats right after a Result).
        pending = [f["disk_pending_bytes"] for f in figures]
        assert max(pending) < 1.5 * min([p for p in pending if p > 0] or [1]), pending
        assert all(f["disk_entries"] <= 1 for f in figures)
        assert stop(server) == 0
    finally:
        stop(server)
        stop(worker)
    log = worker.log()
    assert "not written (EFBIG" in log and "dropped from memory and the index" in log
    assert "Traceback" not in log
    assert "disk tier: saved 0 of" in log  # the shutdown save failed too, and said so
    root = tier_dir(disk)
    assert not list(root.glob("*.ckpt")) and not list(root.glob(".tmp-*"))  # nothing half-written left
    with sqlite3.connect(root / INDEX_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone() == (0,)
