"""Serving benchmark: many concurrent Generate streams through cortex, beside transformers' batched
`generate` and the roofline.

One command, on a GPU machine:

    python bench/serving_bench.py                                   # 1B and 8B shapes, everything
    python bench/serving_bench.py --models 8b --concurrency 1,64 --no-shared-prefix
    python bench/serving_bench.py --device cpu --models tiny --concurrency 1,4 --tokens 16 \\
        --prompt-tokens 32 --prefix-tokens 256 --prefix-concurrency 4      # CPU smoke run

In one run it:
1. measures the device ceilings (copy bandwidth, matmul rate: CUDA with CuPy, or NumPy on the CPU);
2. writes random-weight checkpoints of the chosen shapes (bench/make_checkpoint.py);
3. for each model starts `neuron serve` and `cortex serve` as processes, loads the model through
   cortex, and runs workloads of N concurrent Generate streams over gRPC (greedy, ignore_eos):
   - random: N prompts of --prompt-tokens random tokens, --tokens output tokens each, for each N in
     --concurrency;
   - shared prefix: --prefix-concurrency prompts of one --prefix-tokens common prefix + --suffix-tokens
     distinct tokens, once with the neuron's prefix caching on and once off (a neuron started with
     NEURON_PREFIX_CACHING=0), each after one untimed request with the same prefix;
   client streams are spread over --client-procs processes so the client is not what is measured;
4. runs the baseline, transformers batched `generate` eager at the same batch sizes, in its own
   process (bench/hf_batch_baseline.py; skipped with a note when torch is missing);
5. on a GPU, after the served runs (the GPU free again), profiles a decode turn of each model in
   process at --profile-concurrency (bench/engine_bench.py's rows: GEMMs, attention, norms, sampler
   and the graph replay timed inside CUDA graphs, each beside its limit, and the host time per
   turn; skipped with --no-profile);
6. prints one table and writes bench/results/serving_bench-<time>.json (rows of {model, workload,
   concurrency, output_tok_s, ttft_p50_ms, ttft_p99_ms, itl_p50_ms, itl_p99_ms, baseline_tok_s,
   roofline_tok_s}, the commit, the GPU) and the table as a .log beside it.

Latencies come from the client's arrival times: TTFT = first token's arrival - submission; the
inter-token latency is the gap before each later token (a message of n tokens: its gap / n for each,
as SGLang's bench_serving counts it; until session 11 it was the gap for the first and 0 for the rest).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from bench.make_checkpoint import SHAPES as BENCH_SHAPES, write_checkpoint  # noqa: E402
from cortex.tiny_checkpoint import SHAPES as TINY_SHAPES, LlamaShape  # noqa: E402

SHAPES: dict[str, LlamaShape] = {
    "tiny": TINY_SHAPES["tiny"],
    # The CPU benchmark's model: hidden 512, 6 layers, a 32K vocabulary like a real small model.
    "cpu-512": replace(TINY_SHAPES["tiny"], vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=6,
                       num_heads=8, num_kv_heads=4, max_position_embeddings=4096),
    "1b": BENCH_SHAPES["llama-3.2-1b"],
    "8b": BENCH_SHAPES["llama-3-8b"],
}
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MAX_BATCHED_TOKENS = 2048   # the engine's default turn budget, for the roofline of a prefill
STREAM_TIMEOUT_S = 1800.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ ceilings and roofline

def ceilings(device: str, dtype: str) -> dict:
    """Copy bandwidth (bytes read + written per second) and matmul rate of the device, measured now."""
    if device == "cpu":
        a = np.ones(64 << 20, np.float32)
        b = np.empty_like(a)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            np.copyto(b, a)
            times.append(time.perf_counter() - t)
        m = 1024
        x = np.random.default_rng(0).standard_normal((m, m), dtype=np.float32)
        mm = []
        for _ in range(5):
            t = time.perf_counter()
            x @ x
            mm.append(time.perf_counter() - t)
        return {"copy_gb_s": 2 * a.nbytes / min(times) / 1e9, "matmul_tflop_s": 2 * m ** 3 / min(mm) / 1e12,
                "matmul_dtype": "float32"}
    import cupy as cp
    import ml_dtypes

    from bench.common import copy_bandwidth, time_ms
    with cp.cuda.Device(int(device)):
        out = {"copy_gb_s": copy_bandwidth(cp)}
        m = 8192
        np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        x = cp.random.standard_normal((m, m), dtype=cp.float32).astype(np_dtype)
        y = cp.random.standard_normal((m, m), dtype=cp.float32).astype(np_dtype)
        ms = time_ms(cp, lambda: x @ y, reps=10)
        out.update(matmul_tflop_s=2 * m ** 3 / ms / 1e9, matmul_dtype=dtype)
        x = y = None  # free before the servers start
        cp.get_default_memory_pool().free_all_blocks()
    return out


@dataclass(frozen=True)
class Roofline:
    """Time bounds of one model on one device: every step reads the weights and the KV it attends
    to, and does the FLOPs of its tokens; whichever of the two takes longer bounds the step."""
    shape: LlamaShape
    vocab: int
    itemsize: int
    copy_bytes_s: float       # read + write bandwidth; a read alone streams at about this rate
    flop_s: float

    @property
    def matmul_params(self) -> int:
        params = sum(int(np.prod(s)) for s in self.shape.parameter_shapes(self.vocab).values())
        embedding = self.vocab * self.shape.hidden_size
        # An untied embedding table is only gathered from; a tied one is read whole as the lm_head.
        return params - (0 if self.shape.tie_word_embeddings else embedding)

    @property
    def kv_bytes_per_token(self) -> int:
        s = self.shape
        return 2 * s.num_layers * s.num_kv_heads * s.dim_per_head * self.itemsize

    def _attention_flops(self, tokens: int, offset: int) -> float:
        """QK^T and PV of `tokens` new tokens at positions offset.. over the causal context."""
        s = self.shape
        context = tokens * offset + tokens * (tokens + 1) / 2
        return 4 * s.num_layers * s.num_heads * s.dim_per_head * context

    def step_seconds(self, tokens: int, kv_tokens: int, attention_flops: float) -> float:
        weight_bytes = self.matmul_params * self.itemsize
        read = (weight_bytes + kv_tokens * self.kv_bytes_per_token) / self.copy_bytes_s
        compute = (2 * self.matmul_params * tokens + attention_flops) / self.flop_s
        return max(read, compute)

    def workload_tok_s(self, batch: int, prompt: int, tokens: int, shared_prefix: int = 0,
                       prefix_cached: bool = False) -> float:
        """Output tokens/s of `batch` requests arriving together: the prefill of every prompt in
        turns of MAX_BATCHED_TOKENS, then tokens-1 decode steps of the whole batch."""
        prefill_tokens, attention = 0, 0.0
        if shared_prefix and prefix_cached:  # the common prefix is computed once, then hit
            prefill_tokens += shared_prefix
            attention += self._attention_flops(shared_prefix, 0)
            per_request = [(prompt, shared_prefix)]
        else:
            per_request = [(shared_prefix + prompt, 0)]
        for new, offset in per_request:
            prefill_tokens += batch * new
            attention += batch * self._attention_flops(new, offset)
        # Turns of at most MAX_BATCHED_TOKENS: each reads the weights once; all do the prompts' FLOPs.
        turns = -(-prefill_tokens // MAX_BATCHED_TOKENS)
        weight_read = self.matmul_params * self.itemsize / self.copy_bytes_s
        total = max(turns * weight_read, (2 * self.matmul_params * prefill_tokens + attention) / self.flop_s)
        context = shared_prefix + prompt
        for step in range(1, tokens):
            kv = batch * (context + step)
            total += self.step_seconds(batch, kv, batch * self._attention_flops(1, context + step - 1))
        return batch * tokens / total


# ------------------------------------------------------------------ servers

@dataclass
class Deployment:
    """neuron + cortex processes with one model loaded through cortex."""
    neuron: object
    cortex: object
    model: str
    load_seconds: float
    info: dict = field(default_factory=dict)

    def stop(self) -> None:
        self.cortex.terminate()
        self.neuron.terminate()


def deploy(path: Path, device: str, dtype: str, max_context: int, kv_slots: int, neuron_env: dict,
           neuron_args: list[str], cortex_args: list[str] | None = None) -> Deployment:
    import grpc

    from common.proto.cortex.v1 import cortex_pb2 as cpb
    from common.proto.cortex.v1 import cortex_pb2_grpc
    from common.server import CHANNEL_OPTIONS
    from tests.helpers import start_cortex, start_neuron, wait_until

    neuron = start_neuron(devices=device, model_roots=[path.parent], extra=neuron_args, env={**ENV, **neuron_env})
    cortex = None
    try:
        cortex = start_cortex([neuron.address], extra=cortex_args, env=ENV)
        with grpc.insecure_channel(cortex.address, options=CHANNEL_OPTIONS) as channel:
            stub = cortex_pb2_grpc.CortexStub(channel)
            wait_until(lambda: any(n.state == cpb.NODE_STATE_UP for n in stub.ListNodes(cpb.ListNodesRequest()).nodes),
                       timeout=60, what="the neuron UP in cortex")
            started, info = time.perf_counter(), None
            request = cpb.LoadModelRequest(name="bench", path=str(path), dtype=dtype, max_context=max_context,
                                           kv_slots=kv_slots)
            for event in stub.LoadModel(request, timeout=900):
                if event.HasField("model"):
                    info = event.model
            if info is None:
                raise RuntimeError(f"LoadModel of {path} ended without a model; neuron log:\n{neuron.log()[-3000:]}")
            load_seconds = time.perf_counter() - started
        return Deployment(neuron, cortex, "bench", load_seconds,
                          info={"weight_bytes": info.weight_bytes, "load_seconds": load_seconds})
    except BaseException:
        if cortex is not None:
            cortex.terminate()
        neuron.terminate()
        raise


# ------------------------------------------------------------------ clients

async def _streams(address: str, model: str, prompts: list[list[int]], tokens: int, start_at: float,
                   sampling: dict) -> list[dict]:
    import grpc

    from common.proto.cortex.v1 import cortex_pb2 as cpb
    from common.proto.cortex.v1 import cortex_pb2_grpc
    from common.server import CHANNEL_OPTIONS

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = cortex_pb2_grpc.CortexStub(channel)
        await channel.channel_ready()

        async def one(ids: list[int]) -> dict:
            # Fields set through the request, whichever proto package defines its sub-messages.
            request = cpb.GenerateRequest(model=model)
            request.prompt.tokens.ids.extend(ids)
            request.sampling.max_tokens = tokens
            request.sampling.temperature = sampling.get("temperature", 0.0)
            if sampling.get("top_p", 1.0) < 1.0:
                request.sampling.top_p = sampling["top_p"]
            request.sampling.ignore_eos = True
            submitted, arrivals, node_ttft = time.monotonic(), [], None
            try:
                async for message in stub.Generate(request, timeout=STREAM_TIMEOUT_S):
                    if message.token_ids:
                        arrivals.append((time.monotonic(), len(message.token_ids)))
                    if message.HasField("timing"):   # the last message: the neuron's own clock
                        node_ttft = message.timing.time_to_first_token_ms
            except grpc.aio.AioRpcError as err:
                return {"submitted": submitted, "arrivals": arrivals, "node_ttft_ms": node_ttft,
                        "error": f"{err.code().name}: {err.details()}"}
            return {"submitted": submitted, "arrivals": arrivals, "node_ttft_ms": node_ttft, "error": None}

        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        return await asyncio.gather(*(one(ids) for ids in prompts))


def client_process(address: str, model: str, prompts: list[list[int]], tokens: int, start_at: float,
                   sampling: dict) -> list[dict]:
    """One client process's share of the streams (time.monotonic is one clock for every process)."""
    return asyncio.run(_streams(address, model, prompts, tokens, start_at, sampling))


