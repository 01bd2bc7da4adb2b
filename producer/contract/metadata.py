"""The contract's rules for metadata and filters: what a caller may attach to a memory and search by.

Metadata is the caller's own flat keys, never a key the stored payload uses for its scope or
bookkeeping, with plain values and a size charged per stored row. Filters test the caller's own
metadata only, in the one shape every store reads the same way. Both are stated as JSON Schema
too, so the OpenAPI schema says what the server accepts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Annotated, Any

import pydantic_core
from pydantic import AfterValidator, WithJsonSchema

from producer.contract.rules import (
    MAX_FILTER_CONDITIONS,
    MAX_FILTER_VALUE_CHARS,
    MAX_FILTER_VALUES,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    MAX_ROW_METADATA_BYTES,
    MAX_WRITE_METADATA_BYTES,
    RESERVED_PAYLOAD_KEYS,
    SCOPE_KEYS,
    TEXT_PATTERN,
    USER_ID_SCHEMA,
    check_text,
    shown_name,
)

METADATA_KEY_PATTERN = rf"^[A-Za-z_][A-Za-z0-9_]{{0,{MAX_METADATA_KEY_CHARS - 1}}}$"
_METADATA_KEY_RE = re.compile(METADATA_KEY_PATTERN.strip("^$"))
FILTER_OPERATORS = frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "nin", "contains", "icontains"})
LOGICAL_OPERATORS = frozenset({"AND", "OR", "NOT"})



def _check_metadata_key(key: object, where: str) -> str:
    if not isinstance(key, str) or _METADATA_KEY_RE.fullmatch(key) is None:
        raise ValueError(f"a {where} key must be 1-{MAX_METADATA_KEY_CHARS} letters, digits or '_', "
                         f"not starting with a digit ({shown_name(key)} is not)")
    if key.lower() in RESERVED_PAYLOAD_KEYS:
        raise ValueError(f"{where} key {key!r} is reserved: the user's scope is set by the job, not by {where}")
    return key


def _check_value(value: object, where: str, max_chars: int, *, null: bool) -> None:
    """A plain JSON value a store keeps as it is: a string (safe text, bounded), a finite number, a
    boolean, or (where `null`) null."""
    if isinstance(value, str):
        if len(value) > max_chars:
            raise ValueError(f"{where} is {len(value)} characters, over the limit of {max_chars}")
        try:
            check_text(value)
        except ValueError as exc:
            raise ValueError(f"{where} {exc}") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number")  # JSON has no NaN; PostgreSQL refuses it
    elif not (isinstance(value, bool | int) or (null and value is None)):
        kinds = "a string, number, boolean or null" if null else "a string, number or boolean"
        raise ValueError(f"{where} must be {kinds}")


def metadata_bytes(metadata: dict[str, Any]) -> int:
    """What metadata costs a stored row: its size as compact UTF-8 JSON (0 for none)."""
    return len(pydantic_core.to_json(metadata)) if metadata else 0


def check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Keys the caller may set, plain values, and at most `MAX_ROW_METADATA_BYTES` in all.

    The rule for any metadata a request carries (see `Metadata`); a write charges it per stored
    row on top of this (`check_write_metadata`).
    """
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata has {len(metadata)} keys, over the limit of {MAX_METADATA_KEYS}")
    for key, value in metadata.items():
        _check_metadata_key(key, "metadata")
        _check_value(value, f"metadata[{key!r}]", MAX_METADATA_VALUE_CHARS, null=True)
    size = metadata_bytes(metadata)
    if size > MAX_ROW_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON, over the limit of {MAX_ROW_METADATA_BYTES}")
    return metadata


def check_write_metadata(shared: dict[str, Any], own: Sequence[dict[str, Any]]) -> None:
    """Charge a write's metadata per stored row: each row gets `shared` and its message's `own`.

    Raises `ValueError` if a row's metadata would be over `MAX_ROW_METADATA_BYTES` or the write's
    rows together over `MAX_WRITE_METADATA_BYTES`.
    """
    each = metadata_bytes(shared)
    total = 0
    for position, metadata in enumerate(own):
        row = each + metadata_bytes(metadata)
        if row > MAX_ROW_METADATA_BYTES:
            raise ValueError(f"messages.{position} would be stored with {row} bytes of metadata (the write's "
                             f"and its own), over the limit of {MAX_ROW_METADATA_BYTES}")
        total += row
    if total > MAX_WRITE_METADATA_BYTES:
        raise ValueError(f"the write would store {total} bytes of metadata ({len(own)} rows, each with the "
                         f"write's metadata), over the limit of {MAX_WRITE_METADATA_BYTES}: send less metadata "
                         "with the write, or fewer messages per write")


