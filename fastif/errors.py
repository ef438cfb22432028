"""Errors the engine raises for bad input or a failed computation.

Each carries a stable ``code`` so the workers can put it on a job record and the CLI
can print it as one line; ``str(err)`` is the human message. A subclass names its code in
its class statement (``class DataError(FastIFError, code="invalid-data")``), so the code
stands next to the name it belongs to; one that names none keeps its parent's.
"""


class FastIFError(Exception):
    """The root of the engine's errors; the code of one that is none of the kinds below."""

    code = "engine-error"

    def __init_subclass__(cls, code: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


class DataError(FastIFError, code="invalid-data"):
    """A training or evaluation file that cannot be read as the caller described it."""


class ModelLoadError(FastIFError, code="invalid-model"):
    """A model directory that is not a loadable Hugging Face classifier (safetensors weights, a linear head)."""


class ParamSelectionError(FastIFError, code="invalid-params"):
    """Influence parameters that cannot be chosen: no list of transformer blocks, or a prefix that names none."""


class LabelError(FastIFError, code="unknown-label"):
    """A label that is neither a name nor an index the model knows."""


class LissaDivergedError(FastIFError, code="lissa-diverged"):
    """LiSSA's recursion blew up: ``scale`` is below the Hessian's largest eigenvalue."""


class CancelledError(FastIFError, code="cancelled"):
    """The caller's cancellation check asked the computation to stop."""
