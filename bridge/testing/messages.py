"""What Twilio sends to a bridge, in Twilio's own shape and key order (docs/protocols.md §1.2, §1.4).

The voice webhook's form and headers, the stream upgrade's headers (each signed as Twilio signs), and
the media stream's messages: counters (``sequenceNumber``, ``chunk``,
``timestamp``) are strings, as Twilio sends them; ``sequenceNumber`` is left ``None`` here and filled in
by the sender, which numbers messages in wire order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pybase64
from twilio.request_validator import RequestValidator

Message = dict[str, Any]


def voice_form(
    *, call_sid: str, account_sid: str, from_: str, to: str, extra: Mapping[str, str]
) -> dict[str, str]:
    """The form of ``POST /twilio/voice`` for a ringing inbound call (``extra`` added last)."""
    return {
        "CallSid": call_sid,
        "AccountSid": account_sid,
        "From": from_,
        "To": to,
        "Direction": "inbound",
        "CallStatus": "ringing",
        "ApiVersion": "2010-04-01",
        **extra,
    }


def sign(auth_token: str | None, url: str, params: Mapping[str, str]) -> str | None:
    """Twilio's ``X-Twilio-Signature`` over ``url`` (as the bridge knows it) and ``params``; ``None``
    without an auth token (a bridge in insecure dev mode)."""
    if auth_token is None:
        return None
    signature: str = RequestValidator(auth_token).compute_signature(url, params)
    return signature


def voice_headers(auth_token: str | None, url: str, form: Mapping[str, str]) -> dict[str, str]:
    """The voice webhook's headers, signed over its public ``url`` and ``form``."""
    headers = {"User-Agent": "TwilioProxy/1.1", "Accept": "*/*"}
    signature = sign(auth_token, url, form)
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    return headers


def stream_headers(signature: str | None) -> dict[str, str]:
    """The stream upgrade's headers; Twilio sends the signature header lowercase there."""
    headers = {"User-Agent": "Twilio.TmeWs/1.0"}
    if signature is not None:
        headers["x-twilio-signature"] = signature
    return headers


def socket_url(stream_url: str, base_url: str) -> str:
    """Where to open the stream: the TwiML's URL with its host swapped for where the bridge listens."""
    parts = urlsplit(stream_url)
    base = urlsplit(base_url)
    scheme = "wss" if base.scheme == "https" else "ws"
    return urlunsplit((scheme, base.netloc, parts.path, parts.query, ""))


def connected() -> Message:
    """The first message on a stream (it carries no sequence number)."""
    return {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def start(*, stream_sid: str, account_sid: str, call_sid: str, custom: Mapping[str, str]) -> Message:
    """``start``: the stream's ids, its inbound μ-law 8 kHz format and the TwiML's ``<Parameter>``s."""
    return {
        "event": "start",
        "sequenceNumber": None,
        "start": {
            "accountSid": account_sid,
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": dict(custom),
        },
        "streamSid": stream_sid,
    }


def media(*, stream_sid: str, chunk: int, timestamp: int, payload: bytes) -> Message:
    """One frame of caller audio."""
    return {
        "event": "media",
        "sequenceNumber": None,
        "media": {
            "track": "inbound",
            "chunk": str(chunk),
            "timestamp": str(timestamp),
            "payload": pybase64.b64encode_as_string(payload),
        },
        "streamSid": stream_sid,
    }


def dtmf(*, stream_sid: str, digit: str) -> Message:
    """The caller pressed a key."""
    return {
        "event": "dtmf",
        "streamSid": stream_sid,
        "sequenceNumber": None,
        "dtmf": {"track": "inbound_track", "digit": digit},
    }


def stop(*, stream_sid: str, account_sid: str, call_sid: str) -> Message:
    """The caller hung up."""
    return {
        "event": "stop",
        "sequenceNumber": None,
        "streamSid": stream_sid,
        "stop": {"accountSid": account_sid, "callSid": call_sid},
    }


def mark(*, stream_sid: str, name: str) -> Message:
    """The echo of a mark the bridge sent: playback reached it, or a ``clear`` flushed it."""
    return {"event": "mark", "sequenceNumber": None, "streamSid": stream_sid, "mark": {"name": name}}
