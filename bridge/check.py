"""``bridge check``: validate the settings and reach what the bridge needs, and say what is wrong.

Each check prints one line, ``ok`` or ``FAILED`` with the reason: the settings (as ``bridge serve`` reads
them), the store (``BRIDGE_DATABASE``: opened, migrated, its profiles listed), the Realtime model (a
connection opened and its ``session.created`` received; the built-in local model when no Azure settings are
given) and, when ``BRIDGE_STORAGE_URL`` is set, the blob container. The exit status is 0 when all passed,
1 when one failed, 2 when the settings themselves are wrong. Secrets are never printed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bridge import realtime as rt
from bridge.config import Settings, load_settings
from bridge.errors import BridgeError, ConfigError
from bridge.local_model import LocalModel
from bridge.recordings.blob import BlobStorage
from bridge.store import open_store, redacted
from bridge.upstream import Target, Upstream

__all__ = ["check_command", "run_checks"]

MODEL_TIMEOUT = 10.0
"""How long the model may take to open a session."""

Report = Callable[[str, bool, str], None]


async def _store(settings: Settings) -> str:
    store = await open_store(settings.database)
    try:
        profiles = await store.list_profiles()
    finally:
        await store.close()
    return f"{redacted(settings.database)}: {len(profiles)} profiles"


async def _model(settings: Settings) -> str:
    local: LocalModel | None = None
    if settings.azure is not None:
        target = Target.from_azure(settings.azure)
    else:
        local = LocalModel(record=False)
        await local.start()
        target = Target(local.endpoint, "local-model", settings.dialect, None, "local")
    upstream = Upstream(target)
    try:
        began = time.perf_counter()
        connection = await upstream.connect(budget=MODEL_TIMEOUT)
        try:
            async with asyncio.timeout(MODEL_TIMEOUT):
                event = await connection.receive()
        finally:
            await connection.close()
        if not isinstance(event, rt.SessionCreated):
            raise BridgeError(f"the first event was {type(event).__name__}, not session.created")
        took = (time.perf_counter() - began) * 1000
        where = f"{target.endpoint} ({target.deployment})" if local is None else "the built-in local model"
        return f"{where}: session.created in {took:.0f} ms"
    finally:
        await upstream.close()
        if local is not None:
            await local.close()


async def _blobs(settings: Settings) -> str:
    blobs = BlobStorage.from_settings(settings)
    if blobs is None:
        return "not configured (BRIDGE_STORAGE_URL): recordings stay in the data directory"
    try:
        await blobs.reachable()
    finally:
        await blobs.close()
    return f"{settings.storage_url}: reachable"


async def run_checks(settings: Settings, report: Report) -> bool:
    """Run every check, reporting each as ``report(name, ok, detail)``; whether all passed."""
    checks: list[tuple[str, Callable[[Settings], Awaitable[str]]]] = [
        ("store", _store),
        ("model", _model),
        ("blob storage", _blobs),
    ]
    passed = True
    for name, check in checks:
        try:
            detail = await check(settings)
        except (BridgeError, OSError, TimeoutError) as exc:
            report(name, False, str(exc) or type(exc).__name__)
            passed = False
        else:
            report(name, True, detail)
    return passed


def check_command(host: str | None = None, port: int | None = None) -> int:
    """``bridge check``: print one line per check; 0 all passed, 1 one failed, 2 the settings are wrong."""
    try:
        settings = load_settings(host=host, port=port)
    except ConfigError as exc:
        print(f"settings      FAILED  {exc}")
        return 2
    print(f"settings      ok      public URL {settings.public_url}, audio {settings.audio_path.value}")

    def report(name: str, ok: bool, detail: str) -> None:
        print(f"{name:<13} {'ok' if ok else 'FAILED':<7} {detail}")

    return 0 if asyncio.run(run_checks(settings, report)) else 1
