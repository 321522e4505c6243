"""Tests for bridge.webhooks: TwiML answers, request signatures and one-time stream tokens."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from twilio.request_validator import RequestValidator

from bridge.errors import AuthenticationFailed, LocalError
from bridge.twilio import PARAM_CALL_SID, PARAM_FROM, PARAM_TO, PARAM_TOKEN
from bridge.webhooks import (
    TokenLedger,
    check_signature,
    connect_twiml,
    make_stream_token,
    reject_twiml,
    verify_stream_token,
    websocket_signature_urls,
)

ACCOUNT_SID = "AC25e16e9a716a4a1786a7c83f58e30482"
CALL_SID = "CA6d85d7d9aa3e3e0f8e3f3a1f1e9e5c7b"


# --- TwiML -----------------------------------------------------------------------------------------------


def test_connect_twiml() -> None:
    params = {
        PARAM_CALL_SID: CALL_SID,
        PARAM_FROM: "+15551230001",
        PARAM_TO: "+15559870002",
        PARAM_TOKEN: "t&<",
    }
    xml = connect_twiml("wss://bridge.example.com/twilio/stream", params)
    root = ET.fromstring(xml)
    assert root.tag == "Response"
    [connect] = list(root)
    assert connect.tag == "Connect"
    assert connect.attrib == {}  # no action: the call ends when the bridge closes the socket
    [stream] = list(connect)
    assert stream.tag == "Stream"
    assert stream.attrib == {"url": "wss://bridge.example.com/twilio/stream"}
    assert "?" not in stream.attrib["url"]
    assert {p.attrib["name"]: p.attrib["value"] for p in stream} == params
    assert all(p.tag == "Parameter" for p in stream)


def test_connect_twiml_status_callback() -> None:
    xml = connect_twiml(
        "wss://b.example/twilio/stream", {}, status_callback="https://b.example/twilio/status"
    )
    stream = ET.fromstring(xml).find("./Connect/Stream")
    assert stream is not None
    assert stream.attrib["statusCallback"] == "https://b.example/twilio/status"


@pytest.mark.parametrize(
    "url",
    ["wss://b.example/twilio/stream?token=x", "https://b.example/twilio/stream", "/twilio/stream", "wss://"],
)
def test_connect_twiml_refuses_bad_stream_urls(url: str) -> None:
    with pytest.raises(LocalError):
        connect_twiml(url, {})


def test_connect_twiml_refuses_oversized_parameter() -> None:
    with pytest.raises(LocalError, match="too long"):
        connect_twiml("wss://b.example/s", {"token": "x" * 500})


def test_reject_twiml() -> None:
    root = ET.fromstring(reject_twiml("We are busy & sorry. Goodbye."))
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root[0].text == "We are busy & sorry. Goodbye."


# --- signatures ------------------------------------------------------------------------------------------

TOKEN = "12345678901234567890123456789012"
URL = "https://bridge.example.com/twilio/voice"
FORM = {"CallSid": CALL_SID, "AccountSid": ACCOUNT_SID, "From": "+15551230001", "To": "+15559870002"}


def test_check_signature_valid() -> None:
    signature = RequestValidator(TOKEN).compute_signature(URL, FORM)
    assert check_signature(TOKEN, URL, FORM, signature)


def test_check_signature_tampered_param() -> None:
    signature = RequestValidator(TOKEN).compute_signature(URL, FORM)
    assert not check_signature(TOKEN, URL, {**FORM, "To": "+15550000000"}, signature)
    assert not check_signature(TOKEN, URL, {**FORM, "Extra": "1"}, signature)


def test_check_signature_wrong_url_or_token() -> None:
    signature = RequestValidator(TOKEN).compute_signature(URL, FORM)
    assert not check_signature(TOKEN, "https://evil.example.com/twilio/voice", FORM, signature)
    assert not check_signature(TOKEN, URL + "?x=1", FORM, signature)
    assert not check_signature("0" * 32, URL, FORM, signature)
    assert not check_signature("", URL, FORM, RequestValidator("").compute_signature(URL, FORM))


def test_check_signature_missing() -> None:
    assert not check_signature(TOKEN, URL, FORM, None)
    assert not check_signature(TOKEN, URL, FORM, "")


def test_check_signature_tolerates_explicit_default_port() -> None:
    signature = RequestValidator(TOKEN).compute_signature("https://bridge.example.com:443/twilio/voice", FORM)
    assert check_signature(TOKEN, URL, FORM, signature)


def test_websocket_signature_urls() -> None:
    assert websocket_signature_urls("wss://b.example/twilio/stream") == (
        "wss://b.example/twilio/stream",
        "https://b.example/twilio/stream",
    )
    assert websocket_signature_urls("ws://127.0.0.1:8080/twilio/stream") == (
        "ws://127.0.0.1:8080/twilio/stream",
        "http://127.0.0.1:8080/twilio/stream",
    )
    assert websocket_signature_urls("odd") == ("odd",)


def test_websocket_upgrade_signature_over_either_form() -> None:
    stream_url = "wss://b.example/twilio/stream"
    for signed in (stream_url, "https://b.example/twilio/stream"):
        signature = RequestValidator(TOKEN).compute_signature(signed, {})
        assert any(check_signature(TOKEN, u, {}, signature) for u in websocket_signature_urls(stream_url))
    signature = RequestValidator(TOKEN).compute_signature("wss://other.example/twilio/stream", {})
    assert not any(check_signature(TOKEN, u, {}, signature) for u in websocket_signature_urls(stream_url))


# --- stream tokens ---------------------------------------------------------------------------------------

SECRET = b"s" * 32


def test_token_round_trip() -> None:
    token = make_stream_token(SECRET, CALL_SID, now=1000.0, ttl=30.0)
    expiry, nonce, mac = token.split(".")
    assert expiry == "1030"
    assert len(nonce) >= 16
    assert len(mac) == 43
    assert verify_stream_token(SECRET, CALL_SID, token, now=1000.0) == (nonce, 1030.0)
    assert verify_stream_token(SECRET, CALL_SID, token, now=1029.9) == (nonce, 1030.0)


def test_tokens_are_unique() -> None:
    tokens = {make_stream_token(SECRET, CALL_SID, now=0.0, ttl=30.0) for _ in range(50)}
    assert len(tokens) == 50


def test_token_expired() -> None:
    token = make_stream_token(SECRET, CALL_SID, now=1000.0, ttl=30.0)
    with pytest.raises(AuthenticationFailed, match=r"^stream token expired$"):
        verify_stream_token(SECRET, CALL_SID, token, now=1030.0)


def test_token_for_another_call() -> None:
    token = make_stream_token(SECRET, CALL_SID, now=1000.0, ttl=30.0)
    with pytest.raises(AuthenticationFailed, match="for another call"):
        verify_stream_token(SECRET, "CA" + "0" * 32, token, now=1000.0)


def test_token_other_secret() -> None:
    token = make_stream_token(SECRET, CALL_SID, now=1000.0, ttl=30.0)
    with pytest.raises(AuthenticationFailed):
        verify_stream_token(b"t" * 32, CALL_SID, token, now=1000.0)


def test_token_tampered() -> None:
    token = make_stream_token(SECRET, CALL_SID, now=1000.0, ttl=30.0)
    expiry, nonce, mac = token.split(".")
    extended = f"{int(expiry) + 3600}.{nonce}.{mac}"
    other_nonce = f"{expiry}.{'A' * len(nonce)}.{mac}"
    flipped = f"{expiry}.{nonce}.{mac[:-2]}{'A' if mac[-2] != 'A' else 'B'}{mac[-1]}"
    for bad in (extended, other_nonce, flipped):
        with pytest.raises(AuthenticationFailed, match="altered"):
            verify_stream_token(SECRET, CALL_SID, bad, now=1000.0)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "1030.nonce",
        "1030.nonce.mac.extra",
        "soon.nonce." + "A" * 43,
        "-1.nonce." + "A" * 43,
        "1030..AAAA" + "A" * 39,
        "1030.no nce." + "A" * 43,
        "1030.nonce." + "A" * 42,
        "1030.nonce." + "A" * 42 + "=",
        "1030.nonce." + "A" * 42 + "é",
        "1" * 300,
    ],
)
def test_token_malformed(token: str) -> None:
    with pytest.raises(AuthenticationFailed, match=r"^stream token malformed$"):
        verify_stream_token(SECRET, CALL_SID, token, now=1000.0)


def test_token_needs_a_secret() -> None:
    with pytest.raises(LocalError):
        make_stream_token(b"", CALL_SID, now=0.0, ttl=30.0)
    with pytest.raises(LocalError):
        make_stream_token(SECRET, CALL_SID, now=0.0, ttl=0.0)
    with pytest.raises(LocalError):
        verify_stream_token(b"", CALL_SID, "x", now=0.0)


def test_ledger_accepts_each_token_once() -> None:
    ledger = TokenLedger()
    token = make_stream_token(SECRET, CALL_SID, now=1000.0, ttl=30.0)
    nonce, expiry = verify_stream_token(SECRET, CALL_SID, token, now=1001.0)
    assert ledger.use(nonce, expiry, now=1001.0)
    nonce_again, _ = verify_stream_token(SECRET, CALL_SID, token, now=1002.0)
    assert not ledger.use(nonce_again, expiry, now=1002.0)


def test_ledger_prunes_expired_entries() -> None:
    ledger = TokenLedger()
    assert ledger.use("a", 10.0, now=0.0)
    assert ledger.use("b", 20.0, now=0.0)
    assert ledger.use("c", 30.0, now=0.0)
    assert len(ledger) == 3
    assert not ledger.use("a", 10.0, now=9.0)  # still remembered
    assert ledger.use("d", 40.0, now=20.0)  # prunes a and b (expiry <= now)
    assert len(ledger) == 2
    assert not ledger.use("c", 30.0, now=20.0)


def test_ledger_refuses_expired_nonce_so_pruning_cannot_revive_it() -> None:
    ledger = TokenLedger()
    assert ledger.use("a", 10.0, now=0.0)
    assert not ledger.use("a", 10.0, now=11.0)  # pruned, but expired: still refused
    assert not ledger.use("fresh-but-expired", 5.0, now=6.0)
    assert len(ledger) == 0
