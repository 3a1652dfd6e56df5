"""Tensor parallelism on two GPUs (NCCL, decode captured in CUDA graphs): a follower killed in the
middle of a generation ends the stream UNAVAILABLE within the step deadline, the leader neuron
lives on (its communicator aborts although a CUDA graph captured it), and its GPU serves again.
Parity of TP=2 with TP=1 on GPUs is bench/tp_gpu_check.py."""
from __future__ import annotations

import time

import pytest

from cortex.tiny_checkpoint import LlamaShape, write_checkpoint
from neuron.device import cuda_device_count
from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import start_neuron
from tests.integration.test_tensor_parallel import destroy, form_group, greedy, kill_follower_mid_stream

pytestmark = pytest.mark.gpu
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MID = LlamaShape(hidden_size=2048, intermediate_size=5632, num_layers=8, num_heads=16, num_kv_heads=4)


def test_killed_follower_on_gpus_fails_the_group_and_the_leader_lives(tmp_path):
    if cuda_device_count() < 2:
        pytest.skip("needs two GPUs")
    models = tmp_path / "models"
    write_checkpoint(models / "mid", MID, dtype="bfloat16", seed=1)
    leader = start_neuron(devices="0", model_roots=[models], env=ENV)
    follower = start_neuron(devices="1", model_roots=[models], env=ENV)
    try:
        with leader.channel() as cl, follower.channel() as cf:
            sl, sf = neuron_pb2_grpc.NeuronStub(cl), neuron_pb2_grpc.NeuronStub(cf)
            ranks = [(sl, leader.address, "0"), (sf, follower.address, "1")]
            group_id, handles = form_group(ranks, "mid", step_timeout_ms=3000)
            assert len(greedy(sl, handles[0], [5, 6, 7], n=16)) == 16  # the captured TP step runs
            kill_follower_mid_stream(sl, handles[0], follower, max_tokens=2000, within_s=3 + 3)
            time.sleep(0.5)
            assert leader.proc.poll() is None, "the leader neuron exited (NCCL abort hung?)"
            destroy(ranks[:1], group_id)
            # GPU 0 serves a model again
            info = list(sl.LoadShard(pb.LoadShardRequest(path="mid", device="0")))[-1].loaded
            assert len(greedy(sl, info.handle, [1, 2, 3], n=8)) == 8
            sl.DropShard(pb.DropShardRequest(handle=info.handle))
    finally:
        leader.kill()
        follower.kill()
