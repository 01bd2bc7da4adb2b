"""The OpenAPI schema of `memfleet serve`: what FastAPI derives from the routes and the contract's
types, and one rule it cannot derive: a request names its user.

With an app key, every request must name the user it acts for; with a user key it may leave the
user out (it is the key's own). A schema cannot depend on the key, so it states the rule that
holds for both: every `user_id` a request can carry (query parameter or body field) is documented
as required. A client that follows the schema works with either kind of key. The server itself
still lets a user key leave it out, as docs/http-api.md says. The rule applies to every route,
so a route added later is documented the same way without a change here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

NAME_THE_USER = "required with an app key; a user key may leave it out (it acts for its own user only)"


def install(app: FastAPI) -> None:
    derive: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            require_named_users(derive())  # FastAPI caches the dict it returns: amended once
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def require_named_users(schema: dict[str, Any]) -> None:
    components = schema.get("components", {}).get("schemas", {})
    bodies: set[str] = set()
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "user_id" and parameter.get("in") == "query":
                    parameter["required"] = True
                    parameter["description"] = NAME_THE_USER
                    parameter["schema"] = _not_null(parameter["schema"])
            for content in operation.get("requestBody", {}).get("content", {}).values():
                ref = content.get("schema", {}).get("$ref", "")
                bodies.add(ref.rsplit("/", 1)[-1])
    for name in bodies:
        body = components.get(name, {})
        if "user_id" in body.get("properties", {}):
            body["required"] = sorted({*body.get("required", []), "user_id"})
            named = _not_null(body["properties"]["user_id"])
            named["description"] = "; ".join(filter(None, [named.get("description"), NAME_THE_USER]))
            body["properties"]["user_id"] = named


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without the `null` FastAPI allows for a field that has a default of None."""
    kinds = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    return {**kinds[0], "title": schema.get("title", "User Id")} if len(kinds) == 1 else schema
