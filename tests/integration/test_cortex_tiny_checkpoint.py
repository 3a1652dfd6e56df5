"""cortex.tiny_checkpoint writes checkpoints the neuron loads: real model shapes, bf16 and fp32,
sharded files with an index, and a byte-level tokenizer that encodes any text."""
from __future__ import annotations

import json
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from cortex.tiny_checkpoint import SHAPES, SPECIAL_TOKENS, LlamaShape, write_checkpoint
from neuron.shard import plan_load
from neuron.tokenizer import Tokenizer


@pytest.mark.parametrize("shape, parameters", [("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248)])
def test_presets_have_the_published_parameter_counts(shape, parameters):
    s = SHAPES[shape]
    assert sum(int(np.prod(v)) for v in s.parameter_shapes(s.vocab_size).values()) == parameters


def test_a_sharded_bf16_checkpoint_loads_as_the_neuron_plans_it(tmp_path):
    # The 1B shape cut down to one layer and a small vocabulary: same head layout, tied embeddings.
    shape = replace(SHAPES["llama-3.2-1b"], num_layers=1, vocab_size=4096, max_position_embeddings=4096)
    written = write_checkpoint(tmp_path / "m", shape, dtype="bfloat16", max_shard_bytes=16 << 20)
    assert written.files > 1 and written.num_parameters == sum(
        int(np.prod(v)) for v in shape.parameter_shapes(4096).values())
    index = json.loads((written.path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == written.weight_bytes == 2 * written.num_parameters
    with safe_open(str(written.path / index["weight_map"]["model.embed_tokens.weight"]), "numpy") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == ml_dtypes.bfloat16 and embed.shape == (4096, 2048)
    assert 0.015 < float(embed.astype(np.float32).std()) < 0.025

    plan = plan_load(written.path, "", "cuda")  # what a GPU neuron would load: the checkpoint's dtype
    plan.checkpoint.close()
    assert plan.dtype == "bfloat16" and plan.num_parameters == written.num_parameters
    assert plan.config.num_kv_heads == 8 and plan.config.head_dim == 64 and plan.config.tie_word_embeddings
    assert plan.config.rope_scaling["rope_type"] == "llama3"


def test_the_tokenizer_encodes_any_text_and_renders_chat(tmp_path):
    written = write_checkpoint(tmp_path / "t", LlamaShape(num_layers=1), dtype="float32")
    tokenizer = Tokenizer.from_dir(written.path)
    for text in ("The cortex places models", "naïve café – 東京 🚀", "  spaces\n\ttabs  "):
        ids = tokenizer.encode(text)
        assert ids[0] == 1 and tokenizer.decode(ids) == text  # <s> first; bytes round-trip
    assert max(tokenizer.encode("anything at all")) < written.vocab_size
    chat = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == SPECIAL_TOKENS.index("<|im_start|>")


def test_readable_weights_generate_printable_tokens(tmp_path):
    written = write_checkpoint(tmp_path / "r", LlamaShape(num_layers=1), readable=True)
    with safe_open(str(written.path / "model.safetensors"), "numpy") as f:
        lm_head = f.get_tensor("lm_head.weight")
    tokenizer = Tokenizer.from_dir(written.path)
    live = np.flatnonzero(np.abs(lm_head).sum(axis=1))
    assert 100 < len(live) < written.vocab_size
    assert all(tokenizer.decode([int(i)]).isprintable() for i in live)
