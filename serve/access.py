"""Who may call /predict and /explain, and how often: optional API keys, a token bucket per key.

Off unless $VITBIRDS_API_KEYS holds keys (the RayService reads them from a Secret; the README's
local mode sets none). Then every request needs one of them, as `Authorization: Bearer KEY` or
`X-API-Key: KEY` (401 otherwise), and each key may make `api_rate_per_s` requests a second with
bursts of `api_burst` (429 with Retry-After past it), so one client cannot starve the others.
Each Ingress replica keeps its own buckets: N replicas admit up to N times the rate per key.

A presented key is hashed and compared with every configured key's digest in constant time,
never stopping at a match, so neither the answer nor its timing says how close a guess came.
A key is never logged or exported: what identifies its holder is `key_id`, the first 8 hex
digits of its SHA-256 digest.
"""

import hashlib
import hmac
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from serve.http_edge import InputRejected
from vitbirds.errors import ConfigError

API_KEYS_ENV = "VITBIRDS_API_KEYS"
MIN_KEY_CHARS = 16  # shorter keys could be guessed; `openssl rand -hex 32` gives 64


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str:
    """What logs and metrics may name a key by."""
    return "key-" + _digest(key).hex()[:8]


class ApiKeys:
    """The configured keys, as digests; `identify` admits a request's key or raises 401."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys: list[tuple[bytes, str]] = []
        for key in keys:
            if len(key) < MIN_KEY_CHARS:
                raise ConfigError(
                    f"an API key in ${API_KEYS_ENV} has {len(key)} characters; at least "
                    f"{MIN_KEY_CHARS} are needed (e.g. `openssl rand -hex 32`)"
                )
            self._keys.append((_digest(key), key_id(key)))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "ApiKeys":
        """The keys of $VITBIRDS_API_KEYS, separated by commas or white space; none: off."""
        return cls(k for k in re.split(r"[\s,]+", environ.get(API_KEYS_ENV, "")) if k)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def identify(self, headers: Mapping[str, str]) -> str | None:
        """The key id of the request's key; None when keys are off. Raises InputRejected(401)
        for a missing or unknown key."""
        if not self._keys:
            return None
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        presented = headers.get("x-api-key") or (bearer if scheme.lower() == "bearer" else "")
        digest = _digest(presented.strip())
        found = None
        for expected, name in self._keys:  # every key, whatever matched: constant time
            if hmac.compare_digest(digest, expected):
                found = name
        if found is None:
            raise InputRejected(
                401,
                "unauthorized",
                "this endpoint needs an API key: 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return found


class RateLimiter:
    """A token bucket per client: `rate_per_s` a second, up to `burst` at once."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self._lock = threading.Lock()

    def check(self, client: str) -> None:
        """Takes one token of `client`'s bucket, or raises InputRejected(429) saying when the
        next one is due (Retry-After, whole seconds, at least 1)."""
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return
            self._buckets[client] = (tokens, now)
        wait_s = (1.0 - tokens) / self.rate_per_s
        raise InputRejected(
            429,
            "rate_limited",
            f"over {self.rate_per_s:g} requests/s (bursts of {self.burst}) for this key; "
            f"retry in {wait_s:.1f} s",
            headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
        )


class Access:
    """Keys, then the key's rate: what /predict and /explain check before reading a body."""

    def __init__(self, keys: ApiKeys, limiter: RateLimiter) -> None:
        self.keys = keys
        self.limiter = limiter

    def admit(self, headers: Mapping[str, str]) -> None:
        client = self.keys.identify(headers)
        if client is not None:
            self.limiter.check(client)
