"""Cache keys for `@cached`: a canonical, typed encoding of a function's qualified name and its
bound arguments.

    py1:<module>.<qualname>:<canonical JSON of the arguments>

The arguments are bound with `inspect.signature(f).bind(*args, **kwargs)` and defaults applied,
so `f(1)`, `f(x=1)` and `f(1, y=DEFAULT)` are one key. Each argument is encoded as a JSON array
whose first element names its type, so values Python calls equal but which are different inputs
stay apart (`1`, `1.0`, `True` and `"1"` are four keys; a tuple is not a list):

| Python value | encoding |
|---|---|
| `None` | `null` |
| `bool` | `["bool", true]` |
| `int` | `["int", "12"]` (decimal text: exact at any size) |
| `float` | `["float", "1.5"]` (`repr`: round-trips, `nan`, `inf`, `-0.0`) |
| `str` | `["str", "..."]` |
| `bytes`, `bytearray` | `["bytes", "<base64>"]` |
| `list` / `tuple` | `["list", [...]]` / `["tuple", [...]]` |
| `dict` | `["dict", [[k, v], ...]]`, pairs sorted by their encoding: insertion order is irrelevant |
| `set` / `frozenset` | `["set", [...]]`, elements sorted by their encoding |
| `enum.Enum` | `["enum", "<module.qualname>", <value>]` |
| `datetime` / `date` / `time` | `["datetime", "<isoformat>"]`, `["date", …]`, `["time", …]` (an aware and a naive time differ) |
| `timedelta` | `["timedelta", "<microseconds>"]` |
| `decimal.Decimal` / `uuid.UUID` | `["decimal", "<str>"]` / `["uuid", "<str>"]` |
| pydantic model | `["model", "<module.qualname>", {field: value, ...}]` (fields by name, sorted) |
| dataclass instance | `["dataclass", "<module.qualname>", {field: value, ...}]` |

The arguments themselves: `{"name": value, ...}` sorted by name (`*args` a tuple, `**kwargs` a
dict). JSON is written with sorted keys, no spaces and `ensure_ascii=False`.

Anything else — a database session, `self`, an open file — raises `TypeError` naming the argument
and asking for `key=` (or `ignore=`); `str()` or `repr()` of an arbitrary object is never used:
it is neither stable (addresses) nor distinct (`str(1) == str("1")`).

A key longer than `MAX_PLAIN_KEY_BYTES` (UTF-8) keeps its prefix and replaces the arguments with
`sha256:<64 hex digits>` of their canonical JSON, so every key fits the gateway's
`limits.max_key_bytes` (1024 by default) and stays readable when short.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import hashlib
import inspect
import json
import uuid
from collections.abc import Callable, Collection
from typing import Any

#: The version of this encoding: bump it when it changes, so old entries are never misread.
SCHEME = "py1"
#: Keys up to this many bytes are kept as they are; longer ones hash their arguments.
MAX_PLAIN_KEY_BYTES = 256

_pydantic_base: type | None
try:
    from pydantic import BaseModel as _pydantic_base
except ImportError:  # pragma: no cover - pydantic is a dependency
    _pydantic_base = None


class _Unsupported(TypeError):
    pass


def qualified_name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _sorted(encoded: list[Any]) -> list[Any]:
    return sorted(encoded, key=_dump)


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def encode(value: Any) -> Any:
    """The canonical, JSON-serialisable form of one value (see the module doc for the table)."""
    # bool before int (bool is an int), Enum before its mixed-in base (an IntEnum is an int).
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        return ["enum", _type_name(type(value)), encode(value.value)]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", str(value)]
    if isinstance(value, float):
        return ["float", repr(value)]
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, (bytes, bytearray)):
        return ["bytes", base64.b64encode(bytes(value)).decode("ascii")]
    if isinstance(value, list):
        return ["list", [encode(v) for v in value]]
    if isinstance(value, tuple):
        return ["tuple", [encode(v) for v in value]]
    if isinstance(value, dict):
        return ["dict", _sorted([[encode(k), encode(v)] for k, v in value.items()])]
    if isinstance(value, (set, frozenset)):
        return ["set", _sorted([encode(v) for v in value])]
    if isinstance(value, datetime.datetime):
        return ["datetime", value.isoformat()]
    if isinstance(value, datetime.date):
        return ["date", value.isoformat()]
    if isinstance(value, datetime.time):
        return ["time", value.isoformat()]
    if isinstance(value, datetime.timedelta):
        return ["timedelta", str(value // datetime.timedelta(microseconds=1))]
    if isinstance(value, decimal.Decimal):
        return ["decimal", str(value)]
    if isinstance(value, uuid.UUID):
        return ["uuid", str(value)]
    if _pydantic_base is not None and isinstance(value, _pydantic_base):
        fields = {name: encode(getattr(value, name)) for name in type(value).model_fields}
        return ["model", _type_name(type(value)), fields]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return ["dataclass", _type_name(type(value)), fields]
    raise _Unsupported(type(value).__qualname__)


def canonical_arguments(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ignore: Collection[str] = (),
    signature: inspect.Signature | None = None,
) -> str:
    """The canonical JSON of a call's bound arguments, defaults applied, `ignore`d names left out."""
    bound = (signature or inspect.signature(func)).bind(*args, **kwargs)
    bound.apply_defaults()
    encoded = {}
    for name, value in bound.arguments.items():
        if name in ignore:
            continue
        try:
            encoded[name] = encode(value)
        except _Unsupported as err:
            raise TypeError(
                f"@cached {qualified_name(func)}: cannot build a cache key from argument "
                f"{name!r} of type {err}: pass key= (a function of the same arguments returning "
                f"the key string) or ignore=({name!r},) if it does not change the result"
            ) from None
    return _dump(encoded)


def build_key(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ignore: Collection[str] = (),
    signature: inspect.Signature | None = None,
) -> str:
    """The cache key of `func(*args, **kwargs)`: see the module doc."""
    prefix = f"{SCHEME}:{qualified_name(func)}:"
    arguments = canonical_arguments(func, args, kwargs, ignore, signature)
    key = prefix + arguments
    if len(key.encode()) <= MAX_PLAIN_KEY_BYTES:
        return key
    digest = hashlib.sha256(arguments.encode()).hexdigest()
    if len(prefix.encode()) > MAX_PLAIN_KEY_BYTES:  # an absurdly long qualified name
        prefix = f"{SCHEME}:sha256:{hashlib.sha256(prefix.encode()).hexdigest()}:"
    return f"{prefix}sha256:{digest}"
