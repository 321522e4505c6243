"""Rendering admin pages: the Jinja environment (autoescaped) and the page helper every view uses.

Templates live in ``bridge/admin/templates`` and are loaded through the package (``PackageLoader``), so
they are found the same way from a source checkout and from an installed wheel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web

from bridge.admin.auth import GUARD, csrf_token, current_user, take_flash

TEMPLATES = web.AppKey("bridge_admin_templates", jinja2.Environment)


def make_environment() -> jinja2.Environment:
    """The template environment: autoescaping on for everything, undefined names are errors."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bridge.admin", "templates"),
        autoescape=True,  # every template is HTML; nothing reaches a page unescaped by accident
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["iso"] = iso
    env.filters["seconds"] = seconds
    env.filters["zip_pairs"] = zip_pairs
    return env


def when(value: datetime | None) -> str:
    """A timestamp for people: ``2025-01-31 14:05 UTC``."""
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M UTC")


def iso(value: datetime | None) -> str:
    """A timestamp for machines (``<time datetime>``, JSON)."""
    return value.isoformat() if value is not None else ""


def seconds(value: float) -> str:
    """A duration for people: ``42 s``, ``3 min 05 s``."""
    total = round(value)
    if total < 60:
        return f"{total} s"
    return f"{total // 60} min {total % 60:02d} s"


def zip_pairs(values: Iterable[Any]) -> list[tuple[Any, Any]]:
    """``[a, b]`` → ``[(a, a), (b, b)]``: choices whose value is also what is shown."""
    return [(v, v) for v in values]


def page(
    request: web.Request, template: str, context: Mapping[str, Any], *, status: int = 200, title: str = ""
) -> web.Response:
    """Render ``template`` as a full page: nav, the signed-in user, their CSRF token, a pending flash."""
    response = web.Response(status=status, content_type="text/html", charset="utf-8")
    flash = take_flash(request, response) if GUARD in request.app else None
    html = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            {
                "title": title,
                "user": current_user(request),
                "csrf": csrf_token(request),
                "flash": flash,
                "path": request.path,
                **context,
            }
        )
    )
    response.text = html
    return response
