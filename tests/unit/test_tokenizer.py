"""Tokenizer, chat rendering and TextStream: against the fixture checkpoints and transformers'
reference output, and against small tokenizers built here so that multi-byte characters split
across tokens (byte-level BPE and SentencePiece-style byte fallback)."""
from __future__ import annotations

import datetime
import itertools
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from neuron.tokenizer import TextStream, Tokenizer, push_many
from common.errors import FailedPrecondition, InvalidArgument

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODELS = FIXTURES / "models"
REFERENCE = FIXTURES / "reference" / "chat.json"
MODEL_NAMES = sorted(p.name for p in MODELS.iterdir()) if MODELS.is_dir() else []
needs_fixtures = pytest.mark.skipif(
    not (MODELS.is_dir() and REFERENCE.is_file()),
    reason=f"fixture checkpoints ({MODELS}) or transformers reference ({REFERENCE}) not generated yet",
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello there, how are you today?",
    "Café, naïve, résumé, déjà vu, Straße.",
    "Ελληνικά and 日本語 text.",
    "Emoji: 🙂 🚀 👍🏽 👨‍👩‍👧 are fun.",
    "Stop here. Do not stop there. STOP!",
]
TEXTS = CORPUS + [
    "Unseen words: żółć, Ωμέγα, 🦄🌈, ﬁ ligature.",
    "  leading spaces, tabs\tand   runs\n\nof newlines\r\n",
    "",
]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Café? 🙂"}]


# ------------------------------------------------------------------ tokenizers built here

def byte_level_backend() -> HFTokenizer:
    """A GPT-2/Llama-3 style byte-level BPE with a small vocabulary: accented letters and emoji
    stay split into several tokens, often in the middle of a UTF-8 character."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return backend


def byte_fallback_backend() -> HFTokenizer:
    """A Llama-2 style SentencePiece BPE: "▁" for spaces, the decoder strips the first space,
    and characters outside the vocabulary fall back to <0xXX> byte tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?:'", "▁t", "▁th", "▁the", "he", "ll", "llo"]
    vocab.update({piece: len(vocab) + i for i, piece in enumerate(pieces)})
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("h", "e"), ("l", "l"), ("ll", "o")]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


TOKENIZER_CONFIG = {
    "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "special": True},
    "eos_token": "</s>",
    "chat_template": CHATML,
}


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return Tokenizer(byte_level_backend(), TOKENIZER_CONFIG, {"eos_token_id": [3, 1]})


@pytest.fixture(scope="module")
def byte_fallback() -> Tokenizer:
    return Tokenizer(byte_fallback_backend(), {"bos_token": "<s>", "eos_token": "</s>"}, {})


def with_template(tokenizer: Tokenizer, template: str | list | None, **config) -> Tokenizer:
    return Tokenizer(tokenizer._backend, {**TOKENIZER_CONFIG, **config, "chat_template": template})


