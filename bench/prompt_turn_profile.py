"""Where a prompt or mixed turn's device time goes, on a GPU shard, in real engine turns: CUDA events
around every call of the layer ops (the GEMMs, the LM head, the attention, the norms, the rotary +
KV write, silu * up) while the engine serves N requests, summed per op class and turn, beside each
class's FLOP or bandwidth limit. What the classes leave of the turn's device time is "other" (the
embedding gather, the sampler, the inputs' uploads, and the device's idle gaps when the host
launches slower than the device runs: the turn's launch time and `finish` wait tell whether that
happened).

    python bench/prompt_turn_profile.py [--models 8b,1b] [--requests 64] [--prompt 128] [--tokens 4]

Decode turns replay CUDA graphs, which call none of the wrapped ops: only eager turns (prompt,
mixed) are profiled. Event pairs around each op measure the device's time for it when the device
is busy (the host ahead); the turn's `finish` wait says whether it was. Writes
prompt_turn_profile-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import commit, copy_bandwidth, gpu_name, write_result  # noqa: E402
from bench.engine_bench import MODELS, load, matmul_rate, run_requests, turn_kind  # noqa: E402
from bench.make_checkpoint import SHAPES, write_checkpoint  # noqa: E402
from neuron.device import CudaBackend, DeviceSpec  # noqa: E402
from neuron.engine.core import Caller  # noqa: E402
from neuron.engine.request import Request  # noqa: E402
from neuron.sampling import SamplingConfig  # noqa: E402


class OpTimer:
    """Wraps a loaded model's layer ops and attention so that each call records a pair of CUDA events
    into the current turn's list (`begin_turn`)."""

    def __init__(self, model):
        self.cp, self.model = model.xp, model
        self.records: list | None = None
        ops = model.ops
        self._wrap(ops, "linear", lambda x, W: "lm_head" if W is model.lm_head else "gemm")
        self._wrap(ops, "rms_norm", lambda *a: "norm")
        self._wrap(ops, "add_rms_norm", lambda *a: "norm")
        self._wrap(ops, "silu_mul", lambda *a: "silu_mul")
        self._wrap(ops, "rope_write_kv", lambda *a, **k: "rope_kv")
        if model.decode_attention is not None:
            model.decode_attention = _TimedCall(model.decode_attention, self)

    def _wrap(self, obj, attr: str, name_of) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            if self.records is None:
                return fn(*args, **kwargs)
            return self.record(name_of(*args, **kwargs), fn, args, kwargs)
        setattr(obj, attr, timed)

    def record(self, name: str, fn, args, kwargs):
        """fn(*args, **kwargs) between two CUDA events, kept with its host time in the turn's list."""
        began = time.perf_counter()
        start = self.cp.cuda.Event()
        start.record()
        out = fn(*args, **kwargs)
        end = self.cp.cuda.Event()
        end.record()
        self.records.append((name, start, end, time.perf_counter() - began))
        return out

    def begin_turn(self) -> list:
        self.records = []
        return self.records

    def stop(self) -> None:
        self.records = None


class _TimedCall:
    """The model's DecodeAttention with its calls timed; every other attribute is the original's."""

    def __init__(self, inner, timer: OpTimer):
        self._inner, self._timer = inner, timer

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        if self._timer.records is None:
            return self._inner(*args, **kwargs)
        return self._timer.record("attention", self._inner, args, kwargs)


