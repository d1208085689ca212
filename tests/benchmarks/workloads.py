"""Workloads for bench_vs_upstream, and the oracle they are scored against.

Pure Python (no MLX, no server): a workload is a *script*, a generator that
yields the next request (`Step`) and is sent the server's `Reply`, so it can
build the next turn from what came back. `replay` drives a script against any
`replier` (a server, or a fake in the smoke test) and a `ChatRenderer` (the
model's chat template through its tokenizer, or a fake one), and returns one
`Turn` per request with the token ids the oracle needs.

The oracle, for request i: the longest common prefix of its prompt with any
earlier request's prompt + output tokens, capped at len(prompt) - 1 (one token
must be computed to get logits); `oracle_cached` computes it from token ids.
Which output tokens is the caller's choice:
- `replay` fills `Turn.oracle` with the assistant message the script records,
  rendered by the chat template right after the prompt (the tokens the next
  prompt contains). Loose for a random-weight model: its output is rarely the
  tokenizer's own encoding of its text, so no server holds those tokens.
- bench_vs_upstream uses the tokens a greedy server generates (the model run
  in-process; the EOS token included when it stops on one), which is what a
  server can hold. Up to one token per turn above what is computable (the last
  sampled token is never fed back), so still an upper bound.
"""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Optional, Protocol, Sequence

from worker.tiny_corpus import WORDS

Message = dict[str, Any]

# ------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Size:
    """Knobs of every workload; words are about 2 tokens each with the tiny tokenizer."""

    chat_turns: int
    chat_system_words: int
    chat_user_words: int
    repeat_words: int
    repeats: int
    agents_system_words: int
    agent_rounds: int
    agent_user_words: int
    doc_words: int
    questions: int
    edit_turns: int
    reasoning_queries: int
    reasoning_words: int
    # edit-long: conversations, and the words of each one's long message (drawn per conversation)
    edit_long_conversations: int
    edit_long_words: tuple[int, int]
    # doc-reask: the words of each of the two documents (drawn per document), questions per document
    doc_reask_words: tuple[int, int]
    doc_reask_questions: int


SIZES: dict[str, Size] = {
    "small": Size(
        chat_turns=6, chat_system_words=40, chat_user_words=25,
        repeat_words=250, repeats=3,
        agents_system_words=150, agent_rounds=3, agent_user_words=15,
        doc_words=250, questions=4,
        edit_turns=4,
        reasoning_queries=3, reasoning_words=30,
        edit_long_conversations=3, edit_long_words=(500, 950),
        doc_reask_words=(750, 1500), doc_reask_questions=3,
    ),
    "medium": Size(
        chat_turns=12, chat_system_words=80, chat_user_words=40,
        repeat_words=700, repeats=4,
        agents_system_words=400, agent_rounds=4, agent_user_words=25,
        doc_words=700, questions=6,
        edit_turns=8,
        reasoning_queries=5, reasoning_words=60,
        edit_long_conversations=5, edit_long_words=(500, 950),
        doc_reask_words=(750, 1500), doc_reask_questions=5,
    ),
}

# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Reply:
    """What a server answered: the text a client would keep."""

    content: str
    reasoning: str = ""


def plain_assistant(reply: Reply) -> Message:
    message: Message = {"role": "assistant", "content": reply.content}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    return message


@dataclass
class Step:
    """One request: the messages sent, and how the script records the reply in its history."""

    messages: list[Message]
    label: str
    tools: Optional[list[dict[str, Any]]] = None
    respond: Callable[[Reply], Message] = plain_assistant


# A script yields Steps and is sent the Reply to each.
Script = Generator[Step, Reply, None]


def _step(messages: list[Message], label: str, **kw: Any) -> Step:
    return Step(copy.deepcopy(messages), label, **kw)


