"""``bridge export``: a recording as a stereo WAV (the caller, and what the caller heard) and a timeline."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bridge.errors import BridgeError
from bridge.recordings.blob import load_recording_source


def export_command(args: argparse.Namespace) -> int:
    """``bridge export``: write the WAV and/or the timeline of one recording."""
    from bridge.recordings.timeline import timeline_svg
    from bridge.recordings.wav import caller_and_heard, wav_bytes

    if args.wav is None and args.timeline is None:
        print("bridge export: say what to write: --wav FILE and/or --timeline FILE.svg", file=sys.stderr)
        return 2
    try:
        recording = load_recording_source(args.recording, os.environ)  # a file, or a blob URL
    except (BridgeError, OSError) as exc:
        print(f"bridge export: {args.recording}: {exc}", file=sys.stderr)
        return 2
    if args.wav is not None:
        left, right = caller_and_heard(recording)
        Path(args.wav).write_bytes(wav_bytes(left, right))
        print(f"wrote {args.wav}: left the caller, right what the caller heard ({len(left) / 8000:.1f} s)")
    if args.timeline is not None:
        Path(args.timeline).write_text(timeline_svg(recording), encoding="utf-8")
        print(f"wrote {args.timeline}")
    return 0
