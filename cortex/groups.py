"""Tensor-parallel group formation, driven by cortex.

Ranks are chosen by placement. Then: rank 0's neuron mints a unique id (an NCCL unique id on GPUs,
a rendezvous token on CPU devices) -> every rank gets InitGroup at once (each call blocks until all
ranks joined, so they must be in flight together, all bounded by the same deadline) -> a sanity
all-reduce of ones must sum to the world size -> the group is ready for LoadShard. Whatever fails,
the error names the rank and node, and the caller tears the group down on every neuron.

GroupSanity and DestroyGroup name only the group, so they go once to each neuron that holds ranks
of it, and that neuron acts for all of its local ranks.
"""
from __future__ import annotations

import asyncio
import secrets
from typing import Awaitable, Callable

import grpc
import structlog

from common.proto.neuron.v1 import neuron_pb2 as npb
from common.errors import FailedPrecondition, ServiceError, from_rpc_error

from .placement import Target
from .registry import Registry

log = structlog.get_logger(__name__)

CREATE_ID_TIMEOUT_S = 30.0
DESTROY_TIMEOUT_S = 10.0


def new_group_id(model: str) -> str:
    return f"{model}-{secrets.token_hex(4)}"


async def form_group(registry: Registry, group_id: str, targets: list[Target], timeout_s: float) -> None:
    size = len(targets)
    leader = targets[0]
    try:
        reply = await registry.get(leader.node).stub.CreateGroupId(
            npb.CreateGroupIdRequest(device=leader.device), timeout=CREATE_ID_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, f"rank 0 on {leader.where}: CreateGroupId: ") from None
    log.info("group forming", group=group_id, ranks=[t.where for t in targets], timeout_s=timeout_s)

    # Every rank learns every member, so the leader knows which followers are local and which remote.
    members = [npb.GroupMember(address=t.node, device=t.device) for t in targets]

    def init(t: Target):
        request = npb.InitGroupRequest(group_id=group_id, world_size=size, rank=t.rank, unique_id=reply.unique_id,
                                       device=t.device, timeout_ms=int(timeout_s * 1000), members=members)
        # The neuron gives up at timeout_ms; the RPC deadline leaves it time to say why.
        return registry.get(t.node).stub.InitGroup(request, timeout=timeout_s + 5)

    await on_all(targets, init, "InitGroup")

    leaders = per_node(targets)
    answers = await on_all(leaders, lambda t: registry.get(t.node).stub.GroupSanity(
        npb.GroupSanityRequest(group_id=group_id), timeout=timeout_s), "GroupSanity")
    for t, answer in zip(leaders, answers):
        if round(answer.value) != size:
            raise FailedPrecondition(f"rank {t.rank} on {t.where}: the sanity all-reduce of group {group_id} gave "
                                     f"{answer.value:g}, expected {size} (one per rank); the group is broken")
    log.info("group formed", group=group_id, size=size)


async def destroy_group(registry: Registry, group_id: str, targets: list[Target]) -> None:
    """Best effort on every neuron of the group: a neuron that never joined answers NOT_FOUND."""
    async def destroy(t: Target):
        try:
            await registry.get(t.node).stub.DestroyGroup(npb.DestroyGroupRequest(group_id=group_id),
                                                         timeout=DESTROY_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                log.warning("destroy group failed", group=group_id, node=t.node, code=err.code().name,
                            error=err.details())

    await asyncio.gather(*(destroy(t) for t in per_node(targets)))


def per_node(targets: list[Target]) -> list[Target]:
    """The lowest rank on each neuron, in rank order."""
    seen: dict[str, Target] = {}
    for t in targets:
        seen.setdefault(t.node, t)
    return list(seen.values())


async def on_all(targets: list[Target], call: Callable[[Target], Awaitable], what: str) -> list:
    """Run call(target) for every target concurrently. On the first failure the calls still running
    are cancelled (they would otherwise wait out their deadline for a rank that is not coming) and
    the error names every rank that failed, with the first one's status code."""
    tasks = [asyncio.ensure_future(call(t)) for t in targets]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    failed = [(t, task.exception()) for t, task in zip(targets, tasks) if not task.cancelled() and task.exception()]
    if failed:
        errors = [_as_service_error(err, f"rank {t.rank} on {t.where}: {what}: ") for t, err in failed]
        error = ServiceError("; ".join(e.message for e in errors))
        error.code = errors[0].code
        raise error
    return [task.result() for task in tasks]


def _as_service_error(err: BaseException, prefix: str) -> ServiceError:
    if isinstance(err, grpc.aio.AioRpcError):
        return from_rpc_error(err, prefix)
    if isinstance(err, ServiceError):
        wrapped = ServiceError(prefix + err.message)
        wrapped.code = err.code
        return wrapped
    raise err  # a bug, not a rank failure: let it surface as INTERNAL
