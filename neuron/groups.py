"""Tensor-parallel groups on a neuron: membership, communicators, and the leader's step fan-out.

Rank 0 (the leader) runs the scheduler and sampling. Before each turn's model pass it hands the
turn's flat inputs (BatchInputs: token ids, positions, slot mapping, block tables) to every follower:
through the follower's device queue when the rank is on this neuron, through one long-lived
FollowSteps stream per other neuron otherwise. All ranks then run the pass in lockstep on identical
inputs; the all-reduces inside it keep them together. A follower that reported an error fails the
leader's next turn at once instead of leaving it to the step deadline.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import grpc
import structlog

from common.rpc.channels import PLAINTEXT, ChannelSecurity, aio_channel

import numpy as np

from .collectives import CollectiveError, Communicator
from .runner.batch import BatchInputs
from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc

log = structlog.get_logger(__name__)


@dataclass
class Group:
    id: str
    rank: int
    size: int
    worker: object               # the DeviceWorker of this rank's device
    comm: Communicator
    members: list[pb.GroupMember]
    step_timeout: float
    handle: int | None = None    # this rank's shard, once loaded
    followers: "Followers | None" = None


@dataclass
class GroupTable:
    """(group id, rank) -> Group, for the ranks this neuron holds."""
    groups: dict[tuple[str, int], Group] = field(default_factory=dict)

    def ranks_of(self, group_id: str) -> list[Group]:
        return [g for (gid, _), g in self.groups.items() if gid == group_id]

    def on_device(self, device_id: str) -> Group | None:
        return next((g for g in self.groups.values() if g.worker.spec.id == device_id), None)


class Followers:
    """The leader's view of the other ranks. `step` is called on the leader's device thread."""

    def __init__(self, group: Group, table: GroupTable, loop: asyncio.AbstractEventLoop,
                 submit_local: Callable[[Group, BatchInputs], object], channels: ChannelSecurity = PLAINTEXT):
        self.group, self.table, self.loop, self.submit_local = group, table, loop, submit_local
        leader_address = group.members[0].address
        self.local_ranks = [r for r, m in enumerate(group.members) if r and m.address == leader_address]
        remote = sorted({m.address for r, m in enumerate(group.members) if r and m.address != leader_address})
        self.streams = {address: RemoteFollower(address, group.id, loop, channels) for address in remote}
        self.step_no = 0
        self._local_futures: list = []   # the previous turn's local follower jobs

    def step(self, inputs: BatchInputs) -> None:
        """Hand one turn to every follower; raises CollectiveError when one has already failed."""
        self.check()
        self.step_no += 1
        self._local_futures = [self.submit_local(self.table.groups[(self.group.id, rank)], inputs)
                               for rank in self.local_ranks]
        if self.streams:
            command = step_command(self.group.id, self.step_no, inputs)
            for stream in self.streams.values():
                stream.send(command)

    def check(self) -> None:
        for stream in self.streams.values():
            if stream.error is not None:
                raise CollectiveError(stream.error)
        for future in self._local_futures:
            if future is not None and future.done() and not future.cancelled() and future.exception() is not None:
                raise CollectiveError(f"a local follower rank failed: {future.exception()}")

    def drop_local(self) -> None:
        """After a failure: free the ranks on this neuron (remote ones free theirs when cortex
        unloads the model, or by themselves when this process dies)."""
        from .worker import DropShardJob
        for rank in self.local_ranks:
            group = self.table.groups.get((self.group.id, rank))
            if group is not None and group.handle is not None:
                group.worker.submit(DropShardJob(group.handle))

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()


def step_command(group_id: str, step: int, inputs: BatchInputs) -> pb.StepCommand:
    return pb.StepCommand(group_id=group_id, step=step, token_ids=inputs.token_ids.tolist(),
                          positions=inputs.positions.tolist(), slot_mapping=inputs.slot_mapping.tolist(),
                          query_start=inputs.query_start.tolist(), context_lens=inputs.context_lens.tolist(),
                          block_tables=inputs.block_tables.ravel().tolist(), max_blocks=inputs.block_tables.shape[1])


def inputs_of(command: pb.StepCommand) -> BatchInputs:
    """A follower's copy of its leader's turn (no logits rows: followers sample nothing)."""
    num_requests = len(command.context_lens)
    return BatchInputs(
        token_ids=np.asarray(command.token_ids, dtype=np.int32), positions=np.asarray(command.positions, dtype=np.int32),
        slot_mapping=np.asarray(command.slot_mapping, dtype=np.int64),
        query_start=np.asarray(command.query_start, dtype=np.int32),
        context_lens=np.asarray(command.context_lens, dtype=np.int32),
        block_tables=np.asarray(command.block_tables, dtype=np.int32).reshape(num_requests, command.max_blocks),
        logits_rows=np.zeros(0, dtype=np.int32))


class RemoteFollower:
    """One FollowSteps stream to another neuron; commands are queued from the device thread."""

    def __init__(self, address: str, group_id: str, loop: asyncio.AbstractEventLoop,
                 channels: ChannelSecurity = PLAINTEXT):
        self.address, self.group_id, self.loop, self.channels = address, group_id, loop, channels
        self.error: str | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.run_coroutine_threadsafe(self._pump(), loop)

    def send(self, command: pb.StepCommand) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, command)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, None)

    async def _commands(self):
        while (command := await self._queue.get()) is not None:
            yield command

    async def _pump(self) -> None:
        try:
            async with aio_channel(self.address, self.channels) as channel:
                async for ack in neuron_pb2_grpc.NeuronStub(channel).FollowSteps(self._commands()):
                    if ack.error:
                        self.error = f"follower {self.address}: {ack.error}"
                        log.warning("follower step failed", group=self.group_id, follower=self.address, error=ack.error)
        except grpc.aio.AioRpcError as err:
            self.error = f"follower {self.address} unreachable: {err.code().name} {err.details()}"
            log.warning("follower stream broke", group=self.group_id, follower=self.address, error=self.error)
