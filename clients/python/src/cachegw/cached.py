"""`@cached`: read-through caching of a function's results in cachegw, with leases.

    @cached("users", ttl_hint=timedelta(minutes=5))
    def profile(user_id: int) -> UserProfile: ...

Each call:

1. builds the key from the function's qualified name and bound arguments (`keys.py`), or from
   `key=`;
2. `Get`s it with a lease (`lease_wait`, `lease_ttl`) and, by default, `allow_stale`;
3. on `HIT`, `COALESCED` (another caller's fill) or `STALE_SERVED`: decodes the value as the
   declared return type (`codec.py`) and returns it;
4. on `GRANTED` for a `MISS`: calls the function, `Set`s the result with the lease token and returns
   it; if the function raises, gives the lease back (`ReleaseLease`) and re-raises. `GRANTED` on a
   `HIT` or `STALE` (an early refresh, or the one refresher of a stale entry) returns the cached
   value at once and refreshes in the background (a thread, or a task on the running loop);
5. on `TIMED_OUT` (the holder did not fill within `lease_wait`), `WAIT`, or a `degraded` answer
   (the gateway's store is down): calls the function and returns its result without writing;
6. when the gateway cannot be reached (`UNAVAILABLE`, `DEADLINE_EXCEEDED`): calls the function.
   One warning is logged on the `cachegw` logger when that starts and one line when the gateway
   answers again, not one per call; meanwhile the gateway is retried at most once a second per
   client, so a black-holed gateway costs one deadline a second, not one per call.

Other refusals (`UNAUTHENTICATED`, `PERMISSION_DENIED`, `NOT_FOUND`, ...) are configuration errors
and raise `CachegwError` from the `Get`; a refused `Set` (say, a value over the namespace's
`max_value_bytes`) is logged and the function's result still returned. A stored value that no
longer decodes as the return type (the type changed) is logged, recomputed and overwritten.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from cachegw.aio import AsyncCacheClient
from cachegw.client import CacheClient
from cachegw.codec import CONTENT_TYPE, ValueCodec
from cachegw.errors import CachegwError, GatewayUnavailable
from cachegw.keys import build_key, qualified_name
from cachegw.results import GetResult, Lease, LeaseState, LeaseWrite

log = logging.getLogger("cachegw")

F = TypeVar("F", bound=Callable[..., Any])

#: The attribute a write's `ttl_hint` travels in (milliseconds), for the namespace's policy.
TTL_HINT_ATTRIBUTE = "ttl-hint-ms"

_defaults_lock = threading.Lock()
_default_clients: dict[type, Any] = {}


def default_client() -> CacheClient:
    """The client `@cached` sync functions use without `client=`: `$CACHEGW_ADDR`,
    `$CACHEGW_TOKEN`, created on first use."""
    with _defaults_lock:
        return _default_clients.setdefault(CacheClient, CacheClient())


def default_async_client() -> AsyncCacheClient:
    """The client `@cached` coroutine functions use without `client=` (see `default_client`)."""
    with _defaults_lock:
        return _default_clients.setdefault(AsyncCacheClient, AsyncCacheClient())


def _milliseconds(value: datetime.timedelta | float | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return int(value / datetime.timedelta(milliseconds=1))
    return int(value * 1000)


def cached(
    namespace: str | None = None,
    *,
    ttl_hint: datetime.timedelta | float | None = None,
    key: Callable[..., str] | None = None,
    ignore: Collection[str] = (),
    returns: Any = None,
    client: CacheClient | AsyncCacheClient | None = None,
    lease_wait: datetime.timedelta | float = 5.0,
    lease_ttl: datetime.timedelta | float | None = None,
    allow_stale: bool = True,
    attributes: Mapping[str, str] | None = None,
) -> Callable[[F], F]:
    """Caches a `def` or `async def` function's results in cachegw (see the module doc).

    - `namespace`: the gateway namespace (default: the client's).
    - `ttl_hint`: how long results may be cached (a `timedelta` or seconds). The gateway's
      namespace default or policy decides the TTL; the hint travels as the `ttl-hint-ms`
      attribute for a policy that honours it.
    - `key`: called with the function's arguments, returns the key string, used as is (no
      prefix): entries can be shared with other clients. Default: `keys.build_key`.
    - `ignore`: parameter names left out of the default key (`self`, a db session, a logger).
    - `returns`: the type results are stored and read back as; default: the return annotation.
    - `client`: a `CacheClient` (for `def`) or `AsyncCacheClient` (for `async def`); default:
      `default_client()` / `default_async_client()`.
    - `lease_wait`: how long a caller waits for another caller's fill before calling the
      function itself (seconds or `timedelta`). Make it longer than the function's p99.
    - `lease_ttl`: how long a filler that died blocks the key (default: the namespace's).
    - `allow_stale`: serve an entry inside its stale window while one caller refreshes it.
    - `attributes`: request attributes for the namespace's policy.
    """

    def decorate(func: F) -> F:
        is_async = inspect.iscoroutinefunction(func)
        if client is not None and isinstance(client, AsyncCacheClient) != is_async:
            want = "AsyncCacheClient" if is_async else "CacheClient"
            raise TypeError(f"@cached {qualified_name(func)}: client= must be a {want}")
        plan = _Plan(
            func,
            namespace=namespace,
            key=key,
            ignore=frozenset(ignore),
            codec=ValueCodec.for_function(func, returns),
            client=client,
            lease=Lease(wait_ms=_milliseconds(lease_wait) or 0, ttl_ms=_milliseconds(lease_ttl) or 0),
            allow_stale=allow_stale,
            attributes=dict(attributes or {}),
            ttl_hint_ms=_milliseconds(ttl_hint),
        )
        if is_async:

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await plan.call_async(args, kwargs)

            async def invalidate_async(*args: Any, **kwargs: Any) -> bool:
                c = plan.async_client()
                return (await c.delete(plan.key(args, kwargs), namespace=plan.namespace_of(c))).deleted

            wrapper: Any = async_wrapper
            wrapper.invalidate = invalidate_async
        else:

            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                return plan.call_sync(args, kwargs)

            def invalidate(*args: Any, **kwargs: Any) -> bool:
                c = plan.sync_client()
                return c.delete(plan.key(args, kwargs), namespace=plan.namespace_of(c)).deleted

            wrapper = sync_wrapper
            wrapper.invalidate = invalidate
        wrapper.cache_key = lambda *args, **kwargs: plan.key(args, kwargs)
        return wrapper  # type: ignore[return-value]

    return decorate


class _Plan:
    """One decorated function: how its calls are keyed, stored and filled."""

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        namespace: str | None,
        key: Callable[..., str] | None,
        ignore: frozenset[str],
        codec: ValueCodec,
        client: CacheClient | AsyncCacheClient | None,
        lease: Lease,
        allow_stale: bool,
        attributes: dict[str, str],
        ttl_hint_ms: int | None,
    ) -> None:
        self.func = func
        self.name = qualified_name(func)
        self.namespace = namespace
        self.user_key = key
        self.ignore = ignore
        self.signature = inspect.signature(func)
        self.codec = codec
        self.client = client
        self.lease = lease
        self.allow_stale = allow_stale
        self.read_attributes = attributes
        self.write_attributes = dict(attributes)
        if ttl_hint_ms is not None:
            self.write_attributes[TTL_HINT_ATTRIBUTE] = str(ttl_hint_ms)
        self._refreshes: set[asyncio.Task[Any]] = set()

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self.user_key is None:
            return build_key(self.func, args, kwargs, self.ignore, self.signature)
        key = self.user_key(*args, **kwargs)
        if not isinstance(key, str) or not key:
            raise TypeError(f"@cached {self.name}: key= returned {key!r}, not a non-empty str")
        return key

    def sync_client(self) -> CacheClient:
        return self.client if self.client is not None else default_client()  # type: ignore[return-value]

    def async_client(self) -> AsyncCacheClient:
        return self.client if self.client is not None else default_async_client()  # type: ignore[return-value]

    def namespace_of(self, client: CacheClient | AsyncCacheClient) -> str:
        return self.namespace or client.namespace

    def _cached_value(self, got: GetResult) -> tuple[bool, Any]:
        """(True, value) when `got` holds a value that decodes as the return type."""
        if not got.usable or got.degraded:
            return False, None
        try:
            return True, self.codec.decode(got.value)
        except ValueError as err:
            log.warning("%s: recomputing an undecodable cached value: %s", self.name, err)
            return False, None

    def _encode(self, result: Any) -> bytes | None:
        try:
            return self.codec.encode(result)
        except Exception as err:  # pydantic's serialisation errors have no common base
            log.warning("%s: result not cached, it does not serialise as %r: %s",
                        self.name, self.codec.return_type, err)
            return None

    def _after_set(self, key: str, written: Any) -> None:
        if written.lease == LeaseWrite.VOIDED:
            log.debug("%s: fill of %r voided by an invalidation, not cached", self.name, key)

    # --- synchronous -------------------------------------------------------------------------

    def call_sync(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.key(args, kwargs)
        client = self.sync_client()
        namespace = self.namespace_of(client)
        if not client.availability.should_try():
            return self.func(*args, **kwargs)
        try:
            got = client.get(key, namespace=namespace, allow_stale=self.allow_stale,
                             lease=self.lease, attributes=self.read_attributes)
        except GatewayUnavailable as err:
            client.availability.mark_down(err)
            return self.func(*args, **kwargs)
        client.availability.mark_up()
        found, value = self._cached_value(got)
        if got.lease == LeaseState.GRANTED:
            if found:  # early refresh, or the one refresher of a stale entry
                threading.Thread(target=self._fill_sync, args=(client, namespace, key, got.lease_token,
                                 args, kwargs, True), daemon=True).start()
                return value
            return self._fill_sync(client, namespace, key, got.lease_token, args, kwargs, False)
        if found:
            return value
        result = self.func(*args, **kwargs)
        if got.usable and not got.degraded:  # an undecodable value: replace it
            self._store_sync(client, namespace, key, result, "")
        return result

    def _fill_sync(self, client, namespace, key, token, args, kwargs, background) -> Any:
        try:
            result = self.func(*args, **kwargs)
        except BaseException:
            self._release_sync(client, namespace, key, token)
            if background:
                log.exception("%s: background refresh of %r failed", self.name, key)
                return None
            raise
        self._store_sync(client, namespace, key, result, token)
        return result

    def _store_sync(self, client: CacheClient, namespace: str, key: str, result: Any, token: str) -> None:
        data = self._encode(result)
        if data is None:
            self._release_sync(client, namespace, key, token)
            return
        try:
            written = client.set(key, data, namespace=namespace, content_type=CONTENT_TYPE,
                                 lease_token=token, attributes=self.write_attributes)
        except GatewayUnavailable as err:
            client.availability.mark_down(err)
        except CachegwError as err:
            log.warning("%s: result not cached: %s", self.name, err)
        else:
            self._after_set(key, written)

    def _release_sync(self, client: CacheClient, namespace: str, key: str, token: str) -> None:
        if not token:
            return
        try:
            client.release_lease(key, token, namespace=namespace, attributes=self.write_attributes)
        except GatewayUnavailable as err:
            client.availability.mark_down(err)
        except CachegwError as err:
            log.warning("%s: lease of %r not released (it expires by itself): %s", self.name, key, err)

    # --- asyncio ----------------------------------------------------------------------------

    async def call_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.key(args, kwargs)
        client = self.async_client()
        namespace = self.namespace_of(client)
        if not client.availability.should_try():
            return await self.func(*args, **kwargs)
        try:
            got = await client.get(key, namespace=namespace, allow_stale=self.allow_stale,
                                   lease=self.lease, attributes=self.read_attributes)
        except GatewayUnavailable as err:
            client.availability.mark_down(err)
            return await self.func(*args, **kwargs)
        client.availability.mark_up()
        found, value = self._cached_value(got)
        if got.lease == LeaseState.GRANTED:
            if found:
                task = asyncio.get_running_loop().create_task(
                    self._fill_async(client, namespace, key, got.lease_token, args, kwargs, True)
                )
                self._refreshes.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self._refreshes.discard)
                return value
            return await self._fill_async(client, namespace, key, got.lease_token, args, kwargs, False)
        if found:
            return value
        result = await self.func(*args, **kwargs)
        if got.usable and not got.degraded:
            await self._store_async(client, namespace, key, result, "")
        return result

    async def _fill_async(self, client, namespace, key, token, args, kwargs, background) -> Any:
        try:
            result = await self.func(*args, **kwargs)
        except BaseException:
            # Shielded: a cancelled caller still gives its lease back.
            await asyncio.shield(self._release_async(client, namespace, key, token))
            if background:
                log.exception("%s: background refresh of %r failed", self.name, key)
                return None
            raise
        await self._store_async(client, namespace, key, result, token)
        return result

    async def _store_async(self, client: AsyncCacheClient, namespace: str, key: str, result: Any,
                           token: str) -> None:
        data = self._encode(result)
        if data is None:
            await self._release_async(client, namespace, key, token)
            return
        try:
            written = await client.set(key, data, namespace=namespace, content_type=CONTENT_TYPE,
                                       lease_token=token, attributes=self.write_attributes)
        except GatewayUnavailable as err:
            client.availability.mark_down(err)
        except CachegwError as err:
            log.warning("%s: result not cached: %s", self.name, err)
        else:
            self._after_set(key, written)

    async def _release_async(self, client: AsyncCacheClient, namespace: str, key: str,
                             token: str) -> None:
        if not token:
            return
        try:
            await client.release_lease(key, token, namespace=namespace,
                                       attributes=self.write_attributes)
        except GatewayUnavailable as err:
            client.availability.mark_down(err)
        except CachegwError as err:
            log.warning("%s: lease of %r not released (it expires by itself): %s", self.name, key, err)


__all__ = ["cached", "default_client", "default_async_client"]
