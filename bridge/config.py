"""Settings, read once from the environment and validated before anything starts.

Every setting in the README's settings table is read here. A setting that is present but wrong raises
:class:`~bridge.errors.ConfigError` with one line that names the variable and says how to fix it;
``bridge serve`` prints that line and exits non-zero. Secrets are held in :class:`Secret` so that no
``repr``, log line or error message can show them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from bridge.errors import ConfigError


class AudioPath(StrEnum):
    """How audio crosses the bridge (docs/architecture.md §1)."""

    PCM16 = "pcm16"
    """Transcode: μ-law 8 kHz ⇄ PCM16 24 kHz; the model sees PCM16."""
    G711_ULAW = "g711_ulaw"
    """Passthrough: the model speaks μ-law 8 kHz itself."""


class Dialect(StrEnum):
    """Which Realtime protocol the upstream speaks (docs/protocols.md §2.7-2.8)."""

    GA = "ga"
    PREVIEW = "preview"


class Secret:
    """A string that never shows itself in ``repr``/``str``; ask for :meth:`reveal` explicitly."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value; only for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and any loopback IP address."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class AzureSettings:
    """Where and how to reach the Azure OpenAI Realtime deployment."""

    endpoint: str
    """``https://NAME.openai.azure.com`` or, for loopback test servers, ``http://127.0.0.1:PORT``."""
    deployment: str
    api_key: Secret | None
    """``None``: authenticate with Entra ID through ``DefaultAzureCredential``."""
    api_version: str | None
    """Set: the preview dialect; ``None``: GA."""

    @property
    def dialect(self) -> Dialect:
        """The dialect the api-version implies."""
        return Dialect.PREVIEW if self.api_version else Dialect.GA


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the bridge reads from its environment (the README's settings table)."""

    azure: AzureSettings | None
    """``None``: the built-in local model is used."""
    twilio_auth_token: Secret | None
    twilio_account_sid: str | None
    public_url: str
    """Base URL Twilio uses, without a trailing slash; signatures are checked against it."""
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data")
    database: str = field(default="", repr=False)
    """``BRIDGE_DATABASE``: a SQLite path or a PostgreSQL URL, which may hold a password (not in repr)."""
    audio_path: AudioPath = AudioPath.PCM16
    admin_token: Secret | None = None
    max_calls: int = 100
    """Calls one process accepts at once (answered, pre-warmed or live); above it the fallback message."""
    metrics_token: Secret | None = None
    """When set, ``GET /metrics`` wants ``Authorization: Bearer`` it."""
    instance_id: str = "local"
    """This instance's name on the call records it writes (``BRIDGE_INSTANCE_ID``, default host:port, and
    ``/N`` for worker N): at start-up, its records a crash left in progress are marked interrupted."""
    workers: int = 1
    """``bridge serve`` processes sharing the port (``BRIDGE_WORKERS`` or ``--workers``)."""
    worker: int | None = None
    """This process's index among them (set by the supervisor in ``BRIDGE_WORKER``), else ``None``."""
    recordings_dir: Path | None = None
    recordings_gzip: bool = False
    storage_url: str | None = None
    """``BRIDGE_STORAGE_URL``: the Blob Storage container recordings go to, without a
    trailing slash; ``None``: the local directory (and the database) as before."""
    storage_key: Secret | None = None
    """``BRIDGE_STORAGE_KEY``: the account key (Azurite, development); ``None``: the managed identity."""
    profile_path: Path | None = None
    insecure_dev: bool = False
    drain_seconds: float = 30.0
    """On SIGTERM, how long live calls may go on before they are ended."""
    prewarm_timeout: float = 10.0
    """How long a Realtime connection opened during the webhook waits for its stream."""
    stream_token_ttl: float = 30.0
    """How long the one-time stream token in the TwiML stays valid."""
    log_level: str = "INFO"
    log_format: str = "text"
    """``text``, or ``json``: one JSON object per line, with the call's fields (``BRIDGE_LOG_FORMAT``)."""
    rollover_margin: float = 120.0
    """A Realtime session is swapped this long before its ``expires_at``."""
    max_session_seconds: float = 1500.0
    """The lifetime taken for a Realtime session whose service sends no ``expires_at``."""
    model_idle_timeout: float = 10.0
    """While the model owes an event, this long without one is a dead connection: reconnect."""
    local_model_session_seconds: float = 1800.0
    """The built-in local model's session cap (as Azure's: 30 minutes); lower it to watch a rollover."""
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def dialect(self) -> Dialect:
        """The Realtime dialect in use (the local model speaks GA unless told otherwise)."""
        return self.azure.dialect if self.azure else Dialect.GA

    @property
    def stream_url(self) -> str:
        """The absolute ``ws(s)://`` URL of the media stream socket, as written in the TwiML."""
        scheme, rest = self.public_url.split("://", 1)
        return ("wss" if scheme == "https" else "ws") + "://" + rest + STREAM_PATH


STREAM_PATH = "/twilio/stream"
VOICE_PATH = "/twilio/voice"
STATUS_PATH = "/twilio/status"
AFTER_STREAM_PATH = "/twilio/after-stream"


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r} is not a yes/no value: use 1 or 0")


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number: give seconds, e.g. {default:g}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw} is out of range: use a value from {low:g} to {high:g}")
    return value


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r} is not a count: give a whole number of 1 or more, e.g. {default}")
    return int(raw)


