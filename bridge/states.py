"""The state tables of a call, and the values that say how it ends and when it times out. No I/O.

Everything that can move a call between states is listed here as a table (h11's rule: one file, tables
wherever possible); :class:`~bridge.session.CallSession` applies them, and a move a table does not list
raises :class:`~bridge.errors.IllegalTransition` and changes nothing.

* :data:`TRANSITIONS`: the call's life. It is *live* once Twilio's ``start`` has arrived and the model has
  confirmed the session with ``session.updated``, in either order.
* :data:`GOODBYE_TRANSITIONS`: a goodbye (shutdown, time limit) is asked for, spoken by the next
  response, and the call ends once the caller has heard all of it.
* :data:`LINK_TRANSITIONS`: the Realtime leg of a live call. A session is swapped for a new one before the
  service's cap (a planned rollover: the next one is opened and configured while the old one serves, then
  swapped at a turn boundary) or after the serving one was lost (a reconnect, the caller's audio held).
* :class:`EndReason`: why a call ended, set once and read by the driver, the registry, metrics and the
  call record, instead of strings compared across modules.
* :class:`Timeouts`: the timeouts :meth:`~bridge.session.CallSession.tick` applies.
* :class:`CallMachine`: the tables applied, the one place a call's states move (a base of the session).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from bridge.errors import IllegalTransition


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
    SESSION_LOST = "the session saying it was lost: the next one is asked"


G, GT = Goodbye, GoodbyeTrigger
GOODBYE_TRANSITIONS: dict[tuple[Goodbye, GoodbyeTrigger], Goodbye] = {
    (G.NONE, GT.ASK): G.ASKED,
    (G.ASKED, GT.RESPONSE_CREATED): G.SPEAKING,
    (G.SPEAKING, GT.RESPONSE_DONE): G.SPOKEN,
    (G.ASKED, GT.SESSION_LOST): G.ASKED,
    (G.SPEAKING, GT.SESSION_LOST): G.ASKED,
}


class Link(Enum):
    """Where a live call's Realtime leg is."""

    UP = "a session serves the call"
    PREPARING = "a rollover is due: the next session is being opened and configured"
    READY = "the next session is configured: swapped at the next turn boundary"
    DOWN = "the serving session was lost: reconnecting, the caller's audio held"


class LinkTrigger(Enum):
    """What moves a Realtime leg."""

    ROLLOVER_DUE = "the rollover time came"
    NEXT_READY = "session.updated of the next session"
    NEXT_FAILED = "the next session could not be opened or configured"
    SWAPPED = "the swap to the next session"
    LOST = "the serving session ended unexpectedly"


L, LT = Link, LinkTrigger
LINK_TRANSITIONS: dict[tuple[Link, LinkTrigger], Link] = {
    (L.UP, LT.ROLLOVER_DUE): L.PREPARING,
    (L.PREPARING, LT.NEXT_READY): L.READY,
    (L.PREPARING, LT.NEXT_FAILED): L.UP,  # tried again a little later, while the old one still serves
    (L.READY, LT.SWAPPED): L.UP,
    (L.READY, LT.NEXT_FAILED): L.UP,  # closed or broken while waiting for a boundary: tried again later
    (L.UP, LT.LOST): L.DOWN,
    (L.PREPARING, LT.LOST): L.DOWN,  # the session being opened becomes the reconnection
    (L.READY, LT.LOST): L.DOWN,  # ...or, ready already, is swapped to at once
    (L.DOWN, LT.NEXT_READY): L.READY,
    (L.DOWN, LT.NEXT_FAILED): L.DOWN,  # another is opened while the reconnection budget lasts
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
    MODEL_LOST = "the model connection was lost and could not be restored"
    MODEL_FATAL = "the model refused to go on (a fatal error)"
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
        EndReason.MODEL_LOST,
        EndReason.MODEL_FATAL,
        # Before the call was live, too: a caller is better served by the fallback than by a hang-up.
        EndReason.MODEL_NOT_READY,
        EndReason.MODEL_REFUSED_SESSION,
        EndReason.AUDIO_FORMAT_MISMATCH,
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
    rollover_margin: float = 120.0
    """A session is swapped this long before its ``expires_at`` (at most half its lifetime before)."""
    max_session: float = 1500.0
    """The lifetime taken for a session whose ``session.created`` has no ``expires_at``."""
    model_idle: float = 10.0
    """While the model owes an event (a response running, a ``session.updated``), this long without one
    is a dead connection."""
    reconnect: float = 10.0
    """How long a lost session may take to be replaced before the call ends with the fallback message."""
    hold_after: float = 1.5
    """After this long without the model (and nothing left playing), the caller hears "one moment"."""

    def detail(self, reason: EndReason) -> str:
        """What the call log adds to a timeout's reason (empty for others)."""
        seconds = {
            EndReason.NO_STREAM: f"within {self.prewarm:.0f} s",
            EndReason.MODEL_NOT_READY: f"within {self.model_ready:.0f} s",
            EndReason.TWILIO_IDLE: f"nothing for {self.twilio_idle:.0f} s",
        }
        return seconds.get(reason, "")


State = TypeVar("State", bound=Enum)
Move = TypeVar("Move", bound=Enum)


def _next(
    table: Mapping[tuple[State, Move], State], state: State, move: Move, call_id: str, what: str
) -> State:
    nxt = table.get((state, move))
    if nxt is None:
        raise IllegalTransition(f"call {call_id}: no {what}transition from {state.name} on {move.name}")
    return nxt


class CallMachine:
    """The tables above applied to one call: the only code that moves its states (the base of
    :class:`~bridge.session.CallSession`, which sets the attributes up). A move a table does not list
    raises :class:`~bridge.errors.IllegalTransition` and changes nothing."""

    call_id: str
    state: CallState
    goodbye: Goodbye
    link: Link
    end_reason: EndReason | None
    end_detail: str
    """What more there is to say about :attr:`end_reason` (an error's text), or empty."""

    def _move(self, trigger: Trigger) -> CallState:
        self.state = _next(TRANSITIONS, self.state, trigger, self.call_id, "")
        return self.state

    def _goodbye_move(self, trigger: GoodbyeTrigger) -> None:
        self.goodbye = _next(GOODBYE_TRANSITIONS, self.goodbye, trigger, self.call_id, "goodbye ")

    def _link_move(self, trigger: LinkTrigger) -> Link:
        self.link = _next(LINK_TRANSITIONS, self.link, trigger, self.call_id, "Realtime session ")
        return self.link

    @property
    def live(self) -> bool:
        """True between the moment both sides are ready and the end of the call."""
        return self.state is CallState.LIVE

    @property
    def ended(self) -> bool:
        """True once the call has ended."""
        return self.state is CallState.ENDED

    def end(self, reason: EndReason, detail: str = "") -> None:
        """End the call (either side closed, a timeout, shutdown); the first reason stays."""
        if self.state is CallState.ENDED:
            return
        self._move(Trigger.END)
        self.end_reason = reason
        self.end_detail = detail

    def describe_end(self) -> str:
        """Why the call ended, as the call log shows it: the reason, and its detail when there is one."""
        reason, detail = self.end_reason, self.end_detail
        if reason is None:
            return ""
        return f"{reason.value}: {detail}" if detail else reason.value
