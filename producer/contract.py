"""The job contract shared by producers and workers: payload models and the rules they enforce.

Every rule about what a user id, a message, metadata or a filter may be lives here and nowhere
else. The producer applies it on enqueue, the worker again on receipt, and `AsyncScopedMemory`
on construction, so a job put on the queue by hand is held to the same rules.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NewType, TypeVar

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    StrictBool,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from producer.errors import InvalidRequest
from producer.errors import InvalidUserId as InvalidUserId  # raised by check_user_id; its callers catch it here

# Every limit a request is held to, in one place (docs/security.md lists them with these defaults).
# They are constants, not settings: producers and workers must agree on them, and a worker checks
# every job again on receipt.
MAX_USER_ID_CHARS = 128
MAX_CONTENT_CHARS = 16_000
MAX_NAME_CHARS = 128
MAX_MESSAGE_ID_CHARS = 256
MAX_TIMESTAMP_CHARS = 64
MAX_MESSAGES_PER_JOB = 256
MAX_QUERY_CHARS = 2_000
MAX_SEARCH_LIMIT = 100
MAX_PAGE_SIZE = 1_000
MAX_CURSOR_CHARS = 64
MAX_METADATA_KEYS = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 1_000
# A write's metadata is copied into the row of each of its messages, so it is charged per stored
# row: a row's metadata (the write's and its message's, as compact UTF-8 JSON) is at most
# MAX_ROW_METADATA_BYTES, and all rows of one write together at most MAX_WRITE_METADATA_BYTES.
# Without the second, 256 one-letter messages under 4 KiB of write metadata would store 1 MiB.
MAX_ROW_METADATA_BYTES = 4_096
MAX_WRITE_METADATA_BYTES = 65_536
MAX_FILTER_CONDITIONS = 32  # plain conditions in one filter, counted inside AND/OR/NOT too
MAX_FILTER_VALUES = 100  # values of one `in`/`nin` list
MAX_FILTER_VALUE_CHARS = 1_000
# Ids one update, delete or import names: a write that applies all of them or none.
MAX_IDS_PER_WRITE = 100
MAX_HISTORY_EVENTS = 1_000

# Letters, digits and `_ . : @ -`, starting with a letter or digit. Everything else is refused
# rather than normalized, because each refused class aliases or widens a scope somewhere:
# whitespace is trimmed by mem0 ("alice " is "alice"), "*" is a wildcard in mem0's pgvector
# filters and the hosted API (every user), `%&=` are escaped into mem0's session-scope key,
# non-strings are coerced (7 is "7"), and look-alike Unicode hides one id behind another.
USER_ID_RULE = (
    f"1 to {MAX_USER_ID_CHARS} ASCII letters, digits and '_ . : @ -', starting with a letter or digit"
)
USER_ID_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.:@-]{{0,{MAX_USER_ID_CHARS - 1}}}$"
_USER_ID_RE = re.compile(USER_ID_PATTERN.strip("^$"))

# Keys that carry a memory's scope or mem0's own bookkeeping in the stored payload. Caller
# metadata and filters may never name them: that is how one user's data would claim, or read,
# another's scope.
SCOPE_KEYS = frozenset({"user_id", "agent_id", "run_id", "actor_id", "app_id", "org_id", "project_id"})
RESERVED_PAYLOAD_KEYS = SCOPE_KEYS | frozenset(
    {"data", "hash", "created_at", "updated_at", "text_lemmatized", "role", "attributed_to",
     "expiration_date", "id", "memory", "score", "idempotency_key", "name", "timestamp"}
)
METADATA_KEY_PATTERN = rf"^[A-Za-z_][A-Za-z0-9_]{{0,{MAX_METADATA_KEY_CHARS - 1}}}$"
_METADATA_KEY_RE = re.compile(METADATA_KEY_PATTERN.strip("^$"))
FILTER_OPERATORS = frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "nin", "contains", "icontains"})
LOGICAL_OPERATORS = frozenset({"AND", "OR", "NOT"})

Scalar = str | int | float | bool | None

# Text that PostgreSQL, Redis and JSON all hold as sent: no NUL (PostgreSQL's text and jsonb refuse
# it) and no lone UTF-16 surrogate (not valid UTF-8, so it cannot be encoded for Redis or a reply).
# A JSON string may spell either (`"\u0000"`, `"\ud800"`), and argv can carry a surrogate too
# (Python decodes bytes that are not UTF-8 as lone surrogates).
TEXT_PATTERN = r"^[^\u0000]*$"  # what the OpenAPI schema can say of it; surrogates are not JSON text
_UNSAFE_TEXT = re.compile(r"[\x00\ud800-\udfff]")


M = TypeVar("M", bound=BaseModel)


def describe(exc: ValidationError) -> str:
    """One line naming the first field that failed, and why; never the value it had."""
    first = exc.errors()[0]
    field = ".".join(shown_name(p) for p in first["loc"]) or "input"
    return f"invalid {field}: {first['msg']}"


def parse(model: type[M], payload: Any) -> M:
    """`payload` as a `model`, or `InvalidRequest` naming the first problem (never pydantic's error)."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc)) from None


_SHOWABLE = re.compile(r"[A-Za-z0-9_$.-]{1,64}")


def shown_name(name: object) -> str:
    """A field or key name as an error message may quote it: a short plain name as it is, anything
    else (it came from the request, and may be long, or text) as a placeholder."""
    if isinstance(name, int):
        return str(name)
    return name if isinstance(name, str) and _SHOWABLE.fullmatch(name) else "<key>"


def check_text(value: str) -> str:
    """`value`, if PostgreSQL, Redis and JSON can all hold it as it is; else `ValueError` saying why.

    The rule for every string a request carries (see `Text`); the value itself is never quoted.
    """
    found = _UNSAFE_TEXT.search(value)
    if found is None:
        return value
    if found.group() == "\x00":
        raise ValueError("has a NUL character (U+0000), which cannot be stored")
    raise ValueError("has an unpaired surrogate (U+D800 to U+DFFF): text must be valid Unicode")


# Any string of a request: no NUL, no lone surrogate, and a size. Write a new field as
# `Annotated[StrictStr, Field(max_length=N), SAFE_TEXT, TEXT_IN_SCHEMA]`, the size first, so that
# pydantic checks it as the string's length (after a validator it would count "items"). `Text` is
# the rule without a size.
def _check_text_first(value: object) -> object:
    # Before pydantic's own string check, which refuses a lone surrogate in words of its own
    # ("unable to parse raw data as a unicode string"); anything but a string is its to refuse.
    return check_text(value) if isinstance(value, str) else value


SAFE_TEXT = BeforeValidator(_check_text_first)
TEXT_IN_SCHEMA = Field(json_schema_extra={"pattern": TEXT_PATTERN})
# Content and queries are also not blank (all whitespace, as Python's `str.isspace` has it).
SOME_TEXT_IN_SCHEMA = Field(json_schema_extra={"pattern": r"^[^\u0000]*[^\s\u0000][^\u0000]*$"})
Text = Annotated[StrictStr, SAFE_TEXT, TEXT_IN_SCHEMA]
Content = Annotated[StrictStr, Field(min_length=1, max_length=MAX_CONTENT_CHARS), SAFE_TEXT, SOME_TEXT_IN_SCHEMA]
Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_CHARS), SAFE_TEXT, TEXT_IN_SCHEMA]
MessageId = Annotated[StrictStr, Field(min_length=1, max_length=MAX_MESSAGE_ID_CHARS, description="idempotency key"),
                      SAFE_TEXT, TEXT_IN_SCHEMA]
