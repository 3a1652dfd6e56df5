"""Fused GPU kernels for the Llama-family forward pass, and their NumPy mirror.

Two implementations of one small set of operations:

- `CudaOps`: CuPy `RawModule` kernels (one module per dtype, plus one attention module per
  (dtype, group, head_dim) shape), and cuBLAS strided-batched GEMMs for prefill attention.
- `NumpyOps`: the same operations in NumPy, written to follow each kernel's arithmetic step by
  step (which values are rounded to the activation dtype and where, the split-K attention with its
  partial results and their combination). It runs the fused engine on the CPU in CI, and the GPU
  tests compare each CUDA kernel against it on random inputs.

Rounding follows the plain path in llama.py (the numerical reference): every value the plain path
holds in the activation dtype is rounded to it here too (`ft`), everything else is float32.

Activation/weight dtype T is bf16, fp16 or fp32; accumulation is always float32. The kernels read
the sequence position, KV slot and token from a small device array `meta` [pos, slot, token, 0], so
one captured CUDA graph serves every decode step.

Layouts (one sequence, T tokens, Hq query heads = Hkv kv heads x g, head_dim D):
  qkv      [T, (Hq + 2 Hkv) D]   output of the fused q/k/v projection
  q        [Hkv, T, g, D]        roped queries, grouped by kv head (for T=1 this is [Hq, D])
  k/v cache [slots, Hkv, max_ctx, D] per layer
  attn     [T, Hq D]             attention output, input of o_proj
"""
from __future__ import annotations

import re

import numpy as np

from common.dtypes import DTYPES
from common.dtypes import KERNEL_CODES as DT_CODES
from neuron.kernels import KERNEL_DIR
from neuron.kernels.launch import launch, programmatic
from neuron.layers.ops import apply_rope

PRO = {"none": 0, "rms": 1, "silu": 2, "resid_rms": 3}
EPI = {"store": 0, "resid": 1, "logits": 2, "silu_pair": 3, "partial": 4, "rope": 5}
GEMV_THREADS = 256
GEMV_ROWS_PER_BLOCK = GEMV_THREADS // 32   # warps per block (each: one or two rows, or a gate/up pair)
GEMV_BLOCKS_PER_SM = 4                     # __launch_bounds__(256, 4) (3 for the norm prologues)
GEMV_SMEM_MAX = 227 * 1024                 # dynamic shared memory of one block, at most (sm_80, sm_90)
GEMVB_CONSUMERS = 16                       # bulk-copy GEMV (sm_90): consumer warps, plus one producer warp
GEMVB_ROW_MAX = 8192                       # "auto": the bulk GEMV for rows of at most this many bytes
GEMVB_PAIR_BELOW = 8192                    # bulk GEMV: rows of fewer bytes go two per unit
ATTN_SMEM_BUDGET = 40 * 1024              # static shared memory of the decode-attention kernel


def vec_elems(dtype_name: str) -> int:
    """Elements per 16-byte vector."""
    return 4 if dtype_name == "float32" else 8


