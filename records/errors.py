"""Exceptions raised by the record stores; the API maps each to a problem type."""

from __future__ import annotations


class RecordError(Exception):
    """Base of the record stores' errors."""


class JobNotFound(RecordError, LookupError):
    """The job does not exist (never created, or expired)."""


class ModelNotFound(RecordError, LookupError):
    """The model does not exist."""


class IdempotencyConflict(RecordError):
    """The Idempotency-Key was already used with a different request."""


class JobNotCancellable(RecordError):
    """The job has already finished (succeeded, failed or cancelled)."""


class QueueFull(RecordError):
    """Too many jobs are queued; try again later."""
