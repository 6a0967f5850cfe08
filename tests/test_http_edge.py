"""The HTTP edge without Ray: each refusal's status, reason and message, the write token's check,
and a too-large body's 413 reaching clients that send the whole body first (on a real server;
the same answers through Serve: tests/test_serve.py)."""

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import requests
from fastapi import FastAPI
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request

from serve.body_deadline import BodyDeadlineMiddleware
from serve.http_edge import (
    DRAIN_IDLE_S,
    InputRejected,
    add_error_handlers,
    check_write_token,
    decode_rejection,
    read_upload,
    unavailable,
)
from serve.schemas import WRITE_TOKEN_ENV
from serve.testing import uvicorn_in_thread
from vitbirds import errors


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (BackPressureError(num_queued_requests=129, max_queued_requests=128), "overloaded"),
        (
            RayActorError(
                actor_id="7f3a9c", error_msg="The actor died: node 10.0.0.5, SIGKILL\nTraceback"
            ),
            "model_unavailable",
        ),
    ],
)
def test_an_unavailable_model_is_a_503_that_reveals_nothing_internal(error, reason):
    response = unavailable(error)
    body = json.loads(response.body)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert body["reason"] == reason and "retry shortly" in body["error"]
    for internal in ("7f3a9c", "10.0.0.5", "Traceback", "129", "128"):
        assert internal not in body["error"]


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (errors.UnsupportedImageFormat("FITS"), 415, "unsupported_format"),
        (errors.ImageTooLarge("refused, declared size 9x9"), 413, "too_many_pixels"),
        (errors.ExtremeAspectRatio("refused, aspect ratio 99:1"), 422, "extreme_aspect_ratio"),
        (errors.DecodeBudgetExceeded("decoding took over 5 s"), 422, "decode_budget_exceeded"),
        (
            errors.ImageDecodeError("<bytes>: not an image of an allowed format"),
            422,
            "not_an_image",
        ),
        (errors.ImageDecodeError("<bytes>: cannot decode pixels"), 422, "undecodable_image"),
        (errors.DecodersBusy("all 2 image decoders stayed busy for 1 s"), 503, "decoders_busy"),
    ],
)
def test_each_decode_refusal_has_its_status_and_reason(error, status, reason):
    rejection = decode_rejection(error)
    assert (rejection.status, rejection.reason) == (status, reason)
    assert "<bytes>" not in rejection.message


def _request(authorization: str | None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request({"type": "http", "method": "POST", "path": "/feedback", "headers": headers})


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic s3cret", "s3cret"])
def test_write_token_when_set_refuses_requests_without_it(monkeypatch, authorization):
    monkeypatch.setenv(WRITE_TOKEN_ENV, "s3cret")
    with pytest.raises(InputRejected) as refused:
        check_write_token(_request(authorization))
    assert refused.value.status == 401 and refused.value.reason == "unauthorized"


def test_write_token_when_set_admits_the_bearer_and_when_unset_everyone(monkeypatch):
    monkeypatch.setenv(WRITE_TOKEN_ENV, "s3cret")
    check_write_token(_request("Bearer s3cret"))
    monkeypatch.delenv(WRITE_TOKEN_ENV)
    check_write_token(_request(None))


# --- a body over the limit, sent whole, still gets its 413 JSON ---------------------------------

LIMIT = 2_000_000


@pytest.fixture(scope="module")
def edge_url() -> Iterator[str]:
    """The HTTP edge alone (error handlers, body deadline, upload reading) on a real server."""
    api = FastAPI()
    api.add_middleware(BodyDeadlineMiddleware)
    add_error_handlers(api)

    @api.post("/upload")
    async def upload(request: Request) -> dict:
        return {"size": len(await read_upload(request, LIMIT))}

    with uvicorn_in_thread(api) as url:
        yield url


@pytest.mark.parametrize("size", [11_000_000, 100_000_000])
def test_urllib_sending_a_whole_oversized_body_reads_the_413(edge_url, size) -> None:
    request = urllib.request.Request(
        edge_url + "/upload", data=bytes(size), headers={"Content-Type": "image/jpeg"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["reason"] == "too_large"


@pytest.mark.parametrize("size", [11_000_000, 100_000_000])
def test_requests_sending_a_whole_oversized_body_reads_the_413(edge_url, size) -> None:
    with requests.Session() as session:
        response = session.post(
            edge_url + "/upload", files={"file": ("big.jpg", bytes(size))}, timeout=60
        )
        assert response.status_code == 413 and response.json()["reason"] == "too_large"
        # the body was read out: the same connection carries the next request
        again = session.post(edge_url + "/upload", data=b"\xff\xd8", timeout=10,
                             headers={"Content-Type": "image/jpeg"})  # fmt: skip
        assert again.status_code == 200 and again.json() == {"size": 2}


def test_a_chunked_body_refused_midway_is_read_out_before_the_413(edge_url) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: refused only once 2 MB have arrived
        for _ in range(44):
            yield bytes(256 * 1024)

    response = requests.post(
        edge_url + "/upload", data=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert response.status_code == 413 and response.json()["reason"] == "too_large"


def test_a_client_that_declares_a_huge_body_and_waits_gets_the_413_at_once(edge_url) -> None:
    """Expect: 100-continue (what curl sends) is answered without reading a byte."""
    host, port = edge_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/upload")
    connection.putheader("Content-Type", "image/jpeg")
    connection.putheader("Content-Length", str(50_000_000))
    connection.putheader("Expect", "100-continue")
    connection.endheaders()
    started = time.monotonic()
    response = connection.getresponse()
    assert response.status == 413 and time.monotonic() - started < DRAIN_IDLE_S
    assert json.loads(response.read())["reason"] == "too_large"
    connection.close()
