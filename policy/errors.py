"""Policy refusals. The gateway maps these to HTTP status codes (gateway.errors)."""


class PolicyError(Exception):
    """Base class: a request the policy refuses. The message is shown to the caller."""


class KeyRejected(PolicyError):
    """The API key is missing, unknown, revoked or expired (HTTP 401)."""


class LimitExceeded(PolicyError):
    """A request exceeds a configured limit such as the maximum LoRA rank (HTTP 400)."""


class KeyNotFound(PolicyError):
    """No API key with that id (HTTP 404)."""