# The forms `check_timestamp` takes, as a pattern the OpenAPI schema can carry (it cannot say that a
# month has at most 31 days).
TIMESTAMP_PATTERN = (r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
                     r"([T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?(Z|[+-][01][0-9]:[0-5][0-9])?)?$")
Timestamp = Annotated[StrictStr, Field(max_length=MAX_TIMESTAMP_CHARS, description="when it was said, ISO 8601"),
                      SAFE_TEXT, Field(json_schema_extra={"pattern": TIMESTAMP_PATTERN})]
# A memory's text as stored (history keeps earlier ones): what `Content` allows, blank or not.
StoredText = Annotated[StrictStr, Field(max_length=MAX_CONTENT_CHARS), SAFE_TEXT, TEXT_IN_SCHEMA]
QueryText = Annotated[StrictStr, Field(min_length=1, max_length=MAX_QUERY_CHARS), SAFE_TEXT, SOME_TEXT_IN_SCHEMA]
def _json_integer(value: object) -> object:
    # What JSON Schema calls an integer: a number with no fraction (36.0 is one), never a string
    # ("36") or a boolean, which pydantic's lax int would take and its strict int refuses (36.0).
    if isinstance(value, str | bytes | bool):
        raise ValueError("must be an integer")
    return value


# For an integer field of a JSON body, after its bounds: `Annotated[int, Field(ge=1), JSON_INTEGER]`
# (bounds after a validator would reach the OpenAPI schema as "ge", which no client reads).
JSON_INTEGER = BeforeValidator(_json_integer)
# What the backends hand out: a memory's id (embedded) or a page number (hosted).
CURSOR_PATTERN = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,17})$"
Cursor = Annotated[StrictStr, Field(pattern=CURSOR_PATTERN, max_length=MAX_CURSOR_CHARS,
                                    description="the next_cursor of the previous page")]


