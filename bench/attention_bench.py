"""Paged attention alone, per layer: the CUDA-core kernel (paged_attention.cu, one row per block)
beside the tensor-core one (paged_attention_mma.cu, tiles of 16 rows), for the 8B shape's heads.

    python bench/attention_bench.py [--device 0]

Cases: decode turns (one row per sequence) at 1 to 256 sequences and contexts 128 / 256 / 2,048 (each
beside the kernels with 256-key splits throughout, as before fine splits: the `_coarse` columns), and
prompt turns (a 512-row chunk at the end of a 4,096-token prompt; 16 prompts of 128 rows). Each is
timed inside a CUDA graph and printed beside its limit: the larger of its KV bytes (each key read
once) over the copy bandwidth and its FLOPs over the matmul rate, both measured in this run.
Writes attention_bench-<time>.json.

`--against REV` also builds the tensor-core kernels from the sources at git revision REV, or in the
folder REV (columns `..._at_<name>`), and records per case whether each gives the same bits as
today's (`same_bits`): for a kernel change that should only be faster. Today's launcher runs both,
so the kernels' arguments must not have changed between the two.
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit, copy_bandwidth, gpu_name, graph_ms, write_result  # noqa: E402
from bench.engine_bench import matmul_rate  # noqa: E402
from common.dtypes import DTYPES  # noqa: E402
from neuron.kernels.paged_attention import FINE_KEYS, PagedAttentionCuda, query_tiles  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16   # Llama-3.1-8B
BF16 = DTYPES["bfloat16"]


def case(cp, name: str, chunks: list[tuple[int, int]], kernels: dict, per_row: dict, bandwidth: float,
         tflops: float) -> dict:
    """chunks: (start position, rows) per sequence; every sequence's keys up to its chunk's end are cached."""
    rng = np.random.default_rng(0)
    max_blocks = max(-(-(start + rows) // BLOCK) for start, rows in chunks)
    num_blocks = max_blocks * len(chunks) + 1
    k = cp.asarray(rng.standard_normal((num_blocks, BLOCK, KV_HEADS, HEAD_DIM)).astype(BF16))
    v = cp.asarray(rng.standard_normal((num_blocks, BLOCK, KV_HEADS, HEAD_DIM)).astype(BF16))
    tables = rng.permutation(num_blocks)[: max_blocks * len(chunks)].reshape(len(chunks), max_blocks).astype(np.int32)
    counts = [rows for _, rows in chunks]
    owner = np.repeat(np.arange(len(chunks)), counts)
    lens = np.concatenate([np.arange(start, start + rows) for start, rows in chunks]).astype(np.int32) + 1
    n = len(lens)
    q = cp.asarray(rng.standard_normal((n, Q_HEADS, HEAD_DIM)).astype(BF16))
    row_tables, row_lens = cp.asarray(np.ascontiguousarray(tables[owner])), cp.asarray(lens)
    first, count = query_tiles(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    tiles = (cp.asarray(first), cp.asarray(count))
    out = cp.empty_like(q)
    kv_bytes = sum(2 * (start + rows) * KV_HEADS * HEAD_DIM * 2 for start, rows in chunks)
    flops = 4 * Q_HEADS * HEAD_DIM * float(lens.sum())
    limit = max(kv_bytes / bandwidth / 1e6, flops / tflops / 1e9)
    row = {"case": name, "rows": n, "sequences": len(chunks), "kv_bytes": kv_bytes, "flops": flops,
           "limit_ms": limit}
    outputs = {}
    for label, kernel in kernels.items():
        splits = kernel.num_splits(int(lens.max()))
        work = kernel.workspace(n, Q_HEADS, splits)
        extra = {"tiles": tiles} if kernel.tiled else {}
        row[f"{label}_ms"] = graph_ms(cp, lambda: kernel.decode(q, k, v, row_tables, row_lens, HEAD_DIM ** -0.5, 0,
                                                                splits, out=out, workspace=work, **extra))
        outputs[label] = out.copy()
    if all(rows == 1 for _, rows in chunks):
        # decode rows as graph turns launch them (no tiles): the group's heads packed into one
        # warp's mma rows, and one warp per head; what serves takes the first from PACK_MIN_ROWS rows
        for label, kernel in per_row.items():
            splits = kernel.num_splits(int(lens.max()))
            work = kernel.workspace(n, Q_HEADS, splits)
            row[f"{label}_ms"] = graph_ms(cp, lambda: kernel.decode(q, k, v, row_tables, row_lens,
                                                                    HEAD_DIM ** -0.5, 0, splits, out=out,
                                                                    workspace=work))
            outputs[label] = out.copy()
    # a kernel built from another revision's sources against today's: the same bits, or not
    same = {label: bool((outputs[label].view(cp.uint16) == outputs[label.split("_at_")[0]].view(cp.uint16)).all())
            for label in outputs if "_at_" in label and label.split("_at_")[0] in outputs}
    if same:
        row["same_bits"] = same
    print(f"{name:<34} rows {n:>5}  " + "  ".join(f"{key[:-3]} {value:.3f} ms" for key, value in row.items()
                                                  if key.endswith("_ms") and key != "limit_ms")
          + f"  (limit {limit:.3f} ms)" + (f"  same bits: {same}" if same else ""), flush=True)
    return row


@contextlib.contextmanager
def kernel_sources_at(against: str):
    """The kernels built inside from other sources: `against` a folder of .cu/.cuh files (what a
    machine without the git history is given) or a git revision of this repository."""
    import neuron.kernels

    saved = neuron.kernels.KERNEL_DIR
    with tempfile.TemporaryDirectory() as tmp:
        if Path(against).is_dir():
            folder = Path(against)
        else:
            folder = Path(tmp)
            listing = subprocess.run(["git", "ls-tree", "--name-only", against, "neuron/kernels/"], cwd=ROOT,
                                     check=True, capture_output=True, text=True).stdout.split()
            for path in (p for p in listing if p.endswith((".cu", ".cuh"))):
                source = subprocess.run(["git", "show", f"{against}:{path}"], cwd=ROOT, check=True,
                                        capture_output=True, text=True).stdout
                (folder / Path(path).name).write_text(source)
        neuron.kernels.KERNEL_DIR = folder
        try:
            yield
        finally:
            neuron.kernels.KERNEL_DIR = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--split-keys", default="",
                        help="comma-separated split sizes to try on the tensor-core kernel beside the default 256 "
                             "(a candidate, not what serves: a row's bits depend on it)")
    parser.add_argument("--fine-keys", default="",
                        help="comma-separated fine split sizes (over the first 256 keys) to try beside the default "
                             f"{FINE_KEYS} and none")
    parser.add_argument("--against", default="", metavar="REV",
                        help="also time the tensor-core kernels built from git revision REV (or the .cu/.cuh "
                             "files in folder REV) and compare their bits")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    import cupy as cp
    cp.cuda.Device(args.device).use()
    bandwidth, tflops = copy_bandwidth(cp), matmul_rate(cp)
    print(f"copy {bandwidth:.0f} GB/s, matmul {tflops:.0f} TFLOP/s", flush=True)
    group = Q_HEADS // KV_HEADS
    kernels = {"cuda_cores": PagedAttentionCuda("bfloat16", HEAD_DIM, group, tensor_cores=False),
               "tensor_cores": PagedAttentionCuda("bfloat16", HEAD_DIM, group)}
    # the kernels as before fine splits: 256-key splits throughout
    kernels["tensor_cores_coarse"] = PagedAttentionCuda("bfloat16", HEAD_DIM, group, fine_keys=None)
    for keys in [int(k) for k in args.split_keys.split(",") if k]:
        kernels[f"tensor_cores_split{keys}"] = PagedAttentionCuda("bfloat16", HEAD_DIM, group, split_keys=keys,
                                                                  fine_keys=None)
    per_row = {"per_row_packed": PagedAttentionCuda("bfloat16", HEAD_DIM, group, pack_min_rows=1),
               "per_row_unpacked": PagedAttentionCuda("bfloat16", HEAD_DIM, group, pack_heads=False),
               "per_row_packed_coarse": PagedAttentionCuda("bfloat16", HEAD_DIM, group, pack_min_rows=1,
                                                           fine_keys=None),
               "per_row_unpacked_coarse": PagedAttentionCuda("bfloat16", HEAD_DIM, group, pack_heads=False,
                                                             fine_keys=None)}
    for keys in [int(k) for k in args.fine_keys.split(",") if k]:
        per_row[f"per_row_packed_fine{keys}"] = PagedAttentionCuda("bfloat16", HEAD_DIM, group, pack_min_rows=1,
                                                                   fine_keys=keys)
        per_row[f"per_row_unpacked_fine{keys}"] = PagedAttentionCuda("bfloat16", HEAD_DIM, group, pack_heads=False,
                                                                     fine_keys=keys)
    if args.against:
        name = Path(args.against).name if Path(args.against).is_dir() else args.against
        with kernel_sources_at(args.against):
            kernels[f"tensor_cores_at_{name}"] = PagedAttentionCuda("bfloat16", HEAD_DIM, group)
            per_row[f"per_row_packed_at_{name}"] = PagedAttentionCuda("bfloat16", HEAD_DIM, group,
                                                                      pack_min_rows=1)
            per_row[f"per_row_unpacked_at_{name}"] = PagedAttentionCuda("bfloat16", HEAD_DIM, group,
                                                                        pack_heads=False)
    cases = [(f"decode {b} x context {ctx}", [(ctx - 1, 1)] * b) for ctx in (128, 256, 2048)
             for b in (1, 4, 8, 16, 32, 64, 256)]
    cases += [("prompt chunk 512 rows at 3584", [(3584, 512)]),
              ("prompt chunk 256 rows at 3840", [(3840, 256)]),
              ("16 prompts x 128 rows", [(0, 128)] * 16),
              ("chunk 512 at 3584 + 64 decode at 256", [(3584, 512)] + [(255, 1)] * 64)]
    rows = [case(cp, name, chunks, kernels, per_row, bandwidth, tflops) for name, chunks in cases]
    result = {"bench": "attention_bench", "commit": commit(), "against": args.against or None,
              "gpu": gpu_name(args.device), "copy_gb_s": bandwidth, "matmul_tflops": tflops,
              "heads": [Q_HEADS, KV_HEADS, HEAD_DIM], "rows": rows}
    write_result(args.out, "attention_bench", result)


if __name__ == "__main__":
    main()