def stream(tokenizer: Tokenizer, ids: list[int], stop: list[str] = (), chunk: int = 1):
    """Push ids in chunks; return (deltas, stop string or None, text of finish())."""
    return stream_groups(tokenizer, ids, [chunk] * -(-len(ids) // chunk), stop)[:3]


def stream_groups(tokenizer: Tokenizer, ids: list[int], sizes: list[int], stop: list[str] = ()):
    """Push ids in consecutive groups of the given sizes, as a server receives them merged.
    Returns (deltas, stop string or None, text of finish(), ids the output kept)."""
    text_stream = TextStream(tokenizer, list(stop))
    deltas, kept, start = [], 0, 0
    for size in sizes:
        delta = text_stream.push(ids[start:start + size])
        start += size
        deltas.append(delta.text)
        kept += delta.tokens
        if delta.stop is not None:
            assert text_stream.finish().text == ""
            return deltas, delta.stop, "", kept
    tail = text_stream.finish()
    return deltas, tail.stop, tail.text, kept


def compositions(n: int):
    """Every way to cut n items into consecutive non-empty groups (2 ** (n - 1) of them)."""
    for cuts in itertools.product((False, True), repeat=max(n - 1, 0)):
        sizes = [1]
        for cut in cuts:
            if cut:
                sizes.append(1)
            else:
                sizes[-1] += 1
        yield sizes


# ------------------------------------------------------------------ fixture checkpoints

@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def fixture_tokenizers() -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_dir(MODELS / name) for name in MODEL_NAMES}


@needs_fixtures
def test_fixture_models_load(fixture_tokenizers, reference):
    assert fixture_tokenizers, f"no checkpoints under {MODELS}"
    for name, tokenizer in fixture_tokenizers.items():
        generation_config = json.loads((MODELS / name / "generation_config.json").read_text())
        eos = generation_config["eos_token_id"]
        expected_eos = set(eos if isinstance(eos, list) else [eos]) | {reference["special_token_ids"]["</s>"]}
        assert tokenizer.vocab_size == reference["vocab_size"], name
        assert tokenizer.eos_token_ids == expected_eos, name
        assert tokenizer.bos_token_id == reference["special_token_ids"]["<s>"], name
        assert tokenizer.generation_config == generation_config, name


@needs_fixtures
def test_encode_decode_match_transformers(fixture_tokenizers, reference):
    tokenizer = Tokenizer.from_dir(FIXTURES / reference["tokenizer"])
    for sample in reference["samples"]:
        assert tokenizer.encode(sample["text"]) == sample["ids"]
        assert tokenizer.encode(sample["text"], add_special_tokens=False) == sample["ids_no_special"]
        assert tokenizer.decode(sample["ids"], skip_special_tokens=False) == sample["decode"]
        assert tokenizer.decode(sample["ids"]) == sample["decode_skip_special"]
    # Checkpoints whose tokenizer adds no BOS encode like ids_no_special, with special tokens on.
    for name, tokenizer in fixture_tokenizers.items():
        bos_added = tokenizer.encode("x")[0] == tokenizer.bos_token_id
        for sample in reference["samples"]:
            assert tokenizer.encode(sample["text"]) == sample["ids" if bos_added else "ids_no_special"], name


@needs_fixtures
def test_chat_matches_transformers(fixture_tokenizers, reference):
    assert reference["add_generation_prompt"] is True
    for name, tokenizer in fixture_tokenizers.items():
        assert tokenizer.render_chat(reference["messages"]) == reference["chat_text"], name
        # apply_chat_template(tokenize=True) adds no special tokens, even where encode() adds BOS.
        assert tokenizer.encode_chat(reference["messages"]) == reference["chat_ids"], name


@needs_fixtures
def test_text_stream_on_fixture_samples(fixture_tokenizers, reference):
    for name, tokenizer in fixture_tokenizers.items():
        for sample in reference["samples"]:
            for chunk in (1, 3):
                deltas, matched, tail = stream(tokenizer, sample["ids"], chunk=chunk)
                assert matched is None
                assert "".join(deltas) + tail == sample["decode_skip_special"], name


def test_from_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_dir(tmp_path) is None


def test_from_dir_reads_configs_and_template_file(tmp_path):
    byte_level_backend().save(str(tmp_path / "tokenizer.json"))
    config = {**TOKENIZER_CONFIG, "chat_template": [{"name": "tool_use", "template": "tools"},
                                                    {"name": "default", "template": "default"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "do_sample": True}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.chat_template == "default"
    assert tokenizer.eos_token_ids == {1, 3}
    assert tokenizer.bos_token_id == 0
    assert tokenizer.generation_config == {"eos_token_id": 3, "do_sample": True}
    # transformers saves templates as chat_template.jinja too; that file takes precedence.
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert Tokenizer.from_dir(tmp_path).chat_template == CHATML


def test_from_dir_without_optional_files(tmp_path):
    byte_level_backend().save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_ids == set()
    assert tokenizer.bos_token_id is None
    assert tokenizer.chat_template is None
    assert tokenizer.decode(tokenizer.encode("Café 🙂")) == "Café 🙂"


def test_from_dir_broken_json(tmp_path):
    byte_level_backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


# ------------------------------------------------------------------ encode / decode

@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
def test_round_trip(request, name):
    tokenizer = request.getfixturevalue(name)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<s>")


def test_special_ids(byte_level, byte_fallback):
    assert byte_level.bos_token_id == 0
    assert byte_level.eos_token_ids == {1, 3}  # eos_token "</s>" plus generation_config's list
    assert byte_level.vocab_size == 320
    assert byte_fallback.eos_token_ids == {2}


def test_multibyte_characters_are_split_across_tokens(byte_level, byte_fallback):
    # The premise of the streaming tests: some single tokens decode to a partial character.
    for tokenizer in (byte_level, byte_fallback):
        ids = tokenizer.encode("🦄 żółć", add_special_tokens=False)
        assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)


# ------------------------------------------------------------------ chat templates

def test_render_chat(byte_level):
    text = byte_level.render_chat(MESSAGES)
    assert text == ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                    "<|im_start|>user\nCafé? 🙂<|im_end|>\n<|im_start|>assistant\n")
    assert byte_level.render_chat(MESSAGES, add_generation_prompt=False) == text.removesuffix("<|im_start|>assistant\n")


def test_encode_chat_without_bos_in_template(byte_level):
    ids = byte_level.encode_chat(MESSAGES)
    assert ids == byte_level.encode(byte_level.render_chat(MESSAGES), add_special_tokens=False)
    assert byte_level.bos_token_id not in ids
    assert ids[0] == byte_level._backend.token_to_id("<|im_start|>")


def test_encode_chat_with_bos_in_template(byte_level):
    tokenizer = with_template(byte_level, "{{ bos_token }}" + CHATML)
    ids = tokenizer.encode_chat(MESSAGES)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_template_trims_blocks_like_transformers(byte_level):
    template = """{% for message in messages %}
    {% if message.role == 'user' %}
U: {{ message.content }}
    {% else %}
A: {{ message.content }}
    {% endif %}
{% endfor %}"""
    assert with_template(byte_level, template).render_chat(MESSAGES[:2]) == "U: Hi there\nA: Hello!\n"


def test_template_globals_and_filters(byte_level):
    tokenizer = with_template(
        byte_level, "{{ messages[-1] | tojson }}|{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}|{{ m.role }}{% endfor %}")
    rendered = tokenizer.render_chat(MESSAGES)
    assert rendered == (f'{{"role": "user", "content": "Café? 🙂"}}|{datetime.datetime.now().year}|<s>|</s>|user')


def test_template_raise_exception(byte_level):
    tokenizer = with_template(byte_level, "{{ raise_exception('Conversation roles must alternate user/assistant') }}")
    with pytest.raises(InvalidArgument, match="prompt.chat.*roles must alternate"):
        tokenizer.render_chat(MESSAGES)


def test_template_sandbox(byte_level):
    tokenizer = with_template(byte_level, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidArgument, match="prompt.chat"):
        tokenizer.render_chat(MESSAGES)


def test_template_syntax_error(byte_level):
    with pytest.raises(FailedPrecondition, match="chat template does not compile"):
        with_template(byte_level, "{% for m in messages %}").render_chat(MESSAGES)


def test_missing_template(byte_level):
    for template in (None, [{"name": "tool_use", "template": "x"}]):
        with pytest.raises(FailedPrecondition, match="no chat template.*prompt.text or prompt.tokens"):
            with_template(byte_level, template).encode_chat(MESSAGES)


def test_empty_chat(byte_level):
    with pytest.raises(InvalidArgument, match="prompt.chat.messages is empty"):
        byte_level.render_chat([])


# ------------------------------------------------------------------ TextStream

@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stream_equals_decode(request, name, chunk):
    tokenizer = request.getfixturevalue(name)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        deltas, matched, tail = stream(tokenizer, ids, chunk=chunk)
        assert matched is None
        assert "".join(deltas) + tail == tokenizer.decode(ids) == text
        assert not any("\ufffd" in delta for delta in deltas), "a partial character was emitted"


def test_stream_equals_decode_for_random_ids(byte_level):
    # Any id sequence, invalid UTF-8 included: byte-level decoding is prefix-stable, so the
    # stream must reproduce decode() exactly. (Byte-fallback decoders turn each token of an
    # invalid byte run into one U+FFFD, depending on where the run ends; no stream can match
    # that for garbage runs, which is why that tokenizer is tested on real text only.)
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(byte_level.vocab_size) for _ in range(rng.randrange(1, 40))]
        deltas, matched, tail = stream(byte_level, ids, chunk=rng.choice([1, 2, 3]))
        assert "".join(deltas) + tail == byte_level.decode(ids), ids


