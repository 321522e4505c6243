"""The admin UI in a real browser: Debian's Chromium driven by Playwright, against the real bridge app.

The staff journeys are done as a person with no terminal would: sign in, find the profile, edit it, get an
inline error, fix it, listen to the greeting, roll back, place a test call with the microphone (Chromium's
fake one plays tests/fixtures/question.ulaw), hang up and find the call in the log. The bridge runs on a
loopback port with no Azure settings, so the embedded local model answers (greeting tones, then a beep and
the caller's own words).

The browser side of the test call's signal path (G.711 codec, the microphone's decimation filter, gapless
playback and the mark clock) is checked on its own in a blank page, and the test-call socket's
authorisation without a browser at all.

Screenshots of the main pages go to ``tmp_path``, or to ``$BRIDGE_SCREENSHOTS`` (``BRIDGE_SCREENSHOTS=docs``
refreshes the README's ``docs/admin-*.png``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from bridge.admin import testcall
from bridge.app import create_app
from bridge.audio import pcm16_to_ulaw, ulaw_to_pcm16
from bridge.keys import STORE
from bridge.prompts import Profile
from bridge.store import CallRecord
from tests.browser_support import (
    CHROMIUM,
    chromium_args,
    ensure_chromium,
    screenshot_dir,
    write_speech_wav,
)
from tests.conftest import Bridge, fixture_audio

pytestmark = pytest.mark.timeout(60)

ADMIN_TOKEN = "browser-test-admin-token-0123456789"
STAFF = "Dana Staff"
ROUTED = "+14155550123"
TESTCALL_JS = Path(testcall.__file__).parent / "static" / "testcall.js"
VIEWPORT = {"width": 1280, "height": 800}

expect.set_options(timeout=15_000)


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed by scripts/install-browser if missing.

    Without it the browser tests fail rather than skip: a skip would pass a suite that never ran them.
    Leave them out on purpose with ``--ignore tests/test_browser.py``.
    """
    why = ensure_chromium()
    if why is not None:
        pytest.fail(
            f"the browser tests need Chromium: {why} (--ignore tests/test_browser.py to leave them out)"
        )
    return str(CHROMIUM)


def _has_test_call_route(app: web.Application) -> bool:
    return any(
        route.method == "GET" and route.resource is not None and route.resource.canonical == testcall.PATH
        for route in app.router.routes()
    )


@pytest.fixture
async def admin_bridge(start_bridge: Any) -> Bridge:
    """The real bridge with the admin UI open and the embedded local model (no Azure settings).

    Greetings are rendered as in production: the first profile's at start-up, each new version's on save.
    """
    bridge: Bridge = await start_bridge(None, render_greetings=True, BRIDGE_ADMIN_TOKEN=ADMIN_TOKEN)
    return bridge


