"""A Shard: one model's weights (or one TP rank's slice of them) on one device, with its KV cache,
tokenizer and generation defaults. Built and used only on its device's worker thread."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from synapse.errors import Cancelled, InvalidArgument, ResourceExhausted

from .collectives import Communicator, SingleRank
from .device import DTYPES, resolve_dtype
from .kv_cache import KvCache
from .loader import DTYPE_BYTES, Checkpoint
from .model.config import ModelConfig
from .model.llama import LlamaModel
from .model.sharding import TpLayout, expected_shapes, parameter_reads
from .tokenizer import Tokenizer

DEFAULT_MAX_CONTEXT = 4096
DEFAULT_KV_SLOTS = 4
GPU_WORKSPACE_BYTES = 512 << 20  # activations, logits and cuBLAS workspace beside the weights


@dataclass
class LoadRequest:
    directory: Path
    model: str
    dtype: str = ""
    max_context: int = 0
    kv_slots: int = 0
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
    kv: KvCache
    tokenizer: Tokenizer | None
    generation_config: dict
    weight_bytes: int
    num_parameters: int
    load_seconds: float
    comm: Communicator = field(default_factory=SingleRank)

    @property
    def nbytes(self) -> int:
        return self.weight_bytes + self.kv.nbytes

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


def load_shard(backend, req: LoadRequest, handle: int, progress: Callable[[LoadProgress], None],
               cancelled: threading.Event, comm: Communicator | None = None) -> Shard:
    """Read this rank's weights onto the backend's device and allocate the KV cache.
    Raises before allocating when memory is short; frees everything it took on any failure."""
    started = time.perf_counter()
    config = ModelConfig.from_dir(req.directory)
    dtype = resolve_dtype(req.dtype, config.dtype, backend.kind)
    np_dtype = DTYPES[dtype]
    layout = TpLayout.build(config, req.tp_rank, req.tp_size)
    ckpt = Checkpoint(req.directory)
    _check_shapes(config, ckpt)
    reads = parameter_reads(config, layout, "lm_head.weight" in ckpt.tensors)
    tokenizer = Tokenizer.from_dir(req.directory)
    generation_config = _read_generation_config(req.directory)

    # Size everything before the first allocation, so a refusal leaves nothing behind.
    source_bytes = sum(ckpt.read_bytes(r) for rs in reads.values() for r in rs)
    num_parameters = sum(ckpt.read_bytes(r) // _itemsize(ckpt, r) for rs in reads.values() for r in rs)
    weight_bytes = num_parameters * np_dtype.itemsize
    max_context = req.max_context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    if max_context > config.max_position_embeddings:
        raise InvalidArgument(f"max_context {max_context} exceeds the model's max_position_embeddings "
                              f"{config.max_position_embeddings}")
    per_slot = KvCache.bytes_per_slot(config.num_layers, layout.local_kv_heads, max_context, config.head_dim, np_dtype.itemsize)
    total, free = backend.memory()
    workspace = GPU_WORKSPACE_BYTES if backend.kind == "cuda" else 0
    room_for_kv = free - weight_bytes - workspace
    if room_for_kv < per_slot:
        raise ResourceExhausted(
            f"{req.model} needs {_gib(weight_bytes + per_slot + workspace)} on device {backend.spec.id} "
            f"(weights {_gib(weight_bytes)} as {dtype} + KV cache for one sequence of {max_context} tokens "
            f"{_gib(per_slot)} + workspace {_gib(workspace)}), but only {_gib(free)} of {_gib(total)} is free; "
            "free memory, use a smaller dtype or max_context, or shard with tensor parallelism")
    slots = min(req.kv_slots or DEFAULT_KV_SLOTS, room_for_kv // per_slot)

    xp = backend.xp
    params: dict = {}
    try:
        done_bytes, done_tensors = 0, 0
        total_tensors = sum(len(rs) for rs in reads.values())
        for name, rs in reads.items():
            if cancelled.is_set():
                raise Cancelled("load cancelled by the caller")
            parts = [ckpt.read(r) for r in rs]
            host = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            params[name] = xp.asarray(host.astype(np_dtype, copy=False))
            done_bytes += sum(p.nbytes for p in parts)
            done_tensors += len(rs)
            elapsed = time.perf_counter() - started
            progress(LoadProgress("reading", done_bytes, source_bytes, done_tensors, total_tensors,
                                  done_bytes / elapsed / 1e9 if elapsed > 0 else 0.0))
        progress(LoadProgress("kv-cache", done_bytes, source_bytes, done_tensors, total_tensors, 0.0))
        kv = KvCache(xp, config.num_layers, slots, layout.local_kv_heads, max_context, config.head_dim, np_dtype)
        model = LlamaModel(config, layout, params, xp, comm or SingleRank(), max_context)
        backend.synchronize()
    except Exception as err:
        params.clear()
        backend.release_cached()
        if _is_out_of_memory(err):
            raise ResourceExhausted(f"out of device memory while loading {req.model} on device {backend.spec.id}: {err}") from None
        raise
    finally:
        ckpt.close()
    return Shard(handle, req, config, dtype, layout, model, kv, tokenizer, generation_config, weight_bytes,
                 num_parameters, time.perf_counter() - started, comm or SingleRank())


def _itemsize(ckpt: Checkpoint, read) -> int:
    return DTYPE_BYTES.get(ckpt.tensors[read.name].dtype, 4)


def _is_out_of_memory(err: Exception) -> bool:
    return type(err).__name__ in ("OutOfMemoryError", "MemoryError") or "out of memory" in str(err).lower()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
