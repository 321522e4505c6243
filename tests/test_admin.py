"""The admin UI: sign-in and sessions, CSRF, the profile form, history and rollback, calls, the JSON API."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import shutil
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.admin.auth import COOKIE, GUARD, SessionSigner, safe_next
from bridge.admin.forms import values_from_profile
from bridge.admin.testcall import SLOTS, TEST_CALLS_PER_USER
from bridge.admin.throttle import MAX_ADDRESSES, MAX_DELAY, MAX_HELD, Throttle, backoff
from bridge.app import create_app
from bridge.config import load_settings
from bridge.errors import StoreError
from bridge.keys import GREETINGS, METRICS, STORE
from bridge.prompts import Profile
from bridge.store import CallRecord, ModelSession, NotFound, Store

TOKEN = "admin-token-for-tests-0123456789"
RECORDINGS = Path(__file__).parent / "recordings"

Client = TestClient[web.Request, web.Application]


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "TWILIO_AUTH_TOKEN": "test-twilio-auth-token",
        "BRIDGE_PUBLIC_URL": "http://bridge.example.test",
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
        "BRIDGE_RECORDINGS_DIR": str(tmp_path / "recordings"),
        "BRIDGE_ADMIN_TOKEN": TOKEN,
        **extra,
    }


def build_app(tmp_path: Path, **extra: str) -> web.Application:
    # The real app: its store, the local model rendering greetings, the first profile seeded ("default").
    return create_app(load_settings(env_for(tmp_path, **extra)))


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def make_client(tmp_path: Path) -> AsyncIterator[ClientFactory]:
    clients: list[Client] = []

    async def make(**extra: str) -> Client:
        client = TestClient(TestServer(build_app(tmp_path, **extra)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: ClientFactory) -> Client:
    return await make_client()


def store_of(client: Client) -> Store:
    return client.app[STORE]


async def sign_in(client: Client, name: str = "Ada") -> str:
    """Sign in and return the CSRF token of the session."""
    resp = await client.post(
        "/admin/sign-in", data={"token": TOKEN, "name": name, "next": "/admin"}, allow_redirects=False
    )
    assert resp.status == 303, await resp.text()
    return await csrf_of(client)


async def csrf_of(client: Client, path: str = "/admin") -> str:
    resp = await client.get(path)
    assert resp.status == 200
    match = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert match is not None
    return match.group(1)


def form_of(profile: Profile, **changes: str | bool) -> dict[str, str]:
    """The edit form as a browser would post it (checkboxes only when ticked)."""
    values = values_from_profile(profile) | changes
    return {k: ("on" if v is True else v) for k, v in values.items() if v is not False}


async def create(client: Client, csrf: str, profile: Profile) -> int:
    resp = await client.post(
        "/admin/profiles/new", data=form_of(profile) | {"csrf": csrf}, allow_redirects=False
    )
    assert resp.status == 303, await resp.text()
    match = re.fullmatch(r"/admin/profiles/(\d+)", resp.headers["Location"])
    assert match is not None
    return int(match.group(1))


# -- closed, sign-in, sessions


async def test_closed_admin_says_how_to_open_it(tmp_path: Path) -> None:
    env = env_for(tmp_path) | {"BRIDGE_ADMIN_TOKEN": ""}
    async with TestClient(TestServer(create_app(load_settings(env)))) as http:
        for path in ("/admin", "/admin/profiles/1", "/admin/api/profiles"):
            resp = await http.get(path)
            assert resp.status == 404
            assert "BRIDGE_ADMIN_TOKEN" in await resp.text()


def _example_path(canonical: str) -> str:
    return canonical.replace("{id}", "1").replace("{v}", "1").replace("{sid}", "CA1").replace("{tail}", "x")


async def test_nothing_under_admin_is_reachable_without_signing_in(client: Client) -> None:
    checked = 0
    for resource in client.app.router.resources():
        path = _example_path(resource.canonical)
        if not path.startswith("/admin") or path.startswith(("/admin/static", "/admin/sign-in")):
            continue
        for route in resource:
            if route.method == "HEAD":
                continue
            resp = await client.request(route.method, path, allow_redirects=False)
            if path.startswith("/admin/api/"):
                assert resp.status == 401, (route.method, path)
                assert (await resp.json())["error"] == "unauthorized"
            else:
                assert resp.status == 303, (route.method, path)
                assert resp.headers["Location"].startswith("/admin/sign-in")
            checked += 1
    assert checked >= 25
    # Unknown paths too, and a forged cookie is no session.
    resp = await client.get("/admin/nothing-here", allow_redirects=False)
    assert resp.status == 303
    client.session.cookie_jar.update_cookies({COOKIE: "eyJzaWQiOiJ4In0.AAAA"})
    resp = await client.get("/admin", allow_redirects=False)
    assert resp.status == 303
    # The public parts stay public.
    assert (await client.get("/admin/sign-in")).status == 200
    assert (await client.get("/admin/static/admin.css")).status == 200


async def test_sign_in_redirects_back_and_shows_the_name(client: Client) -> None:
    resp = await client.get("/admin/calls", allow_redirects=False)
    assert resp.headers["Location"] == "/admin/sign-in?next=/admin/calls"
    resp = await client.post(
        "/admin/sign-in", data={"token": TOKEN, "name": " Grace  Hopper ", "next": "/admin/calls"},
        allow_redirects=False,
    )  # fmt: skip
    assert resp.status == 303 and resp.headers["Location"] == "/admin/calls"
    page = await (await client.get("/admin/calls")).text()
    assert "Signed in as <strong>Grace Hopper</strong>" in page


class HeldAnswers:
    """Stands in for the throttle's sleep: notes each delay and holds that answer until released."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.released = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        await self.released.wait()


