"""The bridge's error tree.

Two questions decide what to do with a failure, so the tree answers them:

* **remote or local** -- did the peer (Twilio, the Realtime service, a caller's browser) send something
  wrong, or is our own configuration or state at fault?
* **retryable or fatal** -- may the same operation succeed if tried again (a 429 on connect, a dropped
  socket), or will it fail the same way every time (a bad key, a malformed setting)?

Chain with ``raise ... from exc``; never log-and-swallow.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""

    retryable: bool = False


class ConfigError(BridgeError):
    """A setting is present but wrong. The message says what to fix, in one line."""


class LocalError(BridgeError):
    """Our own state or code is at fault (an illegal transition, a misuse of an API)."""


class IllegalTransition(LocalError):
    """A state machine was asked to move along an edge its table does not have; nothing changed."""


class RemoteError(BridgeError):
    """A peer sent something we cannot use, or failed."""


class MalformedMessage(RemoteError):
    """A peer's message could not be parsed. The call goes on; the message is logged and skipped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthenticationFailed(RemoteError):
    """A signature, token or key did not check out."""


class UpstreamError(RemoteError):
    """The Realtime service could not be reached or failed."""


class UpstreamUnavailable(UpstreamError):
    """Connecting failed in a way that may succeed later (429, 5xx, a refused or dropped socket)."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds the service asked us to wait (its ``Retry-After``), when it said."""


class UpstreamRejected(UpstreamError):
    """Connecting failed in a way that will fail again (401, 403, 404: fix the settings)."""


class DialectMismatch(UpstreamError):
    """The Realtime service speaks the other dialect (GA events on a preview URL, or the reverse): the
    settings are wrong, and every message will fail the same way. Fatal for the call."""


class StoreError(BridgeError):
    """A store operation failed (the database could not be read or written, or refused the change)."""