def run_workload(pool: ProcessPoolExecutor, procs: int, address: str, model: str, prompts: list[list[int]],
                 tokens: int, sampling: dict | None = None) -> dict:
    """sampling: temperature / top_p of every request (default greedy)."""
    shares = [prompts[i::procs] for i in range(procs)]
    start_at = time.monotonic() + 1.0 + 0.02 * len(prompts)   # every process connected before the first request
    futures = [pool.submit(client_process, address, model, share, tokens, start_at, sampling or {})
               for share in shares if share]
    streams = [s for f in futures for s in f.result()]
    return summarize(streams, tokens)


def summarize(streams: list[dict], tokens: int) -> dict:
    errors = [s["error"] for s in streams if s["error"]]
    done = [s for s in streams if s["arrivals"]]
    ttft, itl, total = [], [], 0
    for s in done:
        ttft.append((s["arrivals"][0][0] - s["submitted"]) * 1e3)
        previous = s["arrivals"][0][0]
        for arrived, count in s["arrivals"][1:]:
            # a message of several tokens (cortex merged them, or --stream-interval held them):
            # the gap shared evenly, as SGLang's bench_serving does; one gap and zeros would pull
            # the median towards 0 whenever messages carry more than one token
            itl += [(arrived - previous) * 1e3 / count] * count
            previous = arrived
        total += sum(count for _, count in s["arrivals"])
    if not done:
        return {"error": errors[0] if errors else "no stream returned a token", "errors": len(errors)}
    span = max(s["arrivals"][-1][0] for s in done) - min(s["submitted"] for s in streams)
    short = sum(1 for s in done if sum(c for _, c in s["arrivals"]) != tokens)

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    # the neuron's share of the first token's wait: from the request reaching it to the token
    # sampled; the rest is the client, cortex and the way back. submit_spread: the clients' own
    # stagger, first to last submission
    node_ttft = [s["node_ttft_ms"] for s in done if s.get("node_ttft_ms") is not None]
    submitted = [s["submitted"] for s in streams]
    return {"output_tok_s": total / span, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "node_ttft_p50_ms": pct(node_ttft, 50), "submit_spread_ms": (max(submitted) - min(submitted)) * 1e3,
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99), "output_tokens": total, "seconds": span,
            "messages": sum(len(s["arrivals"]) for s in done),
            "streams": len(streams), "errors": len(errors), "short_streams": short,
            **({"first_error": errors[0]} if errors else {})}


