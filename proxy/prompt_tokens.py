"""Token ids of rendered prompts, at the cost of what changed since the last turn.

A chat template renders fast (under a millisecond for 30K tokens); tokenizing
the result is what costs (~50 ms). Yet a conversation's next turn re-renders
text that is mostly the same as before. A fast tokenizer splits its input at
added tokens (`<|im_start|>`, `<|im_end|>`, ...) before anything else, and
encodes each piece between them on its own; so the ids of a piece seen before
are reused from a cache keyed by the piece's text, and only new pieces (the new
messages) are encoded. The result is the same token ids as encoding the whole
text, which is what `apply_chat_template(tokenize=True)` does.

That holds when the added tokens split the input cleanly: they match on raw
text (`normalized=False`) and absorb no whitespace (`lstrip`/`rstrip`), and the
pre-tokenizer does not treat the start of the input specially (a SentencePiece
"prepend to the first piece" rule does). A probe at start-up checks it; failing
that, prompts are encoded whole; and the caller checks the first prompts
against the template's own tokenization (`proxy.chat`), a mismatch turning
piece reuse off: slower, never different.

Control tokens written by a client (wrapped in markers by `proxy.control_tokens`)
are encoded as plain text, by a copy of the tokenizer without added tokens,
each as a piece of its own; lone markers only cut the text. So a prompt is
still one exact token sequence, and only the template's markup is special.

Next to the ids the encoder finds *split points*: token offsets inside long
pieces at structural boundaries (after a line or paragraph break, at the start
of each of the piece's last sentences), where an edit of a long message or
another question on the same document diverges; the worker places checkpoints
there (see `worker/placement.py`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from protocol.messages import SplitKind
from proxy.control_tokens import MARK_END, MARK_START, ControlTokens, is_marked, unmarked

log = logging.getLogger("mlx_cache_proxy")

MAX_CACHED_TOKENS = 4_000_000  # ids of pieces kept (4 bytes each): 16 MB
MIN_PIECE_FOR_SPLITS = 48  # shorter pieces (headers, short messages) get no split points
LAST_SENTENCES = 6  # sentence starts kept per piece, counted back from its end
_SENTENCE_END = (".", "?", "!", ":", ";", "。", "？", "！")


@dataclass(frozen=True)
class Piece:
    ids: array  # token ids ("i")
    splits: tuple[tuple[int, int], ...]  # (token offset inside the piece, SplitKind)


@dataclass
class Encoded:
    """A text's token ids and where its pieces start (characters and tokens)."""

    tokens: list[int]
    char_starts: list[int]  # ascending; a piece starts at each
    token_starts: list[int]
    splits: list[int]  # split points, ascending token offsets
    split_kinds: list[int]  # a SplitKind each

    def piece_at(self, char_offset: int) -> int:
        """The index of the piece holding text[char_offset] (the last one past the end)."""
        return max(0, bisect_right(self.char_starts, char_offset) - 1)


class TokenizationCancelled(Exception):
    """The client left while its prompt was being tokenized."""


