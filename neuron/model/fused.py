"""The fused forward pass: the plain path's arithmetic (llama.py) through the kernels of
neuron/kernels/fused_gemv.py.

Decode (one token): every layer is four GEMV launches with their neighbours folded in (RMSNorm
into the q/k/v and gate/up GEMVs, silu(gate)*up into the gate/up GEMV's epilogue, the residual
adds into the o/down GEMVs) plus the rotary/KV-write kernel and split-K attention; the final norm, lm_head and argmax
close the step. Nothing in a step allocates or waits for the host, so on CUDA the whole step is
captured once as a graph (cuda_graph.py) and replayed; only the sampled token id comes back.

Prefill (a prompt): cuBLAS matmuls over all its tokens, the same fused elementwise kernels, and
attention in query chunks (scores of at most ATTN_SCORE_BYTES live at once, never [heads, T, T]).

Tensor parallelism: the row-parallel products (o, down) write float32 partial sums, the
communicator sums them in float32, and one kernel rounds the sum and adds it into the residual, so
a TP rank rounds exactly where a single GPU does (only the float32 summation order differs). The
lm_head is vocab-parallel in decode (each rank its rows, then an all-gather of the float32 logits),
so every rank holds the same logits and picks the same token. NCCL collectives are captured in the
decode graph like any kernel (on the worker's stream, which is the communicator's); prefill stays
eager. Greedy decode is pipelined on every rank: the leader announces each step it queues to the
followers (`announce`), a chained step as an empty token list, and followers replay the same graph
with the same meta (`follow`), their chained input being the token their own graph picked.
"""
from __future__ import annotations

import numpy as np

