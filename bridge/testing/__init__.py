"""Public helpers for testing with the bridge: :class:`TwilioCaller`, a Twilio caller double that speaks
Twilio's side of a call over real sockets, and :func:`serve_bridge`, a bridge on a free loopback port."""

from __future__ import annotations

from bridge.testing.caller import (
    DEFAULT,
    DEFAULT_ACCOUNT_SID,
    FRAME_BYTES,
    ULAW_SILENCE,
    PlayedMark,
    TwilioCaller,
    TwilioCallerError,
)
from bridge.testing.playback import Playback
from bridge.testing.server import ServedBridge, serve_bridge

__all__ = [
    "DEFAULT",
    "DEFAULT_ACCOUNT_SID",
    "FRAME_BYTES",
    "ULAW_SILENCE",
    "Playback",
    "PlayedMark",
    "ServedBridge",
    "TwilioCaller",
    "TwilioCallerError",
    "serve_bridge",
]
