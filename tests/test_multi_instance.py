"""Two bridges on one PostgreSQL database, as behind a load balancer with one public URL.

The webhook may reach one instance and the stream another; what one instance learns about a call (the
answer and its token, the stream's claim, how the call ended) and about staff (sign-outs) holds on the
other, because it lives in the store.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from bridge.keys import METRICS, REGISTRY, STORE
from bridge.local_model import LocalModel
from bridge.store import CallStatus
from bridge.testing import TwilioCaller
from tests.conftest import AUTH_TOKEN
from tests.test_hardening import settle
from tests.test_profiles_e2e import post_signed

pytestmark = pytest.mark.timeout(90)

ADMIN_TOKEN = "admin-token-for-tests-0123456789"


async def pair(start_bridge: Any, model: LocalModel, database: str) -> tuple[Any, Any]:
    one = await start_bridge(model, BRIDGE_DATABASE=database, BRIDGE_ADMIN_TOKEN=ADMIN_TOKEN)
    two = await start_bridge(
        model, BRIDGE_DATABASE=database, BRIDGE_ADMIN_TOKEN=ADMIN_TOKEN, BRIDGE_PUBLIC_URL=one.url
    )
    return one, two


async def test_the_webhook_on_one_instance_and_the_stream_on_the_other(
    model: LocalModel, start_bridge: Any, postgres_database: str
) -> None:
    one, two = await pair(start_bridge, model, postgres_database)
    async with TwilioCaller(one.url, auth_token=AUTH_TOKEN) as webhook:
        status, twiml = await webhook.post_voice()  # answered by one
        assert status == 200 and "<Connect" in twiml
    async with TwilioCaller(
        two.url, auth_token=AUTH_TOKEN, public_url=one.url, call_sid=webhook.call_sid
    ) as call:
        call.accept_twiml(twiml)
        await call.connect_stream()  # the stream reaches two, which connects on start
        await call.wait_for_played(0.3)
        # The same stream again, on one: its token was used on two.
        async with TwilioCaller(one.url, auth_token=AUTH_TOKEN, call_sid=call.call_sid) as replay:
            replay.accept_twiml(twiml)
            await replay.connect_stream()
            await replay.wait_closed(timeout=5)
        await call.hang_up()
    await settle(lambda: not two.app[REGISTRY].live)
    _, metrics = await one.get("/metrics")
    assert 'bridge_refused_total{reason="stream_reused"} 1.0' in metrics
    record = await one.app[STORE].call(call.call_sid)  # written by two, read by one
    assert record.status is CallStatus.COMPLETED and record.instance == two.settings.instance_id
    assert not one.app[REGISTRY].live and one.app[METRICS].store_errors.get("call_record") == 0


async def test_how_a_call_ended_on_one_instance_is_told_by_the_other(
    start_bridge: Any, postgres_database: str
) -> None:
    async with LocalModel() as model:
        model.reject_next(status=401, count=10)  # the model refuses: the caller must hear the fallback
        one, two = await pair(start_bridge, model, postgres_database)
        async with TwilioCaller(two.url, auth_token=AUTH_TOKEN, public_url=one.url) as call:
            await call.dial()
            await call.wait_closed(timeout=10)
        await settle(lambda: not two.app[REGISTRY].live)
        status, twiml = await post_signed(one, "/twilio/after-stream", {"CallSid": call.call_sid})
        assert status == 200 and "<Say>Sorry, our assistant is not available right now" in twiml


async def test_a_member_of_staff_signed_out_on_one_instance_is_signed_out_on_the_other(
    model: LocalModel, start_bridge: Any, postgres_database: str
) -> None:
    one, two = await pair(start_bridge, model, postgres_database)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as staff:
        page = await staff.post(one.url + "/admin/sign-in", data={"token": ADMIN_TOKEN, "next": "/admin"})
        match = re.search(r'name="csrf" value="([^"]+)"', await page.text())
        assert match is not None
        cookie = next(c for c in jar if c.key == "bridge_admin")
        headers = {"Cookie": f"bridge_admin={cookie.value}"}
        async with aiohttp.ClientSession() as other:  # the same cookie, sent to the other instance
            async with other.get(two.url + "/admin/api/profiles", headers=headers) as resp:
                assert resp.status == 200
            signed_out = await staff.post(
                one.url + "/admin/sign-out", data={"csrf": match.group(1)}, headers={"Origin": one.url}
            )
            assert signed_out.status == 200
            async with other.get(two.url + "/admin/api/profiles", headers=headers) as resp:
                assert resp.status == 401
