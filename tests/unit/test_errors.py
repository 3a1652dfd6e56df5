"""Status messages: echoed input is clipped, a whole message is capped, so trailers stay under
gRPC's metadata limit and the real status code reaches the client."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from common.errors import MESSAGE_CHARS, InvalidArgument, clip, rpc_method


def test_clip_keeps_short_text_and_says_how_much_was_cut():
    assert clip("short") == "short"
    clipped = clip("x" * 65536)
    assert clipped.startswith("x" * 200) and "65336 more characters" in clipped and len(clipped) < 260


class _Context:
    async def abort(self, code, message):
        self.code, self.message = code, message
        raise grpc.aio.AbortError()


def test_a_huge_message_is_capped_in_the_status():
    class Service:
        @rpc_method
        async def Call(self, request, context):
            raise InvalidArgument("bad: " + "y" * 100_000)

    context = _Context()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(Service().Call(None, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(context.message) <= MESSAGE_CHARS + 60