def check_filters(filters: dict[str, Any], *, top: bool = True) -> dict[str, Any]:
    """Allow filters on the caller's own metadata only; refuse anything that names a scope key.

    AND/OR/NOT are allowed at the top level over plain conditions: that is all mem0's filter
    translation understands, and a deeper tree would be silently misread rather than refused.
    At most `MAX_FILTER_CONDITIONS` conditions in all, so that a filter's cost is bounded.
    """
    if not isinstance(filters, dict):
        raise ValueError("a filter is an object of conditions")
    conditions = 0
    for key, value in filters.items():
        if key in LOGICAL_OPERATORS:
            if not top:
                raise ValueError(f"filter {key} is not allowed below the top level: use it over plain conditions")
            if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
                raise ValueError(f"filter {key} takes a non-empty list of conditions")
            for condition in value:
                if not condition:
                    raise ValueError(f"filter {key} has an empty condition: each names at least one key")
                check_filters(condition, top=False)
                conditions += len(condition)
            continue
        if isinstance(key, str) and key.startswith("$"):
            raise ValueError(f"filter key {shown_name(key)} is not allowed: use AND, OR or NOT")
        if isinstance(key, str) and key.lower() in SCOPE_KEYS:
            raise ValueError(f"filter key {key!r} is not allowed: the user's scope is fixed by the job")
        _check_metadata_key(key, "filter")
        conditions += 1
        where = f"filter on {key!r}"
        operands = list(value.values()) if isinstance(value, dict) else [value]
        if isinstance(value, dict):
            if not value:
                raise ValueError(f"{where} has no operator")
            for op, operand in value.items():
                if op not in FILTER_OPERATORS:
                    raise ValueError(f"filter operator {shown_name(op)} on {key!r} is not one of "
                                     f"{sorted(FILTER_OPERATORS)}")
                if (op in ("in", "nin")) != isinstance(operand, list):
                    raise ValueError(f"filter operator {op!r} on {key!r} takes " +
                                     ("a list of values" if op in ("in", "nin") else "a single value"))
                if isinstance(operand, list) and not 1 <= len(operand) <= MAX_FILTER_VALUES:
                    raise ValueError(f"filter operator {op!r} on {key!r} takes 1 to {MAX_FILTER_VALUES} values")
        flat = [v for operand in operands for v in (operand if isinstance(operand, list) else [operand])]
        for v in flat:
            _check_value(v, where, MAX_FILTER_VALUE_CHARS, null=False)
        if "*" in flat:
            # mem0's any-value wildcard; refusing it everywhere means no wildcard reaches a store.
            raise ValueError(f"{where}: '*' is not allowed")
    if top and conditions > MAX_FILTER_CONDITIONS:
        raise ValueError(f"the filter has {conditions} conditions, over the limit of {MAX_FILTER_CONDITIONS}")
    return filters


def _scalar_schema(max_chars: int, *, null: bool) -> dict[str, Any]:
    kinds: list[dict[str, Any]] = [{"type": "string", "maxLength": max_chars, "pattern": TEXT_PATTERN},
                                   {"type": "number"}, {"type": "boolean"}]
    return {"anyOf": [*kinds, {"type": "null"}] if null else kinds}


def metadata_json_schema() -> dict[str, Any]:
    """What `check_metadata` accepts, as far as JSON Schema can say it (not the byte limit)."""
    return {
        "type": "object",
        "maxProperties": MAX_METADATA_KEYS,
        "propertyNames": {"pattern": METADATA_KEY_PATTERN, "not": {"enum": sorted(RESERVED_PAYLOAD_KEYS)}},
        "additionalProperties": _scalar_schema(MAX_METADATA_VALUE_CHARS, null=True),
        "description": f"your own keys (not, in any case, one of the reserved names); at most "
                       f"{MAX_ROW_METADATA_BYTES} bytes as JSON per stored row, counting the write's "
                       f"metadata in each of its messages' rows, and {MAX_WRITE_METADATA_BYTES} per write",
    }


def filters_json_schema(*, user_id: bool = False) -> dict[str, Any]:
    """What `check_filters` accepts, as far as JSON Schema can say it (not the count of conditions).

    `user_id`: the form mem0's SDK sends, which names the user at the top level of the filters.
    """
    operand = _scalar_schema(MAX_FILTER_VALUE_CHARS, null=False)
    operators: dict[str, Any] = {op: operand for op in sorted(FILTER_OPERATORS - {"in", "nin"})}
    operators |= {op: {"type": "array", "items": operand, "minItems": 1, "maxItems": MAX_FILTER_VALUES}
                  for op in ("in", "nin")}
    condition = {"anyOf": [*operand["anyOf"], {"type": "object", "properties": operators, "minProperties": 1,
                                              "additionalProperties": False}]}
    names = {"pattern": METADATA_KEY_PATTERN, "not": {"enum": sorted(RESERVED_PAYLOAD_KEYS | LOGICAL_OPERATORS)}}
    plain = {"type": "object", "minProperties": 1, "maxProperties": MAX_FILTER_CONDITIONS, "propertyNames": names,
             "additionalProperties": condition}
    logical = {"type": "array", "items": plain, "minItems": 1, "maxItems": MAX_FILTER_CONDITIONS}
    scope = {"user_id": USER_ID_SCHEMA} if user_id else {}
    return {
        "type": "object",
        "maxProperties": MAX_FILTER_CONDITIONS,
        "properties": {**scope, **{op: logical for op in sorted(LOGICAL_OPERATORS)}},
        "propertyNames": {"anyOf": [names, {"enum": [*scope, *sorted(LOGICAL_OPERATORS)]}]},
        "additionalProperties": condition,
        "description": (("user_id names the user; the other " if user_id else "") +
                        "conditions are on your own metadata keys: key: value, key: {operator: value}, "
                        "and AND/OR/NOT over lists of those at the top level; at most "
                        f"{MAX_FILTER_CONDITIONS} conditions in all, counting those in AND/OR/NOT"),
    }


# Metadata and filters as a request carries them: checked by the contract's rules, and described
# in the OpenAPI schema by them.
Metadata = Annotated[dict[str, Any], AfterValidator(check_metadata), WithJsonSchema(metadata_json_schema())]
Filters = Annotated[dict[str, Any], AfterValidator(check_filters), WithJsonSchema(filters_json_schema())]

