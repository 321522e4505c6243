"""The conversation of one call as text, to carry into a new Realtime session. No I/O.

A Realtime session cannot be resumed: when the bridge swaps to a new one (a planned rollover before the
service's session cap, or a reconnect after a drop), the new session knows nothing of the call. It is
given the profile's instructions again (its ``session.update``) and the conversation so far as
conversation items, built here:

* the caller's turns, from input transcription (``conversation.item.input_audio_transcription.completed``;
  the bridge turns transcription on for every call for this reason);
* the model's turns, from its output transcripts, **cut at what the caller heard**: a turn interrupted
  at 40% of its audio is carried as its first 40% of words, one never heard is not carried;
* what the bridge told the model itself (the pre-rendered greeting, keypresses).

Turns are kept in the order the conversation had them (a caller's transcript often arrives after the
answer to it: its place is reserved when the caller's turn ends). Each new session gets every turn with
text, newest last, within :data:`CARRY_CHARS`, then a note not to greet again. A turn carried as a text
item has an id the bridge chose (:meth:`Conversation.carried_id`), so that a barge-in on audio of an
older session can rewrite it in the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge import realtime as rt

CARRY_CHARS = 24_000
"""At most this much text is carried (about 6,000 tokens): the newest turns, the oldest left out first."""

CONTINUE_NOTE = (
    "[The call continues on a new connection to you; the conversation so far is above. Do not greet the "
    "caller or introduce yourself again; carry on naturally from where the conversation left off.]"
)
OMITTED_NOTE = "[The earlier part of this call is not shown.]"
RESUME_NOTE = (
    "[Your previous answer was cut off by a brief connection problem; the caller heard it up to where it "
    "stops above. Finish it briefly, without repeating what was heard and without greeting.]"
)
UNHEARD_NOTE = (
    "[The connection to you dropped just as the caller finished speaking, and their words were lost. "
    "Apologise briefly and ask them to repeat.]"
)


@dataclass(slots=True)
class Turn:
    """One turn of the conversation."""

    role: str
    """``user``, ``assistant`` or ``system`` (the roles of Realtime message items)."""
    key: str
    """The item id in the session it happened in (or the bridge's own key)."""
    said: str | None = None
    """All of it, as transcribed; ``None`` until then."""
    share: float = 1.0
    """How much of it the caller heard (an answer cut by a barge-in or a drop)."""
    final: bool = False
    """Its text is complete (an answer being spoken is not carried until it is)."""
    carried: dict[int, str] = field(default_factory=dict)
    """Session number → the id of its item there: its own (the key) in the session it happened in, the
    text item that carries it in a later one, ``""`` where it was left out for the budget."""

    @property
    def text(self) -> str:
        """What of it to carry: the share heard (empty when nothing was, or before the transcript)."""
        return cut_text(self.said or "", self.share)


class Conversation:
    """The turns of a call, in order, and the items that carry them into a new session."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self._by_key: dict[str, Turn] = {}

    def _turn(self, role: str, key: str, session: int | None) -> Turn:
        turn = self._by_key.get(key)
        if turn is None:
            turn = self._by_key[key] = Turn(role, key)
            self.turns.append(turn)
            if session is not None:
                turn.carried[session] = key  # happened in that session: its own item there
        return turn

    def reserve(self, role: str, key: str, session: int | None = None) -> None:
        """Keep the place of a turn whose text comes later (a caller's item, an answer being spoken);
        ``session``: the Realtime session it happens in (it is not carried there)."""
        self._turn(role, key, session)

    def said(self, role: str, key: str, text: str, session: int | None = None) -> None:
        """The whole text of a turn (in its reserved place, or at the end; ``session`` as for
        :meth:`reserve`)."""
        turn = self._turn(role, key, session)
        turn.said, turn.final = text.strip(), True

    def saying(self, key: str, delta: str, session: int | None = None) -> None:
        """More of an answer's transcript, as it is spoken (kept in case the answer is cut off)."""
        turn = self._turn("assistant", key, session)
        if not turn.final:
            turn.said = (turn.said or "") + delta

    def cut_off(self, key: str, heard_ms: float, generated_ms: float) -> None:
        """An answer's session was lost while it was spoken: what the caller heard of it is all there is."""
        self.heard(key, heard_ms, generated_ms)
        turn = self._by_key.get(key)
        if turn is not None:
            turn.final = True

    def heard(self, key: str, heard_ms: float, generated_ms: float) -> None:
        """The caller heard only ``heard_ms`` of the ``generated_ms`` of an answer: keep that share of its
        words (nothing when nothing was heard), also when its transcript arrives later."""
        turn = self._by_key.get(key)
        if turn is not None:
            turn.share = 0.0 if generated_ms <= 0 else max(0.0, min(1.0, heard_ms / generated_ms))

    def caller_known(self) -> bool:
        """Whether the caller's last turn was transcribed (a new session can answer it from the text)."""
        last = next(
            (t for t in reversed(self.turns) if t.role == "user" and not t.key.startswith("dtmf:")), None
        )
        return last is not None and last.final and bool(last.said)

    def text_of(self, key: str) -> str:
        """What of turn ``key`` is carried (empty for an unknown turn)."""
        turn = self._by_key.get(key)
        return "" if turn is None else turn.text

    def carried_id(self, key: str, session: int) -> str | None:
        """The id of the item carrying turn ``key`` in ``session``, if it was carried there."""
        turn = self._by_key.get(key)
        return (turn.carried.get(session) or None) if turn is not None else None

    def recarry(self, key: str, session: int) -> str:
        """A new id for turn ``key``'s item in ``session`` (its old one is being replaced)."""
        turn = self._by_key[key]
        item_id = f"{turn.carried.get(session, 'carry')}r"[-32:]
        turn.carried[session] = item_id
        return item_id

    def carry(self, session: int, *, first: bool) -> list[rt.ClientCommand]:
        """The items that bring ``session`` up to date: every turn with text not yet carried there, newest
        last, within :data:`CARRY_CHARS`; ``first``: with the note not to greet again, at the end."""
        todo = [
            (n, t) for n, t in enumerate(self.turns, 1) if t.final and session not in t.carried and t.text
        ]
        total, start = 0, len(todo)
        while start > 0 and total + len(todo[start - 1][1].text) <= CARRY_CHARS:
            start -= 1
            total += len(todo[start][1].text)
        out: list[rt.ClientCommand] = []
        for _, turn in todo[:start]:
            turn.carried[session] = ""  # left out for the budget: never carried later, out of order
        if start > 0 and first:
            out.append(rt.AddTextItem("system", OMITTED_NOTE))
        for n, turn in todo[start:]:
            item_id = f"carry_{session}_{n}"
            turn.carried[session] = item_id
            out.append(rt.AddTextItem(turn.role, turn.text, item_id))
        if first:
            out.append(rt.AddTextItem("system", CONTINUE_NOTE))
        return out


def cut_text(text: str, share: float) -> str:
    """The first ``share`` of ``text``'s words, with an ellipsis when words were left out."""
    words = text.split()
    keep = int(len(words) * share + 1e-9)
    if keep >= len(words):
        return text.strip()
    return " ".join(words[:keep]) + "…" if keep else ""
