"""The state tables of a call, and the values that say how it ends and when it times out. No I/O.

Everything that can move a call between states is listed here as a table (h11's rule: one file, tables
wherever possible); :class:`~bridge.session.CallSession` applies them, and a move a table does not list
raises :class:`~bridge.errors.IllegalTransition` and changes nothing.

* :data:`TRANSITIONS`: the call's life. It is *live* once Twilio's ``start`` has arrived and the model has
  confirmed the session with ``session.updated``, in either order.
* :data:`GOODBYE_TRANSITIONS`: a goodbye (shutdown, time limit) is asked for, spoken by the next
  response, and the call ends once the caller has heard all of it.
* :class:`EndReason`: why a call ended, set once and read by the driver, the registry, metrics and the
  call record, instead of strings compared across modules.
* :class:`Timeouts`: the timeouts :meth:`~bridge.session.CallSession.tick` applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class CallState(Enum):
    """Where a call is in its life."""

    WAITING_BOTH = "waiting for stream and model"
    WAITING_STREAM = "model ready, waiting for the stream"
    WAITING_MODEL = "stream started, waiting for the model"
    LIVE = "live"
    ENDED = "ended"


class Trigger(Enum):
    """What moves a call between states."""

    STREAM_STARTED = "Twilio start"
    MODEL_READY = "session.updated"
    END = "end"


S, T = CallState, Trigger
TRANSITIONS: dict[tuple[CallState, Trigger], CallState] = {
    (S.WAITING_BOTH, T.STREAM_STARTED): S.WAITING_MODEL,
    (S.WAITING_BOTH, T.MODEL_READY): S.WAITING_STREAM,
    (S.WAITING_STREAM, T.STREAM_STARTED): S.LIVE,
    (S.WAITING_MODEL, T.MODEL_READY): S.LIVE,
    (S.WAITING_BOTH, T.END): S.ENDED,
    (S.WAITING_STREAM, T.END): S.ENDED,
    (S.WAITING_MODEL, T.END): S.ENDED,
    (S.LIVE, T.END): S.ENDED,
}


class Goodbye(Enum):
    """Where a goodbye (shutdown, time limit) is: asked for, spoken by a response, then heard."""

    NONE = "no goodbye"
    ASKED = "asked the model to say goodbye"
    SPEAKING = "the goodbye response is running"
    SPOKEN = "the goodbye response is done; ends once heard"


class GoodbyeTrigger(Enum):
    """What moves a goodbye along."""

    ASK = "say_goodbye"
    RESPONSE_CREATED = "response.created"
    RESPONSE_DONE = "response.done of the goodbye response"


G, GT = Goodbye, GoodbyeTrigger
GOODBYE_TRANSITIONS: dict[tuple[Goodbye, GoodbyeTrigger], Goodbye] = {
    (G.NONE, GT.ASK): G.ASKED,
    (G.ASKED, GT.RESPONSE_CREATED): G.SPEAKING,
    (G.SPEAKING, GT.RESPONSE_DONE): G.SPOKEN,
}


class EndReason(Enum):
    """Why a call ended: set once by the session (or the driver, for a socket's end), read by the driver,
    the registry (Twilio's ``<Connect action>``), metrics and the call record. The value is the sentence
    the call log shows."""

    CALLER_HUNG_UP = "the caller hung up"
    SAID_GOODBYE = "said goodbye"
    TWILIO_CLOSED = "the Twilio stream closed"
    TWILIO_FAILED = "the Twilio stream failed"
    TWILIO_IDLE = "nothing from Twilio for too long: a dead connection"
    MODEL_UNREACHABLE = "the model could not be reached"
    MODEL_CLOSED = "the model closed the connection"
    MODEL_DROPPED = "the model connection dropped"
    MODEL_WRONG_DIALECT = "the model speaks the other Realtime dialect"
    MODEL_NOT_READY = "the model did not confirm the session in time"
    MODEL_REFUSED_SESSION = "the model refused the session configuration"
    AUDIO_FORMAT_MISMATCH = "the model runs another audio format than the bridge sends"
    TIME_LIMIT = "the call reached its time limit"
    NO_STREAM = "no stream arrived"
    PREWARM_FAILED = "the pre-warmed session failed"
    REPLACED = "replaced by a retried webhook"
    SHUTDOWN = "shutting down"
    INTERNAL_ERROR = "internal error"

    @property
    def completed(self) -> bool:
        """The call ended the way calls should: the caller hung up, or heard the goodbye."""
        return self in _COMPLETED

    @property
    def model_failed(self) -> bool:
        """The model could not be reached or left a live call: Twilio then speaks the fallback message."""
        return self in _MODEL_FAILED


_COMPLETED = frozenset({EndReason.CALLER_HUNG_UP, EndReason.SAID_GOODBYE})
_MODEL_FAILED = frozenset(
    {
        EndReason.MODEL_UNREACHABLE,
        EndReason.MODEL_CLOSED,
        EndReason.MODEL_DROPPED,
        EndReason.MODEL_WRONG_DIALECT,
        # Our own bug ended a live call: the caller is better served by the fallback than by a hang-up.
        EndReason.INTERNAL_ERROR,
    }
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The timeouts of a call, in seconds (the profile's time limit is the profile's)."""

    prewarm: float = 10.0
    """From the webhook (the Realtime socket opened ahead) to the stream's ``start``."""
    model_ready: float = 10.0
    """From the stream's ``start`` to the model's ``session.updated``: a call not live by then is silent."""
    twilio_idle: float = 15.0
    """Twilio streams 50 frames a second for the whole call: this long without a message is a dead socket."""
    time_limit_grace: float = 20.0
    """After the time-limit goodbye is asked for, the call ends at the latest this much later."""
