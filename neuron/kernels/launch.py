"""Kernel launches with programmatic dependent launch (PDL, sm_90 and later) inside decode graphs.

A graph of one-row decode turns is ~230 short kernels (the 8B), each of which waited for the one
before it to finish before its blocks were even scheduled, and then waited again for its first
weights to come from HBM. A kernel launched here instead may start while the kernel before it
runs: its blocks first request what does not depend on that kernel (weights), then wait in
`griddepcontrol.wait` (kernels/dtype.cuh `pdl_wait`, the GEMV source's copy) until it has finished
and its writes are visible. Each such kernel lets its own dependents start early with
`griddepcontrol.launch_dependents` (`pdl_trigger`) as its first instruction.

Only kernels that call `pdl_wait` before reading any output of an earlier kernel (and before any
write) may be launched this way: the GEMVs, the rotary + KV write and the paged attention kernels.
`programmatic_launches()` turns it on for the calling thread (DecodeGraphs, while it captures);
elsewhere `launch` is CuPy's ordinary launch. In a kernel launched normally `griddepcontrol.wait`
waits for nothing, but it is not free per block: kernels of many blocks (rope, attention) take a
`pdl` argument and run the instructions only when launched programmatically.

CuPy's launcher has no launch attributes, so this calls the driver's cuLaunchKernelEx by ctypes
with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION; captured into a graph, that becomes a
programmatic edge.
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager

import numpy as np

CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6

_state = threading.local()
_driver = None
_lock = threading.Lock()


class _LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: the id, padded to 8 bytes, then a 64-byte union (its first int is
    # programmaticStreamSerializationAllowed)
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_pad", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


def _libcuda():
    global _driver
    with _lock:
        if _driver is None:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                             ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
            lib.cuLaunchKernelEx.restype = ctypes.c_int
            _driver = lib
        return _driver


@contextmanager
def programmatic_launches(enabled: bool = True):
    """`launch` on this thread uses PDL inside the block (when `enabled`)."""
    before = getattr(_state, "on", False)
    _state.on = enabled
    try:
        yield
    finally:
        _state.on = before


def programmatic() -> bool:
    """Whether `launch` on this thread launches programmatically now."""
    return getattr(_state, "on", False)


def pack_argument(arg):
    """A kernel argument as the ctypes value whose bytes the kernel's parameter takes, as CuPy passes
    it: an array its device pointer, a NumPy scalar its own bytes, a Python int 64 bits (the
    launchers pass pointers, or 0 for none, that way)."""
    if hasattr(arg, "data") and hasattr(arg.data, "ptr"):
        return ctypes.c_void_p(arg.data.ptr)
    if isinstance(arg, np.generic):
        return (ctypes.c_char * arg.nbytes).from_buffer_copy(arg.tobytes())
    if isinstance(arg, (bool, float)):
        raise TypeError(f"kernel argument {arg!r}: pass a NumPy scalar of the parameter's type")
    if isinstance(arg, int):
        return ctypes.c_int64(arg)
    raise TypeError(f"kernel argument of type {type(arg).__name__}")


def launch(kernel, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
    """kernel (a CuPy RawKernel) over grid x block on the current stream: with PDL when this thread
    is inside `programmatic_launches`, else as CuPy launches it."""
    if not programmatic():
        kernel(grid, block, args, shared_mem=shared_mem)
        return
    import cupy

    grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
    values = [pack_argument(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    attribute = _LaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig(*grid, *block, shared_mem, cupy.cuda.get_current_stream().ptr,
                           ctypes.pointer(attribute), 1)
    status = _libcuda().cuLaunchKernelEx(ctypes.byref(config), kernel.kernel.ptr, pointers, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx of {kernel.name} failed: CUresult {status}")