# ------------------------------------------------------------------ baseline

def hf_baseline(path: Path, batches: list[int], prompt_tokens: int, tokens: int, device: str, dtype: str,
                work: Path, prefix_tokens: int = 0, budget_s: float = 1200.0) -> dict:
    """transformers batched generate in its own process: {batch: tok_s} or {"note": why not}."""
    try:
        import importlib.util
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return {"note": "torch/transformers not installed: baseline skipped"}
    except (ImportError, ValueError):
        return {"note": "torch not importable: baseline skipped"}
    out = work / f"hf-{path.name}-{prefix_tokens}-{prompt_tokens}.json"
    torch_device = "cpu" if device == "cpu" else f"cuda:{device}"
    cmd = [sys.executable, str(ROOT / "bench" / "hf_batch_baseline.py"), str(path), "--batches",
           ",".join(map(str, batches)), "--prompt-tokens", str(prompt_tokens), "--prefix-tokens", str(prefix_tokens),
           "--tokens", str(tokens), "--device", torch_device, "--dtype", dtype, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s, env={**os.environ, **ENV})
    except subprocess.TimeoutExpired:
        return {"note": f"baseline did not finish within {budget_s:.0f}s"}
    if proc.returncode != 0 or not out.exists():
        return {"note": "baseline failed: " + (proc.stderr or proc.stdout)[-800:]}
    result = json.loads(out.read_text())
    return {int(b): r.get("tok_s") for b, r in result["batches"].items()} | {"raw": result}