def check_timestamp(value: str) -> str:
    """An ISO 8601 date or date-time, returned in one canonical form (`datetime.isoformat`)."""
    try:
        return datetime.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError("timestamp must be ISO 8601, e.g. 2023-05-18T13:47:00 or 2023-05-18T13:47:00+00:00") from None


def check_expiry(value: str | datetime) -> str:
    """An expiry (ISO 8601 date-time, or a datetime) as UTC in canonical form; naive means UTC."""
    if isinstance(value, datetime):
        when = value
    else:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("expires_at must be an ISO 8601 date-time, e.g. 2027-01-31T00:00:00+00:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat()


def check_future(expires_at: str | None) -> None:
    """Refuse an expiry that has already passed.

    The producer checks this when a write is made, not the model: a worker validates the write
    again when it applies it, by which time an expiry that was in the future may have passed, and
    the memory is then stored as expired (invisible at once, swept soon) rather than refused.
    """
    if expires_at is not None and datetime.fromisoformat(expires_at) <= datetime.now(UTC):
        raise InvalidRequest(f"expires_at {expires_at} is already in the past: give a time to come")


_MEMORY_ID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
MEMORY_ID_RULE = "a UUID as the service returned it, e.g. 1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def check_memory_id(value: object) -> str:
    """A memory id (a UUID in its canonical text form), lower-cased; else `InvalidRequest`."""
    if not isinstance(value, str) or _MEMORY_ID_RE.fullmatch(value) is None:
        raise InvalidRequest(f"invalid memory_id: expected {MEMORY_ID_RULE}")
    return value.lower()


def check_user_id(value: object) -> str:
    """Return `value` if it is a valid user id, else raise `InvalidUserId` naming the problem."""
    if not isinstance(value, str):
        raise InvalidUserId(f"user_id must be a string, got {type(value).__name__} ({USER_ID_RULE})")
    if not value:
        raise InvalidUserId(f"user_id is empty ({USER_ID_RULE})")
    if len(value) > MAX_USER_ID_CHARS:
        raise InvalidUserId(f"user_id is {len(value)} characters, over the limit of {MAX_USER_ID_CHARS}")
    if _USER_ID_RE.fullmatch(value) is None:
        bad = next((c for c in value if not (c.isascii() and (c.isalnum() or c in "_.:@-"))), value[0])
        raise InvalidUserId(f"user_id has a character that is not allowed: {bad!r} ({USER_ID_RULE})")
    return value


USER_ID_SCHEMA = {"type": "string", "pattern": USER_ID_PATTERN, "maxLength": MAX_USER_ID_CHARS,
                   "description": USER_ID_RULE}
UserId = Annotated[StrictStr, WithJsonSchema(USER_ID_SCHEMA)]
# A user id a request may name (checked by `check_user_id`, so its errors say what is wrong).
NamedUserId = Annotated[StrictStr, AfterValidator(check_user_id), WithJsonSchema(USER_ID_SCHEMA)]
MemoryId = Annotated[StrictStr, Field(description=MEMORY_ID_RULE, pattern=_MEMORY_ID_RE.pattern)]
Expiry = Annotated[StrictStr, Field(max_length=MAX_TIMESTAMP_CHARS,
                                    description="when the memory expires, ISO 8601 (UTC if no zone)"),
                   SAFE_TEXT, TEXT_IN_SCHEMA]


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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Scoped(_Model):
    user_id: UserId

    @field_validator("user_id", mode="before")
    @classmethod
    def _user_id(cls, value: object) -> str:
        return check_user_id(value)


class Message(_Model):
    role: Literal["user", "assistant"] = "user"
    content: Content
    name: Name | None = None
    id: MessageId | None = None
    timestamp: Timestamp | None = None
    metadata: Metadata = Field(default_factory=dict)

    @field_validator("timestamp")
    @classmethod
    def _timestamp(cls, value: str | None) -> str | None:
        return None if value is None else check_timestamp(value)

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("content is blank")
        return value


def _ids(value: list[Any]) -> list[str]:
    ids = [check_memory_id(v) for v in value]
    if len(set(ids)) != len(ids):
        raise ValueError("a memory id is named more than once")
    return ids


class AddRequest(_Scoped):
    kind: Literal["add"] = "add"
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES_PER_JOB)]
    metadata: Metadata = Field(default_factory=dict)
    infer: StrictBool = False
    expires_at: Expiry | None = None  # every memory of the write expires then

    @field_validator("expires_at")
    @classmethod
    def _expires_at(cls, value: str | None) -> str | None:
        return None if value is None else check_expiry(value)

    @model_validator(mode="after")
    def _metadata_per_row(self) -> AddRequest:
        check_write_metadata(self.metadata, [m.metadata for m in self.messages])
        return self

    def idempotency_keys(self) -> list[str]:
        """One key per message: its own id, or a hash of user, content and position in the job."""
        keys = []
        for position, message in enumerate(self.messages):
            if message.id is not None:
                keys.append(f"id:{message.id}")
            else:
                digest = hashlib.sha256(f"{self.user_id}\0{position}\0{message.content}".encode()).hexdigest()
                keys.append(f"sha256:{digest}")
        return keys