class ProfiledRunner:
    """The shard's runner, each turn's ops recorded (OpTimer) and its launch, device and finish
    times kept, as engine_bench's TurnLog does."""

    def __init__(self, runner, timer: OpTimer):
        self.runner, self.timer, self.turns, self._open = runner, timer, [], {}
        self._last_end = None   # the previous turn's end event: the device's idle gap before a turn

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def launch(self, plan, feed=None):
        cp = self.timer.cp
        records = self.timer.begin_turn()
        started = time.perf_counter()
        begin = cp.cuda.Event()
        begin.record()
        launched = self.runner.launch(plan, feed)
        launch_s = time.perf_counter() - started
        end = cp.cuda.Event()
        end.record()
        self.timer.stop()
        self._open[id(launched)] = (records, begin, end, launch_s)
        return launched

    def finish(self, launched):
        waited = time.perf_counter()
        out = self.runner.finish(launched)
        waited = time.perf_counter() - waited
        records, begin, end, launch_s = self._open.pop(id(launched))
        end.synchronize()
        elapsed = self.timer.cp.cuda.get_elapsed_time
        ops: dict[str, float] = {}
        host: dict[str, float] = {}
        for name, a, b, host_s in records:
            ops[name] = ops.get(name, 0.0) + elapsed(a, b)
            host[name] = host.get(name, 0.0) + 1e3 * host_s
        gap = elapsed(self._last_end, begin) if self._last_end is not None else None
        self._last_end = end
        plan = launched.plan
        kind, decoding = turn_kind(plan)
        self.turns.append({"kind": kind, "tokens": plan.num_tokens, "decode_rows": decoding,
                           "prompt_tokens": plan.num_tokens - decoding,
                           "device_ms": elapsed(begin, end), "ops_ms": ops, "host_ops_ms": host,
                           "launch_ms": 1e3 * launch_s, "finish_wait_ms": 1e3 * waited,
                           "gap_before_ms": gap})
        return out


def long_prompt_turns(shard, prompts: list, tokens: int, long_prompt: list, name: str) -> None:
    """The requests decode; once every one has a token, one long prompt arrives (its chunks ride
    along with their decode rows, as long_prompt_bench.py's workload); runs until all finish."""
    engine = shard.engine
    requests = [Request(f"{name}-{i}", p, SamplingConfig(max_tokens=tokens, ignore_eos=True), shard.kv.max_context)
                for i, p in enumerate(prompts)]
    for r in requests:
        engine.add(r, Caller(emit=lambda event: None))
    while any(not r.output_ids for r in requests):
        engine.step()
    engine.add(Request(name, long_prompt, SamplingConfig(max_tokens=2, ignore_eos=True), shard.kv.max_context),
               Caller(emit=lambda event: None))
    while engine.has_work():
        engine.step()


def limits(shard, tokens: int, decode_rows: int, bandwidth: float, tflops: float) -> dict:
    """Each op class's limit for a turn of `tokens` rows: FLOPs at the matmul rate for the GEMMs,
    bytes at the copy rate for the elementwise ops."""
    model, c = shard.model, shard.model.config
    p, layers, item = model.p, c.num_layers, model.p["embed"].dtype.itemsize
    weights = [p[f"0.{w}"] for w in ("qkv", "o", "gate_up", "down")]
    gemm_flops = 2 * tokens * sum(w.shape[0] * w.shape[1] for w in weights) * layers
    gemm_bytes = sum(int(w.nbytes) for w in weights) * layers
    sampled = decode_rows + 1
    qkv, inter2 = weights[0].shape[0], weights[2].shape[0]
    return {
        "gemm": 1e3 * max(gemm_flops / (tflops * 1e12), gemm_bytes / (bandwidth * 1e9)),
        "lm_head": 1e3 * max(2 * sampled * model.lm_head.shape[0] * model.lm_head.shape[1] / (tflops * 1e12),
                             int(model.lm_head.nbytes) / (bandwidth * 1e9)),
        "norm": 1e3 * 2 * layers * item * tokens * 3 * c.hidden_size / (bandwidth * 1e9),
        "rope_kv": 1e3 * layers * item * tokens * 2 * qkv / (bandwidth * 1e9),
        "silu_mul": 1e3 * layers * item * tokens * 1.5 * inter2 / (bandwidth * 1e9),
    }


