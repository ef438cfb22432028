"""What the job and model stores share: one Redis hash per record, read by id."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import redis

from ._codec import text_dict
from .errors import RecordError

RecordT = TypeVar("RecordT")


class HashRecordStore(Generic[RecordT]):
    """Reads records kept as one Redis hash each; the subclass passes where they live and how to decode them."""

    def __init__(self, client: redis.Redis, key_of: Callable[[str], str], decode: Callable[[dict[str, str]], RecordT],
                 not_found: type[RecordError]) -> None:
        """`key_of(id)` is a record's hash (from records.keys), `decode` makes the record of its
        fields, and `not_found(id)` is what require() raises."""
        self.redis = client
        self._key_of = key_of
        self._decode = decode
        self._not_found = not_found

    def get(self, record_id: str) -> RecordT | None:
        """The record, or None if it does not exist (never made, deleted or expired)."""
        raw = self.redis.hgetall(self._key_of(record_id))
        return self._decode(text_dict(raw)) if raw else None

    def require(self, record_id: str) -> RecordT:
        """get() that raises the store's not-found error (the API answers it with a 404)."""
        record = self.get(record_id)
        if record is None:
            raise self._not_found(record_id)
        return record
