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
_libraries: dict[str, ctypes.CDLL] = {}
_per_device: dict[int, "CublasGemm"] = {}


def _find_library(stem: str) -> ctypes.CDLL:
    """`stem`.so as CuPy linked against it (found in this process's mappings: importing CuPy's cuBLAS
    maps libcublas and libcublasLt, its dependency), else one by soname."""
    import cupy_backends.cuda.libs.cublas  # noqa: F401 - maps libcublas into the process
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rsplit(maxsplit=1)[-1]
            if os.path.basename(path).startswith(f"{stem}.so"):
                return ctypes.CDLL(path)
    for name in (f"{stem}.so.13", f"{stem}.so.12", f"{stem}.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError(f"{stem} is not loaded and none was found by name")


def _library(stem: str, bind) -> ctypes.CDLL:
    """The process's one handle on `stem`, its entry points typed by `bind` on first use."""
    with _lock:
        if stem not in _libraries:
            lib = _find_library(stem)
            bind(lib)
            _libraries[stem] = lib
        return _libraries[stem]


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
        import cupy

        self.cp = cupy
        self.lib = _library("libcublas", _bind)
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


# -- cuBLASLt: the same product with an algorithm chosen by measurement (bench/gemm_choice_bench.py)

CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB = 3, 4
CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1
CUDA_R_32F = 0


class LtAlgo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class LtHeuristic(ctypes.Structure):
    _fields_ = [("algo", LtAlgo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _bind_lt(lib: ctypes.CDLL) -> None:
    p, i, u64, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64
    signatures = {
        "cublasLtCreate": [ctypes.POINTER(p)],
        "cublasLtMatmulDescCreate": [ctypes.POINTER(p), i, i],
        "cublasLtMatmulDescSetAttribute": [p, i, p, ctypes.c_size_t],
        "cublasLtMatrixLayoutCreate": [ctypes.POINTER(p), i, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(p)],
        "cublasLtMatmulPreferenceSetAttribute": [p, i, p, ctypes.c_size_t],
        "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i, ctypes.POINTER(LtHeuristic), ctypes.POINTER(i)],
        "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, ctypes.POINTER(LtAlgo), p, ctypes.c_size_t, p],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, i


class CublasLtGemm:
    """x [M, K] @ W[N, K]^T through cublasLtMatmul with an explicit algorithm: cuBLASLt lists the
    candidates for a shape (`candidates`), the caller times them and keeps one per M. Same layout
    and float32 accumulation as CublasGemm.linear."""

    def __init__(self):
        import cupy

        self.cp = cupy
        self.lib = _library("libcublasLt", _bind_lt)
        handle = ctypes.c_void_p()
        _check(self.lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        self.handle = handle
        self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._layouts: dict = {}

    def _descriptors(self, m: int, n: int, k: int, in_type: int, out_type: int):
        key = (m, n, k, in_type, out_type)
        if key not in self._layouts:
            desc = ctypes.c_void_p()
            _check(self.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
                   "cublasLtMatmulDescCreate")
            for attribute, op in ((CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T), (CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N)):
                value = ctypes.c_int(op)
                _check(self.lib.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(value), 4),
                       "cublasLtMatmulDescSetAttribute")
            layouts = []
            for dtype, rows, cols, ld in ((in_type, k, n, k), (in_type, k, m, k), (out_type, n, m, n)):
                layout = ctypes.c_void_p()
                _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, ld),
                       "cublasLtMatrixLayoutCreate")
                layouts.append(layout)
            self._layouts[key] = (desc, *layouts)
        return self._layouts[key]

    def candidates(self, m: int, n: int, k: int, dtype_name: str, count: int = 16) -> list[LtAlgo]:
        in_type = CUDA_DATA_TYPES[dtype_name]
        desc, a, b, c = self._descriptors(m, n, k, in_type, in_type)
        pref = ctypes.c_void_p()
        _check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        limit = ctypes.c_uint64(WORKSPACE_BYTES)
        _check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                             ctypes.byref(limit), 8), "cublasLtMatmulPreferenceSetAttribute")
        results = (LtHeuristic * count)()
        returned = ctypes.c_int(0)
        _check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, c, c, pref, count, results,
                                                       ctypes.byref(returned)), "cublasLtMatmulAlgoGetHeuristic")
        return [results[j].algo for j in range(returned.value) if results[j].state == 0]

    def linear(self, x, W, algo: LtAlgo, out=None):
        cp = self.cp
        m, k = x.shape
        n = W.shape[0]
        if out is None:
            out = cp.empty((m, n), dtype=x.dtype)
        in_type, out_type = CUDA_DATA_TYPES[x.dtype.name], CUDA_DATA_TYPES[out.dtype.name]
        desc, a, b, c = self._descriptors(m, n, k, in_type, out_type)
        stream = cp.cuda.get_current_stream().ptr
        _check(self.lib.cublasLtMatmul(self.handle, desc, ctypes.byref(self._one), W.data.ptr, a, x.data.ptr, b,
                                       ctypes.byref(self._zero), out.data.ptr, c, out.data.ptr, c, ctypes.byref(algo),
                                       self.workspace.data.ptr, WORKSPACE_BYTES, stream), "cublasLtMatmul")
        return out