def hold_wrong_answers(client: Client) -> HeldAnswers:
    """Late answers wait for the test, and time stands still (no failure fades meanwhile)."""
    held = HeldAnswers()
    throttle = client.app[GUARD].throttle
    throttle.sleep, throttle.now = held.sleep, lambda: 1000.0
    return held


def auth_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bridge.admin.throttle"]


def flood_session() -> aiohttp.ClientSession:
    """A client with no connection limit (aiohttp's default of 100 would queue the flood client-side)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.CookieJar(unsafe=True)
    )


async def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


def test_backoff_grows_with_recent_failures_per_address_and_overall_and_fades() -> None:
    # Per address: 3 free tries, then 0.25 s doubling, at most MAX_DELAY.
    assert [backoff(n, n) for n in range(1, 10)] == [0, 0, 0, 0.25, 0.5, 1, 2, 4, MAX_DELAY]
    # Overall (a spray from many addresses): 30 free, then 0.25 s doubling every 5.
    assert (backoff(1, 30), backoff(1, 31), backoff(1, 36), backoff(1, 10**9)) == (0, 0.25, 0.5, MAX_DELAY)
    now = [0.0]
    throttle = Throttle(now=lambda: now[0])
    assert [throttle.failed("10.0.0.1") for _ in range(8)][-1] == 4
    assert throttle.failed("10.0.0.2") == 0  # another address is not slowed by this one (yet)
    now[0] += 3600  # an hour later the failures have faded
    assert throttle.failed("10.0.0.1") == 0
    for i in range(MAX_ADDRESSES + 50):  # memory stays bounded under a spray of addresses
        throttle.failed(f"10.1.{i // 256}.{i % 256}")
    assert len(throttle.addresses) == MAX_ADDRESSES


async def test_wrong_sign_ins_are_slowed_down_but_the_right_token_is_never_locked_out(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    held = hold_wrong_answers(client)
    held.released.set()  # answers go out at once here; the delays they were given are noted
    wrong = "not-the-token-0123456789"
    for _ in range(5):
        resp = await client.post("/admin/sign-in", data={"token": wrong}, allow_redirects=False)
        assert resp.status == 401
        assert "not the admin token" in await resp.text()
    assert held.delays == [0.25, 0.5]  # three free tries, then slower and slower
    # The right token right after: accepted at once (the old backoff answered 429 here).
    resp = await client.post("/admin/sign-in", data={"token": TOKEN}, allow_redirects=False)
    assert resp.status == 303
    assert (await client.get("/admin", allow_redirects=False)).status == 200
    assert held.delays == [0.25, 0.5]
    assert client.app[METRICS].refused.get("sign_in") == 5
    assert wrong not in caplog.text and TOKEN not in caplog.text
    assert len(auth_log(caplog)) == 1  # the first failure; the rest are summed up later


@pytest.mark.timeout(60)
async def test_a_flood_of_wrong_bearer_tokens_is_slowed_counted_and_logged_not_locking_out_staff(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    held = hold_wrong_answers(client)
    cap = client.app[GUARD].throttle.max_held = 100  # a smaller flood than the default bound needs
    assert cap < MAX_HELD
    url = client.make_url("/admin/api/profiles")
    guesses_sent = [f"guess-{i:04d}-abcdefghijklmnop" for i in range(200)]
    async with flood_session() as http:

        async def guess(value: str) -> int:
            async with http.get(url, headers={"Authorization": f"Bearer {value}"}) as resp:
                return resp.status

        guesses = [asyncio.create_task(guess(value)) for value in guesses_sent]
        await wait_until(lambda: len(held.delays) + sum(t.done() for t in guesses) == 200)
        pending = [t for t in guesses if not t.done()]
        # Three free tries, then `cap` late answers; beyond that bound, 429 at once (not held).
        assert len(pending) == len(held.delays) == cap
        early = sorted(t.result() for t in guesses if t.done())
        assert early == [401] * 3 + [429] * (200 - 3 - cap)
        # Slower with every failure, up to the cap: this flood takes MAX_DELAY s, not 0.1 s.
        assert held.delays[:5] == [0.25, 0.5, 1, 2, 4] and held.delays == sorted(held.delays)
        assert max(held.delays) == MAX_DELAY and sum(held.delays) > 400

        # Meanwhile staff (from the same address) use the right token: answered at once.
        async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
        assert not any(t.done() for t in pending)

        held.released.set()
        assert await asyncio.gather(*pending) == [401] * cap
        async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200  # and after it

    assert client.app[METRICS].refused.get("admin_token") == 200
    assert 'bridge_refused_total{reason="admin_token"} 200.0' in client.app[METRICS].render()
    lines = auth_log(caplog)
    assert len(lines) == 1 and "bearer token from 127.0.0.1" in lines[0]  # not one line per guess
    client.app[GUARD].throttle.log.flush()
    lines = auth_log(caplog)
    assert (
        len(lines) == 2
        and "199 more wrong tokens" in lines[1]
        and "97 of them answered 429 at once" in lines[1]
    )
    assert not any(value in caplog.text for value in guesses_sent) and TOKEN not in caplog.text


@pytest.mark.timeout(60)
async def test_a_flood_of_wrong_sign_ins_does_not_lock_out_the_right_token(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    held = hold_wrong_answers(client)
    url = client.make_url("/admin/sign-in")
    async with flood_session() as http:

        async def guess(i: int) -> int:
            data = {"token": f"guess-{i:04d}-abcdefghijklmnop"}
            async with http.post(url, data=data, allow_redirects=False) as resp:
                return resp.status

        guesses = [asyncio.create_task(guess(i)) for i in range(20)]
        await wait_until(lambda: len(held.delays) + sum(t.done() for t in guesses) == 20)
        pending = [t for t in guesses if not t.done()]
        assert len(pending) == 17 and held.delays[-1] == MAX_DELAY

        # The right token from the same address while the wrong ones wait: signed in at once.
        resp = await client.post(
            "/admin/sign-in", data={"token": TOKEN, "name": "Ada"}, allow_redirects=False
        )
        assert resp.status == 303
        assert "Signed in as <strong>Ada</strong>" in await (await client.get("/admin")).text()
        assert not any(t.done() for t in pending)
        held.released.set()
        assert await asyncio.gather(*pending) == [401] * 17
    assert client.app[METRICS].refused.get("sign_in") == 20
    assert len(auth_log(caplog)) == 1 and "guess-" not in caplog.text


async def test_the_sign_in_form_is_refused_when_it_is_too_large(client: Client) -> None:
    resp = await client.post("/admin/sign-in", data={"token": "x" * 10_000}, allow_redirects=False)
    assert resp.status == 413
    assert client.app[GUARD].throttle.addresses == {}


async def test_session_cookie_attributes(make_client: ClientFactory) -> None:
    for public_url, secure in (("http://bridge.example.test", False), ("https://bridge.example.test", True)):
        client = await make_client(BRIDGE_PUBLIC_URL=public_url)
        resp = await client.post("/admin/sign-in", data={"token": TOKEN}, allow_redirects=False)
        cookie = resp.cookies[COOKIE]
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/admin"
        assert int(cookie["max-age"]) == 8 * 3600
        assert bool(cookie["secure"]) is secure


def test_sessions_expire_and_a_new_token_signs_everyone_out() -> None:
    now = [1_000_000.0]
    signer = SessionSigner(TOKEN, now=lambda: now[0])
    value, session = signer.issue("Ada")
    assert signer.verify(value) == session
    assert SessionSigner(TOKEN + "-rotated").verify(value) is None
    assert signer.verify(value[:-2] + "AA") is None
    body, mac = value.split(".")
    assert signer.verify(body[:-1] + ("A" if body[-1] != "A" else "B") + "." + mac) is None
    now[0] += 8 * 3600 + 1
    assert signer.verify(value) is None
    # The CSRF token belongs to one session only.
    other = signer.issue("Ada")[1]
    assert signer.csrf(session) != signer.csrf(other)


def test_sign_in_goes_back_only_inside_the_admin_ui() -> None:
    assert safe_next("/admin/calls?before=x") == "/admin/calls?before=x"
    for bad in (
        "//evil.example/admin",
        "https://evil.example/admin",
        "/\\evil.example",
        "/twilio/voice",
        None,
    ):
        assert safe_next(bad) == "/admin"


def cookie_of(client: Client) -> str:
    return client.session.cookie_jar.filter_cookies(client.make_url("/admin"))[COOKIE].value


async def test_sign_out_revokes_the_session(client: Client) -> None:
    csrf = await sign_in(client)
    cookie = cookie_of(client)
    resp = await client.post("/admin/sign-out", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/admin/sign-in"
    assert "You are signed out." in await (await client.get("/admin/sign-in")).text()
    client.session.cookie_jar.update_cookies({COOKIE: cookie})  # a copy of the old cookie
    assert (await client.get("/admin", allow_redirects=False)).status == 303
    # A correctly signed cookie is not enough either: the session must be in the store.
    value, _ = client.app[GUARD].signer.issue("Eve")
    client.session.cookie_jar.update_cookies({COOKIE: value})
    assert (await client.get("/admin", allow_redirects=False)).status == 303


async def test_sessions_and_sign_out_survive_a_restart(make_client: ClientFactory) -> None:
    first = await make_client()
    csrf = await sign_in(first, "Ada")
    signed_out = cookie_of(first)
    assert (await first.post("/admin/sign-out", data={"csrf": csrf}, allow_redirects=False)).status == 303
    await sign_in(first, "Grace")
    kept = cookie_of(first)
    await first.close()

    restarted = await make_client()  # a new app on the same database file
    jar = restarted.session.cookie_jar
    jar.update_cookies({COOKIE: signed_out})
    assert (await restarted.get("/admin", allow_redirects=False)).status == 303
    jar.update_cookies({COOKIE: kept})
    assert "Signed in as <strong>Grace</strong>" in await (await restarted.get("/admin")).text()


async def test_sign_out_on_one_instance_holds_on_every_other(make_client: ClientFactory) -> None:
    one, two = await make_client(), await make_client()  # two instances sharing the database
    csrf = await sign_in(one, "Ada")
    cookie = cookie_of(one)
    two.session.cookie_jar.update_cookies({COOKIE: cookie})
    assert (await two.get("/admin", allow_redirects=False)).status == 200
    assert (await one.post("/admin/sign-out", data={"csrf": csrf}, allow_redirects=False)).status == 303
    assert (await two.get("/admin", allow_redirects=False)).status == 303
    assert (await two.get("/admin/api/profiles")).status == 401


async def test_sessions_fail_closed_when_the_store_fails(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    csrf = await sign_in(client)
    store = store_of(client)

    async def broken(*args: Any) -> Any:
        raise StoreError("database is locked")

    monkeypatch.setattr(store, "admin_session", broken)
    resp = await client.get("/admin", allow_redirects=False)
    assert resp.status == 503 and "session store is unavailable" in await resp.text()
    resp = await client.get("/admin/api/profiles")
    assert resp.status == 503 and (await resp.json())["error"] == "unavailable"
    assert "sessions cannot be checked: database is locked" in caplog.text
    # The bearer token does not depend on sessions.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get("/admin/api/profiles", headers=auth)).status == 200
    monkeypatch.undo()

    monkeypatch.setattr(store, "revoke_admin_session", broken)
    resp = await client.post("/admin/sign-out", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 503 and "You are not signed out yet" in await resp.text()
    monkeypatch.undo()

    monkeypatch.setattr(store, "add_admin_session", broken)
    client.session.cookie_jar.clear()
    resp = await client.post("/admin/sign-in", data={"token": TOKEN}, allow_redirects=False)
    assert resp.status == 503 and "Signing in is unavailable" in await resp.text()
    assert COOKIE not in resp.cookies
    assert "the session could not be stored: database is locked" in caplog.text


async def test_pages_carry_security_headers(client: Client) -> None:
    await sign_in(client)
    resp = await client.get("/admin")
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-store"


# -- CSRF


async def test_forms_need_the_csrf_token_and_this_origin(client: Client) -> None:
    csrf = await sign_in(client)
    form = form_of(Profile(name="Sales"))
    for extra in ({}, {"csrf": "forged"}):
        resp = await client.post("/admin/profiles/new", data=form | extra, allow_redirects=False)
        assert resp.status == 403
    resp = await client.post(
        "/admin/profiles/new", data=form | {"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert resp.status == 403
    assert [s.latest.profile.name for s in await store_of(client).list_profiles()] == ["default"]
    resp = await client.post(
        "/admin/profiles/new", data=form | {"csrf": csrf}, headers={"Origin": "http://bridge.example.test"},
        allow_redirects=False,
    )  # fmt: skip
    assert resp.status == 303
    # Sign-in itself refuses a cross-site post (login CSRF).
    resp = await client.post(
        "/admin/sign-in", data={"token": TOKEN}, headers={"Referer": "https://evil.example/x"}
    )
    assert resp.status == 403


async def test_api_writes_with_the_cookie_need_the_csrf_header(client: Client) -> None:
    csrf = await sign_in(client)
    body = {"name": "Support"}
    resp = await client.post("/admin/api/profiles", json=body)
    assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
    resp = await client.post("/admin/api/profiles", json=body, headers={"X-CSRF-Token": "nope"})
    assert resp.status == 403
    resp = await client.post("/admin/api/profiles", json=body, headers={"X-CSRF-Token": csrf})
    assert resp.status == 201
    data = await resp.json()
    assert data["name"] == "Support" and data["version"] == 1 and data["author"] == "Ada"
    assert data["is_default"] is False  # the seeded first profile is the default


async def test_the_test_call_socket_needs_a_session_and_this_origin(client: Client) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/admin/test-call?profile=1")
    assert refused.value.status == 401
    csrf = await sign_in(client)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(
            f"/admin/test-call?profile=1&csrf={csrf}", headers={"Origin": "https://evil.example"}
        )
    assert refused.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"/admin/test-call?profile=1&csrf={csrf}")  # no Origin: not a browser page
    assert refused.value.status == 403


ORIGIN = {"Origin": "http://bridge.example.test"}


def start_message(stream_sid: str, call_sid: str) -> dict[str, Any]:
    """Twilio's ``start``, as the test call page sends it (with a CallSid of its choosing)."""
    return {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": stream_sid,
        "start": {
            "streamSid": stream_sid,
            "callSid": call_sid,
            "accountSid": "AC" + "2" * 32,
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }


@pytest.mark.timeout(60)
async def test_a_test_call_gets_its_own_call_sid_and_cannot_touch_a_real_call(start_bridge: Any) -> None:
    # A bridge on a real port: aiohttp's TestServer cancels a handler when its client goes, which would
    # cut the call's teardown (and its record) short.
    bridge = await start_bridge(None, BRIDGE_ADMIN_TOKEN=TOKEN)
    store: Store = bridge.app[STORE]
    real = "CA" + "7" * 32
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    await store.add_call(call(real, start, from_number="+15551230001", transcript=(("caller", "Real."),)))
    before = await store.call(real)

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        signed_in = await http.post(bridge.url + "/admin/sign-in", data={"token": TOKEN, "next": "/admin"})
        match = re.search(r'name="csrf" value="([^"]+)"', await signed_in.text())
        assert match is not None
        url = bridge.url.replace("http", "ws", 1) + f"/admin/test-call?profile=1&csrf={match.group(1)}"
        async with http.ws_connect(url, headers={"Origin": bridge.url}) as ws:
            first = await ws.receive_json()
            assert first["event"] == "call" and re.fullmatch(r"test-[0-9a-f]{32}", first["callSid"])
            sid = first["callSid"]
            stream = "MZ" + "0" * 32
            await ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            await ws.send_json(start_message(stream, real))  # the page says it is the real call
            async with asyncio.timeout(10):
                while (await ws.receive_json())["event"] != "media":
                    pass  # the call runs: the greeting comes back
            await ws.send_json({"event": "stop", "sequenceNumber": "2", "streamSid": stream, "stop": {}})
            async with asyncio.timeout(10):
                async for _ in ws:
                    pass  # the bridge ends the call and closes the socket

    async def final_record() -> CallRecord | None:
        try:
            record = await store.call(sid)
        except NotFound:
            return None
        return record if record.end_reason else None  # written in full when the call has ended

    async with asyncio.timeout(10):
        while (record := await final_record()) is None:
            await asyncio.sleep(0.05)
    assert record.test_call and record.profile_id == 1
    assert await store.call(real) == before  # untouched
    assert sorted(r.call_sid for r in await store.calls()) == sorted([real, sid])


@pytest.mark.timeout(60)
async def test_a_staff_member_has_at_most_two_test_calls_at_once(client: Client) -> None:
    assert TEST_CALLS_PER_USER == 2
    csrf = await sign_in(client, "Ada")
    url = f"/admin/test-call?profile=1&csrf={csrf}"
    calls = [await client.ws_connect(url, headers=ORIGIN) for _ in range(TEST_CALLS_PER_USER)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(url, headers=ORIGIN)
    assert refused.value.status == 429
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    resp = await client.get(url, headers=ORIGIN | upgrade)
    assert resp.status == 429 and (await resp.json())["error"] == "too_many_test_calls"

    # Someone else may still place theirs.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        signed_in = await other.post(
            client.make_url("/admin/sign-in"), data={"token": TOKEN, "name": "Grace", "next": "/admin"}
        )
        match = re.search(r'name="csrf" value="([^"]+)"', await signed_in.text())
        assert match is not None
        theirs = await other.ws_connect(
            client.make_url(f"/admin/test-call?profile=1&csrf={match.group(1)}"), headers=ORIGIN
        )
        await theirs.close()

    # When one of Ada's calls ends, she may place another.
    slots = client.app[SLOTS]
    await calls.pop().close()
    await wait_until(lambda: slots.live["Ada"] == TEST_CALLS_PER_USER - 1)
    calls.append(await client.ws_connect(url, headers=ORIGIN))
    for ws in calls:
        await ws.close()
    await wait_until(lambda: not slots.live)


# -- the profile form


async def test_create_profile_with_the_form(client: Client) -> None:
    csrf = await sign_in(client)
    profile = Profile(name="Front desk", voice="sage", numbers=("+14155550100", "+14155550101"))
    resp = await client.post(
        "/admin/profiles/new",
        data=form_of(
            profile,
            comment="first try",
            make_default=True,
            max_call_minutes="5",
            max_call_seconds="30",
            language="EN",
        )
        | {"csrf": csrf},
    )
    assert resp.status == 200  # followed the 303
    page = await resp.text()
    assert "Created Front desk: version 1." in page
    pid = int(resp.url.path.rsplit("/", 1)[1])
    section = f'<section id="test-call" data-profile-id="{pid}" data-csrf="{csrf}"'
    assert section + f' data-ws-url="/admin/test-call?profile={pid}">' in page
    assert '<script src="/admin/static/testcall.js" defer></script>' in page
    default = await store_of(client).default_profile()
    assert default is not None and default.profile_id == pid
    saved = await store_of(client).get(pid)
    assert saved.profile.name == "Front desk" and saved.profile.voice == "sage"
    assert saved.profile.numbers == ("+14155550100", "+14155550101")
    assert saved.profile.max_call_seconds == 330 and saved.profile.language == "en"
    assert saved.author == "Ada" and saved.comment == "first try"
    listing = await (await client.get("/admin")).text()
    assert (
        "Front desk" in listing and "+14155550101" in listing and "sage" in listing and "default" in listing
    )


async def test_invalid_input_is_kept_and_each_field_says_what_is_wrong(client: Client) -> None:
    csrf = await sign_in(client)
    form = form_of(
        Profile(name="Sales"),
        name="",
        threshold="loud",
        numbers="+14155550100\n555-0101",
        language="English",
        max_call_minutes="ten",
        instructions="Be <b>nice</b>",
    )
    resp = await client.post("/admin/profiles/new", data=form | {"csrf": csrf})
    assert resp.status == 422
    page = await resp.text()
    for field in ("name", "threshold", "numbers", "language", "max_call"):
        assert f'id="{field}-error"' in page, field
    assert re.search(r'id="threshold-error">must be a number from 0 to 1<', page)
    assert re.search(r'id="numbers-error">not in E.164 form[^<]*5550101<', page)
    assert 'value="loud"' in page and 'value="English"' in page and 'value="ten"' in page
    assert "+14155550100\n555-0101</textarea>" in page
    assert "Be &lt;b&gt;nice&lt;/b&gt;" in page  # kept, and escaped
    assert 'aria-invalid="true"' in page
    assert len(await store_of(client).list_profiles()) == 1  # only the seeded one


async def test_save_a_new_version(client: Client) -> None:
    csrf = await sign_in(client)
    pid = await create(client, csrf, Profile(name="Sales"))
    form = form_of(Profile(name="Sales", greeting="Hi there!"), comment="friendlier")
    resp = await client.post(f"/admin/profiles/{pid}", data=form | {"csrf": csrf, "expected_version": "1"})
    assert resp.status == 200 and "Saved version 2." in await resp.text()
    latest = await store_of(client).get(pid)
    assert latest.version == 2 and latest.profile.greeting == "Hi there!" and latest.comment == "friendlier"
    # Saving the unchanged form makes no new version.
    resp = await client.post(
        f"/admin/profiles/{pid}", data=form_of(latest.profile) | {"csrf": csrf, "expected_version": "2"}
    )
    assert "Nothing changed" in await resp.text()
    assert (await store_of(client).get(pid)).version == 2


async def test_a_stale_save_keeps_the_input_and_says_who_saved(client: Client) -> None:
    csrf = await sign_in(client)
    pid = await create(client, csrf, Profile(name="Sales"))
    await store_of(client).save(pid, Profile(name="Sales", voice="ash"), expected_version=1, author="Bob")
    mine = form_of(Profile(name="Sales", instructions="My long careful edit."))
    resp = await client.post(f"/admin/profiles/{pid}", data=mine | {"csrf": csrf, "expected_version": "1"})
    assert resp.status == 409
    page = await resp.text()
    assert "Someone saved version 2 while you were editing" in page
    assert f'href="/admin/profiles/{pid}/history#v2"' in page
    assert "My long careful edit.</textarea>" in page
    assert 'name="expected_version" value="2"' in page
    # Saving again after the review goes through.
    resp = await client.post(f"/admin/profiles/{pid}", data=mine | {"csrf": csrf, "expected_version": "2"})
    assert "Saved version 3." in await resp.text()


async def test_a_number_of_another_profile_is_a_field_error(client: Client) -> None:
    csrf = await sign_in(client)
    await create(client, csrf, Profile(name="Sales", numbers=("+14155550100",)))
    form = form_of(Profile(name="Support", numbers=("+14155550100",)))
    resp = await client.post("/admin/profiles/new", data=form | {"csrf": csrf})
    assert resp.status == 422
    page = await resp.text()
    assert re.search(r'id="numbers-error">\+14155550100 is already routed to profile &#39;Sales&#39;<', page)
    resp = await client.post("/admin/profiles/new", data=form_of(Profile(name="Sales")) | {"csrf": csrf})
    assert resp.status == 422 and 'id="name-error"' in await resp.text()


# -- history and rollback


async def test_history_shows_what_changed_and_rollback_restores_it(client: Client) -> None:
    csrf = await sign_in(client)
    first = Profile(name="Sales", instructions="Line one.\nLine two.\nLine three.")
    pid = await create(client, csrf, first)
    second = Profile(name="Sales", instructions="Line one.\nLine 2, changed.\nLine three.", voice="coral")
    form = form_of(second, comment="new wording")
    await client.post(f"/admin/profiles/{pid}", data=form | {"csrf": csrf, "expected_version": "1"})
    page = await (await client.get(f"/admin/profiles/{pid}/history")).text()
    assert "Changed: Instructions, Voice." in page
    assert re.search(r"<del>.*Line two\.</del>", page) and re.search(r"<ins>.*Line 2, changed\.</ins>", page)
    assert re.search(r"<del>.*alloy</del>.*<ins>.*coral</ins>", page, re.S)
    assert "new wording" in page and "First version." in page
    resp = await client.post(
        f"/admin/profiles/{pid}/rollback",
        data={"csrf": csrf, "to_version": "1", "expected_version": "2"},
    )
    page = await resp.text()
    assert "Rolled back: version 3 has the content of version 1." in page
    assert "Rolled back from v1" in page
    latest = await store_of(client).get(pid)
    assert latest.version == 3 and latest.profile == first and latest.rolled_back_from == 1
    # A rollback from a stale page changes nothing.
    resp = await client.post(
        f"/admin/profiles/{pid}/rollback", data={"csrf": csrf, "to_version": "2", "expected_version": "2"}
    )
    assert "Nothing was rolled back: someone saved version 3 meanwhile" in await resp.text()
    assert (await store_of(client).get(pid)).version == 3


# -- calls


def call(sid: str, started: datetime, **kwargs: Any) -> CallRecord:
    return CallRecord(call_sid=sid, started_at=started, ended_at=started + timedelta(seconds=75), **kwargs)


async def test_call_log_and_detail(client: Client) -> None:
    csrf = await sign_in(client)
    pid = await create(client, csrf, Profile(name="Sales"))
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    await store_of(client).add_call(
        call(
            "CAfirst", start, from_number="+15551230001", to_number="+15559870002", profile_id=pid,
            profile_version=1, end_reason="caller hung up", barge_ins=2, test_call=True,
            transcript=(("assistant", "Hello! How can I help?"), ("caller", "Opening <hours>?")),
            truncations=(("item_1", 640),), latency_ms={"turn_p50": 420.0}, upstream_errors=1,
        )
    )  # fmt: skip
    page = await (await client.get("/admin/calls")).text()
    assert "+15551230001" in page and "Sales v1" in page and "1 min 15 s" in page and "test call" in page
    assert "caller hung up" in page and 'href="/admin/calls/CAfirst"' in page
    page = await (await client.get("/admin/calls/CAfirst")).text()
    assert "Opening &lt;hours&gt;?" in page and "Hello! How can I help?" in page
    assert "item_1" in page and "640 ms" in page and "420 ms" in page and "not recorded" in page
    assert (await client.get("/admin/calls/CAnope")).status == 404


async def test_call_detail_shows_the_turn_count_as_a_count(client: Client) -> None:
    await sign_in(client)
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    figures = {"turn_p50": 420.0, "turn_max": 980.4, "turns": 3.0}  # what registry.call_record() writes
    await store_of(client).add_call(call("CAturns", start, latency_ms=figures))
    await store_of(client).add_call(call("CAone", start, latency_ms={**figures, "turns": 1.0}))
    page = await (await client.get("/admin/calls/CAturns")).text()
    assert "420 ms" in page and "980 ms" in page
    assert "3 turns" in page and "3 ms" not in page
    page = await (await client.get("/admin/calls/CAone")).text()
    assert "1 turn<" in page and "1 ms" not in page


def two_sessions(start: datetime) -> tuple[ModelSession, ...]:
    """A call that rolled over once: session 1 for 28 min 30 s, then session 2 to the end."""
    swap = start + timedelta(minutes=28, seconds=30)
    return (
        ModelSession(1, start, swap, began="first", ended="rolled over to session 2", session_id="sess_one"),
        ModelSession(
            2, swap, swap + timedelta(seconds=95), began="rollover", ended="the call ended",
            session_id="sess_two",
        ),
    )  # fmt: skip


@pytest.mark.timeout(60)
async def test_call_detail_lists_the_model_sessions(client: Client) -> None:
    await sign_in(client)
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    store = store_of(client)
    await store.add_call(call("CAtwo", start, sessions=two_sessions(start)))
    await store.add_call(call("CAnone", start + timedelta(minutes=1)))
    single = ModelSession(1, start, start + timedelta(seconds=75), ended="the call ended")
    await store.add_call(call("CAone", start + timedelta(minutes=2), sessions=(single,)))
    dropped = (*two_sessions(start), ModelSession(3, start + timedelta(minutes=31), began="reconnect"))
    await store.add_call(call("CAthree", start + timedelta(minutes=3), sessions=dropped))

    page = await (await client.get("/admin/calls/CAtwo")).text()
    assert '<h2 id="sessions-heading">Model sessions</h2>' in page
    assert "This call used 2 model sessions: 1 rollover." in page
    section = page[page.index('id="sessions-heading"') : page.index('id="transcript-heading"')]
    rows = re.findall(r"<tr>\s*<th scope=\"row\"[^>]*>(\d+)</th>(.*?)</tr>", section, re.S)
    assert [number for number, _ in rows] == ["1", "2"]
    first, second = (cells for _, cells in rows)
    assert "first" in first and "rolled over to session 2" in first and "<code>sess_one</code>" in first
    assert '<time datetime="2025-03-01T12:00:00+00:00">2025-03-01 12:00 UTC</time>' in first
    assert '<time datetime="2025-03-01T12:28:30+00:00">2025-03-01 12:28 UTC</time>' in first
    assert "28 min 30 s" in first
    assert "rollover (planned swap)" in second and "the call ended" in second and "1 min 35 s" in second
    assert "<code>sess_two</code>" in second

    page = await (await client.get("/admin/calls/CAnone")).text()
    assert "Model sessions" not in page and "sessions-heading" not in page and "model session" not in page

    page = await (await client.get("/admin/calls/CAone")).text()
    assert "This call used 1 model session." in page and "rollover" not in page

    page = await (await client.get("/admin/calls/CAthree")).text()
    assert "This call used 3 model sessions: 1 rollover, 1 reconnect." in page
    assert "reconnect (after a drop)" in page
    section = page[page.index('id="sessions-heading"') : page.index('id="transcript-heading"')]
    last = section[section.index('<th scope="row" class="num">3</th>') :]
    assert last.count('<span class="muted">–</span>') == 3  # no end, no duration, no session id yet

    # The list marks the calls that used more than one session.
    page = await (await client.get("/admin/calls")).text()
    marked = {
        sid: re.search(r'<span class="badge sessions" title="([^"]+)">(\d+) model sessions</span>', cell)
        for sid, cell in re.findall(r'<a href="/admin/calls/(\w+)">(.*?)</th>', page, re.S)
    }
    assert len(marked) == 4 and {sid for sid, m in marked.items() if m} == {"CAtwo", "CAthree"}
    two, three = marked["CAtwo"], marked["CAthree"]
    assert two is not None and two.groups() == ("2 model sessions: 1 rollover", "2")
    assert three is not None and three.groups() == ("3 model sessions: 1 rollover, 1 reconnect", "3")


async def test_call_log_pages_by_time(client: Client) -> None:
    await sign_in(client)
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    for i in range(55):
        await store_of(client).add_call(call(f"CA{i:03d}", start + timedelta(minutes=i)))
    page = await (await client.get("/admin/calls")).text()
    assert page.count('href="/admin/calls/CA') == 50 and "CA054" in page and "CA004" not in page
    match = re.search(r'href="(/admin/calls\?before=[^"]+)" rel="next"', page)
    assert match is not None
    older = await (await client.get(match.group(1).replace("&amp;", "&"))).text()
    assert older.count('href="/admin/calls/CA') == 5 and "CA004" in older and 'rel="next"' not in older


async def test_recording_download_timeline_and_traversal(client: Client, tmp_path: Path) -> None:
    await sign_in(client)
    recordings = tmp_path / "recordings"
    shutil.copy(RECORDINGS / "barge-in.jsonl.gz", recordings / "barge-in.jsonl.gz")
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"not": "for staff"}\n')
    (recordings / "link.jsonl").symlink_to(outside)
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    store = store_of(client)
    await store.add_call(call("CArec", start, recording_path=str(recordings / "barge-in.jsonl.gz")))
    await store.add_call(call("CAdots", start, recording_path=str(recordings / ".." / "secret.jsonl")))
    await store.add_call(call("CAabs", start, recording_path=str(outside)))
    await store.add_call(call("CAlink", start, recording_path=str(recordings / "link.jsonl")))
    await store.add_call(call("CAnone", start))

    resp = await client.get("/admin/calls/CArec/recording")
    assert resp.status == 200 and resp.content_type == "application/gzip"
    assert 'filename="barge-in.jsonl.gz"' in resp.headers["Content-Disposition"]
    assert await resp.read() == (RECORDINGS / "barge-in.jsonl.gz").read_bytes()
    page = await (await client.get("/admin/calls/CArec")).text()
    assert '<img src="/admin/calls/CArec/timeline.svg"' in page and "Download the recording" in page
    resp = await client.get("/admin/calls/CArec/timeline.svg")
    assert resp.status == 200 and resp.content_type == "image/svg+xml"
    assert "<svg" in await resp.text()
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")

    for sid in ("CAdots", "CAabs", "CAlink", "CAnone"):
        for what in ("recording", "timeline.svg"):
            resp = await client.get(f"/admin/calls/{sid}/{what}")
            assert resp.status == 404, (sid, what)
            assert "for staff" not in await resp.text()


