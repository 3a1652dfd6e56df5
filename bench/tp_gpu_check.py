"""Tensor parallelism on GPUs through the whole stack (issue 4's GPU acceptance).

For each layout — one neuron holding GPUs 0 and 1, and two neuron processes with one GPU each —
cortex loads every checkpoint at TP=1 and at TP=2 (NCCL) in bf16, and compares: logits cosine
(TP=2 vs TP=1, > 0.999) and 64 greedy tokens (identical). Writes bench/results/tp_gpu_<commit>.json.

    python bench/tp_gpu_check.py [--out DIR]      # needs 2 GPUs and CuPy
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit, gpu_name  # noqa: E402
from cortex.client import CortexClient  # noqa: E402
from cortex.local import cortex_args, neuron_args, start_server  # noqa: E402
from cortex.tiny_checkpoint import LlamaShape, write_checkpoint  # noqa: E402

FIXTURES = ["llama2", "llama3", "llama_sharded", "mistral", "qwen2", "qwen3"]
# A mid-size shape so the all-reduces carry real sums (hidden 2048, 8 layers, GQA 16/4).
MID = LlamaShape(hidden_size=2048, intermediate_size=5632, num_layers=8, num_heads=16, num_kv_heads=4)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def greedy(client: CortexClient, name: str, prompt: list[int], n: int) -> list[int]:
    return [t for c in client.generate(name, token_ids=prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
            for t in c.token_ids]


DTYPE = "bfloat16"
DEVICES = {"one-neuron": ["0,1"], "two-neurons": ["0", "1"]}


def check_model(client: CortexClient, path: str, label: str, prompt: list[int]) -> dict:
    results = {}
    for tp in (1, 2):
        name = f"{label}-tp{tp}"
        started = time.perf_counter()
        info = client.load(path, name, dtype=DTYPE, tp=tp, max_context=128)
        load_s = time.perf_counter() - started
        logits = client.forward(name, prompt, all_positions=True)
        tokens = greedy(client, name, prompt, 64)
        started = time.perf_counter()
        greedy(client, name, prompt, 64)
        results[tp] = dict(logits=logits, tokens=tokens, load_s=load_s, gen64_s=time.perf_counter() - started,
                           placement=[(p.rank, p.node, p.device) for p in info.placement])
        client.unload(name)
    row = {
        "model": label, "cosine_tp2_vs_tp1": cosine(results[2]["logits"], results[1]["logits"]),
        "greedy64_equal": results[2]["tokens"] == results[1]["tokens"],
        "first_divergence": next((i for i, (a, b) in enumerate(zip(results[1]["tokens"], results[2]["tokens"]))
                                  if a != b), None),
        "placement_tp2": results[2]["placement"],
        "tok_per_s_tp1": 64 / results[1]["gen64_s"], "tok_per_s_tp2": 64 / results[2]["gen64_s"],
    }
    row["pass"] = row["cosine_tp2_vs_tp1"] > 0.999 and row["greedy64_equal"]
    return row


def run_layout(layout: str, roots: list[Path], models: list[tuple[str, str, list[int]]], work: Path) -> list[dict]:
    servers = []
    try:
        for i, devices in enumerate(DEVICES[layout]):
            servers.append(start_server(f"{layout}-{i}", "neuron.cli", neuron_args(devices, roots), work, timeout=120))
        cortex = start_server("cortex", "cortex.cli", cortex_args([s.address for s in servers], poll_seconds=1), work)
        servers.append(cortex)
        time.sleep(2)
        with CortexClient(cortex.address, timeout=300) as client:
            rows = []
            for path, label, prompt in models:
                row = check_model(client, path, label, prompt)
                row["layout"] = layout
                print(f"{layout:12s} {label:14s} cos={row['cosine_tp2_vs_tp1']:.6f} greedy64_equal="
                      f"{row['greedy64_equal']} first_divergence={row['first_divergence']} tp1={row['tok_per_s_tp1']:.0f} tok/s tp2={row['tok_per_s_tp2']:.0f} tok/s",
                      flush=True)
                rows.append(row)
            return rows
    finally:
        for s in reversed(servers):
            s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--cpu", action="store_true", help="dry run on cpu:0/cpu:1 in float32 (checks the script)")
    parser.add_argument("--layouts", default="one-neuron,two-neurons", help="comma-separated subset")
    parser.add_argument("--models", default="", help="comma-separated subset of the fixtures and mid-2048x8")
    args = parser.parse_args()
    global DTYPE
    if args.cpu:
        DTYPE = "float32"
        DEVICES.update({"one-neuron": ["cpu:0,cpu:1"], "two-neurons": ["cpu:0", "cpu:0"]})
    work = Path(tempfile.mkdtemp(prefix="tp-gpu-"))
    mid = work / "models" / "mid"
    write_checkpoint(mid, MID if not args.cpu else LlamaShape(), dtype="bfloat16", seed=1)
    fixtures = ROOT / "tests" / "fixtures"
    models = []
    for name in FIXTURES:
        ref = np.load(fixtures / "reference" / f"{name}.npz")
        models.append((str(fixtures / "models" / name), name, [int(t) for t in ref["prompt_ids"]]))
    models.append((str(mid), "mid-2048x8", list(range(5, 40))))
    if args.models:
        keep = set(args.models.split(","))
        models = [m for m in models if m[1] in keep]
    rows = []
    for layout in [x for x in args.layouts.split(",") if x]:
        rows += run_layout(layout, [fixtures / "models", work / "models"], models, work)
    gpu = "cpu dry run"
    if not args.cpu:
        gpu = gpu_name(0)
    report = {"commit": commit(), "gpu": gpu, "dtype": DTYPE,
              "command": "python bench/tp_gpu_check.py " + " ".join(sys.argv[1:]), "rows": rows,
              "all_pass": all(r["pass"] for r in rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tp_gpu_{'cpu_' if args.cpu else ''}{report['commit'][:12]}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"all pass: {report['all_pass']}; wrote {path}")


if __name__ == "__main__":
    main()
