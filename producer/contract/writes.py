"""Writes: add, forget, update, delete and import, as a user's write log holds them, and what each did.

A write goes into its user's log and is applied in order (workers.write_log); update, delete and
import name memories by id and apply to all of them or, if one is not the user's, to none.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Annotated, Literal, NewType

from pydantic import ConfigDict, Field, SerializeAsAny, StrictBool, StrictStr, model_validator
from pydantic.json_schema import SkipJsonSchema

from producer.contract.metadata import Metadata, check_write_metadata
from producer.contract.records import HistoryEvent
from producer.contract.rules import (
    MAX_HISTORY_EVENTS,
    MAX_IDS_PER_WRITE,
    MAX_MESSAGES_PER_JOB,
    Content,
    ContractModel,
    Expiry,
    MemoryId,
    MemoryIds,
    MessageId,
    Name,
    Scoped,
    Timestamp,
    UserId,
    at_least_one_of,
    check_memory_ids,
    check_user_id,
)
from producer.errors import InvalidRequest


class Message(ContractModel):
    role: Literal["user", "assistant"] = "user"
    content: Content
    name: Name | None = None
    id: MessageId | None = None
    timestamp: Timestamp | None = None
    metadata: Metadata = Field(default_factory=dict)


class AddRequest(Scoped):
    kind: Literal["add"] = "add"
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES_PER_JOB)]
    metadata: Metadata = Field(default_factory=dict)
    infer: StrictBool = False
    expires_at: Expiry | None = None  # every memory of the write expires then

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


class ForgetRequest(Scoped):
    kind: Literal["forget"] = "forget"


class MemoryChange(ContractModel):
    """What an update changes in one memory; a field left out stays as it is."""

    # The schema says what `_something` checks: at least one change (a null is no change, so none
    # of them is nullable in the schema), and an expiry set or cleared, not both.
    model_config = ConfigDict(json_schema_extra=at_least_one_of(
        "text", "metadata", "timestamp", "expires_at", clear_expiry={"const": True},
    ) | {"not": {"required": ["expires_at", "clear_expiry"], "properties": {"clear_expiry": {"const": True}}}})

    memory_id: MemoryId
    text: Content | SkipJsonSchema[None] = None
    metadata: Metadata | SkipJsonSchema[None] = Field(default=None, description="replaces the memory's metadata")
    timestamp: Timestamp | SkipJsonSchema[None] = None
    expires_at: Expiry | SkipJsonSchema[None] = None
    clear_expiry: StrictBool = Field(default=False, description="the memory no longer expires")

    @model_validator(mode="after")
    def _something(self) -> MemoryChange:
        if self.expires_at is not None and self.clear_expiry:
            raise ValueError("give expires_at or clear_expiry, not both")
        if (self.text, self.metadata, self.timestamp, self.expires_at) == (None, None, None, None) \
                and not self.clear_expiry:
            raise ValueError("an update changes at least one of text, metadata, timestamp or expiry")
        return self


class UpdateRequest(Scoped):
    """Changes to memories of one user, applied all together or, if any id is not the user's, not at all."""

    kind: Literal["update"] = "update"
    changes: Annotated[list[MemoryChange], Field(min_length=1, max_length=MAX_IDS_PER_WRITE)]

    @model_validator(mode="after")
    def _once_each(self) -> UpdateRequest:
        check_memory_ids([c.memory_id for c in self.changes])
        check_write_metadata({}, [c.metadata or {} for c in self.changes])
        return self


class DeleteRequest(Scoped):
    """Memories of one user to delete, all of them or, if any id is not the user's, none."""

    kind: Literal["delete"] = "delete"
    memory_ids: MemoryIds


class ExportedMemory(ContractModel):
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
    # Its own events: a restore keeps them as this memory's, whatever memory id they carry.
    history: Annotated[list[HistoryEvent], Field(max_length=MAX_HISTORY_EVENTS)] = Field(default_factory=list)


class ImportRequest(Scoped):
    """Exported memories of one user, restored with their ids; one already there is left as it is."""

    kind: Literal["import"] = "import"
    memories: Annotated[list[ExportedMemory], Field(min_length=1, max_length=MAX_IDS_PER_WRITE,
                                                    json_schema_extra={"uniqueItems": True})]

    @model_validator(mode="after")
    def _all_of_the_user(self) -> ImportRequest:
        if any(m.user_id != self.user_id for m in self.memories):
            raise ValueError("every imported memory must be of the user the import is for")
        check_memory_ids([m.id for m in self.memories])
        check_write_metadata({}, [m.metadata for m in self.memories])
        return self


WriteRequest = AddRequest | ForgetRequest | UpdateRequest | DeleteRequest | ImportRequest
WriteKind = Literal["add", "forget", "update", "delete", "import"]
WRITE_KINDS: tuple[WriteKind, ...] = ("add", "forget", "update", "delete", "import")


class WriteOp(ContractModel):
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


class WriteOutcome(ContractModel):
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


class DeadLetter(ContractModel):
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
