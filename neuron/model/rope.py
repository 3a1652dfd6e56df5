"""Rotary position embeddings (the non-interleaved "rotate half" form Hugging Face uses)."""
from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths divided by factor, short kept, a smooth blend between."""
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_context = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, blended, scaled)


def cos_sin_tables(config: ModelConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [max_positions, head_dim] tables, computed once per shard in float64."""
    inv_freq = inverse_frequencies(config)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
