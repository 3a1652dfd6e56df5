"""The layer ops the batched forward pass is written over, in two implementations.

`LayerOps` is plain array arithmetic on `xp` (NumPy on CPU, CuPy on GPU): the reference. On a GPU,
`CudaLayerOps` runs the same ops as one kernel each (layer_ops.cu: the residual add with its
RMSNorm, rotary embedding with the paged KV write, silu(gate) * up) and its products through cuBLAS
called by ctypes (kernels/cublas_gemm.py), so that a decode turn has no host synchronisation, no
allocation outside the memory pool and no CuPy cuBLAS call: it can be captured in a CUDA graph.
Both round every intermediate alike; tests/gpu/test_gpu_layer_ops.py holds one against the other.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from common.dtypes import KERNEL_CODES
from neuron.kernels.launch import launch, programmatic

from .attention import write_kv


def rms_norm(xp, x, weight, eps: float):
    xf = x.astype(xp.float32)
    normed = xf / xp.sqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def apply_rope(xp, x, cos, sin):
    """x [T, heads, d]; cos/sin [T, d] float32. Rotate-half form, computed in float32."""
    xf = x.astype(xp.float32)
    half = x.shape[-1] // 2
    rotated = xp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def silu(xp, x):
    xf = x.astype(xp.float32)
    return (xf / (1.0 + xp.exp(-xf))).astype(x.dtype)


class Rotary:
    """The turn's rotary inputs: positions [T] (device int32) over the shard's cos/sin tables. The
    plain path reads `cos`/`sin`, their rows at the positions, gathered on first use (once a turn,
    not per layer); the fused kernel reads the tables at each row's position itself."""

    def __init__(self, positions, cos_table, sin_table):
        self.positions, self.cos_table, self.sin_table = positions, cos_table, sin_table

    @functools.cached_property
    def cos(self):
        return self.cos_table[self.positions]

    @functools.cached_property
    def sin(self):
        return self.sin_table[self.positions]