@pytest.fixture
async def browser(chromium: str, tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A fresh Chromium profile whose microphone plays the test speech (looped)."""
    speech = write_speech_wav(tmp_path / "test-call-speech.wav")
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=chromium,
            headless=True,
            args=chromium_args(speech),
            viewport=VIEWPORT,  # type: ignore[arg-type]
            locale="en-US",
            timezone_id="UTC",
        )
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Callable[[Page, str], Awaitable[None]]:
    folder = screenshot_dir(tmp_path / "screenshots")

    async def shoot(page: Page, name: str) -> None:
        await page.screenshot(path=str(folder / f"admin-{name}.png"))

    return shoot


PAGE_ERRORS: dict[int, list[str]] = {}


async def new_page(context: BrowserContext) -> Page:
    page = context.pages[0] if context.pages else await context.new_page()
    errors = PAGE_ERRORS.setdefault(id(page), [])
    errors.clear()
    page.on("pageerror", lambda exc: errors.append(str(exc)))  # an uncaught exception in a page script
    page.on("dialog", lambda dialog: dialog.accept())  # the rollback's "Save a new version …?"
    return page


def page_errors(page: Page) -> list[str]:
    return PAGE_ERRORS.get(id(page), [])


async def sign_in(
    page: Page, bridge: Bridge, shots: Callable[[Page, str], Awaitable[None]] | None = None
) -> None:
    await page.goto(bridge.url + "/admin")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.get_by_label("Your name").fill(STAFF)
    if shots is not None:
        await shots(page, "sign-in")
    await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Profiles", exact=True)).to_be_visible()
    await expect(page.get_by_text(f"Signed in as {STAFF}")).to_be_visible()


STATS_JS = """() => { const s = window.bridgeTestCall;
    return { state: s.state, error: s.error, capture: s.capture, sampleRate: s.sampleRate,
             framesSent: s.framesSent, mediaReceived: s.mediaReceived, bytesReceived: s.bytesReceived,
             marksReceived: s.marksReceived, marksEchoed: s.marksEchoed, marksPlayed: s.marksPlayed,
             marksFlushed: s.marksFlushed, clears: s.clears, secondsPlayed: s.secondsPlayed,
             segments: s.segments, transcripts: s.transcripts, callSid: s.callSid,
             closeCode: s.closeCode, closeReason: s.closeReason }; }"""


async def call_stats(page: Page) -> dict[str, Any]:
    """The test call's counters (window.bridgeTestCall)."""
    stats: dict[str, Any] = await page.evaluate(STATS_JS)
    return stats


async def wait_for_call(
    page: Page, what: str, condition: Callable[[dict[str, Any]], bool], timeout: float
) -> None:
    """Poll the test call's counters until ``condition`` holds; fail with them if it does not in time."""
    stats: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while not condition(stats := await call_stats(page)):
                await asyncio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"the test call did not get there in {timeout} s: {what}; its counters: {stats}")


async def call_records(bridge: Bridge) -> list[CallRecord]:
    return await bridge.app[STORE].calls()


# -- the staff journeys ---------------------------------------------------------------------------------


