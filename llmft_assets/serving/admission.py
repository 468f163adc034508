"""Admission control for the model server: who may start a request now (pure, no I/O).

- `TokenBucket` / `RateLimiter`: a per-API-key request rate (refill `rate` per second up to
  `burst`); a request over it is refused with 429 and a Retry-After of when the next token is due.
- `AdmissionController`: a bounded queue in front of the generation loop. At most
  `max_running + max_waiting` requests are in flight, and their prompt tokens together stay under
  `max_waiting_tokens` (a few huge prompts fill the queue as surely as many small ones); anything
  beyond is refused at once with 503 + Retry-After instead of waiting for minutes.

Refusing early keeps the latency of admitted requests bounded: an admitted request waits behind at
most `max_waiting` others, i.e. about (max_waiting / max_running + 1) generation times.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float) -> float:
        """Take one token; returns 0.0 on success, else the seconds until one is available."""
        if self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class RateLimiter:
    """One token bucket per key name; rate <= 0 disables limiting."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, key_name: str) -> float:
        """0.0 when the request may go, else seconds to wait (for Retry-After)."""
        if not self.enabled:
            return 0.0
        with self._lock:
            bucket = self._buckets.get(key_name)
            if bucket is None:
                bucket = self._buckets[key_name] = TokenBucket(self.rate, max(self.burst, 1.0))
            return bucket.take(self.clock())


class Overloaded(Exception):
    """The queue is full (requests or tokens); `retry_after_s` is a hint for the client."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class AdmissionController:
    max_running: int  # requests the engine advances together (its batch size)
    max_waiting: int  # requests allowed to wait for a batch slot
    max_waiting_tokens: int  # prompt tokens allowed in flight (running + waiting)
    retry_after_s: int = 1
    in_flight: int = 0
    in_flight_tokens: int = 0
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_waiting

    def reserve(self) -> None:
        """Take a slot for a new request (before its prompt is known), or raise Overloaded."""
        with self._lock:
            if self.in_flight >= self.capacity:
                self.refused += 1
                raise Overloaded(
                    f"The server is overloaded: {self.in_flight} requests are in flight "
                    f"(limit {self.capacity}). Retry shortly.",
                    self._retry_after(),
                )
            self.in_flight += 1

    def add_tokens(self, tokens: int) -> None:
        """Count a reserved request's prompt tokens, or raise Overloaded (the slot stays reserved)."""
        with self._lock:
            # A single prompt larger than the whole budget is still admitted when nothing else
            # waits: the per-request prompt limit, not this one, bounds a lone request.
            if self.in_flight_tokens + tokens > self.max_waiting_tokens and self.in_flight_tokens > 0:
                self.refused += 1
                raise Overloaded(
                    f"The server is overloaded: {self.in_flight_tokens} prompt tokens are in flight "
                    f"(limit {self.max_waiting_tokens}). Retry shortly.",
                    self._retry_after(),
                )
            self.in_flight_tokens += tokens

    def release(self, tokens: int = 0) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            self.in_flight_tokens = max(0, self.in_flight_tokens - tokens)

    def _retry_after(self) -> int:
        # Roughly how many batch generations are queued ahead, at least the configured floor.
        return max(self.retry_after_s, math.ceil(self.in_flight / max(self.max_running, 1)))