class ForgetRequest(_Scoped):
    kind: Literal["forget"] = "forget"


class MemoryChange(_Model):
    """What an update changes in one memory; a field left out stays as it is."""

    memory_id: MemoryId
    text: Content | None = None
    metadata: Metadata | None = Field(default=None, description="replaces the memory's metadata")
    timestamp: Timestamp | None = None
    expires_at: Expiry | None = None
    clear_expiry: StrictBool = Field(default=False, description="the memory no longer expires")

    @field_validator("memory_id", mode="before")
    @classmethod
    def _memory_id(cls, value: object) -> str:
        return check_memory_id(value)

    @field_validator("text")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("text is blank")
        return value

    @field_validator("timestamp")
    @classmethod
    def _timestamp(cls, value: str | None) -> str | None:
        return None if value is None else check_timestamp(value)

    @field_validator("expires_at")
    @classmethod
    def _expires_at(cls, value: str | None) -> str | None:
        return None if value is None else check_expiry(value)

    @model_validator(mode="after")
    def _something(self) -> MemoryChange:
        if self.expires_at is not None and self.clear_expiry:
            raise ValueError("give expires_at or clear_expiry, not both")
        if (self.text, self.metadata, self.timestamp, self.expires_at) == (None, None, None, None) \
                and not self.clear_expiry:
            raise ValueError("an update changes at least one of text, metadata, timestamp or expiry")
        return self


class UpdateRequest(_Scoped):
    """Changes to memories of one user, applied all together or, if any id is not the user's, not at all."""

    kind: Literal["update"] = "update"
    changes: Annotated[list[MemoryChange], Field(min_length=1, max_length=MAX_IDS_PER_WRITE)]

    @field_validator("changes")
    @classmethod
    def _once_each(cls, value: list[MemoryChange]) -> list[MemoryChange]:
        _ids([c.memory_id for c in value])
        check_write_metadata({}, [c.metadata or {} for c in value])
        return value


class DeleteRequest(_Scoped):
    """Memories of one user to delete, all of them or, if any id is not the user's, none."""

    kind: Literal["delete"] = "delete"
    memory_ids: Annotated[list[MemoryId], Field(min_length=1, max_length=MAX_IDS_PER_WRITE)]

    @field_validator("memory_ids", mode="before")
    @classmethod
    def _memory_ids(cls, value: object) -> object:
        return _ids(value) if isinstance(value, list) else value


class HistoryEvent(_Model):
    """One change of a memory. A deleted memory's events keep when things happened, never its text."""

    id: MemoryId  # the event's own id (a UUID)
    memory_id: MemoryId
    event: Literal["ADD", "UPDATE", "DELETE"]
    old_text: StoredText | None = None
    new_text: StoredText | None = None
    at: Timestamp | None = None  # when it happened (ISO 8601)

    @field_validator("id", "memory_id", mode="before")
    @classmethod
    def _ids(cls, value: object) -> str:
        return check_memory_id(value)


