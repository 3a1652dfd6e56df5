"""The serving engine of one shard on one GPU, in process (no gRPC): batched decode throughput and a
profile of a decode turn, beside the weight + KV read limit and the matmul limit measured in the
same run; and the fixtures' bf16 greedy tokens batched against alone.

    python bench/engine_bench.py [--models 1b,8b] [--concurrency 1,64,256] [--out DIR]
    python bench/engine_bench.py --device cpu --models cpu-512 --concurrency 1,16 --prompt 32 --tokens 64 \
        --skip-fixtures                                   # the CPU engine without gRPC (float32)

Requests are fed to the shard's ShardEngine as the device thread would (Scheduler -> ModelRunner ->
update), `--prompt` random tokens each, `--tokens` output tokens, ignoring EOS. Output tok/s counts
every generated token over the wall time from the first turn to the last. Decode turns run eagerly
replayed from CUDA graphs, eagerly, or both on the same shard (`--graphs both`, the default: the
eager rows are the baseline of the captured ones). Writes engine_bench-<time>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, commit, copy_bandwidth, gpu_name, time_ms, write_result
from bench.make_checkpoint import SHAPES, write_checkpoint
from bench.turn_profile import print_profile, profile_decode_turn
from neuron.device import CpuBackend, CudaBackend, DeviceSpec
from neuron.engine.core import Caller
from neuron.engine.request import Request
from neuron.engine.settings import EngineSettings
from neuron.sampling import SamplingConfig
from neuron.shard import LoadRequest, load_shard

MODELS = {"1b": "llama-3.2-1b", "8b": "llama-3-8b", "cpu-512": "cpu-512"}
FIXTURES = ROOT / "tests" / "fixtures"


def matmul_rate(cp) -> float:
    a = cp.ones((8192, 8192), dtype=cp.float16)
    ms = time_ms(cp, lambda: a @ a, reps=10)
    return 2 * 8192 ** 3 / ms / 1e9  # TFLOP/s


def cpu_ceilings() -> tuple[float, float]:
    """Copy bandwidth (GB/s, read + write) and float32 matmul rate (TFLOP/s) of this CPU, with NumPy."""
    a = np.ones(1 << 27, dtype=np.uint8)
    b = np.ones_like(a)  # touched: page faults are not bandwidth
    np.copyto(b, a)
    t = time.perf_counter()
    for _ in range(5):
        np.copyto(b, a)
    copy = 2 * 5 * a.nbytes / (time.perf_counter() - t) / 1e9
    m = np.ones((2048, 2048), dtype=np.float32)
    m @ m
    t = time.perf_counter()
    for _ in range(3):
        m @ m
    return copy, 3 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e12


def load(backend, directory: Path, name: str, graphs: bool, max_seqs: int, max_context: int = 2048,
         async_scheduling: bool = True):
    settings = EngineSettings(max_seqs=max_seqs, cuda_graphs=graphs, kv_memory_fraction=0.5,
                              async_scheduling=async_scheduling)
    dtype = "bfloat16" if backend.kind == "cuda" else "float32"
    req = LoadRequest(directory=directory, model=name, dtype=dtype, max_context=max_context, max_seqs=max_seqs)
    return load_shard(backend, req, 1, lambda p: None, threading.Event(), settings=settings)


def turn_kind(plan) -> tuple[str, int]:
    """("decode" | "prompt" | "mixed", decode rows) of a turn's plan: a decode row is a one-token
    chunk past a request's first position."""
    decoding = sum(1 for c in plan.chunks if len(c.token_ids) == 1 and c.start > 0)
    return ("decode" if decoding == len(plan.chunks) else ("prompt" if decoding == 0 else "mixed")), decoding


class TurnLog:
    """Wraps the shard's runner: every turn's kind (decode-only, prompt-only, mixed), tokens and
    seconds from its launch until its ids are on the host (the device's time, plus the host's when
    nothing was queued ahead). On a GPU also, per turn, the device's time from the point of the
    stream where its launch began to the end of its work (CUDA events; with a turn queued ahead
    that start is the previous turn's end), and how long `finish` waited: a host that always waits
    is ahead of the device, one that never waits is what the device waits for."""

    def __init__(self, runner):
        self.runner, self.turns, self._launched_at = runner, [], {}
        self.on_gpu = runner.xp is not np

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def launch(self, plan, feed=None):
        started = time.perf_counter()
        begin = self._event()
        launched = self.runner.launch(plan, feed)
        self._launched_at[id(launched)] = (started, begin, self._event())
        return launched

    def _event(self):
        if not self.on_gpu:
            return None
        event = self.runner.xp.cuda.Event()
        event.record()
        return event

    def finish(self, launched):
        waited = time.perf_counter()
        out = self.runner.finish(launched)
        waited = time.perf_counter() - waited
        started, begin, end = self._launched_at.pop(id(launched))
        device = None
        if begin is not None:
            end.synchronize()
            device = self.runner.xp.cuda.get_elapsed_time(begin, end) / 1e3
        plan = launched.plan
        kind, _ = turn_kind(plan)
        self.turns.append((kind, plan.num_tokens, time.perf_counter() - started, device, waited))
        return out

    def summary(self) -> dict:
        out = {}
        for kind in ("decode", "prompt", "mixed"):
            sel = [t for t in self.turns if t[0] == kind]
            out[kind] = {"turns": len(sel), "tokens": sum(t[1] for t in sel), "seconds": round(sum(t[2] for t in sel), 4)}
            if sel and sel[0][3] is not None:
                out[kind]["device_ms_p50"] = round(1e3 * statistics.median(t[3] for t in sel), 3)
            if sel:
                out[kind]["finish_wait_ms_p50"] = round(1e3 * statistics.median(t[4] for t in sel), 3)
        return out


