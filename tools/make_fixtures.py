#!/usr/bin/env python3
"""Make the tiny Hugging Face test fixtures and their transformers reference outputs.

CI has no torch, so the NumPy model code is checked against numbers recorded here once, with
torch + transformers, from tiny random-weight checkpoints. Run from the repository root:

    .venv-ref/bin/python tools/make_fixtures.py

Writes tests/fixtures/models/<name>/ (checkpoint + tokenizer) and
tests/fixtures/reference/<name>.{npz,json} plus reference/chat.json. Deterministic: fixed seeds,
single-threaded torch, npz written with fixed zip timestamps; rerunning rewrites identical
files (on the same CPU kind and library versions).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MODELS_DIR = FIXTURES / "models"
REFERENCE_DIR = FIXTURES / "reference"

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Training text for the tiny BPE. Plain English so that common words become single tokens.
CORPUS = """\
The river ran quietly past the old mill, and the miller's daughter sat on the stone wall to
watch the water. Every morning she counted the boats that came down from the hills: small
boats with red sails, long boats heavy with grain, and now and then a fast boat that carried
letters for the town. She liked the letters best, because each one was a small story that
had travelled a long way before it reached the people who would read it.

In the evening the wind turned cold and the light over the water grew soft and grey. The
miller came out with two cups of tea and asked her what she had seen. She told him about the
boats, the birds on the far bank, and a man who had waved to her from the bridge. He listened
and smiled, and said that the river was a better teacher than any book in the school.

A computer reads text as a list of numbers. A tokenizer splits the text into pieces, and each
piece has a number in a table called the vocabulary. The model reads the numbers, one after
another, and predicts which number should come next. When the model is small, the table is
small too, and many words are split into several short pieces.

Questions are a good way to learn. What is the capital of France? Paris is the capital of
France, and Rome is the capital of Italy. How many days are there in a week? There are seven
days in a week and twelve months in a year. Why is the sky blue? Light from the sun is
scattered by the air, and blue light is scattered more than red light.

The assistant answers the user politely and briefly. If the user asks for help, the
assistant explains each step in simple words, checks the result, and says what to do if
something goes wrong. Good answers are short, correct and kind.
"""

BOS, EOS, PAD, IM_START, IM_END = "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # trainer gives them ids 0..4 in this order
TOKENIZER_VOCAB_SIZE = 450

# ChatML, the format Qwen uses; no bos inside the template, like Qwen's.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE (GPT-2 / Llama 3 / Qwen style) trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    assert tok.get_vocab_size() == TOKENIZER_VOCAB_SIZE, tok.get_vocab_size()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def set_post_processor(tok: Tokenizer, add_bos: bool) -> None:
    """Put bos-adding in tokenizer.json itself, so raw `tokenizers` and transformers agree."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0",
            pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, tok.token_to_id(BOS))],
        )
        tok.post_processor = processors.Sequence([byte_level, bos])
    else:
        tok.post_processor = byte_level


def write_tokenizer_files(tok: Tokenizer, out: Path, add_bos: bool) -> None:
    tok = Tokenizer.from_str(tok.to_str())  # copy: post_processor differs per fixture
    set_post_processor(tok, add_bos)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        # transformers would otherwise "clean up" spaces in decode and differ from tokenizers
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(out / "tokenizer_config.json", cfg)


# ---------------------------------------------------------------------------------------------
# Fixture specs
# ---------------------------------------------------------------------------------------------

COMMON = dict(
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=256,
    hidden_act="silu",
    initializer_range=0.2,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that at head_dim 16 some frequencies are kept, some smoothed, some divided
    "original_max_position_embeddings": 64,
}


@dataclass
class Spec:
    name: str
    arch: str  # transformers class name
    config: dict
    add_bos: bool = True
    dtype: str = "float32"  # storage dtype of the weights
    max_shard_size: str | None = None  # set -> sharded safetensors + index
    vocab_multiple: int | None = None  # set -> config vocab rounded up (> tokenizer vocab)
    legacy_config: bool = False  # rewrite config.json in the transformers 4.x key style
    eos_token_ids: list[str] = field(default_factory=lambda: [EOS])
    seed: int = 0