from neuron.kernels.fused_gemv import softmax_scale

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
        self.rank, self.size = (comm.rank, comm.size) if self.tp else (0, 1)
        # decode's vocab-parallel lm_head: this rank's rows [lo, hi) of a chunk of `vchunk` rows
        vocab = self.lm_head.shape[0]
        self.vchunk = -(-vocab // self.size)
        lo, hi = min(self.rank * self.vchunk, vocab), min((self.rank + 1) * self.vchunk, vocab)
        self.lm_rows = (lo, hi)
        self.graph_factory = graph_factory
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
        self.part = xp.empty(h, dtype=xp.float32) if self.tp else None  # float32 row-parallel partial / sum
        self.x2 = xp.empty(h, dtype=T) if self.tp else None  # TP: the residual stream ping-pongs x <-> x2
        ns = self.ops.attn_splits(self.g, self.d, kv.max_context)
        self.po = xp.empty((self.hq, ns, self.d), dtype=xp.float32)
        self.pm = xp.empty((self.hq, ns), dtype=xp.float32)
        self.pl = xp.empty((self.hq, ns), dtype=xp.float32)
        vocab = self.lm_head.shape[0]
        if self.tp:
            # size chunks of vchunk logits, gathered in place; a short last chunk is padded with -inf
            self.logits_all = xp.full(self.size * self.vchunk, -np.inf, dtype=xp.float32)
            self.logits = self.logits_all[:vocab]
            lo, hi = self.lm_rows
            self.logits_mine = self.logits_all[self.rank * self.vchunk:self.rank * self.vchunk + (hi - lo)]
            self.lm_head_mine = self.lm_head[lo:hi]
        else:
            self.logits = xp.empty(vocab, dtype=xp.float32)
        self.tokens = xp.zeros(kv.slots, dtype=xp.int32)  # last token picked on the device, per slot
        self._buffers_for = kv

    # ------------------------------------------------------------------ decode

    def _decode_body(self, kv, collectives: bool = True) -> None:
        """One decode step (kernel launches only). collectives=False leaves the NCCL calls out: a
        warm-up that runs on one rank alone, or a profile of the step without its communication.

        Under TP the residual add of each summed row-parallel partial is folded into the next
        GEMV's prologue ("resid_rms": x + T(sum) is formed, normed and used by every block; block
        0 stores it), so the residual stream alternates between x and x2 (two adds per layer)."""
        if not self.tp:
            return self._decode_body_single(kv)
        ops, p, c = self.ops, self.p, self.c
        meta = self.io.meta
        ops.embed_row(p["embed"], meta, self.tokens, self.x)
        cur, nxt = self.x, self.x2
        pending = None  # (bias,) of the row-parallel sum in self.part that is not yet in the residual

        def normed(W, out, epi, norm_w, bias=None, outf=None):
            nonlocal cur, nxt, pending
            if pending is None:
                ops.gemv(W, cur, out, "rms", epi, norm_w=norm_w, eps=self.eps, bias=bias, outf=outf)
                return
            ops.gemv(W, cur, out, "resid_rms", epi, norm_w=norm_w, eps=self.eps, bias=bias, outf=outf,
                     resid=self.part, resid_bias=pending[0], xout=nxt)
            cur, nxt, pending = nxt, cur, None

        for i in range(c.num_layers):
            normed(p[f"{i}.qkv"], self.qkv, "store", p[f"{i}.input_norm"])
            self._attention(i, kv)
            ops.gemv(p[f"{i}.o"], self.attn, None, "none", "partial", outf=self.part)
            if collectives:
                self._sum(self.part)
            pending = (p.get(f"{i}.o_bias"),)
            normed(p[f"{i}.gate_up"], self.act, "silu_pair", p[f"{i}.post_norm"], bias=p.get(f"{i}.gate_up_bias"))
            ops.gemv(p[f"{i}.down"], self.act, None, "none", "partial", outf=self.part)
            if collectives:
                self._sum(self.part)
            pending = (p.get(f"{i}.down_bias"),)
        normed(self.lm_head_mine, None, "logits", p["norm"], outf=self.logits_mine)
        if collectives:
            self.comm.all_gather_into(self.logits_all)
        ops.argmax(self.logits, self.tokens, meta)

    def _decode_body_single(self, kv) -> None:
        ops, p, c = self.ops, self.p, self.c
        meta = self.io.meta
        ops.embed_row(p["embed"], meta, self.tokens, self.x)
        for i in range(c.num_layers):
            ops.gemv(p[f"{i}.qkv"], self.x, self.qkv, "rms", "store", norm_w=p[f"{i}.input_norm"], eps=self.eps)
            self._attention(i, kv)
            ops.gemv(p[f"{i}.o"], self.attn, self.x, "none", "resid", bias=p.get(f"{i}.o_bias"))
            ops.gemv(p[f"{i}.gate_up"], self.x, self.act, "rms", "silu_pair", norm_w=p[f"{i}.post_norm"], eps=self.eps,
                     bias=p.get(f"{i}.gate_up_bias"))
            ops.gemv(p[f"{i}.down"], self.act, self.x, "none", "resid", bias=p.get(f"{i}.down_bias"))
        ops.gemv(self.lm_head, self.x, None, "rms", "logits", norm_w=p["norm"], eps=self.eps, outf=self.logits)
        ops.argmax(self.logits, self.tokens, meta)

    def _attention(self, i: int, kv) -> None:
        """Layer i's decode attention after its q/k/v GEMV: rotary + KV write, then attention."""
        p, meta = self.p, self.io.meta
        self.ops.qkv_post(self.qkv, meta, 1, p.get(f"{i}.qkv_bias"), p.get(f"{i}.q_norm"), p.get(f"{i}.k_norm"),
                          self.cos, self.sin, self.q, kv.keys[i], kv.values[i], self.hq, self.hkv, self.d, self.eps)
        self.ops.attn_decode(self.q, kv.keys[i], kv.values[i], meta, self.window, self.scale, self.po, self.pm,
                             self.pl, self.attn, self.hq, self.hkv, self.d)

    def _sum(self, buf) -> None:
        """In-place all-reduce (the NCCL engine sums in place; the TCP engine returns a new array)."""
        out = self.comm.all_reduce(buf)
        if out is not buf:
            buf[...] = out

    def _share_tokens(self) -> None:
        """Every rank takes rank 0's picked tokens (after an eager prefill's argmax): the chained
        decode steps of all ranks then read the same input even if the ranks' prefill logits differ
        in the last bit (different GPUs, different cuBLAS kernels)."""
        out = self.comm.broadcast(self.tokens, 0)
        if out is not self.tokens:
            self.tokens[...] = out

    def prepare(self, kv) -> None:
        """Compile the kernels and capture the decode graph for this KV cache (called at load).
        The warm-up before capture runs without collectives, so a rank captures on its own: no
        rank waits for another at load. The captured graph holds the NCCL calls."""
        self.ops.compile_all()
        self._decode_buffers(kv)
        if self.graph_factory is not None and self._graph_kv is not kv:
            self.release_graphs()
            self.io.set_meta(0, 0, 0)
            if self.tp and hasattr(self.comm, "before_abort"):
                self.comm.before_abort(self.release_graphs)  # NCCL keeps a communicator while a graph holds it
            graph = self.graph_factory(lambda: self._decode_body(kv), lambda: self._decode_body(kv, collectives=False))
            graph.capture()
            self._graph, self._graph_kv = graph, kv

    def release_graphs(self) -> None:
        """Drop the captured decode graph (before the communicator it captured is aborted or
        destroyed; the next step captures again if the shard is still used)."""
        graph, self._graph, self._graph_kv = self._graph, None, None
        if graph is not None:
            graph.graph = None
            graph.body = graph.warmup = None

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

    def _next_greedy(self, token: int, pos: int, kv, slot: int, before_read, more: bool = True, announce=None) -> int:
        """Greedy decode, pipelined: the step after this one is queued (chained on the device)
        before the host waits for this one's token, so the GPU never idles on the host. If the
        caller feeds something else than the chained step assumed, that step is simply redone."""
        if self._queued.pop(slot, None) != (pos, token):
            if announce is not None:
                announce([token], pos, slot)
            self._launch(pos, kv, slot, token)
            self.io.copy_token_async(self.tokens, slot, pos % 2)
        return self._chain_and_read(pos, kv, slot, before_read, more, announce)

    def _chain_and_read(self, pos: int, kv, slot: int, before_read, more: bool = True, announce=None) -> int:
        """The token of the step at `pos` (already queued with its copy), after queueing pos + 1
        when another token is expected."""
        chained = more and pos + 1 < kv.max_context
        if chained:
            if announce is not None:
                announce([], pos + 1, slot)  # followers chain on their own picked token too
            self._launch(pos + 1, kv, slot, None)
            self.io.copy_token_async(self.tokens, slot, (pos + 1) % 2)
        if before_read is not None:
            before_read(self.io.token_ready(slot, pos % 2))  # bounded (NCCL step deadline) before blocking
        token = self.io.wait_token(slot, pos % 2)
        if chained:
            self._queued[slot] = (pos + 1, token)
        return token

    def follow(self, token_ids: list[int], start: int, kv, slot: int) -> None:
        """A follower rank's step, as announced by its leader: [] a chained decode step, [t] one
        token, more: a prompt (eager prefill). Queued, not waited for (see io.previous_step_done)."""
        if not token_ids:
            self._launch(start, kv, slot, None)
        elif len(token_ids) == 1:
            self._launch(start, kv, slot, int(token_ids[0]))
        else:
            self._prefill(self.xp.asarray(np.asarray(token_ids, dtype=np.int32)), start, kv, slot, False)
        self.io.mark_step()

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
            if i == 0:
                ops.add_rmsnorm(x, None, p["0.input_norm"], self.eps, h)
                mark("norm")
            qkv = ops.linear(h, p[f"{i}.qkv"])
            mark("qkv matmul")
            ops.qkv_post(qkv, meta, tn, p.get(f"{i}.qkv_bias"), p.get(f"{i}.q_norm"), p.get(f"{i}.k_norm"),
                         self.cos, self.sin, q, kv.keys[i], kv.values[i], self.hq, self.hkv, self.d, self.eps)
            mark("rope+kv write")
            self._prefill_attention(q, kv.keys[i], kv.values[i], slot, start, attn)
            mark("attention")
            self._prefill_attention_out(i, attn, x, h)
            mark("norm")
            gu = ops.linear(h, p[f"{i}.gate_up"])
            if f"{i}.gate_up_bias" in p:
                gu = gu + p[f"{i}.gate_up_bias"]
            mark("gate_up matmul")
            ops.silu_mul(gu, act)
            mark("silu*up")
            delta = self._prefill_down(i, act)
            mark("down matmul")
            if i + 1 < c.num_layers:  # the residual add of this layer, with the next layer's input norm
                self._prefill_residual(i, x, delta, p[f"{i + 1}.input_norm"], h)
                mark("norm")
        if not all_positions:
            x, delta, h = x[-1:], delta[-1:], h[-1:]
        self._prefill_residual(c.num_layers - 1, x, delta, p["norm"], h)
        logits = ops.linear(h, self.lm_head).astype(xp.float32)
        mark("lm_head")
        if self.tp:
            ops.argmax(logits[-1], self.tokens, meta)  # meta holds (start, slot)
            self._share_tokens()
        return logits

    def _prefill_attention_out(self, i: int, attn, x, h) -> None:
        """Layer i's o_proj, added to the residual x, and the post-attention norm of x into h."""
        ops, p = self.ops, self.p
        if self.tp:
            o = ops.linear_f32(attn, p[f"{i}.o"])
            self._sum(o)
            self._mark("o matmul")
            ops.resid_add_f32(x, o, p.get(f"{i}.o_bias"), p[f"{i}.post_norm"], self.eps, h)
            return
        o = ops.linear(attn, p[f"{i}.o"])
        if f"{i}.o_bias" in p:
            o = o + p[f"{i}.o_bias"]
        self._mark("o matmul")
        ops.add_rmsnorm(x, o, p[f"{i}.post_norm"], self.eps, h)

    def _prefill_down(self, i: int, act):
        """Layer i's down_proj: float32 partial sums, summed over ranks, under TP (their bias is
        added once, with the residual); the biased product otherwise."""
        ops, p = self.ops, self.p
        if self.tp:
            delta = ops.linear_f32(act, p[f"{i}.down"])
            self._sum(delta)
            return delta
        delta = ops.linear(act, p[f"{i}.down"])
        if f"{i}.down_bias" in p:
            delta = delta + p[f"{i}.down_bias"]
        return delta

    def _prefill_residual(self, i: int, x, delta, norm, h) -> None:
        """x += layer i's MLP output, then h = rmsnorm(x) * norm (the next layer's input norm, or the final one)."""
        if self.tp:
            self.ops.resid_add_f32(x, delta, self.p.get(f"{i}.down_bias"), norm, self.eps, h)
        else:
            self.ops.add_rmsnorm(x, delta, norm, self.eps, h)

    def _prefill_attention(self, q, kc, vc, slot: int, start: int, attn) -> None:
        xp, ops = self.xp, self.ops
        hkv, tn, g, d = q.shape
        item = q.dtype.itemsize
        lc_max = start + tn
        rows = max(1, min(tn, ATTN_SCORE_BYTES // (hkv * g * lc_max * item)))
        scores = xp.empty(hkv * rows * g * lc_max, dtype=q.dtype)
        outputs = xp.empty(hkv * rows * g * d, dtype=q.dtype)
        for t0 in range(0, tn, rows):
            cc = min(rows, tn - t0)
            lc = start + t0 + cc
            m = cc * g
            s = scores[:hkv * m * lc].reshape(hkv, m, lc)
            o = outputs[:hkv * m * d].reshape(hkv, m, d)
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
                   more: bool = True, announce=None) -> int:
        """Run `feed` (a prompt, or the one last token) and pick the next token; greedy decoding
        without a repetition penalty picks on the device and reads back one int32. `announce(ids,
        start, slot)` (a TP leader's followers) is told every step before it is queued."""
        simple = sampler.config.greedy and sampler.config.repetition_penalty == 1.0
        if len(feed) == 1:
            if simple:
                return self._next_greedy(int(feed[0]), start, kv, slot, before_read, more, announce)
            if announce is not None:
                announce([int(feed[0])], start, slot)
            self._decode(start, kv, slot, int(feed[0]))
            logits = self.logits
        else:
            if announce is not None:
                announce(list(feed), start, slot)
            tokens = self.xp.asarray(np.asarray(feed, dtype=np.int32))
            logits = self._prefill(tokens, start, kv, slot, False)[-1]
            if simple:
                last = start + len(feed) - 1
                if not self.tp:  # under TP the prefill has picked (and shared) the token already
                    self.ops.argmax(logits, self.tokens, self.io.meta)  # meta still holds (start, slot)
                self.io.copy_token_async(self.tokens, slot, last % 2)
                return self._chain_and_read(last, kv, slot, before_read, more, announce)
        if before_read is not None:
            before_read()
        return sampler.sample(self.xp, logits, history())


def new_engine(config, layout, params: dict, xp, comm, cos, sin, mode: str):
    """A FusedLlama on CUDA kernels (mode "cuda") or on their NumPy mirror (mode "numpy")."""
    dtype_name = np.dtype(params["embed"].dtype).name
    if mode == "numpy":
        from .cuda_graph import NumpyStepIO
        from neuron.kernels.fused_gemv import NumpyOps
        return FusedLlama(config, layout, params, xp, comm, cos, sin, NumpyOps(dtype_name), NumpyStepIO())
    from .cuda_graph import CudaStepIO, DecodeGraph
    from neuron.kernels.fused_gemv import CudaOps
    return FusedLlama(config, layout, params, xp, comm, cos, sin, CudaOps(dtype_name), CudaStepIO(xp),
                      graph_factory=lambda body, warmup=None: DecodeGraph(xp, body, warmup))


__all__ = ["FusedLlama", "new_engine"]