def supports(config, layout, dtype_name: str) -> str | None:
    """None when the fused kernels handle this shard, else why not (the plain path then runs)."""
    v = vec_elems(dtype_name)
    d = config.head_dim
    hq, hkv = layout.local_heads, layout.local_kv_heads
    if dtype_name not in DT_CODES:
        return f"dtype {dtype_name}"
    for name, k in (("hidden_size", config.hidden_size), ("q width", hq * d),
                    ("intermediate width", len(layout.intermediate))):
        if k % v:
            return f"{name} {k} is not a multiple of {v}"
    if d % 2 or d % v:
        return f"head_dim {d} is not a multiple of {v}"
    if attn_threads(d) % 32:
        return f"head_dim {d} gives a thread count that is not a multiple of 32"
    if hq % hkv:
        return "query heads not a multiple of kv heads"
    if attn_chunk(dtype_name, hq // hkv, d) < 8:
        return f"head_dim {d} x group {hq // hkv} does not fit the attention kernel's shared memory"
    item = 4 if dtype_name == "float32" else 2
    for name, smem in (("hidden_size", CudaOps.gemv_smem("resid_rms", config.hidden_size, item, True)),
                       ("intermediate width", CudaOps.gemv_smem("none", len(layout.intermediate), item, False))):
        if smem > GEMV_SMEM_MAX:
            return f"{name}: the GEMV's staged input needs {smem} bytes of shared memory (at most {GEMV_SMEM_MAX})"
    return None


def gemv_kernel_names() -> list[str]:
    """The GEMV kernels the CUDA source instantiates (GEMV_INST / GEMVB_INST lines)."""
    return [f"{kind.lower()}_p{p}_e{e}_b{b}{'_r2' if r2 else ''}"
            for kind, r2, p, e, b in re.findall(r"\b(GEMVB?)_INST(2?)\((\d), (\d), (\d)\)", CUDA_KERNELS)]


def attn_threads(d: int) -> int:
    """Threads of the decode-attention block: D x JL, JL = max(1, 128 // D) key lanes."""
    return d * max(1, 128 // d) if d <= 128 else d


def attn_chunk(dtype_name: str, g: int, d: int) -> int:
    """Keys per split of the decode-attention kernel: K and V tiles, q, scores and the reduction
    scratch must fit ATTN_SMEM_BUDGET bytes of static shared memory."""
    item = 2 if dtype_name != "float32" else 4
    nt = attn_threads(d)
    fixed = g * d * 4 + nt * g * 4
    per_key = (2 * d + 16 // item) * item + g * 4   # the K row padded by 16 bytes
    c = (ATTN_SMEM_BUDGET - fixed) // per_key
    return int(min(64, c))


# --------------------------------------------------------------------------- CUDA source

CUDA_BASE = (KERNEL_DIR / "fused_base.cuh").read_text()

CUDA_KERNELS = (KERNEL_DIR / "fused_gemv.cu").read_text()

# Decode attention (one query token), split over the keys: grid (NS, Hkv), NT threads. Each block
# copies its chunk of C keys and values into shared memory (cp.async, all in flight at once),
# scores the g query heads of its kv head (one thread per key), and writes the partial softmax
# state (max, sum, sum of p * v) of its chunk; attn_combine merges the chunks of each head.
CUDA_ATTN = (KERNEL_DIR / "slot_attention.cu").read_text()


# --------------------------------------------------------------------------- CUDA ops

class CudaOps:
    """Launches the kernels above on CuPy arrays (all on the current device and stream)."""

    def __init__(self, dtype_name: str, norm_min_blocks: int = 3, bulk: str = "auto",
                 bulk_consumers: int = GEMVB_CONSUMERS, bulk_pair_below: int = GEMVB_PAIR_BELOW,
                 rope_epilogue: bool = True):
        """rope_epilogue: whether can_rope offers the "rope" epilogue (one token's q/k/v GEMV with
        the rotary and the KV write; tests/gpu/test_gpu_layer_ops.py holds it to the product
        followed by rope_write_kv, bit for bit).
        norm_min_blocks: the register GEMVs with a norm prologue are built for this many blocks per
        SM (3: 80 registers, no spill; 4: 64 registers, which spills). bulk: which decode GEMVs stream
        their weights into shared memory with bulk copies (gemvb_*, sm_90 and later) with
        bulk_consumers warps computing per block: "auto" those with rows of at most GEMVB_ROW_MAX
        bytes (measured faster there; slower on the longer rows of down, bench/NOTES.md),
        "always" every one whose slots fit, "never" none. Rows of fewer than bulk_pair_below bytes
        are computed two per warp."""
        import cupy
        from cupy_backends.cuda.api import runtime
        from cupy_backends.cuda.libs import cublas

        self.cp, self.cublas, self.runtime = cupy, cublas, runtime
        self.dtype_name = dtype_name
        self.dt = DT_CODES[dtype_name]
        self.vec = vec_elems(dtype_name)
        self.options = ("--std=c++17", f"-I{KERNEL_DIR}", f"-DDT={self.dt}", f"-DGEMV_NORM_MIN_BLOCKS={norm_min_blocks}",
                        f"-DGEMVB_CONSUMERS={bulk_consumers}")
        self.bulk_consumers = bulk_consumers
        self.rope_epilogue = rope_epilogue
        self.bulk_pair_below = bulk_pair_below
        self.bulk_threads = 32 * (bulk_consumers + 1)
        self.module = cupy.RawModule(code=CUDA_BASE + CUDA_KERNELS, options=self.options)
        self._fn: dict = {}
        self._attn: dict = {}
        self._attn_modules: dict = {}
        self._smem_set: dict = {}
        self.cuda_dtype = {0: runtime.CUDA_R_16BF, 1: runtime.CUDA_R_16F, 2: runtime.CUDA_R_32F}[self.dt]
        props = runtime.getDeviceProperties(runtime.getDevice())
        self.sm_count = props["multiProcessorCount"]
        if bulk not in ("auto", "always", "never"):
            raise ValueError(f"bulk: auto, always or never, not {bulk!r}")
        if bulk == "always" and props["major"] < 9:
            raise ValueError("bulk-copy GEMVs need sm_90 or later")
        self.bulk = "never" if props["major"] < 9 else bulk
        self.smem_optin = int(props.get("sharedMemPerBlockOptin", GEMV_SMEM_MAX))
        self._occupancy: dict = {}
        self._plans: dict = {}
        self._one = np.array(1.0, dtype=np.float32)
        self._zero = np.array(0.0, dtype=np.float32)

    def fn(self, name: str):
        f = self._fn.get(name)
        if f is None:
            f = self._fn[name] = self.module.get_function(name)
        return f

    def _blocks_per_sm(self, f, smem: int) -> int:
        key = (id(f), smem)
        n = self._occupancy.get(key)
        if n is None:
            self._set_smem(f, smem)
            try:
                from cupy_backends.cuda.api import driver
                n = int(driver.occupancyMaxActiveBlocksPerMultiprocessor(f.kernel.ptr, GEMV_THREADS, smem))
            except Exception:  # noqa: BLE001 - an estimate: blocks by registers, shared memory permitting
                n = min(65536 // (max(1, f.attributes["num_regs"]) * GEMV_THREADS),
                        (227 * 1024) // (smem + 1024 + 128))
            n = self._occupancy[key] = max(1, n)
        return n

    def compile_all(self) -> None:
        """Load every kernel now (compilation is cached on disk by CuPy), not on the first step."""
        for name in gemv_kernel_names():
            if self.bulk != "never" or not name.startswith("gemvb_"):
                self.fn(name)
        for name in ("embed_row", "qkv_post", "softmax_rows", "add_rmsnorm", "resid_add_f32", "silu_mul", "argmax_f32"):
            self.fn(name)

    def attn_fns(self, g: int, d: int):
        key = (g, d)
        if key not in self._attn:
            c = attn_chunk(self.dtype_name, g, d)
            nt = attn_threads(d)
            jl = max(1, nt // d) if d <= 128 else 1
            opts = self.options + (f"-DATT_G={g}", f"-DATT_D={d}", f"-DATT_C={c}", f"-DATT_NT={nt}", f"-DATT_JL={jl}")
            mod = self.cp.RawModule(code=CUDA_BASE + CUDA_ATTN, options=opts)
            self._attn[key] = (mod.get_function("attn_split"), mod.get_function("attn_combine"), c, nt)
            self._attn_modules[key] = mod
        return self._attn[key]

    # -- helpers
    @staticmethod
    def _ptr(a) -> int:
        return 0 if a is None else a.data.ptr

    def _set_smem(self, f, nbytes: int) -> None:
        """A kernel whose dynamic plus static shared memory is over 48 KiB must say so first."""
        if self._smem_set.get(id(f), -1) < nbytes:
            if nbytes + f.attributes["shared_size_bytes"] > 48 * 1024:
                f.max_dynamic_shared_size_bytes = nbytes
            self._smem_set[id(f)] = nbytes

    # -- kernels
    def embed_row(self, table, meta, tokens, x) -> None:
        h = x.shape[-1]
        self.fn("embed_row")(((h + 255) // 256,), (256,), (table, meta, tokens, x, np.int32(h)))

    def gemv_rows_per_warp(self, n: int, epi: str, pro: str, capacity: int | None = None) -> int:
        """2 when one row per warp would need a second (partial) wave of blocks and two would not."""
        if epi == "silu_pair" or pro == "silu" or n % 2:
            return 1
        capacity = capacity or self.sm_count * GEMV_BLOCKS_PER_SM
        one, two = ceil_div(n, GEMV_ROWS_PER_BLOCK), ceil_div(n, 2 * GEMV_ROWS_PER_BLOCK)
        return 2 if one > capacity >= two else 1

    @staticmethod
    def gemv_smem(pro: str, k: int, item: int, resid_bias: bool) -> int:
        """Dynamic shared memory of the GEMV: the input vector, plus the staged prologue inputs."""
        vec_bytes = k * item
        if pro == "none":
            return vec_bytes
        if pro in ("rms", "silu"):
            return 2 * vec_bytes
        return 2 * vec_bytes + 4 * k + (vec_bytes if resid_bias else 0)  # resid_rms: + float32 sum, bias

    def gemv_plan(self, n: int, k: int, item: int, pro: str, epi: str, rows_per_warp: int | None = None,
                  blocks: int | None = None, resid_bias: bool = False) -> dict:
        """Kernel name, grid, rows per warp and shared memory of one GEMV launch (n outputs: for
        "silu_pair" the number of gate/up pairs)."""
        smem = self.gemv_smem(pro, k, item, resid_bias)
        if smem > GEMV_SMEM_MAX:
            raise ValueError(f"GEMV input of {k} elements needs {smem} bytes of shared memory (at most {GEMV_SMEM_MAX})")
        if self.bulk == "always" or (self.bulk == "auto" and k * item <= GEMVB_ROW_MAX):
            plan = self.gemv_bulk_plan(n, k, item, pro, epi, smem, blocks, rows_per_warp)
            if plan is not None:
                return plan
        base = f"gemv_p{PRO[pro]}_e{EPI[epi]}_b{{b}}"
        capacity = self.sm_count * self._blocks_per_sm(self.fn(base.format(b=0)), smem)
        r = rows_per_warp or self.gemv_rows_per_warp(n, epi, pro, capacity)
        units = n // r if epi != "silu_pair" else n
        grid = blocks or min(ceil_div(units, GEMV_ROWS_PER_BLOCK), capacity)
        return dict(base=base, r=r, smem=smem, units=units, grid=grid)

    def gemv_bulk_plan(self, n: int, k: int, item: int, pro: str, epi: str, stage: int,
                       blocks: int | None, rows_per_warp: int | None) -> dict | None:
        """The bulk-copy GEMV's launch: one block per SM (or `blocks`), each a contiguous range of
        units and as many one-unit slots as its shared memory holds after the staged prologue
        inputs and the 2 mbarriers per slot. A unit is two rows where rows are under
        bulk_pair_below bytes (one copy, two independent sums per warp), or rows_per_warp. None when fewer than 2 slots fit
        (the register kernel then runs)."""
        r = rows_per_warp or (2 if k * item < self.bulk_pair_below and n % 2 == 0 else 1)
        if epi == "silu_pair" or pro == "silu" or n % r:
            r = 1
        if epi == "rope":   # a unit is a rotation pair (or two v rows) whatever the row size
            r = 2
        unit_bytes = k * item * (2 if epi == "silu_pair" else r)
        units = n // r
        grid = min(blocks or self.sm_count, units)
        upb = ceil_div(units, grid)
        grid = ceil_div(units, upb)
        base = f"gemvb_p{PRO[pro]}_e{EPI[epi]}_b{{b}}"
        name = base.format(b=0) + ("_r2" if r == 2 and epi != "rope" else "")
        budget = self.smem_optin - self.fn(name).attributes["shared_size_bytes"]
        bar_off = ceil_div(stage, 8) * 8

        def slot_off(slots: int) -> int:
            return ceil_div(bar_off + 16 * slots, 128) * 128

        slots = min(upb, (budget - slot_off(0)) // unit_bytes)
        while slots > 0 and slot_off(slots) + slots * unit_bytes > budget:
            slots -= 1
        if slots < 2:
            return None
        consumers = self.bulk_consumers
        if slots < upb:  # the ring wraps: each slot read by one consumer warp (nc divides slots)
            consumers = min(consumers, slots)
            slots -= slots % consumers
        smem = slot_off(slots) + slots * unit_bytes
        return dict(base=base, r=r, smem=smem, units=units, grid=grid,
                    bulk=tuple(np.int32(v) for v in (upb, slots, consumers, bar_off, slot_off(slots))))

    def gemv(self, W, xin, out, pro: str, epi: str, norm_w=None, eps: float = 0.0, bias=None, outf=None,
             rows_per_warp: int | None = None, resid=None, resid_bias=None, xout=None,
             blocks: int | None = None) -> None:
        """pro "resid_rms": the input is xin + T(resid) (+ resid_bias), resid a float32 sum over TP ranks,
        rounded as resid_add_f32 rounds; that new residual is stored to xout, then RMSNorm as "rms".
        rows_per_warp and blocks (the grid; default: at most one wave) choose how, never what, is
        computed."""
        n, k = W.shape
        if (pro == "resid_rms") != (resid is not None and xout is not None):
            raise ValueError("pro resid_rms takes resid (float32) and xout")
        if epi == "silu_pair":
            n //= 2  # outputs: one per (gate row, up row) pair
        if epi == "partial" and bias is not None:
            raise ValueError("a partial (row-parallel) product takes its bias after the sum: resid_add_f32")
        key = (n, k, W.dtype.itemsize, pro, epi, rows_per_warp, blocks, resid_bias is not None)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.gemv_plan(*key)
        b = 1 if (bias is not None and epi != "logits") else 0
        f = self.fn(plan["base"].format(b=b) + ("_r2" if plan["r"] == 2 else ""))
        self._set_smem(f, plan["smem"])
        args = (W, xin, self._ptr(norm_w), self._ptr(bias), self._ptr(out), self._ptr(outf), np.int32(n),
                np.int32(k), np.float32(eps), self._ptr(resid), self._ptr(resid_bias), self._ptr(xout))
        if "bulk" in plan:
            launch(f, (plan["grid"],), (self.bulk_threads,), args + plan["bulk"], plan["smem"])
        else:
            launch(f, (plan["grid"],), (GEMV_THREADS,), args + (np.int32(programmatic()),), plan["smem"])

    def _rope_plan(self, n: int, k: int, item: int) -> dict | None:
        key = ("rope", n, k, item)
        if key not in self._plans:
            smem = self.gemv_smem("rms", k, item, False)
            fits = self.bulk != "never" and k * item <= GEMVB_ROW_MAX and n % 2 == 0 and smem <= GEMV_SMEM_MAX
            self._plans[key] = self.gemv_bulk_plan(n, k, item, "rms", "rope", smem, None, 2) if fits else None
        return self._plans[key]

    def can_rope(self, W) -> bool:
        """Whether gemv_rope runs this q/k/v weight (rope_epilogue on; the bulk-copy GEMV, sm_90+)."""
        return self.rope_epilogue and self._rope_plan(W.shape[0], W.shape[1], W.dtype.itemsize) is not None

    def gemv_rope(self, W, xin, norm_w, eps: float, bias, positions, cos_table, sin_table, slots, q, k_cache,
                  v_cache, hq: int, hkv: int, d: int) -> None:
        """One token's q/k/v product from RMSNorm(xin) (+ bias), rotated and written: q [hq, d], k and
        v into slot slots[0] of k_cache / v_cache [slots, hkv, d] (the "rope" epilogue)."""
        n, k = W.shape
        plan = self._rope_plan(n, k, W.dtype.itemsize)
        f = self.fn(plan["base"].format(b=1 if bias is not None else 0))
        self._set_smem(f, plan["smem"])
        args = ((W, xin, self._ptr(norm_w), self._ptr(bias), 0, 0, np.int32(n), np.int32(k), np.float32(eps), 0, 0, 0)
                + plan["bulk"] + (positions, cos_table, sin_table, slots, q, k_cache, v_cache, np.int32(hq),
                                  np.int32(hkv), np.int32(d)))
        launch(f, (plan["grid"],), (self.bulk_threads,), args, plan["smem"])

    def qkv_post(self, qkv, meta, tn: int, bias, qn, kn, cos, sin, qout, kcache, vcache,
                 hq: int, hkv: int, d: int, eps: float) -> None:
        maxc = kcache.shape[2]
        self.fn("qkv_post")((tn, hq + hkv), (d // 2,), (
            qkv, self._ptr(bias), self._ptr(qn), self._ptr(kn), cos, sin, qout, kcache, vcache, meta,
            np.int32(tn), np.int32(hq), np.int32(hkv), np.int32(d), np.int32(maxc), np.float32(eps),
            np.int32(bias is not None), np.int32(qn is not None)))

    def attn_splits(self, g: int, d: int, maxc: int) -> int:
        c = attn_chunk(self.dtype_name, g, d)
        return (maxc + c - 1) // c

    def attn_decode(self, q, kcache, vcache, meta, window: int, scale: float, po, pm, pl, out,
                    hq: int, hkv: int, d: int) -> None:
        g = hq // hkv
        split, combine, c, nt = self.attn_fns(g, d)
        maxc = kcache.shape[2]
        ns = (maxc + c - 1) // c
        split((ns, hkv), (nt,), (q, kcache, vcache, meta, po, pm, pl, np.int32(hkv), np.int32(maxc),
                                 np.int32(window or 0), np.float32(scale)))
        self._set_smem(combine, ns * 4)
        combine((hq,), (nt,), (po, pm, pl, out, meta, np.int32(ns)), shared_mem=ns * 4)

    def softmax_rows(self, S, meta, t0: int, g: int, window: int, scale: float) -> None:
        hkv, m, lc = S.shape
        self.fn("softmax_rows")((m, hkv), (256,), (S, meta, np.int32(m), np.int32(lc), np.int32(g), np.int32(t0),
                                                  np.int32(window or 0), np.float32(scale)))

    def add_rmsnorm(self, x, delta, w, eps: float, h) -> None:
        rows, hid = x.shape
        self.fn("add_rmsnorm")((rows,), (256,), (x, self._ptr(delta), w, h, np.int32(hid), np.float32(eps),
                                                np.int32(delta is not None)))

    def resid_add_f32(self, x, s, bias=None, w=None, eps: float = 0.0, h=None) -> None:
        """x (+)= T(s) (+ bias) per row; then h = RMSNorm(x) * w when h is given. x [rows, H] or [H]."""
        hid = x.shape[-1]
        rows = x.size // hid
        self.fn("resid_add_f32")((rows,), (256,), (x, s, self._ptr(bias), self._ptr(w), self._ptr(h), np.int32(hid),
                                                  np.float32(eps), np.int32(bias is not None)))

    def silu_mul(self, gu, out) -> None:
        tn, inter = out.shape
        blocks = min((tn * inter + 255) // 256, 65535)
        self.fn("silu_mul")((blocks,), (256,), (gu, out, np.int32(tn), np.int32(inter)))

    def argmax(self, logits, out, meta=None) -> None:
        """out[meta[1]] (the slot's entry) or out[0] = argmax(logits), first index among ties."""
        self.fn("argmax_f32")((1,), (1024,), (logits, np.int32(logits.size), out, self._ptr(meta)))

    # -- cuBLAS (row-major views; cuBLAS is column-major, so each product is computed transposed)
    def linear(self, x, W):
        """x [T, K] @ W[N, K]^T in T with float32 accumulation (cupy's matmul: cublasGemmEx, no copies)."""
        return x @ W.T

    def linear_f32(self, x, W, out=None):
        """x [T, K] @ W[N, K]^T with float32 accumulation and a float32 result (no rounding to T):
        a tensor-parallel rank's partial of a row-parallel product, summed over ranks before rounding."""
        tn, k = x.shape
        n = W.shape[0]
        if out is None:
            out = self.cp.empty((tn, n), dtype=np.float32)
        # column-major view: out^T [n, tn] = W [n, k] (col-major: W^T, lda k) op ... as in attn_scores
        self.cublas.gemmEx(
            self.cp.cuda.device.get_cublas_handle(), 1, 0, n, tn, k, self._one.ctypes.data,
            W.data.ptr, self.cuda_dtype, k, x.data.ptr, self.cuda_dtype, k,
            self._zero.ctypes.data, out.data.ptr, self.runtime.CUDA_R_32F, n,
            self.cublas.CUBLAS_COMPUTE_32F, self.cublas.CUBLAS_GEMM_DEFAULT)
        return out

    def attn_scores(self, q, kcache, slot: int, t0: int, c: int, lc: int, S) -> None:
        """S[h] = Q[h, t0:t0+c] @ K[h, :lc]^T for every kv head h; q [Hkv, Tn, g, D], S [Hkv, c*g, lc]."""
        hkv, tn, g, d = q.shape
        maxc = kcache.shape[2]
        item = q.dtype.itemsize
        m = c * g
        kptr = kcache.data.ptr + slot * hkv * maxc * d * item
        qptr = q.data.ptr + t0 * g * d * item
        self.cublas.gemmStridedBatchedEx(
            self.cp.cuda.device.get_cublas_handle(), 1, 0, lc, m, d, self._one.ctypes.data,
            kptr, self.cuda_dtype, d, maxc * d,
            qptr, self.cuda_dtype, d, tn * g * d,
            self._zero.ctypes.data, S.data.ptr, self.cuda_dtype, lc, m * lc,
            hkv, self.cublas.CUBLAS_COMPUTE_32F, self.cublas.CUBLAS_GEMM_DEFAULT)

    def attn_pv(self, S, vcache, slot: int, out) -> None:
        """out[h] = P[h] @ V[h, :lc] for every kv head h; S [Hkv, m, lc] (probabilities), out [Hkv, m, D]."""
        hkv, m, lc = S.shape
        d = out.shape[-1]
        maxc = vcache.shape[2]
        item = S.dtype.itemsize
        vptr = vcache.data.ptr + slot * hkv * maxc * d * item
        self.cublas.gemmStridedBatchedEx(
            self.cp.cuda.device.get_cublas_handle(), 0, 0, d, m, lc, self._one.ctypes.data,
            vptr, self.cuda_dtype, d, maxc * d,
            S.data.ptr, self.cuda_dtype, lc, m * lc,
            self._zero.ctypes.data, out.data.ptr, self.cuda_dtype, d, m * d,
            hkv, self.cublas.CUBLAS_COMPUTE_32F, self.cublas.CUBLAS_GEMM_DEFAULT)


# --------------------------------------------------------------------------- NumPy mirror

class NumpyOps:
    """The kernels' arithmetic in NumPy (same rounding points, same split-K attention)."""

    def __init__(self, dtype_name: str):
        self.dtype_name = dtype_name
        self.T = DTYPES[dtype_name]

    def ft(self, a):
        return np.asarray(a, dtype=np.float32).astype(self.T)

    def tf(self, a):
        return np.asarray(a).astype(np.float32)

    def r(self, a):
        """Round float32 values to T and back (the value a T register or array would hold)."""
        return self.tf(self.ft(a))

    def compile_all(self) -> None:
        pass


    def attn_splits(self, g: int, d: int, maxc: int) -> int:
        c = attn_chunk(self.dtype_name, g, d)
        return (maxc + c - 1) // c

    def embed_row(self, table, meta, tokens, x) -> None:
        token = int(meta[2]) if meta[2] >= 0 else int(tokens[int(meta[1])])
        x[...] = table[token]

    def _silu(self, g):
        with np.errstate(over="ignore"):
            return self.r(g / (np.float32(1.0) + np.exp(-g)))

    def _prologue(self, xin, pro: str, norm_w, eps: float, k: int):
        if pro == "none":
            return self.tf(xin)
        if pro == "rms":
            x = self.tf(xin)
            denom = np.sqrt(np.float32((x * x).sum(dtype=np.float32) / np.float32(k)) + np.float32(eps))
            return self.r(self.tf(norm_w) * self.r(x / denom))
        g, u = self.tf(xin[:k]), self.tf(xin[k:2 * k])
        return self.r(self._silu(g) * u)

    def gemv(self, W, xin, out, pro: str, epi: str, norm_w=None, eps: float = 0.0, bias=None, outf=None,
             rows_per_warp: int | None = None, resid=None, resid_bias=None, xout=None,
             blocks: int | None = None) -> None:
        # rows_per_warp, blocks: how the CUDA kernel splits the work; the function
        # (float32 dot products, the same rounding points) is the same for all of them
        n, k = W.shape
        if pro == "resid_rms":
            xout[...] = xin
            self.resid_add_f32(xout, resid, resid_bias)
            xin, pro = xout, "rms"
        x = self._prologue(xin.reshape(-1), pro, norm_w, eps, k)
        acc = self.tf(W) @ x
        if epi == "logits":
            outf[...] = self.r(acc)
            return
        if epi == "partial":
            outf[...] = acc.reshape(outf.shape)
            return
        y = self.r(acc)
        if bias is not None:
            y = self.r(y + self.tf(bias))
        if epi == "silu_pair":
            half = n // 2
            out[...] = self.ft(self._silu(y[:half]) * y[half:]).reshape(out.shape)
            return
        if epi == "resid":
            out[...] = self.ft(self.tf(out) + y).reshape(out.shape)
        else:
            out[...] = self.ft(y).reshape(out.shape)

    def can_rope(self, W) -> bool:
        return W.shape[0] % 2 == 0

    def gemv_rope(self, W, xin, norm_w, eps: float, bias, positions, cos_table, sin_table, slots, q, k_cache,
                  v_cache, hq: int, hkv: int, d: int) -> None:
        qkv = np.empty(W.shape[0], dtype=self.T)
        self.gemv(W, xin, qkv, "rms", "store", norm_w=norm_w, eps=eps, bias=bias)
        position, slot = int(positions[0]), int(slots[0])
        # the rotation the kernel repeats (its __fmul_rn / __fadd_rn are these float32 ops)
        rotated = apply_rope(np, qkv[:(hq + hkv) * d].reshape(1, hq + hkv, d), cos_table[position:position + 1],
                             sin_table[position:position + 1])[0]
        q.reshape(hq, d)[...] = rotated[:hq]
        k_cache[slot] = rotated[hq:]
        v_cache[slot] = qkv[(hq + hkv) * d:].reshape(hkv, d)

    def qkv_post(self, qkv, meta, tn: int, bias, qn, kn, cos, sin, qout, kcache, vcache,
                 hq: int, hkv: int, d: int, eps: float) -> None:
        start, slot = int(meta[0]), int(meta[1])
        half, g = d // 2, hq // hkv
        x = self.tf(qkv.reshape(tn, -1)).reshape(tn, hq + 2 * hkv, d)
        if bias is not None:
            x = self.r(x + self.tf(bias).reshape(hq + 2 * hkv, d))
        qk = x[:, :hq + hkv]
        if qn is not None:
            w = np.concatenate([np.broadcast_to(self.tf(qn), (hq, d)), np.broadcast_to(self.tf(kn), (hkv, d))])
            denom = np.sqrt((qk * qk).sum(axis=-1, keepdims=True, dtype=np.float32) / np.float32(d) + np.float32(eps))
            qk = self.r(w * self.r(qk / denom))
        c = cos[start:start + tn][:, None, :]
        s = sin[start:start + tn][:, None, :]
        a, b = qk[..., :half], qk[..., half:]
        o = np.concatenate([a * c[..., :half] - b * s[..., :half], b * c[..., half:] + a * s[..., half:]], axis=-1)
        o = self.ft(o)
        qout[...] = o[:, :hq].reshape(tn, hkv, g, d).transpose(1, 0, 2, 3)
        kcache[slot, :, start:start + tn] = o[:, hq:].transpose(1, 0, 2)
        vcache[slot, :, start:start + tn] = self.ft(x[:, hq + hkv:]).transpose(1, 0, 2)

    def attn_decode(self, q, kcache, vcache, meta, window: int, scale: float, po, pm, pl, out,
                    hq: int, hkv: int, d: int) -> None:
        pos, slot = int(meta[0]), int(meta[1])
        g = hq // hkv
        c = attn_chunk(self.dtype_name, g, d)
        ns = po.shape[1]
        qf = self.tf(q).reshape(hkv, g, d)
        first = max(0, pos - window + 1) if window else 0
        for h in range(hkv):
            for s in range(ns):
                lo, hi = max(s * c, first), min(s * c + c, pos + 1)
                rows = slice(h * g, h * g + g)
                if lo >= hi:
                    pm[rows, s], pl[rows, s] = -np.inf, 0.0
                    continue
                k = self.tf(kcache[slot, h, lo:hi])
                v = self.tf(vcache[slot, h, lo:hi])
                sc = self.r(qf[h] @ k.T) * np.float32(scale)
                m = sc.max(axis=-1)
                p = np.exp(sc - m[:, None])
                total = p.sum(axis=-1, dtype=np.float32)
                if lo == first and hi == pos + 1:  # the whole context in one split: plain-path rounding
                    p, total = self.r(p / total[:, None]), np.ones_like(total)
                pm[rows, s], pl[rows, s] = m, total
                po[rows, s] = p @ v
        M = np.where(pl > 0, pm, -np.inf).max(axis=1, keepdims=True)
        w = np.where(pl > 0, np.exp(np.where(pl > 0, pm, M) - M), 0.0).astype(np.float32)
        num = (w[:, :, None] * np.where(pl[:, :, None] > 0, po, 0.0)).sum(axis=1)
        den = (w * pl).sum(axis=1)
        out[...] = self.ft(num / den[:, None]).reshape(out.shape)

    def softmax_rows(self, S, meta, t0: int, g: int, window: int, scale: float) -> None:
        hkv, m, lc = S.shape
        qpos = int(meta[0]) + t0 + np.arange(m) // g
        k = np.arange(lc)
        valid = k[None, :] <= qpos[:, None]
        if window:
            valid &= k[None, :] >= (qpos - window + 1)[:, None]
        sc = np.where(valid, self.tf(S) * np.float32(scale), -np.inf)
        mx = sc.max(axis=-1, keepdims=True)
        p = np.where(valid, np.exp(sc - mx), 0.0).astype(np.float32)
        S[...] = self.ft(p / p.sum(axis=-1, keepdims=True))

    def add_rmsnorm(self, x, delta, w, eps: float, h) -> None:
        if delta is not None:
            x[...] = self.ft(self.tf(x) + self.tf(delta))
        xf = self.tf(x)
        denom = np.sqrt((xf * xf).sum(axis=-1, keepdims=True, dtype=np.float32) / np.float32(x.shape[-1]) + np.float32(eps))
        h[...] = self.ft(self.tf(w) * self.r(xf / denom))

    def resid_add_f32(self, x, s, bias=None, w=None, eps: float = 0.0, h=None) -> None:
        y = self.r(np.asarray(s, dtype=np.float32))
        if bias is not None:
            y = self.r(y + self.tf(bias))
        x[...] = self.ft(self.tf(x) + y)
        if h is not None:
            xf = self.tf(x)
            denom = np.sqrt((xf * xf).sum(axis=-1, keepdims=True, dtype=np.float32) / np.float32(x.shape[-1])
                            + np.float32(eps))
            h[...] = self.ft(self.tf(w) * self.r(xf / denom))

    def silu_mul(self, gu, out) -> None:
        inter = out.shape[-1]
        out[...] = self.ft(self._silu(self.tf(gu[:, :inter])) * self.tf(gu[:, inter:]))

    def argmax(self, logits, out, meta=None) -> None:
        out[0 if meta is None else int(meta[1])] = int(np.argmax(logits))

    def linear(self, x, W):
        return self.ft(self.tf(x) @ self.tf(W).T)

    def linear_f32(self, x, W, out=None):
        y = self.tf(x) @ self.tf(W).T
        if out is not None:
            out[...] = y
            return out
        return y

    def attn_scores(self, q, kcache, slot: int, t0: int, c: int, lc: int, S) -> None:
        hkv, tn, g, d = q.shape
        qc = self.tf(q[:, t0:t0 + c]).reshape(hkv, c * g, d)
        k = self.tf(kcache[slot, :, :lc])
        S[...] = self.ft(qc @ k.transpose(0, 2, 1))

    def attn_pv(self, S, vcache, slot: int, out) -> None:
        lc = S.shape[-1]
        out[...] = self.ft(self.tf(S) @ self.tf(vcache[slot, :, :lc]))


def softmax_scale(head_dim: int) -> float:
    """The plain path multiplies float32 scores by 1/sqrt(d) as a Python float (float32 on use)."""
    return float(np.float32(1.0 / float(head_dim) ** 0.5))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["CudaOps", "NumpyOps", "supports", "attn_chunk", "attn_threads", "softmax_scale", "ceil_div"]
