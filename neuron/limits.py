"""Bounds on what a client (or a checkpoint) can make a neuron do, as settings with defaults that
fit one node. Past a bound a request gets INVALID_ARGUMENT or RESOURCE_EXHAUSTED saying which bound
and how to stay under it."""
from __future__ import annotations

from dataclasses import dataclass, fields

from common.config import Setting


@dataclass(frozen=True)
class Limits:
    max_prompt_bytes: int = 1 << 20        # a text or chat prompt as sent (before tokenizing)
    max_prompt_tokens: int = 131_072       # a prompt's token ids (given or tokenized)
    max_kv_slots: int = 256                # sequences one shard may hold at once (LoadShard kv_slots)
    max_logits_bytes: int = 64 << 20       # float32 logits one Forward may return
    max_group_timeout_ms: int = 120_000    # InitGroup's join and step deadlines
    template_seconds: float = 2.0          # rendering one chat prompt

    @classmethod
    def from_settings(cls, settings: dict) -> "Limits":
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


_D = Limits()
LIMIT_SETTINGS = [
    Setting("max_prompt_bytes", _D.max_prompt_bytes, "largest text or chat prompt in bytes; larger ones are "
            "INVALID_ARGUMENT before tokenizing", type=int),
    Setting("max_prompt_tokens", _D.max_prompt_tokens, "most prompt tokens a request may have", type=int),
    Setting("max_kv_slots", _D.max_kv_slots, "most sequences (KV slots) one shard may be loaded with", type=int),
    Setting("max_logits_bytes", _D.max_logits_bytes, "largest float32 logits one Forward may return "
            "(positions x vocab x 4); larger asks are RESOURCE_EXHAUSTED", type=int),
    Setting("max_group_timeout_ms", _D.max_group_timeout_ms, "cap on InitGroup's timeout_ms and step_timeout_ms",
            type=int),
    Setting("template_seconds", _D.template_seconds, "time limit for rendering one chat prompt with the model's "
            "template", type=float),
]
