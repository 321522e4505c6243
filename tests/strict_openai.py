"""Strict validation of Realtime events against the openai SDK's own types (docs/protocols.md §3).

pydantic's default validation of those unions is lax (it tries every member, allows extra keys and
coerces strings to numbers), so: dispatch on ``type``, validate that one class strictly, and require
every ``model_extra`` to be empty.
"""

from __future__ import annotations

import typing
from typing import Any

from openai.types import realtime as ga
from openai.types.beta import realtime as preview
from pydantic import BaseModel


def _table(union: Any) -> dict[str, type[BaseModel]]:
    inner = typing.get_args(union)[0] if typing.get_origin(union) is typing.Annotated else union
    table: dict[str, type[BaseModel]] = {}
    for cls in typing.get_args(inner):
        (literal,) = typing.get_args(cls.model_fields["type"].annotation)
        table[literal] = cls
    return table


TABLES = {
    ("ga", "client"): _table(ga.RealtimeClientEvent),
    ("ga", "server"): _table(ga.RealtimeServerEvent),
    ("preview", "client"): _table(preview.RealtimeClientEvent),
    ("preview", "server"): _table(preview.RealtimeServerEvent),
}


def _extras(model: Any, path: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(model, BaseModel):
        for key in model.model_extra or {}:
            found.append(f"{path}.{key}")
        for name in type(model).model_fields:
            found += _extras(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, list):
        for i, item in enumerate(model):
            found += _extras(item, f"{path}[{i}]")
    return found


def validate(dialect: str, side: str, event: dict[str, Any]) -> BaseModel:
    """Validate one event strictly; raise AssertionError naming what is wrong."""
    table = TABLES[(dialect, side)]
    cls = table.get(event.get("type", ""))
    assert cls is not None, f"{event.get('type')!r} is not a {dialect} {side} event"
    model = cls.model_validate(event, strict=True)
    extras = _extras(model)
    assert not extras, f"unknown fields in {dialect} {event['type']}: {extras}"
    return model
