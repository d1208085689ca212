"""Snapshot / restore of mlx-lm cache objects, one small adapter per cache kind.

Every cache kind answers the same few verbs, so the pool never asks what kind a
layer is:

- `rewindable`: can be cut back to any earlier position without a snapshot
  (full-attention KV: only the offset moves, nothing is copied);
- `snapshot(cache)`: the layer's state at its current position (recurrent state,
  a sliding window), for layers that are not rewindable;
- `restore(cache, position, snap)`: the layer at `position`, from a rewind or a snapshot;
- `fork(cache, position, snap)`: a new layer object holding the state at `position`,
  leaving `cache` untouched (KV shares its prefix until the new layer writes);
- `nbytes(cache)`.

MLX arrays have value semantics: `cache.keys[..., i:j, :] = x` rebinds the cache's
own array object, it never changes another object that shares the buffer (MLX
copies on write when a buffer is shared). So a snapshot only has to hold its own
array objects, and restoring hands the cache fresh objects (`x[:]`), never ours.

A new cache kind needs one new adapter class here and one line in `_ADAPTERS`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as mlc

log = logging.getLogger("mlx_cache_proxy.worker")


class UnsupportedCache(Exception):
    """A model uses a cache kind no adapter handles; it runs uncached."""


def _own(x: Any) -> Any:
    """A new array object with the same value (no copy until someone writes)."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(_own(v) for v in x)
    return x[:]


def _nbytes(x: Any) -> int:
    if x is None:
        return 0
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return x.nbytes


class LayerAdapter:
    rewindable = False

    def snapshot(self, cache: Any) -> Any:
        raise NotImplementedError

    def restore(self, cache: Any, position: int, snap: Any) -> Any:
        raise NotImplementedError

    def fork(self, cache: Any, position: int, snap: Any) -> Any:
        return self.restore(None, position, snap)

    def snapshot_nbytes(self, snap: Any) -> int:
        return 0

    def compact(self, cache: Any) -> Any:
        """Own buffers of exactly the held length (after a fork, which shares the source's)."""
        return cache

    def nbytes(self, cache: Any) -> int:
        return cache.nbytes

    def layout_bytes(self, cache: Any) -> tuple[int, int]:
        """(KV bytes one more token adds, bytes of a full snapshot) of a layer that has seen tokens."""
        raise NotImplementedError

    # Plain-array forms, for the disk tier: (name -> array, JSON-able meta).
    def export_kv(self, cache: Any, end: int) -> tuple[dict, dict]:
        return {}, {}

    def import_kv(self, arrays: dict, meta: dict, position: int) -> Any:
        raise NotImplementedError

    def export_snapshot(self, snap: Any) -> tuple[dict, dict]:
        return {}, {}

    def import_snapshot(self, arrays: dict, meta: dict) -> Any:
        return None


def _per_token(keys: Any, values: Any) -> int:
    """Bytes per token position of a (B, heads, positions, dim) buffer pair (or quantized tuples)."""
    first = keys[0] if isinstance(keys, (tuple, list)) else keys
    return _nbytes((keys, values)) // max(1, first.shape[-2])


class KVAdapter(LayerAdapter):
    """KVCache, QuantizedKVCache, ConcatenateKVCache: trimmed by moving the offset."""

    rewindable = True

    def snapshot(self, cache: Any) -> None:
        return None

    def restore(self, cache: Any, position: int, snap: Any) -> Any:
        if position > cache.offset:
            raise ValueError(f"cannot rewind a KV cache at {cache.offset} forward to {position}")
        cache.trim(cache.offset - position)
        return cache

    def fork(self, cache: Any, position: int, snap: Any) -> Any:
        new = type(cache).__new__(type(cache))
        new.__dict__.update(cache.__dict__)
        if cache.keys is not None:
            # Views of the prefix: the first write past `position` grows the
            # buffer with a concatenate, which copies the prefix once.
            new.keys, new.values = _slice_seq(cache.keys, position), _slice_seq(cache.values, position)
        new.offset = position
        return new

    def nbytes(self, cache: Any) -> int:
        return 0 if cache.keys is None else _nbytes((cache.keys, cache.values))

    def compact(self, cache: Any) -> Any:
        if cache.keys is not None:
            keys, values = _slice_seq(cache.keys, cache.offset), _slice_seq(cache.values, cache.offset)
            cache.keys, cache.values = _contiguous(keys), _contiguous(values)
        return cache

    def layout_bytes(self, cache: Any) -> tuple[int, int]:
        return _per_token(cache.keys, cache.values), 0

    def export_kv(self, cache: Any, end: int) -> tuple[dict, dict]:
        meta = {"class": type(cache).__name__}
        if isinstance(cache, mlc.QuantizedKVCache):
            meta.update(group_size=cache.group_size, bits=cache.bits)
        if cache.keys is None:
            return {}, meta
        keys, values = _slice_seq(cache.keys, end), _slice_seq(cache.values, end)
        return {**_flat("k", keys), **_flat("v", values)}, meta

    def import_kv(self, arrays: dict, meta: dict, position: int) -> Any:
        cls = {c.__name__: c for c in (mlc.KVCache, mlc.QuantizedKVCache, mlc.ConcatenateKVCache)}[meta["class"]]
        cache = cls(group_size=meta["group_size"], bits=meta["bits"]) if cls is mlc.QuantizedKVCache else cls()
        if arrays:
            cache.keys = _slice_seq(_unflat("k", arrays), position)
            cache.values = _slice_seq(_unflat("v", arrays), position)
        cache.offset = position
        return cache


