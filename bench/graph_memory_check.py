"""Where a load/drop cycle's device memory goes, per variant of the decode graphs (one GPU):

    python bench/graph_memory_check.py [--variants on,off,nocap] [--cycles 5]

on: mixed graphs captured (the default settings); off: decode graphs only; nocap: mixed buckets
built and warmed up but not captured. Each cycle loads the load/drop test's checkpoint
(bench/gpu_checks.py), generates, drops, and prints the free memory lost since the first cycle,
whether the DecodeGraphs object outlived the drop (a weak reference), the graphs' private pool
size, the backend pool and the number of live CuPy Graph objects, and writes them to
bench/results/graph_memory_check-<time>.json with the commit. bench/NOTES.md, session 18: before
DecodeGraphs.release the drift grew by the private pool's size every cycle.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from bench.gpu_checks import device_free, drop, generate, load, make_leak_checkpoint  # noqa: E402
from neuron.device import DeviceSpec  # noqa: E402
from neuron.engine.settings import EngineSettings  # noqa: E402
from neuron.runner import cuda_graphs  # noqa: E402
from neuron.worker import CallJob, DeviceWorker  # noqa: E402


def warm_only(original):
    def capture(self, bucket):
        if bucket.chunk:
            self._forward(bucket)   # what the capture's warm-up runs, without the capture
        else:
            original(self, bucket)
    return capture


def live_graphs() -> int:
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "Graph" and type(o).__module__.startswith("cupy"))


def check(variant: str, path: Path, cycles: int) -> list[dict]:
    original = cuda_graphs.DecodeGraphs._capture
    if variant == "nocap":
        cuda_graphs.DecodeGraphs._capture = warm_only(original)
    worker = DeviceWorker(DeviceSpec("0", "cuda", 0), settings=EngineSettings(mixed_graphs=variant != "off"))
    worker.start()
    try:
        handle, shard = load(worker, path, "bfloat16", max_context=1024)   # one-time costs first
        del shard
        generate(worker, handle, [1, 2, 3], 4)
        drop(worker, handle)
        base = device_free(worker)
        rows = []
        for cycle in range(cycles):
            handle, shard = load(worker, path, "bfloat16", max_context=1024)
            graphs = shard.engine.runner.graphs
            alive, report = weakref.ref(graphs), graphs.report
            pool_mib = report.pool_bytes >> 20
            del graphs, shard
            generate(worker, handle, [1, 2, 3], 4)
            drop(worker, handle)
            free = device_free(worker)
            used, total = worker.submit(CallJob(lambda b: (b.pool.used_bytes(), b.pool.total_bytes()))).result()
            row = {"variant": variant, "cycle": cycle, "drift_bytes": base - free, "graphs_alive": alive() is not None,
                   "private_pool_bytes": report.pool_bytes, "buckets": report.sizes, "mixed_buckets": report.mixed_sizes,
                   "backend_used_bytes": used, "backend_total_bytes": total, "live_cupy_graphs": live_graphs()}
            rows.append(row)
            print(f"{variant} cycle {cycle}: drift {(base - free) / 2**20:+.1f} MiB, graphs alive "
                  f"{row['graphs_alive']}, private pool {pool_mib} MiB (buckets {report.sizes}, mixed "
                  f"{report.mixed_sizes}), backend pool used {used >> 20} of {total >> 20} MiB, live CuPy graphs "
                  f"{row['live_cupy_graphs']}", flush=True)
        return rows
    finally:
        worker.stop()
        cuda_graphs.DecodeGraphs._capture = original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="on,off,nocap")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    directory = Path(tempfile.gettempdir()) / "graph-memory-check"
    directory.mkdir(parents=True, exist_ok=True)
    path = make_leak_checkpoint(directory)
    rows = [row for variant in args.variants.split(",") for row in check(variant, path, args.cycles)]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"graph_memory_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"commit": commit(), "cycles": args.cycles, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
