"""Batched decoding over mlx-lm's own `GenerationBatch` and batch cache classes.

mlx-lm's `GenerationBatch` already does what one decode step of several
sequences needs: one forward pass over a batch cache, per-sequence samplers,
logits processors and stop matchers, the next step queued before this one's
tokens are read, `extend` when a sequence joins and `filter` when one leaves.
What it lacks for us is a sequence that decodes *alone*: we keep its own
per-sequence cache (no padding, no mask, the same arithmetic as an unbatched
run) until a second sequence joins, and only then merge. A model whose cache
kinds cannot merge (ChunkedKVCache, QuantizedKVCache) decodes each sequence in
its own group, one after another within a step.

Each member enters with a cache that has consumed its prompt and the first
token already sampled from the prompt's logits (the engine samples it, because
a restored prompt end carries stored logits and no input token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.generate import GenerationBatch, StopSequences, _merge_caches


def can_merge(cache: list) -> bool:
    """Does every layer of a model cache have a batch form (merge / extend / filter / extract)?"""

    def layer_ok(layer: Any) -> bool:
        children = getattr(layer, "caches", None)
        if children is not None:
            return all(layer_ok(c) for c in children)
        return type(layer).__name__ in {"KVCache", "RotatingKVCache", "ArraysCache"}

    return all(layer_ok(layer) for layer in cache)


@dataclass
class Member:
    """One sequence joining a decode batch."""

    uid: str
    cache: list  # has consumed `tokens`
    tokens: list[int]  # what the cache holds: the prompt, then (after the first step) generated tokens
    first_token: int  # sampled from the prompt's logits, not yet fed to the model
    sampler: Callable
    processors: list
    stop_token_ids: list[int]
    max_tokens: int  # tokens still to generate after `first_token` (> 0)


@dataclass(frozen=True)
class Step:
    """One sequence's output of a decode step."""

    uid: str
    token: int
    logprobs: Any  # the row of log-probabilities the token was sampled from (an mx.array)
    finish_reason: Optional[str]  # "stop", "length" or None


class _Group(GenerationBatch):
    """A GenerationBatch whose only member may keep its own, unmerged cache (`plain`)."""

    plain = False

    def extract_cache(self, idx: int) -> list:
        if self.plain:
            return list(self.prompt_cache)  # a new list: `filter([])` clears the group's own
        return super().extract_cache(idx)

    def filter(self, keep: list[int]) -> None:
        if self.plain and keep:
            return  # its one member stays
        super().filter(keep)


class DecodeBatch:
    def __init__(self, model: Any, batchable: bool):
        self.model = model
        self.batchable = batchable
        self._groups: list[_Group] = []
        self._finished: dict[str, tuple[list, list[int]]] = {}

    def __len__(self) -> int:
        return sum(len(g.uids) for g in self._groups)

    @property
    def uids(self) -> list[str]:
        return [uid for g in self._groups for uid in g.uids]

    def add(self, member: Member) -> None:
        """Join `member`; its first decode step runs now (the new group's first forward pass)."""
        target = self._groups[0] if self.batchable and self._groups else None
        if target is not None and target.plain:
            target.prompt_cache = _merge_caches([target.prompt_cache])
            target.plain = False
        cache = _merge_caches([member.cache]) if target is not None else member.cache
        group = _Group(
            self.model,
            [member.uid],
            mx.array([member.first_token]),
            cache,
            [list(member.tokens)],
            [member.sampler],
            member.sampler,
            [tuple(member.processors)],
            [StopSequences([[t] for t in member.stop_token_ids])],
            [member.max_tokens],
        )
        group.plain = target is None
        if target is None:
            self._groups.append(group)
        else:
            target.extend(group)

    def step(self) -> list[Step]:
        """One decode step of every member: the tokens their caches have now consumed."""
        out: list[Step] = []
        for group in self._groups:
            for r in group.next():
                out.append(Step(r.uid, r.token, r.logprobs, r.finish_reason))
                if r.finish_reason is not None:
                    self._finished[r.uid] = (r.prompt_cache, r.all_tokens)
        self._groups = [g for g in self._groups if g.uids]
        return out

    def take_finished(self, uid: str) -> tuple[list, list[int]]:
        """The cache and tokens of a member that finished in the last step."""
        return self._finished.pop(uid)

    def remove(self, uid: str) -> tuple[list, list[int]]:
        """Take a member out mid-way (an abort): its cache and the tokens it has consumed."""
        for group in self._groups:
            if uid in group.uids:
                i = group.uids.index(uid)
                cache, tokens = group.extract_cache(i), list(group.tokens[i])
                group.filter([j for j in range(len(group.uids)) if j != i])
                self._groups = [g for g in self._groups if g.uids]
                return cache, tokens
        raise KeyError(uid)

    def view(self, uid: str) -> list:
        """A per-sequence cache of `uid` as it is now (a copy of its row when merged), for a fork."""
        for group in self._groups:
            if uid in group.uids:
                return group.extract_cache(group.uids.index(uid))
        raise KeyError(uid)
