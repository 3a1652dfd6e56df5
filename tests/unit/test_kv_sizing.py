"""KV pool sizing at load: a fraction of the memory left after weights, capped per device kind."""
from __future__ import annotations

from types import SimpleNamespace

from neuron.engine.settings import EngineSettings
from neuron.shard import GPU_POOL_SEQUENCES, size_kv

GIB = 1 << 30


def plan(kv_bytes_per_token: int, max_context: int = 256):
    return SimpleNamespace(weight_bytes=GIB, workspace_bytes=512 << 20, kv_bytes_per_token=kv_bytes_per_token,
                           max_context=max_context)


def test_a_tiny_model_on_a_gpu_takes_a_bounded_pool_not_the_device():
    sizing = size_kv(plan(kv_bytes_per_token=256), EngineSettings(block_size=16), max_seqs=16,
                     device_kind="cuda", free_bytes=140 * GIB)
    assert sizing.tokens == GPU_POOL_SEQUENCES * 16 * 256
    assert sizing.num_blocks == GPU_POOL_SEQUENCES * 16 * 256 // 16


def test_a_cpu_pool_holds_max_seqs_full_sequences():
    sizing = size_kv(plan(kv_bytes_per_token=256), EngineSettings(block_size=16), max_seqs=16,
                     device_kind="cpu", free_bytes=140 * GIB)
    assert sizing.tokens == 16 * 256


def test_a_large_model_on_a_gpu_is_sized_by_the_memory_fraction():
    # 8B shape: 128 KiB of KV per token; 256 sequences of 4,096 tokens would need 128 GiB, more than is left.
    settings = EngineSettings(block_size=16, kv_memory_fraction=0.9)
    sizing = size_kv(plan(kv_bytes_per_token=128 << 10, max_context=4096), settings, max_seqs=256,
                     device_kind="cuda", free_bytes=80 * GIB)
    room = 80 * GIB - GIB - (512 << 20)
    assert sizing.num_blocks == int(room * 0.9) // ((128 << 10) * 16)