# ------------------------------------------------------------------ report

def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict) -> str:
    ceil = result["ceilings"]
    lines = [f"device: {result['gpu']}   commit: {result['commit'][:12]}   copy {ceil['copy_gb_s']:.1f} GB/s, "
             f"{ceil['matmul_dtype']} matmul {ceil['matmul_tflop_s']:.2f} TFLOP/s", "",
             f"{'model':8s} {'workload':28s} {'conc':>5s} {'tok/s':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
             f"{'ITL p50':>8s} {'ITL p99':>8s} {'HF tok/s':>9s} {'roofline':>9s} {'err':>4s} {'node TTFT':>9s}"]
    for row in result["rows"]:
        lines.append(f"{row['model']:8s} {row['workload']:28s} {row['concurrency']:5d} {fmt(row['output_tok_s']):>9s} "
                     f"{fmt(row['ttft_p50_ms']):>9s} {fmt(row['ttft_p99_ms']):>9s} {fmt(row['itl_p50_ms'], '.2f'):>8s} "
                     f"{fmt(row['itl_p99_ms'], '.2f'):>8s} {fmt(row['baseline_tok_s']):>9s} "
                     f"{fmt(row['roofline_tok_s']):>9s} {row.get('errors', 0):4d} {fmt(row.get('node_ttft_p50_ms')):>9s}")
    lines += ["", "tok/s: output tokens of all streams / wall time from the first submission to the last token, "
              "through cortex over gRPC. TTFT and ITL in ms, client side. HF: transformers batched generate, eager, "
              "same batch. node TTFT: p50 of the neuron's own time to first token (request in -> token sampled). "
              "roofline: max(weight+KV bytes / copy bandwidth, FLOPs / matmul rate) per step. profile: host is the "
              "turn minus one graph replay; device and finish waits (the turn log's) tell whether that is the host's "
              "time or device work the lone replay lacks."]
    for row in result.get("profiles", []):
        parts = [f"{k} {v['ms']:.3f} ms (limit {v['limit_ms']:.3f})" for k, v in row.get("profile", {}).items()
                 if isinstance(v, dict)]
        decode = row.get("turns", {}).get("decode", {})
        lines.append(f"profile {row['model']} n={row['concurrency']}: decode turn p50 {fmt(row['decode_turn_ms_p50'], '.2f')} "
                     f"ms, host {fmt(row.get('host_ms_per_turn'), '.2f')} ms, device {fmt(decode.get('device_ms_p50'), '.2f')} "
                     f"ms, finish waits {fmt(decode.get('finish_wait_ms_p50'), '.2f')} ms; " + "; ".join(parts))
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def row(model: str, workload: str, concurrency: int, measured: dict, baseline, roofline: float) -> dict:
    keys = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "node_ttft_p50_ms",
            "submit_spread_ms")
    out = {"model": model, "workload": workload, "concurrency": concurrency}
    out.update({k: measured.get(k) for k in keys})
    out.update(baseline_tok_s=baseline, roofline_tok_s=roofline, errors=measured.get("errors", 0),
               short_streams=measured.get("short_streams", 0),
               # above 1 when cortex (or the neuron) fell behind and merged a stream's tokens
               tokens_per_message=(measured["output_tokens"] / measured["messages"]
                                   if measured.get("messages") else None))
    if "error" in measured or "first_error" in measured:
        out["error"] = measured.get("error") or measured.get("first_error")
    return out


