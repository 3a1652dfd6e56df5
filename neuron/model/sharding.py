"""Megatron-style tensor-parallel layout: which slice of which checkpoint tensor each rank holds.

q/k/v and gate/up are column-parallel (split by heads / intermediate rows), o_proj and down_proj
row-parallel (split by input columns, followed by an all-reduce; their biases, if any, on every rank,
added after the sum); embeddings, norms and lm_head are replicated (the fused decode step uses only
its own vocab rows of the lm_head and gathers the logits). With fewer kv heads than ranks, each rank
holds the one kv head its q heads use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import InvalidArgument

from .config import ModelConfig


@dataclass(frozen=True)
class TensorRead:
    name: str                     # tensor name in the checkpoint
    rows: slice | None = None     # slice of dim 0 (output features)
    cols: slice | None = None     # slice of dim 1 (input features)


@dataclass(frozen=True)
class TpLayout:
    rank: int
    size: int
    q_heads: range
    kv_heads: range
    intermediate: range

    @classmethod
    def build(cls, config: ModelConfig, rank: int = 0, size: int = 1) -> "TpLayout":
        heads, kv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
        problems = []
        if heads % size:
            problems.append(f"num_attention_heads {heads} is not divisible by {size}")
        if inter % size:
            problems.append(f"intermediate_size {inter} is not divisible by {size}")
        if kv >= size and kv % size:
            problems.append(f"num_key_value_heads {kv} is not divisible by {size}")
        if kv < size and size % kv:
            problems.append(f"{size} is not a multiple of num_key_value_heads {kv} (needed to replicate kv heads)")
        if problems:
            raise InvalidArgument(f"cannot shard {config.architecture} over {size} ranks: " + "; ".join(problems))
        q_per = heads // size
        if kv >= size:
            kv_per = kv // size
            kv_heads = range(rank * kv_per, (rank + 1) * kv_per)
        else:
            kv_heads = range(rank // (size // kv), rank // (size // kv) + 1)
        i_per = inter // size
        return cls(rank, size, range(rank * q_per, (rank + 1) * q_per), kv_heads, range(rank * i_per, (rank + 1) * i_per))

    @property
    def local_heads(self) -> int:
        return len(self.q_heads)

    @property
    def local_kv_heads(self) -> int:
        return len(self.kv_heads)


def _rows(r: range, scale: int = 1) -> slice:
    return slice(r.start * scale, r.stop * scale)


def parameter_reads(config: ModelConfig, layout: TpLayout, has_lm_head: bool) -> dict[str, list[TensorRead]]:
    """Our parameter name -> the reads concatenated (along dim 0) to build it on this rank."""
    d = config.head_dim
    q, kv, inter = _rows(layout.q_heads, d), _rows(layout.kv_heads, d), _rows(layout.intermediate)
    reads: dict[str, list[TensorRead]] = {
        "embed": [TensorRead("model.embed_tokens.weight")],
        "norm": [TensorRead("model.norm.weight")],
    }
    if not config.tie_word_embeddings:
        if not has_lm_head:
            raise InvalidArgument("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        reads["lm_head"] = [TensorRead("lm_head.weight")]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        reads[f"{i}.input_norm"] = [TensorRead(p + "input_layernorm.weight")]
        reads[f"{i}.post_norm"] = [TensorRead(p + "post_attention_layernorm.weight")]
        reads[f"{i}.qkv"] = [TensorRead(attn + "q_proj.weight", rows=q), TensorRead(attn + "k_proj.weight", rows=kv),
                             TensorRead(attn + "v_proj.weight", rows=kv)]
        if config.qkv_bias:
            reads[f"{i}.qkv_bias"] = [TensorRead(attn + "q_proj.bias", rows=q), TensorRead(attn + "k_proj.bias", rows=kv),
                                      TensorRead(attn + "v_proj.bias", rows=kv)]
        reads[f"{i}.o"] = [TensorRead(attn + "o_proj.weight", cols=q)]
        if config.o_bias:  # row-parallel bias: every rank holds it and adds it once, after the all-reduce
            reads[f"{i}.o_bias"] = [TensorRead(attn + "o_proj.bias")]
        if config.qk_norm:
            reads[f"{i}.q_norm"] = [TensorRead(attn + "q_norm.weight")]
            reads[f"{i}.k_norm"] = [TensorRead(attn + "k_norm.weight")]
        reads[f"{i}.gate_up"] = [TensorRead(mlp + "gate_proj.weight", rows=inter), TensorRead(mlp + "up_proj.weight", rows=inter)]
        reads[f"{i}.down"] = [TensorRead(mlp + "down_proj.weight", cols=inter)]
        if config.mlp_bias:
            reads[f"{i}.gate_up_bias"] = [TensorRead(mlp + "gate_proj.bias", rows=inter), TensorRead(mlp + "up_proj.bias", rows=inter)]
            reads[f"{i}.down_bias"] = [TensorRead(mlp + "down_proj.bias")]
    return reads


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def check_config_against_headers(config: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Compare config.json's sizes with the tensors the safetensors headers declare, before anything
    is sized from the config: a config claiming a million layers or a huge vocabulary is refused
    here, in time proportional to the headers, not to what the config claims."""
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER_NAME.match(name))}
    if config.num_layers != len(layers):
        raise InvalidArgument(f"{where}: config.json says num_hidden_layers {config.num_layers}, but the "
                              f"safetensors headers hold {len(layers)} layers")
    h, d = config.hidden_size, config.head_dim
    implied = {
        "model.embed_tokens.weight": ((config.vocab_size, h), "vocab_size x hidden_size"),
        "model.layers.0.self_attn.q_proj.weight": ((config.num_heads * d, h), "num_attention_heads x head_dim, hidden_size"),
        "model.layers.0.self_attn.k_proj.weight": ((config.num_kv_heads * d, h),
                                                   "num_key_value_heads x head_dim, hidden_size"),
        "model.layers.0.mlp.gate_proj.weight": ((config.intermediate_size, h), "intermediate_size x hidden_size"),
    }
    for name, (shape, meaning) in implied.items():
        found = shapes.get(name)
        if found is not None and tuple(found) != shape:
            raise InvalidArgument(f"{where}: {name} has shape {list(found)} in the safetensors headers, but "
                                  f"config.json implies {list(shape)} ({meaning})")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shapes the config implies, to refuse mismatched checkpoints up front."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    qd, kvd = config.num_heads * d, config.num_kv_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (qd, h), p + "self_attn.k_proj.weight": (kvd, h),
            p + "self_attn.v_proj.weight": (kvd, h), p + "self_attn.o_proj.weight": (h, qd),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
        if config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (qd,), p + "self_attn.k_proj.bias": (kvd,), p + "self_attn.v_proj.bias": (kvd,)})
        if config.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes
