"""Settings: every variable in docs/architecture.md, and one clear line for each misconfiguration."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bridge.config import AudioPath, Dialect, Secret, load_settings
from bridge.errors import ConfigError

BASE = {"TWILIO_AUTH_TOKEN": "tok_secret_123", "BRIDGE_PUBLIC_URL": "https://bridge.example.com"}


def settings(tmp_path: Path, **env: str) -> object:
    return load_settings({"BRIDGE_DATA_DIR": str(tmp_path / "data"), **BASE, **env})


def test_defaults_use_the_local_model_and_ga(tmp_path: Path) -> None:
    s = load_settings({"BRIDGE_DATA_DIR": str(tmp_path), **BASE})
    assert s.azure is None and s.dialect is Dialect.GA
    assert s.audio_path is AudioPath.PCM16
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.stream_url == "wss://bridge.example.com/twilio/stream"
    assert s.database.endswith("bridge.sqlite3")
    assert s.instance_id == f"{socket.gethostname()}:8080"
    named = load_settings({"BRIDGE_DATA_DIR": str(tmp_path), **BASE, "BRIDGE_INSTANCE_ID": "b-2"})
    assert named.instance_id == "b-2"


def test_azure_ga_and_preview(tmp_path: Path) -> None:
    env = {
        "BRIDGE_DATA_DIR": str(tmp_path),
        **BASE,
        "AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com/",
        "AZURE_OPENAI_DEPLOYMENT": "gpt-realtime",
        "AZURE_OPENAI_API_KEY": "k" * 32,
    }
    s = load_settings(env)
    assert s.azure is not None and s.azure.endpoint == "https://x.openai.azure.com"
    assert s.dialect is Dialect.GA and s.azure.api_key == Secret("k" * 32)
    s = load_settings({**env, "AZURE_OPENAI_API_VERSION": "2025-04-01-preview"})
    assert s.dialect is Dialect.PREVIEW
    s = load_settings({**env, "AZURE_OPENAI_API_KEY": ""})
    assert s.azure is not None and s.azure.api_key is None  # Entra ID


def test_secrets_never_show_in_repr(tmp_path: Path) -> None:
    env = {
        "BRIDGE_DATA_DIR": str(tmp_path),
        **BASE,
        "AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com",
        "AZURE_OPENAI_DEPLOYMENT": "d",
        "AZURE_OPENAI_API_KEY": "supersecretkey",
        "BRIDGE_ADMIN_TOKEN": "adminadminadmin-token",
    }
    text = repr(load_settings(env))
    assert "supersecretkey" not in text and "tok_secret_123" not in text and "adminadmin" not in text


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"AZURE_OPENAI_ENDPOINT": "ftp://x"}, "AZURE_OPENAI_ENDPOINT"),
        ({"AZURE_OPENAI_ENDPOINT": "http://x.openai.azure.com", "AZURE_OPENAI_DEPLOYMENT": "d"}, "http://"),
        ({"AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com"}, "AZURE_OPENAI_DEPLOYMENT"),
        ({"AZURE_OPENAI_DEPLOYMENT": "d"}, "AZURE_OPENAI_ENDPOINT"),
        (
            {"AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com/openai", "AZURE_OPENAI_DEPLOYMENT": "d"},
            "path",
        ),
        (
            {
                "AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com",
                "AZURE_OPENAI_DEPLOYMENT": "d",
                "AZURE_OPENAI_API_VERSION": "preview",
            },
            "api-version",
        ),
        ({"BRIDGE_AUDIO_PATH": "mp3"}, "pcm16 or g711_ulaw"),
        ({"BRIDGE_PUBLIC_URL": "bridge.example.com"}, "BRIDGE_PUBLIC_URL"),
        ({"BRIDGE_PUBLIC_URL": "https://bridge.example.com/x"}, "path"),
        ({"BRIDGE_PUBLIC_URL": ""}, "BRIDGE_PUBLIC_URL is not set"),
        ({"TWILIO_AUTH_TOKEN": ""}, "TWILIO_AUTH_TOKEN"),
        ({"BRIDGE_PORT": "http"}, "BRIDGE_PORT"),
        ({"BRIDGE_DRAIN_SECONDS": "soon"}, "BRIDGE_DRAIN_SECONDS"),
        ({"BRIDGE_INSECURE_DEV": "maybe"}, "BRIDGE_INSECURE_DEV"),
        ({"BRIDGE_ADMIN_TOKEN": "short"}, "BRIDGE_ADMIN_TOKEN"),
        ({"BRIDGE_PROFILE": "/nonexistent/profile.toml"}, "does not exist"),
        ({"BRIDGE_PROFILE": "profile.yaml"}, ".toml or .json"),
        ({"BRIDGE_LOG_LEVEL": "LOUD"}, "BRIDGE_LOG_LEVEL"),
        ({"BRIDGE_ROLLOVER_MARGIN": "2 minutes"}, "BRIDGE_ROLLOVER_MARGIN"),
        ({"BRIDGE_MAX_CALLS": "0"}, "BRIDGE_MAX_CALLS"),
        ({"BRIDGE_MAX_CALLS": "many"}, "whole number"),
        ({"BRIDGE_ROLLOVER_MARGIN": "0"}, "out of range"),
        ({"BRIDGE_MAX_SESSION_SECONDS": "5"}, "BRIDGE_MAX_SESSION_SECONDS"),
        ({"BRIDGE_MODEL_IDLE_TIMEOUT": "-1"}, "BRIDGE_MODEL_IDLE_TIMEOUT"),
        ({"BRIDGE_LOCAL_MODEL_SESSION_SECONDS": "x"}, "BRIDGE_LOCAL_MODEL_SESSION_SECONDS"),
        ({"BRIDGE_INSTANCE_ID": "a\tb"}, "BRIDGE_INSTANCE_ID"),
        ({"BRIDGE_INSTANCE_ID": "x" * 201}, "BRIDGE_INSTANCE_ID"),
    ],
)
def test_a_wrong_setting_stops_start_up_with_one_line(
    tmp_path: Path, env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, **env)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_unwritable_directory_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="BRIDGE_RECORDINGS_DIR"):
        settings(tmp_path, BRIDGE_RECORDINGS_DIR=str(blocker / "sub"))


def test_insecure_dev_only_on_loopback(tmp_path: Path) -> None:
    env = {"BRIDGE_DATA_DIR": str(tmp_path), "BRIDGE_INSECURE_DEV": "1"}
    s = load_settings(env, port=9999)
    assert s.twilio_auth_token is None and s.public_url == "http://127.0.0.1:9999"
    assert s.stream_url == "ws://127.0.0.1:9999/twilio/stream"
    with pytest.raises(ConfigError, match="loopback"):
        load_settings(env, host="0.0.0.0")


def test_rollover_settings_have_defaults_and_are_read(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert (s.rollover_margin, s.max_session_seconds, s.model_idle_timeout) == (120.0, 1500.0, 10.0)
    assert s.local_model_session_seconds == 1800.0
    s = settings(
        tmp_path,
        BRIDGE_ROLLOVER_MARGIN="30",
        BRIDGE_MAX_SESSION_SECONDS="600",
        BRIDGE_MODEL_IDLE_TIMEOUT="4",
        BRIDGE_LOCAL_MODEL_SESSION_SECONDS="60",
    )
    assert (s.rollover_margin, s.max_session_seconds, s.model_idle_timeout) == (30.0, 600.0, 4.0)
    assert s.local_model_session_seconds == 60.0


def test_development_mode_refuses_a_public_url(tmp_path: Path) -> None:
    env = {"BRIDGE_DATA_DIR": str(tmp_path), "BRIDGE_INSECURE_DEV": "1"}
    with pytest.raises(ConfigError, match="refuses a public BRIDGE_PUBLIC_URL") as info:
        load_settings({**env, "BRIDGE_PUBLIC_URL": "https://abc.trycloudflare.com"})
    assert "TWILIO_AUTH_TOKEN" in str(info.value) and "\n" not in str(info.value)
    for loopback in ("http://127.0.0.1:8080", "http://localhost:9000", "http://[::1]:8080"):
        assert load_settings({**env, "BRIDGE_PUBLIC_URL": loopback}).public_url == loopback


def test_the_metrics_token_is_read_and_checked_for_length(tmp_path: Path) -> None:
    env = {"BRIDGE_DATA_DIR": str(tmp_path), **BASE}
    assert load_settings(env).metrics_token is None
    token = "m" * 24
    s = load_settings({**env, "BRIDGE_METRICS_TOKEN": token})
    assert s.metrics_token is not None and s.metrics_token.reveal() == token and token not in repr(s)
    with pytest.raises(ConfigError, match="BRIDGE_METRICS_TOKEN is too short"):
        load_settings({**env, "BRIDGE_METRICS_TOKEN": "short"})