def random_prompts(rng: np.random.Generator, count: int, length: int, vocab: int, prefix: list[int] = ()) -> list:
    return [list(prefix) + rng.integers(3, vocab, length).tolist() for _ in range(count)]


def shared_prefix(vocab: int, length: int) -> list[int]:
    """The shared-prefix workload's common prefix: the same in every run and every script."""
    return np.random.default_rng(7).integers(3, vocab, length).tolist()


def add_shared_prefix_args(parser, tokens: int) -> None:
    """The options of a script that runs the shared-prefix workload on its own (burst_trace.py,
    prefix_ratio_bench.py); `tokens`: its default output tokens per request."""
    parser.add_argument("--model", default="1b", help=f"one of {','.join(SHAPES)}")
    parser.add_argument("--device", default="0", help="CUDA GPU index, or cpu")
    parser.add_argument("--prefix", type=int, default=2048, help="tokens of the common prefix")
    parser.add_argument("--suffix", type=int, default=64, help="distinct tokens after it, per request")
    parser.add_argument("--streams", type=int, default=32, help="requests of a burst")
    parser.add_argument("--tokens", type=int, default=tokens, help="output tokens of each request")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")


def random_checkpoint(model: str, device: str) -> tuple[Path, int]:
    """A random-weight checkpoint of a SHAPES model in a fresh temporary folder (float32 on a CPU,
    bfloat16 on a GPU): its path and vocabulary size."""
    path = Path(tempfile.mkdtemp()) / model
    write_checkpoint(path, SHAPES[model], "float32" if device == "cpu" else "bfloat16")
    return path, json.loads((path / "config.json").read_text())["vocab_size"]


