"""Persistence of prompt profiles, their versions, pre-rendered greetings and call records.

The :class:`Store` protocol is what the rest of the bridge uses; :class:`~bridge.store.sqlite.SQLiteStore`
(in ``bridge.store.sqlite``) is the default backend (one file, created on first start, schema migrations).
:class:`~bridge.store.postgres.PostgresStore` (in ``bridge.store.postgres``) keeps it in PostgreSQL, for
instances that share one database.

Versions are immutable: every save writes a new version with its author, time and comment; a rollback
writes a new version whose content is an old one's. Saves carry the version the editor started from
(optimistic concurrency): if someone saved in between, :class:`StaleVersion` is raised and nothing is
lost. A call uses the version that was latest when it was answered, to its end.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from bridge.errors import ConfigError, StoreError
from bridge.prompts import Profile


class NotFound(StoreError):
    """No such profile, version or call."""


class StaleVersion(StoreError):
    """Someone saved a newer version since the editor loaded theirs; reload and re-apply."""

    def __init__(self, profile_id: int, expected: int, current: int) -> None:
        super().__init__(
            f"profile {profile_id} was changed by someone else (now version {current}, you edited {expected})"
        )
        self.profile_id, self.expected, self.current = profile_id, expected, current


class Conflict(StoreError):
    """The save would break a rule across profiles (a name or number already in use)."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.problems.items()))


class UnreadableProfile(StoreError):
    """A stored version does not validate any more (written by a newer bridge, or edited by hand)."""

    def __init__(self, profile_id: int, version: int, problems: Mapping[str, str]) -> None:
        self.profile_id, self.version, self.problems = profile_id, version, dict(problems)
        listing = "; ".join(f"{name}: {why}" for name, why in self.problems.items())
        super().__init__(
            f"profile {profile_id} version {version} cannot be read (written by a newer bridge?): {listing}"
        )


@dataclass(frozen=True, slots=True)
class ProfileVersion:
    """One immutable version of a profile."""

    profile_id: int
    version: int
    profile: Profile
    author: str
    created_at: datetime
    comment: str = ""
    rolled_back_from: int | None = None
    """For a rollback: the version whose content this one copies."""
    has_greeting_audio: bool = False


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    """A profile in the list: its latest version and whether it is the default."""

    profile_id: int
    latest: ProfileVersion
    is_default: bool


@dataclass(frozen=True, slots=True)
class ModelSession:
    """One Realtime session of a call.

    A call may use several: the bridge swaps to a new session before the service's time cap (a
    rollover) and opens a new one when the connection drops (a reconnect).
    """

    number: int
    """1, 2, 3… in the order the bridge opened them."""
    started_at: datetime
    """When it was opened (aware UTC)."""
    ended_at: datetime | None = None
    began: str = "first"
    """How it came: ``"first"``, ``"rollover"`` (a planned swap) or ``"reconnect"`` (after a drop)."""
    ended: str = ""
    """Why it ended, a sentence: e.g. ``"rolled over to session 2"``, ``"dropped (1006)"``,
    ``"the call ended"``."""
    session_id: str = ""
    """The service's session id (from ``session.created``), when known."""

    @property
    def duration_s(self) -> float | None:
        """Seconds from opening to end; ``None`` when the end is not known."""
        if self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()


