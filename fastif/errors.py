"""Errors the engine raises for bad input or a failed computation.

Each carries a stable ``code`` so the workers can put it on a job record and the CLI
can print it as one line; ``str(err)`` is the human message.
"""


class FastIFError(Exception):
    code = "engine-error"


class DataError(FastIFError):
    """A training or evaluation file that cannot be read as the caller described it."""

    code = "invalid-data"


class ModelLoadError(FastIFError):
    code = "invalid-model"


class ParamSelectionError(FastIFError):
    code = "invalid-params"


class LabelError(FastIFError):
    code = "unknown-label"


class LissaDivergedError(FastIFError):
    """LiSSA's recursion blew up: ``scale`` is below the Hessian's largest eigenvalue."""

    code = "lissa-diverged"


class CancelledError(FastIFError):
    """The caller's cancellation check asked the computation to stop."""

    code = "cancelled"
