"""The baseline: Hugging Face transformers `generate` on the same checkpoint, batch 1, greedy.

    python bench/hf_baseline.py DIR --mode eager --tokens 64 --out result.json
    python bench/hf_baseline.py DIR --mode compile --tokens 64 --out result.json   # static cache + torch.compile

Runs in its own process (decode_bench.py starts it with a time budget) so that torch and CuPy never
share a process and a compile that overruns can be stopped. Prints and writes one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--mode", choices=["eager", "compile"], default="eager")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--ttft", default="128,2048", help="prompt lengths for time to first token")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-file", help="JSON list of token ids for the decode run (default: random 128)")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    result = {"mode": args.mode, "torch": torch.__version__, "transformers": transformers.__version__}
    path = Path(args.model)
    weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    torch.cuda.synchronize()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    result["load_seconds"] = time.perf_counter() - t
    result["load_gb_per_s"] = weight_bytes / result["load_seconds"] / 1e9
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", "")
    model.eval()
    if args.mode == "compile":
        # transformers compiles the forward itself (torch.compile, mode "reduce-overhead": CUDA
        # graphs) when generate runs with a static cache; wrapping model.forward by hand as well
        # breaks its CUDA-graph bookkeeping ("accessing tensor output of CUDAGraphs that has been
        # overwritten"), seen with transformers 5.17.
        model.generation_config.cache_implementation = "static"
        result["compile"] = "generation_config.cache_implementation='static' (generate auto-compiles the forward)"

    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = model.config.vocab_size

    def prompt(n: int):
        return torch.randint(3, vocab, (1, n), generator=gen).to("cuda")

    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """generate() hands the streamer the prompt, then each new token (as a CPU tensor, so the
        step has finished): one timestamp per token."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    @torch.inference_mode()
    def run(ids, new: int, clock=None) -> tuple[float, list[int]]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, streamer=clock)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()

    ids = prompt(128)
    if args.prompt_file:
        ids = torch.tensor([json.loads(Path(args.prompt_file).read_text())], device="cuda")
    t = time.perf_counter()
    run(ids, args.tokens)  # warm-up (and, in compile mode, the compilation; same shapes as below)
    run(ids, args.tokens)
    result["warmup_seconds"] = time.perf_counter() - t
    rates = []
    for _ in range(2):
        clock = Clock()
        _, tokens = run(ids, args.tokens, clock)
        stamps = clock.times[1:]  # [0] is the prompt
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result["decode_tok_s"] = max(rates)
    result["decode_tok_s_runs"] = rates
    result["tokens"] = tokens
    result["prompt_ids"] = ids[0].tolist()
    if args.mode == "eager":
        for n in (int(x) for x in args.ttft.split(",") if x):
            p = prompt(n)
            run(p, 1)
            result[f"ttft_{n}_ms"] = statistics.median(run(p, 1)[0] for _ in range(3)) * 1e3
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("tokens", "prompt_ids")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
