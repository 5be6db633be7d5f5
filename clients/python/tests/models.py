"""Return types the tests round-trip through the gateway."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from pydantic import BaseModel


class Address(BaseModel):
    city: str
    country: str


class UserProfile(BaseModel):
    user_id: int
    name: str
    address: Address
    last_login: datetime.datetime
    nickname: str | None = None


@dataclass
class Point:
    x: float
    y: float


@dataclass
class Route:
    name: str
    points: list[Point] = field(default_factory=list)
