"""What the gateway answers, as plain Python types (the protobuf messages stay inside the
clients). The enums mirror proto/cachegw/v1/cache.proto value for value."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.IntEnum):
    UNSPECIFIED = 0
    HIT = 1
    MISS = 2
    STALE = 3


class LeaseState(enum.IntEnum):
    NOT_REQUESTED = 0
    GRANTED = 1
    WAIT = 2
    STALE_SERVED = 3
    COALESCED = 4
    TIMED_OUT = 5
    NOT_NEEDED = 6


class LeaseWrite(enum.IntEnum):
    NONE = 0
    ACCEPTED = 1
    VOIDED = 2


@dataclass(frozen=True)
class Lease:
    """A lease request: wait up to `wait_ms` for another caller's fill; `ttl_ms` bounds how long
    a lease we are granted blocks the key if we never fill it (0: the namespace's `lease_ttl`)."""

    wait_ms: int = 5_000
    ttl_ms: int = 0


@dataclass(frozen=True)
class GetResult:
    outcome: Outcome
    value: bytes
    ttl_remaining_ms: int
    degraded: bool
    content_type: str
    policy: str
    lease: LeaseState
    lease_token: str

    @property
    def usable(self) -> bool:
        """True when `value` is an entry (fresh or stale), not an empty miss."""
        return self.outcome in (Outcome.HIT, Outcome.STALE)


@dataclass(frozen=True)
class SetResult:
    stored: bool
    ttl_ms: int
    degraded: bool
    policy: str
    invalidated: int
    invalidation_error: str
    lease: LeaseWrite


@dataclass(frozen=True)
class DeleteResult:
    deleted: bool
    degraded: bool
    policy: str
    invalidated: int


@dataclass(frozen=True)
class InvalidateResult:
    job_id: str
    state: str  # RUNNING, DONE or FAILED
    affected: int
    error: str