class ExportedMemory(_Model):
    """One line of `memfleet export`: a memory as it can be restored (`ImportRequest`), with its history."""

    user_id: UserId
    id: MemoryId
    text: Content
    role: Literal["user", "assistant"] = "user"
    name: Name | None = None
    timestamp: Timestamp | None = None
    metadata: Metadata = Field(default_factory=dict)
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    expires_at: Expiry | None = None
    # The memories after it in the write it came in, whose keyword context holds its line
    # (workers.backends.indexing): restored, so that search ranks them as it did.
    context_for: Annotated[list[MemoryId], Field(max_length=8)] = Field(default_factory=list)
    history: Annotated[list[HistoryEvent], Field(max_length=MAX_HISTORY_EVENTS)] = Field(default_factory=list)

    @field_validator("user_id", mode="before")
    @classmethod
    def _user_id(cls, value: object) -> str:
        return check_user_id(value)

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: object) -> str:
        return check_memory_id(value)

    @field_validator("context_for", mode="before")
    @classmethod
    def _context_for(cls, value: object) -> object:
        return [check_memory_id(i) for i in value] if isinstance(value, list) else value

    @field_validator("timestamp")
    @classmethod
    def _timestamp(cls, value: str | None) -> str | None:
        return None if value is None else check_timestamp(value)

    @field_validator("expires_at")
    @classmethod
    def _expires_at(cls, value: str | None) -> str | None:
        return None if value is None else check_expiry(value)

    @model_validator(mode="after")
    def _history_is_its_own(self) -> ExportedMemory:
        if any(e.memory_id != self.id for e in self.history):
            raise ValueError("a history event names another memory than the one it is exported with")
        return self


class ImportRequest(_Scoped):
    """Exported memories of one user, restored with their ids; one already there is left as it is."""

    kind: Literal["import"] = "import"
    memories: Annotated[list[ExportedMemory], Field(min_length=1, max_length=MAX_IDS_PER_WRITE)]

    @model_validator(mode="after")
    def _all_of_the_user(self) -> ImportRequest:
        if any(m.user_id != self.user_id for m in self.memories):
            raise ValueError("every imported memory must be of the user the import is for")
        _ids([m.id for m in self.memories])
        check_write_metadata({}, [m.metadata for m in self.memories])
        return self


class SearchRequest(_Scoped):
    kind: Literal["search"] = "search"
    query: QueryText
    limit: Annotated[int, Field(ge=1, le=MAX_SEARCH_LIMIT)] = 10
    filters: Filters = Field(default_factory=dict)

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query is blank")
        return value


class ListRequest(_Scoped):
    kind: Literal["list"] = "list"
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)] = 100
    cursor: Cursor | None = None  # opaque: the `next_cursor` of the previous page


class _OneMemory(_Scoped):
    memory_id: MemoryId

    @field_validator("memory_id", mode="before")
    @classmethod
    def _memory_id(cls, value: object) -> str:
        return check_memory_id(value)


class GetRequest(_OneMemory):
    kind: Literal["get"] = "get"


class HistoryRequest(_OneMemory):
    kind: Literal["history"] = "history"


class ExportRequest(_Scoped):
    """A page of the user's whole record (`ExportedMemory`), in id order."""

    kind: Literal["export"] = "export"
    limit: Annotated[int, Field(ge=1, le=MAX_IDS_PER_WRITE)] = MAX_IDS_PER_WRITE
    cursor: Cursor | None = None


class OwnersRequest(_Model):
    """Which users hold these memory ids. The one read not scoped to a user: an app key, which may
    act for any user, names a memory by id alone on mem0's routes, and this finds whose it is."""

    kind: Literal["owners"] = "owners"
    memory_ids: Annotated[list[MemoryId], Field(min_length=1, max_length=MAX_IDS_PER_WRITE)]

    @field_validator("memory_ids", mode="before")
    @classmethod
    def _memory_ids(cls, value: object) -> object:
        return _ids(value) if isinstance(value, list) else value


WriteRequest = AddRequest | ForgetRequest | UpdateRequest | DeleteRequest | ImportRequest
WriteKind = Literal["add", "forget", "update", "delete", "import"]
WRITE_KINDS: tuple[WriteKind, ...] = ("add", "forget", "update", "delete", "import")


