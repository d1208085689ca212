"""Prometheus' standard `process_*` metrics of the proxy process, on Linux and on macOS.

prometheus_client's `ProcessCollector` reads /proc, which macOS has not: there the same
names come from `getrusage` (CPU seconds), libproc's task info (resident and virtual
memory), /dev/fd (open descriptors) and `getrlimit` (their limit). The start time is
when this module was imported, within a second of the process's start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import time
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_IMPORTED_AT = time.time()


def register_process_metrics(registry: CollectorRegistry) -> None:
    if os.path.exists("/proc/self/stat"):
        ProcessCollector(registry=registry)
    else:
        registry.register(PortableProcessCollector())


class PortableProcessCollector(Collector):
    """The `process_*` figures without /proc."""

    def collect(self) -> Iterable[Metric]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time spent in seconds.",
                                  value=usage.ru_utime + usage.ru_stime)  # fmt: skip
        yield GaugeMetricFamily("process_start_time_seconds",
                                "Start time of the process since unix epoch in seconds.", value=_IMPORTED_AT)
        memory = _task_memory()
        if memory is not None:
            yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", value=memory[0])
            yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                                    value=memory[1])  # fmt: skip
        try:
            open_fds = len(os.listdir("/dev/fd")) - 1  # less the one the listing itself opened
        except OSError:
            open_fds = None
        if open_fds is not None:
            yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=open_fds)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", value=soft)


class _TaskInfo(ctypes.Structure):
    """libproc's `struct proc_taskinfo` (sys/proc_info.h)."""

    _fields_ = [
        ("virtual_size", ctypes.c_uint64),
        ("resident_size", ctypes.c_uint64),
        ("total_user", ctypes.c_uint64),
        ("total_system", ctypes.c_uint64),
        ("threads_user", ctypes.c_uint64),
        ("threads_system", ctypes.c_uint64),
        *((name, ctypes.c_int32) for name in (
            "policy", "faults", "pageins", "cow_faults", "messages_sent", "messages_received",
            "syscalls_mach", "syscalls_unix", "csw", "threadnum", "numrunning", "priority",
        )),
    ]  # fmt: skip


_PROC_PIDTASKINFO = 4
_libproc: Optional[ctypes.CDLL] = None


def _task_memory() -> Optional[tuple[int, int]]:
    """(virtual, resident) bytes of this process from libproc (macOS); None elsewhere or on failure."""
    global _libproc
    if sys.platform != "darwin":
        return None
    try:
        if _libproc is None:
            libproc = ctypes.CDLL(ctypes.util.find_library("proc") or "/usr/lib/libproc.dylib", use_errno=True)
            # int proc_pidinfo(int pid, int flavor, uint64_t arg, void *buffer, int buffersize)
            libproc.proc_pidinfo.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int]
            libproc.proc_pidinfo.restype = ctypes.c_int
            _libproc = libproc
        info = _TaskInfo()
        size = _libproc.proc_pidinfo(os.getpid(), _PROC_PIDTASKINFO, 0, ctypes.byref(info), ctypes.sizeof(info))
    except (OSError, AttributeError):
        return None
    if size != ctypes.sizeof(info):
        return None
    return info.virtual_size, info.resident_size
