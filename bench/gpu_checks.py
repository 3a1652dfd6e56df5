"""GPU acceptance checks of the neuron (issue 2), through the real neuron code: DeviceWorker jobs
(load, forward, generate, drop), the same path the gRPC service drives.

    python bench/gpu_checks.py --devices 0        # one GPU
    python bench/gpu_checks.py --devices 0,1      # two GPUs (the two-models check spans both)

Checks, each recorded with its numbers in bench/results/gpu_checks-<time>.json:
- parity: every fixture in float32, bfloat16 and float16, fused path and plain path:
  float32 logits vs the transformers float32 reference: relative L2 < 1e-4, 32 greedy tokens equal;
  bfloat16/float16 logits vs the reference: cosine > 0.999 for every Forward output (last position
  of the short and the long prompt, all positions as one vector, a one-token forward), greedy
  tokens of the fused path equal to the plain path's (same dtype, same GPU). The worst single
  position's cosine is recorded too.
- two models at once on one GPU (and on two GPUs with --devices 0,1), generating concurrently,
  each answering exactly its reference tokens.
- load/drop 20 times leaves device memory where it started (within 64 MiB).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.dtypes import DTYPES as SERVING_DTYPES  # noqa: E402
from bench.common import commit, gpu_name  # noqa: E402,F401 - decode_bench imports them from here
from neuron.device import DeviceSpec  # noqa: E402
from neuron.engine.core import Caller  # noqa: E402
from neuron.engine.request import Request  # noqa: E402
from neuron.generation import ErrorEvent, FinishEvent, TokenEvent  # noqa: E402
from neuron.sampling import SamplingConfig  # noqa: E402
from neuron.shard import LoadRequest  # noqa: E402
from neuron.worker import DeviceWorker, DropShardJob, ForwardJob, GenerateJob, LoadShardJob  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE_NAMES = ["llama2", "llama3", "llama_sharded", "mistral", "qwen2", "qwen3"]
DTYPES = list(SERVING_DTYPES)  # the parity matrix: every dtype a shard can be served in
FP32_REL_L2 = 1e-4
HALF_COSINE = 0.999
MEMORY_SLACK = 64 << 20


# ----------------------------------------------------------------- worker helpers

def start_worker(index: int) -> DeviceWorker:
    worker = DeviceWorker(DeviceSpec(str(index), "cuda", index))
    worker.start()
    return worker


def load(worker: DeviceWorker, path: Path, dtype: str = "", fused: str = "auto", max_context: int = 256,
         max_seqs: int = 4, progress=None):
    """Load a shard; fused="off" gives the plain path (the reference) on the same GPU."""
    previous = os.environ.get("NEURON_FUSED")
    os.environ["NEURON_FUSED"] = fused
    try:
        handle = secrets.randbits(63) or 1
        request = LoadRequest(directory=path, model=path.name, dtype=dtype, max_context=max_context, max_seqs=max_seqs)
        shard = worker.submit(LoadShardJob(request, handle, progress or (lambda p: None), threading.Event())).result()
        return handle, shard
    finally:
        if previous is None:
            os.environ.pop("NEURON_FUSED", None)
        else:
            os.environ["NEURON_FUSED"] = previous


def drop(worker: DeviceWorker, handle: int) -> int:
    return worker.submit(DropShardJob(handle)).result()


def forward(worker: DeviceWorker, handle: int, ids, all_positions: bool = False) -> np.ndarray:
    return worker.submit(ForwardJob(handle, [int(t) for t in ids], all_positions)).result()


class Collector:
    """Receives a sequence's events on the worker thread, with their arrival times."""

    def __init__(self):
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.end = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token_id)
            self.times.append(time.perf_counter())
        else:
            self.end = event
            self.done.set()


def generate_async(worker: DeviceWorker, handle: int, prompt, max_tokens: int, **sampling) -> Collector:
    collector = Collector()
    config = SamplingConfig(max_tokens=max_tokens, ignore_eos=True, **sampling)
    shard = worker.slab[handle]
    request = Request(f"check-{secrets.token_hex(6)}", [int(t) for t in prompt], config, shard.kv.max_context,
                      eos_ids=frozenset(shard.eos_ids()))
    collector.submitted = time.perf_counter()
    worker.submit(GenerateJob(handle, request, Caller(emit=collector))).result()
    return collector


def wait(collector: Collector, timeout: float = 600.0) -> list[int]:
    if not collector.done.wait(timeout):
        raise TimeoutError("generation did not finish")
    if isinstance(collector.end, ErrorEvent):
        raise collector.end.error
    assert isinstance(collector.end, FinishEvent)
    return collector.tokens