def test_streams_pushed_together_give_what_each_gives_alone(byte_level, byte_fallback):
    """push_many decodes every stream's windows in one call per round and tokenizer: each
    stream's deltas, stops and kept counts are those of its own pushes, whatever it is grouped
    with (streams of two tokenizers, with and without stop strings, stopping at different ids)."""
    def pieces(ids, sizes):
        starts = list(itertools.accumulate(sizes, initial=0))
        return [ids[a:b] for a, b in zip(starts, starts[1:])]

    rng = random.Random(1)
    stopped = 0
    for _ in range(40):
        cases = []
        for _ in range(rng.randrange(1, 7)):
            tokenizer = rng.choice([byte_level, byte_fallback])
            text = rng.choice([t for t in TEXTS if t])
            ids = tokenizer.encode(text, add_special_tokens=False)
            stop = rng.choice([[], [text[len(text) // 2:][:3]], ["\n", "zz"]])
            cases.append((tokenizer, stop, pieces(ids, [rng.randrange(1, 4) for _ in ids])))
        alone = []
        for tokenizer, stop, groups in cases:
            one = TextStream(tokenizer, stop)
            alone.append([one.push(group) for group in groups] + [one.finish()])
        streams = [TextStream(tokenizer, stop) for tokenizer, stop, _ in cases]
        together = [[] for _ in cases]
        for k in range(max(len(groups) for *_, groups in cases)):
            pushed = [i for i, (*_, groups) in enumerate(cases) if k < len(groups)]
            for i, delta in zip(pushed, push_many([(streams[i], cases[i][2][k]) for i in pushed])):
                together[i].append(delta)
        for i, stream_ in enumerate(streams):
            together[i].append(stream_.finish())
        assert together == alone
        stopped += sum(1 for deltas in together if any(d.stop for d in deltas))
    assert stopped > 0   # the stop strings were hit, not only passed through


def test_decode_stream_serves_byte_level_streams_without_stop_strings(byte_level, byte_fallback):
    assert TextStream(byte_level, [])._decoder is not None
    assert TextStream(byte_level, ["x"])._decoder is None      # stops: the window algorithm
    assert TextStream(byte_fallback, [])._decoder is None      # it raises on invalid byte runs


def test_a_failing_decode_stream_hands_over_to_the_window_algorithm(byte_level):
    """If tokenizers' DecodeStream raises, the stream carries on from the ids it held, with the same
    text as a stream that never used it."""
    class Failing:
        def __init__(self, inner, after):
            self.inner, self.left = inner, after

        def step(self, backend, token):
            if self.left == 0:
                raise RuntimeError("decode stream failed")
            self.left -= 1
            return self.inner.step(backend, token)

    text = "héllo wörld 🦄 and some more words"
    ids = byte_level.encode(text, add_special_tokens=False)
    for after in range(len(ids)):
        failing = TextStream(byte_level, [])
        failing._decoder = Failing(failing._decoder, after)
        deltas = [failing.push(ids[k:k + 2]).text for k in range(0, len(ids), 2)]
        assert failing._decoder is None
        assert "".join(deltas) + failing.finish().text == text, after
        assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
def test_stream_holds_partial_characters(request, name):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode("a🦄b", add_special_tokens=False)
    deltas, _, tail = stream(tokenizer, ids)
    assert "" in deltas  # a token that ended inside the emoji was held back...
    assert any("🦄" in delta for delta in deltas)  # ...and the emoji came out whole
    assert "".join(deltas) == "a🦄b" and tail == ""


def test_stream_flushes_incomplete_character_at_finish(byte_fallback):
    ids = byte_fallback.encode("ok🦄", add_special_tokens=False)[:-1]  # the last byte never came
    deltas, matched, tail = stream(byte_fallback, ids)
    assert "".join(deltas) == "ok" and tail.endswith("\ufffd")
    assert "".join(deltas) + tail == byte_fallback.decode(ids)


def test_stream_keeps_leading_space_after_special_token(byte_fallback):
    # SentencePiece decoders strip the first space of the text: only the very first one.
    ids = byte_fallback.encode("hello there", add_special_tokens=False)
    eos = byte_fallback._backend.token_to_id("</s>")
    mixed = [eos] + ids + [eos, eos] + ids[:3] + [eos] + ids[3:]
    deltas, _, tail = stream(byte_fallback, mixed)
    assert "".join(deltas) + tail == byte_fallback.decode(mixed) == "hello there hello there"


@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_stop_string(request, name, chunk):
    tokenizer = request.getfixturevalue(name)
    text = "Hello there, Stop here. Do not go on."
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, matched, tail = stream(tokenizer, ids, stop=["Stop"], chunk=chunk)
    assert matched == "Stop"
    assert "".join(deltas) == "Hello there, "
    assert tail == ""


@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
def test_stop_string_anywhere(request, name):
    # Every substring of the text, as the only stop string: the output is the text before it.
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(1)
    for text in filter(None, TEXTS):
        ids = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(20):
            start = rng.randrange(len(text))
            stop = text[start:start + rng.randrange(1, 8)]
            deltas, matched, _ = stream(tokenizer, ids, stop=[stop], chunk=rng.choice([1, 3]))
            assert matched == stop
            assert "".join(deltas) == text[:text.find(stop)]


def test_stop_string_prefix_is_held_then_released(byte_level):
    ids = byte_level.encode("Do not stop there. STOP!", add_special_tokens=False)
    text_stream = TextStream(byte_level, ["stop here", "STOP!"])
    emitted = ""
    for token_id in ids:
        delta, matched, _ = text_stream.push([token_id])
        emitted += delta
        # Text that could still become a stop string never leaves early.
        assert not emitted.endswith(("s", "st", "sto", "stop", "stop ", "stop h"))
        if matched:
            break
    assert matched == "STOP!"
    assert emitted == "Do not stop there. "


def test_earliest_stop_wins(byte_level):
    ids = byte_level.encode("Hello, world! Hello there", add_special_tokens=False)
    deltas, matched, _ = stream(byte_level, ids, stop=["there", "world", "llo, w"])
    assert matched == "llo, w" and "".join(deltas) == "He"


def test_stop_string_with_multibyte_characters(byte_level):
    ids = byte_level.encode("Emoji: 🙂 🚀 👍🏽 are fun.", add_special_tokens=False)
    deltas, matched, _ = stream(byte_level, ids, stop=["🚀"])
    assert matched == "🚀" and "".join(deltas) == "Emoji: 🙂 "


def test_unmatched_stop_prefix_comes_out_at_finish(byte_level):
    ids = byte_level.encode("Hello, world! Hello", add_special_tokens=False)
    deltas, matched, tail = stream(byte_level, ids, stop=["Hello there"])
    assert matched is None
    assert "".join(deltas) == "Hello, world! " and tail == "Hello"


def test_stream_is_over_after_stop(byte_level):
    text_stream = TextStream(byte_level, ["world"])
    ids = byte_level.encode("Hello, world!", add_special_tokens=False)
    delta = text_stream.push(ids)
    assert (delta.text, delta.stop) == ("Hello, ", "world")
    assert delta.tokens == next(k for k in range(len(ids) + 1) if "world" in byte_level.decode(ids[:k]))
    assert delta.tokens < len(ids), "the tokens after the stop string are not part of the output"
    assert text_stream.push(byte_level.encode(" more", add_special_tokens=False)) == ("", None, 0)
    assert text_stream.finish() == ("", None, 0)


@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
def test_stop_before_an_incomplete_character_at_the_end(request, name):
    # The stream ends (max_tokens) inside a character right after the stop string: the stop
    # string must still end the output, in whatever groups the ids arrive.
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode("ab STOP🦄", add_special_tokens=False)[:-1]  # the emoji's last byte never came
    assert tokenizer.decode(ids).rstrip("\ufffd").endswith("STOP")
    completing = next(k for k in range(len(ids) + 1) if "STOP" in tokenizer.decode(ids[:k]))
    for sizes in compositions(len(ids)):
        deltas, matched, tail, kept = stream_groups(tokenizer, ids, sizes, stop=["STOP"])
        assert (matched, "".join(deltas) + tail, kept) == ("STOP", "ab ", completing), sizes


@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
def test_stop_output_does_not_depend_on_grouping(request, name):
    # Text, stop string and the count of kept ids are the same for every grouping of the ids:
    # the count is the ids up to the one whose text completed the stop string.
    tokenizer = request.getfixturevalue(name)
    text = "Café 🙂 ok 🚀!"
    ids = tokenizer.encode(text, add_special_tokens=False)[:10]
    full = tokenizer.decode(ids)
    for stop in ("é 🙂", "🙂", "ok", "k 🚀", "nowhere"):
        completing = next((k for k in range(len(ids) + 1) if stop in tokenizer.decode(ids[:k])), len(ids))
        expected = (full[:full.find(stop)], stop) if stop in full else (full, None)
        for sizes in compositions(len(ids)):
            deltas, matched, tail, kept = stream_groups(tokenizer, ids, sizes, stop=[stop])
            assert ("".join(deltas) + tail, matched, kept) == (*expected, completing), (stop, sizes)


def test_stop_completed_first_wins(byte_level):
    # "bc" is complete one character before "abcd", so it wins however the ids are grouped.
    ids = byte_level.encode("xabcdy", add_special_tokens=False)
    for sizes in compositions(len(ids)):
        deltas, matched, tail, _ = stream_groups(byte_level, ids, sizes, stop=["abcd", "bc"])
        assert (matched, "".join(deltas) + tail) == ("bc", "xa"), sizes
