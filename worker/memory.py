"""Memory figures of the worker process, read from MLX and the OS.

MLX moved its memory functions from `mx.metal.*` to `mx.*`; we look them up
by name in both places so the worker runs on old and new MLX, on Apple silicon
and on the Linux CPU build (where `mx.device_info()` knows no memory size).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Optional

import mlx.core as mx

from protocol.messages import MemoryStats

log = logging.getLogger(__name__)


def _mlx_function(name: str) -> Optional[Callable[..., Any]]:
    fn = getattr(mx, name, None)
    if fn is None:
        fn = getattr(getattr(mx, "metal", None), name, None)
    return fn


def _read(name: str) -> int:
    fn = _mlx_function(name)
    if fn is None:
        return 0
    try:
        return int(fn())
    except Exception:  # an MLX build without this allocator figure
        return 0


def _device_info() -> dict[str, Any]:
    fn = _mlx_function("device_info")
    if fn is None:
        return {}
    try:
        return dict(fn())
    except Exception:
        return {}


def _physical_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _gpu_available() -> bool:
    is_available = getattr(getattr(mx, "metal", None), "is_available", None)
    try:
        return bool(is_available()) if is_available else False
    except Exception:
        return False


def memory_stats(pool_bytes: int) -> MemoryStats:
    info = _device_info()
    return MemoryStats(
        active=_read("get_active_memory"),
        peak=_read("get_peak_memory"),
        cache=_read("get_cache_memory"),
        device_total=int(info.get("memory_size") or _physical_ram()),
        recommended_working_set=int(info.get("max_recommended_working_set_size") or 0),
        pool_bytes=int(pool_bytes),
    )


def apply_memory_limit(limit_bytes: int) -> None:
    """Cap MLX's allocations at `limit_bytes`; on a Mac GPU also keep that much wired.

    Missing functions (old MLX, CPU build) are skipped with a log line, never an error.
    """
    set_limit = _mlx_function("set_memory_limit")
    if set_limit is None:
        log.warning("this MLX has no set_memory_limit; memory limit %d not applied", limit_bytes)
    else:
        set_limit(int(limit_bytes))
    if sys.platform != "darwin" or not _gpu_available():
        return
    set_wired = _mlx_function("set_wired_limit")
    if set_wired is None:
        return
    # Asking for more than the system wired limit is an error in MLX.
    ceiling = int(_device_info().get("max_recommended_working_set_size") or 0)
    wired = min(int(limit_bytes), ceiling) if ceiling else int(limit_bytes)
    try:
        set_wired(wired)
    except Exception as exc:
        log.warning("could not set the wired limit to %d bytes: %s", wired, exc)