async def test_staff_edit_a_profile_listen_to_its_greeting_and_roll_back(
    admin_bridge: Bridge, browser: BrowserContext, shots: Callable[[Page, str], Awaitable[None]]
) -> None:
    store = admin_bridge.app[STORE]
    for name, voice, number in (
        ("Sales line", "coral", "+14155550100"),
        ("After hours", "sage", "+14155550199"),
    ):
        await store.create(
            Profile(
                name=name, voice=voice, greeting=f"Thanks for calling the {name.lower()}.", numbers=(number,)
            ),
            author="Sam Lead",
            comment="set up",
        )
    page = await new_page(browser)
    await sign_in(page, admin_bridge, shots)

    # The list shows the profile seeded at first start, which answers every number no other one lists.
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="default", exact=True))
    await expect(row).to_contain_text("v1")
    await shots(page, "profiles")
    await row.get_by_role("link", name="default", exact=True).click()
    await expect(page.get_by_role("heading", name=re.compile(r"^default"))).to_be_visible()
    await expect(page.get_by_text("Version 1, saved by bridge")).to_be_visible()

    # Edit: a new voice and greeting, and a phone number that is not in E.164 form.
    await page.get_by_label("Voice", exact=True).select_option("cedar")
    greeting = "Thanks for calling the Corner Bakery. How can I help?"
    await page.get_by_label("Greeting", exact=True).fill(greeting)
    await page.get_by_label("Numbers answered with this profile").fill("12345")
    await page.get_by_label("What did you change?").fill("Friendlier greeting, new voice, the shop's number")
    await page.get_by_role("button", name="Save a new version").click()

    problems = page.get_by_role("alert").filter(has_text="This profile was not saved")
    await expect(problems).to_be_visible()
    await expect(problems).to_contain_text("Phone numbers")
    numbers = page.get_by_label("Numbers answered with this profile")
    await expect(numbers).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#numbers-error")).to_contain_text("E.164")
    # Nothing typed is lost.
    await expect(page.get_by_label("Greeting", exact=True)).to_have_value(greeting)
    await expect(page.get_by_label("Voice", exact=True)).to_have_value("cedar")
    await numbers.evaluate("el => el.scrollIntoView({block: 'center'})")
    await shots(page, "profile-error")

    # Fix it and save: version 2.
    await numbers.fill(ROUTED)
    await page.get_by_role("button", name="Save a new version").click()
    await expect(page.get_by_role("status").filter(has_text="Saved version 2.")).to_be_visible()
    await expect(page.get_by_text(f"Version 2, saved by {STAFF}")).to_be_visible()
    await expect(page.get_by_label("Numbers answered with this profile")).to_have_value(ROUTED)
    latest = await admin_bridge.app[STORE].get(1)
    assert (latest.version, latest.profile.voice, latest.profile.numbers) == (2, "cedar", (ROUTED,))

    # Hear the greeting: the local model renders it; the page shows a player once it is ready.
    audio = page.locator("#greeting-status audio")
    await expect(audio).to_be_attached(timeout=30_000)
    duration = await audio.evaluate(
        """el => new Promise((resolve, reject) => {
            el.addEventListener("loadedmetadata", () => resolve(el.duration), { once: true });
            const failed = () => reject(new Error("the greeting does not play"));
            el.addEventListener("error", failed, { once: true });
            el.preload = "auto";
            el.load();
        })"""
    )
    assert duration > 1.0  # the local model's greeting: 1.5 s of tones

    # History: version 2's diff; roll back to version 1, which saves version 3.
    await page.get_by_role("link", name="Version history").click()
    await expect(page.get_by_role("heading", name="History of default")).to_be_visible()
    v2 = page.locator("#v2")
    await expect(v2).to_contain_text("Changed:")
    await expect(v2.locator("ins").filter(has_text="cedar")).to_be_visible()
    await expect(v2.locator("ins").filter(has_text=ROUTED)).to_be_visible()
    await shots(page, "history")
    await page.locator("#v1").get_by_role("button", name="Roll back to this version").click()
    await expect(page.get_by_text("Rolled back: version 3 has the content of version 1.")).to_be_visible()
    await expect(page.locator("#v3")).to_contain_text("Rolled back from v1")
    await expect(page.locator("#v3").get_by_role("heading")).to_contain_text("latest")
    latest = await admin_bridge.app[STORE].get(1)
    assert latest.version == 3
    assert latest.profile.numbers == ()
    assert latest.profile.voice != "cedar"
    assert page_errors(page) == []


async def test_staff_place_a_test_call_and_find_it_in_the_call_log(
    admin_bridge: Bridge, browser: BrowserContext, shots: Callable[[Page, str], Awaitable[None]]
) -> None:
    page = await new_page(browser)
    await sign_in(page, admin_bridge)
    await page.get_by_role("link", name="default", exact=True).first.click()
    section = page.locator("#test-call")
    call_button = section.get_by_role("button", name="Call this profile")
    hang_up = section.get_by_role("button", name="Hang up")
    await expect(call_button).to_be_enabled()
    await expect(hang_up).to_be_disabled()

    await call_button.click()
    await expect(section.get_by_role("status")).to_contain_text("Connected")
    await expect(hang_up).to_be_enabled()
    # The greeting (1.5 s, pre-rendered) plays in full before the caller speaks.
    await wait_for_call(page, "the greeting played", lambda s: s["segments"][:1] >= [1.4], 15)
    # The caller's question is answered: a beep and the caller's own words, more than a second of audio.
    await wait_for_call(
        page, "the answer played", lambda s: len(s["segments"]) >= 2 and s["segments"][1] > 1, 20
    )
    transcript = section.get_by_role("list", name="Transcript")
    await expect(transcript.get_by_role("listitem").filter(has_text="You said").first).to_be_visible()
    await section.scroll_into_view_if_needed()
    await shots(page, "test-call")
    stats = await call_stats(page)
    assert stats["state"] == "live"
    assert stats["capture"] == "worklet"
    assert stats["framesSent"] > 100  # 20 ms frames from the microphone, for several seconds
    assert stats["mediaReceived"] > 0
    assert stats["secondsPlayed"] > 2.5
    assert stats["marksPlayed"] > 0
    assert stats["marksEchoed"] <= stats["marksReceived"]
    assert any(t["role"] == "assistant" and "You said" in t["text"] for t in stats["transcripts"])

    await hang_up.click()
    await expect(section.get_by_role("status")).to_contain_text("You hung up")
    await expect(call_button).to_be_enabled()
    assert await page.evaluate("window.bridgeTestCall.state") == "ended"

    # The call log lists it, marked as a test call (the record is written as the call ends).
    call_sid = stats["callSid"]
    async with asyncio.timeout(10):
        while not any(r.call_sid == call_sid for r in await call_records(admin_bridge)):
            await asyncio.sleep(0.05)
    record = next(r for r in await call_records(admin_bridge) if r.call_sid == call_sid)
    assert record.test_call
    assert (record.profile_id, record.profile_version) == (1, 1)
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Calls").click()
    await expect(page.get_by_role("heading", name="Calls", exact=True)).to_be_visible()
    row = page.get_by_role("row").filter(has_text="test call")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("default v1")
    await shots(page, "calls")
    await row.get_by_role("link").first.click()
    await expect(page.get_by_role("heading", name=f"Call {call_sid}")).to_be_visible()
    await expect(page.get_by_role("heading", name="Transcript")).to_be_visible()
    await shots(page, "call")
    assert page_errors(page) == []


