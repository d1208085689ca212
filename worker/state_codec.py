"""A stored sequence as flat arrays, and back: the disk tier's view of a model cache.

A sequence is written once with its full-attention KV (up to its end) and the
snapshots of the other layers at each of its checkpoint positions; it can then be
brought back at any of those positions (KV-only models: at any position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from worker.cache_adapters import CacheListAdapter, ModelCacheOps, ModelSnapshot


@dataclass(frozen=True)
class SavedPoint:
    position: int
    kind: str
    snapshot: ModelSnapshot | None
    logits: Any = None


def export_sequence(ops: ModelCacheOps, cache: list, end: int, points: list[SavedPoint]) -> tuple[dict, dict]:
    """(name -> mx.array, JSON-able meta) for `cache` (which has consumed `end` tokens) and its points."""
    arrays: dict[str, Any] = {}
    layer_meta = []
    for i, (adapter, layer) in enumerate(zip(ops.adapters, cache)):
        kv, meta = adapter.export_kv(layer, end)
        arrays.update({f"L{i}.kv.{k}": v for k, v in kv.items()})
        layer_meta.append(meta)
    point_meta = []
    for point in points:
        metas = []
        for i, adapter in enumerate(ops.adapters):
            snap = point.snapshot.layers[i] if point.snapshot is not None else None
            if snap is None:
                metas.append(None)
                continue
            snap_arrays, meta = adapter.export_snapshot(snap)
            arrays.update({f"P{point.position}.L{i}.{k}": v for k, v in snap_arrays.items()})
            metas.append(meta)
        if point.logits is not None:
            arrays[f"P{point.position}.logits"] = point.logits
        point_meta.append(
            {"position": point.position, "kind": point.kind, "layers": metas, "logits": point.logits is not None}
        )
    return arrays, {"layers": layer_meta, "points": point_meta}


def import_at(ops: ModelCacheOps, arrays: dict, meta: dict, position: int) -> tuple[list, Any, ModelSnapshot | None]:
    """(cache at `position`, logits stored there or None, the snapshot there) from exported arrays."""
    point = next((p for p in meta["points"] if p["position"] == position), None)
    if point is None and ops.needs_snapshots:
        raise ValueError(f"no saved point at {position}")
    cache = []
    snap_layers = []
    for i, adapter in enumerate(ops.adapters):
        kv = (_under(arrays, f"L{i}.kv."), meta["layers"][i])
        snap_meta = point["layers"][i] if point is not None else None
        snap_form = (_under(arrays, f"P{position}.L{i}."), snap_meta or {})
        if isinstance(adapter, CacheListAdapter):
            layer = adapter.import_state(kv, snap_form, position)
            snap_layers.append(None if adapter.rewindable else adapter.import_snapshot(*snap_form))
        elif adapter.rewindable:
            layer = adapter.import_kv(*kv, position)
            snap_layers.append(None)
        else:
            snap = adapter.import_snapshot(*snap_form)
            layer = adapter.restore(None, position, snap)
            snap_layers.append(snap)
        cache.append(layer)
    logits = arrays.get(f"P{position}.logits") if point is not None and point["logits"] else None
    snapshot = None
    if ops.needs_snapshots:
        nbytes = sum(a.snapshot_nbytes(s) for a, s in zip(ops.adapters, snap_layers) if s is not None)
        snapshot = ModelSnapshot(position, snap_layers, nbytes)
    return cache, logits, snapshot


def _under(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


# ------------------------------------------------------------------ host copies

# numpy has no bfloat16: such arrays travel as their uint16 bits.
_AS_BITS = {mx.bfloat16: mx.uint16}


def host_ready(arrays: dict) -> dict[str, tuple[Any, str]]:
    """Evaluated arrays another thread can copy to the host without running MLX ops.

    name -> (array, mlx dtype name). Called on the model thread; bfloat16 arrays
    are viewed as their bits here, so the reader needs no MLX op of its own.
    """
    out = {}
    for name, a in arrays.items():
        bits = _AS_BITS.get(a.dtype)
        out[name] = (a.view(bits) if bits is not None else a, str(a.dtype).removeprefix("mlx.core."))
    mx.eval([a for a, _ in out.values()])
    return out


def from_ready(arrays: dict[str, tuple[Any, str]]) -> dict:
    """The arrays `host_ready` made, back in their own dtypes (for a write not yet on disk)."""
    out = {}
    for name, (a, dtype) in arrays.items():
        target = getattr(mx, dtype)
        out[name] = a.view(target) if a.dtype != target else a
    return out


def from_host(arrays: dict[str, tuple[np.ndarray, str]]) -> dict:
    out = {}
    for name, (host, dtype) in arrays.items():
        a = mx.array(host)
        target = getattr(mx, dtype)
        out[name] = a.view(target) if a.dtype != target else a
    return out
