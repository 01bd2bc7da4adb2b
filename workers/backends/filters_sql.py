"""Metadata filters (the contract's language) as a SQL condition over a memory's JSONB payload.

The contract (`producer.contract.check_filters`) has already refused scope keys, wildcards and
anything but plain values; here every value still goes to PostgreSQL as a query parameter, never
as SQL text. Comparisons are between JSONB values, so `{"session": 3}` matches the number 3 and
not the string "3", and a condition on a key the memory lacks is false (as NULL is in SQL), `ne`
and `nin` included.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from psycopg import sql

PAYLOAD = sql.Identifier("payload")
_COMPARE = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def filter_sql(filters: dict[str, Any], column: sql.Composable = PAYLOAD) -> tuple[sql.Composable, dict[str, Any]]:
    """A condition that is true for the memories `filters` select (TRUE for none), and its parameters."""
    compiler = _Compiler(column)
    return compiler.all(filters), compiler.params


class _Compiler:
    def __init__(self, column: sql.Composable) -> None:
        self.column = column
        self.params: dict[str, Any] = {}
        self._names = (f"filter_{n}" for n in itertools.count())

    def all(self, filters: dict[str, Any]) -> sql.Composable:
        parts = [self.clause(key, value) for key, value in filters.items()]
        return sql.SQL(" AND ").join(parts) if parts else sql.SQL("TRUE")

    def clause(self, key: str, value: Any) -> sql.Composable:
        if key in ("AND", "OR", "NOT"):
            joiner = " OR " if key in ("OR", "NOT") else " AND "
            joined = sql.SQL(joiner).join(sql.SQL("({})").format(self.all(c)) for c in value)
            # NOT: none of the conditions holds (a condition on a missing key counts as not holding).
            return sql.SQL("NOT COALESCE({}, FALSE)" if key == "NOT" else "({})").format(joined)
        field = sql.SQL("{}->{}").format(self.column, sql.Literal(key))
        conditions = value.items() if isinstance(value, dict) else [("eq", value)]
        return sql.SQL(" AND ").join(self.condition(field, op, operand) for op, operand in conditions)

    def condition(self, field: sql.Composable, op: str, operand: Any) -> sql.Composable:
        if op in _COMPARE:
            return sql.SQL("{} {} {}::jsonb").format(field, sql.SQL(_COMPARE[op]), self.param(json.dumps(operand)))
        if op in ("in", "nin"):
            listed = sql.SQL("{} = ANY({}::jsonb[])").format(field, self.param([json.dumps(v) for v in operand]))
            return listed if op == "in" else sql.SQL("({} IS NOT NULL AND NOT {})").format(field, listed)
        if op == "contains":
            return sql.SQL("strpos({} #>> '{{}}', {}) > 0").format(field, self.param(str(operand)))
        if op == "icontains":
            return sql.SQL("strpos(lower({} #>> '{{}}'), lower({})) > 0").format(field, self.param(str(operand)))
        raise ValueError(f"unknown filter operator {op!r}")  # the contract lets none through

    def param(self, value: Any) -> sql.Placeholder:
        name = next(self._names)
        self.params[name] = value
        return sql.Placeholder(name)
