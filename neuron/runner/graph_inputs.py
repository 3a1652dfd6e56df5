"""GraphInputs: a CUDA graph bucket's input arrays in one device buffer, filled from one pinned twin.

A graph reads its inputs (token ids, positions, KV slots, block tables, context lengths, logits
rows) from fixed device addresses, so every turn copies the turn's values into them. One copy per
array was five host-to-device copies a decode turn, each with CuPy's per-call Python and a
driver call on the device thread, whose time is the host's share of every turn (the GIL it
shares with the neuron's event loop, bench/NOTES.md session 19). Here the arrays are views of one
device buffer and the turn's values are written into views of one pinned host buffer of the same
layout, which goes up in one queued copy.

The pinned buffer is read by the copy when the stream reaches it, so it is rewritten only after
its last copy has run (`stage` waits for that; in steady state long done: the copy preceded the
turn now on the device). On a CPU (tests) both buffers are host memory and the copy is a NumPy one.
"""
from __future__ import annotations

import numpy as np

ALIGN = 16   # bytes: every array starts at a multiple (int64 needs 8; 16 keeps vector loads aligned)


class GraphInputs:
    def __init__(self, xp, fields: dict[str, tuple[tuple[int, ...], type]]):
        """fields: name -> (shape, dtype). `device[name]` are the device arrays (allocated here, from
        the current allocator: the caller keeps them out of the graphs' private pool)."""
        self.xp = xp
        self._layout: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        offset = 0
        for name, (shape, dtype) in fields.items():
            dtype = np.dtype(dtype)
            self._layout[name] = (offset, shape, dtype)
            offset += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // ALIGN) * ALIGN
        self.nbytes = offset
        self._device_bytes = xp.zeros(offset, dtype=np.uint8)
        self._on_gpu = getattr(xp, "__name__", "") == "cupy"
        if self._on_gpu:
            import cupyx
            self._host_bytes = cupyx.empty_pinned(offset, dtype=np.uint8)
            self._host_bytes[:] = 0
        else:
            self._host_bytes = np.zeros(offset, dtype=np.uint8)
        self.device = {name: self._view(self._device_bytes, name) for name in fields}
        self._staged = {name: self._view(self._host_bytes, name) for name in fields}
        self._copied = None      # GPU: event after the last copy from the pinned buffer

    def _view(self, buffer, name: str):
        offset, shape, dtype = self._layout[name]
        count = int(np.prod(shape, dtype=np.int64))
        return buffer[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)

    def stage(self) -> dict[str, np.ndarray]:
        """The host arrays to write this turn's values into (what they held last turn until then)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._staged

    def upload(self) -> None:
        """The staged values into the device arrays: one copy, queued on the current stream."""
        if not self._on_gpu:
            np.copyto(self._device_bytes, self._host_bytes)
            return
        cuda = self.xp.cuda
        stream = cuda.get_current_stream()
        cuda.runtime.memcpyAsync(self._device_bytes.data.ptr, self._host_bytes.ctypes.data, self.nbytes,
                                 cuda.runtime.memcpyHostToDevice, stream.ptr)
        self._copied = cuda.Event(block=False, disable_timing=True)
        self._copied.record(stream)


def put(target: np.ndarray, values: np.ndarray, fill) -> None:
    """target[:len(values)] = values, the rest `fill` (a bucket's padding rows)."""
    n = len(values)
    target[:n] = values
    target[n:] = fill
