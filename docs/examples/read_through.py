"""Read-through with leases, in Python (grpcio), against a running gateway.

Generate the stubs from the repository's proto/ first (from the repository root):

    python3 -m venv .venv && .venv/bin/pip install grpcio grpcio-tools
    mkdir -p target/py && .venv/bin/python -m grpc_tools.protoc -I proto \
        --python_out=target/py --grpc_python_out=target/py proto/cachegw/v1/cache.proto
    PYTHONPATH=target/py .venv/bin/python docs/examples/read_through.py 127.0.0.1:50051

Of all the callers that miss one key at the same moment, on every gateway, only
one calls the origin; the others wait for its fill (or take the stale value).
"""

import sys
import threading
import time

import grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc

origin_calls = 0
origin_lock = threading.Lock()


def origin(key: str) -> bytes:
    """The slow, expensive thing the cache protects."""
    global origin_calls
    with origin_lock:
        origin_calls += 1
    time.sleep(0.05)
    return f"computed value of {key}".encode()


def read_through(cache: cache_pb2_grpc.CacheStub, namespace: str, key: str) -> bytes:
    got = cache.Get(
        pb.GetRequest(
            namespace=namespace,
            key=key,
            allow_stale=True,  # take a stale value at once while someone refreshes
            lease=pb.LeaseRequest(wait_ms=1000),  # wait up to 1 s for another's fill
        ),
        timeout=2.0,
    )
    usable = got.outcome in (pb.HIT, pb.STALE)
    if got.lease != pb.GRANTED:
        if usable:  # HIT, COALESCED (someone else's fill) or STALE_SERVED
            return got.value
        # WAIT / TIMED_OUT (the filler is slow or gone) or degraded: ask the
        # origin, and don't write: the lease holder will.
        return origin(key)
    # We hold the lease (on a HIT or STALE: a refresh; serve `got.value` meanwhile).
    try:
        value = origin(key)
    except Exception:
        # Give the lease back so the next caller can try at once, and serve
        # the stale value if there is one (stale-if-error).
        cache.ReleaseLease(
            pb.ReleaseLeaseRequest(namespace=namespace, key=key, lease_token=got.lease_token)
        )
        if got.outcome == pb.STALE:
            return got.value
        raise
    written = cache.Set(
        pb.SetRequest(namespace=namespace, key=key, value=value, lease_token=got.lease_token)
    )
    if written.lease == pb.VOIDED:
        # Invalidated while we computed: not cached, still the origin's answer.
        print(f"{key}: fill voided by an invalidation", file=sys.stderr)
    return value


def main() -> None:
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    with grpc.insecure_channel(address) as channel:
        cache = cache_pb2_grpc.CacheStub(channel)
        key = f"report:py:{time.time_ns()}"
        results = []
        readers = [
            threading.Thread(target=lambda: results.append(read_through(cache, "quickstart", key)))
            for _ in range(100)
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        assert results == [f"computed value of {key}".encode()] * 100, results[:3]
        print(f"100 readers served, {origin_calls} origin call(s)")


if __name__ == "__main__":
    main()