def generate(worker, handle, prompt, max_tokens: int, **sampling) -> list[int]:
    return wait(generate_async(worker, handle, prompt, max_tokens, **sampling))


def device_free(worker: DeviceWorker) -> int:
    """Free device memory as the driver reports it (the pool released first)."""
    from neuron.worker import CallJob

    def query(backend):
        backend.release_cached()
        free, _total = backend.xp.cuda.runtime.memGetInfo()
        return int(free)
    return worker.submit(CallJob(query)).result()


# ----------------------------------------------------------------- checks

def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def min_row_cosine(a, b) -> float:
    a = np.asarray(a, np.float64).reshape(-1, np.shape(b)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return float(cos.min())


def run_path(worker, name: str, dtype: str, fused: str) -> dict:
    ref = np.load(FIXTURES / "reference" / f"{name}.npz")
    handle, shard = load(worker, FIXTURES / "models" / name, dtype, fused)
    try:
        prompt = ref["prompt_ids"]
        out = {
            "engine": "fused" if shard.model.fused is not None else "plain",
            "last": forward(worker, handle, prompt),
            "all": forward(worker, handle, prompt, all_positions=True),
            "long": forward(worker, handle, ref["long_prompt_ids"]),
            "first": forward(worker, handle, prompt[:1]),   # one token: the decode path (graph) via Forward
            "greedy": generate(worker, handle, prompt, 32),
        }
    finally:
        drop(worker, handle)
    return out


def parity(worker, names=FIXTURE_NAMES, dtypes=DTYPES) -> list[dict]:
    rows = []
    for name in names:
        ref = np.load(FIXTURES / "reference" / f"{name}.npz")
        ref_greedy = [int(t) for t in ref["greedy_ids"]]
        for dtype in dtypes:
            fused = run_path(worker, name, dtype, "auto")
            plain = run_path(worker, name, dtype, "off")
            row = {"fixture": name, "dtype": dtype, "engine": fused["engine"]}
            for tag, res in (("fused", fused), ("plain", plain)):
                row[f"{tag}_rel_l2"] = max(rel_l2(res["last"], ref["logits_last"]), rel_l2(res["all"], ref["logits_all"]),
                                           rel_l2(res["long"], ref["long_logits_last"]),
                                           rel_l2(res["first"], ref["logits_all"][0]))
                # cosine of each logits output the Forward RPC gives: last position (short and
                # long prompt), all positions (as one vector), a single-token forward (decode path)
                row[f"{tag}_min_cosine"] = min(cosine(res["last"], ref["logits_last"]),
                                               cosine(res["all"], ref["logits_all"]),
                                               cosine(res["long"], ref["long_logits_last"]),
                                               cosine(res["first"], ref["logits_all"][0]))
                # stricter, for the record: the worst single position of the all-positions output
                row[f"{tag}_worst_position_cosine"] = min_row_cosine(res["all"], ref["logits_all"])
                row[f"{tag}_greedy_eq_ref"] = res["greedy"] == ref_greedy
            row["greedy_fused_eq_plain"] = fused["greedy"] == plain["greedy"]
            row["greedy_first_difference"] = next((i for i, (a, b) in enumerate(zip(fused["greedy"], plain["greedy"]))
                                                   if a != b), None)
            row["fused_vs_plain_rel_l2"] = rel_l2(fused["all"], plain["all"])
            if dtype == "float32":
                row["pass"] = bool(row["fused_rel_l2"] < FP32_REL_L2 and row["fused_greedy_eq_ref"])
            else:
                row["pass"] = bool(row["fused_min_cosine"] > HALF_COSINE and row["greedy_fused_eq_plain"])
            rows.append(row)
            print(f"  parity {name:14s} {dtype:9s} {row['engine']:5s} rel={row['fused_rel_l2']:.2e} "
                  f"cos={row['fused_min_cosine']:.6f} (worst position {row['fused_worst_position_cosine']:.6f}) "
                  f"greedy==ref {row['fused_greedy_eq_ref']} "
                  f"fused==plain {row['greedy_fused_eq_plain']} plain: rel={row['plain_rel_l2']:.2e} "
                  f"cos={row['plain_min_cosine']:.6f} -> {'ok' if row['pass'] else 'FAIL'}", flush=True)
    return rows


def two_models(workers: list[DeviceWorker]) -> dict:
    """Two models (different architectures and dtypes) on every device at once, generating
    concurrently; each must produce its reference greedy tokens (fp32) or stay finite (bf16)."""
    specs = [("llama2", "float32"), ("qwen3", "float32")]
    loaded = []
    for worker in workers:
        for name, dtype in specs:
            handle, _ = load(worker, FIXTURES / "models" / name, dtype)
            loaded.append((worker, handle, name))
    try:
        pending = []
        for worker, handle, name in loaded:
            ref = np.load(FIXTURES / "reference" / f"{name}.npz")
            pending.append((name, worker.spec.id, ref, generate_async(worker, handle, ref["prompt_ids"], 32)))
        results = []
        for name, device, ref, collector in pending:
            tokens = wait(collector)
            results.append({"model": name, "device": device, "ok": tokens == [int(t) for t in ref["greedy_ids"]]})
    finally:
        for worker, handle, _ in loaded:
            drop(worker, handle)
    ok = all(r["ok"] for r in results)
    print(f"  two models on devices {[w.spec.id for w in workers]}: {results} -> {'ok' if ok else 'FAIL'}", flush=True)
    return {"devices": [w.spec.id for w in workers], "results": results, "pass": ok}


def make_leak_checkpoint(directory: Path) -> Path:
    """A few hundred MiB of random weights: large enough that a leaked copy per cycle shows."""
    from cortex.tiny_checkpoint import LlamaShape, write_checkpoint
    path = directory / "leakcheck"
    if not (path / "config.json").exists():
        write_checkpoint(path, LlamaShape(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                                          num_heads=8, num_kv_heads=4, max_position_embeddings=1024),
                         dtype="bfloat16")
    return path


def load_drop(worker: DeviceWorker, path: Path, cycles: int = 20) -> dict:
    before_any = device_free(worker)
    handle, shard = load(worker, path, "bfloat16", max_context=1024)  # first cycle: one-time costs (cuBLAS, modules)
    generate(worker, handle, [1, 2, 3], 4)
    weight_bytes = shard.weight_bytes + shard.kv.nbytes
    del shard
    drop(worker, handle)
    baseline = device_free(worker)
    seconds = []
    for _ in range(cycles):
        t = time.perf_counter()
        handle, shard = load(worker, path, "bfloat16", max_context=1024)
        del shard
        generate(worker, handle, [1, 2, 3], 4)
        drop(worker, handle)
        seconds.append(time.perf_counter() - t)
    after = device_free(worker)
    drift = baseline - after
    ok = abs(drift) <= MEMORY_SLACK
    print(f"  load/drop x{cycles} of {weight_bytes / 2**20:.0f} MiB (weights+KV): free before any load "
          f"{before_any / 2**20:.0f} MiB, after the first cycle {baseline / 2**20:.0f} MiB, after {cycles} more "
          f"{after / 2**20:.0f} MiB, drift {drift / 2**20:+.1f} MiB -> {'ok' if ok else 'FAIL'}", flush=True)
    return {"device": worker.spec.id, "cycles": cycles, "shard_bytes": weight_bytes, "free_before_any_load": before_any,
            "free_after_first_cycle": baseline, "free_after_cycles": after, "drift_bytes": drift,
            "one_time_bytes": before_any - baseline, "median_cycle_seconds": float(np.median(seconds)), "pass": ok}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="0", help="GPU indices, e.g. 0 or 0,1")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "neuron-gpu-checks"))
    parser.add_argument("--skip", default="", help="comma list of checks to skip: parity,two,loaddrop")
    args = parser.parse_args(argv)
    devices = [int(d) for d in args.devices.split(",") if d.strip()]
    skip = set(filter(None, args.skip.split(",")))
    workers = [start_worker(i) for i in devices]
    started = time.perf_counter()
    result = {"commit": commit(), "gpu": gpu_name(devices[0]), "devices": devices,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checks": {}}
    try:
        if "parity" not in skip:
            print("parity (fused and plain path vs transformers fp32):", flush=True)
            result["checks"]["parity"] = parity(workers[0])
        if "two" not in skip:
            print("two models at once:", flush=True)
            result["checks"]["two_models_one_gpu"] = two_models(workers[:1])
            if len(workers) > 1:
                result["checks"]["two_models_two_gpus"] = two_models(workers[:2])
        if "loaddrop" not in skip:
            print("load/drop:", flush=True)
            path = make_leak_checkpoint(Path(args.work))
            result["checks"]["load_drop"] = [load_drop(w, path) for w in workers]
    finally:
        for w in workers:
            w.stop()
    checks = result["checks"]
    flat = [r["pass"] for r in checks.get("parity", [])]
    flat += [v["pass"] for k, v in checks.items() if k.startswith("two_models")]
    flat += [r["pass"] for r in checks.get("load_drop", [])]
    result["pass"] = all(flat)
    result["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_checks-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"{'ALL PASS' if result['pass'] else 'SOME CHECKS FAILED'} ({sum(flat)}/{len(flat)}); wrote {path}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
