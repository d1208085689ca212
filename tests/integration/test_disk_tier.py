"""The disk tier with real tiny models: restarts, damaged files, kill -9, budget, fingerprints."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from protocol.messages import Generate, SamplingParams
from worker.disk_format import TEMP_PREFIX, read_entry
from worker.engine import EngineConfig, load_engine
from worker.fingerprint import model_fingerprint


def config(disk_dir: Path, **overrides) -> EngineConfig:
    return EngineConfig(checkpoint_interval=32, prefill_step=64, disk_dir=str(disk_dir), **overrides)


def run(engine, prompt, max_tokens=6):
    out: list[int] = []
    result = engine.generate(
        Generate("r", list(prompt), SamplingParams(max_tokens=max_tokens)),
        lambda m: out.extend(getattr(m, "tokens", [])),
        lambda: False,
    )
    return out, result.facts


def words(rng, k):
    return [rng.randrange(20, 900) for _ in range(k)]


@pytest.mark.parametrize("arch", ["qwen3_next", "gemma3_text", "llama"])
def test_a_restarted_engine_continues_from_disk_with_cold_run_tokens(tiny_model, tmp_path, arch):
    model = str(tiny_model(arch))
    rng = random.Random(0)
    first = load_engine(model, config(tmp_path))
    turn1 = words(rng, 120)
    reply, _ = run(first, turn1)
    first.close()

    second = load_engine(model, config(tmp_path))
    turn2 = turn1 + reply + words(rng, 20)
    tokens, facts = run(second, turn2)
    assert facts.restored_from_disk
    assert facts.cached_tokens >= len(turn1)
    cold_tokens, _ = run(load_engine(model, EngineConfig(cache_enabled=False, prefill_step=64)), turn2)
    assert tokens == cold_tokens
    assert second.pool_stats().disk.hits == 1


def _saved_files(disk_root: Path) -> list[Path]:
    return [p for p in disk_root.rglob("*.ckpt")]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_file_is_a_miss_with_a_warning(tiny_model, tmp_path, caplog, damage):
    model = str(tiny_model("qwen3_next"))
    rng = random.Random(1)
    first = load_engine(model, config(tmp_path))
    prompt = words(rng, 100)
    run(first, prompt)
    first.close()
    (path,) = _saved_files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))

    second = load_engine(model, config(tmp_path))
    longer = prompt + words(rng, 10)
    with caplog.at_level(logging.WARNING, logger="mlx_cache_proxy.worker"):
        tokens, facts = run(second, longer)
    assert not facts.restored_from_disk and facts.cached_tokens == 0
    assert any("disk checkpoint skipped" in r.getMessage() for r in caplog.records)
    assert not path.exists()  # removed, so it is not tried again
    cold_tokens, _ = run(load_engine(model, EngineConfig(cache_enabled=False, prefill_step=64)), longer)
    assert tokens == cold_tokens


def test_the_disk_budget_holds_and_evicted_sequences_are_written(tiny_model, tmp_path):
    model = str(tiny_model("qwen3_next"))
    rng = random.Random(2)
    budget = 600_000
    engine = load_engine(model, config(tmp_path, cache_bytes=300_000, disk_cache_bytes=budget))
    for _ in range(12):
        run(engine, words(rng, 90), max_tokens=2)
    engine.close()
    stats = engine.pool_stats().disk
    assert stats.written_bytes > budget  # more was written than kept
    assert stats.bytes <= budget
    assert sum(p.stat().st_size for p in _saved_files(tmp_path)) <= budget


def test_another_model_never_reads_these_files(tiny_model, tmp_path):
    from worker.tiny_models import make_model

    model = tiny_model("qwen3_next")
    other = make_model("qwen3_next", tmp_path / "other-seed", seed=1)
    other_template = make_model("qwen3_next", tmp_path / "other-template", seed=0, template="chatml-tools")
    fingerprints = {model_fingerprint(Path(p)) for p in (model, other, other_template)}
    assert len(fingerprints) == 3

    rng = random.Random(3)
    prompt = words(rng, 80)
    first = load_engine(str(model), config(tmp_path / "disk"))
    run(first, prompt)
    first.close()
    stranger = load_engine(str(other), config(tmp_path / "disk"))
    _, facts = run(stranger, prompt + [5])
    assert facts.cached_tokens == 0 and not facts.restored_from_disk


WRITER = textwrap.dedent(
    """
    import random, sys
    from protocol.messages import Generate, SamplingParams
    from worker.engine import EngineConfig, load_engine
    engine = load_engine(sys.argv[1], EngineConfig(checkpoint_interval=32, prefill_step=64,
                         disk_dir=sys.argv[2], cache_bytes=200_000))
    rng = random.Random(4)
    print("ready", flush=True)
    while True:  # every request evicts, every eviction writes
        prompt = [rng.randrange(20, 900) for _ in range(80)]
        engine.generate(Generate("w", prompt, SamplingParams(max_tokens=1)), lambda m: None, lambda: False)
    """
)


def test_kill_9_during_writes_leaves_nothing_that_loads_wrong(tiny_model, tmp_path):
    model = str(tiny_model("qwen3_next"))
    disk = tmp_path / "disk"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, model, str(disk)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while len(_saved_files(disk)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)

    # Every file that is there verifies; the next engine loads only verified entries.
    engine = load_engine(model, config(disk))
    engine.disk.lookup([1])  # reads the index, removes crash leftovers
    for path in _saved_files(disk):
        read_entry(path)  # raises if damaged
    (root,) = [p for p in disk.iterdir() if p.is_dir()]
    assert not [p for p in root.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert engine.disk.stats().entries >= 1
    # And what loads is right: each indexed entry restores and matches a cold run.
    cold = load_engine(model, EngineConfig(cache_enabled=False, prefill_step=64))
    for entry in list(engine.disk._entries.values())[:3]:
        prompt = entry.tokens + [7, 8]
        tokens, facts = run(engine, prompt)
        assert facts.restored_from_disk
        assert tokens == run(cold, prompt)[0]
