"""The benchmarks' workload scripts, oracle and bookkeeping on fake data: pure logic, no model, no server;
and one short run of bench_batching through real servers (slow), so that it stays runnable."""

from __future__ import annotations

import pytest

from tests.benchmarks import workloads as wl


class FakeTokenizer:
    """One id per whitespace-separated word; a ChatML-like template that, like
    chatml-drop-reasoning, renders an assistant's reasoning only after the last user query."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=False, tokenize=True):
        last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        parts = ["<tools> " + " ".join(t["function"]["name"] for t in tools) + " </tools>"] if tools else []
        for i, m in enumerate(messages):
            content, reasoning = m["content"], m.get("reasoning_content", "")
            if "</think>" in content:
                reasoning, content = content.split("</think>")[0].replace("<think>", ""), content.split("</think>")[-1]
            if m["role"] == "assistant" and reasoning and i > last_query:
                content = f"<think> {reasoning} </think> {content}"
            calls = " ".join(f"<call> {c['function']['name']}" for c in m.get("tool_calls") or [])
            parts.append(f"<s> {m['role']} {content} {calls} </s>")
        if add_generation_prompt:
            parts.append("<s> assistant")
        return self.ids(" ".join(parts))


def label_replier(step: wl.Step):
    """A reply that depends on the step only, so the same step gets the same reply in any order."""
    return wl.Reply(f"reply to {step.label.split(':')[-1]} ok"), None


def run(script) -> list[wl.Turn]:
    return wl.replay(script, wl.ChatRenderer(FakeTokenizer()), label_replier)


SMALL = wl.SIZES["small"]


# ------------------------------------------------------------------ the oracle itself


def test_oracle_on_raw_token_lists():
    prompts = [[1, 2, 3], [1, 2, 3], [1, 2, 9, 5, 6], [7]]
    histories = [[1, 2, 3, 9], [1, 2, 3, 4], [1, 2, 9, 5, 6, 8], [7, 1]]
    # exact repeat: capped at len - 1; earlier output counts: [1,2,3,9] shares only [1,2] with [1,2,9,...]
    assert wl.oracle_cached(prompts, histories) == [0, 2, 2, 0]
    assert wl.oracle_cached([[1, 2], [1, 2, 9, 5]], [[1, 2, 9], [1, 2, 9, 5, 0]]) == [0, 3]


def test_distinct_tokens_counts_shared_prefixes_once():
    assert wl.distinct_tokens([[1, 2, 3], [1, 2, 4], [1, 2]]) == (4, 2)
    assert wl.distinct_tokens([]) == (0, 0)


def test_history_appends_only_the_rendered_reply():
    renderer = wl.ChatRenderer(FakeTokenizer())
    step = wl.Step([{"role": "user", "content": "hello there"}], "x")
    prompt = renderer.prompt(step)
    history = renderer.history(step, prompt, wl.Reply("fine thanks"))
    assert history[: len(prompt)] == prompt
    assert len(history) == len(prompt) + 3  # "fine thanks </s>"


# ------------------------------------------------------------------ workloads


def test_exact_repeat_oracle_is_prompt_minus_one():
    turns = run(wl.repeat(SMALL))
    assert len(turns) == SMALL.repeats
    assert turns[0].oracle == 0
    assert all(t.oracle == len(t.prompt) - 1 for t in turns[1:])


def test_chat_oracle_is_the_whole_previous_turn():
    turns = run(wl.chat(SMALL))
    assert len(turns) == SMALL.chat_turns
    for before, turn in zip(turns, turns[1:]):
        assert turn.prompt[: len(before.history)] == before.history
        assert turn.oracle == len(before.history)


@pytest.mark.parametrize("n_agents", [2, 4, 8])
def test_agents_oracle_is_each_agents_own_history(n_agents):
    turns = run(wl.agents(SMALL, n_agents))
    assert len(turns) == n_agents * SMALL.agent_rounds
    by_label = {t.label: t for t in turns}
    system_tokens = len(turns[0].prompt) - len(FakeTokenizer().ids(turns[0].label))  # rough floor
    for agent in range(n_agents):
        first = by_label[f"agent{agent}.round0"]
        if agent:
            # the shared system prompt (and the user header) from another agent, not this agent's text
            assert system_tokens // 2 < first.oracle < len(first.prompt) - 1
        for rnd in range(1, SMALL.agent_rounds):
            own_before = by_label[f"agent{agent}.round{rnd - 1}"]
            assert by_label[f"agent{agent}.round{rnd}"].oracle == len(own_before.history)


def test_document_oracle_stops_at_the_question():
    turns = run(wl.document(SMALL))
    tok = FakeTokenizer()
    assert len(turns) == SMALL.questions
    first = turns[0]
    doc_end = len(tok.apply_chat_template(
        [{"role": "system", "content": "Answer from the document only."}, {"role": "user", "content": ""}]
    )) - 1  # without "</s>"
    for turn in turns[1:]:
        assert turn.oracle >= doc_end + SMALL.doc_words // 2  # the document, a word being a token here
        assert turn.oracle == wl.common_prefix(turn.prompt, first.prompt)
        assert turn.oracle < len(turn.prompt) - 5


def test_edit_oracle_stops_at_the_edit():
    turns = run(wl.edit(SMALL))
    by_label = {t.label: t for t in turns}
    mid, last = by_label["edit-mid"], by_label["edit-last"]
    original_mid = by_label[f"turn{SMALL.edit_turns // 2}"]
    original_last = by_label[f"turn{SMALL.edit_turns - 1}"]
    assert mid.oracle == wl.common_prefix(mid.prompt, original_mid.prompt)
    # the edit sits in the middle of the message, not at its start or end
    assert len(original_mid.prompt) - 3 - SMALL.chat_user_words < mid.oracle < len(original_mid.prompt) - 5
    assert last.oracle == wl.common_prefix(last.prompt, original_last.prompt) < len(last.prompt) - 5


def test_reasoning_oracle_drops_back_to_the_previous_query_prompt():
    turns = run(wl.reasoning(SMALL))
    by_label = {t.label: t for t in turns}
    assert len(turns) == 2 * SMALL.reasoning_queries
    for q in range(SMALL.reasoning_queries):
        call, answer = by_label[f"query{q}.call"], by_label[f"query{q}.answer"]
        # within a query the reasoning is still rendered: the answer continues the call's history
        assert answer.oracle == len(call.history)
        if q:
            # the next query's prompt no longer holds the reasoning: it leaves the stored history
            # right after the previous query's generation prompt
            previous = by_label[f"query{q - 1}.call"]
            assert call.oracle == len(previous.prompt)
            assert call.prompt[: len(previous.prompt)] == previous.prompt


def test_mix_interleaves_every_script_and_keeps_their_oracles():
    turns = run(wl.mix(SMALL))
    names = [t.label.split(":")[0] for t in turns]
    assert names[:6] == ["chat", "repeat", "agents4", "document", "edit", "reasoning"]
    alone = {
        "chat": run(wl.chat(SMALL, 101, turns=max(2, SMALL.chat_turns // 2))),
        "agents4": run(wl.agents(SMALL, 4, 103, rounds=2)),
        "edit": run(wl.edit(SMALL, 105, turns=max(2, SMALL.edit_turns // 2))),
    }
    for name, own in alone.items():
        mixed = [t for t in turns if t.label.startswith(name + ":")]
        assert [t.label.split(":", 1)[1] for t in mixed] == [t.label for t in own]
        # other scripts can only add the few chat-markup tokens every prompt starts with
        for m, o in zip(mixed, own):
            assert o.oracle <= m.oracle <= max(o.oracle, 3)


def recorded(script) -> tuple[list[wl.Turn], dict[str, wl.Step]]:
    """The script replayed with workloads.fake_replier, and each step by its label."""
    steps: dict[str, wl.Step] = {}
    reply = wl.fake_replier()

    def replier(step: wl.Step):
        steps[step.label] = step
        return reply(step)

    return wl.replay(script, wl.ChatRenderer(FakeTokenizer()), replier), steps


def test_paragraphs_and_replace_words_keep_the_layout():
    prose = wl.Prose(0)
    text = prose.paragraphs(400)
    assert len(text.split()) == 400 and "\n\n" in text and "\n" in text.replace("\n\n", "")
    assert all(p.endswith(".") for p in text.split("\n\n"))
    edited, first = wl.replace_words(text, 0.8, prose)
    assert first == 320
    old, new = text.split(), edited.split()
    changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    assert len(new) == 400 and 1 <= len(changed) and first <= min(changed) and max(changed) < first + 6
    # the whitespace (line and paragraph breaks) is untouched
    assert [c for c in edited if c.isspace()] == [c for c in text if c.isspace()]


@pytest.mark.parametrize("size", sorted(wl.SIZES))
def test_edit_long_oracle_stops_at_each_edit(size):
    size = wl.SIZES[size]
    turns, steps = recorded(wl.edit_long(size))
    n = size.edit_long_conversations
    assert [t.label for t in turns] == [f"conv{i}:{s}" for s in ("original", "edit1", "edit2") for i in range(n)]
    by_label = {t.label: t for t in turns}
    positions = []
    for i in range(n):
        original, edit1, edit2 = (by_label[f"conv{i}:{s}"] for s in ("original", "edit1", "edit2"))
        assert original.oracle <= 3  # other conversations share only the chat markup
        message = steps[f"conv{i}:original"].messages[-1]["content"]
        words = len(message.split())
        assert size.edit_long_words[0] <= words <= size.edit_long_words[1]
        assert all(len(s.messages) == 2 for s in (steps[f"conv{i}:edit1"], steps[f"conv{i}:edit2"]))
        # system + edited message: the prefix is shared up to the edit, 5%-40% of the words before the end
        assert edit1.oracle == wl.common_prefix(edit1.prompt, original.prompt)
        end = len(original.prompt) - 3  # the message's last word: "</s> <s> assistant" follow it
        assert 0.05 * words - 1 <= end - edit1.oracle <= 0.40 * words + 2
        assert edit2.oracle == max(wl.common_prefix(edit2.prompt, edit1.prompt),
                                   wl.common_prefix(edit2.prompt, original.prompt))
        assert edit2.oracle < len(edit2.prompt) - 5 and edit2.oracle > len(edit2.prompt) // 20
        assert edit2.oracle != edit1.oracle  # further back or forward
        positions.append(end - edit1.oracle)
    assert len(set(positions)) == n  # the edit point varies per conversation


@pytest.mark.parametrize("size", sorted(wl.SIZES))
def test_doc_reask_oracle_is_the_document(size):
    size = wl.SIZES[size]
    turns, steps = recorded(wl.doc_reask(size))
    q = size.doc_reask_questions
    assert [t.label for t in turns] == [f"doc{d}:question{i}" for i in range(q) for d in range(2)]
    by_label = {t.label: t for t in turns}
    for d in range(2):
        first = by_label[f"doc{d}:question0"]
        content = steps[f"doc{d}:question0"].messages[-1]["content"]
        doc, question = content.rsplit("\n\n", 1)
        assert "\n\n" in doc and question.endswith("?")
        assert size.doc_reask_words[0] <= len(doc.split()) <= size.doc_reask_words[1]
        assert first.oracle <= len(first.prompt) // 50  # the system prompt at most, if another doc came first
        for i in range(1, q):
            turn = by_label[f"doc{d}:question{i}"]
            assert steps[f"doc{d}:question{i}"].messages[-1]["content"].startswith(doc + "\n\n")
            assert turn.oracle == wl.common_prefix(turn.prompt, first.prompt)
            assert len(doc.split()) <= turn.oracle < len(turn.prompt) - 5


@pytest.mark.parametrize("target", [300, 2048, 5000])
def test_warm_ttft_conversations_fit_their_length(target):
    from tests.benchmarks.bench_warm_ttft import fitted_conversation

    tok = FakeTokenizer()

    def render(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True)

    messages = fitted_conversation(render, wl.Prose(target), target, system_words=40, turn_words=60)
    assert target - 1 <= len(render(messages)) <= target  # one id per word: exact but for the last word's cut
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * ((len(messages) - 2) // 2) + ["user"]


def test_mix_runs_at_four_budgets():
    budgets = {w.name: w.budget_fraction for w in wl.WORKLOADS if w.script is wl.mix}
    assert budgets == {"mix-0.25x": 0.25, "mix": 0.5, "mix-1x": 1.0, "mix-2x": 2.0}


@pytest.mark.parametrize("size", sorted(wl.SIZES))
@pytest.mark.parametrize("workload", wl.WORKLOADS, ids=lambda w: w.name)
def test_every_workload_replays(size, workload):
    turns = run(workload.script(wl.SIZES[size]))
    assert turns
    for turn in turns:
        assert 0 <= turn.oracle <= len(turn.prompt) - 1
        assert turn.history[: len(turn.prompt)] == turn.prompt


# ------------------------------------------------------------------ the benchmark's own bookkeeping


def test_log_lines_the_benchmark_reads():
    from tests.benchmarks import bench_vs_upstream as bench

    shim_line = "2026-11-22 04:24:02,520 - INFO - Prompt Cache exact: 3 sequences, 1287936 bytes"
    stock_line = "2026-11-22 04:24:02,520 - INFO - Prompt Cache: 3 sequences, 0.00 GB"
    assert bench.UPSTREAM_BYTES.findall(shim_line) == [("3", "1287936")]
    assert bench.UPSTREAM_GB.findall(stock_line) == [("3", "0.00")]
    worker = ("2026-11-22 04:36:08,023 worker[20000] INFO request chatcmpl-14: length; prompt 210, cached 136, "
              "recomputed 74, generated 12; restored to 136 (prompt_end); restore 0.000s, prefill 0.014s, "
              "ttft 0.016s, decode 0.021s, total 0.037s")
    proxy = ("2026-11-22 04:36:08,024 INFO mlx_cache_proxy: request chatcmpl-14 model=default_model status=ok "
             "prompt=210 cached=136 recomputed=74 generated=12 restore=136/prompt_end queue=0ms ttft=18ms total=39ms")
    assert bench.WORKER_LOG_TOTAL.findall(worker) == [("chatcmpl-14", "0.037")]
    assert bench.PROXY_LOG_TOTAL.findall(proxy) == [("chatcmpl-14", "39")]


def test_targets_name_every_miss():
    from tests.benchmarks.bench_vs_upstream import PROXY, UPSTREAM, Row, check_targets

    ours = Row("chat", "llama", PROXY, prompt_tokens=100, cached_tokens=80, oracle_tokens=90, prefill_tokens=20,
               cache_bytes=2000)
    theirs = Row("chat", "llama", UPSTREAM, prompt_tokens=100, cached_tokens=85, oracle_tokens=90, prefill_tokens=15,
                 cache_bytes=1000)
    speeds = {"llama": {"in_process": {"decode_tps_best": 100.0}, PROXY: {"decode_tps_best": 90.0}}}
    misses = check_targets([ours, theirs], speeds)
    assert len(misses) == 5  # < 95% of oracle, cached, prefill, bytes, decode
    good = Row("chat", "llama", PROXY, prompt_tokens=100, cached_tokens=89, oracle_tokens=90, prefill_tokens=11,
               cache_bytes=900)
    assert check_targets([good, theirs], {"llama": {"in_process": {"decode_tps_best": 100.0},
                                                    PROXY: {"decode_tps_best": 96.0}}}) == []


def test_batching_ratios_pair_rounds_and_checks_name_every_miss():
    from tests.benchmarks.bench_batching import CHAT, PROXY, PROXY_MB1, SHARED, UPSTREAM, Row, check_targets, ratios_of

    def row(workload, n, server, round_, wall, cached, decode=100.0):
        return Row("llama", workload, n, server, round_, wall_s=wall, cached_tokens=cached, decode_tok_s=decode)

    rows = [
        # N=4: round 0 meets every target, round 1 is slower on both proxies; ratios come from same-round pairs
        row(CHAT, 4, PROXY, 0, 1.0, 100), row(CHAT, 4, PROXY_MB1, 0, 4.0, 100), row(CHAT, 4, UPSTREAM, 0, 2.0, 90),
        row(CHAT, 4, PROXY, 1, 3.0, 100), row(CHAT, 4, PROXY_MB1, 1, 6.0, 100), row(CHAT, 4, UPSTREAM, 1, 2.0, 90),
        row(CHAT, 4, PROXY, 2, 2.0, 99), row(CHAT, 4, PROXY_MB1, 2, 5.0, 100), row(CHAT, 4, UPSTREAM, 2, 2.0, 90),
        row(CHAT, 1, PROXY, 0, 1.0, 0, decode=90.0), row(CHAT, 1, PROXY_MB1, 0, 1.0, 0, decode=100.0),
        row(SHARED, 4, PROXY, 0, 2.0, 500), row(SHARED, 4, PROXY_MB1, 0, 2.0, 500),
    ]
    ratios = ratios_of(rows)
    four = ratios[("llama", CHAT, 4)]
    assert four["wall_vs_mb1"].median == pytest.approx(0.4) and four["wall_vs_mb1"].high == 0.5
    assert four["wall_vs_upstream"].median == 1.0 and four["wall_vs_upstream"].low == 0.5
    assert four["cached_vs_mb1"].low == pytest.approx(0.99)
    assert "decode_vs_mb1" not in four and ratios[("llama", CHAT, 1)]["cached_vs_mb1"] is None
    missed = {(c.where, c.ratio) for c in check_targets(ratios) if c.met is False}
    assert missed == {
        ("llama/chat/N=4", "cached proxy/max-batch-1"),  # judged on every round
        ("llama/chat/N=1", "decode tok/s proxy/max-batch-1"),
        ("llama/shared/N=4", "wall proxy/max-batch-1"),  # must beat, not equal
    }


@pytest.mark.slow
def test_bench_batching_runs(tmp_path):
    """Both proxies, one arch, two clients, one round, a few tokens: every request answered, second turns cached."""
    import json

    from tests.benchmarks import bench_batching

    out = tmp_path / "batching.json"
    assert bench_batching.main([
        "--archs", "llama", "--rounds", "1", "--ns", "2", "--shared-agents", "2", "--turns", "2",
        "--max-tokens", "4", "--system-words", "30", "--shared-words", "60", "--servers", "proxy,proxy-mb1",
        "--json", str(out),
    ]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["workload"], r["server"]) for r in rows} == {
        (w, s) for w in ("chat", "shared") for s in ("proxy", "proxy-mb1")}
    for r in rows:
        assert r["error"] is None
        assert r["requests"] == 4 and r["completion_tokens"] > 0 and r["wall_s"] > 0
        assert r["cached_tokens"] > 0 and r["cpu_s"] > 0
    assert {(c["where"], c["ratio"]) for c in data["checks"]} >= {("llama/shared/N=2", "cached proxy/max-batch-1")}


# ------------------------------------------------------------------ real-model arithmetic


def test_model_arithmetic_agrees_with_itself(tmp_path):
    """The config arithmetic runs, and its figures are consistent: hybrids snapshot something, Mamba-2 has no KV."""
    import json

    from tests.benchmarks import model_arithmetic as ma

    defaults, rows = ma.compute()
    by_arch = {r.arch: r for r in rows}
    assert len(by_arch) == len(ma.MODELS)
    for spec, r in zip(ma.MODELS, rows):
        assert r.layers_full + r.layers_sliding + r.layers_recurrent == spec.config["num_hidden_layers"]
        assert r.snapshot_bytes > 0 and r.snapshot_bytes_mid_prefill >= r.snapshot_bytes
        assert 0 < r.weight_bytes_4bit < r.params  # under a byte a parameter
        for c in (r.conversation_60k, r.agent_8k):
            assert c.snapshots == c.lattice + c.extra + 1 <= c.snapshot_cap
            assert c.extra <= c.extra_budget and 0 < c.lattice <= defaults.max_lattice_points
            assert c.lattice_stride % defaults.checkpoint_interval == 0
            assert c.kv_bytes == r.kv_bytes_per_1k * c.tokens // ma.K
            assert c.snapshot_bytes_nominal <= c.snapshot_bytes
            assert c.total_bytes == c.kv_bytes + c.live_state_bytes + c.snapshot_bytes + c.logits_bytes
    mamba = by_arch["mamba2"]
    assert mamba.kv_bytes_per_1k == 0 and mamba.snapshot_tokens_of_kv is None
    assert mamba.layers_recurrent == mamba.layers_full + mamba.layers_sliding + mamba.layers_recurrent
    for arch in ("qwen3_next", "qwen3_5", "qwen3_5_moe", "gemma3_text", "gpt_oss"):
        assert by_arch[arch].kv_bytes_per_1k > 0 and by_arch[arch].snapshot_tokens_of_kv > 0
    # a window's buffer outgrows its size only mid-prefill; recurrent states do not change size
    assert by_arch["qwen3_next"].snapshot_bytes_mid_prefill == by_arch["qwen3_next"].snapshot_bytes
    assert by_arch["gemma3_text"].snapshot_bytes_mid_prefill > by_arch["gemma3_text"].snapshot_bytes

    out = tmp_path / "arithmetic.json"
    assert ma.main(["--json", str(out)]) == 0
    assert [m["name"] for m in json.loads(out.read_text())["models"]] == [r.name for r in rows]


# ------------------------------------------------------------------ the HTTP edge's per-request checks


def test_bench_edge_times_the_key_check_and_the_namespace(tmp_path):
    import json

    from tests.benchmarks import bench_edge

    out = tmp_path / "edge.json"
    assert bench_edge.main(["--rounds", "2", "--iterations", "200", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert data["auth_plus_namespace_added_us"] > 0
    assert rows["auth, 1 key"]["added_us"] is not None and rows["namespace, salt"]["us_per_request"] > 0


def test_bench_tokenize_runs_small(tmp_path):
    import json

    from tests.benchmarks import bench_tokenize

    out = tmp_path / "tokenize.json"
    assert bench_tokenize.main(["--rounds", "1", "--scale", "0.02", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["hints"]) == 3 and all(row["with_hints_s"] > 0 for row in data["hints"].values())
    assert data["refusal"]["refused_s"] > 0 and data["marking"]["marked_ms"] > 0


def test_bench_grammar_runs_small(tmp_path):
    import json

    from tests.benchmarks import bench_grammar

    out = tmp_path / "grammar.json"
    assert bench_grammar.main(["--rounds", "2", "--tokens", "16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["plain_ms"] > 0 and data["grammar_ms"] > 0 and data["mask_ms"] > 0


def test_bench_routing_runs_small():
    from tests.benchmarks import bench_routing

    figures = bench_routing.run(replicas=4, sequences=8, tokens=1024, requests=50)
    assert figures["replicas"] == 4 and figures["blocks_held"] > 0
    assert sum(figures["decisions"].values()) == 50
    assert figures["total_ms_median"] > 0
