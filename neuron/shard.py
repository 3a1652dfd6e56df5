"""A Shard: one model's weights (or one TP rank's slice of them) on one device, with its paged KV
cache, its serving engine (scheduler, block manager, runner), tokenizer and generation defaults.
Built and used only on its device's worker thread."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import structlog

from common.dtypes import DTYPES
from common.dtypes import SAFETENSORS_ITEMSIZE as DTYPE_BYTES
from common.errors import Cancelled, InvalidArgument, ResourceExhausted
from common.units import human_bytes as _size

from .collectives import Communicator, SingleRank
from .device import resolve_dtype
from .engine.core import ShardEngine
from .engine.kv_blocks import KVBlockManager
from .engine.kv_cache import KvSizing, PagedKvCache, bytes_per_block, size_pool
from .engine.scheduler import Scheduler
from .engine.settings import EngineSettings
from .loader import Checkpoint
from .model.config import ModelConfig
from .model.llama import LlamaModel
from .model.sharding import TpLayout, check_config_against_headers, expected_shapes, parameter_reads
from .runner.model_runner import ModelRunner
from .tokenizer import Tokenizer

log = structlog.get_logger(__name__)

DEFAULT_MAX_CONTEXT = 4096
GPU_WORKSPACE_BYTES = 512 << 20  # activations, logits and cuBLAS workspace beside the weights
GPU_POOL_SEQUENCES = 4  # GPU KV pool cap, in units of max_seqs x max_context tokens
GRAPH_POOL_BUDGET_BYTES = 2 << 30  # decode graphs stop being captured past this much pool (262-272 MiB measured)


@dataclass
class LoadRequest:
    directory: Path
    model: str
    dtype: str = ""
    max_context: int = 0
    max_seqs: int = 0          # requests running at once; 0: the neuron's setting
    tp_rank: int = 0
    tp_size: int = 1
    group_id: str = ""


@dataclass
class LoadProgress:
    stage: str
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    gb_per_s: float


@dataclass
class Shard:
    handle: int
    request: LoadRequest
    config: ModelConfig
    dtype: str
    layout: TpLayout
    model: LlamaModel
    kv: PagedKvCache
    engine: ShardEngine
    max_seqs: int
    tokenizer: Tokenizer | None
    generation_config: dict
    weight_bytes: int
    num_parameters: int
    load_seconds: float
    comm: Communicator = field(default_factory=SingleRank)
    warm_up_seconds: float = 0.0
    followers: object = None     # groups.Followers on a TP leader: handed every turn before it runs

    @property
    def nbytes(self) -> int:
        return self.weight_bytes + self.kv.nbytes

    def release_graphs(self) -> None:
        """Free every captured CUDA graph of the shard: the model's and the runner's decode graphs
        (before the communicator goes: NCCL waits for graphs that hold it)."""
        self.model.release_graphs()
        self.engine.runner.release_graphs()

    def eos_ids(self) -> set[int]:
        if self.tokenizer is not None:
            return set(self.tokenizer.eos_token_ids)
        eos = self.generation_config.get("eos_token_id")
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def _read_generation_config(directory: Path) -> dict:
    path = directory / "generation_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"{path} is not valid JSON: {err}") from None


def _check_shapes(config: ModelConfig, ckpt: Checkpoint) -> None:
    check_config_against_headers(config, {n: m.shape for n, m in ckpt.tensors.items()}, str(ckpt.directory))
    problems = []
    for name, shape in expected_shapes(config).items():
        meta = ckpt.tensors.get(name)
        if meta is None:
            problems.append(f"{name} is missing")
        elif meta.shape != shape:
            problems.append(f"{name} has shape {list(meta.shape)}, config.json implies {list(shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InvalidArgument(f"checkpoint {ckpt.directory} does not match its config.json: {'; '.join(problems[:5])}{more}")


@dataclass
class LoadPlan:
    """What a load will read and allocate, computed from config.json and safetensors headers."""
    config: ModelConfig
    dtype: str
    layout: TpLayout
    checkpoint: Checkpoint
    reads: dict
    source_bytes: int
    num_parameters: int
    weight_bytes: int
    max_context: int
    kv_bytes_per_slot: int       # one sequence of max_context tokens (what cortex's placement counts)
    kv_bytes_per_token: int
    workspace_bytes: int

    def describe(self) -> str:
        c = self.config
        return (f"weights: {self.num_parameters:,} parameters on this rank x {DTYPES[self.dtype].itemsize} bytes "
                f"({self.dtype}) = {_size(self.weight_bytes)}; KV per sequence: 2 x {c.num_layers} layers x "
                f"{self.layout.local_kv_heads} kv heads x {self.max_context} tokens x {c.head_dim} head_dim x "
                f"{DTYPES[self.dtype].itemsize} bytes = {_size(self.kv_bytes_per_slot)}; workspace {_size(self.workspace_bytes)}")


def plan_load(directory: Path, dtype_request: str, device_kind: str, max_context: int = 0,
              tp_rank: int = 0, tp_size: int = 1) -> LoadPlan:
    config = ModelConfig.from_dir(directory)
    dtype = resolve_dtype(dtype_request, config.dtype, device_kind)
    layout = TpLayout.build(config, tp_rank, tp_size)
    ckpt = Checkpoint(directory)
    _check_shapes(config, ckpt)
    reads = parameter_reads(config, layout, "lm_head.weight" in ckpt.tensors)
    source_bytes = sum(ckpt.read_bytes(r) for rs in reads.values() for r in rs)
    num_parameters = sum(ckpt.read_bytes(r) // DTYPE_BYTES.get(ckpt.tensors[r.name].dtype, 4)
                         for rs in reads.values() for r in rs)
    max_context = max_context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    if max_context > config.max_position_embeddings:
        raise InvalidArgument(f"max_context {max_context} exceeds the model's max_position_embeddings "
                              f"{config.max_position_embeddings}")
    itemsize = DTYPES[dtype].itemsize
    per_token = bytes_per_block(config.num_layers, layout.local_kv_heads, 1, config.head_dim, itemsize)
    workspace = GPU_WORKSPACE_BYTES if device_kind == "cuda" else 0
    return LoadPlan(config, dtype, layout, ckpt, reads, source_bytes, num_parameters, num_parameters * itemsize,
                    max_context, per_token * max_context, per_token, workspace)


def size_kv(plan: LoadPlan, settings: EngineSettings, max_seqs: int, device_kind: str, free_bytes: int) -> KvSizing:
    """The block pool: `kv_memory_fraction` of what is left after weights and workspace, capped so
    small models stay small: on a CPU at max_seqs sequences of max_context tokens, on a GPU at
    GPU_POOL_SEQUENCES times that (the surplus holds cached prefixes). Without the GPU cap a tiny
    model took the whole device (134 GB, 32M blocks, 44 s to set up) and left none for other shards."""
    room = free_bytes - plan.weight_bytes - plan.workspace_bytes
    cap = max_seqs * plan.max_context * (1 if device_kind == "cpu" else GPU_POOL_SEQUENCES)
    return size_pool(room, settings.kv_memory_fraction, plan.kv_bytes_per_token * settings.block_size,
                     settings.block_size, plan.max_context, cap)


def load_shard(backend, req: LoadRequest, handle: int, progress: Callable[[LoadProgress], None],
               cancelled: threading.Event, comm: Communicator | None = None,
               settings: EngineSettings = EngineSettings()) -> Shard:
    """Read this rank's weights onto the backend's device and allocate the KV cache.
    Raises before allocating when memory is short; frees everything it took on any failure."""
    started = time.perf_counter()
    plan = plan_load(req.directory, req.dtype, backend.kind, req.max_context, req.tp_rank, req.tp_size)
    config, dtype, layout, ckpt, reads = plan.config, plan.dtype, plan.layout, plan.checkpoint, plan.reads
    np_dtype = DTYPES[dtype]
    tokenizer = Tokenizer.from_dir(req.directory)
    generation_config = _read_generation_config(req.directory)

    # Size everything before the first allocation, so a refusal leaves nothing behind.
    total, free = backend.memory()
    max_seqs = req.max_seqs or settings.max_seqs
    sizing = size_kv(plan, settings, max_seqs, backend.kind, free)
    if sizing.num_blocks < sizing.blocks_per_sequence:
        need = plan.weight_bytes + plan.workspace_bytes + int(sizing.blocks_per_sequence * sizing.block_bytes
                                                              / settings.kv_memory_fraction)
        raise ResourceExhausted(
            f"{req.model} needs {_size(need)} on device {backend.spec.id} ({plan.describe()}; the KV cache gets "
            f"{settings.kv_memory_fraction:g} of what is left), but only {_size(free)} of {_size(total)} is free; "
            "free memory, use a smaller dtype or max_context, or shard with tensor parallelism")
    max_context, source_bytes = plan.max_context, plan.source_bytes

    xp = backend.xp
    params: dict = {}
    uploader = None
    try:
        if backend.kind == "cuda":
            from .upload import DeviceUploader
            uploader = DeviceUploader(xp, ckpt)  # file -> pinned buffer -> device, reads overlapping copies
        done_bytes, done_tensors = 0, 0
        total_tensors = sum(len(rs) for rs in reads.values())
        for name, rs in reads.items():
            if cancelled.is_set():
                raise Cancelled("load cancelled by the caller")
            if uploader is not None and uploader.can_load(rs, np_dtype):
                params[name], nbytes = uploader.load(rs, np_dtype)
                done_bytes += nbytes
            else:
                parts = [ckpt.read(r) for r in rs]
                host = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
                params[name] = xp.asarray(host.astype(np_dtype, copy=False))
                done_bytes += sum(p.nbytes for p in parts)
            done_tensors += len(rs)
            elapsed = time.perf_counter() - started
            progress(LoadProgress("reading", done_bytes, source_bytes, done_tensors, total_tensors,
                                  done_bytes / elapsed / 1e9 if elapsed > 0 else 0.0))
        if uploader is not None:
            uploader.close()  # every copy has landed
            log.info("weights uploaded", model=req.model, **{k: round(v, 3) for k, v in uploader.stats.items()})
            uploader = None
        read_seconds = time.perf_counter() - started
        progress(LoadProgress("kv-cache", done_bytes, source_bytes, done_tensors, total_tensors,
                              done_bytes / read_seconds / 1e9 if read_seconds > 0 else 0.0))
        kv = PagedKvCache(xp, config.num_layers, sizing.num_blocks, sizing.block_size, layout.local_kv_heads,
                          config.head_dim, np_dtype, max_context)
        # The fused engine (model/fused.py) runs on the slot-based cache only; the serving engine
        # takes the plain path over the paged cache.
        model = LlamaModel(config, layout, params, xp, comm or SingleRank(), max_context, fused="off",
                           one_row_gemv=settings.one_row_gemv)
        backend.synchronize()
    except Exception as err:
        if uploader is not None:
            uploader.close()
        params.clear()
        backend.release_cached()
        if _is_out_of_memory(err):
            raise ResourceExhausted(f"out of device memory while loading {req.model} on device {backend.spec.id}: {err}") from None
        raise
    finally:
        ckpt.close()
    comm = comm or SingleRank()
    bound = None
    if layout.size > 1 and hasattr(comm, "wait"):
        def bound():  # NCCL is asynchronous: the turn's collectives are waited for under the step deadline
            comm.wait(comm.step_timeout)
    runner = ModelRunner(model, kv, config.vocab_size, bound=bound)
    engine, warm_up = _start_engine(backend, runner, layout, max_seqs, settings, req.model, progress)
    return Shard(handle, req, config, dtype, layout, model, kv, engine, max_seqs, tokenizer,
                 generation_config, plan.weight_bytes, plan.num_parameters, time.perf_counter() - started, comm,
                 warm_up)


def _start_engine(backend, runner: ModelRunner, layout, max_seqs: int, settings: EngineSettings, model_name: str,
                  progress) -> tuple[ShardEngine, float]:
    """The shard's engine over `runner`, its decode graphs captured and one warm-up turn run; the
    warm-up's seconds."""
    kv = runner.kv
    runner.graphs = _capture_decode_graphs(backend, runner.model, kv, layout, max_seqs, settings, progress)
    scheduler = Scheduler(KVBlockManager(kv.num_blocks, kv.block_size, settings.prefix_caching),
                          settings.max_batched_tokens, max_seqs, settings.max_waiting, settings.max_prefill_chunk)
    engine = ShardEngine(scheduler, runner, layout.size > 1, settings.async_scheduling)
    try:
        warm_up = _warm_up(backend, engine, layout, min(settings.max_batched_tokens, kv.max_context - 1),
                           model_name, progress)
    except BaseException:
        runner.release_graphs()   # their pool is not returned by being garbage (DecodeGraphs.release)
        raise
    return engine, warm_up