SPECS = [
    Spec(
        "llama2",
        "LlamaForCausalLM",
        dict(num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
        seed=1000,
    ),
    Spec(
        "llama3",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(LLAMA3_ROPE),
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        ),
        dtype="bfloat16",
        legacy_config=True,  # like the real Llama 3.x configs on the Hub
        seed=2000,
    ),
    Spec(
        "llama_sharded",
        "LlamaForCausalLM",
        dict(num_key_value_heads=1, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
        max_shard_size="150KB",
        seed=3000,
    ),
    Spec(
        "mistral",
        "MistralForCausalLM",
        dict(num_key_value_heads=2, rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False),
        legacy_config=True,  # like the real Mistral configs on the Hub
        seed=4000,
    ),
    Spec(
        "qwen2",
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True),
        add_bos=False,
        vocab_multiple=64,  # like Qwen: embedding rows beyond the tokenizer
        eos_token_ids=[IM_END, EOS],  # a list, as in Qwen's generation_config
        seed=5000,
    ),
    Spec(
        "qwen3",
        "Qwen3ForCausalLM",
        dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=False),
        add_bos=False,
        eos_token_ids=[IM_END, EOS],
        seed=6000,
    ),
]

# ---------------------------------------------------------------------------------------------
# Model building
# ---------------------------------------------------------------------------------------------

WEIGHT_STD = 0.2  # much larger than real init: keeps logits well separated for greedy checks
BIAS_STD = 0.2
NORM_STD = 0.1  # norm weights are 1 + NORM_STD * randn so that a missing norm weight shows


def make_config(spec: Spec, vocab_size: int, tok: Tokenizer):
    cls = getattr(transformers, spec.arch).config_class
    kwargs = dict(COMMON, **spec.config)
    if spec.vocab_multiple:
        vocab_size = -(-vocab_size // spec.vocab_multiple) * spec.vocab_multiple
    cfg = cls(
        vocab_size=vocab_size,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=None,
        **kwargs,
    )
    cfg.dtype = spec.dtype
    return cfg


@torch.no_grad()
def reinit_weights(model, seed: int, tokenizer_vocab: int) -> None:
    """Deterministic random weights: N(0, WEIGHT_STD) matrices, random biases, norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied params appear once
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + NORM_STD * noise)
        elif name.endswith(".bias"):
            p.copy_(BIAS_STD * noise)  # recent transformers init Qwen2 biases to zero
        else:
            p.copy_(WEIGHT_STD * noise)
    # Padded vocab rows are never trained in real checkpoints; zero them (tied: lm_head too).
    model.get_input_embeddings().weight[tokenizer_vocab:] = 0.0
    if model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight[tokenizer_vocab:] = 0.0


def to_legacy_config(path: Path) -> None:
    """Rewrite config.json with transformers 4.x keys (torch_dtype, rope_theta, rope_scaling).

    transformers 5 writes `dtype` and `rope_parameters`; checkpoints on the Hub mostly use the
    old keys. Our loader must read both, so some fixtures carry each style.
    """
    cfg = json.loads(path.read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    write_json(path, dict(sorted(cfg.items())))


def build_checkpoint(spec: Spec, tok: Tokenizer, out: Path, seed: int):
    """Create, randomize and save one checkpoint; returns the in-memory model (storage dtype)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = make_config(spec, tok.get_vocab_size(), tok)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.arch)(cfg).eval()
    reinit_weights(model, seed, tok.get_vocab_size())
    model = model.to(getattr(torch, spec.dtype))
    save_kwargs = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    if spec.legacy_config:
        to_legacy_config(out / "config.json")
    write_tokenizer_files(tok, out, spec.add_bos)
    eos_ids = [tok.token_to_id(t) for t in spec.eos_token_ids]
    write_json(
        out / "generation_config.json",
        {
            "bos_token_id": tok.token_to_id(BOS),
            "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
            "pad_token_id": tok.token_to_id(PAD),
        },
    )
    return model


