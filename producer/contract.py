"""The job contract shared by producers and workers: payload models and the rules they enforce.

Every rule about what a user id, a message, metadata or a filter may be lives here and nowhere
else. The producer applies it on enqueue, the worker again on receipt, and `AsyncScopedMemory`
on construction, so a job put on the queue by hand is held to the same rules.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, NewType, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
)

from producer.errors import InvalidRequest
from producer.errors import InvalidUserId as InvalidUserId  # raised by check_user_id; its callers catch it here

MAX_USER_ID_CHARS = 128
MAX_CONTENT_CHARS = 16_000
MAX_MESSAGES_PER_JOB = 256
MAX_QUERY_CHARS = 2_000
MAX_SEARCH_LIMIT = 100
MAX_PAGE_SIZE = 1_000
MAX_METADATA_KEYS = 32

# Letters, digits and `_ . : @ -`, starting with a letter or digit. Everything else is refused
# rather than normalized, because each refused class aliases or widens a scope somewhere:
# whitespace is trimmed by mem0 ("alice " is "alice"), "*" is a wildcard in mem0's pgvector
# filters and the hosted API (every user), `%&=` are escaped into mem0's session-scope key,
# non-strings are coerced (7 is "7"), and look-alike Unicode hides one id behind another.
USER_ID_RULE = (
    f"1 to {MAX_USER_ID_CHARS} ASCII letters, digits and '_ . : @ -', starting with a letter or digit"
)
_USER_ID_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:@-]{{0,{MAX_USER_ID_CHARS - 1}}}")

# Keys that carry a memory's scope or mem0's own bookkeeping in the stored payload. Caller
# metadata and filters may never name them: that is how one user's data would claim, or read,
# another's scope.
SCOPE_KEYS = frozenset({"user_id", "agent_id", "run_id", "actor_id", "app_id", "org_id", "project_id"})
RESERVED_PAYLOAD_KEYS = SCOPE_KEYS | frozenset(
    {"data", "hash", "created_at", "updated_at", "text_lemmatized", "role", "attributed_to",
     "expiration_date", "id", "memory", "score", "idempotency_key", "name", "timestamp"}
)
_METADATA_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
FILTER_OPERATORS = frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "nin", "contains", "icontains"})
LOGICAL_OPERATORS = frozenset({"AND", "OR", "NOT"})

Scalar = str | int | float | bool | None


M = TypeVar("M", bound=BaseModel)


def describe(exc: ValidationError) -> str:
    """One line naming the first field that failed, and why; never the value it had."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "input"
    return f"invalid {field}: {first['msg']}"


