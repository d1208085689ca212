"""GPT-OSS output in the harmony format, parsed with the `openai-harmony` package.

A harmony reply is a run of messages, each `<|channel|>NAME [to=RECIPIENT]
[<|constrain|>TYPE]<|message|>TEXT` closed by `<|end|>`, `<|call|>` or
`<|return|>`. `HarmonyOutput` feeds the generated tokens to harmony's own
`StreamableParser` and routes what it reads: `analysis` -> reasoning, a message
with a recipient (`to=functions.NAME`) -> a tool call, `final` and recipient-less
`commentary` (a preamble, meant for the user) -> content.

The parser works on harmony's token ids (the o200k_harmony encoding). A real
GPT-OSS tokenizer has those ids, and its tokens are fed as they are. Another
tokenizer with the harmony markup tokens (the tiny test model's) is bridged:
markup tokens are mapped by name, other tokens decoded to text and that text
encoded with harmony's encoding.

harmony loads its vocabulary (`o200k_base.tiktoken`, checked by its SHA-256)
from `TIKTOKEN_ENCODINGS_BASE`, else it downloads it. The proxy downloads
nothing: `harmony_encoding` writes the file from the model's own tokenizer.json
when that holds the o200k vocabulary (every GPT-OSS checkpoint's does) and
points the variable at it; harmony's hash check then vouches for the file.
Without it (and without the variable set) the output is not split, and a
warning says why.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from proxy.text_output import OutputDelta, find_stop, held_back

log = logging.getLogger("mlx_cache_proxy")

VOCAB_ENV = "TIKTOKEN_ENCODINGS_BASE"
VOCAB_FILE = "o200k_base.tiktoken"
O200K_RANKS = 199998  # ordinary tokens of o200k; the harmony specials start here
MARKUP = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")  # a tokenizer with these speaks harmony
END_TOKENS = ("<|end|>", "<|call|>", "<|return|>")  # close a message
HARMONY_REPLY_ENDS = ("<|return|>", "<|call|>")  # close a reply: the generation stops there


def is_harmony_tokenizer(added_tokens: Iterable[str]) -> bool:
    names = set(added_tokens)
    return all(t in names for t in MARKUP)


# ----------------------------------------------------------------- the encoding


def write_vocab(ranks: Sequence[bytes], directory: Path) -> Path:
    """`o200k_base.tiktoken` (base64 token, rank: one a line) for token bytes in rank order, written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / VOCAB_FILE
    text = "".join(f"{base64.b64encode(b).decode()} {rank}\n" for rank, b in enumerate(ranks))
    fd, staging = tempfile.mkstemp(dir=directory, prefix=f".{VOCAB_FILE}.")
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(text)
    os.replace(staging, target)
    return target


def o200k_ranks_from_tokenizer_json(path: Path) -> Optional[list[bytes]]:
    """The o200k ranks of a byte-level tokenizer.json whose first 199,998 ids are them (GPT-OSS's), else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(vocab, dict) or len(vocab) < O200K_RANKS:
        return None
    by_id: list[Optional[str]] = [None] * O200K_RANKS
    for token, token_id in vocab.items():
        if isinstance(token_id, int) and 0 <= token_id < O200K_RANKS:
            by_id[token_id] = token
    decoder = _byte_decoder()
    try:
        return [bytes(decoder[ch] for ch in token) for token in by_id]  # type: ignore[union-attr]
    except (KeyError, TypeError):  # a missing id or a character outside the byte-level alphabet
        return None


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@functools.lru_cache(maxsize=None)
def harmony_encoding(tokenizer_json: Optional[str], cache_dir: Optional[str]) -> Any:
    """harmony's GPT-OSS encoding, or None (logged) when its vocabulary cannot be had."""
    try:
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    except ImportError:
        log.warning("harmony output is not split: the openai-harmony package is not installed")
        return None
    if VOCAB_ENV not in os.environ and tokenizer_json and cache_dir:
        ranks = o200k_ranks_from_tokenizer_json(Path(tokenizer_json))
        if ranks is not None:
            os.environ[VOCAB_ENV] = str(write_vocab(ranks, Path(cache_dir)).parent)
    if VOCAB_ENV not in os.environ:  # harmony would download it: the proxy reaches out to no one by itself
        log.warning(
            "harmony output is not split: the model's tokenizer.json does not hold the o200k vocabulary; set %s "
            "to a directory holding %s", VOCAB_ENV, VOCAB_FILE,
        )  # fmt: skip
        return None
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # HarmonyError: no file, no network, a hash mismatch
        log.warning(
            "harmony output is not split: its o200k vocabulary could not be loaded (%s); set %s to a directory "
            "holding %s", exc, VOCAB_ENV, VOCAB_FILE,
        )  # fmt: skip
        return None


