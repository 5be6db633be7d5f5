"""The errors the clients raise: one per way a call can fail, converted from `grpc.RpcError` in
exactly one place (`from_rpc_error`)."""

from __future__ import annotations

import grpc

#: Codes meaning "the gateway could not be reached in time": callers may fall back to the origin.
UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "pass token= to the client or set CACHEGW_TOKEN",
    grpc.StatusCode.PERMISSION_DENIED: "the token's tenant lacks the right on this namespace",
}


class CachegwError(Exception):
    """A call the gateway refused or could not answer. `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str) -> None:
        hint = _HINTS.get(code)
        message = f"cachegw {method}: {code.name}: {details}" + (f" ({hint})" if hint else "")
        super().__init__(message)
        self.code = code
        self.details = details
        self.method = method


class GatewayUnavailable(CachegwError):
    """The gateway could not be reached before the deadline (UNAVAILABLE or DEADLINE_EXCEEDED).

    `@cached` answers these by calling the function itself."""


def from_rpc_error(err: grpc.RpcError, method: str) -> CachegwError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    cls = GatewayUnavailable if code in UNREACHABLE_CODES else CachegwError
    return cls(code, details, method)