class PromptEncoder:
    """Encodes rendered prompts with a `tokenizers.Tokenizer`, reusing the ids of pieces seen before."""

    def __init__(self, backend: Any, max_cached_tokens: int = MAX_CACHED_TOKENS) -> None:
        self.backend = backend
        self.max_cached_tokens = max_cached_tokens
        self.control = ControlTokens.of(backend)
        self._pieces: OrderedDict[str, Piece] = OrderedDict()
        self._lock = threading.Lock()  # several tokenizer threads share the piece cache
        self._cached_tokens = 0
        self._token_text: dict[int, str] = {}
        self._plain_ids: dict[str, list[int]] = {}
        self._plain_backend: Any = None
        self._splitter, self._added = self._added_token_splitter(backend, self.control)
        self._marks = re.compile("(" + self.control.marked_alternatives() + ")")
        self._added_ids = {int(i) for i in backend.get_added_tokens_decoder()}
        self.reuses_pieces = self._splitter is not None and self._probe()
        if self._splitter is not None and not self.reuses_pieces:
            log.info("this tokenizer does not split cleanly at its added tokens: prompts are encoded whole")

    # ------------------------------------------------------------ public

    def encode(self, text: str, cancelled: Optional[threading.Event] = None) -> Encoded:
        """The ids of `text`; raises TokenizationCancelled (between pieces) once `cancelled` is set."""
        if not self.reuses_pieces:
            return self.encode_whole(text, cancelled)
        return self._by_pieces(text, cancelled)

    def prefix_length(self, encoded: Encoded, text: str, char_offset: int) -> Optional[int]:
        """How many of `encoded`'s tokens encode text[:char_offset] alone, if they do (else None).

        At a piece boundary that is the tokens before it; inside a piece, the
        piece's start is encoded alone and must be a prefix of the piece's ids
        (a tokenizer may merge across the cut).
        """
        i = encoded.piece_at(char_offset)
        start, token_start = encoded.char_starts[i], encoded.token_starts[i]
        if start == char_offset:
            return token_start
        head = self.backend.encode(text[start:char_offset], add_special_tokens=False).ids
        end = token_start + len(head)
        return end if encoded.tokens[token_start:end] == list(head) else None

    @property
    def cached_tokens(self) -> int:
        return self._cached_tokens

    # ------------------------------------------------------------ pieces

    @staticmethod
    def _added_token_splitter(backend: Any, control: ControlTokens) -> tuple[Optional[re.Pattern], dict[str, int]]:
        added = {}
        for token_id, token in backend.get_added_tokens_decoder().items():
            if token.normalized or token.lstrip or token.rstrip or token.single_word or not token.content:
                continue
            added[token.content] = int(token_id)
        if not added:
            return None, {}
        # Marked tokens first, then added tokens longest first: the alternation then matches
        # as the tokenizer's leftmost-longest search does.
        alternatives = "|".join(map(re.escape, sorted(added, key=len, reverse=True)))
        return re.compile(f"({control.marked_alternatives()}|{alternatives})"), added

    def _by_pieces(self, text: str, cancelled: Optional[threading.Event] = None) -> Encoded:
        tokens: list[int] = []
        char_starts: list[int] = []
        token_starts: list[int] = []
        splits: list[int] = []
        kinds: list[int] = []
        offset = 0
        for part in self._splitter.split(text):
            if not part:
                continue
            char_starts.append(offset)
            token_starts.append(len(tokens))
            token_id = self._added.get(part)
            if token_id is not None:
                tokens.append(token_id)
            elif self._marks.fullmatch(part):
                if is_marked(part):  # a lone marker only cuts the text
                    tokens.extend(self._plain(unmarked(part)))
            else:
                if cancelled is not None and cancelled.is_set():
                    raise TokenizationCancelled()
                piece = self._piece(part)
                base = len(tokens)
                tokens.extend(piece.ids)
                for at, kind in piece.splits:
                    splits.append(base + at)
                    kinds.append(kind)
            offset += len(part)
        char_starts.append(offset)
        token_starts.append(len(tokens))
        return Encoded(tokens, char_starts, token_starts, splits, kinds)

    def _piece(self, part: str) -> Piece:
        with self._lock:
            piece = self._pieces.get(part)
            if piece is not None:
                self._pieces.move_to_end(part)
                return piece
        ids = self.backend.encode(part, add_special_tokens=False).ids  # the GIL is released meanwhile
        piece = Piece(array("i", ids), self._split_points(ids))
        with self._lock:
            if part not in self._pieces:
                self._pieces[part] = piece
                self._cached_tokens += len(ids)
            while self._cached_tokens > self.max_cached_tokens and len(self._pieces) > 1:
                _, old = self._pieces.popitem(last=False)
                self._cached_tokens -= len(old.ids)
        return piece

    def encode_whole(self, text: str, cancelled: Optional[threading.Event] = None) -> Encoded:
        """For tokenizers that do not split cleanly: the text encoded at once, between marked control tokens.

        Pieces start at the added tokens (found from the offsets), so message
        ends there need no extra encode (`prefix_length`).
        """
        tokens: list[int] = []
        char_starts: list[int] = []
        token_starts: list[int] = []
        offset = 0
        for index, part in enumerate(self._marks.split(text) if self._has_marks(text) else [text]):
            if cancelled is not None and cancelled.is_set():
                raise TokenizationCancelled()
            if not part:
                continue
            char_starts.append(offset)
            token_starts.append(len(tokens))
            if self._marks.fullmatch(part):
                if is_marked(part):
                    tokens.extend(self._plain(unmarked(part)))
            else:
                self._encode_segment(part, index == 0, offset, tokens, char_starts, token_starts)
            offset += len(part)
        char_starts.append(offset)
        token_starts.append(len(tokens))
        splits = self._split_points(tokens)
        return Encoded(tokens, char_starts, token_starts, [s for s, _ in splits], [k for _, k in splits])

    def _encode_segment(
        self, text: str, first: bool, offset: int, tokens: list[int], char_starts: list[int], token_starts: list[int]
    ) -> None:
        """Append `text`'s ids, and a piece start at each added token inside it."""
        shift = 0
        encoding = self.backend.encode(text, add_special_tokens=False)
        if not first:  # after a cut, as inside a text: no SentencePiece prefix space (as transformers does)
            newline = self.backend.encode("\n", add_special_tokens=False).ids
            after = self.backend.encode("\n" + text, add_special_tokens=False)
            if after.ids[: len(newline)] == newline:
                encoding, shift = after, len(newline)
        ids, offsets = encoding.ids[shift:], encoding.offsets[shift:]
        base = len(tokens)
        tokens.extend(ids)
        for i, token_id in enumerate(ids):
            if token_id in self._added_ids:
                start = offset + offsets[i][0] - (1 if shift else 0)
                end = offset + offsets[i][1] - (1 if shift else 0)
                for at, token_at in ((start, base + i), (end, base + i + 1)):
                    if at > char_starts[-1]:
                        char_starts.append(at)
                        token_starts.append(token_at)

    def _has_marks(self, text: str) -> bool:
        return MARK_START in text or MARK_END in text

    def _plain(self, content: str) -> list[int]:
        """A control token's text as ordinary text (no added token can come out)."""
        ids = self._plain_ids.get(content)
        if ids is None:
            plain = self._plain_tokenizer()
            newline = plain.encode("\n", add_special_tokens=False).ids
            after = plain.encode("\n" + content, add_special_tokens=False).ids
            ids = after[len(newline):] if after[: len(newline)] == newline else plain.encode(content, add_special_tokens=False).ids
            if self._added_ids.intersection(ids):  # merges that rebuild the token: one character at a time
                ids = [i for ch in content for i in plain.encode(ch, add_special_tokens=False).ids]
            ids = [i for i in ids if i not in self._added_ids]
            self._plain_ids[content] = ids
        return ids

    def _plain_tokenizer(self) -> Any:
        if self._plain_backend is None:
            from tokenizers import Tokenizer

            spec = json.loads(self.backend.to_str())
            spec["added_tokens"] = []
            self._plain_backend = Tokenizer.from_str(json.dumps(spec))
        return self._plain_backend

    # ------------------------------------------------------------ split points

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.backend.decode([token_id], skip_special_tokens=False)
        return text

    def _split_points(self, ids: list[int]) -> tuple[tuple[int, int], ...]:
        """(offset, SplitKind): after every line break (an empty line: a paragraph), and the last sentence starts."""
        if len(ids) < MIN_PIECE_FOR_SPLITS:
            return ()
        lines: dict[int, int] = {}
        sentences = []
        before, previous = "", self._text_of(ids[0])
        for i in range(1, len(ids)):
            current = self._text_of(ids[i])
            if previous.endswith("\n"):
                empty_line = previous.endswith("\n\n") or (previous.strip() == "" and before.endswith("\n"))
                lines[i] = SplitKind.PARAGRAPH if empty_line else SplitKind.LINE
            elif previous.rstrip().endswith(_SENTENCE_END) and current[:1].isspace():
                sentences.append(i)
            before, previous = previous, current
        for i in sentences[-LAST_SENTENCES:]:
            lines.setdefault(i, SplitKind.SENTENCE)
        return tuple((i, int(kind)) for i, kind in sorted(lines.items()))

    # ------------------------------------------------------------ the probe

    def _probe(self) -> bool:
        """Does piece-wise encoding give the ids of a full encode, on text shaped like prompts?"""
        tokens = list(self._added)[:8]
        bodies = ["user\nHello there.", " spaced out ", "\n\nTwo lines\nhere", "x", "  indented\n", "end."]
        text = "Start of text " + "".join(f"{t}{b}" for t in tokens for b in bodies) + " tail"
        return self._by_pieces(text).tokens == list(self.backend.encode(text, add_special_tokens=False).ids)