def _writable_dir(name: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{name}={raw!r} is not a writable directory ({exc.strerror}): "
            f"create it or point {name} elsewhere"
        ) from None
    return path


def _storage_url(raw: str) -> str:
    """``BRIDGE_STORAGE_URL``: ``https://ACCOUNT.blob.core.windows.net/CONTAINER`` (any https host, one path
    segment), or ``http://127.0.0.1:PORT/ACCOUNT/CONTAINER`` on loopback (Azurite)."""
    url = raw.rstrip("/")
    parsed = urlsplit(url)
    segments = [s for s in parsed.path.split("/") if s]
    example = "https://ACCOUNT.blob.core.windows.net/CONTAINER"
    if parsed.query or parsed.fragment or parsed.username or parsed.password or not parsed.hostname:
        raise ConfigError(f"BRIDGE_STORAGE_URL must be a plain container URL like {example}")
    if parsed.scheme == "https":
        if len(segments) != 1:
            raise ConfigError(f"BRIDGE_STORAGE_URL must name one container: {example}")
    elif parsed.scheme == "http" and is_loopback_host(parsed.hostname):
        if len(segments) != 2:
            raise ConfigError(
                "BRIDGE_STORAGE_URL over http (Azurite) must be http://127.0.0.1:PORT/ACCOUNT/CONTAINER"
            )
    else:
        raise ConfigError(f"BRIDGE_STORAGE_URL must be https ({example}); http only on loopback (Azurite)")
    container = segments[-1]
    if not (3 <= len(container) <= 63) or not all(c.islower() or c.isdigit() or c == "-" for c in container):
        raise ConfigError(
            f"BRIDGE_STORAGE_URL: the container {container!r} must be 3-63 lowercase letters, digits, '-'"
        )
    return url


