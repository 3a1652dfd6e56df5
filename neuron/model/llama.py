"""The Llama-family forward pass (Llama 2/3, Mistral, Qwen2, Qwen3), written once against an array
module `xp` (NumPy on CPU, CuPy on GPU), tensor-parallel aware: each rank holds its heads and
intermediate columns, and the row-parallel outputs are summed by the communicator.

Two entry points: `forward_batch`, the serving engine's, runs a flat batch of T tokens of many
requests over the paged KV cache in one pass; `forward` runs T tokens of one sequence over the
slot-based cache (the fused engine's and the reference the batched path is tested against).

Shapes: T tokens, H hidden, Hq/Hkv local q/kv heads, d head_dim.
"""
from __future__ import annotations

import os

import numpy as np
import structlog

from ..collectives import Communicator
from ..engine.kv_cache import PagedKvCache
from ..kv_cache import KvCache
from ..layers.attention import AttentionMetadata, DecodeAttention, causal_attention, paged_attention
from ..layers.ops import CudaLayerOps, HeadLayout, LayerOps, Residual, Rotary, apply_rope, rms_norm, silu
from .config import ModelConfig
from .rope import cos_sin_tables
from .sharding import TpLayout

log = structlog.get_logger(__name__)


def attention(xp, q, keys, values, start: int, window: int | None):
    """Causal GQA attention of q [T, Hq, d] over cached keys/values [Hkv, L, d], L = start + T."""
    return causal_attention(xp, q, keys, values, start, window)