def _warm_up(backend, engine: ShardEngine, layout, tokens: int, model: str, progress) -> float:
    """One full prompt turn on a single-GPU shard (ShardEngine.warm_up); its seconds, 0 when none ran.
    Not on a TP rank, whose turn runs collectives with ranks that are not in a turn at load; not on
    a CPU (nothing to compile)."""
    if backend.kind != "cuda" or layout.size > 1:
        return 0.0
    progress(LoadProgress("warm-up", 0, 0, 0, 0, 0.0))
    seconds = engine.warm_up(tokens)
    log.info("warm-up turn done", model=model, tokens=tokens, seconds=round(seconds, 3))
    return seconds


def _capture_decode_graphs(backend, model, kv: PagedKvCache, layout, max_seqs: int, settings: EngineSettings,
                           progress):
    """CUDA graphs of decode turns per batch-size bucket, or None: not asked for, not a GPU, a TP rank
    (a rank's warm-up would run collectives the others do not run at that moment), no paged decode
    kernel, or a capture that failed (then decode turns run eagerly)."""
    from .runner.cuda_graphs import DecodeGraphs

    if backend.kind != "cuda" or not settings.cuda_graphs or layout.size > 1 or model.decode_attention is None:
        return None
    progress(LoadProgress("cuda-graphs", 0, 0, 0, 0, 0.0))
    mixed_chunk = settings.max_prefill_chunk if settings.mixed_graphs else 0
    graphs = DecodeGraphs(model, kv, max_seqs, capture=True, mixed_chunk=mixed_chunk)
    try:
        report = graphs.prepare(budget_bytes=GRAPH_POOL_BUDGET_BYTES)
    except Exception as err:  # noqa: BLE001 - graphs are an optimisation: decode still runs eagerly
        log.warning("decode graph capture failed; decode turns run eagerly", error=f"{type(err).__name__}: {err}")
        graphs.release()
        return None
    progress(LoadProgress("cuda-graphs", report.pool_bytes, GRAPH_POOL_BUDGET_BYTES, len(report.sizes),
                          len(graphs.sizes), 0.0))
    return graphs


def _is_out_of_memory(err: Exception) -> bool:
    return type(err).__name__ in ("OutOfMemoryError", "MemoryError") or "out of memory" in str(err).lower()

