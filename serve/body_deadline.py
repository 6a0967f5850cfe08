"""Slow senders lose their slot: an upload must arrive within a deadline and never stall.

Every request the Ingress replica accepts holds one of its `max_ongoing_requests` slots until it
is answered, and reading the body is part of answering. A client that opens a request and sends
its body a byte at a time would otherwise hold a slot for as long as it likes, and a few hundred
such clients shut everyone else out (503). This ASGI middleware bounds the body phase: the whole
body within `total_s` of the request's start, and no pause longer than `idle_s` between chunks.
A request that misses either gets 408 with a JSON reason, and its slot is free again.

Serve's own `request_timeout_s` (serve/config.yaml's http_options) bounds the whole request, but a
client can lift it with the `x-request-timeout-seconds` header, so it is no defence here; this one
is. HAProxy's `timeout client` (RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S) cuts clients that go silent
before their request reaches a replica.
"""

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class BodyDeadline:
    total_s: float = 30.0  # the whole body, from the request's start (10 MiB at ~3 Mbit/s)
    idle_s: float = 5.0  # the longest pause between two chunks


class BodyTimeoutError(Exception):
    """The request body did not arrive in time; the message says which bound was missed."""


class BodyDeadlineMiddleware:
    """Applies the `BodyDeadline` found at `app.state.body_deadline` (else the defaults) to the
    body of every HTTP request; the rest of the connection (e.g. waiting for a disconnect while
    the response is computed) is left alone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = getattr(scope.get("app"), "state", None)
        deadline: BodyDeadline = getattr(state, "body_deadline", None) or BodyDeadline()
        started = time.monotonic()
        body_done = False
        response_started = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            left = deadline.total_s - (time.monotonic() - started)
            wait = min(deadline.idle_s, left)
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    message = await receive()
            except TimeoutError as error:
                bound = (
                    f"no body byte for {deadline.idle_s:g} s"
                    if wait == deadline.idle_s
                    else f"the body took longer than {deadline.total_s:g} s"
                )
                raise BodyTimeoutError(bound) from error
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except BodyTimeoutError as error:
            if response_started:
                raise
            await _send_json(send, 408, {"error": str(error), "reason": "body_timeout"})


async def _send_json(send: Send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
