"""Decode/prefill/load benchmark of the neuron on one GPU, beside transformers and the roofline.

One command, on a GPU machine:

    python bench/decode_bench.py                      # 1B and 8B shapes, everything
    python bench/decode_bench.py --models 8b --baseline eager --no-servers   # a quicker subset

In one run it:
1. measures the device ceilings: device-to-device copy bandwidth (bytes read + written), pinned
   host-to-device bandwidth, bf16 matmul FLOP/s (8192^3, random data);
2. writes random-weight bf16 checkpoints of the Llama-3.2-1B and Llama-3-8B shapes (make_checkpoint.py);
3. measures the neuron in-process (DeviceWorker jobs: load, Generate, the path the gRPC service
   drives): load GB/s from page cache, decode tok/s at batch 1 (128-token prompt), time to first
   token for 128- and 2048-token prompts; plus a profile of where a decode step and a 2048-token
   prefill spend their time (CUDA events, kernel groups replayed as graphs);
4. measures the same through real processes: `neuron serve` directly over gRPC, and `cortex serve`
   in front of it;
5. measures the baseline on the same weights: transformers `generate` eager, and with static cache
   + torch.compile when that compiles within --compile-budget seconds;
6. prints one table (each figure beside its baseline and its roofline) and writes JSON to
   bench/results/decode_bench-<time>.json with the commit and the GPU name.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit, copy_bandwidth, gpu_name, time_kernel_groups, time_ms  # noqa: E402
from bench.gpu_checks import generate, generate_async, load, start_worker, wait  # noqa: E402
from bench.make_checkpoint import SHAPES, write_checkpoint  # noqa: E402

MODELS = {"1b": "llama-3.2-1b", "8b": "llama-3-8b"}
TARGETS = {"1b": {"decode_tok_s": 800}, "8b": {"decode_tok_s": 200, "cortex_decode_tok_s": 190, "ttft_2048_ms": 120,
                                             "load_gb_s": 3.0}}
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ ceilings

def ceilings() -> dict:
    import cupy as cp

    out = {"copy_gb_s": copy_bandwidth(cp)}
    # Each measurement's buffers live in its own function's frame, so they are free when it returns.
    out["h2d_pinned_gb_s"] = (1 << 30) / _h2d_pinned_ms(cp, 1 << 30) / 1e6
    m = 8192
    out["bf16_matmul_tflop_s"] = 2 * m ** 3 / _bf16_matmul_ms(cp, m) / 1e9
    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()
    return out


def _h2d_pinned_ms(cp, nbytes: int) -> float:
    import cupyx
    from cupy_backends.cuda.api import runtime
    host = cupyx.empty_pinned((nbytes,), dtype=np.uint8)
    host[:] = 7
    device = cp.empty(nbytes, dtype=cp.uint8)
    return time_ms(cp, lambda: runtime.memcpyAsync(device.data.ptr, host.ctypes.data, nbytes, runtime.memcpyHostToDevice,
                                                     cp.cuda.get_current_stream().ptr), reps=5)


def _bf16_matmul_ms(cp, m: int) -> float:
    import ml_dtypes
    x = cp.random.standard_normal((m, m), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    y = cp.random.standard_normal((m, m), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    return time_ms(cp, lambda: x @ y, reps=10)


def read_probe(path: Path, limit: int = 4 << 30) -> dict:
    """Page-cache read rate of the checkpoint's first file into pinned memory, with 1, 8 and 16
    threads (each thread its own contiguous part): the host side's ceiling for loading."""
    import mmap

    file = sorted(path.glob("*.safetensors"))[0]
    size = min(file.stat().st_size, limit)
    out = {"file_bytes": size}
    for threads in (1, 8, 16):
        out[f"threads_{threads}_gb_s"] = _pread_rate(file, size, threads)
    with open(file, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        for threads in (1, 8):
            out[f"mmap_copy_threads_{threads}_gb_s"] = _mmap_copy_rate(mm, size, threads)
        mm.close()
    return out


READ_CHUNK = 64 << 20


def _pread_rate(file: Path, size: int, threads: int) -> float:
    """GB/s of `threads` threads, each preadv-ing its contiguous part into its own pinned buffer."""
    import cupyx
    bufs = [cupyx.empty_pinned((READ_CHUNK,), dtype=np.uint8) for _ in range(threads)]
    part = -(-size // threads)
    fd = os.open(file, os.O_RDONLY)

    def worker(k: int) -> None:
        view, off, end = memoryview(bufs[k]), k * part, min((k + 1) * part, size)
        while off < end:
            n = os.preadv(fd, [view[:min(READ_CHUNK, end - off)]], off)
            if n <= 0:
                break
            off += n
    try:
        return _parallel_rate(worker, threads, size)
    finally:
        os.close(fd)


def _mmap_copy_rate(mm, size: int, threads: int) -> float:
    """GB/s of `threads` threads copying their part of a mapped file into pinned buffers."""
    import cupyx
    src = np.frombuffer(mm, dtype=np.uint8, count=size)
    bufs = [cupyx.empty_pinned((READ_CHUNK,), dtype=np.uint8) for _ in range(threads)]
    part = -(-size // threads)

    def copier(k: int) -> None:
        off, end = k * part, min((k + 1) * part, size)
        while off < end:
            n = min(READ_CHUNK, end - off)
            bufs[k][:n] = src[off:off + n]
            off += n
    return _parallel_rate(copier, threads, size)


def _parallel_rate(work, threads: int, size: int) -> float:
    from concurrent.futures import ThreadPoolExecutor
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return size / (time.perf_counter() - started) / 1e9


# ------------------------------------------------------------------ profiles (run on the worker thread)

def profile_decode(backend, shard, pos: int = 300) -> dict:
    """Device time of one decode step (graph replay) and of each kernel group, each group captured
    as its own graph (so launch gaps are not counted twice), with the bytes each group must read."""

    cp = backend.xp
    f, kv = shard.model.fused, shard.kv
    ops, p, c = f.ops, f.p, f.c
    L = c.num_layers
    f.io.set_meta(pos, 0, 5)
    item = np.dtype(f.dtype).itemsize
    res = {"context": pos + 1, "graph_captured": f._graph is not None and f._graph.graph is not None}
    res["step_ms"] = time_ms(cp, f._graph.launch, reps=50) if res["graph_captured"] else None
    res["eager_step_ms"] = time_ms(cp, lambda: f._decode_body(kv), reps=5)

    def nbytes(key):
        return sum(int(p[f"{i}.{key}"].nbytes) for i in range(L))

    kv_bytes = 2 * L * f.hkv * (pos + 1) * f.d * item
    groups = {
        "qkv gemv (+rmsnorm)": (lambda: [ops.gemv(p[f"{i}.qkv"], f.x, f.qkv, "rms", "store", norm_w=p[f"{i}.input_norm"],
                                                  eps=f.eps) for i in range(L)], nbytes("qkv")),
        "rope + kv write": (lambda: [ops.qkv_post(f.qkv, f.io.meta, 1, None, None, None, f.cos, f.sin, f.q, kv.keys[i],
                                                  kv.values[i], f.hq, f.hkv, f.d, f.eps) for i in range(L)], 0),
        "attention (split-K + combine)": (lambda: [ops.attn_decode(f.q, kv.keys[i], kv.values[i], f.io.meta, f.window,
                                                                   f.scale, f.po, f.pm, f.pl, f.attn, f.hq, f.hkv, f.d)
                                                   for i in range(L)], kv_bytes),
        "o gemv (+residual)": (lambda: [ops.gemv(p[f"{i}.o"], f.attn, f.x, "none", "resid") for i in range(L)],
                               nbytes("o")),
        "gate_up gemv (+rmsnorm, silu*up)": (lambda: [ops.gemv(p[f"{i}.gate_up"], f.x, f.act, "rms", "silu_pair",
                                                               norm_w=p[f"{i}.post_norm"], eps=f.eps) for i in range(L)],
                                             nbytes("gate_up")),
        "down gemv (+residual)": (lambda: [ops.gemv(p[f"{i}.down"], f.act, f.x, "none", "resid")
                                           for i in range(L)], nbytes("down")),
        "lm_head gemv (+norm) + argmax": (lambda: (ops.gemv(f.lm_head, f.x, None, "rms", "logits", norm_w=p["norm"],
                                                            eps=f.eps, outf=f.logits), ops.argmax(f.logits, f.tokens, f.io.meta)),
                                          int(f.lm_head.nbytes)),
    }
    res["groups"] = time_kernel_groups(cp, groups)
    res["groups_sum_ms"] = sum(g["ms"] for g in res["groups"].values())
    res["bytes_per_step"] = sum(g["bytes"] for g in res["groups"].values())
    # cuBLAS for the same T=1 product (what the fused GEMV replaced), on the largest weight of a layer
    W = p["0.gate_up"]
    res["cublas_gate_up_ms"] = time_ms(cp, lambda: f.x[None] @ W.T, reps=20)
    res["fused_gate_up_ms"] = time_ms(cp, lambda: ops.gemv(W, f.x, f.act, "rms", "silu_pair",
                                                             norm_w=p["0.post_norm"], eps=f.eps), reps=20)
    res["gate_up_bytes"] = int(W.nbytes)
    return res


def profile_prefill(backend, shard, length: int = 2048) -> dict:
    cp = backend.xp
    f, kv = shard.model.fused, shard.kv
    tokens = cp.asarray(np.random.default_rng(1).integers(3, f.c.vocab_size, length).astype(np.int32))
    f._prefill(tokens, 0, kv, 0, False)  # warm-up
    f.marks = []
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    f._prefill(tokens, 0, kv, 0, False)
    end.record()
    end.synchronize()
    marks, f.marks = f.marks, None
    phases: dict[str, float] = {}
    for (_, a), (label, b) in zip(marks, marks[1:]):
        phases[label] = phases.get(label, 0.0) + cp.cuda.get_elapsed_time(a, b)
    total = cp.cuda.get_elapsed_time(start, end)
    return {"tokens": length, "device_ms": total, "phases_ms": phases}


# ------------------------------------------------------------------ neuron measurements

def compile_kernels(shapes) -> float:
    """Compile the fused kernels of these shapes now, so that no timed load below includes the
    one-time compilation of a fresh host (CuPy keeps compiled kernels on disk). Seconds taken."""
    from neuron.kernels.fused_gemv import CudaOps
    t = time.perf_counter()
    ops = CudaOps("bfloat16")
    ops.compile_all()
    for shape in shapes:
        ops.attn_fns(shape.num_heads // shape.num_kv_heads, shape.dim_per_head)
    return time.perf_counter() - t


def neuron_inprocess(path: Path, vocab: int, tokens: int, prompt: list[int]) -> dict:
    from neuron.worker import CallJob

    worker = start_worker(0)
    res = {}
    try:
        events = []
        t = time.perf_counter()
        handle, shard = load(worker, path, "bfloat16", max_context=4096, progress=events.append)
        res["load_wall_s"] = time.perf_counter() - t
        res["load_seconds"] = shard.load_seconds
        res["source_bytes"] = events[-1].bytes_total
        res["load_gb_s"] = res["source_bytes"] / shard.load_seconds / 1e9
        res["read_stage_gb_s"] = next((e.gb_per_s for e in events if e.stage == "kv-cache"), None)
        res["weight_bytes"] = shard.weight_bytes
        res["engine"] = "fused" if shard.model.fused is not None else "plain"
        del shard
        generate(worker, handle, prompt, 8)  # warm-up
        rates = []
        for _ in range(2):
            col = generate_async(worker, handle, prompt, tokens)
            wait(col)
            rates.append((len(col.times) - 1) / (col.times[-1] - col.times[0]))
        res["decode_tok_s"] = max(rates)
        res["decode_tok_s_runs"] = rates
        res["greedy_tokens"] = col.tokens[:32]
        rng = np.random.default_rng(2)
        for n in (128, 2048):
            ids = rng.integers(3, vocab, n).tolist()
            times = []
            for _ in range(5):
                col = generate_async(worker, handle, ids, 1)
                wait(col)
                times.append((col.times[0] - col.submitted) * 1e3)
            res[f"ttft_{n}_ms"] = statistics.median(times[1:])
        res["profile_decode"] = worker.submit(CallJob(lambda b: profile_decode(b, worker.slab[handle]))).result()
        res["profile_prefill_2048"] = worker.submit(CallJob(lambda b: profile_prefill(b, worker.slab[handle]))).result()
        from bench.gpu_checks import drop
        drop(worker, handle)
    finally:
        worker.stop()
    return res


def neuron_servers(path: Path, tokens: int, prompt: list[int], vocab: int, devices: str = "0",
                   dtype: str = "bfloat16", ttft_lengths=(128, 2048)) -> dict:
    """`neuron serve` and `cortex serve` as processes; Generate through each; client-side timings."""
    import grpc

    from common.proto.cortex.v1 import cortex_pb2 as cpb
    from common.proto.cortex.v1 import cortex_pb2_grpc
    from common.proto.neuron.v1 import neuron_pb2 as npb
    from common.proto.neuron.v1 import neuron_pb2_grpc
    from common.server import CHANNEL_OPTIONS
    from tests.helpers import start_cortex, start_neuron, wait_until

    res = {}
    neuron = start_neuron(devices=devices, model_roots=[path.parent], env=ENV)
    cortex = start_cortex([neuron.address], env=ENV)
    try:
        cch = grpc.insecure_channel(cortex.address, options=CHANNEL_OPTIONS)
        nch = grpc.insecure_channel(neuron.address, options=CHANNEL_OPTIONS)
        cstub, nstub = cortex_pb2_grpc.CortexStub(cch), neuron_pb2_grpc.NeuronStub(nch)
        wait_until(lambda: any(n.state == cpb.NODE_STATE_UP for n in cstub.ListNodes(cpb.ListNodesRequest()).nodes),
                   timeout=60, what="the neuron UP in cortex")
        t = time.perf_counter()
        last_gbs, info = None, None
        for ev in cstub.LoadModel(cpb.LoadModelRequest(name="bench", path=str(path), dtype=dtype,
                                                       max_context=4096), timeout=600):
            if ev.HasField("progress") and ev.progress.shard.gb_per_s:
                last_gbs = ev.progress.shard.gb_per_s
            if ev.HasField("model"):
                info = ev.model
        res["cortex_load_wall_s"] = time.perf_counter() - t
        res["cortex_load_gb_s"] = info.weight_bytes / res["cortex_load_wall_s"] / 1e9
        res["neuron_reported_read_gb_s"] = last_gbs
        handle = info.placement[0].handle

        def stream(call, request) -> dict:
            t0 = time.perf_counter()
            stamps, final = [], None
            for chunk in call(request, timeout=600):
                stamps.append((time.perf_counter(), len(chunk.token_ids)))
                final = chunk
            total = sum(n for _, n in stamps)
            first_t, first_n = stamps[0]
            rate = (total - first_n) / (stamps[-1][0] - first_t) if stamps[-1][0] > first_t else None
            return {"ttft_ms": (first_t - t0) * 1e3, "client_decode_tok_s": rate, "tokens": total,
                    "server_decode_tok_s": final.timing.decode_tokens_per_second,
                    "server_ttft_ms": final.timing.time_to_first_token_ms}

        sampling = npb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        prompt_msg = npb.Prompt(tokens=npb.TokenIds(ids=prompt))
        for label, call, req in (
                ("neuron", nstub.Generate, npb.GenerateRequest(handle=handle, prompt=prompt_msg, sampling=sampling)),
                ("cortex", cstub.Generate, cpb.GenerateRequest(
                    model="bench", prompt=cpb.Prompt(tokens=cpb.TokenIds(ids=prompt)),
                    sampling=cpb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)))):
            stream(call, req)  # warm-up
            runs = [stream(call, req) for _ in range(2)]
            best = max(runs, key=lambda r: r["client_decode_tok_s"] or 0)
            res[f"{label}_decode_tok_s"] = best["client_decode_tok_s"]
            res[f"{label}_server_decode_tok_s"] = best["server_decode_tok_s"]
        rng = np.random.default_rng(3)
        one = cpb.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for n in ttft_lengths:
            ids = rng.integers(3, vocab, n).tolist()
            req = cpb.GenerateRequest(model="bench", prompt=cpb.Prompt(tokens=cpb.TokenIds(ids=ids)), sampling=one)
            ttfts = [stream(cstub.Generate, req)["ttft_ms"] for _ in range(4)]
            res[f"cortex_ttft_{n}_ms"] = statistics.median(ttfts[1:])
        cstub.UnloadModel(cpb.UnloadModelRequest(name="bench"), timeout=120)
        cch.close()
        nch.close()
    finally:
        cortex.terminate()
        neuron.terminate()
    return res


def hf_baseline(path: Path, mode: str, tokens: int, budget: float, prompt: list[int], work: Path) -> dict:
    out = work / f"hf-{path.name}-{mode}.json"
    prompt_file = work / "prompt.json"
    prompt_file.write_text(json.dumps(prompt))
    cmd = [sys.executable, str(ROOT / "bench" / "hf_baseline.py"), str(path), "--mode", mode, "--tokens", str(tokens),
           "--out", str(out), "--prompt-file", str(prompt_file)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env={**os.environ, **ENV})
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"did not finish within {budget:.0f}s (compile time budget)",
                "seconds": time.perf_counter() - t}
    if proc.returncode != 0 or not out.exists():
        return {"mode": mode, "error": (proc.stderr or proc.stdout)[-2000:], "seconds": time.perf_counter() - t}
    res = json.loads(out.read_text())
    res["seconds"] = time.perf_counter() - t
    return res


# ------------------------------------------------------------------ report

def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict) -> str:
    ceil = result["ceilings"]
    lines = [f"GPU: {result['gpu']}   commit: {result['commit'][:12]}   copy {ceil['copy_gb_s']:.0f} GB/s, "
             f"H2D pinned {ceil['h2d_pinned_gb_s']:.1f} GB/s, bf16 matmul {ceil['bf16_matmul_tflop_s']:.0f} TFLOP/s",
             "",
             f"{'model':6s} {'metric':22s} {'neuron':>9s} {'n.gRPC':>9s} {'cortex':>9s} {'HF eager':>9s} "
             f"{'HF compile':>10s} {'roofline':>9s} {'target':>8s}"]
    for key, m in result["models"].items():
        n, s, e, c = m.get("neuron", {}), m.get("servers", {}), m.get("hf_eager", {}), m.get("hf_compile", {})
        roof = m["roofline"]
        tgt = TARGETS.get(key, {})
        rows = [
            ("decode tok/s (b=1)", n.get("decode_tok_s"), s.get("neuron_decode_tok_s"), s.get("cortex_decode_tok_s"),
             e.get("decode_tok_s"), c.get("decode_tok_s"), roof["decode_tok_s"],
             tgt.get("decode_tok_s")),
            ("TTFT 128 ms", n.get("ttft_128_ms"), None, s.get("cortex_ttft_128_ms"), e.get("ttft_128_ms"), None,
             roof["ttft_128_ms"], None),
            ("TTFT 2048 ms", n.get("ttft_2048_ms"), None, s.get("cortex_ttft_2048_ms"), e.get("ttft_2048_ms"), None,
             roof["ttft_2048_ms"], tgt.get("ttft_2048_ms")),
            ("load GB/s (page cache)", n.get("load_gb_s"), None, s.get("cortex_load_gb_s"), e.get("load_gb_per_s"),
             None, roof["load_gb_s"], tgt.get("load_gb_s")),
        ]
        for label, *vals in rows:
            lines.append(f"{key:6s} {label:22s} " + " ".join(
                f"{fmt(v):>{w}s}" for v, w in zip(vals, (9, 9, 9, 9, 10, 9, 8))))
    lines.append("")
    lines.append("roofline: decode = copy bandwidth / weight bytes; TTFT = 2 x params x tokens / matmul rate "
                 "(+ attention); load = pinned H2D bandwidth. 'cortex' column: decode through cortex serve.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--tokens", type=int, default=256, help="tokens generated per decode measurement")
    parser.add_argument("--baseline", default="eager,compile", help="eager,compile | eager | none")
    parser.add_argument("--baseline-tokens", type=int, default=64)
    parser.add_argument("--compile-budget", type=float, default=300.0, help="seconds for the compiled baseline")
    parser.add_argument("--no-servers", action="store_true", help="skip the neuron/cortex process measurements")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "neuron-bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    os.environ.update(ENV)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    baselines = [b for b in args.baseline.split(",") if b and b != "none"]

    result = {"commit": commit(), "gpu": gpu_name(0), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "args": vars(args), "models": {}}
    log("ceilings")
    result["ceilings"] = ceil = ceilings()
    log(f"  {ceil}")
    keys = [m for m in args.models.split(",") if m]
    result["kernel_compile_s"] = compile_kernels([SHAPES[MODELS[k]] for k in keys])
    log(f"  fused kernels compiled in {result['kernel_compile_s']:.1f} s (once per host: CuPy caches them on disk)")
    for key in [m for m in args.models.split(",") if m]:
        shape = SHAPES[MODELS[key]]
        path = work / MODELS[key]
        m = result["models"][key] = {"shape": MODELS[key]}
        if not (path / "config.json").exists():
            log(f"writing {path}")
            m["checkpoint"] = write_checkpoint(path, shape, "bfloat16")
            log(f"  {m['checkpoint']}")
        vocab = shape.vocab_size
        params = shape.parameter_shapes(vocab)
        n_params = sum(int(np.prod(s)) for s in params.values())
        weight_bytes = 2 * n_params
        matmul_params = n_params - vocab * shape.hidden_size * (0 if shape.tie_word_embeddings else 1)
        attn_flops = lambda t: 2 * 2 * shape.num_layers * shape.num_heads * shape.dim_per_head * t * t / 2  # noqa: E731
        flop_rate = ceil["bf16_matmul_tflop_s"] * 1e12
        m["roofline"] = {
            "weight_bytes": weight_bytes,
            "decode_tok_s": ceil["copy_gb_s"] * 1e9 / weight_bytes,
            "ttft_128_ms": (2 * matmul_params * 128 + attn_flops(128)) / flop_rate * 1e3,
            "ttft_2048_ms": (2 * matmul_params * 2048 + attn_flops(2048)) / flop_rate * 1e3,
            "load_gb_s": ceil["h2d_pinned_gb_s"],
        }
        prompt = np.random.default_rng(0).integers(3, vocab, 128).tolist()
        m["read_probe"] = read_probe(path)
        log(f"  page-cache read probe: {m['read_probe']}")
        log(f"{key}: neuron in-process")
        try:
            m["neuron"] = neuron_inprocess(path, vocab, args.tokens, prompt)
            log(f"  decode {m['neuron']['decode_tok_s']:.1f} tok/s, ttft128 {m['neuron']['ttft_128_ms']:.1f} ms, "
                f"ttft2048 {m['neuron']['ttft_2048_ms']:.1f} ms, load {m['neuron']['load_gb_s']:.2f} GB/s")
        except Exception as err:  # noqa: BLE001 - keep measuring the rest
            m["neuron"] = {"error": repr(err)}
            log(f"  FAILED: {err!r}")
        if not args.no_servers:
            log(f"{key}: neuron + cortex processes")
            try:
                m["servers"] = neuron_servers(path, args.tokens, prompt, vocab)
                log(f"  {m['servers']}")
            except Exception as err:  # noqa: BLE001
                m["servers"] = {"error": repr(err)}
                log(f"  FAILED: {err!r}")
        for mode in baselines:
            log(f"{key}: transformers {mode}")
            budget = args.compile_budget if mode == "compile" else 600.0
            m[f"hf_{mode}"] = hf_baseline(path, mode, args.baseline_tokens, budget, prompt, work)
            log(f"  {({k: v for k, v in m[f'hf_{mode}'].items() if k not in ('tokens', 'prompt_ids')})}")
            hf_tokens = m[f"hf_{mode}"].get("tokens")
            ours = m.get("neuron", {}).get("greedy_tokens")
            if hf_tokens and ours:
                same = next((i for i, (a, b) in enumerate(zip(ours, hf_tokens)) if a != b), min(len(ours), len(hf_tokens)))
                m[f"hf_{mode}"]["greedy_prefix_equal_to_neuron"] = same
    text = table(result)
    print("\n" + text)
    result["table"] = text
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