class Prose:
    """Seeded text from the tiny tokenizer's own word list (about 2 tokens a word)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def words(self, n: int) -> list[str]:
        return [self.rng.choice(WORDS) for _ in range(n)]

    def sentences(self, n_words: int) -> list[str]:
        """n_words words in sentences of 6 to 14 words, each capitalized and ending with a full stop."""
        out, words = [], self.words(n_words)
        i = 0
        while i < len(words):
            length = self.rng.randint(6, 14)
            sentence = words[i:i + length]
            out.append(" ".join([sentence[0].capitalize(), *sentence[1:]]) + ".")
            i += length
        return out

    def text(self, n_words: int) -> str:
        return " ".join(self.sentences(n_words))

    def paragraphs(self, n_words: int) -> str:
        """n_words words in paragraphs of 30 to 90 words, separated by "\n\n"; within a paragraph about
        one sentence in five starts on a line of its own ("\n")."""
        out = []
        while n_words > 0:
            size = min(n_words, self.rng.randint(30, 90))
            n_words -= size
            sentences = self.sentences(size)
            text = sentences[0]
            for sentence in sentences[1:]:
                text += ("\n" if self.rng.random() < 0.2 else " ") + sentence
            out.append(text)
        return "\n\n".join(out)


# ------------------------------------------------------------------ scripts


def chat(size: Size, seed: int = 1, turns: Optional[int] = None, system: Optional[str] = None) -> Script:
    """(a) One conversation growing turn by turn; its own system prompt unless given one."""
    prose = Prose(seed)
    system = prose.text(size.chat_system_words) if system is None else system
    messages: list[Message] = [{"role": "system", "content": system}]
    for turn in range(turns or size.chat_turns):
        messages.append({"role": "user", "content": prose.text(size.chat_user_words)})
        step = _step(messages, f"turn{turn}")
        messages.append(step.respond((yield step)))


def repeat(size: Size, seed: int = 2, repeats: Optional[int] = None) -> Script:
    """(b) The same long prompt, sent again and again."""
    prose = Prose(seed)
    messages = [{"role": "user", "content": prose.text(size.repeat_words)}]
    for i in range(repeats or size.repeats):
        yield _step(messages, f"repeat{i}")


def agents(size: Size, n_agents: int, seed: int = 3, rounds: Optional[int] = None) -> Script:
    """(c) Agents taking turns over one shared system prompt, each with its own history."""
    prose = Prose(seed)
    system = {"role": "system", "content": prose.text(size.agents_system_words)}
    histories: list[list[Message]] = [[system] for _ in range(n_agents)]
    for rnd in range(rounds or size.agent_rounds):
        for agent, history in enumerate(histories):
            task = prose.text(size.agent_user_words)
            history.append({"role": "user", "content": f"Agent {agent}, step {rnd}: {task}"})
            step = _step(history, f"agent{agent}.round{rnd}")
            history.append(step.respond((yield step)))


def document(size: Size, seed: int = 4, questions: Optional[int] = None) -> Script:
    """(d) One long document, a different question in each fresh conversation."""
    prose = Prose(seed)
    system = {"role": "system", "content": "Answer from the document only."}
    doc = prose.text(size.doc_words)
    for q in range(questions or size.questions):
        question = prose.text(12)
        messages = [system, {"role": "user", "content": f"{doc}\n\nQuestion {q}: {question}"}]
        yield _step(messages, f"question{q}")


def edit(size: Size, seed: int = 5, turns: Optional[int] = None) -> Script:
    """(e) A conversation, then an earlier user message edited mid-way and its reply regenerated;
    then the last user message edited and regenerated."""
    prose = Prose(seed)
    turns = turns or size.edit_turns
    messages: list[Message] = [{"role": "system", "content": prose.text(size.chat_system_words)}]
    for turn in range(turns):
        messages.append({"role": "user", "content": prose.text(size.chat_user_words)})
        step = _step(messages, f"turn{turn}")
        messages.append(step.respond((yield step)))
    for label, turn in (("edit-mid", turns // 2), ("edit-last", turns - 1)):
        index = 1 + 2 * turn  # system, then (user, assistant) per turn
        edited = messages[:index] + [{"role": "user", "content": edited_text(messages[index]["content"], prose)}]
        yield _step(edited, label)


def edited_text(text: str, prose: Prose) -> str:
    """The text with a few words in its middle replaced (a typical edit)."""
    words = text.split(" ")
    middle = len(words) // 2
    return " ".join(words[:middle] + prose.words(3) + words[middle + 1:])


def replace_words(text: str, at: float, prose: Prose) -> tuple[str, int]:
    """The text with 3 to 6 consecutive words replaced, starting at fraction `at` of its words (a
    sentence-sized edit); line breaks, paragraph breaks, full stops and capitals stay where they were.
    Returns the new text and the index of the first word replaced."""
    parts = re.split(r"(\s+)", text)  # words at even indices, the whitespace between them at odd ones
    n_words = (len(parts) + 1) // 2
    count = prose.rng.randint(3, 6)
    first = min(max(0, int(at * n_words)), n_words - count)
    for i, new in zip(range(first, first + count), prose.words(count)):
        old = parts[2 * i]
        if old[:1].isupper():
            new = new.capitalize()
        parts[2 * i] = new + ("." if old.endswith(".") else "")
    return "".join(parts), first


def long_edit(size: Size, seed: int) -> Script:
    """One conversation of edit-long: a system prompt and a long user message in paragraphs, the reply;
    the message edited 5%-40% of its words before its end and regenerated (system + edited message);
    then edited again, further back or further forward, and regenerated."""
    prose = Prose(seed)
    system = {"role": "system", "content": prose.text(size.chat_system_words)}
    message = prose.paragraphs(prose.rng.randint(*size.edit_long_words))
    yield _step([system, {"role": "user", "content": message}], "original")
    back = prose.rng.uniform(0.05, 0.40)  # fraction of the message's words before its end
    message, _ = replace_words(message, 1 - back, prose)
    yield _step([system, {"role": "user", "content": message}], "edit1")
    back = back * prose.rng.uniform(1.3, 2.0) if prose.rng.random() < 0.5 else back * prose.rng.uniform(0.2, 0.7)
    message, _ = replace_words(message, 1 - min(back, 0.9), prose)
    yield _step([system, {"role": "user", "content": message}], "edit2")


def edit_long(size: Size, seed: int = 7, conversations: Optional[int] = None) -> Script:
    """(h) Several conversations, interleaved, each a long message in paragraphs edited twice near its end
    (long_edit), every edit regenerated."""
    return interleave({f"conv{i}": long_edit(size, seed * 100 + i)
                       for i in range(conversations or size.edit_long_conversations)})


def reasked_document(size: Size, seed: int, questions: Optional[int] = None) -> Script:
    """One document of doc-reask: a long document in paragraphs, a different question after "\n\n" in
    each fresh chat."""
    prose = Prose(seed)
    system = {"role": "system", "content": "Answer from the document only."}
    doc = prose.paragraphs(prose.rng.randint(*size.doc_reask_words))
    for q in range(questions or size.doc_reask_questions):
        question = prose.text(12)[:-1] + "?"
        yield _step([system, {"role": "user", "content": f"{doc}\n\n{question}"}], f"question{q}")


def doc_reask(size: Size, seed: int = 8, questions: Optional[int] = None) -> Script:
    """(i) Two long documents in paragraphs, each asked several times in fresh chats, interleaved."""
    return interleave({f"doc{i}": reasked_document(size, seed * 100 + i, questions) for i in range(2)})


SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the notes.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}


def reasoning(size: Size, seed: int = 6, queries: Optional[int] = None) -> Script:
    """(f) Multi-turn chat with tool calls and reasoning, under a template that drops reasoning.

    Per user query: the model "reasons and calls a tool" (the script records that
    assistant message, with `reasoning_content`, whatever the tiny model said), the
    tool answers, and the model answers (recorded with inline <think> text). While
    the query is the last one, the template renders this reasoning; once the next
    query comes, it drops it, so the prompt leaves the stored history right after
    the previous query's `<|im_start|>assistant\\n`, mid-conversation.
    """
    prose = Prose(seed)
    messages: list[Message] = [{"role": "system", "content": prose.text(size.chat_system_words)}]
    tools = [SEARCH_TOOL]
    for q in range(queries or size.reasoning_queries):
        messages.append({"role": "user", "content": prose.text(size.chat_user_words)})
        thought, query = prose.text(size.reasoning_words), " ".join(prose.words(4))
        call_id = f"call_{q}"

        def tool_call(reply: Reply, thought: str = thought, query: str = query, call_id: str = call_id) -> Message:
            return {
                "role": "assistant",
                "content": "",
                "reasoning_content": thought,
                "tool_calls": [{"id": call_id, "type": "function",
                                "function": {"name": "search", "arguments": json.dumps({"query": query})}}],
            }

        step = _step(messages, f"query{q}.call", tools=tools, respond=tool_call)
        messages.append(step.respond((yield step)))
        messages.append({"role": "tool", "tool_call_id": call_id, "content": prose.text(size.chat_user_words)})
        answer_thought = prose.text(size.reasoning_words)

        def answer(reply: Reply, thought: str = answer_thought) -> Message:
            return {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{reply.content}"}

        step = _step(messages, f"query{q}.answer", tools=tools, respond=answer)
        messages.append(step.respond((yield step)))


def interleave(scripts: dict[str, Script]) -> Script:
    """Round-robin one step of each script at a time; labels get the script's name."""
    pending: list[tuple[str, Script, Step]] = []
    for name, script in scripts.items():
        try:
            pending.append((name, script, next(script)))
        except StopIteration:
            pass
    while pending:
        still = []
        for name, script, step in pending:
            step.label = f"{name}:{step.label}"
            reply = yield step
            try:
                still.append((name, script, script.send(reply)))
            except StopIteration:
                pass
        pending = still


