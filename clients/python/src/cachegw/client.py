"""The synchronous client: one gRPC channel per client (reused by every call and thread), a
deadline on every call, a default namespace, the bearer token and optional TLS.

The request building and response conversion here are shared with the asyncio client (`aio.py`),
so both speak the protocol the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence

import grpc

from cachegw.errors import from_rpc_error
from cachegw.results import (
    DeleteResult,
    GetResult,
    InvalidateResult,
    Lease,
    LeaseState,
    LeaseWrite,
    Outcome,
    SetResult,
)
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc

log = logging.getLogger("cachegw")

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 2.0

# Reconnect soon after the gateway comes back, instead of grpc's default of up to two minutes.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


class Availability:
    """Whether a client's gateway answered lately, so that `@cached` logs one warning when it goes
    away (not one per call), one line when it is back, and skips it for `retry_after_s` meanwhile
    instead of paying a deadline per call against a black hole."""

    def __init__(self, target: str, retry_after_s: float = 1.0) -> None:
        self._target = target
        self._retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0

    def should_try(self) -> bool:
        with self._lock:
            return self._down_since is None or time.monotonic() >= self._retry_at

    def mark_down(self, err: Exception) -> None:
        with self._lock:
            now = time.monotonic()
            self._retry_at = now + self._retry_after_s
            if self._down_since is not None:
                return
            self._down_since = now
        log.warning(
            "cachegw at %s unavailable (%s); calling cached functions directly until it answers",
            self._target,
            err,
        )

    def mark_up(self) -> None:
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            down_for = time.monotonic() - self._down_since
            self._down_since = None
        log.info("cachegw at %s answers again after %.1f s", self._target, down_for)


class _Protocol:
    """Everything about a client that is not I/O: settings, requests, conversions."""

    def __init__(
        self,
        target: str | None,
        namespace: str,
        token: str | None,
        root_certificates: bytes | None,
        timeout: float,
    ) -> None:
        self.target = target or os.environ.get("CACHEGW_ADDR") or DEFAULT_TARGET
        self.namespace = namespace
        token = token if token is not None else os.environ.get("CACHEGW_TOKEN")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.root_certificates = root_certificates
        self.timeout = timeout
        self.availability = Availability(self.target)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.root_certificates is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def deadline(self, timeout: float | None, lease: Lease | None = None) -> float:
        base = self.timeout if timeout is None else timeout
        # A lease wait happens inside the call: the deadline must outlast it.
        return base + (lease.wait_ms / 1000 if lease else 0.0)

    def get_request(self, key, namespace, allow_stale, lease, attributes) -> pb.GetRequest:
        return pb.GetRequest(
            namespace=namespace or self.namespace,
            key=key,
            attributes=dict(attributes or {}),
            allow_stale=allow_stale,
            lease=pb.LeaseRequest(wait_ms=lease.wait_ms, ttl_ms=lease.ttl_ms) if lease else None,
        )

    def set_request(
        self, key, value, namespace, content_type, lease_token, attributes
    ) -> pb.SetRequest:
        return pb.SetRequest(
            namespace=namespace or self.namespace,
            key=key,
            value=value,
            attributes=dict(attributes or {}),
            content_type=content_type,
            lease_token=lease_token,
        )

    def delete_request(self, key, namespace, attributes) -> pb.DeleteRequest:
        return pb.DeleteRequest(
            namespace=namespace or self.namespace, key=key, attributes=dict(attributes or {})
        )

    def release_request(self, key, lease_token, namespace, attributes) -> pb.ReleaseLeaseRequest:
        return pb.ReleaseLeaseRequest(
            namespace=namespace or self.namespace,
            key=key,
            lease_token=lease_token,
            attributes=dict(attributes or {}),
        )

    def invalidate_request(
        self, namespace, keys, pattern, tags, whole_namespace, soft
    ) -> pb.InvalidateRequest:
        targets = [t for t in (keys, pattern, tags) if t is not None] + (
            [True] if whole_namespace else []
        )
        if len(targets) != 1:
            raise ValueError("invalidate: pass exactly one of keys=, pattern=, tags=, whole_namespace=True")
        request = pb.InvalidateRequest(namespace=namespace or self.namespace, soft=soft)
        if keys is not None:
            request.keys.keys.extend(keys)
        elif pattern is not None:
            request.pattern = pattern
        elif tags is not None:
            request.tags.tags.extend(tags)
        else:
            request.whole_namespace = True
        return request

    @staticmethod
    def get_result(r: pb.GetResponse) -> GetResult:
        return GetResult(
            outcome=Outcome(r.outcome),
            value=r.value,
            ttl_remaining_ms=r.ttl_remaining_ms,
            degraded=r.degraded,
            content_type=r.content_type,
            policy=r.policy,
            lease=LeaseState(r.lease),
            lease_token=r.lease_token,
        )

    @staticmethod
    def set_result(r: pb.SetResponse) -> SetResult:
        return SetResult(
            stored=r.stored,
            ttl_ms=r.ttl_ms,
            degraded=r.degraded,
            policy=r.policy,
            invalidated=r.invalidated,
            invalidation_error=r.invalidation_error,
            lease=LeaseWrite(r.lease),
        )

    @staticmethod
    def delete_result(r: pb.DeleteResponse) -> DeleteResult:
        return DeleteResult(
            deleted=r.deleted, degraded=r.degraded, policy=r.policy, invalidated=r.invalidated
        )

    @staticmethod
    def invalidate_result(r: pb.InvalidateResponse) -> InvalidateResult:
        return InvalidateResult(
            job_id=r.job_id,
            state=pb.JobState.Name(r.state),
            affected=r.affected,
            error=r.error,
        )


class CacheClient:
    """A synchronous cachegw client, safe to share between threads.

    `target` is `host:port` (default `$CACHEGW_ADDR`, else 127.0.0.1:50051); `token` defaults to
    `$CACHEGW_TOKEN` and is sent as `authorization: Bearer <token>`; `root_certificates` (PEM
    bytes) turns on TLS; `timeout` (seconds) is every call's deadline unless a call gives its own.
    Methods raise `CachegwError` (`GatewayUnavailable` when the gateway cannot be reached in time).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        namespace: str = "default",
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._p = _Protocol(target, namespace, token, root_certificates, timeout)
        creds = self._p.credentials()
        self._channel = (
            grpc.secure_channel(self._p.target, creds, options=CHANNEL_OPTIONS)
            if creds
            else grpc.insecure_channel(self._p.target, options=CHANNEL_OPTIONS)
        )
        self._stub = cache_pb2_grpc.CacheStub(self._channel)

    @property
    def namespace(self) -> str:
        return self._p.namespace

    @property
    def availability(self) -> Availability:
        return self._p.availability

    def _call(self, method: str, request, timeout: float):
        try:
            return getattr(self._stub, method)(request, timeout=timeout, metadata=self._p.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err, method) from None

    def get(
        self,
        key: str,
        *,
        namespace: str | None = None,
        allow_stale: bool = False,
        lease: Lease | None = None,
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> GetResult:
        request = self._p.get_request(key, namespace, allow_stale, lease, attributes)
        return self._p.get_result(self._call("Get", request, self._p.deadline(timeout, lease)))

    def set(
        self,
        key: str,
        value: bytes,
        *,
        namespace: str | None = None,
        content_type: str = "",
        lease_token: str = "",
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> SetResult:
        request = self._p.set_request(key, value, namespace, content_type, lease_token, attributes)
        return self._p.set_result(self._call("Set", request, self._p.deadline(timeout)))

    def delete(
        self,
        key: str,
        *,
        namespace: str | None = None,
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> DeleteResult:
        request = self._p.delete_request(key, namespace, attributes)
        return self._p.delete_result(self._call("Delete", request, self._p.deadline(timeout)))

    def release_lease(
        self,
        key: str,
        lease_token: str,
        *,
        namespace: str | None = None,
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> bool:
        request = self._p.release_request(key, lease_token, namespace, attributes)
        return self._call("ReleaseLease", request, self._p.deadline(timeout)).released

    def invalidate(
        self,
        *,
        namespace: str | None = None,
        keys: Sequence[str] | None = None,
        pattern: str | None = None,
        tags: Sequence[str] | None = None,
        whole_namespace: bool = False,
        soft: bool = False,
        timeout: float | None = None,
    ) -> InvalidateResult:
        request = self._p.invalidate_request(namespace, keys, pattern, tags, whole_namespace, soft)
        return self._p.invalidate_result(
            self._call("Invalidate", request, self._p.deadline(timeout))
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
