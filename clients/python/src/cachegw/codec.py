"""Values for `@cached`: a function's result is stored as JSON by its declared return type and
read back as that type — a pydantic model comes back as the model, a dataclass as the dataclass,
`list[int]` as a list of ints, `Optional[X]` as `X` or `None`.

One pydantic `TypeAdapter` per decorated function does both directions (`dump_json` /
`validate_json`), so every type pydantic understands works, nested: models, dataclasses,
`TypedDict`s, enums, datetimes, `UUID`, `Decimal`, unions, containers of those. Entries are written
with content type `application/json`.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

CONTENT_TYPE = "application/json"


class ValueCodec:
    """Encodes and decodes one function's results."""

    def __init__(self, return_type: Any) -> None:
        self.return_type = return_type
        self._adapter: TypeAdapter[Any] = TypeAdapter(return_type)

    @classmethod
    def for_function(cls, func: Callable[..., Any], returns: Any = None) -> ValueCodec:
        """The codec of `func`'s return annotation (or of `returns`, which overrides it)."""
        if returns is None:
            hints = typing.get_type_hints(func, include_extras=True)
            if "return" not in hints:
                raise TypeError(
                    f"@cached {func.__module__}.{func.__qualname__}: annotate the return type "
                    "(-> UserProfile, -> list[int], -> None, ...) or pass returns=: it decides "
                    "how the result is stored and read back"
                )
            returns = hints["return"]
        return cls(type(None) if returns is None else returns)

    def encode(self, value: Any) -> bytes:
        return self._adapter.dump_json(value)

    def decode(self, data: bytes) -> Any:
        """The stored value as the return type; `ValueError` if it is not one."""
        try:
            return self._adapter.validate_json(data)
        except ValidationError as err:
            raise ValueError(f"cached value is not a {self.return_type!r}: {err}") from err