def run_requests(shard, prompts: list[list[int]], tokens: int, turn_times: list | None = None) -> tuple[list, float]:
    requests = []
    for i, prompt in enumerate(prompts):
        r = Request(f"r{i}", prompt, SamplingConfig(max_tokens=tokens, ignore_eos=True), shard.kv.max_context)
        outputs = []
        shard.engine.add(r, Caller(emit=outputs.append))
        requests.append(r)
    started = time.perf_counter()
    while shard.engine.has_work():
        t0 = time.perf_counter()
        decode = all(len(r.output_ids) > 0 for r in requests if not r.is_finished)
        shard.engine.step()
        if turn_times is not None and decode:
            turn_times.append(time.perf_counter() - t0)
    return requests, time.perf_counter() - started


def recapture(shard, max_seqs: int, graphs: bool, one_row_gemv: bool, programmatic: bool,
              rope_epilogue: bool) -> None:
    """The A/B switches: one-row turns through cuBLAS and separate kernels as larger turns (not
    one_row_gemv), graphs captured without programmatic launches (not programmatic), the one-row
    q/k/v GEMV followed by the separate rotary kernel (not rope_epilogue); the decode graphs
    captured again."""
    from neuron.runner.cuda_graphs import DecodeGraphs

    if not one_row_gemv:
        shard.model.ops.gemv = None
    elif not rope_epilogue and shard.model.ops.gemv is not None:  # None on the CPU
        shard.model.ops.gemv.rope_epilogue = False
    if graphs:
        shard.engine.runner.graphs = DecodeGraphs(shard.model, shard.kv, max_seqs, capture=True,
                                                  programmatic=programmatic)
        shard.engine.runner.graphs.prepare()


def weight_bytes(shard) -> int:
    return shard.weight_bytes


