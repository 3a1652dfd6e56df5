"""Write a random-weight Llama checkpoint in Hugging Face layout, with a small byte-level BPE
tokenizer built in code: what `cortex demo` loads when no model is given, and what benchmarks use
to get real model shapes (Llama 3.2 1B, Llama 3.1 8B) without downloading weights.

Only numpy, safetensors, ml_dtypes and tokenizers are needed (no torch). Weights are written in
safetensors files of at most `max_shard_bytes`, one tensor at a time, so an 8B checkpoint needs
memory for its largest tensor, not for the whole model.

    from cortex.tiny_checkpoint import SHAPES, write_checkpoint
    write_checkpoint("/models/llama-1b-random", SHAPES["llama-3.2-1b"], dtype="bfloat16")
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from common.dtypes import DTYPES

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# What the tokenizer learns its merges from: any English text does.
CORPUS = """\
The cortex places models on the devices of its neurons and routes every request to the neuron that
holds the model. A neuron keeps one worker thread per device; the worker is the only thread that
touches its device, and it answers through futures. Tensor parallelism splits the attention heads
and the feed-forward columns of every layer over several devices, which then add up their partial
results with an all-reduce after each layer. The key and value cache is allocated once per sequence
slot, sized from the free memory of the device and the longest context the model should serve.
Tokens stream back to the client as soon as they are sampled, so the first words appear while the
rest of the answer is still being computed. When a node stops answering, its models become
unavailable and the other models keep serving; when it comes back, it registers again.
"""


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int = 0                  # 0: exactly the tokenizer's vocabulary
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0                    # 0: hidden_size // num_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 500000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def parameter_shapes(self, vocab_size: int) -> dict[str, tuple[int, ...]]:
        h, d, i = self.hidden_size, self.dim_per_head, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, h)}
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.num_heads * d, h),
                p + "self_attn.k_proj.weight": (self.num_kv_heads * d, h),
                p + "self_attn.v_proj.weight": (self.num_kv_heads * d, h),
                p + "self_attn.o_proj.weight": (h, self.num_heads * d),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (vocab_size, h)
        return shapes


_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES = {
    "tiny": LlamaShape(),
    # Published shapes of Meta's models (config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B).
    "llama-3.2-1b": LlamaShape(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                               num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=131072,
                               rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True),
    "llama-3.1-8b": LlamaShape(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                               num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                               rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Written:
    path: Path
    shape: LlamaShape
    dtype: str
    vocab_size: int
    num_parameters: int
    weight_bytes: int
    files: int
    seconds: float

    def describe(self) -> str:
        s = self.shape
        return (f"random-weight Llama: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads "
                f"({s.num_kv_heads} kv), vocab {self.vocab_size}, {self.num_parameters / 1e6:.1f}M parameters, "
                f"{self.dtype}, {self.weight_bytes / 2**20:.1f} MiB in {self.files} file(s)")


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (GPT-2 / Llama 3 style) that adds <s>; every byte is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.split("\n"), trainer=trainer)
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, BOS_ID)]),
    ])
    return tok


def build_covering_tokenizer(vocab_size: int, base: int = 512):
    """build_tokenizer(base) with merges added until its vocabulary is `vocab_size` tokens, so that
    every id a random-weight model of a real vocabulary (128,256 for Llama 3) samples decodes to
    text, as a real model's ids do (with the small tokenizer alone 99.7% of them decode to
    nothing, and a benchmark's streams carry no text). Each added token joins two printable ones
    (ASCII, so it decodes to whole characters) into one of at most 8 characters; the same
    arguments give the same tokenizer."""
    import random

    from tokenizers import Tokenizer

    tok = build_tokenizer(base)
    data = json.loads(tok.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("the base tokenizer's ids are not 0 .. n-1")
    by_id = {i: piece for piece, i in vocab.items()}
    pool = [by_id[i] for i in range(len(SPECIAL_TOKENS), len(vocab))
            if (text := tok.decode([i])) and all(32 <= ord(c) < 127 for c in text)]
    rng = random.Random(0)
    while len(vocab) < vocab_size:
        a, b = rng.choice(pool), rng.choice(pool)
        piece = a + b
        if piece in vocab or len(piece) > 8:
            continue
        vocab[piece] = len(vocab)
        merges.append([a, b])
        if len(piece) <= 4:
            pool.append(piece)
    return Tokenizer.from_str(json.dumps(data))


def write_checkpoint(directory: str | Path, shape: LlamaShape = SHAPES["tiny"], dtype: str = "float32",
                     seed: int = 0, max_shard_bytes: int = 2 << 30, tokenizer_vocab: int = 512,
                     readable: bool = False) -> Written:
    """Write config.json, generation_config.json, tokenizer files and safetensors weights.

    Weights are N(0, 0.02) (norms 1), like a freshly initialised Llama. With vocab_size 0 the model's
    vocabulary is the tokenizer's; a larger one (e.g. 128256 for the real shapes) leaves ids the
    tokenizer does not know, which decode to nothing.

    readable: random weights pick random tokens, and half of a byte-level vocabulary is bytes that
    are not printable on their own (they show as U+FFFD). With readable=True, lm_head rows of such
    tokens (and of special tokens) are zero and the others large, so generations are printable
    ASCII, if meaningless: for demos. Needs untied embeddings."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    started = time.perf_counter()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(min(tokenizer_vocab, shape.vocab_size or tokenizer_vocab))
    vocab_size = shape.vocab_size or tok.get_vocab_size()
    if vocab_size < tok.get_vocab_size():
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tok.get_vocab_size()}")
    _write_tokenizer(out, tok, shape)
    _write_json(out / "config.json", _config(shape, vocab_size, dtype))
    _write_json(out / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                                                  "pad_token_id": PAD_ID})

    rng = np.random.default_rng(seed)
    np_dtype = DTYPES[dtype]
    shapes = shape.parameter_shapes(vocab_size)
    if readable and shape.tie_word_embeddings:
        raise ValueError("readable=True needs untied embeddings (tie_word_embeddings=False)")
    row_scale = _readable_rows(tok, vocab_size) if readable else None
    groups = _group_by_size(shapes, np_dtype.itemsize, max_shard_bytes)
    weight_map, total = {}, 0
    for index, names in enumerate(groups, 1):
        file = "model.safetensors" if len(groups) == 1 else f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _random(rng, name, shapes[name], np_dtype,
                                 row_scale if name == "lm_head.weight" else None) for name in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    if len(groups) > 1:
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    parameters = sum(int(np.prod(s)) for s in shapes.values())
    return Written(out, shape, dtype, vocab_size, parameters, total, len(groups), time.perf_counter() - started)


