"""Pure-ASGI middleware: request body size bound and request metrics (client aborts included).

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and the body limit
is enforced while reading, before an oversized body is ever buffered.
"""

from __future__ import annotations

import logging
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLargeError, error_response
from server.metrics import Metrics

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's convention; only ever seen in our own metrics


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Bounds every body; paths under `upload_prefix` (adapter uploads) get the larger bound."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, upload_prefix: str, max_upload_bytes: int
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_prefix = upload_prefix
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = str(scope.get("path", "")).startswith(self.upload_prefix)
        limit = self.max_upload_bytes if is_upload else self.max_body_bytes
        error = PayloadTooLargeError(f"request body is larger than {limit} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await error_response(error)(scope, receive, send)
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if response_started:
                raise
            await error_response(error)(scope, receive, send)


class MetricsMiddleware:
    """Counts and times every request by route template and status. A client that hangs up
    while sending its body (Starlette's `ClientDisconnect`, wherever the body is read) is a
    499 and one log line; left to the error handlers it was a 500 and two tracebacks. A
    response the client left before its end (a stream it stopped reading or closed: the app
    returned without finishing it) is a 499 too, whatever status its head carried."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        response_started = response_ended = False

        async def observing_send(message: Message) -> None:
            nonlocal status, response_started, response_ended
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                response_ended = True
            await send(message)

        # The route template is known only after routing: in-flight is counted under the raw
        # path when it is a known one (else "other"), latency under the template.
        in_flight_route = _route_label(scope)
        self.metrics.in_flight.labels(in_flight_route).inc()
        try:
            await self.app(scope, receive, observing_send)
            if response_started and not response_ended:
                status = CLIENT_CLOSED_REQUEST  # the client left mid-response
        except ClientDisconnect:
            # Nothing to answer: the connection is gone. A response already begun keeps its status.
            if not response_started:
                status = CLIENT_CLOSED_REQUEST
            logger.info(
                "client closed the connection while sending the body of %s %s",
                scope.get("method", "?"),
                _route_label(scope),
            )
        finally:
            self.metrics.in_flight.labels(in_flight_route).dec()
            route = _route_label(scope)
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route, str(status)).observe(elapsed)


KNOWN_PATHS = frozenset(
    {"/v1/models", "/v1/chat/completions", "/v1/completions", "/healthz", "/readyz", "/metrics"}
)


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    raw = scope.get("path", "")
    return raw if raw in KNOWN_PATHS else "other"