async def test_a_denied_microphone_and_a_refused_call_are_shown_plainly(
    admin_bridge: Bridge, browser: BrowserContext
) -> None:
    page = await new_page(browser)
    await sign_in(page, admin_bridge)
    await page.get_by_role("link", name="default", exact=True).first.click()
    section = page.locator("#test-call")
    call_button = section.get_by_role("button", name="Call this profile")
    # The microphone is refused (the staff member clicked "Block").
    await page.evaluate(
        """() => { navigator.mediaDevices.getUserMedia = () =>
                     Promise.reject(new DOMException("Permission denied", "NotAllowedError")); }"""
    )
    await call_button.click()
    await expect(section.get_by_role("alert")).to_contain_text("Microphone access was denied")
    await expect(call_button).to_be_enabled()
    await page.evaluate("() => { delete navigator.mediaDevices.getUserMedia; }")  # the real one again

    # Signed out in another tab meanwhile: the bridge refuses the call, and the page says so.
    other = await browser.new_page()
    await other.goto(admin_bridge.url + "/admin")
    await other.get_by_role("button", name="Sign out").click()
    await expect(other.get_by_role("heading", name="Sign in")).to_be_visible()
    await other.close()
    await call_button.click()
    await expect(section.get_by_role("alert")).to_contain_text("The bridge refused the test call")
    await expect(call_button).to_be_enabled()
    assert await page.evaluate("window.bridgeTestCall.state") == "failed"
    assert await call_records(admin_bridge) == []


# -- the browser's signal path, in a blank page ------------------------------------------------------------


@pytest.fixture
async def dsp_page(browser: BrowserContext) -> Page:
    page = await new_page(browser)
    await page.set_content("<!doctype html><title>dsp</title>")
    await page.add_script_tag(content=TESTCALL_JS.read_text(encoding="utf-8"))
    return page


async def test_the_browser_codec_is_g711_bit_for_bit(dsp_page: Page) -> None:
    encoded = await dsp_page.evaluate(
        """() => { const d = window.bridgeTestCall.dsp, out = new Array(65536);
            for (let s = -32768; s < 32768; s++) out[s + 32768] = d.linearToUlaw(s);
            return out; }"""
    )
    every_sample = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert bytes(encoded) == pcm16_to_ulaw(every_sample)
    decoded = await dsp_page.evaluate(
        "() => Array.from({ length: 256 }, (_, u) => window.bridgeTestCall.dsp.ulawToLinear(u))"
    )
    assert np.array(decoded, dtype="<i2").tobytes() == ulaw_to_pcm16(bytes(range(256)))


