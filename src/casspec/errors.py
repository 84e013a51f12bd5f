"""Errors raised for bad input. All are ValueError subclasses with one-line messages."""


class CasspecError(ValueError):
    """Base class: a request casspec refuses, with a message naming the problem."""


class ModelNotFoundError(CasspecError):
    """The model name or path does not resolve to loadable weights."""


class InvalidRequestError(CasspecError):
    """A generation request with bad parameters (empty prompt, NaN temperature, unknown method...)."""


class ContextOverflowError(CasspecError):
    """The prompt (plus the requested tokens) does not fit in the model's context."""
