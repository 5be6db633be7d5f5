"""The canonical key builder, without a gateway."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import threading

import pytest

from cachegw.keys import MAX_PLAIN_KEY_BYTES, build_key
from models import Address


def f(x, y=10):
    return x


def key(func, *args, **kwargs):
    return build_key(func, args, kwargs)


def test_int_str_float_bool_are_distinct_keys():
    keys = {key(f, 1), key(f, "1"), key(f, 1.0), key(f, True)}
    assert len(keys) == 4


def test_list_and_tuple_are_distinct_keys():
    assert key(f, [1, 2]) != key(f, (1, 2))


def test_keyword_and_positional_calls_share_a_key():
    assert key(f, 1, 2) == key(f, x=1, y=2) == key(f, 1, y=2) == key(f, y=2, x=1)


def test_defaults_are_applied():
    assert key(f, 1) == key(f, 1, 10) == key(f, x=1, y=10)
    assert key(f, 1) != key(f, 1, 11)


def test_dict_order_and_set_order_are_irrelevant():
    assert key(f, {"a": 1, "b": 2}) == key(f, {"b": 2, "a": 1})
    assert key(f, {3, 1, 2}) == key(f, {2, 3, 1})
    assert key(f, {1: "a"}) != key(f, {"1": "a"})


def test_the_function_is_part_of_the_key():
    def g(x, y=10):
        return x

    assert key(f, 1) != key(g, 1)
    assert key(f, 1).startswith("py1:test_keys.f:")


def test_models_dataclasses_enums_and_datetimes_have_stable_keys():
    class Colour(enum.Enum):
        RED = "red"

    @dataclasses.dataclass
    class Box:
        w: int
        h: int

    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    a = key(f, Address(city="Lyon", country="FR"), Colour.RED)
    assert a == key(f, Address(country="FR", city="Lyon"), Colour.RED)
    assert a != key(f, Address(city="Lyon", country="BE"), Colour.RED)
    assert key(f, Box(1, 2)) == key(f, Box(w=1, h=2)) != key(f, Box(2, 1))
    assert key(f, when) != key(f, when.replace(tzinfo=None))
    assert key(f, datetime.date(2026, 1, 2)) != key(f, "2026-01-02")
    assert key(f, b"\x00\xff") != key(f, "\x00\xff")


def test_unsupported_argument_raises_a_type_error_asking_for_key():
    with pytest.raises(TypeError, match=r"argument 'x' of type lock.*key="):
        key(f, threading.Lock())


def test_long_arguments_are_hashed_under_the_limit():
    long = key(f, "x" * 5000)
    assert len(long.encode()) <= MAX_PLAIN_KEY_BYTES
    assert long.startswith("py1:test_keys.f:sha256:")
    assert long != key(f, "x" * 5001)
    assert len(key(f, "é" * 500).encode()) <= MAX_PLAIN_KEY_BYTES


def test_wrong_arguments_fail_like_the_call_would():
    with pytest.raises(TypeError):
        key(f, 1, 2, 3)