class CallStatus(StrEnum):
    """Where a call record stands."""

    IN_PROGRESS = "in progress"
    """Written when the call's stream starts; completed when it ends."""
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    """The bridge stopped (a crash, ``kill -9``) before the call ended: found at the next start-up, or
    by another instance once this one stopped beating (:meth:`Store.interrupt_calls`)."""


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What happened on one call: written when its stream starts (in progress), completed when it ends."""

    call_sid: str
    started_at: datetime
    ended_at: datetime
    from_number: str = ""
    to_number: str = ""
    profile_id: int | None = None
    profile_version: int | None = None
    end_reason: str = ""
    transcript: tuple[tuple[str, str], ...] = ()
    """``(role, text)`` pairs, role ``caller`` or ``assistant``, in order."""
    barge_ins: int = 0
    truncations: tuple[tuple[str, int], ...] = ()
    latency_ms: Mapping[str, float] = field(default_factory=dict)
    """E.g. ``{"turn_p50": …, "turn_max": …, "inbound_mean": …, "outbound_mean": …}``."""
    upstream_errors: int = 0
    recording_path: str | None = None
    test_call: bool = False
    """Placed from the admin page, not by a real caller."""
    sessions: tuple[ModelSession, ...] = ()
    """The Realtime sessions the call used, in order (empty in records from before they were kept)."""
    status: CallStatus = CallStatus.COMPLETED
    instance: str = ""
    """The bridge instance that served the call (``BRIDGE_INSTANCE_ID``)."""

    @property
    def duration_s(self) -> float:
        """Seconds from answer to hang-up."""
        return (self.ended_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class Answer:
    """A voice webhook answered: the stream token it handed out, and whether a stream has claimed it."""

    call_sid: str
    answered_at: datetime
    token_nonce: str
    token_expiry: float
    streamed: bool


@dataclass(frozen=True, slots=True)
class AdminSession:
    """A signed-in member of staff, kept server-side so that sign-out holds everywhere and for good."""

    sid: str
    user: str
    expires_at: datetime
    """Aware UTC."""


class Store(Protocol):
    """What the bridge needs from persistence."""

    async def list_profiles(self) -> list[ProfileSummary]:
        """Every profile's latest version, by name."""
        ...

    async def get(self, profile_id: int, version: int | None = None) -> ProfileVersion:
        """One version (default: the latest); raises :class:`NotFound`."""
        ...

    async def history(self, profile_id: int) -> list[ProfileVersion]:
        """Every version of a profile, newest first; raises :class:`NotFound`."""
        ...

    async def create(self, profile: Profile, *, author: str, comment: str = "") -> ProfileVersion:
        """A new profile at version 1; raises :class:`Conflict` (name or a number in use)."""
        ...

    async def save(
        self, profile_id: int, profile: Profile, *, expected_version: int, author: str, comment: str = ""
    ) -> ProfileVersion:
        """A new version; raises :class:`StaleVersion`, :class:`Conflict`, :class:`NotFound`."""
        ...

    async def rollback(
        self, profile_id: int, to_version: int, *, expected_version: int, author: str, comment: str = ""
    ) -> ProfileVersion:
        """A new version with the content of ``to_version``; raises like :meth:`save`."""
        ...

    async def set_default(self, profile_id: int) -> None:
        """Make this the profile for numbers no profile claims; raises :class:`NotFound`."""
        ...

    async def default_profile(self) -> ProfileVersion | None:
        """The default profile's latest version (``None`` in an empty store)."""
        ...

    async def for_number(self, number: str) -> ProfileVersion | None:
        """The latest version of the profile routing ``number`` (E.164), else the default's."""
        ...

    async def set_greeting_audio(self, profile_id: int, version: int, audio: bytes) -> None:
        """Store a version's pre-rendered greeting (raw μ-law, 8 kHz)."""
        ...

    async def greeting_audio(self, profile_id: int, version: int) -> bytes | None:
        """A version's pre-rendered greeting, or ``None``."""
        ...

    async def start_call(self, record: CallRecord) -> None:
        """Write a call's record as it starts (status in progress); raises :class:`Conflict` when the
        CallSid already has one (no call ever overwrites another's record)."""
        ...

    async def add_call(self, record: CallRecord) -> None:
        """Write a call's final record: in place of the one :meth:`start_call` wrote for the same call
        (same CallSid and start; in progress, or interrupted by another instance while this one's beat
        was late, same instance), else new; raises :class:`Conflict` when another call's record holds
        the CallSid."""
        ...

    async def interrupt_calls(self, *, stale_before: datetime, restarted: str | None = None) -> int:
        """Mark interrupted the records left in progress by instances whose last :meth:`heartbeat` is
        older than ``stale_before`` (or that never beat), and by ``restarted`` (an instance starting up:
        its calls died with its last run); how many."""
        ...

    async def heartbeat(self, instance: str) -> None:
        """Note that ``instance`` is alive now (see :meth:`interrupt_calls`)."""
        ...

    async def answer_call(self, call_sid: str, token_nonce: str, token_expiry: float) -> Answer | None:
        """Record the voice webhook's answer to ``call_sid``; ``None`` when this is the first, else the
        earlier :class:`Answer` (a retried or replayed webhook), unchanged."""
        ...

    async def claim_stream(self, call_sid: str) -> bool:
        """Whether this is the first media stream of ``call_sid`` ever (then it is recorded as claimed)."""
        ...

    async def add_admin_session(self, sid: str, user: str, expires_at: datetime) -> None:
        """Keep a new admin session (expired ones are forgotten meanwhile)."""
        ...

    async def admin_session(self, sid: str) -> AdminSession | None:
        """A live admin session; ``None`` when unknown, expired or signed out."""
        ...

    async def revoke_admin_session(self, sid: str) -> None:
        """Sign a session out, on every instance and for good."""
        ...

    async def calls(
        self, *, limit: int = 50, before: datetime | None = None, profile_id: int | None = None
    ) -> list[CallRecord]:
        """Call records, newest first."""
        ...

    async def call(self, call_sid: str) -> CallRecord:
        """One call record; raises :class:`NotFound`."""
        ...

    async def close(self) -> None:
        """Release the database."""
        ...


