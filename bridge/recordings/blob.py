"""Blob Storage: one container (``BRIDGE_STORAGE_URL``) that holds call recordings.

A call is recorded to a local file as ever (the writer streams line by line); when the call ends the file
is uploaded (:func:`upload_recording`, retried) and removed, and the call record's ``recording_path`` holds
the blob's URL, e.g. ``https://ACCOUNT.blob.core.windows.net/CONTAINER/recordings/…-CA….jsonl``. An upload
that fails for good leaves the local file and its path in the record, logged and counted
(``bridge_store_errors_total{what="recording_upload"}``).

The container is reached through the managed identity (``DefaultAzureCredential``), or with an account key
(``BRIDGE_STORAGE_KEY``: Azurite, development). Every failure surfaces as a :class:`BlobError` (a
:class:`~bridge.errors.StoreError`), a missing blob as :class:`BlobNotFound`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob.aio import ContainerClient

from bridge.config import Secret, Settings, is_loopback_host
from bridge.errors import ConfigError, StoreError
from bridge.metrics import Metrics
from bridge.recordings.files import load_recording, load_recording_bytes
from bridge.recordings.format import Recording

log = logging.getLogger(__name__)

RECORDINGS = "recordings/"
"""The prefix of recording blobs: ``recordings/<file name>``."""
UPLOAD_RETRIES = (0.2, 1.0, 3.0)
"""Pauses between the tries of a recording upload that failed."""
CONNECTION_TIMEOUT = 10.0
READ_TIMEOUT = 60.0


class BlobError(StoreError):
    """Blob Storage could not be read or written (or refused: no access, no such container)."""


class BlobNotFound(BlobError):
    """No blob of that name in the container."""


def split_container_url(url: str) -> tuple[str, str]:
    """``(account name, container name)`` of a container URL: ``https://ACCOUNT.host/CONTAINER`` or, on
    loopback (Azurite), ``http://127.0.0.1:PORT/ACCOUNT/CONTAINER``. Raises :class:`ConfigError`."""
    parsed = urlsplit(url)
    segments = [s for s in parsed.path.split("/") if s]
    host = parsed.hostname or ""
    if parsed.scheme == "https" and len(segments) == 1:
        return host.split(".", 1)[0], segments[0]
    if parsed.scheme == "http" and is_loopback_host(host) and len(segments) == 2:
        return segments[0], segments[1]
    raise ConfigError(f"{url!r} is not a Blob Storage container URL")


def split_blob_url(url: str) -> tuple[str, str]:
    """``(container URL, blob name)`` of a blob URL (the form :meth:`BlobStorage.url_for` makes)."""
    parsed = urlsplit(url)
    depth = 1 if parsed.scheme == "https" else 2  # http: loopback, the account is in the path
    segments = parsed.path.lstrip("/").split("/")
    if len(segments) <= depth or not all(segments[: depth + 1]):
        raise ConfigError(f"{url!r} is not a blob URL: want CONTAINER_URL/NAME")
    container_url = f"{parsed.scheme}://{parsed.netloc}/" + "/".join(segments[:depth])
    split_container_url(container_url)  # checks the scheme and host
    return container_url, unquote("/".join(segments[depth:]))


def is_blob_url(source: str | Path) -> bool:
    """Whether a command-line argument names a blob (``https://…``/``http://…``) rather than a file."""
    return _url(source) is not None


def _url(source: str | Path) -> str | None:
    # argparse's ``type=Path`` folds "https://" to "https:/": take either back.
    match = re.match(r"^(https?):/+(.+)$", str(source))
    return f"{match[1]}://{match[2]}" if match else None