def bench_model(key: str, args, ceil: dict, pool: ProcessPoolExecutor, work: Path, notes: list[str]) -> list[dict]:
    shape = SHAPES[key]
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    path = work / f"{key}-{dtype}{'-small-tokenizer' if args.small_tokenizer else ''}"
    if not (path / "config.json").exists():
        log(f"writing {path}")
        log(f"  {write_checkpoint(path, shape, dtype, small_tokenizer=args.small_tokenizer)}")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    itemsize = 4 if dtype == "float32" else 2
    roof = Roofline(shape, vocab, itemsize, ceil["copy_gb_s"] * 1e9, ceil["matmul_tflop_s"] * 1e12)
    rng = np.random.default_rng(0)
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    prefix_on = "on" in args.prefix_caching.split(",") and args.prefix_concurrency > 0
    prefix_off = "off" in args.prefix_caching.split(",") and args.prefix_concurrency > 0
    longest = max(args.prompt_tokens, args.prefix_tokens + args.suffix_tokens if prefix_on or prefix_off else 0)
    max_context = min(longest + args.tokens + 16, shape.max_position_embeddings)
    kv_slots = min(max(concurrency + [args.prefix_concurrency]), 256)
    rows = []

    def deployment(prefix_caching: bool) -> Deployment:
        env = {} if prefix_caching else {"NEURON_PREFIX_CACHING": "0"}
        extra = [*args.neuron_arg, *([] if prefix_caching else args.no_prefix_caching_arg)]
        d = deploy(path, args.device, dtype, max_context, kv_slots, env, extra, args.cortex_arg)
        log(f"  {key} loaded through cortex in {d.load_seconds:.1f} s (prefix caching {'on' if prefix_caching else 'off'})")
        return d

    baseline = hf_baseline(path, concurrency, args.prompt_tokens, args.tokens, args.device, dtype, work) \
        if args.baseline else {"note": "baseline not asked for (--no-baseline)"}
    if "note" in baseline:
        notes.append(f"{key} random: {baseline['note']}")
    prefix_baseline = {"note": "no shared-prefix workload"}
    if prefix_on or prefix_off:
        prefix_baseline = hf_baseline(path, [args.prefix_concurrency], args.suffix_tokens, args.tokens, args.device,
                                      dtype, work, prefix_tokens=args.prefix_tokens) \
            if args.baseline else {"note": "baseline not asked for (--no-baseline)"}
        if "note" in prefix_baseline:
            notes.append(f"{key} shared prefix: {prefix_baseline['note']}")

    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    workload = f"random-{args.prompt_tokens}" + (f"-t{args.temperature:g}" if args.temperature else "") + \
        (f"-p{args.top_p:g}" if args.top_p < 1.0 else "")
    d = deployment(True)
    try:
        address = d.cortex.address
        log(f"{key}: warm-up")
        run_workload(pool, 1, address, d.model, random_prompts(rng, 2, args.prompt_tokens, vocab), min(8, args.tokens))
        for n in concurrency:
            measured = run_workload(pool, min(args.client_procs, n), address, d.model,
                                    random_prompts(rng, n, args.prompt_tokens, vocab), args.tokens, sampling)
            rows.append(row(key, workload, n, measured, baseline.get(n),
                            roof.workload_tok_s(n, args.prompt_tokens, args.tokens)))
            log(f"  {rows[-1]}")
        if prefix_on:
            rows.append(shared_prefix_row(key, args, pool, d, rng, vocab, roof, True, prefix_baseline))
    finally:
        d.stop()
    if prefix_off:
        d = deployment(False)
        try:
            rows.append(shared_prefix_row(key, args, pool, d, rng, vocab, roof, False, prefix_baseline))
        finally:
            d.stop()
    return rows


