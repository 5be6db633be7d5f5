"""cachegw: Python clients for the cachegw gRPC cache gateway.

- `CacheClient` (`client.py`): synchronous, thread-safe, one channel per client.
- `AsyncCacheClient` (`aio.py`): the same on asyncio (`grpc.aio`).
- `cached` (`cached.py`): a decorator caching a function's results with leases, keyed by
  `keys.py` and stored by its return type with `codec.py`.
- `cachegw.v1`: the stubs generated from proto/cachegw/v1/cache.proto (`generate_stubs.py`).
"""

from cachegw.aio import AsyncCacheClient
from cachegw.cached import cached, default_async_client, default_client
from cachegw.client import CacheClient
from cachegw.errors import CachegwError, GatewayUnavailable
from cachegw.keys import build_key
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

__all__ = [
    "AsyncCacheClient",
    "CacheClient",
    "CachegwError",
    "DeleteResult",
    "GatewayUnavailable",
    "GetResult",
    "InvalidateResult",
    "Lease",
    "LeaseState",
    "LeaseWrite",
    "Outcome",
    "SetResult",
    "build_key",
    "cached",
    "default_async_client",
    "default_client",
]