# -- JSON API


async def test_api_with_the_bearer_token(client: Client) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = await client.get("/admin/api/profiles", headers={"Authorization": "Bearer wrong-token-0000000"})
    assert resp.status == 401
    resp = await client.post("/admin/api/profiles", json={"name": "Sales", "voice": "verse"}, headers=auth)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert resp.headers["Location"] == f"/admin/api/profiles/{created['id']}"
    assert created["author"] == "api" and created["voice"] == "verse"
    assert set(created) >= {"id", "version", "author", "created_at", "comment", "is_default", "instructions"}
    pid = created["id"]

    edited = created | {"greeting": "Welcome!", "expected_version": 1, "comment": "via api"}
    resp = await client.put(f"/admin/api/profiles/{pid}", json=edited, headers=auth)
    assert resp.status == 200
    assert (await resp.json())["version"] == 2

    resp = await client.put(f"/admin/api/profiles/{pid}", json=edited, headers=auth)  # still expects 1
    assert resp.status == 409
    body = await resp.json()
    assert body["error"] == "stale_version" and body["current_version"] == 2
    assert body["current"]["greeting"] == "Welcome!"

    bad = created | {"voice": "robot", "turn_detection": {"threshold": 3}, "expected_version": 2}
    resp = await client.put(f"/admin/api/profiles/{pid}", json=bad, headers=auth)
    assert resp.status == 422
    body = await resp.json()
    assert body["error"] == "invalid"
    assert set(body["problems"]) == {"voice", "turn_detection.threshold"}

    resp = await client.put(f"/admin/api/profiles/{pid}", json={"name": "Sales"}, headers=auth)
    assert resp.status == 422 and "expected_version" in (await resp.json())["problems"]
    resp = await client.put(f"/admin/api/profiles/{pid}", data=b"{nope", headers=auth)
    assert resp.status == 400

    other = await client.post(
        "/admin/api/profiles", json={"name": "Other", "numbers": ["+14155550100"]}, headers=auth
    )
    assert other.status == 201
    resp = await client.post(
        "/admin/api/profiles", json={"name": "Third", "numbers": ["+14155550100"]}, headers=auth
    )
    assert resp.status == 422
    assert (await resp.json())["error"] == "conflict" and "numbers" in (await resp.json())["problems"]

    history = await (await client.get(f"/admin/api/profiles/{pid}/history", headers=auth)).json()
    assert [v["version"] for v in history] == [2, 1]
    resp = await client.post(
        f"/admin/api/profiles/{pid}/rollback", json={"to_version": 1, "expected_version": 2}, headers=auth
    )
    assert resp.status == 200
    rolled = await resp.json()
    assert (
        rolled["version"] == 3
        and rolled["greeting"] == created["greeting"]
        and rolled["rolled_back_from"] == 1
    )

    other_id = (await other.json())["id"]
    resp = await client.post(f"/admin/api/profiles/{other_id}/default", headers=auth)
    assert resp.status == 200 and (await resp.json())["is_default"] is True
    listed = await (await client.get("/admin/api/profiles", headers=auth)).json()
    assert {p["name"]: p["is_default"] for p in listed} == {"Other": True, "Sales": False, "default": False}
    assert (await client.get("/admin/api/profiles/99", headers=auth)).status == 404
    assert (await client.get(f"/admin/api/profiles/{pid}?version=1", headers=auth)).status == 200

    await store_of(client).add_call(
        call("CAapi", datetime(2025, 3, 1, tzinfo=UTC), transcript=(("caller", "hi"),))
    )
    calls = await (await client.get("/admin/api/calls?limit=10", headers=auth)).json()
    assert [c["call_sid"] for c in calls["calls"]] == ["CAapi"] and calls["next_before"] is None
    one = await (await client.get("/admin/api/calls/CAapi", headers=auth)).json()
    assert one["transcript"] == [{"role": "caller", "text": "hi"}] and one["duration_s"] == 75
    assert one["recording"] is None and one["sessions"] == []
    assert (await client.get("/admin/api/calls/CAnope", headers=auth)).status == 404
    # The bearer token opens the API only, not the pages.
    assert (await client.get("/admin", headers=auth, allow_redirects=False)).status == 303