def shared_prefix_row(key, args, pool, d: Deployment, rng, vocab, roof: Roofline, caching: bool, baseline) -> dict:
    prefix = shared_prefix(vocab, args.prefix_tokens)
    n = args.prefix_concurrency
    # One untimed request with the prefix first: with caching on, the timed ones find it cached.
    run_workload(pool, 1, d.cortex.address, d.model, random_prompts(rng, 1, args.suffix_tokens, vocab, prefix), 1)
    measured = run_workload(pool, min(args.client_procs, n), d.cortex.address, d.model,
                            random_prompts(rng, n, args.suffix_tokens, vocab, prefix), args.tokens)
    out = row(key, f"shared-prefix-{args.prefix_tokens}-cache-{'on' if caching else 'off'}", n, measured,
              baseline.get(n), roof.workload_tok_s(n, args.suffix_tokens, args.tokens, args.prefix_tokens, caching))
    log(f"  {out}")
    return out


def device_name(device: str) -> str:
    if device == "cpu":
        import platform
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    from bench.common import gpu_name
    return gpu_name(int(device))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1b,8b", help=f"comma-separated, of {','.join(SHAPES)} "
                        "(tiny and cpu-512 are small models for CPU runs)")
    parser.add_argument("--device", default="0", help="CUDA GPU index, or cpu")
    parser.add_argument("--dtype", default="", help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--concurrency", default="1,8,32,64,128,256")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="of every request of the random workloads (0: greedy; the baseline stays greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="of every request of the random workloads")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--prefix-tokens", type=int, default=2048, help="shared-prefix workload: common prefix")
    parser.add_argument("--suffix-tokens", type=int, default=64, help="shared-prefix workload: distinct suffix")
    parser.add_argument("--prefix-concurrency", type=int, default=32, help="shared-prefix streams; 0: skip it")
    parser.add_argument("--prefix-caching", default="on,off", help="shared-prefix runs: on,off | on | off")
    parser.add_argument("--no-prefix-caching-arg", action="append", default=[],
                        help="extra neuron flag for the caching-off run (e.g. --no-prefix-caching); "
                        "the run always sets NEURON_PREFIX_CACHING=0")
    parser.add_argument("--neuron-arg", action="append", default=[], help="extra `neuron serve` flag (repeatable)")
    parser.add_argument("--cortex-arg", action="append", default=[],
                        help="extra `cortex serve` flag (repeatable), e.g. --cortex-arg=--stream-interval=2")
    parser.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 4)))
    parser.add_argument("--small-tokenizer", action="store_true",
                        help="the small (368-token) tokenizer of runs before session 12: 99.7%% of the random models' "
                             "ids decode to nothing (default: a tokenizer covering the model's vocabulary)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--profile-concurrency", default="1,64,256", help="decode-turn profiles (GPU only)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "neuron-serving-bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return parser.parse_args(argv)


def decode_turn_profiles(keys: list[str], args, ceil: dict) -> list[dict]:
    """engine_bench's in-process rows (decode turn p50, host time, per-op profile) for each model."""
    from bench.engine_bench import MODELS, throughput_rows
    from bench.engine_bench import parse_args as engine_bench_args
    from neuron.device import CudaBackend, DeviceSpec

    log("decode-turn profiles, in process")
    backend = CudaBackend(DeviceSpec(args.device, "cuda", int(args.device)))
    # engine_bench's own defaults, so a setting added there reaches these rows too
    options = engine_bench_args(["--graphs", "on", "--prompt", str(args.prompt_tokens), "--tokens", str(args.tokens)])
    concurrency = [int(c) for c in args.profile_concurrency.split(",") if c]
    rows = []
    for key in keys:
        if key in MODELS:
            rows += throughput_rows(backend, key, MODELS[key], concurrency, options, ceil["copy_gb_s"],
                                    ceil["matmul_tflop_s"])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(ENV)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(SHAPES)}")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    result = {"commit": commit(), "gpu": device_name(args.device), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "args": vars(args), "notes": [], "rows": []}
    log("ceilings")
    result["ceilings"] = ceilings(args.device, dtype)
    log(f"  {result['ceilings']}")
    with ProcessPoolExecutor(max_workers=args.client_procs, mp_context=get_context("spawn")) as pool:
        for key in keys:
            result["rows"] += bench_model(key, args, result["ceilings"], pool, work, result["notes"])
    if args.profile and args.device != "cpu":
        result["profiles"] = decode_turn_profiles(keys, args, result["ceilings"])
    text = table(result)
    print("\n" + text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serving_bench-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    stem.with_suffix(".log").write_text(text + "\n")
    log(f"wrote {stem}.json and .log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
