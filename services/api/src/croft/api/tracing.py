"""One trace per REST request: continued from a `traceparent` header when the client sends
one, started otherwise. Every gRPC call made while serving it (and by the operation it
starts, which inherits the context) carries the same trace id to the other services."""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from croft.api.direct import FRONTED

tracer = trace.get_tracer("croft.api")


class TracingMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if FRONTED in scope or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token = otel_context.attach(propagate.extract(carrier))
        try:
            name = f"{scope.get('method', 'WS')} {scope.get('path', '')}"
            with tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER):
                await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)
