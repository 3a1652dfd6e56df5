"""Tokenizer of a Hugging Face checkpoint directory, its chat template, and streaming detokenization.

Built on the `tokenizers` library (tokenizer.json), with the special tokens and chat template of
tokenizer_config.json and the EOS ids of generation_config.json. Chat templates are rendered the
way transformers renders them, so a chat prompt gives the same token ids as
`tokenizer.apply_chat_template(messages, tokenize=True)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import tokenizers

from common.errors import FailedPrecondition, InvalidArgument

from .chat_template import RENDER_SECONDS, compile_template, render

# tokenizers reads this at each decode_batch call (bench/NOTES.md, session 10). Off, decode_batch runs its windows in turn, still
# without the GIL: ~1 us of CPU a window. On, rayon's pool (a thread per core) spins: 2-29 us a
# window on 2 cores, and on a 16-core host it tripled the neuron's CPU per streamed token.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Special tokens of tokenizer_config.json that chat templates may refer to by name.
_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FailedPrecondition(f"{path} cannot be read as JSON ({err}); fix or remove the file") from err


def _token_text(value: str | dict | None) -> str | None:
    """tokenizer_config.json writes special tokens as plain strings or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _pick_chat_template(value: str | list | None) -> str | None:
    """A chat template is a string, or a list of {name, template} from which we take "default"."""
    if isinstance(value, list):
        return next((t["template"] for t in value if t.get("name") == "default"), None)
    return value


class Tokenizer:
    """Encode, decode and chat rendering for one model."""

    def __init__(self, backend: tokenizers.Tokenizer, tokenizer_config: dict[str, Any] | None = None,
                 generation_config: dict[str, Any] | None = None):
        tokenizer_config = tokenizer_config or {}
        self.generation_config: dict[str, Any] = generation_config or {}
        self._backend = backend
        self._special = {name: text for name in _TEMPLATE_TOKENS
                         if (text := _token_text(tokenizer_config.get(name))) is not None}
        self.chat_template: str | None = _pick_chat_template(tokenizer_config.get("chat_template"))
        self.bos_token_id: int | None = self._id_of(self._special.get("bos_token"))
        self.eos_token_ids: set[int] = self._eos_ids()
        self._single_token_text: dict[int, str] = {}   # decode([id]): at most one entry per vocabulary id

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory, or None when it has no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception
            raise FailedPrecondition(f"{path / 'tokenizer.json'} cannot be loaded ({err}); fix or replace it") from err
        config_path = path / "tokenizer_config.json"
        tokenizer_config = _read_json(config_path) if config_path.is_file() else {}
        # Recent transformers save the template beside the config, and that file wins.
        template_path = path / "chat_template.jinja"
        if template_path.is_file():
            tokenizer_config["chat_template"] = template_path.read_text(encoding="utf-8")
        generation_path = path / "generation_config.json"
        generation_config = _read_json(generation_path) if generation_path.is_file() else {}
        return cls(backend, tokenizer_config, generation_config)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it tokenizes (encode does not): a long prompt
        # tokenized on a worker thread then leaves the event loop running.
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_many(self, windows: list[list[int]]) -> list[str]:
        """decode() of each list of ids (special tokens skipped). Single ids come from a cache (a
        streaming window starts with one id most of the time); the rest go to tokenizers in one
        decode_batch, which runs without the GIL, so the device thread runs meanwhile."""
        texts = [""] * len(windows)
        batch, where = [], []
        single = self._single_token_text
        for i, ids in enumerate(windows):
            if len(ids) == 1 and (text := single.get(ids[0])) is not None:
                texts[i] = text
            elif ids:
                batch.append(ids)
                where.append(i)
        decoded = self._backend.decode_batch(batch, skip_special_tokens=True) if batch else []
        for i, ids, text in zip(where, batch, decoded):
            texts[i] = text
            if len(ids) == 1:
                single[ids[0]] = text
        return texts

    def decode_stream(self):
        """tokenizers' own incremental decoder (DecodeStream, skipping special tokens) where it
        gives exactly the window algorithm's text: on a byte-level decoder, whose text of a window
        always begins with the text of its first part. None otherwise (SentencePiece decoders with
        byte fallback, where it raises on an invalid byte run), or on a tokenizers without it."""
        stream_type = getattr(tokenizers.decoders, "DecodeStream", None)
        if stream_type is None or not isinstance(self._backend.decoder, tokenizers.decoders.ByteLevel):
            return None
        return stream_type(skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    seconds: float = RENDER_SECONDS) -> str:
        if not self.chat_template:
            raise FailedPrecondition(
                "prompt.chat cannot be used: the model has no chat template (tokenizer_config.json "
                "has no chat_template); send prompt.text or prompt.tokens instead")
        if not messages:
            raise InvalidArgument("prompt.chat.messages is empty; send at least one message")
        try:
            template = compile_template(self.chat_template)
        except jinja2.TemplateSyntaxError as err:
            raise FailedPrecondition(
                f"the model's chat template does not compile ({err.message}, line {err.lineno}); "
                "fix the model's chat template, or send prompt.text or prompt.tokens") from err
        try:
            return render(template, seconds, messages=messages, add_generation_prompt=add_generation_prompt, **self._special)
        except jinja2.TemplateError as err:
            raise InvalidArgument(f"prompt.chat could not be rendered with the model's chat template: {err}") from err

    def encode_chat(self, messages: list[dict[str, str]], seconds: float = RENDER_SECONDS) -> list[int]:
        """Token ids of a chat prompt, ending with the assistant turn's opening.

        The template writes every special token itself (BOS included, where the model wants one),
        so the text is encoded without adding special tokens, as transformers'
        apply_chat_template does. Adding them would give a second BOS, or a BOS the template
        deliberately left out.
        """
        return self.encode(self.render_chat(messages, add_generation_prompt=True, seconds=seconds),
                           add_special_tokens=False)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _eos_ids(self) -> set[int]:
        configured = self.generation_config.get("eos_token_id")
        ids = set(configured) if isinstance(configured, list) else {configured}
        ids.add(self._id_of(self._special.get("eos_token")))
        ids.discard(None)
        return ids


