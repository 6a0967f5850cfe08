"""Slow uploads get 408 and give their slot back (serve/body_deadline.py), on a bare ASGI app."""

import asyncio
import json

from fastapi import FastAPI, Request

from serve.body_deadline import BodyDeadline, BodyDeadlineMiddleware


def _app(deadline: BodyDeadline) -> FastAPI:
    api = FastAPI()
    api.add_middleware(BodyDeadlineMiddleware)
    api.state.body_deadline = deadline

    @api.post("/upload")
    async def upload(request: Request) -> dict:
        return {"size": len(await request.body())}

    return api


async def _call(api: FastAPI, chunks: list[tuple[float, bytes]]) -> tuple[int, dict]:
    """POSTs `chunks` as (pause before it, bytes); returns (status, JSON body)."""
    pending = list(chunks)

    async def receive() -> dict:
        if not pending:
            await asyncio.sleep(3600)  # a client that waits for the answer
        pause, data = pending.pop(0)
        await asyncio.sleep(pause)
        return {"type": "http.request", "body": data, "more_body": bool(pending)}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/upload",
        "raw_path": b"/upload",
        "query_string": b"",
        "headers": [(b"content-type", b"application/octet-stream")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await asyncio.wait_for(api(scope, receive, send), timeout=30)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_a_body_that_arrives_in_time_is_read_whole():
    api = _app(BodyDeadline(total_s=5, idle_s=2))
    status, body = asyncio.run(_call(api, [(0.0, b"a" * 100), (0.05, b"b" * 100)]))
    assert (status, body) == (200, {"size": 200})


def test_a_stalled_body_gets_408_after_the_idle_timeout():
    api = _app(BodyDeadline(total_s=30, idle_s=0.2))
    status, body = asyncio.run(_call(api, [(0.0, b"a"), (10.0, b"b")]))
    assert status == 408
    assert body["reason"] == "body_timeout" and "no body byte" in body["error"]


def test_a_trickling_body_gets_408_at_the_total_deadline():
    api = _app(BodyDeadline(total_s=0.5, idle_s=0.3))
    trickle = [(0.1, b"x")] * 100  # never idle for 0.3 s, but 10 s in all
    status, body = asyncio.run(_call(api, trickle))
    assert status == 408
    assert "longer than 0.5 s" in body["error"]


def test_defaults_apply_when_the_app_sets_none():
    api = FastAPI()
    api.add_middleware(BodyDeadlineMiddleware)

    @api.post("/upload")
    async def upload(request: Request) -> dict:
        return {"size": len(await request.body())}

    status, _ = asyncio.run(_call(api, [(0.0, b"abc")]))
    assert status == 200