def throughput_rows(backend, name: str, shape: str, concurrency: list[int], args, bandwidth: float,
                    tflops: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if shape in SHAPES:
            write_checkpoint(tmp, SHAPES[shape])
        else:  # the CPU benchmark's shape
            from bench.serving_bench import SHAPES as SERVING_SHAPES
            write_checkpoint(tmp, SERVING_SHAPES[shape], dtype="float32")
        shard = load(backend, Path(tmp), name, args.graphs != "off", max(concurrency), max_context=args.max_context,
                     async_scheduling=not args.no_async_scheduling)
        if args.no_one_row_gemv or args.no_pdl or args.no_rope_epilogue:
            recapture(shard, max(concurrency), args.graphs != "off", not args.no_one_row_gemv, not args.no_pdl,
                      not args.no_rope_epilogue)
        captured = shard.engine.runner.graphs
        report = captured.report if captured else None
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.graphs]
        for graphs, n in [(g, n) for n in concurrency for g in modes]:
            # eager and captured turns on the same shard: the runner's graphs set or not
            shard.engine.runner.graphs = captured if graphs else None
            rng = np.random.default_rng(0)
            prompts = [rng.integers(10, 1000, args.prompt).tolist() for _ in range(n)]
            run_requests(shard, prompts[:1], 4)  # warm-up
            turns: list = []
            turn_log = shard.engine.runner = TurnLog(shard.engine.runner)
            requests, seconds = run_requests(shard, prompts, args.tokens, turns)
            shard.engine.runner = turn_log.runner
            generated = sum(len(r.output_ids) for r in requests)
            kv_bytes = n * (args.prompt + args.tokens / 2) * shard.kv.nbytes / max(shard.kv.tokens, 1)
            step_limit = max((weight_bytes(shard) + kv_bytes) / (bandwidth * 1e9),
                             2 * shard.num_parameters * n / (tflops * 1e12))
            turn_ms = 1e3 * statistics.median(turns) if turns else None
            row = {"model": name, "concurrency": n, "graphs": bool(graphs and report and report.sizes),
                   "output_tok_s": generated / seconds,
                   "decode_turn_ms_p50": turn_ms, "roofline_tok_s": n / step_limit,
                   "graph_sizes": sorted(report.sizes) if report else [],
                   "graph_capture_s": report.seconds if report else None, "turns": turn_log.summary()}
            if backend.kind == "cuda" and graphs:
                row["profile"] = profile_decode_turn(shard, n, args.prompt + args.tokens // 2, bandwidth, tflops)
                replay = row["profile"].get("graph_replay", {}).get("ms")
                row["host_ms_per_turn"] = turn_ms - replay if turn_ms and replay else None
                print_profile(name, row["profile"])
            rows.append(row)
            print(f"{name:>3} n={n:>3} turns {row['turns']}", flush=True)
            print(f"{name:>3} n={n:>3} graphs={row['graphs']!s:>5}  {row['output_tok_s']:>9.1f} tok/s   "
                  f"decode turn p50 {turn_ms or 0:>7.2f} ms (host {row.get('host_ms_per_turn') or 0:.2f})   roofline {row['roofline_tok_s']:>9.1f} tok/s", flush=True)
        shard.engine.fail_all(RuntimeError("bench done"))
        del shard, captured
        backend.release_cached()
    return rows


def fixture_parity(backend) -> list[dict]:
    """bf16 greedy tokens of each fixture's batch prompts: all at once (arriving together) against
    each alone. Both run the same engine; transformers' fp32 tokens are printed beside them."""
    rows = []
    for name in ("llama2", "llama3", "mistral", "qwen2", "qwen3"):
        ref = np.load(FIXTURES / "reference" / f"{name}_batch.npz")
        lengths, flat = ref["prompt_lengths"].tolist(), ref["prompt_ids"].tolist()
        prompts, start = [], 0
        for n in lengths:
            prompts.append(flat[start:start + n])
            start += n
        shard = load(backend, FIXTURES / "models" / name, name, True, 16, max_context=256)
        batched, _ = run_requests(shard, prompts, 32)
        alone = [run_requests(shard, [p], 32)[0][0] for p in prompts]
        same = sum(a.output_ids == b.output_ids for a, b in zip(batched, alone))
        vs_ref = sum(b.output_ids == list(map(int, g)) for b, g in zip(batched, ref["greedy_ids"]))
        rows.append({"fixture": name, "prompts": len(prompts), "batched_equal_alone": same, "equal_fp32_reference": vs_ref})
        print(f"fixture {name:>8}: bf16 batched == alone for {same}/{len(prompts)} prompts; "
              f"== transformers fp32 for {vs_ref}/{len(prompts)}", flush=True)
        shard.engine.fail_all(RuntimeError("bench done"))
        del shard
        backend.release_cached()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--concurrency", default="1,64,256")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-context", type=int, default=2048,
                        help="the shard's max_context (the decode graphs' attention grid covers its splits)")
    parser.add_argument("--graphs", choices=("on", "off", "both"), default="both",
                        help="decode turns replayed from CUDA graphs, eager, or each (same shard, same run)")
    parser.add_argument("--skip-fixtures", action="store_true")
    parser.add_argument("--no-one-row-gemv", action="store_true",
                        help="one-row turns through cuBLAS and separate kernels (the engine's default folds them into GEMVs)")
    parser.add_argument("--no-pdl", action="store_true",
                        help="decode graphs without programmatic dependent launches (kernels/launch.py)")
    parser.add_argument("--no-rope-epilogue", action="store_true",
                        help="one-row turns run the rotary and KV write as their own kernel (by default the "
                             "q/k/v GEMV's epilogue does it)")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="run one turn at a time (by default each decode turn is queued behind the running "
                             "one, EngineSettings.async_scheduling, and a turn's logged seconds overlap the next's)")
    parser.add_argument("--device", default="0", help="CUDA GPU index, or cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        backend, name = CpuBackend(DeviceSpec("cpu", "cpu", 0), 16 << 30), f"cpu ({os.cpu_count()} cores)"
        bandwidth, tflops = cpu_ceilings()
    else:
        backend = CudaBackend(DeviceSpec(args.device, "cuda", int(args.device)))
        bandwidth, tflops, name = copy_bandwidth(backend.xp), matmul_rate(backend.xp), gpu_name()
    print(f"device: {name}   copy {bandwidth:.0f} GB/s   matmul {tflops:.3f} TFLOP/s", flush=True)
    result = {"commit": commit(), "gpu": name, "copy_gb_s": bandwidth, "matmul_tflops": tflops,
              "one_row_gemv": not args.no_one_row_gemv, "pdl": not args.no_pdl,
              "rope_epilogue": not args.no_rope_epilogue, "async_scheduling": not args.no_async_scheduling,
              "prompt": args.prompt, "tokens": args.tokens, "max_context": args.max_context, "fixtures": [], "rows": []}
    if not args.skip_fixtures:
        result["fixtures"] = fixture_parity(backend)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    for model in args.models.split(","):
        result["rows"] += throughput_rows(backend, model, MODELS[model], concurrency, args, bandwidth, tflops)
    write_result(args.out, "engine_bench", result)


if __name__ == "__main__":
    main()