class StreamDelta(NamedTuple):
    """What one push or finish of a TextStream gives back."""
    text: str                 # text safe to send now
    stop: str | None = None   # the stop string that ended the stream, or None
    tokens: int = 0           # how many of the pushed ids belong to the output: all of them, or,
    #                           when a stop string matched, those up to the one that completed it


class TextStream:
    """Turns generated token ids into text deltas that are safe to send while streaming, and ends
    the stream at the first stop string.

    Decoding: a sliding window of the generated ids (as TGI and vLLM do): `prefix` marks the start
    of the window, `read` the end of what was already turned into text. The delta is the window's
    text minus the text of its first part, so decoders that treat the first token specially (e.g.
    strip a leading space) treat both the same. Text that ends in U+FFFD (an incomplete UTF-8
    character) is held until the character is complete. A stream without stop strings on a
    byte-level tokenizer (Llama 3, Qwen) hands this to tokenizers' DecodeStream, the same
    algorithm in Rust: one call a token instead of two windows decoded (1.5 against 4.7 us of CPU a
    token at 256 streams). It does not fit byte-fallback tokenizers (it raises on an invalid byte
    run, which a sampled model can produce), and it never gives out an incomplete character at the
    end: `finish` decodes the ids it still holds.

    Stops: ids are taken one at a time, so the token that completed a stop string is known
    whatever grouping the ids arrive in. The stop string completed first wins (on a tie, the
    longer one); the text before it is the output. A tail that could be the start of a stop string
    is held back; so is a tail held for an incomplete character, but the complete text before that
    tail is already checked for stops, so a stop never waits for the next character.

    The deltas and finish() add up to decode(all ids), with one exception no stream can avoid:
    byte-fallback (SentencePiece) decoders replace each token of an invalid UTF-8 byte run with
    U+FFFD, so text already sent can decode differently once the run ends.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self._tokenizer = tokenizer
        self._stop = list(stop)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._pending = ""          # decoded text held back because it may start a stop string
        self._stopped = False
        # without stop strings, where it fits: tokenizers' DecodeStream, and the ids it holds (those
        # since it last gave text: an incomplete character, or ids that add no text yet)
        self._decoder = None if self._stop else tokenizer.decode_stream()
        self._held: list[int] = []

    def push(self, token_ids: list[int]) -> StreamDelta:
        """Add generated tokens. After a stop string matched, the stream is over: later pushes
        give StreamDelta("", None, 0)."""
        return push_many([(self, token_ids)])[0]

    def finish(self) -> StreamDelta:
        """The text still held back, once generation ended; a stop string found in it still ends
        the output there (StreamDelta.tokens is 0: finish takes no new ids)."""
        if self._stopped:
            return StreamDelta("")
        self._stopped = True
        if self._decoder is not None:   # byte-level: the held ids' text continues what was sent
            return StreamDelta(self._tokenizer.decode(self._held) if self._held else "")
        prefix_text, text = self._tokenizer.decode_many(self._windows())
        text, self._pending = self._pending + text[len(prefix_text):], ""
        match = self._first_stop(text)
        return StreamDelta(text) if match is None else StreamDelta(text[:match[0]], match[1])

    def _windows(self) -> tuple[list[int], list[int]]:
        """The ids whose texts give the newest delta: the window's first part (already read) and
        the whole window."""
        return self._ids[self._prefix:self._read], self._ids[self._prefix:]

    def _advance(self, prefix_text: str, text: str) -> tuple[str, str | None]:
        """Text released by the newest id, given the texts of its windows, and the stop string it
        completed, if any."""
        new_text = text[len(prefix_text):]
        complete = not text.endswith("\ufffd")
        if not self._stop:  # nothing to look for: the complete text goes out as it comes
            if complete and new_text:
                self._prefix, self._read = self._read, len(self._ids)
                return new_text, None
            return "", None
        if not complete:
            # An incomplete character at the end: it stays in the window until more ids complete
            # it, but the text before it is final, and a stop string in that ends the output now.
            settled = self._pending + new_text.rstrip("\ufffd")
            match = self._first_stop(settled)
            if match is None:
                return "", None
            self._stopped, self._pending = True, ""
            return settled[:match[0]], match[1]
        if new_text:  # ids that add no text yet (special tokens) stay in the window, as its start
            self._prefix, self._read = self._read, len(self._ids)
        self._pending += new_text
        match = self._first_stop(self._pending)
        if match is not None:
            self._stopped = True
            text, self._pending = self._pending[:match[0]], ""
            return text, match[1]
        cut = len(self._pending) - self._stop_prefix_length()
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text, None

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string in `text` that is completed first, as (position, stop string)."""
        found = [(index, stop) for stop in self._stop if (index := text.find(stop)) >= 0]
        return min(found, key=lambda item: (item[0] + len(item[1]), item[0]), default=None)

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of the held text that is the start of some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest


