"""How the hosted stand-in (`tests.hosted_standin`) reads the platform's filters: entity scoping,
AND/OR/NOT, and the comparison operators of mem0's filter language; and its word-overlap score."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

ENTITY_KEYS = ("user_id", "agent_id", "app_id", "run_id")


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def names_entity(filters: dict[str, Any]) -> bool:
    """True if the filters pin an entity at the top level or in a top-level AND."""
    if any(key in filters for key in ENTITY_KEYS):
        return True
    return any(isinstance(term, dict) and names_entity(term) for term in filters.get("AND", []))


def matches(memory: dict[str, Any], filters: dict[str, Any]) -> bool:
    for key, condition in filters.items():
        if key == "AND":
            ok = all(matches(memory, term) for term in condition)
        elif key == "OR":
            ok = any(matches(memory, term) for term in condition)
        elif key == "NOT":
            ok = not any(matches(memory, term) for term in condition)
        else:
            value = memory.get(key) if key in (*ENTITY_KEYS, "created_at") else memory["metadata"].get(key)
            ok = _compare(value, condition)
        if not ok:
            return False
    return True


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda v, c: bool(v == c),
    "ne": lambda v, c: bool(v != c),
    "in": lambda v, c: v in c,
    "nin": lambda v, c: v not in c,
    "gt": lambda v, c: v is not None and bool(v > c),
    "gte": lambda v, c: v is not None and bool(v >= c),
    "lt": lambda v, c: v is not None and bool(v < c),
    "lte": lambda v, c: v is not None and bool(v <= c),
    "contains": lambda v, c: isinstance(v, str) and str(c) in v,
    "icontains": lambda v, c: isinstance(v, str) and str(c).lower() in v.lower(),
}


def _compare(value: Any, condition: Any) -> bool:
    if condition == "*":
        return value is not None
    if not isinstance(condition, dict):
        return bool(value == condition)
    return all(op in _OPERATORS and _OPERATORS[op](value, operand) for op, operand in condition.items())
