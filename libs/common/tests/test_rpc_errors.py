"""An error a service raises reaches its caller as that error, whatever its message holds:
gRPC carries the message in trailing metadata, which a caller refuses over 16 KiB."""

from __future__ import annotations

import grpc
import pytest

from croft.common import errors
from croft.common.rpc import Server, channel, from_rpc_error


@pytest.mark.parametrize(
    "message",
    ["short", "long " + "x" * 200_000, "a client's lone surrogate \ud800 quoted"],
)
async def test_an_error_reaches_the_caller_with_its_kind_and_a_message_that_fits(
    message: str,
) -> None:
    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise errors.InvalidArgument(message)

    server = Server("test", "member", "one")
    server.grpc.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "croft.test.Failing",
                {
                    "Fail": grpc.unary_unary_rpc_method_handler(
                        fail, request_deserializer=bytes, response_serializer=bytes
                    )
                },
            ),
        )
    )
    address = await server.start()
    try:
        async with channel(address) as chan:
            call = chan.unary_unary(
                "/croft.test.Failing/Fail", request_serializer=bytes, response_deserializer=bytes
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(b"", timeout=10)
    finally:
        await server.stop(0)
    error = from_rpc_error(raised.value)
    assert isinstance(error, errors.InvalidArgument), error
    assert error.message.startswith(message[:100].encode("utf-8", "backslashreplace").decode())
    assert len(error.message) <= 4096 + 64
