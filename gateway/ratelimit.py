"""Rate limits: anonymous calls (no key, or one that is refused) and access requests per
client address, and requests per person (all of a principal's API keys share one window;
the setting is still called `per_key`), each over moving windows (the `limits` package),
kept in this process's memory or, for several API processes, in a shared store
(`RateLimits.storage`).

A call over a limit is refused with 429 and a Retry-After header — the only 429 the
gateway sends. The SDK retries a 429, so the per-person limit is generous (it stops runaway
loops, not work); the anonymous and access-request limits are tight. Must not decide
anything but whether a call fits its window.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse_many
from limits.errors import ConfigurationError
from limits.storage import MovingWindowSupport, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from gateway.errors import RateLimited
from gateway.settings import RateLimits

BUCKETS = {"per_person": "requests with your API keys (all of them together)",
           "per_key": "requests with this API key",  # for callers that count by key (console)
           "anonymous": "calls without a valid API key from your address",
           "access_requests": "access requests and claims from your address"}
# The setting each bucket's limits come from: a person's keys share the per-key limit.
SETTING = {"per_person": "per_key", "per_key": "per_key", "anonymous": "anonymous",
           "access_requests": "access_requests"}


class RateLimiter:
    def __init__(self, config: RateLimits) -> None:
        self._items: dict[str, list[RateLimitItem]] = {
            bucket: parse_many(limit) if (limit := getattr(config, SETTING[bucket])) else []
            for bucket in BUCKETS}
        self._storage = _storage(config.storage)
        self._limiter = MovingWindowRateLimiter(self._storage)

    def hit(self, bucket: str, identity: str) -> None:
        """Count one call of `identity` against `bucket`, or raise RateLimited (429) saying
        which limit and when to retry (a refused call is not counted)."""
        for item in self._items[bucket]:
            if not self._limiter.test(item, bucket, identity):
                raise self._refusal(bucket, identity, item)
        for item in self._items[bucket]:
            self._limiter.hit(item, bucket, identity)

    def _refusal(self, bucket: str, identity: str, item: RateLimitItem) -> RateLimited:
        reset = self._limiter.get_window_stats(item, bucket, identity).reset_time
        retry_after = max(1, math.ceil(reset - time.time()))
        return RateLimited(f"rate limit exceeded: at most {item} {BUCKETS[bucket]}; retry "
                           f"in {retry_after} s", retry_after=retry_after)

    def reset(self) -> None:
        """Forget every window (tests, and operators after changing limits)."""
        self._storage.reset()


def _storage(uri: str) -> Storage:
    """The `limits` store named by `uri`; a ValueError naming the setting when it cannot be
    used (unknown scheme, client package missing, or no moving windows)."""
    try:
        storage = storage_from_string(uri)
    except ConfigurationError as exc:
        raise ValueError(f"rate limit storage {uri!r} cannot be used: {exc} (setting "
                         "rate_limits.storage, LORAGATE_RATE_LIMIT_STORAGE)") from exc
    if not isinstance(storage, Storage) or not isinstance(storage, MovingWindowSupport):
        raise ValueError(f"rate limit storage {uri!r} has no moving windows; use memory://, "
                         "redis:// or mongodb://")
    return storage