class LlamaModel:
    """`fused` picks the implementation: "auto" (fused CUDA kernels when xp is CuPy and the shapes
    suit them, else this file's plain path), "off" (always the plain path), "cuda", or "numpy" (the
    fused engine on the kernels' NumPy mirror: for tests). NEURON_FUSED overrides "auto"."""

    def __init__(self, config: ModelConfig, layout: TpLayout, params: dict, xp, comm: Communicator, max_context: int,
                 fused: str = "auto", decode_attention: str = "auto", layer_ops: str = "auto",
                 one_row_gemv: bool = True):
        self.config, self.layout, self.p, self.xp, self.comm = config, layout, params, xp, comm
        cos, sin = cos_sin_tables(config, max_context)
        self.cos, self.sin = xp.asarray(cos), xp.asarray(sin)
        self.lm_head = params.get("lm_head", params["embed"])
        self.q_size = layout.local_heads * config.head_dim
        self.kv_size = layout.local_kv_heads * config.head_dim
        self.fused = self._fused_engine(fused)
        self.decode_attention = self._decode_attention(decode_attention, max_context)
        self.heads = HeadLayout(layout.local_heads, layout.local_kv_heads, config.head_dim)
        self.ops = self._layer_ops(layer_ops, one_row_gemv)

    def _layer_ops(self, mode: str, one_row_gemv: bool) -> LayerOps:
        """forward_batch's ops: "auto" (the fused CUDA ops on a GPU, plain ops on a CPU) or "plain".
        `one_row_gemv` (on): a turn of one token on one rank runs its products through the fused
        engine's GEMV kernels with the norms, silu and residual adds folded in (LayerOps), on
        a GPU when the kernels fit the model: one 8B stream's turn was bound by the launches it saves."""
        if mode not in ("auto", "plain"):
            raise ValueError(f"layer_ops must be auto or plain, not {mode!r}")
        if mode == "plain" or self.xp is np:
            return LayerOps(self.xp, self.cos, self.sin)
        dtype_name = np.dtype(self.p["embed"].dtype).name
        gemv = None
        if one_row_gemv and self.comm.size == 1:
            from neuron.kernels import fused_gemv as kernels
            reason = kernels.supports(self.config, self.layout, dtype_name)
            if reason is None:
                gemv = kernels.CudaOps(dtype_name)
            else:
                log.info("one-row products through cuBLAS (the GEMV kernels do not fit this model)", reason=reason)
        return CudaLayerOps(self.xp, self.cos, self.sin, dtype_name, one_row_gemv=gemv)

    def _decode_attention(self, mode: str, max_context: int) -> DecodeAttention | None:
        """forward_batch's attention for decode rows: "auto" (the paged attention kernel on a GPU when
        the shapes suit it, one batched gather on a CPU), "off" (per request, the prefill path),
        "numpy" (the CUDA-core kernel's NumPy mirror: tests) or "numpy-tiles" (the tensor-core
        kernel's, with prompt rows in tiles: tests)."""
        if mode == "numpy":
            return DecodeAttention.numpy_mirror(max_context)
        if mode == "numpy-tiles":
            return DecodeAttention.numpy_tile_mirror(max_context)
        if mode == "off":
            return None
        if self.xp is np:
            return DecodeAttention.gathered(max_context)
        from ..kernels.paged_attention import MAX_GROUP
        group = self.layout.local_heads // self.layout.local_kv_heads
        dtype_name = np.dtype(self.p["embed"].dtype).name
        if group > MAX_GROUP or self.config.head_dim % (4 if dtype_name == "float32" else 8):
            log.info("paged attention kernel off for this model; decode attention gathers blocks", group=group,
                     head_dim=self.config.head_dim)
            return None
        return DecodeAttention.cuda(dtype_name, self.config.head_dim, group, max_context)

    def _fused_engine(self, mode: str):
        if mode == "auto":
            mode = os.environ.get("NEURON_FUSED", "auto").strip().lower() or "auto"
            if mode not in ("auto", "off", "0", "cuda", "1", "numpy"):
                log.warning("NEURON_FUSED must be auto, off, cuda or numpy; using auto", value=mode)
                mode = "auto"
        on_gpu = self.xp is not np
        if mode in ("off", "0") or (mode == "auto" and not on_gpu):
            return None
        from neuron.kernels import fused_gemv as kernels

        from . import fused
        dtype_name = np.dtype(self.p["embed"].dtype).name
        reason = kernels.supports(self.config, self.layout, dtype_name)
        if reason is not None:
            if mode != "auto":
                raise ValueError(f"fused kernels cannot run this model: {reason}")
            log.info("fused kernels off for this model; using the plain path", reason=reason)
            return None
        if mode in ("cuda", "1") and not on_gpu:
            raise ValueError("NEURON_FUSED=cuda needs a GPU device")
        if mode == "numpy" and on_gpu:
            raise ValueError("NEURON_FUSED=numpy (the kernels' NumPy mirror) is for CPU devices")
        engine_mode = "numpy" if mode == "numpy" else "cuda"
        return fused.new_engine(self.config, self.layout, self.p, self.xp, self.comm, self.cos, self.sin, engine_mode)

    def release_graphs(self) -> None:
        """Drop captured CUDA graphs (a TP shard's hold its communicator: see comm_nccl)."""
        if self.fused is not None:
            self.fused.release_graphs()

    def prepare(self, kv: KvCache) -> None:
        """Compile kernels and capture the decode graph for this KV cache (at load, not on the first request)."""
        if self.fused is not None:
            self.fused.prepare(kv)

    def next_token(self, feed: list[int], start: int, kv: KvCache, slot: int, sampler, history,
                   before_read=None, more: bool = True, announce=None) -> int:
        """Run `feed` (the prompt, or the last generated token) at positions start.. and sample the
        next token. `history()` gives the prompt and generated ids (for the repetition penalty);
        `before_read(ready=None)`, if given, runs after the step is queued and before the host
        blocks on it (a TP rank bounds the wait there; `ready` polls the result it needs);
        `more` says whether another token will be asked for after this one; `announce(ids, start,
        slot)`, on a TP leader, tells the followers each step before it is queued (ids [] is a
        decode step chained on the device: its input is the token the previous step picked)."""
        if self.fused is not None:
            return self.fused.next_token(feed, start, kv, slot, sampler, history, before_read, more, announce)
        if announce is not None:
            announce(list(feed), start, slot)
        logits = self.forward(self.xp.asarray(feed, dtype=self.xp.int32), start, kv, slot)
        if before_read is not None:
            before_read()
        return sampler.sample(self.xp, logits[-1], history())

    def forward(self, tokens, start: int, kv: KvCache, slot: int, all_positions: bool = False):
        """Run tokens (int array [T]) at positions start.. of the sequence in `slot`; write its KV.
        Returns float32 logits [T, vocab] if all_positions else [1, vocab]."""
        if self.fused is not None:
            return self.fused.forward(tokens, start, kv, slot, all_positions)
        return self.forward_plain(tokens, start, kv, slot, all_positions)

    def forward_plain(self, tokens, start: int, kv: KvCache, slot: int, all_positions: bool = False):
        """The reference path: plain array operations, the numerics every other path is checked against."""
        xp, p, c = self.xp, self.p, self.config
        T = int(tokens.shape[0])
        end = start + T
        cos, sin = self.cos[start:end], self.sin[start:end]
        x = p["embed"][tokens]
        for i in range(c.num_layers):
            h = rms_norm(xp, x, p[f"{i}.input_norm"], c.rms_norm_eps)
            x = x + self._attention_block(i, h, start, end, cos, sin, kv, slot)
            h = rms_norm(xp, x, p[f"{i}.post_norm"], c.rms_norm_eps)
            x = x + self._mlp_block(i, h)
        if not all_positions:
            x = x[-1:]
        x = rms_norm(xp, x, p["norm"], c.rms_norm_eps)
        return (x @ self.lm_head.T).astype(xp.float32)

    def _attention_block(self, i: int, h, start: int, end: int, cos, sin, kv: KvCache, slot: int):
        xp, p, c = self.xp, self.p, self.config
        q, k, v = self._qkv(i, h, cos, sin)
        keys, values = kv.keys[i][slot], kv.values[i][slot]
        keys[:, start:end] = k.transpose(1, 0, 2)
        values[:, start:end] = v.transpose(1, 0, 2)
        out = self.comm.all_reduce(attention(xp, q, keys[:, :end], values[:, :end], start, c.sliding_window) @ p[f"{i}.o"].T)
        if f"{i}.o_bias" in p:  # a row-parallel bias (every rank holds it): added once, after the sum
            out = out + p[f"{i}.o_bias"]
        return out

    def _mlp_block(self, i: int, h):
        xp, p = self.xp, self.p
        gate_up = h @ p[f"{i}.gate_up"].T
        if f"{i}.gate_up_bias" in p:
            gate_up = gate_up + p[f"{i}.gate_up_bias"]
        inter = gate_up.shape[-1] // 2
        out = self.comm.all_reduce((silu(xp, gate_up[:, :inter]) * gate_up[:, inter:]) @ p[f"{i}.down"].T)
        if f"{i}.down_bias" in p:
            out = out + p[f"{i}.down_bias"]
        return out

    # -- the serving engine's pass: a flat batch of tokens of many requests

    def forward_batch(self, token_ids, positions, meta: AttentionMetadata, kv: PagedKvCache, logits_rows=None):
        """One pass over every scheduled token: token_ids/positions device int arrays [T]; KV is written
        into meta.slot_mapping's slots. Returns float32 logits [len(logits_rows), vocab] for the rows
        asked (device int array), or None when none are (a TP follower, a turn of middle chunks)."""
        ops, p, c = self.ops, self.p, self.config
        rotary = ops.rotary(positions)
        res = Residual(p["embed"][token_ids])
        for i in range(c.num_layers):
            res = self._batch_attention(i, res, rotary, kv, meta)
            res = self._batch_mlp(i, res)
        if logits_rows is None or len(logits_rows) == 0:
            return None
        return ops.norm_logits(res, p["norm"], c.rms_norm_eps, self.lm_head, logits_rows)

    def _batch_attention(self, i: int, res: Residual, rotary: Rotary, kv: PagedKvCache, meta: AttentionMetadata):
        ops, p, c = self.ops, self.p, self.config
        res, q = ops.norm_qkv_rope(res, p[f"{i}.input_norm"], c.rms_norm_eps, p[f"{i}.qkv"], p.get(f"{i}.qkv_bias"),
                                   rotary, self.heads, kv.flat_keys(i), kv.flat_values(i), meta.slot_mapping,
                                   p.get(f"{i}.q_norm") if c.qk_norm else None,
                                   p.get(f"{i}.k_norm") if c.qk_norm else None)
        attended = paged_attention(self.xp, q, kv.keys[i], kv.values[i], meta, c.sliding_window, self.decode_attention)
        return ops.linear_residual(res, attended, p[f"{i}.o"], p.get(f"{i}.o_bias"), self.comm)

    def _batch_mlp(self, i: int, res: Residual):
        ops, p, c = self.ops, self.p, self.config
        res, act = ops.norm_linear(res, p[f"{i}.post_norm"], c.rms_norm_eps, p[f"{i}.gate_up"],
                                   p.get(f"{i}.gate_up_bias"), silu=True)
        return ops.linear_residual(res, act, p[f"{i}.down"], p.get(f"{i}.down_bias"), self.comm)

    def _qkv(self, i: int, h, cos, sin):
        xp, p, c = self.xp, self.p, self.config
        T, d = h.shape[0], c.head_dim
        qkv = h @ p[f"{i}.qkv"].T
        if c.qkv_bias:
            qkv = qkv + p[f"{i}.qkv_bias"]
        q = qkv[:, : self.q_size].reshape(T, -1, d)
        k = qkv[:, self.q_size: self.q_size + self.kv_size].reshape(T, -1, d)
        v = qkv[:, self.q_size + self.kv_size:].reshape(T, -1, d)
        if c.qk_norm:
            q = rms_norm(xp, q, p[f"{i}.q_norm"], c.rms_norm_eps)
            k = rms_norm(xp, k, p[f"{i}.k_norm"], c.rms_norm_eps)
        return apply_rope(xp, q, cos, sin), apply_rope(xp, k, cos, sin), v