def _azure(env: Mapping[str, str]) -> AzureSettings | None:
    endpoint = env.get("AZURE_OPENAI_ENDPOINT", "").strip().rstrip("/")
    deployment = env.get("AZURE_OPENAI_DEPLOYMENT", "").strip()
    if not endpoint:
        if deployment:
            raise ConfigError(
                "AZURE_OPENAI_DEPLOYMENT is set but AZURE_OPENAI_ENDPOINT is not: "
                "set AZURE_OPENAI_ENDPOINT=https://NAME.openai.azure.com"
            )
        return None
    parts = urlsplit(endpoint)
    if parts.scheme == "https" and parts.hostname:
        pass
    elif parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        pass  # loopback test servers (the local model, fakes) speak plain ws://
    else:
        raise ConfigError(
            f"AZURE_OPENAI_ENDPOINT={endpoint!r} is not a valid endpoint: "
            "use https://NAME.openai.azure.com (http:// only for 127.0.0.1 test servers)"
        )
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(
            f"AZURE_OPENAI_ENDPOINT={endpoint!r} has a path or query: give only the base, "
            "e.g. https://NAME.openai.azure.com"
        )
    if not deployment:
        raise ConfigError(
            "AZURE_OPENAI_ENDPOINT is set but AZURE_OPENAI_DEPLOYMENT is not: "
            "set it to your realtime deployment's name"
        )
    key = env.get("AZURE_OPENAI_API_KEY", "").strip()
    version = env.get("AZURE_OPENAI_API_VERSION", "").strip() or None
    if version is not None and not (len(version) >= 10 and version[:4].isdigit() and version[4] == "-"):
        raise ConfigError(
            f"AZURE_OPENAI_API_VERSION={version!r} is not an api-version: use e.g. 2025-04-01-preview, "
            "or unset it for the GA protocol"
        )
    return AzureSettings(endpoint, deployment, Secret(key) if key else None, version)


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
) -> Settings:
    """Read and validate every setting; raise :class:`ConfigError` with one line on the first problem.

    ``host``/``port``/``workers`` come from command-line flags and override the environment.
    """
    env = os.environ if env is None else env
    host = host or env.get("BRIDGE_HOST", "").strip() or "127.0.0.1"
    if port is None:
        raw_port = env.get("BRIDGE_PORT", "").strip() or "8080"
        if not raw_port.isdigit() or not 0 <= int(raw_port) <= 65535:
            raise ConfigError(f"BRIDGE_PORT={raw_port!r} is not a port: use a number from 1 to 65535")
        port = int(raw_port)

    azure = _azure(env)

    insecure = _flag(env, "BRIDGE_INSECURE_DEV")
    token = env.get("TWILIO_AUTH_TOKEN", "").strip()
    if not token and not insecure:
        raise ConfigError(
            "TWILIO_AUTH_TOKEN is not set: set it to your Twilio auth token "
            "(or BRIDGE_INSECURE_DEV=1 for unsigned local development on 127.0.0.1)"
        )
    if not token and not is_loopback_host(host):
        raise ConfigError(
            f"BRIDGE_INSECURE_DEV=1 without TWILIO_AUTH_TOKEN only serves on loopback, not {host!r}: "
            "set TWILIO_AUTH_TOKEN or use --host 127.0.0.1"
        )

    public = env.get("BRIDGE_PUBLIC_URL", "").strip().rstrip("/")
    if public:
        parts = urlsplit(public)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(
                f"BRIDGE_PUBLIC_URL={public!r} is not a base URL: use e.g. https://bridge.example.com"
            )
        if parts.path not in ("", "/"):
            raise ConfigError(f"BRIDGE_PUBLIC_URL={public!r} must not have a path: give only scheme and host")
        if insecure and not is_loopback_host(parts.hostname):
            # Development mode checks no signature: reachable from the internet, anyone could place calls.
            raise ConfigError(
                f"BRIDGE_INSECURE_DEV=1 refuses a public BRIDGE_PUBLIC_URL ({public}): development mode "
                "checks no Twilio signature; set TWILIO_AUTH_TOKEN and unset BRIDGE_INSECURE_DEV"
            )
    elif token and not insecure:
        raise ConfigError(
            "BRIDGE_PUBLIC_URL is not set: set it to the https:// address Twilio reaches this bridge at "
            "(your tunnel or load balancer); signatures are checked against it"
        )
    else:
        shown = f"[{host}]" if ":" in host else host
        public = f"http://{shown}:{port}"

    raw_path = env.get("BRIDGE_AUDIO_PATH", "").strip() or AudioPath.PCM16.value
    try:
        audio_path = AudioPath(raw_path)
    except ValueError:
        raise ConfigError(f"BRIDGE_AUDIO_PATH={raw_path!r} is unknown: use pcm16 or g711_ulaw") from None

    data_dir_raw = env.get("BRIDGE_DATA_DIR", "").strip() or "data"
    database = env.get("BRIDGE_DATABASE", "").strip()
    data_dir = Path(data_dir_raw)
    if data_dir_raw != "data" or not database:
        data_dir = _writable_dir("BRIDGE_DATA_DIR", data_dir_raw)
    if not database:
        database = str(data_dir / "bridge.sqlite3")

    recordings_raw = env.get("BRIDGE_RECORDINGS_DIR", "").strip()
    recordings = _writable_dir("BRIDGE_RECORDINGS_DIR", recordings_raw) if recordings_raw else None

    storage_raw = env.get("BRIDGE_STORAGE_URL", "").strip()
    storage_url = _storage_url(storage_raw) if storage_raw else None
    storage_key = env.get("BRIDGE_STORAGE_KEY", "").strip()
    if storage_key and storage_url is None:
        raise ConfigError("BRIDGE_STORAGE_KEY is set without BRIDGE_STORAGE_URL: set both, or neither")

    profile_raw = env.get("BRIDGE_PROFILE", "").strip()
    profile_path: Path | None = None
    if profile_raw:
        profile_path = Path(profile_raw).expanduser()
        if profile_path.suffix.lower() not in (".toml", ".json"):
            raise ConfigError(f"BRIDGE_PROFILE={profile_raw!r} must be a .toml or .json file")
        if not profile_path.is_file():
            raise ConfigError(
                f"BRIDGE_PROFILE={profile_raw!r} does not exist: create it or unset BRIDGE_PROFILE"
            )

    admin = env.get("BRIDGE_ADMIN_TOKEN", "").strip()
    if admin and len(admin) < 16:
        raise ConfigError("BRIDGE_ADMIN_TOKEN is too short: use at least 16 random characters")

    metrics_token = env.get("BRIDGE_METRICS_TOKEN", "").strip()
    if metrics_token and len(metrics_token) < 16:
        raise ConfigError("BRIDGE_METRICS_TOKEN is too short: use at least 16 random characters")

    workers = _count(env, "BRIDGE_WORKERS", 1) if workers is None else workers
    if not 1 <= workers <= 64:
        raise ConfigError(f"BRIDGE_WORKERS (or --workers) {workers} is out of range: use 1 to 64")
    if workers > 1 and port == 0:
        raise ConfigError("several workers share one port: give BRIDGE_PORT (or --port) a number, not 0")
    raw_worker = env.get("BRIDGE_WORKER", "").strip()
    worker = int(raw_worker) if raw_worker.isdigit() else None
    instance = env.get("BRIDGE_INSTANCE_ID", "").strip() or f"{socket.gethostname()}:{port}"
    if worker is not None:
        instance += f"/{worker}"
    if len(instance) > 200 or not instance.isprintable():
        raise ConfigError("BRIDGE_INSTANCE_ID must be printable and at most 200 characters")

    level = env.get("BRIDGE_LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"BRIDGE_LOG_LEVEL={level!r} is unknown: use DEBUG, INFO, WARNING or ERROR")
    log_format = env.get("BRIDGE_LOG_FORMAT", "").strip().lower() or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"BRIDGE_LOG_FORMAT={log_format!r} is unknown: use text or json")

    return Settings(
        azure=azure,
        twilio_auth_token=Secret(token) if token else None,
        twilio_account_sid=env.get("TWILIO_ACCOUNT_SID", "").strip() or None,
        public_url=public,
        host=host,
        port=port,
        data_dir=data_dir,
        database=database,
        audio_path=audio_path,
        admin_token=Secret(admin) if admin else None,
        metrics_token=Secret(metrics_token) if metrics_token else None,
        max_calls=_count(env, "BRIDGE_MAX_CALLS", 100),
        instance_id=instance,
        workers=workers,
        worker=worker,
        recordings_dir=recordings,
        recordings_gzip=_flag(env, "BRIDGE_RECORDINGS_GZIP"),
        storage_url=storage_url,
        storage_key=Secret(storage_key) if storage_key else None,
        profile_path=profile_path,
        insecure_dev=insecure,
        drain_seconds=_number(env, "BRIDGE_DRAIN_SECONDS", 30.0, 0.0, 3600.0),
        prewarm_timeout=_number(env, "BRIDGE_PREWARM_TIMEOUT", 10.0, 0.1, 120.0),
        stream_token_ttl=_number(env, "BRIDGE_STREAM_TOKEN_TTL", 30.0, 1.0, 600.0),
        log_level=level,
        log_format=log_format,
        rollover_margin=_number(env, "BRIDGE_ROLLOVER_MARGIN", 120.0, 1.0, 3600.0),
        max_session_seconds=_number(env, "BRIDGE_MAX_SESSION_SECONDS", 1500.0, 10.0, 86400.0),
        model_idle_timeout=_number(env, "BRIDGE_MODEL_IDLE_TIMEOUT", 10.0, 1.0, 300.0),
        local_model_session_seconds=_number(env, "BRIDGE_LOCAL_MODEL_SESSION_SECONDS", 1800.0, 5.0, 86400.0),
    )
