"""The contract's rules: every limit, and what a user id, a memory id, a string or a time may be.

Each rule is a check function (`check_user_id`, `check_text`, `check_timestamp`, ...) and, for
request fields, an annotated type that applies it (`UserId`, `Content`, `Timestamp`, ...), so that
a model states a field's rule by its type. Errors name the field and the rule, never the value.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)

from producer.errors import InvalidRequest, InvalidUserId

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

# Keys that carry a memory's scope or its bookkeeping in a stored payload (memfleet's table keeps
# mem0's payload format, `workers.mem0_adapter`, whose tests check its keys against this list) or in
# the hosted platform's records. Caller metadata and filters may never name them: that is how one
# user's data would claim, or read, another's scope.
SCOPE_KEYS = frozenset({"user_id", "agent_id", "run_id", "actor_id", "app_id", "org_id", "project_id"})
RESERVED_PAYLOAD_KEYS = SCOPE_KEYS | frozenset(
    {"data", "hash", "created_at", "updated_at", "text_lemmatized", "role", "attributed_to",
     "expiration_date", "id", "memory", "score", "idempotency_key", "name", "timestamp"}
)
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


def check_some_text(value: str) -> str:
    """`value` if it is not blank (all whitespace, as `str.isspace` has it)."""
    if not value.strip():
        raise ValueError("is blank")
    return value


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
    try:
        return when.astimezone(UTC).isoformat()
    except OverflowError:  # 0001-01-01T00:00+05:00 is in year 0 in UTC
        raise ValueError("expires_at is out of range: give a time between the years 1 and 9999 in UTC") from None


def check_future(expires_at: str | None) -> None:
    """Refuse an expiry that has already passed.

    The producer checks this when a write is made, not the model: a worker validates the write
    again when it applies it, by which time an expiry that was in the future may have passed, and
    the memory is then stored as expired (invisible at once, swept soon) rather than refused.
    """
    if expires_at is not None and datetime.fromisoformat(expires_at) <= datetime.now(UTC):
        raise InvalidRequest(f"expires_at {expires_at} is already in the past: give a time to come")


MEMORY_ID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_MEMORY_ID_RE = re.compile(MEMORY_ID_PATTERN.strip("^$"))
MEMORY_ID_RULE = "a UUID as the service returned it, e.g. 1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def check_memory_id(value: object) -> str:
    """A memory id (a UUID in its canonical text form), lower-cased; else `InvalidRequest`."""
    if not isinstance(value, str) or _MEMORY_ID_RE.fullmatch(value) is None:
        raise InvalidRequest(f"invalid memory_id: expected {MEMORY_ID_RULE}")
    return value.lower()


def check_memory_ids(value: list[Any]) -> list[str]:
    """Memory ids, each named once."""
    ids = [check_memory_id(v) for v in value]
    if len(set(ids)) != len(ids):
        raise ValueError("a memory id is named more than once")
    return ids


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


def _check_text_first(value: object) -> object:
    # Before pydantic's own string check, which refuses a lone surrogate in words of its own
    # ("unable to parse raw data as a unicode string"); anything but a string is its to refuse.
    return check_text(value) if isinstance(value, str) else value


def _json_integer(value: object) -> object:
    # What JSON Schema calls an integer: a number with no fraction (36.0 is one), never a string
    # ("36") or a boolean, which pydantic's lax int would take and its strict int refuses (36.0).
    if isinstance(value, str | bytes | bool):
        raise ValueError("must be an integer")
    return value


def _memory_ids_first(value: object) -> object:
    return check_memory_ids(value) if isinstance(value, list) else value


# -- the rules as field types -------------------------------------------------------------------
# Any string of a request: no NUL, no lone surrogate, and a size. Write a new field as
# `Annotated[StrictStr, Field(max_length=N), SAFE_TEXT, TEXT_IN_SCHEMA]`, the size first, so that
# pydantic checks it as the string's length (after a validator it would count "items"). `Text` is
# the rule without a size.
SAFE_TEXT = BeforeValidator(_check_text_first)
TEXT_IN_SCHEMA = Field(json_schema_extra={"pattern": TEXT_PATTERN})
# Content and queries are also not blank (all whitespace, as Python's `str.isspace` has it).
SOME_TEXT = AfterValidator(check_some_text)
SOME_TEXT_IN_SCHEMA = Field(json_schema_extra={"pattern": r"^[^\u0000]*[^\s\u0000][^\u0000]*$"})
Text = Annotated[StrictStr, SAFE_TEXT, TEXT_IN_SCHEMA]
Content = Annotated[StrictStr, Field(min_length=1, max_length=MAX_CONTENT_CHARS), SAFE_TEXT, SOME_TEXT,
                    SOME_TEXT_IN_SCHEMA]
# A memory's text as stored (history keeps earlier ones): what `Content` allows, blank or not.
StoredText = Annotated[StrictStr, Field(max_length=MAX_CONTENT_CHARS), SAFE_TEXT, TEXT_IN_SCHEMA]
QueryText = Annotated[StrictStr, Field(min_length=1, max_length=MAX_QUERY_CHARS), SAFE_TEXT, SOME_TEXT,
                      SOME_TEXT_IN_SCHEMA]
Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_CHARS), SAFE_TEXT, TEXT_IN_SCHEMA]
MessageId = Annotated[StrictStr, Field(min_length=1, max_length=MAX_MESSAGE_ID_CHARS, description="idempotency key"),
                      SAFE_TEXT, TEXT_IN_SCHEMA]
# The forms `check_timestamp` takes, as a pattern the OpenAPI schema can carry: a real day (30 days
# hath September, February 29 in leap years only) of the years 1 to 9999, as Python's datetime has
# them, so that what the schema admits the server accepts.
_YEAR = r"(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP_YEAR = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DAY = (rf"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
        rf"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)")
TIMESTAMP_PATTERN = (rf"^{_DAY}"
                     r"([T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?(Z|[+-][01][0-9]:[0-5][0-9])?)?$")
Timestamp = Annotated[StrictStr, Field(max_length=MAX_TIMESTAMP_CHARS, description="when it was said, ISO 8601"),
                      SAFE_TEXT, AfterValidator(check_timestamp),
                      Field(json_schema_extra={"pattern": TIMESTAMP_PATTERN})]
Expiry = Annotated[StrictStr, Field(max_length=MAX_TIMESTAMP_CHARS,
                                    description="when the memory expires, ISO 8601 (UTC if no zone)"),
                   SAFE_TEXT, AfterValidator(check_expiry), Field(json_schema_extra={"pattern": TIMESTAMP_PATTERN})]
USER_ID_SCHEMA = {"type": "string", "pattern": USER_ID_PATTERN, "maxLength": MAX_USER_ID_CHARS,
                  "description": USER_ID_RULE}
# Checked by `check_user_id` before anything else, so that its errors say what is wrong.
UserId = Annotated[StrictStr, BeforeValidator(check_user_id), WithJsonSchema(USER_ID_SCHEMA)]
NamedUserId = UserId  # a user id a request may name (memfleet serve's bodies)
# The pattern before the validator, so that it reaches the OpenAPI schema (the check runs first anyway).
MemoryId = Annotated[StrictStr, Field(description=MEMORY_ID_RULE, pattern=MEMORY_ID_PATTERN),
                     BeforeValidator(check_memory_id)]
MemoryIds = Annotated[list[MemoryId], BeforeValidator(_memory_ids_first),
                      Field(min_length=1, max_length=MAX_IDS_PER_WRITE, json_schema_extra={"uniqueItems": True})]
# For an integer field of a JSON body, after its bounds: `Annotated[int, Field(ge=1), JSON_INTEGER]`
# (bounds after a validator would reach the OpenAPI schema as "ge", which no client reads).
JSON_INTEGER = BeforeValidator(_json_integer)
# What the backends hand out: a memory's id (embedded) or a page number (hosted).
CURSOR_PATTERN = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,17})$"
Cursor = Annotated[StrictStr, Field(pattern=CURSOR_PATTERN, max_length=MAX_CURSOR_CHARS,
                                    description="the next_cursor of the previous page")]


def at_least_one_of(*fields: str, **conditions: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema that an object has at least one of `fields` (or a property meeting its condition):
    what a model's "change at least one thing" check says, for the OpenAPI schema."""
    choices: list[dict[str, Any]] = [{"required": [name]} for name in fields]
    choices += [{"required": [name], "properties": {name: condition}} for name, condition in conditions.items()]
    return {"anyOf": choices}


class ContractModel(BaseModel):
    """A message of the contract: unknown fields are refused, and it does not change once made."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Scoped(ContractModel):
    """A request for one user: the only scope any store call of it can have."""

    user_id: UserId