@pytest.mark.parametrize("rate", [48000, 44100])
async def test_the_microphone_is_lowpassed_before_8_khz_so_nothing_aliases(dsp_page: Page, rate: int) -> None:
    levels = await dsp_page.evaluate(
        """([rate, freqs]) => freqs.map((f) => {
            const ds = new window.bridgeTestCall.dsp.Downsampler(rate), n = rate, x = new Float32Array(n);
            for (let i = 0; i < n; i++) x[i] = 0.5 * Math.sin(2 * Math.PI * f * i / rate);
            const out = [];
            const batch = Math.round(rate / 50);
            for (let i = 0; i < n; i += batch) out.push(...ds.push(x.subarray(i, i + batch)));
            const y = out.slice(800, 7200);
            let e = 0; for (const v of y) e += v * v;
            return [out.length, 20 * Math.log10(Math.sqrt(e / y.length) / (0.5 / Math.SQRT2) + 1e-12)];
        })""",
        [rate, [300, 1000, 3000, 3400, 4500, 6000, 12000, 20000]],
    )
    gains = dict(zip([300, 1000, 3000, 3400, 4500, 6000, 12000, 20000], levels, strict=True))
    for _, (count, _db) in gains.items():
        assert abs(count - 8000) < 50  # one second in, one second (less the filter's delay) out
    for f in (300, 1000, 3000):
        assert abs(gains[f][1]) < 0.1, f"{f} Hz: {gains[f][1]:.2f} dB"
    assert gains[3400][1] > -1.0  # the top of the telephone band
    for f in (4500, 6000, 12000, 20000):
        assert gains[f][1] < -60, f"{f} Hz would alias at {gains[f][1]:.1f} dB"