# ----------------------------------------------------------------- the bridge


class TokenBridge:
    """A model's token ids -> harmony's, for one model (shared by its requests)."""

    def __init__(self, encoding: Any, wrapper: Any) -> None:
        self.encoding = encoding
        self._decode = wrapper.decode
        specials = encoding.special_tokens_set
        own = {str(t): int(i) for i, t in _added_tokens(wrapper).items() if str(t) in specials}
        self.special: dict[int, int] = {i: self.harmony_id(t) for t, i in own.items()}
        probe = "Hello, world! 123"
        same_text = list(wrapper.encode(probe, add_special_tokens=False)) == encoding.encode(probe)
        self.same_ids = same_text and all(a == b for a, b in self.special.items())
        self.ends = {self.harmony_id(t) for t in END_TOKENS}
        self.message = self.harmony_id("<|message|>")
        self.start = self.harmony_id("<|start|>")

    def harmony_id(self, name: str) -> int:
        return self.encoding.encode(name, allowed_special="all")[0]

    def open_turn(self, prompt: Sequence[int]) -> list[int]:
        """Harmony ids of the prompt from its last `<|start|>` on: the header the reply continues."""
        own_start = next((own for own, h in self.special.items() if h == self.start), None)
        at = max((i for i, t in enumerate(prompt) if t == own_start), default=-1)
        if own_start is None or at < 0:
            return []
        tail = list(prompt[at:])
        if self.same_ids:
            return tail
        out: list[int] = []
        text: list[int] = []
        for token in [*tail, None]:
            if token is None or token in self.special:
                if text:
                    out += self.encoding.encode(self._decode(text), disallowed_special=())
                    text = []
                if token is not None:
                    out.append(self.special[token])
            else:
                text.append(token)
        return out


def _added_tokens(wrapper: Any) -> dict[int, Any]:
    hf = getattr(wrapper, "_tokenizer", wrapper)
    return dict(getattr(hf, "added_tokens_decoder", {}) or {})


# ----------------------------------------------------------------- the output


