"""The asyncio client, on `grpc.aio`: the same calls, settings and errors as `CacheClient`.

A `grpc.aio` channel belongs to the event loop it was created on, so the client opens its channel
on first use and opens a new one if it is later used from another loop (one `asyncio.run` after
another): a client can be created at import time, before any loop runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import grpc
import grpc.aio

from cachegw.client import CHANNEL_OPTIONS, DEFAULT_TIMEOUT_S, Availability, _Protocol
from cachegw.errors import from_rpc_error
from cachegw.results import DeleteResult, GetResult, InvalidateResult, Lease, SetResult
from cachegw.v1 import cache_pb2_grpc


class AsyncCacheClient:
    """An asyncio cachegw client; see `CacheClient` for the arguments."""

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
        self._channel: grpc.aio.Channel | None = None
        self._stub: cache_pb2_grpc.CacheStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def namespace(self) -> str:
        return self._p.namespace

    @property
    def availability(self) -> Availability:
        return self._p.availability

    def _stub_for_this_loop(self) -> cache_pb2_grpc.CacheStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            creds = self._p.credentials()
            self._channel = (
                grpc.aio.secure_channel(self._p.target, creds, options=CHANNEL_OPTIONS)
                if creds
                else grpc.aio.insecure_channel(self._p.target, options=CHANNEL_OPTIONS)
            )
            self._stub = cache_pb2_grpc.CacheStub(self._channel)
            self._loop = loop
        return self._stub

    async def _call(self, method: str, request, timeout: float):
        stub = self._stub_for_this_loop()
        try:
            return await getattr(stub, method)(
                request, timeout=timeout, metadata=self._p.metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, method) from None

    async def get(
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
        reply = await self._call("Get", request, self._p.deadline(timeout, lease))
        return self._p.get_result(reply)

    async def set(
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
        return self._p.set_result(await self._call("Set", request, self._p.deadline(timeout)))

    async def delete(
        self,
        key: str,
        *,
        namespace: str | None = None,
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> DeleteResult:
        request = self._p.delete_request(key, namespace, attributes)
        reply = await self._call("Delete", request, self._p.deadline(timeout))
        return self._p.delete_result(reply)

    async def release_lease(
        self,
        key: str,
        lease_token: str,
        *,
        namespace: str | None = None,
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> bool:
        request = self._p.release_request(key, lease_token, namespace, attributes)
        return (await self._call("ReleaseLease", request, self._p.deadline(timeout))).released

    async def invalidate(
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
        reply = await self._call("Invalidate", request, self._p.deadline(timeout))
        return self._p.invalidate_result(reply)

    async def close(self) -> None:
        if self._channel is not None and self._loop is asyncio.get_running_loop():
            await self._channel.close()
        self._channel = self._stub = self._loop = None

    async def __aenter__(self) -> AsyncCacheClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
