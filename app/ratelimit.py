"""Rate limits per API key: a token bucket of `rate_limit_burst` requests refilled at
`rate_limit_per_s` (Settings), checked once per authenticated request (`app/auth.py`).

Where the broker is Redis the buckets live there, so every API process (and every machine) shares
one bucket per key; the check is one Lua script, atomic, on Redis's own clock. On the embedded
default they live in the API process (`slimformer api --workers N` then allows up to N times the
rate). A Redis that cannot be reached lets the request through: the limit protects the service,
it must not become a reason to refuse every request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from app.errors import APIError
from app.settings import get_settings

log = logging.getLogger(__name__)

# KEYS[1]: the bucket; ARGV: rate per second, burst. Returns {allowed, seconds until a token}.
# Floats go back as strings: Redis turns Lua numbers into integers.
TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(wait)}
"""


@dataclass
class _Bucket:
    tokens: float
    at: float


class LocalBuckets:
    """The embedded default's buckets, one per key, in this process. Only valid keys get one
    (the check follows authentication), so there are never more than the keys table holds."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str, *, rate: float, burst: int) -> float:
        """Take one token; returns 0 when allowed, else the seconds until a token is there."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(tokens=burst, at=now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / rate


class RedisBuckets:
    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self._script = self._client.register_script(TOKEN_BUCKET)
        self._prefix = f"{prefix}ratelimit:"
        from app.broker import Outage

        self._outage = Outage(log)

    def take(self, key: str, *, rate: float, burst: int) -> float:
        try:
            allowed, wait = self._script(keys=[self._prefix + key], args=[rate, burst])
        except Exception as exc:  # noqa: BLE001 - Redis down: let the request through (docstring)
            self._outage.failed("rate limit not checked", exc)  # a line, not a traceback a request
            return 0.0
        self._outage.worked()
        return 0.0 if int(allowed) else float(wait)


@lru_cache
def buckets() -> LocalBuckets | RedisBuckets:
    settings = get_settings()
    if settings.redis_url:
        return RedisBuckets(settings.redis_url, settings.queue_prefix)
    return LocalBuckets()


def check(key: str) -> None:
    """Spend one request of `key`'s bucket, or raise 429 `rate_limited` with `Retry-After`."""
    settings = get_settings()
    if settings.rate_limit_per_s <= 0:
        return
    wait = buckets().take(key, rate=settings.rate_limit_per_s, burst=settings.rate_limit_burst)
    if wait > 0:
        retry_after = max(1, math.ceil(wait))
        raise APIError(
            "rate_limited",
            f"Too many requests for this API key (limit {settings.rate_limit_per_s:g}/s, "
            f"burst {settings.rate_limit_burst}); retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
