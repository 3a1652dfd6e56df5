"""Where a decode turn's time goes, on a GPU shard: each op class of the batched forward pass timed
alone with CUDA events at the turn's batch size, beside its bandwidth or FLOP limit, and the whole
captured turn replayed from its CUDA graph. Used by engine_bench.py, whose "host" time is its
measured turn minus the replay: the host's time when the device waits for it, or device work that a
lone replay lacks (clocks under sustained load, the inputs' copies); its turn log's device time and
`finish` wait tell which.

Each op class is captured in a CUDA graph and replayed (bench.common.graph_ms), so its figure is
device time with a graph's launch gaps, not Python's launch cost. Op classes, summed over the layers: `gemm` (qkv, o, gate/up, down and the LM head at M = batch),
`one_row_gemv_layers` / `one_row_gemv_lm_head` (at one row, when the shard folds the norms, silu
and residual adds into GEMVs: what that turn runs instead of `gemm` and `norms`),
`attention` (the paged decode kernel at the given context), `norms` (residual add + RMSNorm twice,
rotary + KV write, silu * up), `sampler` (the general sampler, eager, the turn's one copy to the host
included), `greedy_pick` (what an all-greedy turn runs), `graph_replay` (the whole turn) and
`graph_replay_x100` (per replay, 100 back to back: clocks under sustained load).
"""
from __future__ import annotations

import numpy as np

from bench.common import graph_ms, time_ms
from neuron.layers.attention import DecodeBatch
from neuron.runner.sampler import RowSampler, SampleRow, greedy_rows, sample_rows
from neuron.sampling import SamplingConfig