# ---------------------------------------------------------------------------------------------
# Reference outputs
# ---------------------------------------------------------------------------------------------

PROMPT_TEXT = "The miller asked about the boats."
GREEDY_STEPS = 32
LONG_PROMPT_LEN = 100
MIN_MARGIN = 1e-2  # 10x what fp32 tests need: headroom for fp16/bf16 runs on devices
SEEDS_TO_TRY = 50


def load_reference_model(path: Path):
    """Load from disk, as a user would: checks the saved files, not just the in-memory model."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@torch.no_grad()
def logits_for(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.no_grad()
def greedy(model, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Argmax loop over full forwards; never stops at eos. Returns ids and the smallest margin."""
    ids, margins = list(prompt), []
    for _ in range(steps):
        last = logits_for(model, ids)[-1]
        top2 = torch.topk(last, 2).values
        margins.append(float(top2[0] - top2[1]))
        ids.append(int(torch.argmax(last)))
    return ids[len(prompt):], min(margins)


def long_prompt_ids(tok: Tokenizer, add_bos: bool, seed: int) -> list[int]:
    """Random non-special ids: long context without needing a long text."""
    rng = np.random.RandomState(seed)
    first = len(SPECIAL_TOKENS)
    n = LONG_PROMPT_LEN - int(add_bos)
    ids = rng.randint(first, tok.get_vocab_size(), size=n).tolist()
    return ([tok.token_to_id(BOS)] if add_bos else []) + ids


def check_same_weights(saved_model, loaded_model) -> None:
    """The loaded fp32 weights must be exactly the saved ones upcast (no re-init of missing keys)."""
    saved = {k: v.float() for k, v in saved_model.state_dict().items()}
    loaded = loaded_model.state_dict()
    assert saved.keys() == loaded.keys(), saved.keys() ^ loaded.keys()
    for k, v in saved.items():
        assert torch.equal(v, loaded[k]), f"weight {k} changed on save/load"


def check_loaded_config(spec: Spec, path: Path) -> None:
    """Whatever key style config.json uses, transformers must read back what we meant."""
    cfg = AutoConfig.from_pretrained(path)
    want = dict(spec.config.get("rope_scaling") or {"rope_type": "default"})
    want["rope_theta"] = spec.config["rope_theta"]
    assert cfg.rope_parameters == want, (spec.name, cfg.rope_parameters, want)
    assert cfg.tie_word_embeddings == spec.config["tie_word_embeddings"]
    assert cfg.num_key_value_heads == spec.config["num_key_value_heads"]
    assert str(cfg.dtype).removeprefix("torch.") == spec.dtype, (spec.name, cfg.dtype)
    assert getattr(cfg, "sliding_window", None) is None


def check_llama3_rope(model) -> dict:
    """At these sizes the llama3 scaling must keep, smooth and divide some frequencies each."""
    cfg = model.config
    dim = cfg.head_dim
    base = cfg.rope_parameters["rope_theta"]
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled = model.model.rotary_emb.inv_freq.float()
    ratio = (plain / scaled).tolist()
    kept = sum(1 for r in ratio if abs(r - 1) < 1e-6)
    divided = sum(1 for r in ratio if abs(r - LLAMA3_ROPE["factor"]) < 1e-4)
    smoothed = len(ratio) - kept - divided
    assert kept and divided and smoothed, ratio
    return {"kept": kept, "smoothed": smoothed, "divided_by_factor": divided}


def check_tokenizer_agreement(path: Path, texts: list[str]) -> None:
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(path)
    for text in texts:
        a = raw.encode(text).ids
        b = hf(text)["input_ids"]
        assert a == b, (path.name, text, a, b)
        for skip in (False, True):
            assert raw.decode(a, skip_special_tokens=skip) == hf.decode(b, skip_special_tokens=skip)


