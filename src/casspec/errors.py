"""Errors casspec raises on purpose.

`CasspecError` and its subclasses are requests casspec refuses (bad input): ValueError subclasses with
one-line messages; the server answers them with a 400 and the CLI exits 2. Anything else (a plain
ValueError from a library, an IndexError, an out-of-memory...) is a failure of casspec, not of the
request: the server answers it with a 500 and logs the traceback.

`GenerationError` is a failure of one generation that is nobody's input error (the model produced NaN
logits for it, ...): the server answers it with a 500 that carries its message, and the other requests
of a batch go on.
"""


class CasspecError(ValueError):
    """Base class: a request casspec refuses, with a message naming the problem."""


class ModelNotFoundError(CasspecError):
    """The model name or path does not resolve to loadable weights."""


class InvalidRequestError(CasspecError):
    """A generation request with bad parameters (empty prompt, NaN temperature, unknown method...)."""


class ContextOverflowError(CasspecError):
    """The prompt (plus the requested tokens) does not fit in the model's context."""


class GenerationError(RuntimeError):
    """One generation failed through no fault of its request; its message is safe to show to the client."""


class NonFiniteLogitsError(GenerationError):
    """The target model's logits for a generation hold NaN or inf."""


def first_line(exc: BaseException) -> str:
    """First non-empty line of an exception's message (or its type name): a library's error in one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
