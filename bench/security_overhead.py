"""What security costs on the CPU path: the same fleet (cortex + two single-device CPU neurons, a
TP=2 model across them and a TP=1 copy) open and secured (API keys, cluster token, mutual TLS,
TLS in the CPU collectives), measured in one run.

    python bench/security_overhead.py [--tokens 64] [--calls 200]

Figures: ListModels round trip through cortex (p50/p99 ms; the per-call cost of TLS and the key
check), greedy decode tokens/s through cortex for TP=1 and TP=2 (TP=2 all-reduces every layer over
the TCP engine, so it shows the collectives' TLS cost). Writes bench/results/security_overhead-*.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, commit  # noqa: E402
from cortex.client import CortexClient  # noqa: E402
from cortex.local import cortex_args, neuron_args, start_server  # noqa: E402
from tools.make_dev_certs import make_dev_certs  # noqa: E402

MODEL_DIR = ROOT / "tests" / "fixtures" / "models"
PROMPT = [1, 45, 383, 310, 344, 338]


def fleet(workdir: Path, secured: bool, secrets: Path):
    node = ["--tls-cert", str(secrets / "node.pem"), "--tls-key", str(secrets / "node-key.pem"),
            "--tls-ca", str(secrets / "ca.pem"), "--cluster-token-file", str(secrets / "cluster-token")]
    cortex = start_server("cortex", "cortex.cli", cortex_args(poll_seconds=0.5, extra=(
        [*node, "--api-keys", str(secrets / "api-keys")] if secured else [])), workdir)
    neurons = [start_server(f"neuron{i}", "neuron.cli", neuron_args("cpu:0", [MODEL_DIR], cortex=cortex.address,
                                                                     extra=node if secured else []), workdir)
               for i in range(2)]
    admin_key = next(line.split()[0] for line in (secrets / "api-keys").read_text().splitlines()
                     if line.endswith(" admin"))
    client = CortexClient(cortex.address, timeout=60, **(
        {"api_key": admin_key, "tls_ca": str(secrets / "ca.pem")} if secured else {}))
    return cortex, neurons, client


def measure(client: CortexClient, tokens: int, calls: int) -> dict:
    deadline = time.monotonic() + 30
    while len([n for n in client.nodes() if n.state == 1]) < 2:
        if time.monotonic() > deadline:
            raise SystemExit("the neurons did not come up")
        time.sleep(0.2)
    client.load_wait("llama2", "tp2", tp=2)
    client.load_wait("llama2", "tp1")
    lat = []
    for _ in range(calls):
        t = time.perf_counter()
        client.models()
        lat.append((time.perf_counter() - t) * 1e3)
    out = {"list_models_p50_ms": statistics.median(lat),
           "list_models_p99_ms": sorted(lat)[int(0.99 * (len(lat) - 1))]}
    for model in ("tp1", "tp2"):
        rates = []
        for _ in range(3):
            final = list(client.generate(model, token_ids=PROMPT, max_tokens=tokens, temperature=0,
                                         ignore_eos=True))[-1]
            rates.append(final.timing.decode_tokens_per_second)
        out[f"{model}_decode_tok_s"] = statistics.median(rates)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    secrets = Path(tempfile.mkdtemp(prefix="bench-secrets-"))
    make_dev_certs(secrets, tokens=True)
    results = {}
    for name, secured in (("open", False), ("secured", True)):
        cortex, neurons, client = fleet(Path(tempfile.mkdtemp(prefix=f"bench-{name}-")), secured, secrets)
        try:
            results[name] = measure(client, args.tokens, args.calls)
        finally:
            client.close()
            for server in (cortex, *neurons):
                server.stop()
    print(f"commit {commit()}   CPU, tiny llama2 fixture, {args.tokens} greedy tokens, {args.calls} ListModels calls")
    print(f"{'metric':28} {'open':>10} {'secured':>10} {'ratio':>7}")
    for metric in results["open"]:
        a, b = results["open"][metric], results["secured"][metric]
        print(f"{metric:28} {a:10.2f} {b:10.2f} {b / a:7.2f}")
    out = ROOT / "bench" / "results" / f"security_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"commit": commit(), "tokens": args.tokens, "calls": args.calls, **results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