@pytest.mark.timeout(60)
async def test_api_call_includes_its_model_sessions(client: Client) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    sessions = (*two_sessions(start), ModelSession(3, start + timedelta(minutes=31), began="reconnect"))
    await store_of(client).add_call(call("CAsess", start, sessions=sessions))
    await store_of(client).add_call(call("CAplain", start - timedelta(minutes=1)))

    one = await (await client.get("/admin/api/calls/CAsess", headers=auth)).json()
    assert one["sessions"] == [
        {
            "number": 1,
            "began": "first",
            "started_at": "2025-03-01T12:00:00+00:00",
            "ended_at": "2025-03-01T12:28:30+00:00",
            "duration_s": 1710.0,
            "ended": "rolled over to session 2",
            "session_id": "sess_one",
        },
        {
            "number": 2,
            "began": "rollover",
            "started_at": "2025-03-01T12:28:30+00:00",
            "ended_at": "2025-03-01T12:30:05+00:00",
            "duration_s": 95.0,
            "ended": "the call ended",
            "session_id": "sess_two",
        },
        {
            "number": 3,
            "began": "reconnect",
            "started_at": "2025-03-01T12:31:00+00:00",
            "ended_at": None,
            "duration_s": None,
            "ended": "",
            "session_id": "",
        },
    ]
    listed = await (await client.get("/admin/api/calls", headers=auth)).json()
    by_sid = {c["call_sid"]: c["sessions"] for c in listed["calls"]}
    assert by_sid["CAsess"] == one["sessions"] and by_sid["CAplain"] == []


