"""Every file a checkpoint resolves to stays inside the model roots: an index naming files
elsewhere, an HF cache ref or snapshot pointing outside, and symlinked weight or tokenizer files
that leave the root are refused before anything is read."""
from __future__ import annotations

import json
import shutil

import pytest

from common.errors import InvalidArgument, PermissionDenied
from neuron.loader import Checkpoint, resolve_checkpoint
from tests.helpers import MODELS


@pytest.fixture
def layout(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(MODELS / "llama_sharded", outside / "stolen")
    return root, outside


def _load(path, root):
    directory = resolve_checkpoint(path, [root])
    Checkpoint(directory).close()
    return directory


def test_an_index_naming_files_outside_the_checkpoint_is_refused(layout):
    root, outside = layout
    model = shutil.copytree(MODELS / "llama_sharded", root / "sharded")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: "../../outside/stolen/" + file for name, file in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    for file in model.glob("*.safetensors"):
        file.unlink()
    with pytest.raises((InvalidArgument, PermissionDenied), match="index may only name files|outside the model roots"):
        _load("sharded", root)


def test_an_hf_cache_ref_pointing_outside_is_refused(layout):
    root, outside = layout
    entry = root / "hub" / "models--evil--llama"
    (entry / "snapshots" / "abc").mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("../../../../outside/stolen")
    with pytest.raises((InvalidArgument, PermissionDenied)):
        _load("hub/models--evil--llama", root)


def test_an_hf_cache_snapshot_symlinked_outside_is_refused(layout):
    root, outside = layout
    entry = root / "hub" / "models--evil--llama"
    (entry / "snapshots").mkdir(parents=True)
    (entry / "snapshots" / "abc").symlink_to(outside / "stolen")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc")
    with pytest.raises(PermissionDenied, match="outside the model roots"):
        _load("hub/models--evil--llama", root)


@pytest.mark.parametrize("name", ["model-00001-of-00004.safetensors", "tokenizer.json", "config.json"])
def test_a_checkpoint_file_symlinked_outside_is_refused(layout, name):
    root, outside = layout
    model = shutil.copytree(MODELS / "llama_sharded", root / "sharded")
    (model / name).unlink()
    (model / name).symlink_to(outside / "stolen" / name)
    with pytest.raises(PermissionDenied, match=f"{name}.*outside the model roots"):
        _load("sharded", root)


def test_an_hf_cache_with_blob_symlinks_inside_the_root_still_loads(layout):
    root, _ = layout
    entry = root / "hub" / "models--tiny--llama2"
    snapshot, blobs = entry / "snapshots" / "rev1", entry / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in (MODELS / "llama2").iterdir():
        shutil.copy(file, blobs / file.name)
        (snapshot / file.name).symlink_to(f"../../blobs/{file.name}")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("rev1\n")
    assert _load("hub/models--tiny--llama2", root).name == "rev1"
