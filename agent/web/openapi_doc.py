"""The OpenAPI document of the site API, made to say every answer a route can give.

FastAPI documents what each route declares; what the layers around every route
answer is added here once, from the same rules those layers follow
(agent/web/api.py), so a route cannot forget them:

- 400 on every route: a ``Host`` that is not one of the box's names, a
  malformed ``Content-Length``;
- 401 on every route with the bearer scheme, 403 on its unsafe methods (a
  session cookie from another origin);
- 413, 415 and 422 (and 400 for a body that is not JSON) where there is a body;
- 404 where a path parameter names something that may not exist;
- every error as the one error shape (``ErrorBody``), FastAPI's own
  ``HTTPValidationError`` included, since our handler renders those too.

It also adds one concrete path per event kind (``POST /v1/events/sale``...)
with that kind's own body, beside ``/v1/events/{kind}`` whose ``kind`` is the
enum of CONTRACT 4's kinds: a body schema cannot depend on a path parameter.
"""

from __future__ import annotations

import copy
from typing import Any

from agent.kinds import KINDS

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
UNSAFE = frozenset({"post", "put", "patch", "delete"})
# The payload model of each kind as posted over the API (agent/pipeline/schemas.py); None:
# the kind cannot be posted (403).
KIND_MODELS: dict[str, str | None] = {
    "sale": "Sale", "plant": "Plant", "alarm": "Alarm", "scan": "PostedScan",
    "sensor": "PostedReading", "print": None, "device": None,
}
GENERIC = {
    400: "bad request: a Host that is not one of the box's names, a malformed "
         "Content-Length, or a body that is not JSON",
    401: "no token, or an unknown one (send Authorization: Bearer <token>)",
    403: "a session cookie sent from another origin's page",
    404: "no such thing (named by the path)",
    413: "body over the 1 MiB limit, refused before it is parsed",
    415: "Content-Type is not application/json",
    422: "the body or a parameter does not fit; field names where",
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


# Text the API takes (agent/web/api.py parse_json_object): no NUL. (Nor unpaired
# surrogates, which UTF-8 JSON text cannot carry anyway; a pattern for them is not
# portable across regex engines.)
CLEAN_TEXT = "^[^\\x00]*$"
# What service routes check that their declarations do not say (yet): (path, method,
# JSON pointer into the request body schema or "param:NAME") -> schema keys to add.
CHECKED_BUT_UNDECLARED: dict[tuple[str, str, str], dict[str, Any]] = {
    ("/v1/catalog", "get", "param:tag"): {"pattern": "^[A-Z0-9]{24}$"},
    ("/v1/print/label", "post", "/properties/net_weight"): {"exclusiveMinimum": 0},
    ("/v1/print/label/preview", "post", "/properties/net_weight"): {"exclusiveMinimum": 0},
    # A label printer's max_copies (default 50) bounds copies below the model's 500.
    ("/v1/print/label", "post", "/properties/copies"): {"maximum": 50},
    ("/v1/print/label/preview", "post", "/properties/copies"): {"maximum": 50},
}


# Answers service routes give that their declarations do not list (yet).
ANSWERED_BUT_UNDECLARED: dict[tuple[str, str], dict[int, str]] = {
    ("/v1/print/receipt", "post"): {202: "sent to a printer that cannot confirm (file://)"},
    ("/v1/print/label", "post"): {202: "sent to a printer that cannot confirm (file://)"},
}


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    """Add the generic answers and the per-kind event paths to ``doc`` (in place)."""
    paths: dict[str, Any] = doc.get("paths", {})
    for (path, method, where), extra in CHECKED_BUT_UNDECLARED.items():
        _declare(paths.get(path, {}).get(method), where, extra)
    for (path, method), answers in ANSWERED_BUT_UNDECLARED.items():
        op = paths.get(path, {}).get(method)
        if op is not None:
            for status, description in answers.items():
                op["responses"].setdefault(str(status), {"description": description})
    events = paths.get("/v1/events/{kind}", {}).get("post")
    if events is not None:
        for param in events.get("parameters", []):
            if param.get("name") == "kind" and param.get("in") == "path":
                param["schema"] = {"type": "string", "enum": list(KINDS), "title": "Kind"}
        events["responses"].setdefault("403", _error(
            "print and device events come only from the agent's own devices"))
        for kind, model in KIND_MODELS.items():
            paths[f"/v1/events/{kind}"] = {"post": _kind_operation(events, kind, model)}
    for ops in paths.values():
        for method, op in ops.items():
            if isinstance(op, dict) and "responses" in op:
                _add_generic(method, op)
    _clean_requests(doc)
    doc.setdefault("components", {}).setdefault("schemas", {})["JsonValue"] = JSON_VALUE
    doc.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    doc.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    return doc


def _kind_operation(events: dict[str, Any], kind: str, model: str | None) -> dict[str, Any]:
    op = copy.deepcopy(events)
    op["operationId"] = f"post_{kind}_event"
    op["summary"] = f"Post a {kind} event" + ("" if model else " (refused: 403)")
    op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "kind"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    body["properties"]["data"] = {"$ref": f"#/components/schemas/{model}"} if model else {
        "type": "object", "description": f"{kind} events cannot be posted"}
    if model is None:
        op["responses"] = {k: v for k, v in op["responses"].items()
                           if k in ("400", "401", "403", "413", "415", "422")}
    return op


def _add_generic(method: str, op: dict[str, Any]) -> None:
    responses: dict[str, Any] = op["responses"]
    codes = [400]
    if op.get("security"):
        codes.append(401)
        if method in UNSAFE:
            codes.append(403)
    if "requestBody" in op:
        codes += [413, 415, 422]
    params = op.get("parameters", [])
    if any(p.get("in") == "path" for p in params):
        codes.append(404)
    if params:
        codes.append(422)
    for code in codes:
        responses.setdefault(str(code), _error(GENERIC[code]))
    for status, response in responses.items():
        content = response.get("content", {}).get("application/json")
        if status.startswith(("4", "5")) and content is not None:
            schema = content.get("schema", {})
            if schema.get("$ref", "").endswith(("/HTTPValidationError", "/ValidationError")) \
                    or not schema:
                content["schema"] = ERROR_REF


# Any JSON value the API takes inside a payload's extra fields.
JSON_VALUE: dict[str, Any] = {"anyOf": [
    {"type": "string", "pattern": CLEAN_TEXT}, {"type": "number"}, {"type": "boolean"},
    {"type": "null"},
    {"type": "array", "maxItems": 8, "items": {"$ref": "#/components/schemas/JsonValue"}},
    {"type": "object", "maxProperties": 8, "propertyNames": {"pattern": CLEAN_TEXT},
     "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}},
], "description": "any JSON value; text without NUL"}


def _declare(op: dict[str, Any] | None, where: str, extra: dict[str, Any]) -> None:
    if op is None:
        return
    if where.startswith("param:"):
        for param in op.get("parameters", []):
            if param.get("name") == where[6:]:
                schema = param.setdefault("schema", {})
                target = next((s for s in schema.get("anyOf", []) if s.get("type") == "string"),
                              schema)
                target.update(extra)
        return
    node = op.get("requestBody", {}).get("content", {}).get("application/json", {}) \
        .get("schema", {})
    for part in where.strip("/").split("/"):
        node = node.get(part, {})
    target = next((s for s in node.get("anyOf", []) if s.get("type") != "null"), node)
    target.update(extra)


def _clean_requests(doc: dict[str, Any]) -> None:
    """Clean strings in what requests carry: parameters, bodies and the components
    they refer to (responses keep their own schemas)."""
    components = doc.get("components", {}).get("schemas", {})
    seen: set[str] = set()

    def refs(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                refs(item)
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in seen and name in components:
                    seen.add(name)
                    refs(components[name])
            for value in node.values():
                refs(value)

    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            if isinstance(op, dict):
                for part in (op.get("parameters", []), op.get("requestBody", {})):
                    refs(part)
                    _clean_strings(part)
    for name in seen:
        _clean_strings(components[name])


def _clean_strings(node: Any) -> None:
    """Every string the API takes says it has no NUL (unless a pattern already says
    more), and every open object says its extra values are clean JSON."""
    if isinstance(node, list):
        for item in node:
            _clean_strings(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "string" and not ({"pattern", "enum", "format", "const"} & set(node)):
        node["pattern"] = CLEAN_TEXT
    if node.get("type") == "object" and node.get("additionalProperties", True) in (True, {}):
        node["additionalProperties"] = {"$ref": "#/components/schemas/JsonValue"}
        node.setdefault("propertyNames", {"pattern": CLEAN_TEXT})
    for value in node.values():
        _clean_strings(value)
