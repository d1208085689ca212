"""Constrained decoding: a request's grammar as a logits mask, with llguidance.

The proxy sends a grammar in llguidance's own form (`protocol.messages.Grammar`,
already checked there); here it is compiled once per distinct text (a matcher
per text is kept and deep-copied per request, which is cheap) and becomes one
more logits processor of that request only. Before each sampled token the
processor advances the matcher by the token sampled last, asks it which tokens
may come next, and sets every other logit to -inf. End-of-sequence tokens are in
the mask only where the grammar accepts, so a reply ends exactly when the
grammar is complete (or at max_tokens, cut, as any reply).

The grammar touches only decoding: the prompt, the pool and what it stores are
the same with or without one.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import llguidance as llg
import numpy as np

log = logging.getLogger("mlx_cache_proxy.worker")

# Compiled grammars kept per worker (a schema's matcher is small: its lexer and grammar tables).
MAX_COMPILED = 64


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (the message is llguidance's own)."""


def ll_tokenizer(wrapper: Any, n_vocab: Optional[int] = None) -> llg.LLTokenizer:
    """llguidance's view of an mlx-lm `TokenizerWrapper`: its `tokenizers` JSON and its end-of-sequence ids."""
    backend = copy.copy(wrapper._tokenizer.backend_tokenizer)  # a copy: padding settings are per object
    backend.no_padding()
    backend.no_truncation()
    eos = sorted(int(t) for t in wrapper.eos_token_ids)
    return llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos)


def check_grammar(grammar: str, tokenizer: llg.LLTokenizer) -> None:
    """Raise GrammarError naming what llguidance cannot compile."""
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise GrammarError(messages[0] if messages else "the grammar does not compile")


class GrammarCache:
    """Compiled matchers by a digest of their grammar text; `matcher` hands out a fresh copy."""

    def __init__(self, tokenizer: llg.LLTokenizer, max_entries: int = MAX_COMPILED) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._compiled: OrderedDict[str, llg.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, grammar: str) -> llg.LLMatcher:
        key = hashlib.sha256(grammar.encode("utf-8")).hexdigest()
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled.deep_copy()
        compiled = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise GrammarError(compiled.get_error())
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()


class ModelGrammars:
    """A worker's grammar support: the model's tokenizer, loaded on the first grammar, and its compiled grammars."""

    def __init__(self, model_path: Path, vocab_size: int) -> None:
        self.model_path = Path(model_path)
        self.vocab_size = vocab_size
        self._cache: Optional[GrammarCache] = None
        self._lock = threading.Lock()

    def load_in_background(self) -> None:
        """Load the tokenizer now, off the model thread: the first grammar request then waits for nothing
        (a real model's tokenizer takes about a second, which would stall every running request)."""
        threading.Thread(target=self._warm, name="grammar-tokenizer", daemon=True).start()

    def _warm(self) -> None:
        try:
            self._grammars()
        except Exception as exc:  # the first grammar request tries again and reports it
            log.warning("grammar support not loaded ahead: %s", exc)

    def compile_ahead(self, grammar: str) -> None:
        """Compile `grammar` into the cache now, on the caller's thread (llguidance releases the GIL):
        the model thread then only copies it. A grammar that fails is reported when its request is submitted."""
        try:
            self._grammars().matcher(grammar)
        except Exception:
            pass

    def processor(self, grammar: str) -> GrammarProcessor:
        cache = self._grammars()
        return GrammarProcessor(cache.matcher(grammar), self.vocab_size, cache.tokenizer.eos_tokens)

    def _grammars(self) -> GrammarCache:
        with self._lock:
            if self._cache is None:
                from mlx_lm.utils import load_config, load_tokenizer

                eos = load_config(self.model_path).get("eos_token_id")
                wrapper = load_tokenizer(self.model_path, eos_token_ids=eos)
                self._cache = GrammarCache(ll_tokenizer(wrapper, self.vocab_size))
            return self._cache


class GrammarProcessor:
    """An mlx-lm logits processor that keeps one request's output inside its grammar.

    Called as `processor(tokens, logits)` before each sampling: the first call
    (the prompt's logits) consumes nothing; every later call first consumes
    `tokens[-1]`, the token sampled after the previous call.
    """

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, eos: Sequence[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._started = False
        self._eos = [t for t in eos if t < vocab_size]

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx  # here, not at the top: the proxy imports this module for check_grammar

        if self._started:
            self.consume(int(tokens[-1].item()))
        self._started = True
        return mx.where(mx.array(self.allowed()), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)  # a refused token leaves the matcher in its error state

    def allowed(self) -> np.ndarray:
        """One bool per vocabulary entry: may it come next?"""
        if self.matcher.is_error():
            allowed = np.zeros(self.vocab_size, dtype=bool)  # nothing valid can follow: end the reply
            allowed[self._eos] = True
            return allowed
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)
