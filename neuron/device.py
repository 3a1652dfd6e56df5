"""Devices: parsing `--devices`, and the per-device backend (array module, memory, dtypes).

A Backend is created on its DeviceWorker's thread and only used there: for CUDA it makes the device
current on that thread, and owns the CuPy memory pool that shards allocate from.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from common.dtypes import DTYPES
from common.errors import InvalidArgument

CPU_DTYPES = ("float32",)  # NumPy has no fast half-precision matmul; half dtypes are for GPUs


@dataclass(frozen=True)
class DeviceSpec:
    id: str          # "0", "1", ... or "cpu", "cpu:0", ...
    kind: str        # "cuda" or "cpu"
    index: int


def cuda_device_count() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no CuPy, no driver or no device all mean "no GPUs"
        return 0


def parse_devices(arg: str | None) -> list[DeviceSpec]:
    """'cpu' | 'cpu:0,cpu:1' | '0,1' | 'all' | None (all GPUs if CuPy sees any, else cpu)."""
    if arg in (None, "", "all"):
        count = cuda_device_count()
        return [DeviceSpec(str(i), "cuda", i) for i in range(count)] or [DeviceSpec("cpu", "cpu", 0)]
    specs = []
    for item in (s.strip() for s in arg.split(",") if s.strip()):
        if item == "cpu":
            specs.append(DeviceSpec("cpu", "cpu", 0))
        elif item.startswith("cpu:") and item[4:].isdigit():
            specs.append(DeviceSpec(item, "cpu", int(item[4:])))
        elif item.isdigit():
            specs.append(DeviceSpec(item, "cuda", int(item)))
        else:
            raise ValueError(f"bad device {item!r}: use cpu, cpu:N or a GPU index N")
    if len({s.id for s in specs}) != len(specs):
        raise ValueError(f"device list {arg!r} repeats a device")
    count = None
    for s in specs:
        if s.kind == "cuda":
            count = cuda_device_count() if count is None else count
            if s.index >= count:
                raise ValueError(f"GPU {s.index} does not exist (CuPy sees {count} GPU(s))")
    return specs


def resolve_dtype(requested: str, config_dtype: str, kind: str) -> str:
    """The dtype a shard uses: the request's, else the checkpoint's on GPU, float32 on CPU."""
    if requested:
        if requested not in DTYPES:
            raise InvalidArgument(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
        if kind == "cpu" and requested not in CPU_DTYPES:
            raise InvalidArgument(f"dtype {requested} is not supported on CPU devices; use float32 (or a GPU device)")
        return requested
    if kind == "cpu":
        return "float32"
    return config_dtype if config_dtype in DTYPES else "bfloat16"


class CpuBackend:
    """NumPy. Memory is a budget (a share of system RAM, or --cpu-memory-gb) that shards draw on,
    so placement and out-of-memory paths behave as on a GPU.

    The CPU devices of a process share one host's RAM: each reports as free at most its share of
    what the host has available now (MemAvailable / the CPU devices alive), never the whole of it,
    so placement does not count the same free bytes once per device."""
    kind = "cpu"
    _alive = 0
    _alive_lock = threading.Lock()

    def __init__(self, spec: DeviceSpec, budget_bytes: int):
        self.spec, self.xp, self.name = spec, np, "cpu (numpy)"
        self.total = budget_bytes
        self.used = 0
        with CpuBackend._alive_lock:
            CpuBackend._alive += 1
        self._closed = False

    def memory(self) -> tuple[int, int]:
        share = available_memory_bytes() // max(CpuBackend._alive, 1)
        return self.total, max(min(self.total - self.used, share), 0)

    def synchronize(self) -> None:
        pass

    def release_cached(self) -> None:
        pass

    def close(self) -> None:
        with CpuBackend._alive_lock:
            if not self._closed:
                self._closed = True
                CpuBackend._alive -= 1


class CudaBackend:
    kind = "cuda"

    def __init__(self, spec: DeviceSpec):
        import cupy

        self.spec, self.xp = spec, cupy
        self.device = cupy.cuda.Device(spec.index)
        self.device.use()  # current for this (the worker's) thread from now on
        self.pool = cupy.get_default_memory_pool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.stream.use()
        self.name = cupy.cuda.runtime.getDeviceProperties(spec.index)["name"].decode()
        self.used = 0

    def memory(self) -> tuple[int, int]:
        free, total = self.xp.cuda.runtime.memGetInfo()
        return total, free + self.pool.free_bytes()  # pooled-but-unused blocks are ours to reuse

    def synchronize(self) -> None:
        self.stream.synchronize()

    def release_cached(self) -> None:
        self.synchronize()
        self.pool.free_all_blocks()
        self.xp.get_default_pinned_memory_pool().free_all_blocks()

    def close(self) -> None:
        self.release_cached()


def system_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_available = (0.0, 0)  # (when read, bytes): read at most every AVAILABLE_REFRESH_S
AVAILABLE_REFRESH_S = 1.0


def available_memory_bytes() -> int:
    """What the host can still give out: /proc/meminfo's MemAvailable (page cache counts as free),
    else the free pages. Cached for a second: workers ask after every turn."""
    global _available
    read_at, value = _available
    now = time.monotonic()
    if now - read_at < AVAILABLE_REFRESH_S and value:
        return value
    try:
        with open("/proc/meminfo") as f:
            value = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        value = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    _available = (now, value)
    return value
