"""The HTTP edge of the service: reading request bodies, checking the write token, and turning
every refusal into a JSON error with a reason, so the routes in serve/app.py only say what to do.

Bad input raises `InputRejected` (or a vitbirds error that `decode_rejection` maps); the handlers
installed by `add_error_handlers` answer it with `ErrorResponse` and count it by reason. Also
the OpenAPI descriptions of the bodies and errors the routes accept and answer.
"""

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from serve.body_deadline import BodyTimeoutError
from serve.metrics import rejected_inputs
from serve.schemas import WRITE_TOKEN_ENV, ErrorResponse, FeedbackRequest
from vitbirds.errors import DecodersBusy, ImageDecodeError

logger = logging.getLogger("ray.serve")

RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
MAX_TOP_K = 1000


class InputRejected(Exception):
    """A request we refuse on purpose: becomes `status` with {"error", "reason"}."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, reason: str, message: str, headers: dict | None = None
) -> JSONResponse:
    rejected_inputs().inc(tags={"reason": reason})
    content = ErrorResponse(error=message, reason=reason).model_dump()
    return JSONResponse(content, status_code=status, headers=headers)


async def _input_rejected(request: Request, exc: InputRejected) -> JSONResponse:
    defaults = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "1"}}.get(exc.status)
    headers = {**(defaults or {}), **exc.headers}
    if request.scope.get(_BODY_LEFT) and not await drain_body(request):
        headers["Connection"] = "close"
    return error_response(exc.status, exc.reason, exc.message, headers=headers)


# A body refused as too large is still read to its end, within these bounds, before the 413 goes
# out: a client that sends its whole body before reading the answer (urllib, requests, most
# upload forms) would otherwise have the connection reset under it and never see the 413. A
# client that asked `Expect: 100-continue` is answered at once and never sends the body; one that
# pauses for DRAIN_IDLE_S gets the 413 and a closed connection. The body deadline still applies.
DRAIN_MAX_BYTES = 256 * 1024 * 1024
DRAIN_IDLE_S = 1.0
_BODY_LEFT = "vitbirds.body_left"  # set in the request's scope: a refused body was not read out


def refused_before_reading(request: Request, rejection: InputRejected) -> InputRejected:
    """`rejection`, for a request whose body has not been read at all: it is drained before
    the answer goes out, as a 413's is."""
    request.scope[_BODY_LEFT] = True
    return rejection


async def drain_body(request: Request) -> bool:
    """Reads and discards what is left of the request body; True when it was read to its end
    (the connection can then carry the answer and the next request)."""
    if request.headers.get("expect", "").lower() == "100-continue":
        return False
    drained = 0
    while drained <= DRAIN_MAX_BYTES:
        try:
            async with asyncio.timeout(DRAIN_IDLE_S):
                message = await request.receive()
        except (TimeoutError, BodyTimeoutError):
            return False
        if message["type"] != "http.request":  # the client went away
            return False
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in exc.errors()
    )
    return error_response(422, "invalid_request", problems)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, f"http_{exc.status_code}", str(exc.detail))


def add_error_handlers(api: FastAPI) -> None:
    """Answers refusals, invalid parameters and FastAPI's own HTTP errors as `ErrorResponse`."""
    api.add_exception_handler(InputRejected, _input_rejected)
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(StarletteHTTPException, _http_error)


def unavailable(exc: BackPressureError | RayActorError) -> JSONResponse:
    """503 when a model deployment's queue is full or its replica is gone: retry shortly. The
    client gets a fixed sentence; Ray's own text (actor ids, node addresses, a replica's
    traceback) goes to the log only."""
    if isinstance(exc, BackPressureError):
        reason, message = "overloaded", "the model is at capacity; retry shortly"
    else:
        reason, message = "model_unavailable", "the model replica is unavailable; retry shortly"
    logger.warning("503 %s: %s", reason, exc)
    return error_response(503, reason, message, headers={"Retry-After": "1"})


# The status of a decoder's refusal by its reason; every other one is 422.
DECODE_STATUS = {"unsupported_format": 415, "too_many_pixels": 413}


def decode_rejection(error: ImageDecodeError | DecodersBusy) -> InputRejected:
    message = str(error).removeprefix("<bytes>: ")
    if isinstance(error, DecodersBusy):  # not the file's fault: retry (Retry-After: 1)
        return InputRejected(503, "decoders_busy", message)
    reason = error.reason
    if reason == ImageDecodeError.reason and "not an image" in message:
        reason = "not_an_image"
    return InputRejected(DECODE_STATUS.get(reason, 422), reason, message)


def check_write_token(request: Request) -> None:
    """401 unless the request carries $VITBIRDS_WRITE_TOKEN (when that is set) as a Bearer
    token; compared in constant time so the response time says nothing about the token."""
    expected = os.environ.get(WRITE_TOKEN_ENV)
    if not expected:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise InputRejected(
            401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'"
        )


async def limited_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body in chunks, refused with 413 as soon as it is known to exceed `limit` (what is
    left of it is drained before the answer: `drain_body`)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputRejected(400, "bad_content_length", f"Content-Length {declared!r}")
        if int(declared) > limit:
            request.scope[_BODY_LEFT] = True
            raise InputRejected(
                413, "too_large", f"body of {declared} bytes exceeds the {limit}-byte limit"
            )
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            request.scope[_BODY_LEFT] = more
            raise InputRejected(413, "too_large", f"body exceeds the {limit}-byte limit")
        if chunk:
            yield chunk
        if not more:
            return


async def read_upload(request: Request, limit: int) -> bytes:
    """The image bytes of a multipart upload (field `file`) or of a raw image body."""
    content_type = request.headers.get("content-type", "").lower()
    body = limited_body(request, limit)
    if content_type.startswith("multipart/form-data"):
        try:
            form = await MultiPartParser(request.headers, body, max_files=1, max_fields=8).parse()
        except MultiPartException as exc:
            raise InputRejected(400, "bad_multipart", exc.message) from exc
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                fields = sorted(form.keys())
                raise InputRejected(400, "missing_file", f"no file field 'file' (got {fields})")
            data = await upload.read()
        finally:
            await form.close()
    elif content_type.startswith(RAW_IMAGE_TYPES):
        data = b"".join([chunk async for chunk in body])
    else:
        raise InputRejected(
            415,
            "unsupported_content_type",
            f"Content-Type {content_type or '(none)'!r}: send multipart/form-data with a 'file' "
            "field, or the image itself as image/* or application/octet-stream",
        )
    if not data:
        raise InputRejected(400, "empty", "the image is empty (0 bytes)")
    return data


UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)
}
FEEDBACK_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 409, 413, 422)
}
FEEDBACK_BODY = {
    "required": True,
    "content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}},
}
TOP_K = Query(None, ge=1, le=MAX_TOP_K, description="How many classes (default 5)")