def _random(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: np.dtype,
            row_scale: np.ndarray | None = None) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=dtype)
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= 0.02 if row_scale is None else row_scale[:, None]
    return values.astype(dtype, copy=False)


def _readable_rows(tok, vocab_size: int) -> np.ndarray:
    """lm_head row scales: 0 for tokens that do not decode to printable ASCII, else large enough
    that their logits (hidden states are RMS-normalised, norm ~ sqrt(hidden)) dominate."""
    scale = np.zeros(vocab_size, dtype=np.float32)
    for token_id in range(tok.get_vocab_size()):
        text = tok.decode([token_id])
        if text and all(32 <= ord(c) < 127 for c in text):
            scale[token_id] = 0.5
    return scale


def _group_by_size(shapes: dict[str, tuple[int, ...]], itemsize: int, limit: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _config(shape: LlamaShape, vocab_size: int, dtype: str) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": vocab_size, "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads, "head_dim": shape.dim_per_head,
        "max_position_embeddings": shape.max_position_embeddings, "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta, "tie_word_embeddings": shape.tie_word_embeddings,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "torch_dtype": dtype, "initializer_range": 0.02,
    }
    if shape.rope_scaling:
        config["rope_scaling"] = dict(shape.rope_scaling)
    return config


def _write_tokenizer(out: Path, tok, shape: LlamaShape) -> None:
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[PAD_ID], "add_bos_token": True,
        "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_position_embeddings, "chat_template": CHAT_TEMPLATE,
    })


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """python -m cortex.tiny_checkpoint DIR [--shape tiny|llama-3.2-1b|llama-3.1-8b] [--dtype D]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cortex.tiny_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-position-embeddings", type=int, default=0, help="override the shape's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.max_position_embeddings:
        shape = replace(shape, max_position_embeddings=args.max_position_embeddings)
    written = write_checkpoint(args.directory, shape, args.dtype, args.seed)
    print(f"wrote {written.path}: {written.describe()} in {written.seconds:.1f}s")
    print(json.dumps({**asdict(written), "path": str(written.path)}, default=str))


if __name__ == "__main__":
    main()
