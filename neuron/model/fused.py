"""The fused forward pass: the plain path's arithmetic (llama.py) through the kernels of kernels.py.

Decode (one token): every layer is four GEMV launches with their neighbours folded in (RMSNorm
into the q/k/v and gate/up GEMVs, silu(gate)*up into the gate/up GEMV's epilogue, the residual
adds into the o/down GEMVs) plus the rotary/KV-write kernel and split-K attention; the final norm, lm_head and argmax
close the step. Nothing in a step allocates or waits for the host, so on CUDA the whole step is
captured once as a graph (cuda_graph.py) and replayed; only the sampled token id comes back.

Prefill (a prompt): cuBLAS matmuls over all its tokens, the same fused elementwise kernels, and
attention in query chunks (scores of at most ATTN_SCORE_BYTES live at once, never [heads, T, T]).

With tensor parallelism the row-parallel GEMVs store their partial sums, the communicator sums
them, and the residual add follows; graphs are then not captured (the collectives run eagerly).
"""
from __future__ import annotations

import numpy as np

from .kernels import softmax_scale

ATTN_SCORE_BYTES = 128 << 20  # prefill attention: score/probability memory per query chunk


class FusedLlama:
    def __init__(self, config, layout, params: dict, xp, comm, cos, sin, ops, io, graph_factory=None):
        self.c, self.p, self.xp, self.comm, self.ops, self.io = config, params, xp, comm, ops, io
        self.cos, self.sin = cos, sin
        self.dtype = params["embed"].dtype
        self.hq, self.hkv, self.d = layout.local_heads, layout.local_kv_heads, config.head_dim
        self.g = self.hq // self.hkv
        self.inter = len(layout.intermediate)
        self.eps = float(config.rms_norm_eps)
        self.scale = softmax_scale(self.d)
        self.window = int(config.sliding_window or 0)
        self.lm_head = params.get("lm_head", params["embed"])
        self.tp = getattr(comm, "size", 1) > 1
        self.graph_factory = None if self.tp else graph_factory
        self._graph = None
        self._graph_kv = None
        self._buffers_for = None
        self._queued: dict[int, tuple[int, int]] = {}  # slot -> (position, input token) of a chained step in flight
        self.marks: list | None = None  # profiling: (label, event) pairs recorded between prefill phases

    def _mark(self, label: str) -> None:
        if self.marks is not None:
            event = self.xp.cuda.Event()
            event.record()
            self.marks.append((label, event))

    # ------------------------------------------------------------------ buffers

    def _decode_buffers(self, kv) -> None:
        if self._buffers_for is kv:
            return
        xp, T = self.xp, self.dtype
        h = self.c.hidden_size
        self.x = xp.empty(h, dtype=T)
        self.qkv = xp.empty((self.hq + 2 * self.hkv) * self.d, dtype=T)
        self.q = xp.empty((self.hkv, 1, self.g, self.d), dtype=T)
        self.attn = xp.empty(self.hq * self.d, dtype=T)
        self.act = xp.empty(self.inter, dtype=T)
        self.part = xp.empty(h, dtype=T) if self.tp else None
        ns = self.ops.attn_splits(self.g, self.d, kv.max_context)
        self.po = xp.empty((self.hq, ns, self.d), dtype=xp.float32)
        self.pm = xp.empty((self.hq, ns), dtype=xp.float32)
        self.pl = xp.empty((self.hq, ns), dtype=xp.float32)
        self.logits = xp.empty(self.lm_head.shape[0], dtype=xp.float32)
        self.tokens = xp.zeros(kv.slots, dtype=xp.int32)  # last token picked on the device, per slot
        self._buffers_for = kv

    # ------------------------------------------------------------------ decode

    def _decode_body(self, kv) -> None:
        ops, p, c = self.ops, self.p, self.c
        meta = self.io.meta
        ops.embed_row(p["embed"], meta, self.tokens, self.x)
        for i in range(c.num_layers):
            ops.gemv(p[f"{i}.qkv"], self.x, self.qkv, "rms", "store", norm_w=p[f"{i}.input_norm"], eps=self.eps)
            ops.qkv_post(self.qkv, meta, 1, p.get(f"{i}.qkv_bias"), p.get(f"{i}.q_norm"), p.get(f"{i}.k_norm"),
                         self.cos, self.sin, self.q, kv.keys[i], kv.values[i], self.hq, self.hkv, self.d, self.eps)
            ops.attn_decode(self.q, kv.keys[i], kv.values[i], meta, self.window, self.scale,
                            self.po, self.pm, self.pl, self.attn, self.hq, self.hkv, self.d)
            self._row_parallel(p[f"{i}.o"], self.attn, "none", p.get(f"{i}.o_bias"))
            ops.gemv(p[f"{i}.gate_up"], self.x, self.act, "rms", "silu_pair", norm_w=p[f"{i}.post_norm"], eps=self.eps,
                     bias=p.get(f"{i}.gate_up_bias"))
            self._row_parallel(p[f"{i}.down"], self.act, "none", p.get(f"{i}.down_bias"))
        ops.gemv(self.lm_head, self.x, None, "rms", "logits", norm_w=p["norm"], eps=self.eps, outf=self.logits)
        ops.argmax(self.logits, self.tokens, meta)

    def _row_parallel(self, W, xin, pro: str, bias) -> None:
        """x += all_reduce(W . prologue(xin) [+ bias])."""
        if not self.tp:
            self.ops.gemv(W, xin, self.x, pro, "resid", bias=bias)
            return
        self.ops.gemv(W, xin, self.part, pro, "store", bias=bias)
        summed = self.comm.all_reduce(self.part)
        self.x[...] = self.x + summed

    def prepare(self, kv) -> None:
        """Compile the kernels and capture the decode graph for this KV cache (called at load)."""
        self.ops.compile_all()
        self._decode_buffers(kv)
        if self.graph_factory is not None and self._graph_kv is not kv:
            self.io.set_meta(0, 0, 0)
            graph = self.graph_factory(lambda: self._decode_body(kv))
            graph.capture()
            self._graph, self._graph_kv = graph, kv

    def _launch(self, pos: int, kv, slot: int, token: int | None, tokens_dev=None) -> None:
        """Queue one decode step. token None: a chained step, whose input is the token the previous
        step of this slot picked on the device (tokens[slot])."""
        if pos >= kv.max_context:
            raise ValueError(f"position {pos} is past the KV cache's context of {kv.max_context}")
        self._decode_buffers(kv)
        self.io.set_meta(pos, slot, -1 if token is None else token)
        if tokens_dev is not None:
            self.io.set_token_from_device(tokens_dev)
        if self.graph_factory is not None and self._graph_kv is not kv:
            self.prepare(kv)
        if self._graph is not None and self._graph_kv is kv:
            self._graph.launch()
        else:
            self._decode_body(kv)

    def _decode(self, pos: int, kv, slot: int, token: int | None, tokens_dev=None) -> None:
        self._queued.pop(slot, None)
        self._launch(pos, kv, slot, 0 if token is None else token, tokens_dev)

    def _next_greedy(self, token: int, pos: int, kv, slot: int, before_read, more: bool = True) -> int:
        """Greedy decode, pipelined: the step after this one is queued (chained on the device)
        before the host waits for this one's token, so the GPU never idles on the host. If the
        caller feeds something else than the chained step assumed, that step is simply redone."""
        if self._queued.pop(slot, None) != (pos, token):
            self._launch(pos, kv, slot, token)
            self.io.copy_token_async(self.tokens, slot, pos % 2)
        return self._chain_and_read(pos, kv, slot, before_read, more)

    def _chain_and_read(self, pos: int, kv, slot: int, before_read, more: bool = True) -> int:
        """The token of the step at `pos` (already queued with its copy), after queueing pos + 1
        when another token is expected."""
        chained = more and not self.tp and pos + 1 < kv.max_context
        if chained:
            self._launch(pos + 1, kv, slot, None)
            self.io.copy_token_async(self.tokens, slot, (pos + 1) % 2)
        if before_read is not None:
            before_read()
        token = self.io.wait_token(slot, pos % 2)
        if chained:
            self._queued[slot] = (pos + 1, token)
        return token

    # ------------------------------------------------------------------ prefill

    def _prefill(self, tokens, start: int, kv, slot: int, all_positions: bool):
        xp, ops, p, c = self.xp, self.ops, self.p, self.c
        tn = int(tokens.shape[0])
        if start + tn > kv.max_context:
            raise ValueError(f"positions {start}..{start + tn - 1} are past the KV cache's context of {kv.max_context}")
        self._queued.pop(slot, None)
        self._decode_buffers(kv)
        self.io.set_meta(start, slot, 0)
        meta = self.io.meta
        T = self.dtype
        x = p["embed"][tokens]
        h = xp.empty_like(x)
        q = xp.empty((self.hkv, tn, self.g, self.d), dtype=T)
        attn = xp.empty((tn, self.hq * self.d), dtype=T)
        act = xp.empty((tn, self.inter), dtype=T)
        delta = None
        mark = self._mark
        mark("start")
        for i in range(c.num_layers):
            ops.add_rmsnorm(x, delta, p[f"{i}.input_norm"], self.eps, h)
            mark("norm")
            qkv = ops.linear(h, p[f"{i}.qkv"])
            mark("qkv matmul")
            ops.qkv_post(qkv, meta, tn, p.get(f"{i}.qkv_bias"), p.get(f"{i}.q_norm"), p.get(f"{i}.k_norm"),
                         self.cos, self.sin, q, kv.keys[i], kv.values[i], self.hq, self.hkv, self.d, self.eps)
            mark("rope+kv write")
            self._prefill_attention(q, kv.keys[i], kv.values[i], slot, start, attn)
            mark("attention")
            o = ops.linear(attn, p[f"{i}.o"])
            if f"{i}.o_bias" in p:
                o = o + p[f"{i}.o_bias"]
            o = self.comm.all_reduce(o)
            mark("o matmul")
            ops.add_rmsnorm(x, o, p[f"{i}.post_norm"], self.eps, h)
            mark("norm")
            gu = ops.linear(h, p[f"{i}.gate_up"])
            if f"{i}.gate_up_bias" in p:
                gu = gu + p[f"{i}.gate_up_bias"]
            mark("gate_up matmul")
            ops.silu_mul(gu, act)
            mark("silu*up")
            dn = ops.linear(act, p[f"{i}.down"])
            if f"{i}.down_bias" in p:
                dn = dn + p[f"{i}.down_bias"]
            delta = self.comm.all_reduce(dn)
            mark("down matmul")
        if not all_positions:
            x, delta, h = x[-1:], delta[-1:], h[-1:]
        ops.add_rmsnorm(x, delta, p["norm"], self.eps, h)
        logits = ops.linear(h, self.lm_head).astype(xp.float32)
        mark("lm_head")
        return logits

    def _prefill_attention(self, q, kc, vc, slot: int, start: int, attn) -> None:
        xp, ops = self.xp, self.ops
        hkv, tn, g, d = q.shape
        item = q.dtype.itemsize
        lc_max = start + tn
        rows = max(1, min(tn, ATTN_SCORE_BYTES // (hkv * g * lc_max * item)))
        S = xp.empty(hkv * rows * g * lc_max, dtype=q.dtype)
        O = xp.empty(hkv * rows * g * d, dtype=q.dtype)
        for t0 in range(0, tn, rows):
            cc = min(rows, tn - t0)
            lc = start + t0 + cc
            m = cc * g
            s = S[:hkv * m * lc].reshape(hkv, m, lc)
            o = O[:hkv * m * d].reshape(hkv, m, d)
            ops.attn_scores(q, kc, slot, t0, cc, lc, s)
            ops.softmax_rows(s, self.io.meta, t0, g, self.window, self.scale)
            ops.attn_pv(s, vc, slot, o)
            attn[t0:t0 + cc].reshape(cc, hkv, g, d)[...] = o.reshape(hkv, cc, g, d).transpose(1, 0, 2, 3)

    # ------------------------------------------------------------------ entry points

    def forward(self, tokens, start: int, kv, slot: int, all_positions: bool = False):
        """Same contract as LlamaModel.forward: float32 logits [T, vocab] or [1, vocab]."""
        if int(tokens.shape[0]) == 1:
            self._decode(start, kv, slot, None, tokens_dev=tokens)
            return self.logits[None].copy()
        return self._prefill(tokens, start, kv, slot, all_positions)

    def next_token(self, feed: list[int], start: int, kv, slot: int, sampler, history, before_read=None,
                   more: bool = True) -> int:
        """Run `feed` (a prompt, or the one last token) and pick the next token; greedy decoding
        without a repetition penalty picks on the device and reads back one int32."""
        simple = sampler.config.greedy and sampler.config.repetition_penalty == 1.0 and not self.tp
        if len(feed) == 1:
            if simple:
                return self._next_greedy(int(feed[0]), start, kv, slot, before_read, more)
            self._decode(start, kv, slot, int(feed[0]))
            logits = self.logits
        else:
            tokens = self.xp.asarray(np.asarray(feed, dtype=np.int32))
            logits = self._prefill(tokens, start, kv, slot, False)[-1]
            if simple:
                last = start + len(feed) - 1
                self.ops.argmax(logits, self.tokens, self.io.meta)  # meta still holds (start, slot)
                self.io.copy_token_async(self.tokens, slot, last % 2)
                return self._chain_and_read(last, kv, slot, before_read, more)
        if before_read is not None:
            before_read()
        return sampler.sample(self.xp, logits, history())


def new_engine(config, layout, params: dict, xp, comm, cos, sin, mode: str):
    """A FusedLlama on CUDA kernels (mode "cuda") or on their NumPy mirror (mode "numpy")."""
    dtype_name = np.dtype(params["embed"].dtype).name
    if mode == "numpy":
        from .cuda_graph import NumpyStepIO
        from .kernels import NumpyOps
        return FusedLlama(config, layout, params, xp, comm, cos, sin, NumpyOps(dtype_name), NumpyStepIO())
    from .cuda_graph import CudaStepIO, DecodeGraph
    from .kernels import CudaOps
    return FusedLlama(config, layout, params, xp, comm, cos, sin, CudaOps(dtype_name), CudaStepIO(xp),
                      graph_factory=lambda body: DecodeGraph(xp, body))


__all__ = ["FusedLlama", "new_engine"]
