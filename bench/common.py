"""What every benchmark script shares: the commit measured, the GPU's name, device timing."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_result(out: Path, bench: str, result: dict) -> Path:
    """`result` as JSON in out/<bench>-<local time>.json (bench/results' naming); the path printed."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def commit() -> str:
    """BENCH_COMMIT or GIT_COMMIT when set (the device copy of the tree has no .git), else HEAD."""
    for key in ("BENCH_COMMIT", "GIT_COMMIT"):
        if os.environ.get(key):
            return os.environ[key]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_name(index: int = 0) -> str:
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(index)["name"].decode()


def time_ms(cp, fn, reps: int = 10, warmup: int = 2) -> float:
    """Median device time of fn() in ms (CUDA events on the current stream), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def copy_bandwidth(cp, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy on the current device, GB/s of bytes read plus written: the HBM
    ceiling every decode figure is compared with."""
    ms = _copy_ms(cp, nbytes)
    cp.get_default_memory_pool().free_all_blocks()  # the buffers died with _copy_ms's frame
    return 2 * nbytes / ms / 1e6


def _copy_ms(cp, nbytes: int) -> float:
    from cupy_backends.cuda.api import runtime
    src = cp.random.randint(0, 255, nbytes, dtype=cp.uint8)
    dst = cp.empty_like(src)
    return time_ms(cp, lambda: runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, runtime.memcpyDeviceToDevice,
                                                     cp.cuda.get_current_stream().ptr), reps=20)


def time_kernel_groups(cp, groups: dict, reps: int = 20) -> dict:
    """{name: (fn, bytes read)} -> {name: {ms, bytes, gb_s}}: each group captured as a CUDA graph and
    replayed, so launch gaps between its kernels count as they do in the decode step."""
    from neuron.model.cuda_graph import DecodeGraph

    timed = {}
    for name, (fn, read) in groups.items():
        graph = DecodeGraph(cp, fn)
        graph.capture()
        ms = time_ms(cp, graph.launch, reps=reps)
        timed[name] = {"ms": ms, "bytes": read, "gb_s": read / ms / 1e6 if read else None}
    return timed


def graph_ms(cp, fn, repeat: int = 10, reps: int = 10) -> float:
    """Device time of one fn() in ms, fn captured `repeat` times back to back in one CUDA graph and
    replayed: the kernels' own time with the gaps a decode turn's graph has, no Python launch cost.
    fn must be capturable (no host sync, no allocation outside the memory pool); raises if not."""
    stream, previous = cp.cuda.Stream(non_blocking=True), cp.cuda.get_current_stream()
    try:
        return _graph_ms(cp, stream, fn, repeat, reps)
    finally:
        previous.use()  # `with stream` would restore CuPy's stack, not a stream made current by use()


def _graph_ms(cp, stream, fn, repeat: int, reps: int) -> float:
    with stream:
        fn()  # warm-up outside the capture: module loads, kernel attributes, workspaces
        stream.synchronize()
        stream.begin_capture()
        try:
            for _ in range(repeat):
                fn()
        finally:
            graph = stream.end_capture()
        graph.upload(stream)
        return time_ms(cp, lambda: graph.launch(stream), reps=reps) / repeat
