"""The serving engine's settings of one neuron (flags/env/TOML in neuron/cli.py), applied per shard."""
from __future__ import annotations

from dataclasses import dataclass

from .kv_cache import DEFAULT_BLOCK_SIZE, DEFAULT_MEMORY_FRACTION


@dataclass(frozen=True)
class EngineSettings:
    kv_memory_fraction: float = DEFAULT_MEMORY_FRACTION  # of the memory left after weights and workspace
    block_size: int = DEFAULT_BLOCK_SIZE                 # tokens per KV block
    max_batched_tokens: int = 2048                       # tokens one turn computes, over all requests
    max_seqs: int = 256                                  # requests running at once (a load may ask fewer)
    max_waiting: int = 1024                              # requests queued beyond that; more: RESOURCE_EXHAUSTED
    prefix_caching: bool = True
    # prompt tokens a turn while others decode (0: no cap). 128: running streams' inter-token p99
    # 2.4-5.3x their steady p50 over the eager runs so far while a 4,096-token prompt arrives (8B,
    # 64 streams, H200), 3.7x at 256; 2.2-2.7x with mixed_graphs
    max_prefill_chunk: int = 128
    # GPU decode turns replayed from CUDA graphs per batch-size bucket (single-device shards)
    cuda_graphs: bool = True
    # with cuda_graphs, turns of decode rows and one middle chunk of max_prefill_chunk prompt tokens
    # replay graphs too (runner/cuda_graphs.py); on the H200 a long prompt's admission p99 was
    # 2.7x and 2.6x the steady inter-token p50 against 3.3x and 5.3x eager (NOTES, sessions 17-18)
    mixed_graphs: bool = True
    # the next decode turn queued on the device behind the running one (single-device shards);
    # same tokens, and on an H200 1B at 256 streams 31,300 -> 47,000 tok/s in process (NOTES, session 9)
    async_scheduling: bool = True
    # a GPU turn of one token (one stream decoding) through the GEMV kernels with the norms, silu
    # and residual adds folded in, instead of cuBLAS and separate kernels (single-device
    # shards); one 8B stream 4.84 -> 4.27 ms a turn on an H200 (NOTES, session 13)
    one_row_gemv: bool = True

    def check(self) -> None:
        problems = []
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            problems.append(f"kv_memory_fraction {self.kv_memory_fraction} must be in (0, 1]")
        if self.block_size < 1:
            problems.append(f"block_size {self.block_size} must be at least 1")
        if self.max_batched_tokens < 1 or self.max_seqs < 1 or self.max_waiting < 0:
            problems.append(f"max_batched_tokens ({self.max_batched_tokens}) and max_seqs ({self.max_seqs}) must be "
                            f">= 1, max_waiting ({self.max_waiting}) >= 0")
        if problems:
            raise ValueError("; ".join(problems))
