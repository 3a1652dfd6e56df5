"""The serving baseline: Hugging Face transformers batched `generate` (eager, no compile) on the same
checkpoint, at the batch sizes the serving benchmark runs, greedy, every sequence the same length
(no padding) and exactly --tokens new tokens each.

    python bench/hf_batch_baseline.py DIR --batches 1,8,64 --prompt-tokens 128 --tokens 128 --out r.json
    python bench/hf_batch_baseline.py DIR --batches 32 --prefix-tokens 2048 --prompt-tokens 64 ...  # shared prefix

Runs in its own process (serving_bench.py starts it) so torch never shares a process with CuPy.
Writes {"batches": {B: {tok_s, ttft_ms, seconds} | {error}}} plus the versions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="distinct tokens per sequence")
    parser.add_argument("--prefix-tokens", type=int, default=0, help="tokens every sequence starts with")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    result = {"torch": torch.__version__, "transformers": transformers.__version__, "mode": "eager",
              "device": args.device, "batches": {}}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device_map=args.device)
    model.eval()
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", "")
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    prefix = torch.randint(3, vocab, (1, args.prefix_tokens), generator=gen)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    class Clock(BaseStreamer):
        """generate() hands the streamer the prompt, then each step's new tokens: one stamp per step."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    @torch.inference_mode()
    def run(batch: int, new: int) -> dict:
        distinct = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=gen)
        ids = torch.cat([prefix.expand(batch, -1), distinct], dim=1).to(device)
        clock = Clock()
        sync()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, streamer=clock)
        sync()
        seconds = time.perf_counter() - t0
        first = clock.times[1] if len(clock.times) > 1 else t0 + seconds
        return {"tok_s": batch * new / seconds, "ttft_ms": (first - t0) * 1e3, "seconds": seconds}

    for batch in (int(b) for b in args.batches.split(",") if b):
        try:
            run(batch, 2)  # warm-up: allocator and kernels at this batch size
            result["batches"][batch] = run(batch, args.tokens)
        except Exception as err:  # noqa: BLE001 - an out-of-memory batch size is a result, not a crash
            result["batches"][batch] = {"error": repr(err)[:500]}
            if cuda:
                torch.cuda.empty_cache()
        print(json.dumps({batch: result["batches"][batch]}), flush=True)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
