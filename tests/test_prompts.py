"""Prompt profiles: parsing from TOML/JSON, validation with one message per field."""

from __future__ import annotations

import pytest

from bridge.config import AudioPath, Dialect
from bridge.errors import ConfigError
from bridge.prompts import DEFAULT_PROFILE, ProfileError, parse_profile, profile_from_mapping

TOML = """
name = "support"
instructions = "Be brief."
voice = "marin"
greeting = "Welcome to support."
noise_reduction = "far_field"
audio_path = "g711_ulaw"

[turn_detection]
type = "semantic_vad"
eagerness = "high"

[transcription]
model = "gpt-4o-transcribe"
language = "en"
"""


def test_toml_profile() -> None:
    p = parse_profile(TOML, filename="p.toml")
    assert (p.name, p.voice, p.noise_reduction, p.audio_path) == (
        "support",
        "marin",
        "far_field",
        AudioPath.G711_ULAW,
    )
    assert p.turn_detection.type == "semantic_vad" and p.turn_detection.eagerness == "high"
    assert p.transcription is not None and p.transcription.language == "en"
    assert "Welcome to support." in (p.greeting_instructions() or "")


def test_json_profile() -> None:
    p = parse_profile('{"voice": "sage", "noise_reduction": "off"}', filename="p.json")
    assert p.voice == "sage" and p.noise_reduction is None


def test_settings_that_would_leave_the_model_mute_are_refused() -> None:
    with pytest.raises(ProfileError) as info:
        profile_from_mapping({"turn_detection": None})
    assert "server_vad" in info.value.problems["turn_detection"]
    with pytest.raises(ProfileError) as info:
        profile_from_mapping({"turn_detection": {"create_response": False}})
    assert "never answer" in info.value.problems["turn_detection.create_response"]


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(ProfileError) as info:
        profile_from_mapping(
            {
                "voice": "robot",
                "noise_reduction": "loud",
                "turn_detection": {"type": "server_vad", "threshold": 2, "silence_duration_ms": "x"},
                "colour": "blue",
            }
        )
    problems = info.value.problems
    assert set(problems) == {
        "voice",
        "noise_reduction",
        "turn_detection.threshold",
        "turn_detection.silence_duration_ms",
        "colour",
    }
    assert "alloy" in problems["voice"]


def test_ga_only_voices_are_refused_in_preview() -> None:
    with pytest.raises(ProfileError, match="voice"):
        profile_from_mapping({"voice": "cedar"}, dialect=Dialect.PREVIEW)
    assert profile_from_mapping({"voice": "cedar"}).voice == "cedar"


def test_unparsable_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot be parsed"):
        parse_profile("voice = ", filename="p.toml")


def test_default_profile_is_valid_everywhere() -> None:
    for dialect in Dialect:
        assert profile_from_mapping({}, dialect=dialect) == DEFAULT_PROFILE