async def test_playback_is_gapless_and_marks_follow_the_audio_clock(dsp_page: Page) -> None:
    # A 1 kHz tone in odd-sized chunks, rendered offline: one clean sine, no clicks at the chunk edges.
    # Marks are checked on the rendering clock (suspend/resume), and a clear stops the rest at once.
    result = await dsp_page.evaluate(
        """async () => {
            const d = window.bridgeTestCall.dsp, rate = 48000;
            const ctx = new OfflineAudioContext(1, rate * 2, rate);
            const echoes = [];
            const player = new d.Player(ctx, ctx.destination, {
                echo: (name, played) => echoes.push([name, played, ctx.currentTime]),
            });
            const tone = new Uint8Array(8000);
            for (let i = 0; i < tone.length; i++) {
                tone[i] = d.linearToUlaw(Math.round(16000 * Math.sin(2 * Math.PI * 1000 * i / 8000)));
            }
            const sizes = [160, 37, 501, 160, 3, 999];
            let at = 0, k = 0;
            while (at < 4000) {
                const n = sizes[k++ % sizes.length];
                player.enqueue(tone.subarray(at, at + n));
                at += n;
            }
            player.mark("half");
            player.enqueue(tone.subarray(at, 8000));
            player.mark("end");
            const start = player.anchor / rate;
            const seen = {};
            for (const t of [0.25, 0.75, 1.1]) {
                ctx.suspend(start + t).then(() => {
                    player.tick();
                    seen[t] = echoes.map((e) => e[0]);
                    ctx.resume();
                });
            }
            const rendered = await ctx.startRendering();
            return { y: Array.from(rendered.getChannelData(0)), anchor: player.anchor, seen, echoes,
                     played: player.secondsPlayed(), segments: player.segments };
        }"""
    )
    y, anchor = np.array(result["y"]), result["anchor"]
    seg = y[anchor + 4800 : anchor + 48000 - 4800]
    t = np.arange(len(seg)) / 48000
    basis = np.stack([np.sin(2 * np.pi * 1000 * t), np.cos(2 * np.pi * 1000 * t)], axis=1)
    fit, *_ = np.linalg.lstsq(basis, seg, rcond=None)
    residual = seg - basis @ fit
    snr = 10 * np.log10(np.mean((basis @ fit) ** 2) / np.mean(residual**2))
    assert abs(np.hypot(*fit) - 16000 / 32768) < 0.01
    assert snr > 40, f"SNR {snr:.1f} dB: the chunks are not joined seamlessly"  # μ-law itself: ~49 dB
    assert result["seen"] == {"0.25": [], "0.75": ["half"], "1.1": ["half", "end"]}
    assert [e[1] for e in result["echoes"]] == [True, True]
    assert result["played"] == pytest.approx(1.0, abs=1e-6)
    assert result["segments"] == [pytest.approx(1.0, abs=1e-6)]
    assert np.abs(y[anchor + 48000 + 100 :]).max() < 1e-3  # silence after the tone

    cleared = await dsp_page.evaluate(
        """async () => {
            const d = window.bridgeTestCall.dsp, rate = 48000;
            const ctx = new OfflineAudioContext(1, rate * 2, rate);
            const echoes = [];
            const echo = (name, played) => echoes.push([name, played]);
            const player = new d.Player(ctx, ctx.destination, { echo });
            const tone = new Uint8Array(8000);
            for (let i = 0; i < tone.length; i++) {
                tone[i] = d.linearToUlaw(Math.round(16000 * Math.sin(2 * Math.PI * 440 * i / 8000)));
            }
            for (let at = 0; at < 8000; at += 160) {
                player.enqueue(tone.subarray(at, at + 160));
                player.mark("m" + at);
            }
            const clearAt = player.anchor / rate + 0.3;
            let before = null;
            ctx.suspend(clearAt).then(() => {
                player.tick();
                before = echoes.length;
                player.clear();
                ctx.resume();
            });
            const rendered = await ctx.startRendering();
            return { y: Array.from(rendered.getChannelData(0)), clearAt, before, echoes,
                     played: player.secondsPlayed() };
        }"""
    )
    y = np.array(cleared["y"])
    after = int(cleared["clearAt"] * 48000) + 256  # the render quantum in which the clear happened
    assert np.abs(y[after:]).max() < 1e-6  # nothing plays after a clear
    echoes = cleared["echoes"]
    assert [name for name, _ in echoes] == [f"m{at}" for at in range(0, 8000, 160)]  # every mark, in order
    played = cleared["before"]
    assert 13 <= played <= 15  # 0.3 s of 20 ms chunks had played
    assert all(p for _, p in echoes[:played]) and not any(p for _, p in echoes[played:])
    assert cleared["played"] == pytest.approx(0.3, abs=0.01)


# -- the test-call socket without a browser ------------------------------------------------------------------


def test_the_app_registers_the_test_call_route(tmp_path: Path) -> None:
    from bridge.config import load_settings

    settings = load_settings(
        {
            "TWILIO_AUTH_TOKEN": "test-twilio-auth-token",
            "BRIDGE_PUBLIC_URL": "http://127.0.0.1:8080",
            "BRIDGE_DATA_DIR": str(tmp_path / "data"),
            "BRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
        }
    )
    assert _has_test_call_route(create_app(settings)), f"route GET {testcall.PATH} to testcall.test_call"


def start_message(stream_sid: str, call_sid: str) -> dict[str, Any]:
    """Twilio's ``start``, as the page sends it."""
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


async def _signed_in(bridge: Bridge) -> tuple[aiohttp.ClientSession, str]:
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # cookies for 127.0.0.1
    async with http.post(
        bridge.url + "/admin/sign-in", data={"token": ADMIN_TOKEN, "name": STAFF, "next": "/admin/profiles/1"}
    ) as resp:
        page = await resp.text()
    match = re.search(r'data-csrf="([^"]+)"', page)
    assert match, "the profile page has the test-call section"
    return http, match.group(1)