def profile(backend, key: str, args, bandwidth: float, tflops: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, SHAPES[MODELS[key]])
        shard = load(backend, Path(tmp), key, True, args.requests + (1 if args.long else 0),
                     max_context=max(args.max_context, args.long + 16))
        timer = OpTimer(shard.model)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(10, 1000, args.prompt).tolist() for _ in range(args.requests)]
        run_requests(shard, prompts[:2], 2)   # warm-up
        rows = []
        for repeat in range(args.repeats):
            runner = shard.engine.runner = ProfiledRunner(shard.engine.runner, timer)
            if args.long:
                long_prompt_turns(shard, prompts, args.tokens, rng.integers(10, 1000, args.long).tolist(),
                                  f"long{repeat}")
            else:
                run_requests(shard, prompts, args.tokens)
            shard.engine.runner = runner.runner
            for turn in runner.turns:
                if turn["kind"] == "decode":
                    continue
                turn["limits_ms"] = limits(shard, turn["tokens"], turn["decode_rows"], bandwidth, tflops)
                turn["other_ms"] = turn["device_ms"] - sum(turn["ops_ms"].values())
                turn["model"], turn["repeat"] = key, repeat
                rows.append(turn)
        shard.engine.fail_all(RuntimeError("bench done"))
        del shard
        backend.release_cached()
    return rows


def print_rows(rows: list[dict]) -> None:
    for t in rows:
        ops = "  ".join(f"{k} {v:.2f} ({t['limits_ms'].get(k, 0):.2f}; host {t['host_ops_ms'][k]:.2f})"
                        for k, v in sorted(t["ops_ms"].items()))
        gap = t["gap_before_ms"]
        print(f"{t['model']:>3} r{t['repeat']} {t['kind']:>6} tokens {t['tokens']:>5} (decode rows {t['decode_rows']:>3}) "
              f"device {t['device_ms']:7.2f} ms  launch {t['launch_ms']:6.2f}  wait {t['finish_wait_ms']:6.2f}  "
              f"idle before {gap if gap is not None else float('nan'):6.2f} | "
              f"{ops}  other {t['other_ms']:.2f}", flush=True)


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in sorted({(r["model"], r["kind"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["kind"]) == key]
        names = sorted({n for r in sel for n in r["ops_ms"]})
        out[f"{key[0]}-{key[1]}"] = {
            "turns": len(sel), "tokens_p50": statistics.median(r["tokens"] for r in sel),
            "device_ms_p50": statistics.median(r["device_ms"] for r in sel),
            "ops_ms_p50": {n: statistics.median(r["ops_ms"].get(n, 0.0) for r in sel) for n in names},
            "host_ops_ms_p50": {n: statistics.median(r["host_ops_ms"].get(n, 0.0) for r in sel) for n in names},
            "other_ms_p50": statistics.median(r["other_ms"] for r in sel),
            "launch_ms_p50": statistics.median(r["launch_ms"] for r in sel),
            "finish_wait_ms_p50": statistics.median(r["finish_wait_ms"] for r in sel)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="8b,1b")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4, help="output tokens a request (the mixed turns' decode rows)")
    parser.add_argument("--long", type=int, default=0,
                        help="a prompt of this many tokens arriving while the requests decode (0: none)")
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="0")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    backend = CudaBackend(DeviceSpec(args.device, "cuda", int(args.device)))
    bandwidth, tflops = copy_bandwidth(backend.xp), matmul_rate(backend.xp)
    print(f"device: {gpu_name()}   copy {bandwidth:.0f} GB/s   matmul {tflops:.1f} TFLOP/s "
          f"(limits in parentheses)", flush=True)
    rows = []
    for key in args.models.split(","):
        rows += profile(backend, key, args, bandwidth, tflops)
    print_rows(rows)
    result = {"commit": commit(), "gpu": gpu_name(), "copy_gb_s": bandwidth, "matmul_tflops": tflops,
              "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary(rows), "turns": rows}
    for name, s in result["summary"].items():
        print(name, json.dumps(s), flush=True)
    write_result(args.out, "prompt_turn_profile", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