def _flat(prefix: str, x: Any) -> dict:
    if isinstance(x, (tuple, list)):
        return {f"{prefix}.{i}": v for i, v in enumerate(x)}
    return {prefix: x}


def _unflat(prefix: str, arrays: dict) -> Any:
    if prefix in arrays:
        return arrays[prefix]
    parts = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in arrays.items() if k.startswith(prefix + "."))
    return tuple(v for _, v in parts)


def _contiguous(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return type(x)(mx.contiguous(v) for v in x)
    return mx.contiguous(x)


def _slice_seq(x: Any, position: int) -> Any:
    if isinstance(x, (tuple, list)):
        return type(x)(v[..., :position, :] for v in x)
    return x[..., :position, :]


@dataclass(frozen=True)
class _WindowState:
    keys: Any
    values: Any
    meta: tuple


class _WindowAdapter(LayerAdapter):
    def snapshot_nbytes(self, snap: _WindowState) -> int:
        return _nbytes((snap.keys, snap.values))

    def export_snapshot(self, snap: _WindowState) -> tuple[dict, dict]:
        arrays = {} if snap.keys is None else {"k": snap.keys, "v": snap.values}
        return arrays, {"meta": list(snap.meta)}

    def import_snapshot(self, arrays: dict, meta: dict) -> _WindowState:
        return _WindowState(arrays.get("k"), arrays.get("v"), tuple(meta["meta"]))


class RotatingAdapter(_WindowAdapter):
    """RotatingKVCache (sliding window): the window is gone once passed, so snapshot it."""

    def snapshot(self, cache: Any) -> _WindowState:
        return _WindowState(_own(cache.keys), _own(cache.values), (cache.offset, cache.keep, cache.max_size, cache._idx))

    def restore(self, cache: Any, position: int, snap: _WindowState) -> Any:
        offset, keep, max_size, idx = snap.meta
        if offset != position:
            raise ValueError(f"snapshot at {offset} restored at {position}")
        new = mlc.RotatingKVCache(max_size=max_size, keep=keep)
        new.keys, new.values, new.offset, new._idx = _own(snap.keys), _own(snap.values), offset, idx
        return new

    def layout_bytes(self, cache: Any) -> tuple[int, int]:
        return 0, _per_token(cache.keys, cache.values) * cache.max_size


class ChunkedAdapter(_WindowAdapter):
    """ChunkedKVCache (chunked attention): the front is dropped, so snapshot it."""

    def snapshot(self, cache: Any) -> _WindowState:
        return _WindowState(_own(cache.keys), _own(cache.values), (cache.offset, cache.chunk_size, cache.start_position))

    def restore(self, cache: Any, position: int, snap: _WindowState) -> Any:
        offset, chunk_size, start = snap.meta
        if offset != position:
            raise ValueError(f"snapshot at {offset} restored at {position}")
        new = mlc.ChunkedKVCache(chunk_size)
        new.keys, new.values, new.offset, new.start_position = _own(snap.keys), _own(snap.values), offset, start
        return new

    def layout_bytes(self, cache: Any) -> tuple[int, int]:
        return 0, _per_token(cache.keys, cache.values) * cache.chunk_size


class ArraysAdapter(LayerAdapter):
    """ArraysCache (Gated DeltaNet, Mamba, conv state): recurrent, cannot be rolled back.

    The models replace list items (`cache[1] = state`), never write into the
    arrays, so a snapshot is the list of current arrays made compact: a conv
    state can be a view into the whole chunk's input, which we must not keep alive.
    """

    def snapshot(self, cache: Any) -> list:
        return [None if a is None else mx.contiguous(a) for a in cache.cache]

    def restore(self, cache: Any, position: int, snap: list) -> Any:
        new = mlc.ArraysCache(len(snap))
        new.cache = list(snap)
        return new

    def snapshot_nbytes(self, snap: list) -> int:
        return _nbytes(snap)

    def layout_bytes(self, cache: Any) -> tuple[int, int]:
        return 0, _nbytes(cache.cache)

    def export_snapshot(self, snap: list) -> tuple[dict, dict]:
        return {str(i): a for i, a in enumerate(snap) if a is not None}, {"size": len(snap)}

    def import_snapshot(self, arrays: dict, meta: dict) -> list:
        return [arrays.get(str(i)) for i in range(meta["size"])]


class CacheListAdapter(LayerAdapter):
    """CacheList (e.g. Falcon-H1: Mamba state + attention KV in one layer): per child."""

    def __init__(self, children: list[LayerAdapter]):
        self.children = children
        self.rewindable = all(c.rewindable for c in children)

    def snapshot(self, cache: Any) -> list:
        return [None if a.rewindable else a.snapshot(c) for a, c in zip(self.children, cache.caches)]

    def restore(self, cache: Any, position: int, snap: list) -> Any:
        snap = snap or [None] * len(self.children)
        cache.caches = tuple(a.restore(c, position, s) for a, c, s in zip(self.children, cache.caches, snap))
        return cache

    def fork(self, cache: Any, position: int, snap: list) -> Any:
        snap = snap or [None] * len(self.children)
        return mlc.CacheList(*(a.fork(c, position, s) for a, c, s in zip(self.children, cache.caches, snap)))

    def snapshot_nbytes(self, snap: list) -> int:
        return sum(a.snapshot_nbytes(s) for a, s in zip(self.children, snap or []) if s is not None)

    def compact(self, cache: Any) -> Any:
        cache.caches = tuple(a.compact(c) for a, c in zip(self.children, cache.caches))
        return cache

    def nbytes(self, cache: Any) -> int:
        return sum(a.nbytes(c) for a, c in zip(self.children, cache.caches))

    def layout_bytes(self, cache: Any) -> tuple[int, int]:
        pairs = [a.layout_bytes(c) for a, c in zip(self.children, cache.caches)]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def export_kv(self, cache: Any, end: int) -> tuple[dict, dict]:
        return _export_children([a.export_kv(c, end) for a, c in zip(self.children, cache.caches)])

    def import_kv(self, arrays: dict, meta: dict, position: int) -> Any:
        parts = _import_children(arrays, meta, len(self.children))
        # Only called when every child rewinds; otherwise the model path goes through restore().
        return mlc.CacheList(*(a.import_kv(arr, m, position) for a, (arr, m) in zip(self.children, parts)))

    def export_snapshot(self, snap: list) -> tuple[dict, dict]:
        return _export_children([a.export_snapshot(s) if s is not None else ({}, {}) for a, s in zip(self.children, snap)])

    def import_snapshot(self, arrays: dict, meta: dict) -> list:
        parts = _import_children(arrays, meta, len(self.children))
        return [None if a.rewindable else a.import_snapshot(arr, m) for a, (arr, m) in zip(self.children, parts)]

    def import_state(self, kv: tuple[dict, dict], snap: tuple[dict, dict], position: int) -> Any:
        """A CacheList at `position` from its children's KV and snapshot forms."""
        kv_parts = _import_children(*kv, len(self.children))
        snap_parts = _import_children(*snap, len(self.children))
        layers = []
        for a, (karr, kmeta), (sarr, smeta) in zip(self.children, kv_parts, snap_parts):
            if a.rewindable:
                layers.append(a.import_kv(karr, kmeta, position))
            else:
                layers.append(a.restore(None, position, a.import_snapshot(sarr, smeta)))
        return mlc.CacheList(*layers)


def _export_children(parts: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    arrays = {f"c{i}.{k}": v for i, (arr, _) in enumerate(parts) for k, v in arr.items()}
    return arrays, {"children": [m for _, m in parts]}


def _import_children(arrays: dict, meta: dict, count: int) -> list[tuple[dict, dict]]:
    metas = meta.get("children") or [{}] * count
    out = []
    for i in range(count):
        prefix = f"c{i}."
        out.append(({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, metas[i]))
    return out


_ADAPTERS: dict[type, type[LayerAdapter]] = {
    mlc.KVCache: KVAdapter,
    mlc.QuantizedKVCache: KVAdapter,
    mlc.ConcatenateKVCache: KVAdapter,
    mlc.RotatingKVCache: RotatingAdapter,
    mlc.ChunkedKVCache: ChunkedAdapter,
    mlc.ArraysCache: ArraysAdapter,
}


def adapter_for(cache: Any) -> LayerAdapter:
    if isinstance(cache, mlc.CacheList):
        return CacheListAdapter([adapter_for(c) for c in cache.caches])
    adapter = _ADAPTERS.get(type(cache))
    if adapter is None:
        raise UnsupportedCache(type(cache).__name__)
    return adapter()


def kind_name(cache: Any) -> str:
    if isinstance(cache, mlc.CacheList):
        return "CacheList(" + ",".join(kind_name(c) for c in cache.caches) + ")"
    return type(cache).__name__


def measure_layout(cache: list) -> tuple[int, int]:
    """(KV bytes per token, bytes of one model snapshot) from a cache that has seen a token.

    Layers no adapter handles count nothing (the model then runs uncached anyway).
    """
    kv, snap = 0, 0
    for layer in cache:
        try:
            per_token, snapshot = adapter_for(layer).layout_bytes(layer)
        except UnsupportedCache:
            continue
        kv, snap = kv + per_token, snap + snapshot
    return kv, snap


@dataclass(frozen=True)
class ModelSnapshot:
    """The non-rewindable layers of a whole model cache at one position."""

    position: int
    layers: list  # per layer: the adapter's snapshot, or None for rewindable layers
    nbytes: int


class ModelCacheOps:
    """The pool's view of one model's cache: the per-layer adapters applied to the whole list."""

    def __init__(self, model: Any):
        self._model = model
        template = model.make_cache()
        self.layer_kinds = [kind_name(c) for c in template]
        self.adapters = [adapter_for(c) for c in template]  # raises UnsupportedCache
        self.needs_snapshots = not all(a.rewindable for a in self.adapters)

    def new_cache(self) -> list:
        return self._model.make_cache()

    def snapshot(self, cache: list, position: int) -> ModelSnapshot:
        layers = [None if a.rewindable else a.snapshot(c) for a, c in zip(self.adapters, cache)]
        nbytes = sum(a.snapshot_nbytes(s) for a, s in zip(self.adapters, layers) if s is not None)
        return ModelSnapshot(position, layers, nbytes)

    def restore(self, cache: list, position: int, snap: ModelSnapshot | None) -> list:
        """Bring `cache` (in place) back to `position`."""
        layers = self._snapshot_layers(position, snap)
        for i, (a, s) in enumerate(zip(self.adapters, layers)):
            cache[i] = a.restore(cache[i], position, s)
        return cache

    def fork(self, cache: list, position: int, snap: ModelSnapshot | None) -> list:
        """A new cache at `position`, sharing what it can with `cache`, which stays as it is."""
        layers = self._snapshot_layers(position, snap)
        return [a.fork(c, position, s) for a, c, s in zip(self.adapters, cache, layers)]

    def compact(self, cache: list) -> list:
        """KV buffers of exactly the held length (they grow in steps of 256 tokens)."""
        new = [a.compact(c) for a, c in zip(self.adapters, cache)]
        mx.eval([c.state for c in new])
        return new

    def shrink(self, cache: list, position: int, snap: ModelSnapshot | None) -> list:
        """`cache` cut back to `position` into buffers of exactly that length, freeing the rest."""
        new = [a.compact(c) for a, c in zip(self.adapters, self.fork(cache, position, snap))]
        mx.eval([c.state for c in new])
        return new

    def _snapshot_layers(self, position: int, snap: ModelSnapshot | None) -> list:
        if snap is None:
            if self.needs_snapshots:
                raise ValueError(f"position {position} needs a snapshot for this model")
            return [None] * len(self.adapters)
        if snap.position != position:
            raise ValueError(f"snapshot at {snap.position} used for {position}")
        return snap.layers

    def nbytes(self, cache: list) -> int:
        return sum(a.nbytes(c) for a, c in zip(self.adapters, cache))

    def eval_state(self, cache: list) -> None:
        mx.eval([c.state for c in cache])
