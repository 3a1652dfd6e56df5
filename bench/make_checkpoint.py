"""Random-weight checkpoints of real Llama shapes, written fast enough to make an 8B one inside a
benchmark run: config and tokenizer come from cortex.tiny_checkpoint (the same files it writes),
but the weights are slices of one 128 MiB pool of N(0, 0.02) values (random, never zeros), written
straight into safetensors files with no per-tensor random generation: disk speed, not RNG speed.

    python bench/make_checkpoint.py /tmp/llama-3-8b --shape llama-3-8b
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.dtypes import BY_NAME, DTYPES  # noqa: E402
from cortex.tiny_checkpoint import (SHAPES as TINY_SHAPES, LlamaShape, _config, _group_by_size,  # noqa: E402
                                    _write_json, _write_tokenizer, build_covering_tokenizer, build_tokenizer)

SHAPES: dict[str, LlamaShape] = {
    "llama-3.2-1b": TINY_SHAPES["llama-3.2-1b"],
    # Meta-Llama-3-8B: the 3.1 dimensions without rope scaling, 8K positions.
    "llama-3-8b": replace(TINY_SHAPES["llama-3.1-8b"], rope_scaling=None, max_position_embeddings=8192),
}
POOL_ELEMENTS = 64 << 20


def write_checkpoint(directory: str | Path, shape: LlamaShape, dtype: str = "bfloat16", seed: int = 0,
                     max_shard_bytes: int = 5 << 30, small_tokenizer: bool = False) -> dict:
    """small_tokenizer: the small tokenizer alone (368 tokens; the benchmarks' before 574a145),
    whose text for the shapes' 128,256-id vocabularies is empty for 99.7% of ids; else one covering
    the model's vocabulary."""
    started = time.perf_counter()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = DTYPES[dtype]
    # build_covering_tokenizer adds nothing to a vocabulary the small tokenizer already fills
    tok = build_tokenizer(512) if small_tokenizer or not shape.vocab_size else build_covering_tokenizer(shape.vocab_size)
    vocab = shape.vocab_size or tok.get_vocab_size()
    _write_tokenizer(out, tok, shape)
    _write_json(out / "config.json", _config(shape, vocab, dtype))
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})

    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(POOL_ELEMENTS, dtype=np.float32) * 0.02).astype(np_dtype).view(np.uint8)
    ones = np.ones(1 << 16, dtype=np_dtype).view(np.uint8)
    shapes = shape.parameter_shapes(vocab)
    groups = _group_by_size(shapes, np_dtype.itemsize, max_shard_bytes)
    weight_map, total = {}, 0
    for index, names in enumerate(groups, 1):
        file = "model.safetensors" if len(groups) == 1 else f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = int(np.prod(shapes[name])) * np_dtype.itemsize
            header[name] = {"dtype": BY_NAME[dtype].safetensors, "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                nbytes = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                if name.endswith("norm.weight"):
                    src = ones
                    start = 0
                else:
                    src = pool
                    start = int(rng.integers(0, pool.nbytes // 2)) & ~63
                written = 0
                while written < nbytes:
                    n = min(nbytes - written, src.nbytes - start)
                    f.write(memoryview(src[start:start + n]))
                    written += n
                    start = 0
        weight_map.update({name: file for name in names})
        total += offset
    if len(groups) > 1:
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    parameters = sum(int(np.prod(s)) for s in shapes.values())
    return {"path": str(out), "dtype": dtype, "parameters": parameters, "weight_bytes": total, "files": len(groups),
            "seconds": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    info = write_checkpoint(args.directory, SHAPES[args.shape], args.dtype)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
