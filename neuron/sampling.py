"""Sampling: request parameters resolved against the model's generation_config.json, and the
sampler that picks the next token from one row of logits.

The sampler is written once against an array module `xp` (numpy or cupy): the logits stay where
they are and only the chosen token id comes back to the host. Randomness is a PCG64 stream on the
host that draws one uniform per step; the device turns it into a token by inverse CDF, so a seed
gives the same tokens on numpy and cupy up to float rounding.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from common.errors import InvalidArgument
from neuron.kernels.top_filter import sample_draws

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 1_000_000
MAX_TOP_K = 1_000_000
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256

_FROM_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class SamplingRequest:
    """A request's sampling fields as the caller sent them; None where a field was not set, so that
    the model's generation_config.json can fill it. Built from the wire format at the service edge
    (neuron/service/convert.py); nothing below that edge sees protobuf."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = DEFAULT_MAX_TOKENS
    # What reaching max_tokens means, as the stop_reason: "max_tokens" when the request's (or the
    # model's) limit binds, "context" when the context left after the prompt was smaller.
    length_limit: str = "max_tokens"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @functools.cached_property   # read for every sampling request every turn
    def plain_greedy(self) -> bool:
        """Greedy with no repetition penalty: the token is the first maximum of the logits as they are."""
        return self.temperature == 0.0 and self.repetition_penalty == 1.0


def _model_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """What an unset request field inherits from generation_config.json, with transformers' meaning:
    the sampling knobs count only when do_sample is true, otherwise the model decodes greedily.
    repetition_penalty is not a sampling knob: transformers applies it to greedy decoding too."""
    config = {key: value for key, value in generation_config.items() if value is not None}
    defaults = {"max_tokens": config.get("max_new_tokens"), "repetition_penalty": config.get("repetition_penalty")}
    if config.get("do_sample"):
        defaults.update(
            temperature=config.get("temperature", 1.0),  # transformers samples at 1.0 when unset
            top_k=config.get("top_k"), top_p=config.get("top_p"), min_p=config.get("min_p"),
        )
    return defaults


def _require(ok: bool, field: str, value: Any, source: str, allowed: str) -> None:
    if ok:
        return
    origin = f" (from the model's {_FROM_CONFIG}; set sampling.{field} to override it)" if source == _FROM_CONFIG else ""
    shown = repr(value) if not isinstance(value, str) or len(value) <= 60 else repr(value[:60] + "...")
    raise InvalidArgument(f"sampling.{field}={shown}{origin} is invalid; allowed: {allowed}")


def resolve_sampling(request: SamplingRequest, generation_config: dict[str, Any],
                     context_left: int, vocab_size: int) -> SamplingConfig:
    """Merge a request's sampling fields with the model's defaults and check them.

    Unset fields take generation_config.json's values, then SamplingConfig's defaults.
    `context_left` is the number of positions left after the prompt; max_tokens is capped by it, and
    `length_limit` says which of the two binds.
    """
    if context_left < 1:
        raise InvalidArgument("prompt fills the model's whole context, leaving no room for new tokens; "
                              "send a shorter prompt")
    defaults = _model_defaults(generation_config)

    def pick(field: str, fallback: Any) -> tuple[Any, str]:
        value = getattr(request, field)
        if value is not None:
            return value, "request"
        if defaults.get(field) is not None:
            return defaults[field], _FROM_CONFIG
        return fallback, "default"

    temperature, source = pick("temperature", 0.0)
    _require(0.0 <= temperature <= MAX_TEMPERATURE, "temperature", temperature, source,
             f"0 (greedy) to {MAX_TEMPERATURE:g}")
    top_k, source = pick("top_k", 0)
    _require(0 <= top_k <= MAX_TOP_K, "top_k", top_k, source, f"0 (off) to {MAX_TOP_K}")
    top_p, source = pick("top_p", 1.0)
    _require(0.0 < top_p <= 1.0, "top_p", top_p, source, "greater than 0 and at most 1 (1 is off)")
    min_p, source = pick("min_p", 0.0)
    _require(0.0 <= min_p < 1.0, "min_p", min_p, source, "at least 0 (off) and below 1")
    penalty, source = pick("repetition_penalty", 1.0)
    _require(0.0 < penalty <= MAX_REPETITION_PENALTY, "repetition_penalty", penalty, source,
             f"greater than 0 and at most {MAX_REPETITION_PENALTY:g} (1 is off)")
    max_tokens, source = pick("max_tokens", DEFAULT_MAX_TOKENS)
    _require(1 <= max_tokens <= MAX_TOKENS, "max_tokens", max_tokens, source, f"1 to {MAX_TOKENS}")

    return SamplingConfig(
        max_tokens=min(int(max_tokens), context_left),
        length_limit="context" if context_left < max_tokens else "max_tokens",
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        min_p=float(min_p),
        repetition_penalty=float(penalty),
        seed=request.seed,
        stop=_check_stop(list(request.stop)),
        stop_token_ids=_check_stop_token_ids(list(request.stop_token_ids), vocab_size),
        ignore_eos=request.ignore_eos,
    )


