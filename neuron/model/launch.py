"""Kernel launches with programmatic dependent launch (PDL), which CuPy cannot ask for.

A kernel launched with PDL may start while the kernel before it in the stream is still finishing:
its blocks are placed as soon as every block of that kernel has started (or called
griddepcontrol.launch_dependents), and it issues what does not depend on that kernel (a GEMV's
weight loads) before `pdl_wait()` in kernels.py returns. Inside a CUDA graph the dependency becomes
a programmatic edge, so replays keep the overlap. It saves the launch gap and the ramp of each such
kernel (a few microseconds each, ~10 kernels per layer at batch 1).

Launched through the driver's cuLaunchKernelEx with ctypes; structures as in cuda.h (CUDA 12/13).
Every kernel launched this way must call pdl_wait() before it reads anything an earlier kernel wrote.
"""
from __future__ import annotations

import ctypes
import struct

import numpy as np

CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte union of values
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class LaunchConfig(ctypes.Structure):
    # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def kernel_arg(value):
    """A kernel argument as the ctypes value cuLaunchKernelEx points at: device arrays and plain ints
    (pointers; 0 for none) as 64-bit addresses, NumPy scalars as their own type."""
    if isinstance(value, np.int32):
        return ctypes.c_int32(int(value))
    if isinstance(value, np.float32):
        return ctypes.c_float(float(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return ctypes.c_uint64(value)
    data = getattr(value, "data", None)
    if data is not None and hasattr(data, "ptr"):
        return ctypes.c_uint64(data.ptr)
    raise TypeError(f"kernel argument of type {type(value).__name__}: pass np.int32, np.float32, "
                    "a device array or a pointer")


class PdlLauncher:
    """cuLaunchKernelEx with the programmatic-stream-serialization attribute."""

    def __init__(self):
        self._cuda = ctypes.CDLL("libcuda.so.1")
        self._launch = self._cuda.cuLaunchKernelEx
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p,
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        self._attr = LaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                                     value=struct.pack("i", 1).ljust(64, b"\0"))

    def __call__(self, function_ptr: int, grid: tuple, block: tuple, args: tuple, shared_mem: int,
                 stream_ptr: int) -> None:
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        config = LaunchConfig(*grid, *block, shared_mem, stream_ptr, ctypes.pointer(self._attr), 1)
        values = [kernel_arg(a) for a in args]
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        err = self._launch(ctypes.byref(config), function_ptr, params, None)
        if err:
            name = ctypes.c_char_p()
            self._cuda.cuGetErrorString(err, ctypes.byref(name))
            raise RuntimeError(f"cuLaunchKernelEx failed: {err} {(name.value or b'').decode()}")
