"""`@cached` against the real gateway: typed round trips, one origin call for 100 concurrent
callers, and calls that still work with the gateway stopped."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cachegw import AsyncCacheClient, CacheClient, Outcome, cached
from conftest import Gateway
from models import Address, Point, Route, UserProfile

ORIGIN_LATENCY_S = 0.2  # the simulated origin's latency, so that concurrent callers overlap


class Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        with self._lock:
            self.value += 1


def profile_of(user_id: int) -> UserProfile:
    return UserProfile(
        user_id=user_id,
        name="Ada",
        address=Address(city="London", country="GB"),
        last_login=datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.timezone.utc),
    )


def test_a_pydantic_model_comes_back_as_the_model(client: CacheClient, unique: str):
    calls = Counter()

    @cached("pytest", client=client)
    def load_profile(user_id: int, tenant: str) -> UserProfile:
        calls.add()
        return profile_of(user_id)

    first = load_profile(42, unique)
    second = load_profile(42, tenant=unique)
    assert isinstance(second, UserProfile) and isinstance(second.address, Address)
    assert second == first == profile_of(42)
    assert second.last_login.tzinfo is not None and second.nickname is None
    assert calls.value == 1
    stored = client.get(load_profile.cache_key(42, unique))
    assert stored.outcome == Outcome.HIT and stored.content_type == "application/json"


@pytest.mark.parametrize(
    ("returns", "value"),
    [
        (Route, Route("commute", [Point(0.0, 1.5), Point(2.0, -3.25)])),
        (list[int], [3, 1, 2]),
        (dict[str, float], {"b": 2.5, "a": -1.0}),
        (type(None), None),
        (list[UserProfile], [profile_of(1), profile_of(2)]),
        (UserProfile | None, None),
    ],
    ids=["dataclass", "list-int", "dict-str-float", "none", "list-model", "optional-model"],
)
def test_results_round_trip_as_the_declared_type(client: CacheClient, unique: str, returns, value):
    calls = Counter()

    @cached("pytest", client=client, returns=returns)
    def compute(tag: str):
        calls.add()
        return value

    assert compute(unique) == value
    cached_result = compute(unique)
    assert cached_result == value and type(cached_result) is type(value)
    if isinstance(value, Route):
        assert all(isinstance(p, Point) for p in cached_result.points)
    assert calls.value == 1


def test_a_none_annotated_function_is_cached(client: CacheClient, unique: str):
    calls = Counter()

    @cached("pytest", client=client)
    def warm(tag: str) -> None:
        calls.add()

    assert warm(unique) is None and warm(unique) is None
    assert calls.value == 1


def test_100_threads_on_a_cold_key_run_the_function_once(client: CacheClient, unique: str):
    calls = Counter()

    @cached("pytest", client=client)
    def slow_profile(user_id: int, tag: str) -> UserProfile:
        calls.add()
        time.sleep(ORIGIN_LATENCY_S)
        return profile_of(user_id)

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(lambda _: slow_profile(7, unique), range(100)))
    assert calls.value == 1
    assert results == [profile_of(7)] * 100
    assert all(isinstance(r, UserProfile) for r in results)


def test_100_asyncio_tasks_on_a_cold_key_run_the_function_once(gateway: Gateway, unique: str):
    calls = Counter()
    aclient = AsyncCacheClient(gateway.addr, namespace="pytest")

    @cached("pytest", client=aclient)
    async def slow_profile(user_id: int, tag: str) -> UserProfile:
        calls.add()
        await asyncio.sleep(ORIGIN_LATENCY_S)
        return profile_of(user_id)

    async def scenario() -> list[UserProfile]:
        try:
            return await asyncio.gather(*(slow_profile(8, unique) for _ in range(100)))
        finally:
            await aclient.close()

    results = asyncio.run(scenario())
    assert calls.value == 1
    assert results == [profile_of(8)] * 100


def test_a_failing_function_gives_its_lease_back(client: CacheClient, unique: str):
    attempts = Counter()

    @cached("pytest", client=client, lease_wait=10.0)
    def flaky(tag: str) -> int:
        attempts.add()
        if attempts.value == 1:
            raise RuntimeError("origin down")
        return 5

    with pytest.raises(RuntimeError, match="origin down"):
        flaky(unique)
    started = time.monotonic()
    assert flaky(unique) == 5  # granted at once: not after a 10 s wait or the lease's expiry
    assert time.monotonic() - started < 2.0
    assert flaky(unique) == 5 and attempts.value == 2


def test_a_custom_key_is_used_as_is(client: CacheClient, unique: str):
    @cached("pytest", client=client, key=lambda user_id: f"user:{unique}:{user_id}")
    def load(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    assert load(3) == {"id": 3}
    assert client.get(f"user:{unique}:3").value == b'{"id":3}'
    assert load.invalidate(3) and client.get(f"user:{unique}:3").outcome == Outcome.MISS


def test_an_unsupported_argument_asks_for_key(client: CacheClient):
    @cached("pytest", client=client)
    def load(conn: object) -> int:
        return 1

    with pytest.raises(TypeError, match="key="):
        load(object())


def test_an_undecodable_value_is_recomputed_and_replaced(client: CacheClient, unique: str):
    @cached("pytest", client=client)
    def count(tag: str) -> int:
        return 12

    client.set(count.cache_key(unique), b'"not an int"')
    assert count(unique) == 12
    assert client.get(count.cache_key(unique)).value == b"12"


def test_with_the_gateway_stopped_calls_return_the_result_and_warn_once(
    own_gateway: Gateway, unique: str, caplog
):
    calls = Counter()
    with CacheClient(own_gateway.addr, namespace="pytest", timeout=1.0) as c:

        @cached("pytest", client=c)
        def load(user_id: int) -> UserProfile:
            calls.add()
            return profile_of(user_id)

        assert load(1) == profile_of(1) and load(1) == profile_of(1)
        assert calls.value == 1
        own_gateway.stop()
        caplog.set_level(logging.INFO, logger="cachegw")
        caplog.clear()
        results = [load(1) for _ in range(50)]
        assert results == [profile_of(1)] * 50
        assert all(isinstance(r, UserProfile) for r in results)
        assert calls.value == 51
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "unavailable" in warnings[0].getMessage()


def test_async_with_the_gateway_stopped_calls_return_the_result(own_gateway: Gateway, caplog):
    aclient = AsyncCacheClient(own_gateway.addr, namespace="pytest", timeout=1.0)

    @cached("pytest", client=aclient)
    async def load(user_id: int) -> UserProfile:
        return profile_of(user_id)

    own_gateway.stop()
    caplog.set_level(logging.WARNING, logger="cachegw")

    async def scenario() -> list[UserProfile]:
        try:
            return await asyncio.gather(*(load(2) for _ in range(20)))
        finally:
            await aclient.close()

    assert asyncio.run(scenario()) == [profile_of(2)] * 20
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_the_client_says_when_the_gateway_is_back(caplog):
    own = Gateway("--store", "memory")
    try:
        with CacheClient(own.addr, namespace="pytest", timeout=1.0) as c:
            c.availability.mark_down(RuntimeError("test"))
            c.availability._retry_at = 0.0  # retry now, not in a second

            @cached("pytest", client=c)
            def one() -> int:
                return 1

            caplog.set_level(logging.INFO, logger="cachegw")
            assert one() == 1
            assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        own.stop()


def test_callers_that_time_out_waiting_call_the_function_themselves(client: CacheClient, unique: str):
    calls = Counter()

    @cached("pytest", client=client, lease_wait=0.05)
    def slow(tag: str) -> str:
        calls.add()
        time.sleep(0.5)  # far longer than the waiters' 50 ms
        return "done"

    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(lambda _: slow(unique), range(5)))
    assert results == ["done"] * 5
    # The holder, and every waiter whose 50 ms wait timed out (all of them, unless a thread was
    # so late that the fill had landed: then it had a HIT).
    assert 2 <= calls.value <= 5
    before = calls.value
    assert slow(unique) == "done" and calls.value == before  # the holder's fill was written
