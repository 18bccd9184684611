"""A call carries its caller's trace to the service (W3C traceparent in the call's
metadata, added by the client's interceptor): real gRPC server and client."""

from __future__ import annotations

import secrets

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from croft.common import rpc


async def test_a_service_answers_within_its_callers_trace() -> None:
    server = rpc.Server("images", "member-a", secrets.token_hex(3))
    address = await server.start()
    try:
        trace_id = int(secrets.token_hex(16), 16)
        caller = SpanContext(
            trace_id=trace_id,
            span_id=int(secrets.token_hex(8), 16),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        with trace.use_span(NonRecordingSpan(caller)):
            reply = await rpc.status_of(address)
        assert reply.trace_id == format(trace_id, "032x")

        # Outside any trace, a call carries none.
        assert (await rpc.status_of(address)).trace_id == ""
    finally:
        await server.stop(grace=0)
