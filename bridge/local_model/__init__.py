"""The local Realtime model: a loopback server that speaks both Realtime dialects (GA and preview).

It is what ``bridge serve`` dials when no Azure deployment is configured, and what the tests, replays and
benchmarks talk to. It validates every client event as strictly as the service does and answers with
audio (an echo of the caller's words, or a beep), voice-activity events, transcripts and the error bodies
of the real service. :class:`LocalModel` is the server; :mod:`.wire` the event names, validation and
JSON shapes; :mod:`.audio` G.711, resampling, tones and the VAD's input timeline.
"""

from __future__ import annotations

from bridge.local_model.audio import threshold_to_rms
from bridge.local_model.server import LocalModel, ModelConnection

__all__ = ["LocalModel", "ModelConnection", "threshold_to_rms"]