@dataclass(frozen=True)
class HeadLayout:
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def q_size(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass
class Residual:
    """The residual stream between sublayers: `x`, and `delta`, a sublayer's output not yet added to
    it (the next norm adds it: one kernel for both)."""
    x: object
    delta: object = None


class LayerOps:
    """`one_row_gemv`: a GEMV engine (kernels/fused_gemv.py's CudaOps, or its NumPy mirror NumpyOps in
    tests) for turns of one token on one rank. Such a turn's products then take the norm into
    their input and the silu or the residual add into their output (a decode layer: four GEMVs,
    the rotary and the attention; with the GEMV engine's rope epilogue, `can_rope`, the rotary
    and the KV write go into the q/k/v GEMV too), where the batched path launches a norm, a
    product and an add each. The GEMV rounds where the batched ops round, but sums in another order than cuBLAS (as
    cuBLAS itself does between some batch sizes: bench/NOTES.md, session 7)."""

    def __init__(self, xp, cos_table, sin_table, one_row_gemv=None):
        self.xp, self.cos_table, self.sin_table = xp, cos_table, sin_table
        self.gemv = one_row_gemv

    def _one_row(self, res: Residual, comm=None) -> bool:
        return (self.gemv is not None and res.x.shape[0] == 1 and res.delta is None
                and (comm is None or comm.size == 1))

    def norm_linear(self, res: Residual, weight, eps: float, W, bias=None, silu: bool = False):
        """(the residual with its delta added, rms_norm(x) @ W^T + bias), the product then through
        silu(gate) * up when `silu` (W: the gate rows, then the up rows)."""
        if self._one_row(res):
            out = self.xp.empty((1, W.shape[0] // (2 if silu else 1)), dtype=res.x.dtype)
            self.gemv.gemv(W, res.x.reshape(-1), out.reshape(-1), "rms", "silu_pair" if silu else "store",
                           norm_w=weight, eps=eps, bias=bias)
            return res, out
        if res.delta is None:
            x, h = res.x, self.rms_norm(res.x, weight, eps)
        else:
            x, h = self.add_rms_norm(res.x, res.delta, weight, eps)
        y = self.linear(h, W)
        if bias is not None:
            y = y + bias
        return Residual(x), (self.silu_mul(y) if silu else y)

    def norm_qkv_rope(self, res: Residual, weight, eps: float, W, bias, rotary: Rotary, heads: HeadLayout,
                      flat_keys, flat_values, slot_mapping, q_norm=None, k_norm=None):
        """norm_linear of the q/k/v weight, then rope_write_kv: (the residual, rotated q [T, Hq, d]).
        A one-row turn without q/k norms does both in one GEMV (its "rope" epilogue)."""
        if self._one_row(res) and q_norm is None and self.gemv.can_rope(W):
            q = self.xp.empty((1, heads.q_heads, heads.head_dim), dtype=res.x.dtype)
            self.gemv.gemv_rope(W, res.x.reshape(-1), weight, eps, bias, rotary.positions, rotary.cos_table,
                                rotary.sin_table, slot_mapping, q, flat_keys, flat_values, heads.q_heads,
                                heads.kv_heads, heads.head_dim)
            return res, q
        res, qkv = self.norm_linear(res, weight, eps, W, bias)
        return res, self.rope_write_kv(qkv, rotary, heads, flat_keys, flat_values, slot_mapping, q_norm, k_norm, eps)

    def linear_residual(self, res: Residual, a, W, bias, comm) -> Residual:
        """The residual plus comm's sum of a @ W^T, plus bias (row-parallel: every rank holds it,
        so it is added once, after the sum)."""
        if self._one_row(res, comm):
            self.gemv.gemv(W, a.reshape(-1), res.x.reshape(-1), "none", "resid", bias=bias)
            return res
        if res.delta is not None:
            raise ValueError("linear_residual takes the residual of a norm_linear (its delta added)")
        delta = comm.all_reduce(self.linear(a, W))
        if bias is not None:
            delta = delta + bias
        return Residual(res.x, delta)

    def norm_logits(self, res: Residual, weight, eps: float, W, rows):
        """float32 logits of rms_norm(x)[rows] @ W^T (rows: a device int array)."""
        if self._one_row(res) and len(rows) == 1:   # then rows is [0]
            out = self.xp.empty((1, W.shape[0]), dtype=self.xp.float32)
            self.gemv.gemv(W, res.x.reshape(-1), None, "rms", "logits", norm_w=weight, eps=eps, outf=out.reshape(-1))
            return out
        x = res.x[rows]
        if res.delta is None:
            h = self.rms_norm(x, weight, eps)
        else:
            _, h = self.add_rms_norm(x, res.delta[rows], weight, eps)
        return self.linear(h, W).astype(self.xp.float32)

    def linear(self, x, W):
        """x [T, K] @ W[N, K]^T, float32 accumulation, rounded once to x's dtype."""
        if self.xp is np and x.ndim == 2 and 1 < x.shape[0] <= 32:
            # OpenBLAS runs W @ x^T up to 2.5x faster than x @ W^T for 2-32 rows (decode turns), and
            # slower from 64 on (prompt turns): bench/NOTES.md, session 14. One row is a GEMV either way.
            return np.ascontiguousarray((W @ x.T).T)
        return x @ W.T

    def rotary(self, positions) -> Rotary:
        return Rotary(positions, self.cos_table, self.sin_table)

    def rms_norm(self, x, weight, eps: float):
        return rms_norm(self.xp, x, weight, eps)

    def add_rms_norm(self, x, delta, weight, eps: float):
        """(x + delta, rms_norm(x + delta)): the residual add and the next norm. The fused op updates
        x in place; callers use the returned residual."""
        x = x + delta
        return x, rms_norm(self.xp, x, weight, eps)

    def silu_mul(self, gate_up):
        inter = gate_up.shape[-1] // 2
        return silu(self.xp, gate_up[:, :inter]) * gate_up[:, inter:]

    def rope_write_kv(self, qkv, rotary: Rotary, heads: HeadLayout, flat_keys, flat_values, slot_mapping,
                      q_norm=None, k_norm=None, eps: float = 0.0):
        """qkv [T, q + 2 kv] -> rotated q [T, Hq, d]; rotated k and v written into their slots.
        q_norm/k_norm (Qwen3): RMSNorm of each head before the rotation."""
        xp, d = self.xp, heads.head_dim
        T = qkv.shape[0]
        q = qkv[:, : heads.q_size].reshape(T, -1, d)
        k = qkv[:, heads.q_size: heads.q_size + heads.kv_size].reshape(T, -1, d)
        v = qkv[:, heads.q_size + heads.kv_size:].reshape(T, -1, d)
        if q_norm is not None:
            q = rms_norm(xp, q, q_norm, eps)
            k = rms_norm(xp, k, k_norm, eps)
        q, k = apply_rope(xp, q, rotary.cos, rotary.sin), apply_rope(xp, k, rotary.cos, rotary.sin)
        write_kv(flat_keys, flat_values, k, v, slot_mapping)
        return q


class CudaLayerOps(LayerOps):
    """The fused implementation on CuPy arrays; `one_row_gemv` as in LayerOps (CudaOps)."""

    THREADS = 256
    NORM_CHUNKS = 4   # layer_ops.cu's: vectors a thread of add_rms_norm_vec holds

    def __init__(self, xp, cos_table, sin_table, dtype_name: str, one_row_gemv=None):
        super().__init__(xp, cos_table, sin_table, one_row_gemv)
        from neuron.kernels import load_module
        from neuron.kernels.cublas_gemm import CublasGemm

        self.gemm = CublasGemm.for_current_device()
        module = load_module("layer_ops.cu", KERNEL_CODES[dtype_name])
        self._add_rms_norm = module.get_function("add_rms_norm")
        self._rope_write_kv = module.get_function("rope_write_kv")
        self._silu_mul = module.get_function("silu_mul")
        # the 16-byte-vector kernels, for the shapes that allow them (every model served so far)
        self._vec = 4 if dtype_name == "float32" else 8
        self._add_rms_norm_vec = module.get_function("add_rms_norm_vec")
        self._rope_write_kv_vec = module.get_function("rope_write_kv_vec")
        self._silu_mul_vec = module.get_function("silu_mul_vec")
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.runtime.getDevice())
        self._grid_cap = 8 * props["multiProcessorCount"]

    def linear(self, x, W):
        return self.gemm.linear(x, W)

    def _norm(self, x, delta, weight, eps: float):
        out = self.xp.empty_like(x)
        h = x.shape[-1]
        args = (x, delta if delta is not None else 0, weight, out, np.int32(h), np.float32(eps))
        chunks = h // self._vec
        threads = min(512, -(-chunks // 32) * 32)   # a vector a thread up to 4,096 bf16 columns
        if h % self._vec == 0 and chunks <= self.NORM_CHUNKS * threads:
            self._add_rms_norm_vec((x.shape[0],), (threads,), args)
        else:
            self._add_rms_norm((x.shape[0],), (self.THREADS,), args)
        return out

    def rms_norm(self, x, weight, eps: float):
        if x.ndim != 2 or not x.flags.c_contiguous:
            return super().rms_norm(x, weight, eps)
        return self._norm(x, None, weight, eps)

    def add_rms_norm(self, x, delta, weight, eps: float):
        if not (x.flags.c_contiguous and delta.flags.c_contiguous):
            return super().add_rms_norm(x, delta, weight, eps)
        return x, self._norm(x, delta, weight, eps)

    def silu_mul(self, gate_up):
        if not gate_up.flags.c_contiguous:
            return super().silu_mul(gate_up)
        T, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = self.xp.empty((T, inter), dtype=gate_up.dtype)
        total = T * inter
        vec = self._vec if inter % self._vec == 0 else 1
        grid = max(1, min(self._grid_cap, -(-total // (self.THREADS * vec))))
        kernel = self._silu_mul_vec if vec > 1 else self._silu_mul
        kernel((grid,), (self.THREADS,), (gate_up, out, np.int32(inter), np.int64(total)))
        return out

    def rope_write_kv(self, qkv, rotary: Rotary, heads: HeadLayout, flat_keys, flat_values, slot_mapping,
                      q_norm=None, k_norm=None, eps: float = 0.0):
        if q_norm is not None or not qkv.flags.c_contiguous:
            return super().rope_write_kv(qkv, rotary, heads, flat_keys, flat_values, slot_mapping, q_norm, k_norm, eps)
        T = qkv.shape[0]
        q = self.xp.empty((T, heads.q_heads, heads.head_dim), dtype=qkv.dtype)
        if T:
            kernel = self._rope_write_kv_vec if heads.head_dim % 8 == 0 else self._rope_write_kv
            launch(kernel, (T,), (self.THREADS,),
                   (qkv, rotary.positions, rotary.cos_table, rotary.sin_table, slot_mapping, q, flat_keys,
                    flat_values, np.int32(heads.q_heads), np.int32(heads.kv_heads), np.int32(heads.head_dim),
                    np.int32(programmatic())))
        return q