def parse(model: type[M], payload: Any) -> M:
    """`payload` as a `model`, or `InvalidRequest` naming the first problem (never pydantic's error)."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc)) from None


def check_timestamp(value: str) -> str:
    """An ISO 8601 date or date-time, returned in one canonical form (`datetime.isoformat`)."""
    try:
        return datetime.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError("timestamp must be ISO 8601, e.g. 2023-05-18T13:47:00 or 2023-05-18T13:47:00+00:00") from None


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


UserId = Annotated[StrictStr, Field(description=USER_ID_RULE)]


def _check_metadata_key(key: object, where: str) -> str:
    if not isinstance(key, str) or _METADATA_KEY_RE.fullmatch(key) is None:
        raise ValueError(f"{where} key {key!r} must be 1-64 letters, digits or '_', not starting with a digit")
    if key.lower() in RESERVED_PAYLOAD_KEYS:
        raise ValueError(f"{where} key {key!r} is reserved: the user's scope is set by the job, not by {where}")
    return key


def check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata has {len(metadata)} keys, over the limit of {MAX_METADATA_KEYS}")
    for key, value in metadata.items():
        _check_metadata_key(key, "metadata")
        if not isinstance(value, str | int | float | bool | type(None)):
            raise ValueError(f"metadata[{key!r}] must be a string, number, boolean or null")
    return metadata


def check_filters(filters: dict[str, Any], *, top: bool = True) -> dict[str, Any]:
    """Allow filters on the caller's own metadata only; refuse anything that names a scope key.

    AND/OR/NOT are allowed at the top level over plain conditions: that is all mem0's filter
    translation understands, and a deeper tree would be silently misread rather than refused.
    """
    for key, value in filters.items():
        if key in LOGICAL_OPERATORS:
            if not top:
                raise ValueError(f"filter {key} is not allowed below the top level: use it over plain conditions")
            if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
                raise ValueError(f"filter {key} takes a non-empty list of conditions")
            for condition in value:
                check_filters(condition, top=False)
            continue
        if isinstance(key, str) and key.startswith("$"):
            raise ValueError(f"filter key {key!r} is not allowed: use AND, OR or NOT")
        if isinstance(key, str) and key.lower() in SCOPE_KEYS:
            raise ValueError(f"filter key {key!r} is not allowed: the user's scope is fixed by the job")
        _check_metadata_key(key, "filter")
        operands = list(value.values()) if isinstance(value, dict) else [value]
        if isinstance(value, dict):
            if not value:
                raise ValueError(f"filter on {key!r} has no operator")
            for op, operand in value.items():
                if op not in FILTER_OPERATORS:
                    raise ValueError(f"filter operator {op!r} on {key!r} is not one of {sorted(FILTER_OPERATORS)}")
                if (op in ("in", "nin")) != isinstance(operand, list):
                    raise ValueError(f"filter operator {op!r} on {key!r} takes " +
                                     ("a list of values" if op in ("in", "nin") else "a single value"))
        flat = [v for operand in operands for v in (operand if isinstance(operand, list) else [operand])]
        if not all(isinstance(v, str | int | float | bool) for v in flat):
            raise ValueError(f"filter on {key!r} takes plain values (strings, numbers, booleans)")
        if "*" in flat:
            # mem0's any-value wildcard; refusing it everywhere means no wildcard reaches a store.
            raise ValueError(f"filter on {key!r}: '*' is not allowed")
    return filters


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
    content: Annotated[StrictStr, Field(min_length=1, max_length=MAX_CONTENT_CHARS)]
    name: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None
    id: Annotated[StrictStr, Field(min_length=1, max_length=256, description="idempotency key")] | None = None
    timestamp: Annotated[StrictStr, Field(max_length=64, description="when it was said, ISO 8601")] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

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

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_metadata(value)


class AddRequest(_Scoped):
    kind: Literal["add"] = "add"
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES_PER_JOB)]
    metadata: dict[str, Any] = Field(default_factory=dict)
    infer: StrictBool = False

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_metadata(value)

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


class SearchRequest(_Scoped):
    kind: Literal["search"] = "search"
    query: Annotated[StrictStr, Field(min_length=1, max_length=MAX_QUERY_CHARS)]
    limit: Annotated[int, Field(ge=1, le=MAX_SEARCH_LIMIT)] = 10
    filters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query is blank")
        return value

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_filters(value)


class ListRequest(_Scoped):
    kind: Literal["list"] = "list"
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)] = 100
    # Opaque: the `next_cursor` of the previous page.
    cursor: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")] | None = None


WriteRequest = AddRequest | ForgetRequest


class WriteOp(_Model):
    """A write waiting in its user's ordered log (see `producer.keys.write_log`)."""

    op_id: StrictStr
    # SerializeAsAny: the request is always one of the two (validation sees to it), and pydantic's
    # serializer for a union checks each nested message against the union first, which made
    # dumping a write twice as slow as dumping its request (bulk ingest dumps every message once).
    request: SerializeAsAny[Annotated[AddRequest | ForgetRequest, Field(discriminator="kind")]]

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
        return b'{"op_id":"%s","request":{"user_id":"%s","kind":"add","messages":[%s],"metadata":{},"infer":false}}' % (
            op_id.encode(), user_id.encode(), b",".join(messages))


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


class MemoryPage(_Model):
    memories: list[MemoryRecord]
    next_cursor: str | None = None


class WriteOutcome(_Model):
    """What a write did. Ids and counts only: outcomes sit in Redis, so they carry no text."""

    op_id: str
    kind: Literal["add", "forget"] | None
    stored: int = 0
    duplicates: int = 0
    deleted: int = 0
    memory_ids: list[str] = Field(default_factory=list)
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
