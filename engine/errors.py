"""Errors raised by the engine. The worker turns them into resolved futures.

`UserInputError` (and subclasses) mean the caller sent something unusable: the future
resolves with category "user" and nothing changed. Anything else is a server fault.
"""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class UserInputError(EngineError):
    """The request is invalid; nothing was changed. Message is shown to the caller."""


class NonFiniteError(UserInputError):
    """A loss, gradient or update was NaN/Inf. The run's weights, gradients and
    optimizer state are exactly as they were before the request."""


class UnknownAdapterError(UserInputError):
    """The adapter (training run) is not loaded in this backend."""


class BodyTooLarge(UserInputError):
    """A request body (or what it decompresses to) exceeds the size limit (HTTP 413)."""


class UnknownModelError(UserInputError):
    """The base model name is not in the registry."""
