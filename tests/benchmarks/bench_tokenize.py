"""What the proxy's prompt path costs on hostile and on ordinary prompts: figures printed, nothing asserted.

    .venv/bin/python -m tests.benchmarks.bench_tokenize [--rounds 5] [--scale 1.0] [--json FILE]

On the tiny model's real tokenizer and chat template (`ChatTokenizer`, the path every chat
request takes), in one process, variants interleaved within each round, medians reported:

- hints: a long system message and 9 short turns, rendered cold (a new conversation: no piece
  or message end seen before) with and without message-end hints, at 0.5x, 1x and 2x the
  system message's size (1x: 2 MB) — the hints' cost should grow with the text, not with
  the text times the number of messages;
- marking: a 60K-token-sized ordinary conversation (no control tokens in it), warm (its pieces
  seen before, as on a conversation's next turn), against the same render with control-token
  marking switched off — what prompt integrity adds to a warm turn;
- refusal: a 15 MB message against a 32K-token context, refused before it is tokenized;
- fairness: a short prompt's latency while a long one tokenizes, with one tokenizer thread
  and with the proxy's TOKENIZER_THREADS (a `tokenizers` encode releases the GIL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from proxy.chat import ChatTokenizer
from proxy.control_tokens import ControlTokens
from proxy.errors import ContextLengthExceeded
from proxy.served_model import TOKENIZER_THREADS

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank. "


def _conversation(system_chars: int, turns: int = 9) -> list[dict[str, Any]]:
    system = (SENTENCE * 20 + "\n") * max(1, system_chars // (len(SENTENCE) * 20 + 1))
    roles = ["user", "assistant"]
    return [{"role": "system", "content": system}] + [
        {"role": roles[i % 2], "content": f"turn {i}: a short message"} for i in range(turns)
    ]


def _fresh(path: Path) -> ChatTokenizer:
    tok = ChatTokenizer.load(path)
    tok._verify_left = 0  # the check of the first prompts is a one-off cost, not the path measured
    return tok


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model: Path, rounds: int, scale: float) -> dict[str, Any]:
    results: dict[str, Any] = {}

    # hints: cold renders, with and without hints, three sizes
    hints = {}
    for factor in (0.5, 1.0, 2.0):
        messages = _conversation(int(2_000_000 * factor * scale))
        with_hints, without = [], []
        for r in range(rounds):
            order = [(8, with_hints), (0, without)] if r % 2 == 0 else [(0, without), (8, with_hints)]
            for max_hints, out in order:
                tok = _fresh(model)
                out.append(_timed(lambda: tok.render_chat(messages, max_hints=max_hints)))
        hints[factor] = {
            "chars": sum(len(m["content"]) for m in messages),
            "with_hints_s": statistics.median(with_hints),
            "without_s": statistics.median(without),
        }
    results["hints"] = hints

    # marking: a warm ordinary turn, with and without the control-token marking
    tok = _fresh(model)
    messages = _conversation(int(240_000 * scale), turns=40)
    tok.render_chat(messages)  # warm: pieces and message ends seen
    off = ControlTokens(())
    on = tok.control
    marked, unmarked = [], []
    for r in range(rounds * 4):
        for control, out in ((on, marked), (off, unmarked)) if r % 2 == 0 else ((off, unmarked), (on, marked)):
            tok.control = control
            out.append(_timed(lambda: tok.render_chat(messages)))
    tok.control = on
    results["marking"] = {
        "chars": sum(len(m["content"]) for m in messages),
        "marked_ms": statistics.median(marked) * 1e3,
        "unmarked_ms": statistics.median(unmarked) * 1e3,
    }

    # refusal of a 15 MB message
    huge = [{"role": "user", "content": "a b c d " * int(15 * 2**20 // 8 * scale)}]
    refusals = []
    for _ in range(rounds):
        start = time.perf_counter()
        try:
            tok.render_chat(huge, token_limit=max(1024, int(32768 * scale)))
        except ContextLengthExceeded:
            refusals.append(time.perf_counter() - start)
    results["refusal"] = {"chars": len(huge[0]["content"]), "refused_s": statistics.median(refusals)}

    # fairness: short prompts while a long one tokenizes
    long = _conversation(int(1_500_000 * scale), turns=1)
    short = [{"role": "user", "content": "hello there"}]
    fairness = {}
    for threads in (1, TOKENIZER_THREADS):
        latencies: list[float] = []
        for _ in range(rounds):
            tok = _fresh(model)
            tok.render_chat(short)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                started = threading.Event()
                big = pool.submit(lambda: (started.set(), tok.render_chat(long, max_hints=0)))
                started.wait()
                time.sleep(0.01)
                t0 = time.perf_counter()
                pool.submit(tok.render_chat, short).result()
                latencies.append(time.perf_counter() - t0)
                big.result()
        fairness[threads] = statistics.median(latencies)
    results["fairness_short_latency_s"] = fairness
    return results


def report(results: dict[str, Any]) -> None:
    print("message-end hints on a cold conversation (long system message + 9 short turns):")
    print("  system chars   with hints   without   hints add")
    for factor, row in results["hints"].items():
        added = row["with_hints_s"] - row["without_s"]
        print(f"  {row['chars']:>12,}   {row['with_hints_s']:9.3f} s  {row['without_s']:7.3f} s   {added * 1e3:7.1f} ms")
    m = results["marking"]
    print(f"control-token marking on a warm ordinary turn ({m['chars']:,} chars, 41 messages): "
          f"{m['marked_ms']:.2f} ms vs {m['unmarked_ms']:.2f} ms unmarked "
          f"(+{m['marked_ms'] - m['unmarked_ms']:.2f} ms)")  # fmt: skip
    r = results["refusal"]
    print(f"a {r['chars'] / 2**20:.1f} M-character message refused before tokenizing in {r['refused_s'] * 1e3:.1f} ms")
    f = results["fairness_short_latency_s"]
    print("a short prompt while a long one tokenizes: "
          + ", ".join(f"{n} thread(s) {s * 1e3:.1f} ms" for n, s in f.items()))  # fmt: skip


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="text sizes times this (smoke runs: 0.02)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from worker.tiny_models import make_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model("qwen3_next", Path(tmp) / "tiny", seed=0)
        results = measure(model, args.rounds, args.scale)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
