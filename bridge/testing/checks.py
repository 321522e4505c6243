"""Twilio's checks on what a bridge answers: the voice webhook's TwiML and the stream's messages (no I/O).

The webhook must answer ``<Response><Connect><Stream url="wss://…">`` with no query string in the URL
(``<Parameter>``s instead; docs/protocols.md §1.1): :func:`read_stream_twiml`. On the stream, Twilio
accepts exactly three outbound messages, each with exactly these fields (docs/protocols.md §1.3):
``media`` (``{"payload": base64 μ-law}``), ``mark`` (``{"name": string}``) and ``clear``, every one
carrying the stream's ``streamSid``. Anything else it refuses with error 31951 (31950 for a binary
frame). :func:`check_outbound` returns what a text message means, or why Twilio would refuse it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Final
from urllib.parse import urljoin, urlsplit

import orjson
import pybase64

from bridge.config import VOICE_PATH

__all__ = [
    "BINARY_FRAME",
    "Checked",
    "OutboundClear",
    "OutboundMark",
    "OutboundMedia",
    "TwilioCallerError",
    "check_outbound",
    "read_stream_twiml",
]

BINARY_FRAME: Final = "a binary frame (Twilio error 31950)"
"""The violation for a binary frame: Twilio's stream takes text only."""

_OUTBOUND_FIELDS: Final[dict[str, frozenset[str]]] = {
    "media": frozenset({"event", "streamSid", "media"}),
    "mark": frozenset({"event", "streamSid", "mark"}),
    "clear": frozenset({"event", "streamSid"}),
}


class TwilioCallerError(AssertionError):
    """The bridge did not behave as Twilio needs (a bad webhook answer, a closed stream, ...)."""


def read_stream_twiml(body: str, public_url: str) -> tuple[str, dict[str, str]]:
    """The stream URL and ``<Parameter>``s of the webhook's TwiML answer, checked as Twilio would.

    ``public_url`` is the bridge's public base URL: a relative stream URL is resolved against the webhook's
    URL, and ``ws://`` is only accepted from an ``http://`` bridge. Raises :class:`TwilioCallerError`.
    """
    try:
        root = ET.fromstring(body)  # noqa: S314 -- the bridge under test is trusted
    except ET.ParseError as exc:
        raise TwilioCallerError(f"the webhook's answer is not XML: {body[:300]!r}") from exc
    stream = root.find("./Connect/Stream")
    if root.tag != "Response" or stream is None:
        raise TwilioCallerError(f"the TwiML has no <Response><Connect><Stream>: {body[:300]!r}")
    url = stream.get("url")
    if not url:
        raise TwilioCallerError("<Stream> has no url")
    url = urljoin(public_url + VOICE_PATH, url)  # Twilio allows a relative url
    parts = urlsplit(url)
    if parts.scheme != "wss" and not (parts.scheme == "ws" and public_url.startswith("http://")):
        raise TwilioCallerError(f"<Stream url={url!r}> is not wss:// (ws:// only for an http:// bridge)")
    if parts.query:
        # Twilio error 31920: a query string can fail the stream handshake.
        raise TwilioCallerError(f"<Stream url={url!r}> has a query string; use <Parameter>s")
    return url, {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


@dataclass(frozen=True, slots=True)
class OutboundMedia:
    """Audio to play: the decoded payload."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboundMark:
    """A mark to echo once playback reaches it."""

    name: str


@dataclass(frozen=True, slots=True)
class OutboundClear:
    """Drop the buffered audio, echo the pending marks."""


@dataclass(frozen=True, slots=True)
class Checked:
    """One outbound text message as Twilio reads it."""

    message: OutboundMedia | OutboundMark | OutboundClear | None
    """What to do with it; ``None``: Twilio refuses it."""
    violations: tuple[str, ...] = ()
    """Why Twilio refuses it, or what is wrong though it still plays (a WAV header in a payload)."""


def _refused(reason: str) -> Checked:
    return Checked(None, (reason,))


def check_outbound(data: str, stream_sid: str) -> Checked:
    """Check one text message the bridge sent on stream ``stream_sid``, as Twilio would."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _refused(f"not JSON (Twilio error 31951): {data[:80]!r}")
    if type(message) is not dict:
        return _refused(f"not a JSON object (Twilio error 31951): {data[:80]!r}")
    event = message.get("event")
    allowed = _OUTBOUND_FIELDS.get(event) if type(event) is str else None
    if allowed is None:
        return _refused(f"event {event!r} is not media, mark or clear (Twilio error 31951)")
    keys = message.keys()
    if keys != allowed:
        extra = sorted(keys - allowed)
        missing = sorted(allowed - keys)
        return _refused(f"{event}: unknown fields {extra}, missing fields {missing} (Twilio error 31951)")
    if message["streamSid"] != stream_sid:
        return _refused(f"{event}: streamSid {message['streamSid']!r} is not this stream's (31951)")
    if event == "media":
        return _check_media(message["media"])
    if event == "mark":
        mark = message["mark"]
        if type(mark) is not dict or mark.keys() != {"name"} or type(mark["name"]) is not str:
            return _refused(f'mark: "mark" must be {{"name": string}}, not {mark!r} (31951)')
        return Checked(OutboundMark(mark["name"]))
    return Checked(OutboundClear())


def _check_media(media: object) -> Checked:
    if type(media) is not dict or media.keys() != {"payload"} or type(media["payload"]) is not str:
        return _refused(f'media: "media" must be {{"payload": string}}, not {str(media)[:80]} (31951)')
    try:
        payload = pybase64.b64decode(media["payload"], validate=True)
    except ValueError:
        return _refused("media: payload is not valid base64 (31951)")
    if payload.startswith(b"RIFF"):
        return Checked(OutboundMedia(payload), ("media: payload has a WAV header; it would play as noise",))
    return Checked(OutboundMedia(payload))
