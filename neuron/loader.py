"""Checkpoint discovery and slice reads from Hugging Face safetensors.

Paths are confined to the configured model roots. A checkpoint is a directory with config.json and
either model.safetensors, model.safetensors.index.json (sharded), or *.safetensors files; an HF
cache entry (models--org--name) resolves to the snapshot that refs/main names, or its only one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy so safetensors can return it
import numpy as np
from safetensors import SafetensorError, safe_open

from common.errors import InvalidArgument, NotFound, PermissionDenied

from .model.sharding import TensorRead

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def resolve_checkpoint(path: str, roots: list[Path]) -> Path:
    """Map a request path to a checkpoint directory inside one of the roots."""
    if not path:
        raise InvalidArgument("path is empty: give a checkpoint directory under a model root")
    candidate = Path(path)
    if not candidate.is_absolute():
        # Relative paths name a directory under a root (the first root that has it), so
        # `--model-root /models` + `llama` works.
        under = [r / candidate for r in roots]
        candidate = next((c for c in under if c.exists()), under[0] if under else candidate)
    real = Path(os.path.realpath(candidate))
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    if not any(real == r or r in real.parents for r in real_roots):
        raise PermissionDenied(f"{path} is outside the model roots ({', '.join(map(str, roots))}); "
                               "place the checkpoint under a root or start the neuron with --model-root")
    if not real.exists():
        raise NotFound(f"checkpoint {path} does not exist")
    if not real.is_dir():
        raise InvalidArgument(f"{path} is not a directory: give the checkpoint directory")
    return _hf_cache_snapshot(real)


def _hf_cache_snapshot(path: Path) -> Path:
    snapshots = path / "snapshots"
    if (path / "config.json").exists() or not snapshots.is_dir():
        return path
    ref = path / "refs" / "main"
    if ref.exists():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) != 1:
        raise InvalidArgument(f"{path} is an HF cache entry with {len(found)} snapshots and no refs/main; give the snapshot dir")
    return found[0]


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    dtype: str
    shape: tuple[int, ...]


class Checkpoint:
    """Index of a checkpoint's tensors; reads slices without loading whole files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.tensors: dict[str, TensorMeta] = {}
        self._handles: dict[Path, object] = {}
        for file in self._weight_files():
            handle = self._open(file)
            for name in handle.keys():
                sl = handle.get_slice(name)
                self.tensors[name] = TensorMeta(file, sl.get_dtype(), tuple(sl.get_shape()))
        if not self.tensors:
            raise InvalidArgument(f"{directory} holds no tensors")

    def _weight_files(self) -> list[Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise InvalidArgument(f"{index} is malformed: {err}") from None
            files = sorted({self.directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise InvalidArgument(f"{index} names files that are missing: {', '.join(missing)}")
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise InvalidArgument(f"{self.directory} has no *.safetensors weights (only safetensors checkpoints are supported)")
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except (SafetensorError, OSError, ValueError) as err:
                raise InvalidArgument(f"{file} is not a readable safetensors file (corrupt or truncated?): {err}") from None
        return self._handles[file]

    def read_bytes(self, read: TensorRead) -> int:
        meta = self.tensors[read.name]
        return int(np.prod(_sliced_shape(meta.shape, read))) * DTYPE_BYTES.get(meta.dtype, 4)

    def read(self, read: TensorRead) -> np.ndarray:
        meta = self.tensors[read.name]
        sl = self._open(meta.file).get_slice(read.name)
        try:
            if read.cols is not None:
                return sl[:, read.cols]
            if read.rows is not None:
                return sl[read.rows]
            return sl[:]
        except (SafetensorError, OSError, ValueError) as err:
            raise InvalidArgument(f"reading {read.name} from {meta.file.name} failed (corrupt file?): {err}") from None

    def close(self) -> None:
        self._handles.clear()


def _sliced_shape(shape: tuple[int, ...], read: TensorRead) -> tuple[int, ...]:
    dims = list(shape)
    if read.rows is not None:
        dims[0] = len(range(*read.rows.indices(dims[0])))
    if read.cols is not None:
        dims[1] = len(range(*read.cols.indices(dims[1])))
    return tuple(dims)