class HarmonyOutput:
    """The per-request output of a harmony model: TextOutput's interface, harmony's parser."""

    def __init__(
        self,
        bridge: TokenBridge,
        wrapper: Any,
        *,
        prompt: Sequence[int] = (),
        stop: Sequence[str] = (),
        tools: Optional[list[dict[str, Any]]] = None,
        parse_tools: bool = False,
    ) -> None:
        from openai_harmony import Role, StreamableParser

        self._bridge = bridge
        self._encoding = bridge.encoding
        self._detokenizer = wrapper.detokenizer
        self._stops = [s for s in stop if s]
        self._parse_tools = parse_tools  # `tools` is not needed: a call names its function
        opened = bridge.open_turn(prompt)
        self._parser = StreamableParser(self._encoding, None if opened else Role.ASSISTANT, strict=False)
        self._raw = False  # the parser gave up: the rest is content as it is
        self._in_content = False  # between <|message|> and the message's end
        self._header: list[int] = []  # harmony ids of the header being read (text, should it never close)
        self._arguments = ""  # of the tool call being read
        self._pending = ""  # content held back while it could still become a stop string
        self.stopped = False
        self.stop_string: Optional[str] = None
        self.tool_calls_made = 0
        for token in opened:
            self._step(token)
        self._header = []

    # ------------------------------------------------------------ input

    def add(self, token: int) -> OutputDelta:
        if self.stopped:
            return OutputDelta()
        delta = OutputDelta()
        for harmony_token in self._to_harmony(token):
            delta += self._step(harmony_token)
            if self.stopped:
                break
        return delta

    def finish(self, finish_reason: str) -> OutputDelta:
        delta = OutputDelta()
        if not self.stopped and not self._bridge.same_ids:
            self._detokenizer.finalize()
            for harmony_token in self._encode(self._detokenizer.last_segment):
                delta += self._step(harmony_token)
        if not self.stopped:
            if self._header:  # a header that never reached <|message|>: keep what the model said
                delta += self._content(self._encoding.decode(self._header))
                self._header = []
            recipient = self._parser.current_recipient if self._in_content else None
            # The worker keeps the stop token (<|call|>, <|return|>) to itself: a stop ends the open message.
            if recipient is not None and finish_reason == "stop":
                delta += self._call(recipient)
            elif self._arguments:  # a call cut off (max_tokens): its partial arguments, as text
                delta += self._content(self._arguments)
                self._arguments = ""
            delta += self._content("", final=True)
        return delta

    # ------------------------------------------------------------ stages

    def _to_harmony(self, token: int) -> list[int]:
        if self._bridge.same_ids:
            return [token]
        if token in self._bridge.special:
            self._detokenizer.finalize()
            return self._encode(self._detokenizer.last_segment) + [self._bridge.special[token]]
        self._detokenizer.add_token(token)
        return self._encode(self._detokenizer.last_segment)

    def _encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, disallowed_special=()) if text else []

    def _step(self, token: int) -> OutputDelta:
        """Process one harmony token; what it adds to the reply."""
        if self._raw:
            return self._content(self._encoding.decode([token]))
        recipient = self._parser.current_recipient
        try:
            self._parser.process(token)
        except Exception as exc:  # HarmonyError on a sequence it cannot read
            log.warning("harmony could not parse the reply (%s); the rest is returned as text", exc)
            self._raw = True
            header, self._header = self._header, []
            return self._content(self._encoding.decode([*header, token]))
        delta = OutputDelta()
        if token == self._bridge.message:
            self._in_content, self._header = True, []
        elif token in self._bridge.ends or token == self._bridge.start:
            if self._in_content and recipient is not None and token in self._bridge.ends:
                delta += self._call(recipient)
            elif not self._in_content and self._header:  # a header that never became a message: what it said
                delta += self._content(self._encoding.decode(self._header))
            self._in_content, self._header = False, [token] if token == self._bridge.start else []
        elif not self._in_content:
            self._header.append(token)
        else:
            text = self._parser.last_content_delta or ""
            if self._parser.current_recipient is not None:
                self._arguments += text
            elif self._parser.current_channel == "analysis":
                delta.reasoning += text
            else:  # final, a commentary preamble, or a channel harmony does not name
                delta += self._content(text)
        return delta

    def _content(self, text: str, final: bool = False) -> OutputDelta:
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return OutputDelta(content=out)
        index = find_stop(self._pending, self._stops)
        if index >= 0:
            self.stop_string = next(s for s in self._stops if self._pending.find(s) == index)
            out, self._pending = self._pending[:index], ""
            self.stopped = True
            return OutputDelta(content=out)
        keep = 0 if final else held_back(self._pending, self._stops)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return OutputDelta(content=out)

    def _call(self, recipient: str) -> OutputDelta:
        arguments, self._arguments = self._arguments, ""
        name = recipient[len("functions."):] if recipient.startswith("functions.") else recipient
        if not self._parse_tools:
            return self._content(arguments)
        call = {
            "index": self.tool_calls_made,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": arguments.strip() or "{}"},
        }
        self.tool_calls_made += 1
        return OutputDelta(tool_calls=[call])
