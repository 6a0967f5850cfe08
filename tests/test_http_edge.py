"""The HTTP edge without a running service: each refusal's status, reason and message, and the
write token's check (the same answers end to end: tests/test_serve.py)."""

import json

import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request

from serve.http_edge import InputRejected, check_write_token, decode_rejection, unavailable
from serve.schemas import WRITE_TOKEN_ENV
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
