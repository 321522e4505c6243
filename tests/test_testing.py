"""Tests for bridge.testing.TwilioCaller: Twilio's semantics, against a tiny aiohttp bridge stand-in.

The stand-in answers the voice webhook with TwiML built by connect_twiml, checks every signature with
check_signature, and on the stream socket runs a per-test script (send media, marks, clears) while it
records what the double sends. Both run in one loop, so loop times compare directly. Timing is asserted
loosely (about ±40 ms): the machine may be loaded.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridge.config import STREAM_PATH, VOICE_PATH
from bridge.errors import MalformedMessage
from bridge.testing import PlayedMark, TwilioCaller, TwilioCallerError, serve_bridge
from bridge.twilio import (
    PARAM_CALL_SID,
    PARAM_TOKEN,
    Connected,
    Dtmf,
    Media,
    Start,
    Stop,
    TwilioEvent,
    UnknownEvent,
    parse_message,
    serialize_clear,
    serialize_mark,
    serialize_media,
)
from bridge.webhooks import check_signature, connect_twiml, reject_twiml, websocket_signature_urls

AUTH_TOKEN = "f" * 32
PUBLIC_URL = "https://bridge.example.com"
SLACK = 0.04  # timing tolerance on a loaded 2-core machine

Script = Callable[["FakeBridge", web.WebSocketResponse], Coroutine[Any, Any, None]]


class FakeBridge:
    """Just enough of a bridge to drive the double: webhook, signed upgrade, scripted stream."""

    def __init__(self, *, auth_token: str | None, public_url: str | None) -> None:
        self.auth_token = auth_token
        self.public_url = public_url
        self.base_url = ""
        self.voice_answer: Callable[[], web.Response] | None = None
        self.script: Script | None = None
        self.voice_forms: list[dict[str, str]] = []
        self.voice_signatures: list[str | None] = []
        self.stream_signatures: list[str | None] = []
        self.stream_raw_header_names: list[bytes] = []
        self.signatures_ok: list[bool] = []
        self.received: list[tuple[float, str | bytes]] = []
        self.events: list[TwilioEvent] = []
        self.start: Start | None = None
        self.changed = asyncio.Event()
        self.ws: web.WebSocketResponse | None = None

    @property
    def public(self) -> str:
        return self.public_url or self.base_url

    @property
    def stream_url(self) -> str:
        scheme, rest = self.public.split("://", 1)
        return ("wss" if scheme == "https" else "ws") + "://" + rest + STREAM_PATH

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(VOICE_PATH, self.voice)
        app.router.add_get(STREAM_PATH, self.stream)
        return app

    async def voice(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        signature = request.headers.get("X-Twilio-Signature")
        self.voice_forms.append(form)
        self.voice_signatures.append(signature)
        if self.auth_token is not None:
            ok = check_signature(self.auth_token, self.public + VOICE_PATH, form, signature)
            self.signatures_ok.append(ok)
            if not ok:
                raise web.HTTPForbidden()
        if self.voice_answer is not None:
            return self.voice_answer()
        params = {PARAM_CALL_SID: form["CallSid"], PARAM_TOKEN: "tok-" + form["CallSid"]}
        return web.Response(text=connect_twiml(self.stream_url, params), content_type="text/xml")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        signature = request.headers.get("X-Twilio-Signature")
        self.stream_signatures.append(signature)
        self.stream_raw_header_names.extend(name for name, _ in request.raw_headers)
        if self.auth_token is not None:
            ok = any(
                check_signature(self.auth_token, url, {}, signature)
                for url in websocket_signature_urls(self.stream_url)
            )
            self.signatures_ok.append(ok)
            if not ok:
                raise web.HTTPForbidden()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        loop = asyncio.get_running_loop()
        script_task: asyncio.Task[None] | None = None
        try:
            async for msg in ws:
                data: str | bytes = msg.data if msg.type == aiohttp.WSMsgType.TEXT else bytes(msg.data)
                self.received.append((loop.time(), data))
                try:
                    event = parse_message(data)
                except MalformedMessage:
                    pass
                else:
                    self.events.append(event)
                    if isinstance(event, Start):
                        self.start = event
                        if self.script is not None:
                            script_task = asyncio.create_task(self.script(self, ws))
                self.changed.set()
                self.changed = asyncio.Event()
        finally:
            if script_task is not None:
                script_task.cancel()
                await asyncio.gather(script_task, return_exceptions=True)
        return ws

    async def wait_for(self, done: Callable[[], bool], limit: float = 5) -> None:
        async with asyncio.timeout(limit):
            while not done():
                await self.changed.wait()

    def mark_echoes(self) -> list[tuple[float, dict[str, Any]]]:
        echoes = []
        for at, data in self.received:
            if isinstance(data, str):
                message = orjson.loads(data)
                if message.get("event") == "mark":
                    echoes.append((at, message))
        return echoes

    async def send(self, text: str) -> float:
        """Send from the script; return the loop time it went out."""
        assert self.ws is not None
        await self.ws.send_str(text)
        return asyncio.get_running_loop().time()

    def sid(self) -> str:
        assert self.start is not None
        return self.start.stream_sid


async def _serve(fake: FakeBridge) -> AsyncIterator[FakeBridge]:
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.base_url = f"http://{host}:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def bridge() -> AsyncIterator[FakeBridge]:
    async for fake in _serve(FakeBridge(auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)):
        yield fake


@pytest.fixture
async def insecure_bridge() -> AsyncIterator[FakeBridge]:
    async for fake in _serve(FakeBridge(auth_token=None, public_url=None)):
        yield fake


def caller_for(fake: FakeBridge, **kwargs: Any) -> TwilioCaller:
    return TwilioCaller(fake.base_url, auth_token=fake.auth_token, public_url=fake.public_url, **kwargs)


def tone(n: int, seed: int = 0) -> bytes:
    """Distinct, non-silent μ-law bytes, so that played audio can be compared with what was sent."""
    return bytes((seed + i) % 127 for i in range(n))


# --- dialling and signatures -----------------------------------------------------------------------------


async def test_dial_signs_webhook_and_upgrade_and_starts_the_stream(bridge: FakeBridge) -> None:
    async with caller_for(bridge, extra_form={"CallerCountry": "US"}) as caller:
        await caller.dial()
        await bridge.wait_for(lambda: bridge.start is not None)

    assert bridge.signatures_ok == [True, True]
    assert bridge.stream_signatures[0] is not None
    assert b"x-twilio-signature" in bridge.stream_raw_header_names  # lowercase, as Twilio sends it
    [form] = bridge.voice_forms
    assert form == {
        "CallSid": caller.call_sid,
        "AccountSid": caller.account_sid,
        "From": "+15551230001",
        "To": "+15559870002",
        "Direction": "inbound",
        "CallStatus": "ringing",
        "ApiVersion": "2010-04-01",
        "CallerCountry": "US",
    }
    # The TwiML as read, and the stream signed over its public wss:// URL while dialling 127.0.0.1.
    assert caller.stream_url == "wss://bridge.example.com/twilio/stream"
    assert caller.parameters == {PARAM_CALL_SID: caller.call_sid, PARAM_TOKEN: "tok-" + caller.call_sid}
    assert caller.twiml is not None and "<Connect><Stream" in caller.twiml

    connected, start = bridge.events[:2]
    assert connected == Connected("Call", "1.0.0")
    assert isinstance(start, Start)
    assert start.stream_sid == caller.stream_sid
    assert start.stream_sid.startswith("MZ") and len(start.stream_sid) == 34
    assert (start.account_sid, start.call_sid) == (caller.account_sid, caller.call_sid)
    assert dict(start.custom_parameters) == caller.parameters
    assert start.tracks == ("inbound",)
    assert (start.encoding, start.sample_rate, start.channels, start.sequence_number) == (
        "audio/x-mulaw",
        8000,
        1,
        1,
    )
    raw_start = orjson.loads(bridge.received[1][1])
    assert raw_start["sequenceNumber"] == "1"
    assert "sequenceNumber" not in orjson.loads(bridge.received[0][1])
    assert caller.violations == []


async def test_insecure_bridge_gets_no_signatures(insecure_bridge: FakeBridge) -> None:
    async with caller_for(insecure_bridge) as caller:
        await caller.dial()
        await insecure_bridge.wait_for(lambda: insecure_bridge.start is not None)
    assert insecure_bridge.voice_signatures == [None]
    assert insecure_bridge.stream_signatures == [None]
    assert caller.stream_url == insecure_bridge.base_url.replace("http://", "ws://") + STREAM_PATH


@pytest.mark.parametrize("signature", ["bogus", None])
async def test_bad_or_missing_upgrade_signature_is_refused(bridge: FakeBridge, signature: str | None) -> None:
    async with caller_for(bridge) as caller:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await caller.connect_stream(signature=signature)
    assert info.value.status == 403
    assert bridge.signatures_ok == [False]


async def test_connect_stream_without_dial_signs_the_default_url(bridge: FakeBridge) -> None:
    async with caller_for(bridge) as caller:
        await caller.connect_stream(parameters={"token": "forged"})
        await bridge.wait_for(lambda: bridge.start is not None)
    assert caller.stream_url == "wss://bridge.example.com/twilio/stream"
    assert bridge.signatures_ok == [True]
    assert bridge.start is not None
    assert dict(bridge.start.custom_parameters) == {"token": "forged"}


async def test_dial_refuses_an_answer_without_connect_stream(bridge: FakeBridge) -> None:
    bridge.voice_answer = lambda: web.Response(text=reject_twiml("We are closing."), content_type="text/xml")
    async with caller_for(bridge) as caller:
        with pytest.raises(TwilioCallerError, match=r"no <Response><Connect><Stream>"):
            await caller.dial()
        assert await caller.post_voice() == (200, reject_twiml("We are closing."))


async def test_dial_refuses_an_error_status(bridge: FakeBridge) -> None:
    bridge.voice_answer = lambda: web.Response(status=503, text="draining")
    async with caller_for(bridge) as caller:
        with pytest.raises(TwilioCallerError, match="503"):
            await caller.dial()
    assert caller.voice_status == 503


async def test_dial_refuses_wrong_content_type_and_query_string(bridge: FakeBridge) -> None:
    bridge.voice_answer = lambda: web.Response(text="<Response/>", content_type="text/plain")
    async with caller_for(bridge) as caller:
        with pytest.raises(TwilioCallerError, match="Content-Type"):
            await caller.dial()
    twiml = (
        '<Response><Connect><Stream url="wss://bridge.example.com/twilio/stream?t=1"/></Connect></Response>'
    )
    bridge.voice_answer = lambda: web.Response(text=twiml, content_type="text/xml")
    async with caller_for(bridge) as caller:
        with pytest.raises(TwilioCallerError, match="query string"):
            await caller.dial()


async def test_wrong_auth_token_is_refused_by_the_webhook(bridge: FakeBridge) -> None:
    async with TwilioCaller(bridge.base_url, auth_token="0" * 32, public_url=PUBLIC_URL) as caller:
        with pytest.raises(TwilioCallerError, match="403"):
            await caller.dial()


# --- what the caller sends -------------------------------------------------------------------------------


async def test_speak_paces_frames_in_real_time(bridge: FakeBridge) -> None:
    audio = tone(20 * 160 - 40)  # the last frame is padded with silence
    async with caller_for(bridge, first_timestamp_ms=10) as caller:
        await caller.dial()
        await caller.speak(audio)
        await caller.speak(tone(320, seed=5))  # continues the grid, the chunks and the timestamps
        await bridge.wait_for(lambda: sum(isinstance(e, Media) for e in bridge.events) == 22)

    media = [e for e in bridge.events if isinstance(e, Media)]
    times = [at for at, data in bridge.received if isinstance(data, str) and '"media"' in data]
    assert [m.chunk for m in media] == list(range(1, 23))
    first = media[0].timestamp
    assert 10 <= first <= 10 + 40
    assert [m.timestamp for m in media] == [first + 20 * i for i in range(22)]
    assert all(len(m.payload) == 160 for m in media)
    assert b"".join(m.payload for m in media[:20]) == audio + b"\xff" * 40
    assert times[21] - times[0] == pytest.approx(21 * 0.020, abs=SLACK)
    assert times[10] - times[0] == pytest.approx(10 * 0.020, abs=0.1)  # a loaded machine may stall a tick
    numbers = [e.sequence_number for e in bridge.events[1:] if not isinstance(e, (Connected, UnknownEvent))]
    assert numbers == list(range(1, len(numbers) + 1))
    raw = orjson.loads(next(d for _, d in bridge.received if isinstance(d, str) and '"media"' in d))
    assert isinstance(raw["media"]["chunk"], str) and isinstance(raw["media"]["timestamp"], str)


async def test_speak_not_realtime_sends_at_once(bridge: FakeBridge) -> None:
    async with caller_for(bridge) as caller:
        await caller.dial()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await caller.speak(tone(160 * 50), realtime=False)
        assert loop.time() - started < 0.5
        await caller.silence(0.06)
        await bridge.wait_for(lambda: sum(isinstance(e, Media) for e in bridge.events) == 53)
    media = [e for e in bridge.events if isinstance(e, Media)]
    assert [m.timestamp - media[0].timestamp for m in media] == [20 * i for i in range(53)]
    assert media[-1].payload == b"\xff" * 160


async def test_dtmf_stop_and_raw_frames(bridge: FakeBridge) -> None:
    async with caller_for(bridge) as caller:
        await caller.dial()
        await caller.send_dtmf("7")
        await caller.send_raw(b"\x00\x01")
        await caller.send_raw('{"event":"custom","streamSid":"x"}')
        await caller.hang_up()
        assert caller.closed.is_set()
        assert caller.close_code == 1000
        with pytest.raises(TwilioCallerError, match="closed"):
            await caller.send_dtmf("1")
    dtmf = next(e for e in bridge.events if isinstance(e, Dtmf))
    assert (dtmf.digit, dtmf.track, dtmf.stream_sid) == ("7", "inbound_track", caller.stream_sid)
    stop = next(e for e in bridge.events if isinstance(e, Stop))
    assert (stop.call_sid, stop.account_sid) == (caller.call_sid, caller.account_sid)
    assert stop.sequence_number == dtmf.sequence_number + 1  # raw frames carry no number
    assert (b"\x00\x01") in [d for _, d in bridge.received]


# --- playback: Twilio's semantics ------------------------------------------------------------------------


async def test_mark_echo_follows_playback(bridge: FakeBridge) -> None:
    sent: dict[str, float] = {}

    async def script(fake: FakeBridge, ws: web.WebSocketResponse) -> None:
        for i in range(10):  # 200 ms of audio in 20 ms frames, sent at once, as the bridge does
            await fake.send(serialize_media(fake.sid(), tone(160, seed=i)))
        sent["m200"] = await fake.send(serialize_mark(fake.sid(), "m200"))

    bridge.script = script
    async with caller_for(bridge) as caller:
        await caller.dial()
        await bridge.wait_for(lambda: len(bridge.mark_echoes()) == 1)
        assert caller.heard_seconds() == pytest.approx(0.2, abs=0.01)

    [(echo_at, echo)] = bridge.mark_echoes()
    assert echo_at - sent["m200"] == pytest.approx(0.200, abs=SLACK)
    assert echo["mark"] == {"name": "m200"}
    assert echo["streamSid"] == caller.stream_sid
    assert set(echo) == {"event", "sequenceNumber", "streamSid", "mark"}
    [mark] = caller.marks
    assert (mark.name, mark.played) == ("m200", True)
    assert mark.at == pytest.approx(echo_at, abs=SLACK)
    assert bytes(caller.played) == b"".join(tone(160, seed=i) for i in range(10))
    assert len(caller.received_media) == 10
    assert caller.violations == []


async def test_mark_on_an_empty_buffer_echoes_at_once(bridge: FakeBridge) -> None:
    sent: dict[str, float] = {}

    async def script(fake: FakeBridge, ws: web.WebSocketResponse) -> None:
        sent["first"] = await fake.send(serialize_mark(fake.sid(), "first"))

    bridge.script = script
    async with caller_for(bridge) as caller:
        await caller.dial()
        await bridge.wait_for(lambda: len(bridge.mark_echoes()) == 1)
    [(echo_at, _)] = bridge.mark_echoes()
    assert echo_at - sent["first"] < SLACK
    assert caller.marks == [PlayedMark("first", True, caller.marks[0].at)]


async def test_marks_echo_in_order_as_playback_reaches_each(bridge: FakeBridge) -> None:
    sent: dict[str, float] = {}

    async def script(fake: FakeBridge, ws: web.WebSocketResponse) -> None:
        await fake.send(serialize_media(fake.sid(), tone(800, seed=1)))  # 100 ms
        await fake.send(serialize_mark(fake.sid(), "a"))
        await fake.send(serialize_mark(fake.sid(), "a2"))  # same point: echoed together
        await fake.send(serialize_media(fake.sid(), tone(1600, seed=2)))  # 200 ms
        sent["b"] = await fake.send(serialize_mark(fake.sid(), "b"))

    bridge.script = script
    async with caller_for(bridge) as caller:
        await caller.dial()
        await bridge.wait_for(lambda: len(bridge.mark_echoes()) == 3)
    echoes = bridge.mark_echoes()
    assert [m["mark"]["name"] for _, m in echoes] == ["a", "a2", "b"]
    assert echoes[2][0] - sent["b"] == pytest.approx(0.300, abs=SLACK)
    assert echoes[0][0] - sent["b"] == pytest.approx(0.100, abs=SLACK)
    assert bytes(caller.played) == tone(800, seed=1) + tone(1600, seed=2)
    numbers = [int(m["sequenceNumber"]) for _, m in echoes]
    assert numbers == [numbers[0], numbers[0] + 1, numbers[0] + 2]


async def test_clear_flushes_audio_and_echoes_pending_marks_as_not_played(bridge: FakeBridge) -> None:
    sent: dict[str, float] = {}
    audio = tone(4000, seed=3) + tone(4000, seed=9)  # 2 x 500 ms

    async def script(fake: FakeBridge, ws: web.WebSocketResponse) -> None:
        await fake.send(serialize_media(fake.sid(), audio[:4000]))
        await fake.send(serialize_mark(fake.sid(), "half"))
        await fake.send(serialize_media(fake.sid(), audio[4000:]))
        sent["start"] = await fake.send(serialize_mark(fake.sid(), "end"))
        await asyncio.sleep(0.2)
        sent["clear"] = await fake.send(serialize_clear(fake.sid()))

    bridge.script = script
    async with caller_for(bridge) as caller:
        await caller.dial()
        cleared_at = await caller.wait_for_clear()
        await bridge.wait_for(lambda: len(bridge.mark_echoes()) == 2)
        heard = len(caller.played)
        assert caller.buffered_seconds() == 0
        # Nothing plays after a clear, however long playback runs on (no waiting: the FIFO is empty).
        assert caller.playback.advance(asyncio.get_running_loop().time() + 60) == []
        assert len(caller.played) == heard

    assert cleared_at == pytest.approx(sent["clear"], abs=SLACK)
    assert caller.clears == [cleared_at]
    echoes = bridge.mark_echoes()
    assert [m["mark"]["name"] for _, m in echoes] == ["half", "end"]
    assert all(at - sent["clear"] < SLACK for at, _ in echoes)  # echoed at once, not when "played"
    assert [(m.name, m.played) for m in caller.marks] == [("half", False), ("end", False)]
    played = bytes(caller.played)
    assert len(played) == pytest.approx((sent["clear"] - sent["start"]) * 8000, abs=SLACK * 8000)
    assert played == audio[: len(played)]  # a prefix: flushed audio is never played


async def test_playback_resumes_fresh_after_a_clear(bridge: FakeBridge) -> None:
    sent: dict[str, float] = {}

    async def script(fake: FakeBridge, ws: web.WebSocketResponse) -> None:
        await fake.send(serialize_media(fake.sid(), tone(8000)))
        await asyncio.sleep(0.1)
        await fake.send(serialize_clear(fake.sid()))
        await asyncio.sleep(0.1)  # idle time must not count as playback
        await fake.send(serialize_media(fake.sid(), tone(800, seed=50)))
        sent["m"] = await fake.send(serialize_mark(fake.sid(), "after"))

    bridge.script = script
    async with caller_for(bridge) as caller:
        await caller.dial()
        await bridge.wait_for(lambda: len(bridge.mark_echoes()) == 1)
    [(echo_at, _)] = bridge.mark_echoes()
    assert echo_at - sent["m"] == pytest.approx(0.100, abs=SLACK)
    assert caller.marks[0].played
    assert bytes(caller.played).endswith(tone(800, seed=50))


async def test_wait_for_played(bridge: FakeBridge) -> None:
    async def script(fake: FakeBridge, ws: web.WebSocketResponse) -> None:
        await fake.send(serialize_media(fake.sid(), tone(2400)))  # 300 ms

    bridge.script = script
    async with caller_for(bridge) as caller:
        await caller.dial()
        await caller.wait_for_media()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await caller.wait_for_played(0.3)
        assert loop.time() - started == pytest.approx(0.3, abs=SLACK)
        assert caller.heard_seconds() == pytest.approx(0.3)
        with pytest.raises(TimeoutError, match=r"0\.5 s of audio played"):
            await caller.wait_for_played(0.5, timeout=0.1)
        with pytest.raises(TimeoutError):
            await caller.wait_for_clear(timeout=0.05)


# --- Twilio's checks on what the bridge sends ------------------------------------------------------------


async def test_violations_are_recorded_and_the_call_goes_on(bridge: FakeBridge) -> None:
    async def script(fake: FakeBridge, ws: web.WebSocketResponse) -> None:
        sid = fake.sid()
        await ws.send_bytes(b"\xff" * 160)
        await fake.send("not json")
        await fake.send("[1]")
        await fake.send(serialize_media("MZ" + "0" * 32, b"\xff"))
        for bad in (
            {"event": "mark", "streamSid": sid, "mark": {"name": "x"}, "n": 1},
            {"event": "play", "streamSid": sid},
            {"event": "clear"},
            {"event": "media", "streamSid": sid, "media": {"payload": "@@"}},
            {"event": "mark", "streamSid": sid, "mark": {"name": 5}},
            {"event": "media", "streamSid": sid, "media": {"payload": "AA==", "track": "x"}},
        ):
            await fake.send(orjson.dumps(bad).decode())
        await fake.send(serialize_mark(sid, "still-alive"))

    bridge.script = script
    async with caller_for(bridge) as caller:
        await caller.dial()
        await bridge.wait_for(lambda: len(bridge.mark_echoes()) == 1)
        assert not caller.closed.is_set()
    v = caller.violations
    assert len(v) == 10, v
    assert "binary frame" in v[0] and "31950" in v[0]
    assert "not JSON" in v[1]
    assert "not a JSON object" in v[2]
    assert "streamSid" in v[3]
    assert "unknown fields ['n']" in v[4]
    assert "'play'" in v[5]
    assert "missing fields ['streamSid']" in v[6]
    assert "base64" in v[7]
    assert "mark" in v[8]
    assert "media" in v[9]
    assert caller.received_media == []  # refused messages are not played
    assert [m.name for m in caller.marks] == ["still-alive"]


# --- lifetime --------------------------------------------------------------------------------------------


async def test_bridge_closing_the_stream_is_seen_and_stops_playback(bridge: FakeBridge) -> None:
    async def script(fake: FakeBridge, ws: web.WebSocketResponse) -> None:
        await fake.send(serialize_media(fake.sid(), tone(8000)))
        await asyncio.sleep(0.1)
        await ws.close(code=4000, message=b"bye")

    bridge.script = script
    async with caller_for(bridge) as caller:
        await caller.dial()
        await caller.wait_closed()
        assert caller.close_code == 4000
        with pytest.raises(TwilioCallerError, match="closed"):
            await caller.wait_for_played(0.5)
        heard = len(caller.played)
        # Playback stopped with the socket: once its task is over (awaited, not slept on), nothing plays.
        players = [t for t in asyncio.all_tasks() if t.get_name().startswith("twilio-caller-play")]
        if players:  # a task still finishing its cancellation; a finished one has left all_tasks()
            await asyncio.wait(players)
        assert len(caller.played) == heard
        await caller.speak(tone(160))  # returns quietly: the stream is gone
    assert heard == pytest.approx(800, abs=SLACK * 8000)


async def test_close_is_idempotent_and_leaves_no_task(bridge: FakeBridge) -> None:
    before = asyncio.all_tasks()
    caller = caller_for(bridge)
    await caller.dial()
    await bridge.wait_for(lambda: bridge.start is not None)
    await caller.close()
    await caller.close()
    assert caller.closed.is_set()
    leftover = {t for t in asyncio.all_tasks() - before if t.get_name().startswith("twilio-caller")}
    assert leftover == set()
    with pytest.raises(TwilioCallerError):
        await caller.dial()
    with pytest.raises(TwilioCallerError):
        await caller.speak(b"\xff")


async def test_using_the_stream_before_connecting_is_an_error() -> None:
    caller = TwilioCaller("http://127.0.0.1:9", auth_token=None)
    with pytest.raises(TwilioCallerError, match="not connected"):
        await caller.speak(b"\xff")
    await caller.close()


# --- serve_bridge ----------------------------------------------------------------------------------------


async def test_serve_bridge_serves_on_a_free_loopback_port_and_frees_it(tmp_path: Any) -> None:
    env = {"TWILIO_AUTH_TOKEN": AUTH_TOKEN, "BRIDGE_DATA_DIR": str(tmp_path)}
    async with serve_bridge(env) as served:
        assert served.url == f"http://127.0.0.1:{served.port}"
        assert served.settings.public_url == served.url  # filled in: the port is known once bound
        assert await served.get("/healthz") == (200, "ok\n")
        async with TwilioCaller(served.url, auth_token=AUTH_TOKEN) as caller:
            status, body = await caller.post_voice()  # signed over the public URL it chose
            assert status == 200, body
            caller.accept_twiml(body)
        assert caller.stream_url == served.url.replace("http://", "ws://") + STREAM_PATH
    with socket.socket() as sock:  # the port is free again: it can be bound
        sock.bind(("127.0.0.1", served.port))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(served.url + "/healthz")