def profile_decode_turn(shard, n: int, context: int, bandwidth_gb_s: float, tflops: float) -> dict:
    model, kv = shard.model, shard.kv
    cp, ops, p, c = model.xp, model.ops, model.p, model.config
    rng = np.random.default_rng(0)
    h = cp.asarray(rng.standard_normal((n, c.hidden_size)).astype(np.float32)).astype(p["embed"].dtype)
    layers = c.num_layers
    out: dict = {"concurrency": n, "context": context}

    def timed(name: str, fn, bytes_moved: float, flops: float, times: float = 1, captured: bool = True) -> None:
        """Captured ops are timed inside a CUDA graph (device time, as in the turn's graph); an op
        that cannot be captured (the sampler's copy to the host) is timed eagerly."""
        how = "graph"
        try:
            ms = graph_ms(cp, fn) * times if captured else None
        except Exception:  # noqa: BLE001 - an op that refuses capture is still timed
            ms = None
        if ms is None:
            ms, how = time_ms(cp, fn, reps=10) * times, "eager"
        limit = max(bytes_moved / (bandwidth_gb_s * 1e9), flops / (tflops * 1e12)) * 1e3
        out[name] = {"ms": round(ms, 4), "limit_ms": round(limit, 4), "timed": how}

    weights = [p[f"0.{w}"] for w in ("qkv", "o", "gate_up", "down")]
    inputs = {w.shape[1]: cp.ascontiguousarray(cp.broadcast_to(h[:, :1], (n, w.shape[1]))) for w in weights}

    def gemms():
        for w in weights:
            ops.linear(inputs[w.shape[1]], w)
    gemm_bytes = sum(int(w.nbytes) for w in weights) * layers
    gemm_flops = 2 * n * sum(w.shape[0] * w.shape[1] for w in weights) * layers
    timed("gemm_layers", gemms, gemm_bytes, gemm_flops, layers)
    timed("gemm_lm_head", lambda: ops.linear(h, model.lm_head), int(model.lm_head.nbytes),
          2 * n * model.lm_head.shape[0] * model.lm_head.shape[1])

    # attention over `context` keys per row: blocks drawn at random from the pool (contents irrelevant)
    blocks = -(-context // kv.block_size)
    tables = rng.integers(0, kv.num_blocks, (n, blocks)).astype(np.int32)
    batch = DecodeBatch(np.arange(n), np.arange(0), None, cp.asarray(tables),
                        cp.asarray(np.full(n, context, dtype=np.int32)))
    q = cp.asarray(rng.standard_normal((n, model.heads.q_heads, c.head_dim)).astype(np.float32)).astype(h.dtype)
    kv_bytes = 2 * n * context * model.heads.kv_size * h.dtype.itemsize
    if model.decode_attention is not None:
        timed("attention", lambda: model.decode_attention(q, kv.keys[0], kv.values[0], batch, c.sliding_window),
              kv_bytes * layers, 4 * n * context * model.heads.q_size * layers, layers)

    qkv = ops.linear(h, p["0.qkv"])
    gate_up = ops.linear(h, p["0.gate_up"])
    rotary = ops.rotary(cp.asarray(np.full(n, context - 1, dtype=np.int32)))
    slots = cp.asarray(np.full(n, kv.scratch_block * kv.block_size, dtype=np.int64))
    x = h.copy()

    def norms():
        ops.add_rms_norm(x, h, p["0.post_norm"], c.rms_norm_eps)
        ops.add_rms_norm(x, h, p["0.input_norm"], c.rms_norm_eps)
        ops.rope_write_kv(qkv, rotary, model.heads, kv.flat_keys(0), kv.flat_values(0), slots)
        ops.silu_mul(gate_up)
    item = h.dtype.itemsize
    norm_bytes = item * n * (6 * c.hidden_size + 2 * qkv.shape[1] + 3 * gate_up.shape[1] // 2)
    timed("norms_rope_silu", norms, norm_bytes * layers, 0, layers)

    if n == 1 and ops.gemv is not None:
        # what a one-row turn runs instead of the products and norms above: the GEMV layer with the
        # norms, rotary, silu and residual adds folded in (LayerOps.norm_qkv_rope, norm_linear,
        # linear_residual)
        from neuron.collectives import SingleRank
        from neuron.kernels.launch import programmatic_launches
        from neuron.layers.ops import Residual
        one = SingleRank()
        attended = cp.ascontiguousarray(h[:, :1].repeat(model.heads.q_size, axis=1))
        graphs = shard.engine.runner.graphs

        def one_row_layer():   # launched as the decode graph launches it
            with programmatic_launches(graphs is not None and graphs.programmatic):
                res, _ = ops.norm_qkv_rope(Residual(h.copy()), p["0.input_norm"], c.rms_norm_eps, p["0.qkv"],
                                           p.get("0.qkv_bias"), rotary, model.heads, kv.flat_keys(0),
                                           kv.flat_values(0), slots)
                res = ops.linear_residual(res, attended, p["0.o"], None, one)
                res, act = ops.norm_linear(res, p["0.post_norm"], c.rms_norm_eps, p["0.gate_up"], silu=True)
                ops.linear_residual(res, act, p["0.down"], None, one)
        timed("one_row_gemv_layers", one_row_layer, gemm_bytes, gemm_flops, layers)
        logits_row = cp.zeros(1, dtype=cp.int32)
        timed("one_row_gemv_lm_head", lambda: ops.norm_logits(Residual(h), p["norm"], c.rms_norm_eps, model.lm_head,
                                                              logits_row),
              int(model.lm_head.nbytes), 2 * model.lm_head.shape[0] * model.lm_head.shape[1])

    logits = cp.asarray(rng.standard_normal((n, c.vocab_size)).astype(np.float32))
    rows = [SampleRow(RowSampler.create(SamplingConfig(), c.vocab_size), j, []) for j in range(n)]
    timed("sampler", lambda: sample_rows(cp, logits, rows), int(logits.nbytes), 0, captured=False)
    # what an all-greedy turn (every benchmark's) runs instead: the first maximum of each row on the device
    row_ids = cp.arange(n, dtype=cp.int64)   # on the device already: no upload inside the capture
    timed("greedy_pick", lambda: greedy_rows(cp, logits, row_ids), int(logits.nbytes), 0)

    graphs = shard.engine.runner.graphs
    bucket = None if graphs is None else next((graphs.buckets[b] for b in sorted(graphs.buckets) if b >= n), None)
    if bucket is not None and bucket.graph is not None:
        stream = cp.cuda.get_current_stream()
        timed("graph_replay", lambda: bucket.graph.launch(stream),
              shard.weight_bytes + kv_bytes * layers, 2 * shard.num_parameters * n, captured=False)
        # the same replay 100 times back to back, as a serving run's turns come: if the clocks drop
        # under sustained load, this is slower than the one replay timed above
        timed("graph_replay_x100", lambda: [bucket.graph.launch(stream) for _ in range(100)],
              shard.weight_bytes + kv_bytes * layers, 2 * shard.num_parameters * n, times=0.01, captured=False)
        out["graph_bucket"] = bucket.size
    return out


def print_profile(name: str, row: dict) -> None:
    parts = [f"{k} {v['ms']:.3f} ms (limit {v['limit_ms']:.3f})" for k, v in row.items() if isinstance(v, dict)]
    print(f"{name:>3} n={row['concurrency']:>3} profile: " + "; ".join(parts), flush=True)
