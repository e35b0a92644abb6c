"""Column types that behave the same on SQLite and PostgreSQL.

SQLite stores almost anything: strings past their declared length, NUL characters, 64-bit
numbers in a 32-bit column, NaN as NULL, and it hands datetimes back without a time zone.
PostgreSQL refuses the first four with an error and returns datetimes in its session's time
zone. These types apply PostgreSQL's rules on both, before the database sees the value, so
a value is accepted or refused the same way whichever database holds the catalog, and a
refused one raises `CatalogValueError` (the API answers it with a 422, not a 500).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Double, Integer, String, Text
from sqlalchemy.types import TypeDecorator

INT32 = (-(1 << 31), (1 << 31) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)


class CatalogValueError(ValueError):
    """A value the catalog cannot hold (too long, out of range, a NUL character...)."""


class UtcDateTime(TypeDecorator[datetime]):
    """A point in time, always handed back as an aware datetime in UTC.

    Stored as UTC: SQLite keeps the wall-clock digits only (so they must be UTC), and
    PostgreSQL's `timestamptz` converts to the session's zone on the way out. A naive
    datetime is a bug in the caller (whose clock would it be?) and is refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the catalog stores aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None,
                             dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _clean_text(value: str, clip: bool) -> str:
    """No NUL (PostgreSQL text cannot hold one) and no lone surrogate (not UTF-8)."""
    if "\x00" in value or not value.isascii() and _has_surrogate(value):
        if not clip:
            raise CatalogValueError("text must not contain NUL characters or invalid Unicode")
        value = value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return value


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class BoundedString(TypeDecorator[str]):
    """VARCHAR(length) with its length enforced on every database.

    `clip=True` is for descriptive text (a hostname an endpoint reports, an audit target):
    too long is cut and bad characters replaced, since refusing it would fail a request
    over a label. Otherwise (names, ids, states) a bad value is refused."""

    impl = String
    cache_ok = True

    def __init__(self, length: int, clip: bool = False):
        super().__init__(length)
        self.length = length  # named as the argument: SQLAlchemy's cache key reads it
        self.clip = clip

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        value = _clean_text(value, self.clip)
        if len(value) > self.length:
            if not self.clip:
                raise CatalogValueError(f"text longer than {self.length} characters: "
                                        f"{value[:40]!r}...")
            value = value[:self.length]
        return value


class CleanText(TypeDecorator[str]):
    """TEXT of any length, with NUL characters and invalid Unicode replaced."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else _clean_text(value, clip=True)


class _CheckedInteger(TypeDecorator[int]):
    impl = Integer
    cache_ok = True
    bounds = INT32

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        if value is not None and not self.bounds[0] <= value <= self.bounds[1]:
            raise CatalogValueError(f"number out of range: {value}")
        return value


class Int32(_CheckedInteger):
    """INTEGER, refused outside 32 bits (SQLite would store up to 64)."""

    cache_ok = True  # SQLAlchemy reads it from each class itself, not from a base


class Int64(_CheckedInteger):
    """BIGINT, refused outside 64 bits."""

    cache_ok = True

    impl = BigInteger
    bounds = INT64


class FiniteFloat(TypeDecorator[float]):
    """DOUBLE PRECISION without NaN or infinities (SQLite turns NaN into NULL)."""

    impl = Double
    cache_ok = True

    def process_bind_param(self, value: float | None, dialect: Dialect) -> float | None:
        if value is not None and not math.isfinite(value):
            raise CatalogValueError(f"number not finite: {value}")
        return value


class CheckedJSON(TypeDecorator[object]):
    """JSON, standard only: NaN and Infinity are refused (PostgreSQL's json type refuses
    them, SQLite would keep them). Checked here rather than in the driver's serializer so
    the refusal looks the same on both databases."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: object, dialect: Dialect) -> object:
        if value is not None:
            check_json(value)
        return value


def check_json(value: object) -> None:
    """Refuse (CatalogValueError) what a CheckedJSON column would: for a value written
    later, in a batch that one bad value must not fail."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise CatalogValueError("JSON numbers must be finite (no NaN or Infinity)") from None