async def test_the_test_call_socket_needs_a_session_its_csrf_token_and_this_origin(
    admin_bridge: Bridge,
) -> None:
    base, origin = admin_bridge.url, {"Origin": admin_bridge.url}
    http, csrf = await _signed_in(admin_bridge)
    ws_url = base.replace("http", "ws", 1) + testcall.PATH

    async def refused(url: str, headers: dict[str, str], session: aiohttp.ClientSession = http) -> int:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(url, headers=headers)
        return caught.value.status

    try:
        async with aiohttp.ClientSession() as anonymous:
            assert await refused(f"{ws_url}?profile=1&csrf={csrf}", origin, anonymous) == 401
        assert await refused(f"{ws_url}?profile=1", origin) == 403
        assert await refused(f"{ws_url}?profile=1&csrf=forged", origin) == 403
        assert await refused(f"{ws_url}?profile=1&csrf={csrf}", {"Origin": "https://evil.example"}) == 403
        assert await refused(f"{ws_url}?profile=1&csrf={csrf}", {}) == 403  # a browser always sends Origin
        assert await refused(f"{ws_url}?profile=99&csrf={csrf}", origin) == 404
        assert await refused(f"{ws_url}?profile=x&csrf={csrf}", origin) == 400

        # Accepted: it is a Media Stream like Twilio's, and the greeting comes back as μ-law media.
        async with http.ws_connect(f"{ws_url}?profile=1&csrf={csrf}", headers=origin) as ws:
            chosen = await ws.receive_json()  # the bridge chooses the CallSid, not the page
            assert chosen["event"] == "call" and chosen["callSid"].startswith("test-")
            sid = "MZ" + "0" * 32
            await ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            await ws.send_json(start_message(sid, "CA" + "1" * 32))
            media = 0
            async with asyncio.timeout(10):
                while media < 10:
                    message = await ws.receive_json()
                    assert message["streamSid"] == sid
                    media += message["event"] == "media"
            await ws.send_json({"event": "stop", "sequenceNumber": "2", "streamSid": sid, "stop": {}})
            async with asyncio.timeout(5):
                async for _ in ws:
                    pass  # the bridge ends the call and closes the socket
        async with asyncio.timeout(5):
            while not await call_records(admin_bridge):
                await asyncio.sleep(0.05)
        (record,) = await call_records(admin_bridge)
        assert record.test_call and record.call_sid == chosen["callSid"]
    finally:
        await http.close()


async def test_transcripts_reach_the_test_call_socket(admin_bridge: Bridge) -> None:
    http, csrf = await _signed_in(admin_bridge)
    ws_url = admin_bridge.url.replace("http", "ws", 1) + testcall.PATH + f"?profile=1&csrf={csrf}"
    sid = "MZ" + "3" * 32
    try:
        async with http.ws_connect(ws_url, headers={"Origin": admin_bridge.url}) as ws:
            await ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            await ws.send_json(start_message(sid, "CA" + "4" * 32))
            speech = fixture_audio("hello.ulaw") + b"\xff" * 8000  # then a second of silence ends the turn
            transcripts: list[dict[str, Any]] = []

            async def read() -> None:
                async for msg in ws:
                    message = msg.json()
                    if message["event"] == "transcript":
                        transcripts.append(message)
                        if message["text"].startswith("You said"):
                            return

            reader = asyncio.create_task(read())
            for n, at in enumerate(range(0, len(speech), 160), start=1):
                await ws.send_json(
                    {
                        "event": "media",
                        "sequenceNumber": str(n + 1),
                        "streamSid": sid,
                        "media": {
                            "track": "inbound",
                            "chunk": str(n),
                            "timestamp": str(20 * n),
                            "payload": _b64(speech[at : at + 160]),
                        },
                    }
                )
                await asyncio.sleep(0.02 if n % 5 == 0 else 0)
                if reader.done():
                    break
            async with asyncio.timeout(10):
                await reader
            # The answer's transcript (and the greeting's, when the model spoke it rather than a recording).
            assert set(transcripts[-1]) == {"event", "role", "text"}
            assert transcripts[-1]["role"] == "assistant"
            assert transcripts[-1]["text"].startswith("You said")
    finally:
        await http.close()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")