def push_many(items: list[tuple[TextStream, list[int]]]) -> list[StreamDelta]:
    """TextStream.push for several streams at once, their windows decoded together: round r takes
    the r-th new id of every stream still going and decodes all their windows in one decode_many
    per tokenizer. Each stream's deltas are those its own pushes would give, whatever it is pushed
    with. (One decode call per window held the GIL and was the largest part of a neuron's work per
    streamed token, bench/NOTES.md, session 9.) Streams with a DecodeStream take their ids through
    it instead, one call an id."""
    released: list[list[str]] = [[] for _ in items]
    stops: list[str | None] = [None] * len(items)
    used = [0] * len(items)
    live = []
    for i, (stream, ids) in enumerate(items):
        if not ids or stream._stopped:
            continue
        if stream._decoder is not None:
            _decode_stream_push(stream, ids, released[i])
        else:
            live.append(i)
    step = 0
    while live:
        by_tokenizer: dict[int, list[int]] = {}
        for i in live:
            stream = items[i][0]
            stream._ids.append(items[i][1][step])
            by_tokenizer.setdefault(id(stream._tokenizer), []).append(i)
        going = []
        for group in by_tokenizer.values():
            windows = [w for i in group for w in items[i][0]._windows()]
            texts = items[group[0]][0]._tokenizer.decode_many(windows)
            for k, i in enumerate(group):
                text, stop = items[i][0]._advance(texts[2 * k], texts[2 * k + 1])
                released[i].append(text)
                used[i] = step + 1
                if stop is not None:
                    stops[i] = stop
                elif step + 1 < len(items[i][1]):
                    going.append(i)
        live = going
        step += 1
    return [StreamDelta("".join(text), stop, count) if stop is not None
            else StreamDelta("".join(text), None, 0 if stream._stopped else len(ids))
            for text, stop, count, (stream, ids) in zip(released, stops, used, items)]


def _decode_stream_push(stream: TextStream, ids: list[int], released: list[str]) -> None:
    """`ids` through the stream's DecodeStream, their texts appended to `released`. Should it raise,
    the stream goes on with the window algorithm from the first id the DecodeStream still held (on
    a byte-level decoder a fresh window can start there)."""
    backend = stream._tokenizer._backend
    for k, token in enumerate(ids):
        try:
            text = stream._decoder.step(backend, token)
        except Exception:  # noqa: BLE001 - the window algorithm gives the text instead
            stream._prefix = stream._read = len(stream._ids) - len(stream._held)
            stream._decoder = None
            released.append(push_many([(stream, ids[k:])])[0].text)
            return
        stream._ids.append(token)
        if text is None:
            stream._held.append(token)
        else:
            stream._held.clear()
            released.append(text)
