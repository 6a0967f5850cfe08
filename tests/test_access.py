"""API keys and per-key rate limits (serve/access.py) without Ray: the checks themselves, and
their 401/429 reaching a client that sends its whole upload first, on a real server (through
Serve, with the web page: tests/test_serve_access.py)."""

from collections.abc import Iterator

import pytest
import requests
from fastapi import FastAPI
from starlette.requests import Request

from serve.access import API_KEYS_ENV, Access, ApiKeys, RateLimiter, key_id
from serve.http_edge import InputRejected, add_error_handlers, read_upload, refused_before_reading
from serve.testing import uvicorn_in_thread
from vitbirds.errors import ConfigError

KEY, OTHER_KEY = "k" * 16 + "-first", "k" * 16 + "-second"


def test_without_keys_everyone_is_admitted_and_nothing_is_limited() -> None:
    keys = ApiKeys.from_environment({})
    assert not keys.required and keys.identify({}) is None
    access = Access(keys, RateLimiter(rate_per_s=1e-9, burst=1))
    for _ in range(3):  # a burst of 1 would refuse the second request if it were limited
        access.admit({})


def test_keys_are_read_from_the_environment_split_on_commas_and_white_space() -> None:
    keys = ApiKeys.from_environment({API_KEYS_ENV: f" {KEY},\n{OTHER_KEY} "})
    assert keys.identify({"x-api-key": KEY}) == key_id(KEY)
    assert keys.identify({"authorization": f"Bearer {OTHER_KEY}"}) == key_id(OTHER_KEY)
    assert KEY not in key_id(KEY) and key_id(KEY) != key_id(OTHER_KEY)


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-api-key": "wrong" * 4}, {"authorization": f"Basic {KEY}"}, {"authorization": KEY},
     {"x-api-key": KEY[:-1]}, {"x-api-key": ""}],
    ids=["none", "wrong", "basic", "no-scheme", "prefix", "empty"],
)  # fmt: skip
def test_a_missing_or_wrong_key_is_a_401_that_names_no_key(headers) -> None:
    keys = ApiKeys([KEY, OTHER_KEY])
    with pytest.raises(InputRejected) as refused:
        keys.identify(headers)
    assert (refused.value.status, refused.value.reason) == (401, "unauthorized")
    assert refused.value.headers == {"WWW-Authenticate": "Bearer"}
    assert KEY not in refused.value.message and OTHER_KEY not in refused.value.message


def test_a_short_key_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match="5 characters; at least 16"):
        ApiKeys(["short"])


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_key_gets_its_burst_then_its_rate_and_a_retry_after() -> None:
    clock = _Clock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(InputRejected) as refused:
        limiter.check("a")
    assert (refused.value.status, refused.value.reason) == (429, "rate_limited")
    assert refused.value.headers == {"Retry-After": "1"}  # 0.5 s, in whole seconds
    limiter.check("b")  # another key has its own bucket
    clock.now += 0.5  # one token back
    limiter.check("a")
    with pytest.raises(InputRejected):
        limiter.check("a")
    clock.now += 60  # refills up to the burst, no further
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(InputRejected):
        limiter.check("a")


def test_a_slow_rate_says_how_long_to_wait() -> None:
    limiter = RateLimiter(rate_per_s=0.1, burst=1, clock=_Clock())
    limiter.check("a")
    with pytest.raises(InputRejected) as refused:
        limiter.check("a")
    assert refused.value.headers == {"Retry-After": "10"}


# --- on a real server: the refusal reaches a client that sends its whole body first ----------


@pytest.fixture(scope="module")
def guarded_url() -> Iterator[str]:
    """An upload route behind `Access`, as the Ingress guards /predict, on a real server."""
    api = FastAPI()
    add_error_handlers(api)
    access = Access(ApiKeys([KEY]), RateLimiter(rate_per_s=0.001, burst=2))

    @api.post("/upload")
    async def upload(request: Request) -> dict:
        try:
            access.admit(request.headers)
        except InputRejected as rejection:
            raise refused_before_reading(request, rejection) from None
        return {"size": len(await read_upload(request, 10_000_000))}

    with uvicorn_in_thread(api) as url:
        yield url


def test_the_401_and_the_429_reach_a_client_that_sends_its_whole_upload(guarded_url) -> None:
    body = bytes(5_000_000)
    headers = {"Content-Type": "image/jpeg"}
    refused = requests.post(guarded_url + "/upload", data=body, headers=headers, timeout=30)
    assert refused.status_code == 401 and refused.json()["reason"] == "unauthorized"
    assert refused.headers["www-authenticate"] == "Bearer"

    with requests.Session() as session:  # one connection: each refusal leaves it usable
        keyed = {**headers, "X-API-Key": KEY}
        for _ in range(2):
            answer = session.post(guarded_url + "/upload", data=body, headers=keyed, timeout=30)
            assert answer.json() == {"size": len(body)}
        limited = session.post(guarded_url + "/upload", data=body, headers=keyed, timeout=30)
        assert limited.status_code == 429 and limited.json()["reason"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        again = session.post(guarded_url + "/upload", data=b"x", headers=headers, timeout=30)
        assert again.status_code == 401