class BlobStorage:
    """One Blob Storage container, through the aio SDK (its aiohttp transport)."""

    def __init__(self, container_url: str, *, key: Secret | None = None) -> None:
        self.container_url = container_url.rstrip("/")
        account, _ = split_container_url(self.container_url)
        self._identity: Any = None
        credential: Any
        if key is not None:
            credential = AzureNamedKeyCredential(account, key.reveal())
        else:
            from azure.identity.aio import DefaultAzureCredential

            credential = self._identity = DefaultAzureCredential()
        # No SDK retries: the callers decide (an upload is retried by :func:`upload_recording`).
        self._client = ContainerClient.from_container_url(
            self.container_url,
            credential=credential,
            retry_total=0,
            connection_timeout=CONNECTION_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> BlobStorage | None:
        """The container of ``BRIDGE_STORAGE_URL``, or ``None`` when it is not set."""
        if settings.storage_url is None:
            return None
        return cls(settings.storage_url, key=settings.storage_key)

    def url_for(self, name: str) -> str:
        """The URL of the blob ``name`` (what a call record's ``recording_path`` holds)."""
        return f"{self.container_url}/{quote(name)}"

    def name_of(self, url: str) -> str | None:
        """The blob name of ``url`` when it lies in this container, else ``None``."""
        prefix = self.container_url + "/"
        if not url.startswith(prefix) or len(url) == len(prefix):
            return None
        name = unquote(url[len(prefix) :])
        return None if ".." in name.split("/") else name

    async def put(self, name: str, data: bytes) -> None:
        """Write the blob ``name`` (replacing it)."""
        try:
            await self._client.upload_blob(name, data, overwrite=True)
        except AzureError as exc:
            raise self._error("writing", name, exc) from exc

    async def get(self, name: str) -> bytes:
        """Read the blob ``name``; :class:`BlobNotFound` when there is none."""
        try:
            downloader = await self._client.download_blob(name)
            return await downloader.readall()
        except AzureError as exc:
            raise self._error("reading", name, exc) from exc

    async def exists(self, name: str) -> bool:
        """Whether the blob ``name`` exists."""
        try:
            return bool(await self._client.get_blob_client(name).exists())
        except AzureError as exc:
            raise self._error("checking", name, exc) from exc

    async def reachable(self) -> None:
        """Prove that the container exists and can be read with this credential; :class:`BlobError`
        (:class:`BlobNotFound` for a container that does not exist) otherwise."""
        try:
            await self._client.get_container_properties()
        except AzureError as exc:
            raise self._error("reaching the container", "", exc) from exc

    async def create_container(self) -> None:
        """Create the container when it does not exist (Azurite, development; in Azure, the infra does)."""
        try:
            await self._client.create_container()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise self._error("creating the container for", "", exc) from exc

    async def close(self) -> None:
        """Close the client (and the managed identity credential)."""
        await self._client.close()
        if self._identity is not None:
            await self._identity.close()

    async def __aenter__(self) -> BlobStorage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _error(self, doing: str, name: str, exc: AzureError) -> BlobError:
        what = f"{self.container_url}/{name}"
        reason = getattr(exc, "reason", None) or type(exc).__name__
        code = getattr(exc, "error_code", None)
        detail = f"{reason}{f' ({code})' if code else ''}"
        if isinstance(exc, ResourceNotFoundError):
            return BlobNotFound(f"{doing} {what}: not found: {detail}")
        return BlobError(f"{doing} {what} failed: {detail}")


async def upload_recording(storage: BlobStorage, path: Path, metrics: Metrics | None = None) -> str | None:
    """Upload the recording file ``path`` as ``recordings/<its name>``, retried (:data:`UPLOAD_RETRIES`);
    then remove the local file and return the blob's URL. On the last failure the file stays, the failure
    is logged and counted, and ``None`` is returned."""
    name = RECORDINGS + path.name
    problem = ""
    for attempt, pause in enumerate((*UPLOAD_RETRIES, None), start=1):
        try:
            data = await asyncio.to_thread(path.read_bytes)
            await storage.put(name, data)
        except (BlobError, OSError) as exc:
            problem = str(exc)
            if pause is None or isinstance(exc, OSError):
                break
            log.warning("recording %s: upload failed (try %d): %s", path.name, attempt, exc)
            await asyncio.sleep(pause)
            continue
        try:
            await asyncio.to_thread(path.unlink)
        except OSError as exc:
            log.warning("recording %s: uploaded, but the local file stays: %s", path.name, exc)
        return storage.url_for(name)
    if metrics is not None:
        metrics.store_errors.inc(label="recording_upload")
    log.error("recording %s: not uploaded to Blob Storage: %s; kept at %s", path.name, problem, path)
    return None


AZURE_BLOB_HOSTS = (".blob.core.windows.net", ".blob.core.usgovcloudapi.net", ".blob.core.chinacloudapi.cn")
"""Where a blob URL given on the command line may point besides ``BRIDGE_STORAGE_URL``'s host: the
credential (a token for the identity, or the key) is sent there."""


async def fetch_recording(url: str, environ: Mapping[str, str]) -> Recording:
    """Read the recording at the blob ``url`` with the account key ``BRIDGE_STORAGE_KEY`` of ``environ``
    when set, else the managed identity (``DefaultAzureCredential``). The URL must be Azure Blob
    Storage's, ``BRIDGE_STORAGE_URL``'s host or loopback: the credential is never sent elsewhere."""
    container_url, name = split_blob_url(url)
    host = (urlsplit(container_url).hostname or "").lower()
    configured = (urlsplit(environ.get("BRIDGE_STORAGE_URL", "")).hostname or "").lower()
    if not (host == configured or host.endswith(AZURE_BLOB_HOSTS) or is_loopback_host(host)):
        raise ConfigError(
            f"{url!r} is not on Azure Blob Storage nor on BRIDGE_STORAGE_URL's host: "
            "refusing to send the storage credential there"
        )
    key = environ.get("BRIDGE_STORAGE_KEY", "").strip()
    async with BlobStorage(container_url, key=Secret(key) if key else None) as storage:
        data = await storage.get(name)
    return load_recording_bytes(data, name.rsplit("/", 1)[-1])


def load_recording_source(source: str | Path, environ: Mapping[str, str]) -> Recording:
    """A recording from a file or a blob URL (for ``bridge replay`` and ``bridge export``; not in a loop)."""
    url = _url(source)
    if url is None:
        return load_recording(Path(source))
    return asyncio.run(fetch_recording(url, environ))
