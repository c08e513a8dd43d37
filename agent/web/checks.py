"""Request checks shared by every route that takes a body: one copy of each.

JSON parsing (one object, no duplicate keys, no NaN, bounded depth, no control
characters in strings), the JSON content types, and the Idempotency-Key header.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request

from agent.web.problems import ApiProblem, shown

# Deeper JSON than any POS sends; bounds the recursion of every later encoder.
MAX_JSON_DEPTH = 32


IDEMPOTENCY_KEY_MAX = 200


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or an ApiProblem naming what is wrong."""
    if not raw.strip():
        raise ApiProblem(400, 'body: empty; send a JSON object {"data": {...}}', "body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiProblem(400, f"body: not UTF-8 (byte {exc.start})", "body") from None
    duplicated = False

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicated
        value = dict(pairs)
        if len(value) == len(pairs):
            return value
        duplicated = True
        return _object(pairs)

    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as exc:
        raise ApiProblem(400, f"body: not valid JSON: {exc.msg} at line {exc.lineno} column "
                              f"{exc.colno}", "body") from None
    except RecursionError:
        raise ApiProblem(400, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                         "body") from None
    except ValueError as exc:  # NaN/Infinity, an out-of-range number, a 5000-digit integer
        raise ApiProblem(400, f"body: not valid JSON: {exc}", "body") from None
    if not isinstance(value, dict):
        raise ApiProblem(422, f'body: must be a JSON object {{"data": {{...}}}}, not '
                              f"{_json_type(value)}", "body")
    if duplicated or _may_hold_bad_values(text):
        problem = _check_values(value)
        if problem:
            raise ApiProblem(422, f"{problem[0]}: {problem[1]}", problem[0])
    return value


def _may_hold_bad_values(text: str) -> bool:
    """Whether :func:`_check_values` could find anything in a body parsed from ``text``
    (without a repeated key): the walk is only paid for when it can.

    Text decoded strictly from UTF-8 holds no surrogate, and json refuses a raw
    control character, so a NUL or an unpaired surrogate can only come from a
    ``\\u`` escape; and values nest at most one level deeper than the text has
    ``{`` and ``[`` (counted inside strings too: more, never fewer).
    """
    return "\\u" in text or text.count("{") + text.count("[") >= MAX_JSON_DEPTH


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _bad_text(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (\\ud800-\\udfff)"
    return None


class _Duplicated(dict[str, Any]):
    """An object that had a key twice (json keeps the last one silently); refused."""

    duplicate = ""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a plain dict, or a :class:`_Duplicated` naming the repeated key.

    A key sent twice is ambiguous (which total does the POS mean?) and a classic way
    to smuggle a value past one parser and into another: refused, naming the key.
    """
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    marked = _Duplicated(value)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.duplicate = key
            break
        seen.add(key)
    return marked


def _check_values(root: dict[str, Any]) -> tuple[str, str] | None:
    """The first value no later encoder or HQ database can take: too deep, bad text, a
    key given twice.

    Iterative, so a hostile body cannot exhaust the stack here either.
    """
    stack: list[tuple[str, Any, int]] = [("", root, 1)]
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return path or "body", f"nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(value, _Duplicated):
            where = f"{path}.{value.duplicate}" if path else value.duplicate
            return where[:200], "given more than once in one object; send each key once"
        if isinstance(value, dict):
            for key, item in value.items():
                sub = f"{path}.{key}" if path else key
                bad = _bad_text(key)
                if bad:
                    return path or "body", f"a key {bad}"
                stack.append((sub, item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item, depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            bad = _bad_text(value)
            if bad:
                return path, bad
    return None


def content_type_is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                            and media.endswith("+json"))


def idempotency_key(request: Request) -> str | None:
    values = request.headers.getlist("idempotency-key")
    if not values:
        return None
    message = f"must be 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters"
    if len(values) > 1:
        message = "send it once"
    else:
        key = values[0]
        if (0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.strip() == key
                and all(" " <= c <= "~" for c in key)):
            return key
    raise ApiProblem(400, f"Idempotency-Key: {message}", "Idempotency-Key")


async def json_body(request: Request) -> dict[str, Any]:
    """The request's body as one JSON object, checked as every route with a body checks it:
    415 unless it is declared JSON (``application/json`` or ``application/*+json``)."""
    if not content_type_is_json(request):
        got = request.headers.get("content-type")
        raise ApiProblem(415, "Content-Type: must be application/json"
                              + (f", not {shown(got)}" if got else " (missing)"),
                         "Content-Type", reason="unsupported_media_type")
    return parse_json_object(await request.body())

