"""The local Realtime model: a loopback server that speaks both Realtime dialects (GA and preview).

It is what ``bridge serve`` dials when no Azure deployment is configured, and what the tests, replays and
benchmarks talk to. It implements the wire protocol on its own (docs/protocols.md §2), never through
``bridge.realtime``, so that a mistake in our adapter cannot be mirrored here and go unnoticed. It
validates every client event as strictly as the service does and answers with audio (an echo of the
caller's words, or a beep), voice-activity events, transcripts and the error bodies of the real service.

The modules, from the socket inward:

* :mod:`.server`: :class:`LocalModel`, the listener: the handshake, the lifecycle, the shared settings;
* :mod:`.connection`: :class:`ModelConnection`, one session: client events in, server events out, the VAD
  and the pacing of responses;
* :mod:`.items`: conversation items and responses, and their JSON;
* :mod:`.validation`: the checks of client events and ``session.update`` per dialect, the default sessions;
* :mod:`.names`: the vocabulary of the dialects (formats, rates, event names);
* :mod:`.audio`: G.711, resampling, tones and the VAD's input timeline.
"""

from __future__ import annotations

from bridge.local_model.audio import threshold_to_rms
from bridge.local_model.connection import ModelConnection
from bridge.local_model.server import LocalModel

__all__ = ["LocalModel", "ModelConnection", "threshold_to_rms"]
