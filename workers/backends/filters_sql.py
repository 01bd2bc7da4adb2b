"""Metadata filters (the contract's language) as a SQL condition over a memory's JSONB payload.

The contract (`producer.contract.check_filters`) has already refused scope keys, wildcards and
anything but plain values; here every value still goes to PostgreSQL as a parameter, never as
SQL text. Comparisons are between JSONB values, so `{"session": 3}` matches the number 3 and not
the string "3", and a condition on a key the memory lacks is false (as NULL is in SQL), `ne` and
`nin` included.
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import sql

PAYLOAD = sql.Identifier("payload")
_COMPARE = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def filter_sql(filters: dict[str, Any], column: sql.Composable = PAYLOAD) -> sql.Composable:
    """A condition that is true for the memories `filters` select (TRUE for no filters)."""
    parts = [_clause(key, value, column) for key, value in filters.items()]
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("TRUE")


def _clause(key: str, value: Any, column: sql.Composable) -> sql.Composable:
    if key in ("AND", "OR"):
        joined = sql.SQL(f" {key} ").join(sql.SQL("({})").format(filter_sql(c, column)) for c in value)
        return sql.SQL("({})").format(joined)
    if key == "NOT":  # none of the conditions holds
        any_of = sql.SQL(" OR ").join(sql.SQL("({})").format(filter_sql(c, column)) for c in value)
        return sql.SQL("NOT COALESCE({}, FALSE)").format(any_of)
    field = sql.SQL("{}->{}").format(column, sql.Literal(key))
    conditions = value.items() if isinstance(value, dict) else [("eq", value)]
    return sql.SQL(" AND ").join(_condition(field, op, operand) for op, operand in conditions)


def _condition(field: sql.Composable, op: str, operand: Any) -> sql.Composable:
    if op in _COMPARE:
        return sql.SQL("{} {} {}::jsonb").format(field, sql.SQL(_COMPARE[op]), sql.Literal(json.dumps(operand)))
    if op in ("in", "nin"):
        listed = sql.SQL("{} = ANY({}::jsonb[])").format(field, sql.Literal([json.dumps(v) for v in operand]))
        return listed if op == "in" else sql.SQL("({} IS NOT NULL AND NOT {})").format(field, listed)
    if op in ("contains", "icontains"):
        pattern = "%" + str(operand).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        like = sql.SQL("LIKE" if op == "contains" else "ILIKE")
        return sql.SQL("({} #>> '{{}}') {} {}").format(field, like, sql.Literal(pattern))
    raise ValueError(f"unknown filter operator {op!r}")  # the contract lets none through
