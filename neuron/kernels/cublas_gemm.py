"""x @ W.T on the GPU through cuBLAS, called with ctypes so that it can be captured in a CUDA graph.

CuPy's cuBLAS bindings refuse every call while a stream is being captured ("calling cuBLAS API
during stream capture is currently unsupported"), which kept the engine's decode turn out of CUDA
graphs. cuBLAS itself supports capture once its handle has a workspace of the caller's
(cublasSetWorkspace: no allocation inside the capture), so this module binds the four entry points
it needs from the libcublas that CuPy already loaded, on a handle of its own per device.

Row-major `y[M, N] = x[M, K] @ W[N, K]^T` is column-major `y^T = W · x^T`: one cublasGemmEx with
op(A) = T on W (lda K) and op(B) = N on x (ldb K), float32 accumulation, one rounding to y's dtype:
what CuPy's matmul computes.
"""
from __future__ import annotations

import ctypes
import os
import threading

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUDA_DATA_TYPES = {"bfloat16": 14, "float16": 2, "float32": 0}
WORKSPACE_BYTES = 32 << 20    # what cuBLAS recommends for Hopper (cuBLAS docs, cublasSetWorkspace)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_per_device: dict[int, "CublasGemm"] = {}


def _load_library() -> ctypes.CDLL:
    """The libcublas CuPy linked against (found in this process's mappings), else one by soname."""
    import cupy_backends.cuda.libs.cublas  # noqa: F401 - maps libcublas into the process
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rsplit(maxsplit=1)[-1]
            if os.path.basename(path).startswith("libcublas.so"):
                return ctypes.CDLL(path)
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("libcublas is not loaded and none was found by name")


def _bind(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
    lib.cublasDestroy_v2.argtypes = [p]
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
    lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
    for name in ("cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2", "cublasGemmEx"):
        getattr(lib, name).restype = i


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: cuBLAS status {status}")


class CublasGemm:
    """One cuBLAS handle and workspace on the current device; `for_current_device()` shares one per
    device (a device's work is issued by its one worker thread)."""

    def __init__(self):
        global _library
        import cupy

        self.cp = cupy
        with _lock:
            if _library is None:
                lib = _load_library()
                _bind(lib)
                _library = lib
        self.lib = _library
        handle = ctypes.c_void_p()
        _check(self.lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
        self._stream: int | None = None
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)   # host scalars: read at launch (or capture)
        self._one_ptr, self._zero_ptr = ctypes.addressof(self._one), ctypes.addressof(self._zero)

    @classmethod
    def for_current_device(cls) -> "CublasGemm":
        import cupy

        device = cupy.cuda.runtime.getDevice()
        with _lock:
            gemm = _per_device.get(device)
        if gemm is None:
            gemm = cls()
            with _lock:
                gemm = _per_device.setdefault(device, gemm)
        return gemm

    def _bind_stream(self) -> None:
        stream = self.cp.cuda.get_current_stream().ptr
        if stream != self._stream:
            _check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream)), "cublasSetStream")
            # cublasSetStream resets the handle to cuBLAS's own workspace pool: set ours again
            _check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                  WORKSPACE_BYTES), "cublasSetWorkspace")
            self._stream = stream

    def linear(self, x, W, out=None):
        """x [M, K] @ W[N, K]^T -> [M, N] in x's dtype (or into `out`, which may be float32)."""
        cp = self.cp
        m, k = x.shape
        n = W.shape[0]
        if W.shape[1] != k or W.dtype != x.dtype:
            raise ValueError(f"linear: x {x.shape} {x.dtype} and W {W.shape} {W.dtype} do not match")
        if not x.flags.c_contiguous:
            x = cp.ascontiguousarray(x)
        if not W.flags.c_contiguous:
            W = cp.ascontiguousarray(W)
        if out is None:
            out = cp.empty((m, n), dtype=x.dtype)
        if m == 0:
            return out
        in_type = CUDA_DATA_TYPES[x.dtype.name]
        out_type = CUDA_DATA_TYPES[out.dtype.name]
        self._bind_stream()
        _check(self.lib.cublasGemmEx(self.handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, self._one_ptr,
                                     W.data.ptr, in_type, k, x.data.ptr, in_type, k, self._zero_ptr,
                                     out.data.ptr, out_type, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx")
        return out