# -- greetings


async def test_greeting_wav_is_served_when_there_is_audio_and_404_otherwise(client: Client) -> None:
    csrf = await sign_in(client)
    pid = await create(client, csrf, Profile(name="Quiet", greeting=""))
    page = await (await client.get(f"/admin/profiles/{pid}")).text()
    assert "has no greeting" in page
    assert (await client.get(f"/admin/profiles/{pid}/versions/1/greeting.wav")).status == 404
    status = await (await client.get(f"/admin/api/profiles/{pid}/versions/1/greeting")).json()
    assert status == {"state": "empty", "message": "", "url": None}

    ulaw = bytes([0xFF, 0x7F, 0x00, 0x80] * 400)
    await store_of(client).set_greeting_audio(pid, 1, ulaw)
    resp = await client.get(f"/admin/profiles/{pid}/versions/1/greeting.wav")
    assert resp.status == 200 and resp.content_type == "audio/wav"
    with wave.open(io.BytesIO(await resp.read())) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 1600)
    page = await (await client.get(f"/admin/profiles/{pid}")).text()
    assert f'<audio controls preload="none" src="/admin/profiles/{pid}/versions/1/greeting.wav">' in page


async def test_saving_renders_the_greeting_in_the_background(client: Client) -> None:
    csrf = await sign_in(client)
    pid = await create(client, csrf, Profile(name="Sales"))
    page = await (await client.get(f"/admin/profiles/{pid}")).text()
    assert 'data-state="rendering"' in page or 'data-state="ready"' in page
    greetings = client.app[GREETINGS]
    async with asyncio.timeout(20):
        while greetings.pending(pid, 1):
            await asyncio.sleep(0.05)
    status = await (await client.get(f"/admin/api/profiles/{pid}/versions/1/greeting")).json()
    assert status["state"] == "ready", status
    resp = await client.get(status["url"])
    assert resp.status == 200 and len(await resp.read()) > 8000  # the local model's tones: over 0.5 s
