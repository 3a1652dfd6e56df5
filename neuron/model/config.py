"""ModelConfig: the part of a Hugging Face config.json the Llama-family forward pass needs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidArgument

# Hugging Face architecture name -> what differs from plain Llama.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    dtype: str  # the checkpoint's dtype as config.json names it ("bfloat16", ...)

    @classmethod
    def from_dir(cls, path: Path) -> "ModelConfig":
        config_path = path / "config.json"
        try:
            raw = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"{path} has no config.json: not a Hugging Face checkpoint directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InvalidArgument(f"{config_path} is not valid JSON: {err}") from None
        return cls.from_dict(raw, where=str(config_path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else "(none)"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise InvalidArgument(
                f"unsupported architecture {arch!r} in {where}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        traits = SUPPORTED_ARCHITECTURES[arch]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise InvalidArgument(f"{where}: hidden_act {act!r} is not supported (only silu)")
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            head_dim = int(raw.get("head_dim") or hidden // num_heads)
            rope_theta, rope_scaling = _rope(raw)
            window = raw.get("sliding_window")
            if arch.startswith("Qwen") and not raw.get("use_sliding_window", False):
                window = None  # Qwen configs carry a window they do not use unless asked to
            elif arch.startswith("Qwen"):
                raise InvalidArgument(f"{where}: use_sliding_window=true is not supported for {arch}")
            config = cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=traits.get("qkv_bias", False) or bool(raw.get("attention_bias", False)),
                o_bias=bool(raw.get("attention_bias", False)) and not traits.get("qkv_bias", False),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                qk_norm=traits.get("qk_norm", False),
                sliding_window=int(window) if window else None,
                dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            )
        except KeyError as err:
            raise InvalidArgument(f"{where} lacks the field {str(err.args[0])[:100]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError, OverflowError) as err:
            raise InvalidArgument(f"{where} has a malformed field: {str(err)[:200]}") from None
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings")
        bad = [f"{name} {getattr(config, name)}" for name in sizes if getattr(config, name) < 1]
        if bad:
            raise InvalidArgument(f"{where}: sizes must be positive, got {', '.join(bad)}")
        if config.num_heads % config.num_kv_heads:
            raise InvalidArgument(f"{where}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {config.num_kv_heads}")
        return config


def _rope(raw: dict) -> tuple[float, dict | None]:
    """transformers 5 writes rope_parameters (theta inside); older configs rope_theta + rope_scaling."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise InvalidArgument(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    params["rope_type"] = rope_type
    return theta, (params if rope_type != "default" else None)