def make_fixture(spec: Spec, tok: Tokenizer) -> None:
    out = MODELS_DIR / spec.name
    for seed in range(spec.seed, spec.seed + SEEDS_TO_TRY):
        saved = build_checkpoint(spec, tok, out, seed)
        model = load_reference_model(out)
        check_same_weights(saved, model)
        check_loaded_config(spec, out)
        hf_tok = AutoTokenizer.from_pretrained(out)
        prompt = hf_tok(PROMPT_TEXT)["input_ids"]
        greedy_ids, margin = greedy(model, prompt, GREEDY_STEPS)
        if margin > MIN_MARGIN:
            break
        print(f"  {spec.name}: seed {seed} min margin {margin:.2e} too small, next seed")
    else:
        raise RuntimeError(f"{spec.name}: no seed gave a greedy margin > {MIN_MARGIN}")

    check_tokenizer_agreement(out, [PROMPT_TEXT] + SAMPLE_TEXTS)
    assert (prompt[0] == tok.token_to_id(BOS)) == spec.add_bos
    long_ids = long_prompt_ids(tok, spec.add_bos, seed)
    logits_all = logits_for(model, prompt)
    long_last = logits_for(model, long_ids)[-1]
    long_top2 = torch.topk(long_last, 2).values
    arrays = {
        "prompt_ids": np.asarray(prompt, dtype=np.int64),
        "logits_last": logits_all[-1].numpy().astype(np.float32),
        "logits_all": logits_all.numpy().astype(np.float32),
        "greedy_ids": np.asarray(greedy_ids, dtype=np.int64),
        "long_prompt_ids": np.asarray(long_ids, dtype=np.int64),
        "long_logits_last": long_last.numpy().astype(np.float32),
    }
    save_npz(REFERENCE_DIR / f"{spec.name}.npz", arrays)

    meta = {
        "arch": spec.arch,
        "prompt_text": PROMPT_TEXT,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "seed": seed,
        "min_greedy_margin": margin,
        "long_last_margin": float(long_top2[0] - long_top2[1]),
        "weights_dtype": spec.dtype,
        "reference_dtype": "float32",
        "attn_implementation": "eager",
        "config_key_style": "transformers4 (torch_dtype, rope_theta, rope_scaling)"
        if spec.legacy_config
        else "transformers5 (dtype, rope_parameters)",
        "add_bos": spec.add_bos,
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "config_vocab_size": model.config.vocab_size,
        "eos_in_greedy": tok.token_to_id(EOS) in greedy_ids,
    }
    if spec.config.get("rope_scaling", {}).get("rope_type") == "llama3":
        meta["llama3_rope_frequencies"] = check_llama3_rope(model)
    write_json(REFERENCE_DIR / f"{spec.name}.json", meta)
    print(f"  {spec.name}: seed {seed}, prompt {len(prompt)} tokens, min margin {margin:.3f}")


# ---------------------------------------------------------------------------------------------
# Batch references: greedy tokens of prompts of many lengths, each run alone (the serving engine's
# batch-invariance tests run them concurrently and compare). A separate file per fixture, so the
# files above keep their bytes.
# ---------------------------------------------------------------------------------------------

BATCH_PROMPT_LENGTHS = [2, 5, 9, 16, 17, 30, 47, 70]  # around the 16-token KV block boundary too


