"""The sync and asyncio clients against the real gateway."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cachegw import (
    AsyncCacheClient,
    CacheClient,
    CachegwError,
    GatewayUnavailable,
    Lease,
    LeaseState,
    LeaseWrite,
    Outcome,
)


def test_sync_client_sets_gets_and_deletes(client: CacheClient, unique: str):
    k = f"greeting:{unique}"
    assert client.get(k).outcome == Outcome.MISS
    written = client.set(k, b"\x00hello\xff", content_type="application/octet-stream")
    assert written.stored and written.ttl_ms > 0
    got = client.get(k)
    assert (got.outcome, got.value, got.content_type) == (
        Outcome.HIT, b"\x00hello\xff", "application/octet-stream")
    assert client.delete(k).deleted
    assert client.get(k).outcome == Outcome.MISS


def test_sync_client_lease_grant_fill_and_release(client: CacheClient, unique: str):
    k = f"leased:{unique}"
    first = client.get(k, lease=Lease(wait_ms=0))
    assert (first.outcome, first.lease) == (Outcome.MISS, LeaseState.GRANTED)
    assert client.get(k, lease=Lease(wait_ms=0)).lease == LeaseState.WAIT
    assert client.release_lease(k, first.lease_token)
    again = client.get(k, lease=Lease(wait_ms=0))
    assert again.lease == LeaseState.GRANTED
    assert client.set(k, b"filled", lease_token=again.lease_token).lease == LeaseWrite.ACCEPTED
    hit = client.get(k, lease=Lease(wait_ms=0))
    assert (hit.value, hit.lease) == (b"filled", LeaseState.NOT_NEEDED)


def test_sync_client_invalidate_voids_a_lease(client: CacheClient, unique: str):
    k = f"voided:{unique}"
    granted = client.get(k, lease=Lease(wait_ms=0))
    assert client.invalidate(keys=[k]).state == "DONE"
    assert client.set(k, b"late", lease_token=granted.lease_token).lease == LeaseWrite.VOIDED
    assert client.get(k).outcome == Outcome.MISS


def test_async_client_sets_gets_and_deletes(gateway, unique: str):
    async def scenario() -> None:
        async with AsyncCacheClient(gateway.addr, namespace="pytest") as c:
            k = f"async:{unique}"
            granted = await c.get(k, lease=Lease(wait_ms=0))
            assert granted.lease == LeaseState.GRANTED
            written = await c.set(k, b"v", lease_token=granted.lease_token)
            assert written.lease == LeaseWrite.ACCEPTED
            assert (await c.get(k)).value == b"v"
            assert (await c.delete(k)).deleted

    asyncio.run(scenario())


def test_async_client_survives_a_new_event_loop(gateway, unique: str):
    c = AsyncCacheClient(gateway.addr, namespace="pytest")
    asyncio.run(c.set(f"loops:{unique}", b"1"))
    assert asyncio.run(c.get(f"loops:{unique}")).value == b"1"


def test_invalid_requests_raise_cachegw_error(client: CacheClient):
    with pytest.raises(CachegwError) as err:
        client.get("")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_unreachable_gateway_raises_gateway_unavailable():
    from conftest import free_port

    with CacheClient(f"127.0.0.1:{free_port()}", timeout=1.0) as c:
        with pytest.raises(GatewayUnavailable):
            c.get("k")


def test_token_is_sent_and_a_missing_one_is_unauthenticated(auth_gateway, unique: str):
    gw, token = auth_gateway
    with CacheClient(gw.addr, namespace="ns", token=token) as c:
        assert c.set(f"auth:{unique}", b"ok").stored
        assert c.get(f"auth:{unique}").value == b"ok"
    with CacheClient(gw.addr, namespace="ns", token="") as anonymous:
        with pytest.raises(CachegwError, match="UNAUTHENTICATED.*CACHEGW_TOKEN") as err:
            anonymous.get(f"auth:{unique}")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert not isinstance(err.value, GatewayUnavailable)
    with CacheClient(gw.addr, namespace="other", token=token) as c:
        with pytest.raises(CachegwError) as err:
            c.get("k")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_token_defaults_to_the_environment(auth_gateway, monkeypatch, unique: str):
    gw, token = auth_gateway
    monkeypatch.setenv("CACHEGW_TOKEN", token)

    async def scenario() -> bytes:
        async with AsyncCacheClient(gw.addr, namespace="ns") as c:
            await c.set(f"env:{unique}", b"from env")
            return (await c.get(f"env:{unique}")).value

    assert asyncio.run(scenario()) == b"from env"