@dataclass(frozen=True, slots=True)
class ProfileChange:
    """One profile to write with :meth:`SQLiteStore.save_many`: a new profile, or a new version of one."""

    profile: Profile
    profile_id: int | None = None
    """``None``: create the profile."""
    expected_version: int = 0
    """For an existing profile: the version the change was made from."""


def postgres_url(database: str) -> str | None:
    """The PostgreSQL URL a ``BRIDGE_DATABASE`` value is (``postgresql://…`` or ``postgres://…``), else
    ``None``; raises ConfigError for a SQLAlchemy-style ``postgresql+driver://``."""
    value = database.strip()
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if scheme is None:
        return None
    name = scheme.group(1).lower()
    if name.split("+")[0] not in ("postgresql", "postgres"):
        return None
    if name not in ("postgresql", "postgres"):
        raise ConfigError(
            "BRIDGE_DATABASE: write a PostgreSQL URL as postgresql://user:password@host:port/database "
            "(without a +driver)"
        )
    return value


def redacted(database: str) -> str:
    """A ``BRIDGE_DATABASE`` value fit for logs and messages: a URL's password replaced by ``***``."""
    value = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:?#]*):[^/@?#]*@", r"\1:***@", database.strip())
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", value, flags=re.IGNORECASE)


def sqlite_path(database: str) -> str:
    """The SQLite file a ``BRIDGE_DATABASE`` value names: a path, or ``sqlite:///relative/path`` and
    ``sqlite:////absolute/path`` (SQLAlchemy's spelling); raises ConfigError for anything else
    (a PostgreSQL URL included: see :func:`postgres_url`)."""
    value = database.strip()
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if scheme:
        name = scheme.group(1).lower()
        if name.split("+")[0] in ("postgresql", "postgres"):
            raise ConfigError(
                "BRIDGE_DATABASE: PostgreSQL is not supported yet here: this needs a SQLite file path"
            )
        rest = value[scheme.end() :]
        if name != "sqlite" or not rest.startswith("/") or rest == "/":
            raise ConfigError(
                f"BRIDGE_DATABASE: {redacted(value)!r} is not supported: use a SQLite file path, "
                "sqlite:///path or postgresql://…"
            )
        value = rest[1:]
    if not value:
        raise ConfigError("BRIDGE_DATABASE is empty: use a SQLite file path")
    return value