class WriteOp(_Model):
    """A write waiting in its user's ordered log (see `producer.keys.write_log`)."""

    op_id: StrictStr
    # SerializeAsAny: the request is always one of the two (validation sees to it), and pydantic's
    # serializer for a union checks each nested message against the union first, which made
    # dumping a write twice as slow as dumping its request (bulk ingest dumps every message once).
    request: SerializeAsAny[Annotated[WriteRequest, Field(discriminator="kind")]]

    @classmethod
    def new(cls, request: WriteRequest) -> WriteOp:
        return cls(op_id=new_op_ids(1)[0], request=request)

    @staticmethod
    def encode_add(op_id: str, user_id: str, messages: Sequence[EncodedMessage]) -> bytes:
        """The JSON of `WriteOp(op_id=op_id, request=AddRequest(user_id=user_id, messages=...))`,
        put together from messages encoded by `encode_message`.

        Bulk ingest encodes each message as it is read, while it is in the CPU's cache, and holds
        only those bytes until its job is sent: dumping whole requests later, from messages that
        had gone cold in the window, was a fifth of its time. `user_id` is checked here, so that
        nothing but a valid id (letters, digits and `_.:@-`, nothing JSON escapes) is put in.
        """
        check_user_id(user_id)
        if not 1 <= len(messages) <= MAX_MESSAGES_PER_JOB:
            raise InvalidRequest(f"an add takes 1 to {MAX_MESSAGES_PER_JOB} messages, not {len(messages)}")
        return _ENCODED_ADD % (op_id.encode(), user_id.encode(), b",".join(messages))


# What `WriteOp(...).model_dump_json()` gives for an add of messages without write metadata or expiry.
_ENCODED_ADD = (b'{"op_id":"%s","request":{"user_id":"%s","kind":"add","messages":[%s],"metadata":{},"infer":false,'
                b'"expires_at":null}}')


def new_op_ids(count: int) -> list[str]:
    """`count` fresh write ids, each 128 random bits (like a uuid4).

    The random bytes are drawn at once: one `os.urandom` per id was a tenth of the producer's time
    in a bulk ingest of one-message jobs.
    """
    digits = os.urandom(16 * count).hex()
    return [f"w-{digits[i : i + 32]}" for i in range(0, 32 * count, 32)]


EncodedMessage = NewType("EncodedMessage", bytes)


def encode_message(message: Message) -> EncodedMessage:
    """`message` as the JSON it has inside a write (`message.model_dump_json()`, as bytes)."""
    return EncodedMessage(_message_json(message))


_message_json = Message.__pydantic_serializer__.to_json


class MemoryRecord(_Model):
    id: str
    user_id: str
    text: str  # the message as written, without the speaker and date it is indexed with
    name: str | None = None  # who said it
    timestamp: str | None = None  # when it was said (ISO 8601), if the writer said
    role: str | None = None  # user or assistant
    score: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None
    updated_at: str | None = None
    expires_at: str | None = None  # ISO 8601, UTC; None: never


class MemoryPage(_Model):
    memories: list[MemoryRecord]
    next_cursor: str | None = None


class ExportPage(_Model):
    memories: list[ExportedMemory]
    next_cursor: str | None = None


class WriteOutcome(_Model):
    """What a write did. Ids and counts only: outcomes sit in Redis, so they carry no text."""

    op_id: str
    kind: WriteKind | None
    stored: int = 0  # add, import: memories stored
    duplicates: int = 0  # add, import: memories that were already there
    deleted: int = 0  # forget, delete
    updated: int = 0  # update
    memory_ids: list[str] = Field(default_factory=list)  # add, import: the new memories
    # update, delete: ids that are not the user's memories (unknown, another user's, expired or
    # already deleted). Nothing of such a write was applied.
    not_found: list[str] = Field(default_factory=list)
    error: str | None = None  # set when the write was dead-lettered instead


class DeadLetter(_Model):
    """A write that could not be applied. It holds the write itself, so `memfleet dlq retry` can
    put it back; forget removes the user's dead letters with everything else.

    Or a job a worker refused unread (workers.refusal): its `user_id` is "?" and its `op` is empty,
    because nothing of a body that did not pass is kept; only the reason and the body's size.
    """

    job_id: str
    user_id: str
    reason: str
    tries: int
    failed_at: float
    op: str
