"""Decode at batch 1 of the Llama-3-8B shape over two GPUs (tensor parallelism, NCCL), through the
real stack, beside TP=1 on the same machine and the per-GPU roofline (issue 5's TP target).

    python bench/tp_decode_bench.py                  # needs 2 GPUs and CuPy
    python bench/tp_decode_bench.py --no-profile     # only the through-cortex figures

In one run it:
1. measures the ceilings: device-to-device copy bandwidth of each GPU (bytes read + written), and
   NCCL's latency for the decode step's collectives (all-reduce of the hidden state in float32,
   all-gather of the vocab-parallel logits), each captured 64 times in a CUDA graph and replayed,
   and eagerly;
2. writes the random-weight bf16 8B checkpoint (bench/make_checkpoint.py) unless it is there;
3. starts `neuron serve --devices 0,1` and `cortex serve`, loads the model with tp=1 and then tp=2
   (one neuron, GPUs 0 and 1, NCCL), and measures decode tok/s at the client (128-token prompt,
   256 tokens, greedy; the best of 3 runs after a warm-up), plus the greedy tokens of both;
4. (unless --no-profile) loads the two ranks in this process (DeviceWorkers, the neuron's code)
   and times, with CUDA events, where a TP=2 decode step goes: the captured step, the same step
   without its collectives, the collectives alone, and each kernel group;
5. prints a table and writes bench/results/tp_decode_bench-<time>.json with the commit and GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit, copy_bandwidth, gpu_name, time_kernel_groups, time_ms  # noqa: E402
from bench.make_checkpoint import SHAPES, write_checkpoint  # noqa: E402

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TARGET_TOK_S = 330.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ ceilings

def copy_bandwidth_of(index: int) -> float:
    import cupy as cp
    with cp.cuda.Device(index):
        return copy_bandwidth(cp)


def start_workers(n: int = 2):
    from neuron.device import DeviceSpec
    from neuron.worker import DeviceWorker
    workers = [DeviceWorker(DeviceSpec(str(i), "cuda", i)) for i in range(n)]
    for w in workers:
        w.start()
    return workers


def form_group(workers, timeout: float = 60.0):
    from neuron import comm_nccl
    from neuron.worker import CallJob
    uid = workers[0].submit(CallJob(lambda b: comm_nccl.create_group_id())).result(timeout)
    futures = [w.submit(CallJob(lambda b, r=r: comm_nccl.NcclCommunicator(uid, r, len(workers), b.stream, timeout)))
               for r, w in enumerate(workers)]
    return [f.result(timeout) for f in futures]


def on_all(workers, fn, timeout: float = 300.0) -> list:
    """fn(rank, backend) on every worker at once (collectives need every rank)."""
    from neuron.worker import CallJob
    futures = [w.submit(CallJob(lambda b, r=r: fn(r, b))) for r, w in enumerate(workers)]
    return [f.result(timeout) for f in futures]


def collective_latency(hidden: int, vocab: int, reps: int = 64) -> dict:
    """Per-call latency of the decode step's collectives between GPU 0 and 1: in a graph of `reps`
    calls (how the decode step runs them) and eagerly. Buffers hold zeros: NCCL's time does not
    depend on the values."""
    workers = start_workers(2)
    try:
        comms = form_group(workers)

        def run(rank, backend):
            cp = backend.xp
            comm = comms[rank]
            stream = cp.cuda.get_current_stream()
            out = {}
            cases = {"all_reduce_f32_hidden": (lambda buf: comm.all_reduce(buf), cp.zeros(hidden, cp.float32)),
                     "all_reduce_bf16_hidden": (lambda buf: comm.all_reduce(buf),
                                                cp.zeros(hidden, dtype=np.dtype(_bf16()))),
                     "all_gather_f32_logits": (lambda buf: comm.all_gather_into(buf),
                                               cp.zeros(2 * (-(-vocab // 2)), cp.float32))}
            for name, (call, buf) in cases.items():
                def many():
                    for _ in range(reps):
                        call(buf)
                many()
                stream.synchronize()
                out[name + "_eager_us"] = time_ms(cp, many, reps=5, warmup=1) * 1e3 / reps
                stream.begin_capture()
                many()
                graph = stream.end_capture()
                graph.upload(stream)
                out[name + "_graph_us"] = time_ms(cp, lambda: graph.launch(stream), reps=10, warmup=2) * 1e3 / reps
            return out

        per_rank = on_all(workers, run)
        on_all(workers, lambda r, b: comms[r].close())
        return {"reps": reps, "hidden": hidden, "rank0": per_rank[0], "rank1": per_rank[1]}
    finally:
        for w in workers:
            w.stop()


def _bf16():
    import ml_dtypes
    return ml_dtypes.bfloat16


# ------------------------------------------------------------------ through cortex

def through_cortex(path: Path, tokens: int, prompt: list[int], work: Path) -> dict:
    from cortex.client import CortexClient
    from cortex.local import cortex_args, neuron_args, start_server

    res = {}
    servers = []
    try:
        servers.append(start_server("neuron", "neuron.cli", neuron_args("0,1", [path.parent]), work, timeout=180, env=ENV))
        cortex = start_server("cortex", "cortex.cli", cortex_args([servers[0].address], poll_seconds=1), work, env=ENV)
        servers.append(cortex)
        time.sleep(2)
        with CortexClient(cortex.address, timeout=600) as client:
            for tp in (1, 2):
                name = f"bench-tp{tp}"
                t = time.perf_counter()
                info = client.load(str(path), name, dtype="bfloat16", tp=tp, max_context=4096, timeout=600)
                r = res[f"tp{tp}"] = {"load_wall_s": time.perf_counter() - t,
                                      "placement": [(p.rank, p.node, p.device) for p in info.placement]}

                def stream():
                    t0 = time.perf_counter()
                    stamps, ids, final = [], [], None
                    for chunk in client.generate(name, token_ids=prompt, max_tokens=tokens, temperature=0.0,
                                                 ignore_eos=True, timeout=600):
                        stamps.append((time.perf_counter(), len(chunk.token_ids)))
                        ids += list(chunk.token_ids)
                        final = chunk
                    first_t, first_n = stamps[0]
                    return {"ttft_ms": (first_t - t0) * 1e3, "tokens": ids,
                            "decode_tok_s": (len(ids) - first_n) / (stamps[-1][0] - first_t),
                            "server_decode_tok_s": final.timing.decode_tokens_per_second}
                stream()  # warm-up
                runs = [stream() for _ in range(3)]
                r["decode_tok_s_runs"] = [x["decode_tok_s"] for x in runs]
                r["decode_tok_s"] = max(r["decode_tok_s_runs"])
                r["server_decode_tok_s"] = max(x["server_decode_tok_s"] for x in runs)
                r["ttft_128_ms"] = statistics.median(x["ttft_ms"] for x in runs)
                r["tokens"] = runs[-1]["tokens"]
                r["runs_identical"] = all(x["tokens"] == runs[0]["tokens"] for x in runs)
                client.unload(name)
                log(f"  tp={tp}: {r['decode_tok_s']:.1f} tok/s (runs {[round(v, 1) for v in r['decode_tok_s_runs']]}), "
                    f"load {r['load_wall_s']:.1f} s, placement {r['placement']}")
        a, b = res["tp1"]["tokens"], res["tp2"]["tokens"]
        res["greedy_equal_tp2_vs_tp1"] = a == b
        res["first_divergence"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    finally:
        for s in reversed(servers):
            s.stop()
    return res


# ------------------------------------------------------------------ where a TP step's time goes

def profile_tp(path: Path, pos: int = 300) -> dict:
    from neuron.model.cuda_graph import DecodeGraph
    from neuron.shard import LoadRequest
    from neuron.worker import DropShardJob, LoadShardJob

    workers = start_workers(2)
    try:
        comms = form_group(workers)
        handles = [secrets.randbits(63) or 1 for _ in workers]
        futures = [w.submit(LoadShardJob(LoadRequest(directory=path, model=path.name, dtype="bfloat16",
                                                     max_context=4096, max_seqs=1, tp_rank=r, tp_size=2,
                                                     group_id="bench"),
                                         handles[r], lambda p: None, threading.Event(), comm=comms[r]))
                   for r, w in enumerate(workers)]
        shards = [f.result(600) for f in futures]

        def run(rank, backend):
            cp = backend.xp
            shard = shards[rank]
            f, kv = shard.model.fused, shard.kv
            ops, p, c = f.ops, f.p, f.c
            L = c.num_layers
            f.io.set_meta(pos, 0, 5)
            item = np.dtype(f.dtype).itemsize
            res = {"context": pos + 1, "graph_captured": f._graph is not None and f._graph.graph is not None,
                   "capture_error": getattr(f._graph, "failed", None)}
            res["step_ms"] = time_ms(cp, f._graph.launch, reps=50) if res["graph_captured"] else None
            res["eager_step_ms"] = time_ms(cp, lambda: f._decode_body(kv), reps=5)
            nocomm = DecodeGraph(cp, lambda: f._decode_body(kv, collectives=False))
            nocomm.capture()
            res["step_without_collectives_ms"] = time_ms(cp, nocomm.launch, reps=50)

            def collectives():
                for _ in range(2 * L):
                    f._sum(f.part)
                f.comm.all_gather_into(f.logits_all)
            coll = DecodeGraph(cp, collectives)
            coll.capture()
            res["collectives_only_ms"] = time_ms(cp, coll.launch, reps=20)
            res["collectives_per_step"] = 2 * L + 1

            def nbytes(key):
                return sum(int(p[f"{i}.{key}"].nbytes) for i in range(L))

            kv_bytes = 2 * L * f.hkv * (pos + 1) * f.d * item
            groups = {
                "qkv gemv (+residual add, rmsnorm)": (lambda: [ops.gemv(p[f"{i}.qkv"], f.x, f.qkv, "resid_rms", "store",
                                                                        norm_w=p[f"{i}.input_norm"], eps=f.eps,
                                                                        resid=f.part, xout=f.x2) for i in range(L)],
                                                      nbytes("qkv")),
                "rope + kv write": (lambda: [ops.qkv_post(f.qkv, f.io.meta, 1, None, None, None, f.cos, f.sin, f.q,
                                                          kv.keys[i], kv.values[i], f.hq, f.hkv, f.d, f.eps)
                                             for i in range(L)], 0),
                "attention (split-K + combine)": (lambda: [ops.attn_decode(f.q, kv.keys[i], kv.values[i], f.io.meta,
                                                                           f.window, f.scale, f.po, f.pm, f.pl, f.attn,
                                                                           f.hq, f.hkv, f.d) for i in range(L)],
                                                  kv_bytes),
                "o gemv (float32 partial)": (lambda: [ops.gemv(p[f"{i}.o"], f.attn, None, "none", "partial",
                                                               outf=f.part) for i in range(L)], nbytes("o")),
                "gate_up gemv (+residual add, rmsnorm, silu*up)": (
                    lambda: [ops.gemv(p[f"{i}.gate_up"], f.x, f.act, "resid_rms", "silu_pair", norm_w=p[f"{i}.post_norm"],
                                      eps=f.eps, resid=f.part, xout=f.x2) for i in range(L)], nbytes("gate_up")),
                "down gemv (float32 partial)": (lambda: [ops.gemv(p[f"{i}.down"], f.act, None, "none", "partial",
                                                                  outf=f.part) for i in range(L)], nbytes("down")),
                "lm_head gemv, own vocab rows (+res, norm)": (lambda: ops.gemv(
                    f.lm_head_mine, f.x, None, "resid_rms", "logits", norm_w=p["norm"], eps=f.eps, outf=f.logits_mine,
                    resid=f.part, xout=f.x2), int(f.lm_head_mine.nbytes)),
                "argmax + embedding row": (lambda: (ops.argmax(f.logits, f.tokens, f.io.meta),
                                                    ops.embed_row(p["embed"], f.io.meta, f.tokens, f.x)), 0),
            }
            res["groups"] = time_kernel_groups(cp, groups)
            res["groups_sum_ms"] = sum(g["ms"] for g in res["groups"].values())
            # not in the step: what a separate residual-add kernel would cost (folded into the prologues)
            sep = DecodeGraph(cp, lambda: [ops.resid_add_f32(f.x, f.part) for _ in range(2 * L)])
            sep.capture()
            res["separate_residual_adds_ms"] = time_ms(cp, sep.launch, reps=20)
            # kernel resources (spills would show as local memory)
            res["kernel_attributes"] = {}
            for name in ("gemv_p1_e3_b0", "gemv_p3_e3_b0", "gemv_p3_e0_b0", "gemv_p0_e4_b0", "gemv_p0_e1_b0"):
                try:
                    a = ops.fn(name).attributes
                    res["kernel_attributes"][name] = {k: a[k] for k in ("num_regs", "local_size_bytes")}
                except Exception as err:  # noqa: BLE001
                    res["kernel_attributes"][name] = repr(err)
            res["gemv_ms"] = sum(g["ms"] for k, g in res["groups"].items() if "gemv" in k)
            res["bytes_per_step"] = sum(g["bytes"] for g in res["groups"].values())
            res["weight_bytes"] = shard.weight_bytes
            return res

        per_rank = on_all(workers, run, timeout=600)
        for r, w in enumerate(workers):
            w.submit(DropShardJob(handles[r])).result(120)
        return {"rank0": per_rank[0], "rank1": per_rank[1]}
    finally:
        for w in workers:
            w.stop()


# ------------------------------------------------------------------ report

def table(res: dict) -> str:
    copy = min(res["copy_gb_s"])
    s = res.get("stack", {})
    prof = res.get("profile", {}).get("rank0", {})
    lat = res.get("collectives", {}).get("rank0", {})
    roof = res["roofline"]
    tp1, tp2 = s.get("tp1", {}), s.get("tp2", {})

    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)
    env = " ".join(f"{k}={v}" for k, v in sorted(res.get("env", {}).items()) if not k.startswith("NCCL_NVLS"))
    lines = [f"GPU: {res['gpu']} x2   commit: {res['commit'][:12]}   copy {copy:.0f} GB/s (min of the two GPUs)"
             + (f"   {env}" if env else ""),
             "",
             f"{'8B shape, bf16, batch 1':40s} {'TP=1':>9s} {'TP=2':>9s} {'roofline':>9s} {'target':>8s}",
             f"{'decode tok/s through cortex':40s} {f(tp1.get('decode_tok_s')):>9s} {f(tp2.get('decode_tok_s')):>9s} "
             f"{f(roof['tp2_decode_tok_s']):>9s} {TARGET_TOK_S:>8.0f}",
             f"{'decode tok/s (server-side timing)':40s} {f(tp1.get('server_decode_tok_s')):>9s} "
             f"{f(tp2.get('server_decode_tok_s')):>9s}",
             f"{'TTFT 128 ms through cortex':40s} {f(tp1.get('ttft_128_ms')):>9s} {f(tp2.get('ttft_128_ms')):>9s}",
             f"{'greedy tokens TP=2 == TP=1':40s} {str(s.get('greedy_equal_tp2_vs_tp1')):>19s}"
             f"  (first divergence: {s.get('first_divergence')})",
             "",
             f"roofline TP=1: {roof['tp1_decode_tok_s']:.1f} tok/s ({roof['tp1_bytes_per_step'] / 1e9:.2f} GB/step); "
             f"TP=2 per GPU: {roof['tp2_decode_tok_s']:.1f} tok/s ({roof['tp2_bytes_per_step'] / 1e9:.2f} GB/step "
             f"read per GPU: half of every layer, half of lm_head); weights held per GPU "
             f"{roof['tp2_weight_bytes_per_gpu'] / 1e9:.2f} GB -> {roof['tp2_held_decode_tok_s']:.1f} tok/s"]
    if lat:
        lines.append(f"NCCL latency, GPU0<->GPU1: all-reduce {res['hidden']} x f32 {lat['all_reduce_f32_hidden_graph_us']:.1f} us "
                     f"in a graph ({lat['all_reduce_f32_hidden_eager_us']:.1f} eager), bf16 "
                     f"{lat['all_reduce_bf16_hidden_graph_us']:.1f} us; all-gather of the logits "
                     f"{lat['all_gather_f32_logits_graph_us']:.1f} us")
    for setting, v in res.get("nccl_sweep", {}).items():
        if "all_reduce_f32_hidden_graph_us" in v:
            lines.append(f"  with {setting}: all-reduce {v['all_reduce_f32_hidden_graph_us']:.1f} us in a graph, "
                         f"all-gather {v['all_gather_f32_logits_graph_us']:.1f} us")
    if prof:
        lines += ["",
                  f"TP=2 decode step, rank 0, context {prof['context']} (CUDA events; graph captured: "
                  f"{prof['graph_captured']}):",
                  f"  captured step {f(prof['step_ms'], '.3f')} ms (= {f(1e3 / prof['step_ms'] if prof['step_ms'] else None)} "
                  f"tok/s); eager {prof['eager_step_ms']:.3f} ms; without collectives "
                  f"{prof['step_without_collectives_ms']:.3f} ms; the {prof['collectives_per_step']} collectives alone "
                  f"{prof['collectives_only_ms']:.3f} ms"]
        for name, g in prof["groups"].items():
            gbs = f" {g['gb_s']:7.0f} GB/s" if g["gb_s"] else ""
            lines.append(f"  {name:40s} {g['ms']:7.3f} ms{gbs}")
        lines.append(f"  (a separate residual-add kernel, 2 per layer, would add {prof['separate_residual_adds_ms']:.3f} ms; "
                     f"kernel regs/local: {prof.get('kernel_attributes')})")
        lines.append(f"  {'sum of groups':40s} {prof['groups_sum_ms']:7.3f} ms (GEMVs {prof['gemv_ms']:.3f} ms for "
                     f"{prof['bytes_per_step'] / 1e9:.2f} GB = {prof['bytes_per_step'] / prof['gemv_ms'] / 1e6:.0f} GB/s)")
    return "\n".join(lines)


def roofline(shape, vocab: int, copy_bytes_per_s: float) -> dict:
    """Bytes read per decode step (the embedding: one row) over the measured copy bandwidth."""
    params = shape.parameter_shapes(vocab)
    nbytes = {k: 2 * int(np.prod(v)) for k, v in params.items()}
    embed = nbytes.get("model.embed_tokens.weight", 0)
    head = nbytes.get("lm_head.weight", embed)
    layers = sum(v for k, v in nbytes.items() if k.startswith("model.layers."))
    norms = sum(v for k, v in nbytes.items() if k.startswith("model.layers.") and "norm" in k)
    tp1_bytes = layers + head
    tp2_bytes = (layers - norms) / 2 + norms + head / 2
    held = (layers - norms) / 2 + norms + embed + (head if "lm_head.weight" in nbytes else 0)
    return {"tp1_bytes_per_step": tp1_bytes, "tp1_decode_tok_s": copy_bytes_per_s / tp1_bytes,
            "tp2_bytes_per_step": tp2_bytes, "tp2_decode_tok_s": copy_bytes_per_s / tp2_bytes,
            "tp2_weight_bytes_per_gpu": held, "tp2_held_decode_tok_s": copy_bytes_per_s / held}


def nccl_sweep(settings: str, shape_name: str) -> dict:
    """The collective latency again under each ';'-separated NAME=VALUE env setting, each in its own process."""
    import subprocess
    results = {}
    for setting in [x for x in settings.split(";") if x]:
        key, _, value = setting.partition("=")
        try:
            proc = subprocess.run([sys.executable, __file__, "--latency-only", "--shape", shape_name], timeout=60,
                                  capture_output=True, text=True, env={**os.environ, key: value})
            line = next(x for x in proc.stdout.splitlines() if x.startswith("LATENCY "))
            results[setting] = json.loads(line[len("LATENCY "):])
        except Exception as err:  # noqa: BLE001 - one failed setting must not lose the others
            results[setting] = {"error": repr(err)}
        log(f"  {setting}: {results[setting]}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--nccl-sweep", default="NCCL_PROTO=LL;NCCL_MAX_NCHANNELS=1;NCCL_MAX_NCHANNELS=4",
                        help="';'-separated env settings under which the collective latency is measured again "
                             "(each in its own process); empty: none")
    parser.add_argument("--latency-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "neuron-bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    os.environ.update(ENV)
    shape = SHAPES[args.shape]
    if args.latency_only:
        print("LATENCY " + json.dumps(collective_latency(shape.hidden_size, shape.vocab_size)["rank0"]), flush=True)
        return 0
    import cupy
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"commit": commit(), "gpu": gpu_name(0),
           "gpu1": cupy.cuda.runtime.getDeviceProperties(1)["name"].decode(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args), "hidden": shape.hidden_size,
           "command": "python bench/tp_decode_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "env": {k: v for k, v in os.environ.items() if k.startswith(("NEURON_", "NCCL_"))}}
    log("ceilings: copy bandwidth per GPU")
    res["copy_gb_s"] = [copy_bandwidth_of(i) for i in (0, 1)]
    log(f"  {res['copy_gb_s']}")
    vocab = shape.vocab_size
    log("NCCL collective latency")
    try:
        res["collectives"] = collective_latency(shape.hidden_size, vocab)
        log(f"  {res['collectives']['rank0']}")
    except Exception as err:  # noqa: BLE001 - keep measuring the rest
        res["collectives"] = {"error": repr(err)}
        log(f"  FAILED: {err!r}")

    path = work / args.shape
    if not (path / "config.json").exists():
        log(f"writing {path}")
        res["checkpoint"] = write_checkpoint(path, shape, "bfloat16")
        log(f"  {res['checkpoint']}")
    res["roofline"] = roofline(shape, vocab, min(res["copy_gb_s"]) * 1e9)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"tp_decode_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save() -> None:  # after every phase: a later one that dies still leaves the earlier figures
        dest.write_text(json.dumps(res, indent=2, default=float) + "\n")
    prompt = np.random.default_rng(0).integers(3, vocab, args.prompt_tokens).tolist()
    log("through cortex: tp=1, then tp=2 on GPUs 0,1 of one neuron")
    try:
        res["stack"] = through_cortex(path, args.tokens, prompt, work)
    except Exception as err:  # noqa: BLE001
        res["stack"] = {"error": repr(err)}
        log(f"  FAILED: {err!r}")
    for key in ("tp1", "tp2"):
        if key in res.get("stack", {}):
            res["stack"][key]["tokens"] = res["stack"][key]["tokens"][:64]
    save()
    if not args.no_profile:
        log("profile of a TP=2 decode step (in-process ranks)")
        try:
            res["profile"] = profile_tp(path)
            r0 = res["profile"]["rank0"]
            log(f"  step {r0['step_ms']} ms, without collectives {r0['step_without_collectives_ms']:.3f} ms, "
                f"collectives alone {r0['collectives_only_ms']:.3f} ms")
        except Exception as err:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            res["profile"] = {"error": repr(err)}
            log(f"  FAILED: {err!r}")
        save()
    res["nccl_sweep"] = nccl_sweep(args.nccl_sweep, args.shape)
    try:
        text = table(res)
    except Exception as err:  # noqa: BLE001 - the JSON still gets written
        text = f"(table failed: {err!r})"
    print("\n" + text, flush=True)
    res["table"] = text
    save()
    log(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
