"""Checkpoint discovery and slice reads from Hugging Face safetensors.

Paths are confined to the configured model roots. A checkpoint is a directory with config.json and
either model.safetensors, model.safetensors.index.json (sharded), or *.safetensors files; an HF
cache entry (models--org--name) resolves to the snapshot that refs/main names, or its only one.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from common.dtypes import SAFETENSORS_ITEMSIZE  # importing it registers bfloat16 for safetensors' reads
from common.errors import InvalidArgument, NotFound, PermissionDenied, clip

from .model.sharding import TensorRead

# A header larger than this is a corrupt length field, not a real index (safetensors' own limit).
MAX_HEADER_BYTES = 100 << 20


# The files besides the weights that loading reads from a checkpoint directory.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "model.safetensors.index.json")
INDEX_FILE = "model.safetensors.index.json"


def resolve_checkpoint(path: str, roots: list[Path]) -> Path:
    """Map a request path to a checkpoint directory inside one of the roots. Every file the
    checkpoint resolves to (the directory, an HF cache's refs/main and snapshot, the weight files an
    index names, the tokenizer and config files, through any symlinks) must be inside a root too."""
    if not path:
        raise InvalidArgument("path is empty: give a checkpoint directory under a model root")
    if "\0" in path:
        raise InvalidArgument("path contains a NUL byte")
    candidate = Path(path)
    if not candidate.is_absolute():
        # Relative paths name a directory under a root (the first root that has it), so
        # `--model-root /models` + `llama` works.
        under = [r / candidate for r in roots]
        candidate = next((c for c in under if _exists(c)), under[0] if under else candidate)
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    try:
        real = Path(os.path.realpath(candidate))
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"path {clip(path)} cannot be resolved: {err}") from None
    if not _inside(real, real_roots):
        raise PermissionDenied(f"{clip(path)} is outside the model roots ({', '.join(map(str, roots))}); "
                               "place the checkpoint under a root or start the neuron with --model-root")
    if not _exists(real):
        raise NotFound(f"checkpoint {clip(path)} does not exist")
    if not real.is_dir():
        raise InvalidArgument(f"{clip(path)} is not a directory: give the checkpoint directory")
    directory = _hf_cache_snapshot(real, real_roots)
    _confine_files(directory, real_roots)
    return directory


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, say
        return False


def _inside(real: Path, real_roots: list[Path]) -> bool:
    return any(real == r or r in real.parents for r in real_roots)


def _refuse_outside(what: str, target: Path) -> PermissionDenied:
    return PermissionDenied(f"{what} resolves to {clip(str(target))}, outside the model roots; a checkpoint's "
                            "files (and the symlinks to them) must all live under a --model-root")


def _hf_cache_snapshot(path: Path, real_roots: list[Path]) -> Path:
    snapshots = path / "snapshots"
    if (path / "config.json").exists() or not snapshots.is_dir():
        return path
    ref = path / "refs" / "main"
    if ref.exists():
        if not _inside(Path(os.path.realpath(ref)), real_roots):
            raise _refuse_outside(f"{path.name}/refs/main", Path(os.path.realpath(ref)))
        revision = ref.read_text(errors="replace").strip()
        if not revision or "/" in revision or "\\" in revision or revision in (".", "..") or "\0" in revision:
            raise InvalidArgument(f"{path}/refs/main names {clip(revision)!r}, which is not a snapshot name")
        snap = snapshots / revision
        if snap.is_dir():
            real_snap = Path(os.path.realpath(snap))
            if not _inside(real_snap, real_roots):
                raise _refuse_outside(f"{path.name}/snapshots/{revision}", real_snap)
            return real_snap
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) != 1:
        raise InvalidArgument(f"{path} is an HF cache entry with {len(found)} snapshots and no refs/main; give the snapshot dir")
    real_snap = Path(os.path.realpath(found[0]))
    if not _inside(real_snap, real_roots):
        raise _refuse_outside(f"{path.name}/snapshots/{found[0].name}", real_snap)
    return real_snap


def _confine_files(directory: Path, real_roots: list[Path]) -> None:
    names = list(SIDE_FILES)
    try:
        names += index_file_names(directory)
    except InvalidArgument:
        pass  # a malformed index is reported, with its reason, when the weights are opened
    names += [p.name for p in directory.glob("*.safetensors")]
    for name in names:
        file = directory / name
        if _exists(file) or file.is_symlink():
            real = Path(os.path.realpath(file))
            if not _inside(real, real_roots):
                raise _refuse_outside(f"{directory.name}/{clip(name)}", real)


def index_file_names(directory: Path) -> list[str]:
    """The weight files model.safetensors.index.json names ([] without one). Each must be a plain
    file name in the checkpoint directory: an index cannot point elsewhere."""
    index = directory / INDEX_FILE
    if not index.exists():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"{index} is malformed: {clip(str(err))}") from None
    for name in names:
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..") or "\0" in name:
            raise InvalidArgument(f"{index} names the weight file {clip(str(name))!r}; an index may only name files "
                                  "in the checkpoint's own directory")
    return names


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    dtype: str                 # the safetensors tag: "BF16"
    shape: tuple[int, ...]
    offset: int                # where the tensor's bytes start in the file (after the header)
    nbytes: int


def read_safetensors_header(file: Path) -> dict[str, TensorMeta]:
    """Every tensor's dtype, shape and byte range in one safetensors file, read from its header
    (an 8-byte little-endian length, then that many bytes of JSON) and checked against the file's
    size, so a truncated or corrupt file is refused here and not halfway through a load."""
    def corrupt(why: str) -> InvalidArgument:
        return InvalidArgument(f"{file} is not a readable safetensors file (corrupt or truncated?): {why}")

    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise corrupt("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise corrupt(f"header length {length} does not fit the file of {size} bytes")
            header = json.loads(f.read(length))
    except OSError as err:
        raise InvalidArgument(f"{file} cannot be read: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise corrupt(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start, data_bytes = 8 + length, size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            tag, shape, (begin, end) = entry["dtype"], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
            expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[tag]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has a malformed entry {str(entry)[:200]}") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes):
            raise corrupt(f"tensor {name!r} lies at bytes {begin}..{end}, past the {data_bytes} data bytes")
        if end - begin != expected:
            raise corrupt(f"tensor {name!r} has {end - begin} bytes; {tag} {list(shape)} needs {expected}")
        tensors[name] = TensorMeta(file, tag, shape, data_start + begin, end - begin)
    return tensors


class Checkpoint:
    """Index of a checkpoint's tensors; reads slices without loading whole files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.tensors: dict[str, TensorMeta] = {}
        self._handles: dict[Path, object] = {}
        for file in self._weight_files():
            self.tensors.update(read_safetensors_header(file))
        if not self.tensors:
            raise InvalidArgument(f"{directory} holds no tensors")

    def _weight_files(self) -> list[Path]:
        names = index_file_names(self.directory)
        if names:
            files = [self.directory / name for name in names]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise InvalidArgument(f"{self.directory / INDEX_FILE} names files that are missing: "
                                      f"{clip(', '.join(missing))}")
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
        return int(np.prod(_sliced_shape(meta.shape, read))) * SAFETENSORS_ITEMSIZE[meta.dtype]

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