def _check_stop(stop: list[str]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"sampling.stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for text in stop:
        _require(1 <= len(text) <= MAX_STOP_LENGTH, "stop", text, "request",
                 f"stop strings of 1 to {MAX_STOP_LENGTH} characters (this one has {len(text)})")
    return tuple(stop)


def _check_stop_token_ids(ids: list[int], vocab_size: int) -> frozenset[int]:
    for token_id in ids:
        _require(token_id < vocab_size, "stop_token_ids", token_id, "request",
                 f"token ids below the vocabulary size {vocab_size}")
    return frozenset(ids)


class Sampler:
    """Picks tokens for one sequence: holds its config and its random stream."""

    def __init__(self, config: SamplingConfig, vocab_size: int):
        self.config = config
        # A top_k that keeps the whole vocabulary filters nothing; skip its sort.
        self._top_k = config.top_k if config.top_k < vocab_size else 0
        # PCG64(None) seeds from OS entropy.
        self._rng = np.random.Generator(np.random.PCG64(config.seed))

    def sample(self, xp, logits_1d, history_token_ids: Sequence[int]) -> int:
        """The next token id. `history_token_ids` are the prompt and the tokens generated so far."""
        scores = logits_1d.astype(xp.float32)  # a copy in float32, also for bf16/fp16 logits
        if self.config.repetition_penalty != 1.0 and len(history_token_ids):
            _penalize_repetition(xp, scores, history_token_ids, self.config.repetition_penalty)
        if self.config.greedy:
            return int(xp.argmax(scores))
        return self._draw(xp, scores)

    def _draw(self, xp, scores) -> int:
        return int(draw(xp, scores, self.config, self._top_k, self._rng.random()))


def draw(xp, scores, config: SamplingConfig, top_k: int, uniform: float):
    """The index drawn from float32 scores with the request's next `uniform`: temperature first, then
    the filters in transformers' order (top-k, top-p, min-p), then a draw in vocabulary order, as
    neuron.kernels.top_filter defines them (integer masses; no sort on a GPU). A device scalar on
    CuPy. `top_k` 0: no top-k (also when it would keep the whole vocabulary)."""
    return sample_draws(xp, scores[None], [top_k], [config.top_p], [config.min_p], [config.temperature], [uniform])[0]


def _penalize_repetition(xp, scores, history_token_ids: Sequence[int], penalty: float) -> None:
    """Make seen tokens less likely: divide positive logits by the penalty, multiply negative ones.
    A token seen twice is written twice with the same value, so no unique() is needed."""
    seen = xp.asarray(np.asarray(history_token_ids, dtype=np.int64))
    values = scores[seen]
    scores[seen] = xp.where(values > 0, values / penalty, values * penalty)
