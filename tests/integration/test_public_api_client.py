"""A client that has only protos/cortex/v1/cortex.proto: it compiles that one file with grpcio-tools
into an empty directory and, with nothing of this repository importable, lists the nodes of a real
cortex, loads a model, streams a generation and asks for logits.

The client runs in a subprocess started with `-I -S` (no site processing, so the editable install's
path hook is not run either) whose sys.path is the temporary directory plus the directories that
hold grpcio, protobuf and grpcio-tools; it checks that `cortex`, `neuron` and `common` of this
repository cannot be imported before it starts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import google.protobuf
import grpc
import grpc_tools
import pytest

from tests.helpers import MODELS, ROOT, start_cortex, start_neuron

pytestmark = pytest.mark.slow

CLIENT = r'''
import importlib.util, json, sys, time
out_dir, proto_root, cortex_address = sys.argv[1:4]

from grpc_tools import protoc
import grpc_tools, os
well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
code = protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out_dir}",
                    f"--grpc_python_out={out_dir}", "cortex/v1/cortex.proto"])
assert code == 0, "protoc failed"
sys.path.insert(0, out_dir)
import grpc
from cortex.v1 import cortex_pb2 as pb, cortex_pb2_grpc
assert pb.__file__.startswith(out_dir), pb.__file__
stub = cortex_pb2_grpc.CortexStub(grpc.insecure_channel(cortex_address))

deadline = time.monotonic() + 30
while True:
    nodes = stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes
    if any(n.state == pb.NODE_STATE_UP for n in nodes) or time.monotonic() > deadline:
        break
    time.sleep(0.1)
result = {"nodes": [{"address": n.address, "state": pb.NodeState.Name(n.state),
                     "devices": [{"id": d.id, "kind": d.kind, "total_bytes": d.total_bytes} for d in n.devices]}
                    for n in nodes]}

events = list(stub.LoadModel(pb.LoadModelRequest(name="clean", path="llama2", max_context=64, kv_slots=1),
                             timeout=60))
info = events[-1].model
result["load"] = {"state": pb.ModelState.Name(info.state), "progress": sum(e.HasField("progress") for e in events),
                  "shard_stages": sorted({e.progress.shard.stage for e in events if e.progress.shard.stage})}

request = pb.GenerateRequest(model="clean", prompt=pb.Prompt(tokens=pb.TokenIds(ids=[1, 45, 183])),
                             sampling=pb.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                             request_id="clean-client-1")
chunks = list(stub.Generate(request, timeout=60))
final = chunks[-1]
result["generate"] = {"token_ids": [t for c in chunks for t in c.token_ids],
                      "request_ids": sorted({c.request_id for c in chunks}),
                      "finish_reason": pb.FinishReason.Name(final.finish_reason),
                      "completion_tokens": final.usage.completion_tokens, "prompt_tokens": final.usage.prompt_tokens,
                      "ttft_ms": final.timing.time_to_first_token_ms}
unnamed = list(stub.Generate(pb.GenerateRequest(model="clean", prompt=request.prompt,
                                                sampling=pb.SamplingParams(max_tokens=2, ignore_eos=True)),
                             timeout=60))
result["generated_ids"] = sorted({c.request_id for c in unnamed})
logits = stub.Forward(pb.ForwardRequest(model="clean", token_ids=[1, 45]), timeout=60).logits
result["forward"] = {"shape": list(logits.shape), "dtype": logits.dtype, "bytes": len(logits.data)}
stub.UnloadModel(pb.UnloadModelRequest(name="clean"), timeout=30)
print(json.dumps(result))
'''

GUARD = r'''
import importlib.util, sys
for name in ("common", "neuron", "cortex"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable: the repository is on sys.path"
'''


def _library_dirs() -> list[str]:
    """Where grpcio, protobuf and grpcio-tools are installed (normally one site-packages)."""
    dirs = [Path(grpc.__file__).parents[1], Path(google.protobuf.__file__).parents[2],
            Path(grpc_tools.__file__).parents[1]]
    assert ROOT not in dirs
    return list(dict.fromkeys(str(d) for d in dirs))


@pytest.fixture(scope="module")
def fleet():
    neuron = start_neuron("cpu:0", [MODELS])
    cortex = start_cortex([neuron.address], extra=["--poll-seconds", "0.5"])
    try:
        yield cortex, neuron
    finally:
        cortex.kill()
        neuron.kill()


def test_a_client_with_only_cortex_proto_lists_nodes_and_streams_a_generation(fleet, tmp_path):
    cortex, neuron = fleet
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    script = tmp_path / "client.py"
    # sys.path: the standard library (-S: no site-packages), the libraries and the stubs' directory
    # (added by the script); -I: no script directory, no PYTHON* variables.
    script.write_text(f"import sys\nsys.path += {_library_dirs()!r}\n" + GUARD + CLIENT)
    done = subprocess.run([sys.executable, "-I", "-S", str(script), str(stubs), str(ROOT / "protos"),
                           cortex.address], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (stubs / "cortex" / "v1").glob("*.py")) == ["cortex_pb2.py", "cortex_pb2_grpc.py"]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    (node,) = result["nodes"]
    assert node["address"] == neuron.address and node["state"] == "NODE_STATE_UP"
    assert [d["id"] for d in node["devices"]] == ["cpu:0"] and node["devices"][0]["total_bytes"] > 0

    assert result["load"]["state"] == "MODEL_STATE_READY" and result["load"]["progress"] > 0
    assert result["load"]["shard_stages"], "progress events carry the shard's LoadProgress"

    generated = result["generate"]
    assert len(generated["token_ids"]) == 6 and generated["completion_tokens"] == 6
    assert generated["prompt_tokens"] == 3 and generated["finish_reason"] == "FINISH_REASON_LENGTH"
    assert generated["ttft_ms"] > 0
    assert generated["request_ids"] == ["clean-client-1"], "every chunk carries the given request id"
    (made,) = result["generated_ids"]
    assert made, "a request without an id gets one from cortex, the same on every chunk"

    assert result["forward"]["dtype"] == "float32" and len(result["forward"]["shape"]) == 1
    assert result["forward"]["bytes"] == 4 * result["forward"]["shape"][0]