def make_batch_reference(spec: Spec) -> None:
    out = MODELS_DIR / spec.name
    model = load_reference_model(out)
    meta = json.loads((REFERENCE_DIR / f"{spec.name}.json").read_text())
    first = len(SPECIAL_TOKENS)
    prompts, outputs, margins = [], [], []
    for length in BATCH_PROMPT_LENGTHS:
        rng = np.random.RandomState(meta["seed"] * 100 + length)
        for _ in range(SEEDS_TO_TRY):
            prompt = rng.randint(first, TOKENIZER_VOCAB_SIZE, size=length).tolist()
            ids, margin = greedy(model, prompt, GREEDY_STEPS)
            if margin > MIN_MARGIN:
                break
        else:
            raise RuntimeError(f"{spec.name}: no batch prompt of length {length} with a greedy margin > {MIN_MARGIN}")
        prompts.append(prompt)
        outputs.append(ids)
        margins.append(margin)
    save_npz(REFERENCE_DIR / f"{spec.name}_batch.npz", {
        "prompt_lengths": np.asarray(BATCH_PROMPT_LENGTHS, dtype=np.int64),
        "prompt_ids": np.asarray([t for p in prompts for t in p], dtype=np.int64),
        "greedy_ids": np.asarray(outputs, dtype=np.int64),
    })
    write_json(REFERENCE_DIR / f"{spec.name}_batch.json", {
        "what": "greedy_ids[i]: 32 argmax tokens (full forwards, not stopped at eos) after prompt i alone",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "reference_dtype": "float32",
        "attn_implementation": "eager",
        "min_greedy_margins": margins,
    })
    print(f"  {spec.name}: batch references for prompts of {BATCH_PROMPT_LENGTHS} tokens")


# ---------------------------------------------------------------------------------------------
# Chat template and tokenizer samples
# ---------------------------------------------------------------------------------------------

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And the capital of Italy?"},
]

SAMPLE_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé, déjà vu, Straße, Ελληνικά, 日本語",
    "Emoji: 🙂 🚀 👍🏽 👨‍👩‍👧",
    "  leading spaces, tabs\tand   runs   of spaces\n\n\nand newlines\r\n",
    "special tokens in text: <|im_start|>user\nhi<|im_end|></s>",
    "",
]


def make_chat_reference(tok_dir: Path) -> None:
    """Chat template output and encode/decode pairs, from the bos-adding (llama) tokenizer."""
    hf = AutoTokenizer.from_pretrained(tok_dir)
    text = hf.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = hf.apply_chat_template(CHAT_MESSAGES, tokenize=True, add_generation_prompt=True)
    if not isinstance(chat_ids, list):  # transformers 5 may return a BatchEncoding
        chat_ids = chat_ids["input_ids"]
    # apply_chat_template tokenizes without special tokens: the template text is all there is
    assert chat_ids == hf(text, add_special_tokens=False)["input_ids"]
    samples = []
    for s in SAMPLE_TEXTS:
        ids = hf(s)["input_ids"]
        ids_plain = hf(s, add_special_tokens=False)["input_ids"]
        samples.append(
            {
                "text": s,
                "ids": ids,
                "ids_no_special": ids_plain,
                "decode": hf.decode(ids, skip_special_tokens=False),
                "decode_skip_special": hf.decode(ids, skip_special_tokens=True),
            }
        )
    write_json(
        REFERENCE_DIR / "chat.json",
        {
            "tokenizer": f"models/{tok_dir.name}",
            "note": "ids: encode with add_special_tokens=True (adds bos here); "
            "ids_no_special: what tokenizers without bos (qwen2, qwen3) give for the same text; "
            "chat_ids: apply_chat_template(tokenize=True), which adds no special tokens.",
            "messages": CHAT_MESSAGES,
            "add_generation_prompt": True,
            "chat_text": text,
            "chat_ids": chat_ids,
            "special_token_ids": {t: hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
            "vocab_size": len(hf),
            "samples": samples,
        },
    )


# ---------------------------------------------------------------------------------------------
# Deterministic file writing
# ---------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    """Indented JSON, but lists of numbers on one line so token id lists stay readable."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    text = re.sub(
        r"\[([-\d.,\se]*\d)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
    path.write_text(text + "\n", encoding="utf-8")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez, but with a fixed zip timestamp so reruns give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())


def main() -> None:
    torch.set_num_threads(1)  # reduction order, hence the last bits of logits, fixed
    torch.use_deterministic_algorithms(True)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    print(f"tokenizer: {tok.get_vocab_size()} tokens")
    if "--batch-only" not in sys.argv:  # the batch references alone read the saved checkpoints
        for spec in SPECS:
            make_fixture(spec, tok)
        make_chat_reference(MODELS_DIR / "llama2")
    for spec in SPECS:
        make_batch_reference(spec)


if __name__ == "__main__":
    main()