def mix(size: Size, seed: int = 100) -> Script:
    """(g) Shorter versions of (a)-(f) interleaved, with their own content."""
    return interleave({
        "chat": chat(size, seed + 1, turns=max(2, size.chat_turns // 2)),
        "repeat": repeat(size, seed + 2, repeats=2),
        "agents4": agents(size, 4, seed + 3, rounds=2),
        "document": document(size, seed + 4, questions=max(2, size.questions // 2)),
        "edit": edit(size, seed + 5, turns=max(2, size.edit_turns // 2)),
        "reasoning": reasoning(size, seed + 6, queries=2),
    })


@dataclass(frozen=True)
class Workload:
    name: str
    template: str  # the tiny model's chat template (worker.tiny_models.TEMPLATES)
    script: Callable[[Size], Script]
    # Run under this fraction of the bytes a perfectly shared cache needs to hold the whole workload.
    budget_fraction: Optional[float] = None


WORKLOADS: tuple[Workload, ...] = (
    Workload("chat", "chatml", chat),
    Workload("repeat", "chatml", repeat),
    Workload("agents-2", "chatml", lambda s: agents(s, 2)),
    Workload("agents-4", "chatml", lambda s: agents(s, 4)),
    Workload("agents-8", "chatml", lambda s: agents(s, 8)),
    Workload("document", "chatml", document),
    Workload("edit", "chatml", edit),
    Workload("reasoning", "chatml-drop-reasoning", reasoning),
    Workload("edit-long", "chatml", edit_long),
    Workload("doc-reask", "chatml", doc_reask),
    Workload("mix-0.25x", "chatml-drop-reasoning", mix, budget_fraction=0.25),
    Workload("mix", "chatml-drop-reasoning", mix, budget_fraction=0.5),
    Workload("mix-1x", "chatml-drop-reasoning", mix, budget_fraction=1.0),
    Workload("mix-2x", "chatml-drop-reasoning", mix, budget_fraction=2.0),
)

# ------------------------------------------------------------------ rendering


class ChatTemplateTokenizer(Protocol):
    def apply_chat_template(self, messages: list[Message], **kwargs: Any) -> list[int]: ...


def normalize_messages(messages: Sequence[Message]) -> list[Message]:
    """As mlx_lm.server's `process_message_content` (and the proxy) do before the template."""
    out = []
    for message in copy.deepcopy(list(messages)):
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = "".join(p["text"] for p in content if p.get("type") == "text")
        elif content is None:
            message["content"] = ""
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass
        out.append(message)
    return out


class ChatRenderer:
    """Token ids of a step's prompt, and of its history once the reply is recorded."""

    def __init__(self, tokenizer: ChatTemplateTokenizer) -> None:
        self.tokenizer = tokenizer

    def _render(self, messages: Sequence[Message], tools, add_generation_prompt: bool) -> list[int]:
        tokens = self.tokenizer.apply_chat_template(
            normalize_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        return [int(t) for t in tokens]

    def prompt(self, step: Step) -> list[int]:
        return self._render(step.messages, step.tools, True)

    def history(self, step: Step, prompt: Sequence[int], reply: Reply) -> list[int]:
        """prompt + output: the prompt, then the recorded reply as the template renders it after it."""
        full = self._render([*step.messages, step.respond(reply)], step.tools, False)
        return list(prompt) + full[common_prefix(prompt, full):]


# ------------------------------------------------------------------ replay


@dataclass
class Turn:
    """One request of a replayed script."""

    label: str
    prompt: list[int]
    history: list[int]  # prompt + output tokens, for the oracle
    result: Any = None  # what the replier returned besides the reply (server figures)
    oracle: int = 0


Replier = Callable[[Step], tuple[Reply, Any]]


def replay(script: Script, renderer: ChatRenderer, replier: Replier) -> list[Turn]:
    """Run `script` to the end through `replier`; returns the turns with their oracle filled in."""
    turns: list[Turn] = []
    try:
        step = next(script)
        while True:
            prompt = renderer.prompt(step)
            reply, result = replier(step)
            turns.append(Turn(step.label, prompt, renderer.history(step, prompt, reply), result))
            step = script.send(reply)
    except StopIteration:
        pass
    for turn, best in zip(turns, oracle_cached([t.prompt for t in turns], [t.history for t in turns])):
        turn.oracle = best
    return turns


# ------------------------------------------------------------------ the oracle


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixTrie:
    """Token sequences in nested dicts: deepest match and number of distinct prefixes."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}
        self.nodes = 0  # distinct non-empty prefixes = tokens a perfectly shared cache holds

    def insert(self, tokens: Iterable[int]) -> None:
        node = self.root
        for token in tokens:
            child = node.get(token)
            if child is None:
                child = node[token] = {}
                self.nodes += 1
            node = child

    def longest_prefix(self, tokens: Iterable[int]) -> int:
        node, depth = self.root, 0
        for token in tokens:
            node = node.get(token)
            if node is None:
                break
            depth += 1
        return depth

    def leaves(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            if not node:
                count += 1
            stack.extend(node.values())
        return count if self.nodes else 0


def oracle_cached(prompts: Sequence[Sequence[int]], histories: Sequence[Sequence[int]]) -> list[int]:
    """For each prompt: longest prefix shared with any earlier history, at most len(prompt) - 1."""
    trie, out = PrefixTrie(), []
    for prompt, history in zip(prompts, histories):
        out.append(min(trie.longest_prefix(prompt), max(len(prompt) - 1, 0)))
        trie.insert(history)
    return out


def distinct_tokens(histories: Iterable[Sequence[int]]) -> tuple[int, int]:
    """(distinct prefix tokens, leaf sequences) over all histories: what a perfectly shared cache holds."""
    trie = PrefixTrie()
    for history in histories:
        trie.insert(history)
    return trie.nodes, trie.leaves()


def fake_replier(words: int = 8, seed: int = 0) -> Replier:
    """Replies of `words` seeded words, for dry runs and tests."""
    prose = Prose(seed)
    return lambda step: (Reply(" ".join(prose.words(words))), None)
