"""The job contract shared by producers and workers: payload models and the rules they enforce.

Every rule about what a user id, a memory id, a message, metadata or a filter may be lives in this
package and nowhere else. The producer applies it on enqueue, the worker again on receipt, and
`AsyncScopedMemory` on construction, so a job put on the queue by hand is held to the same rules.

- `rules`: every limit, and the rules of ids, strings and times, as checks and as field types;
- `metadata`: what a caller may attach to a memory (metadata) and search by (filters);
- `writes`: add, forget, update, delete and import, the write op that carries them, and what a
  write did (`WriteOutcome`, `DeadLetter`);
- `reads`: search, list, get, history, export and owners;
- `records`: what reads answer (`MemoryRecord`, `MemoryPage`, `HistoryEvent`).

Import from here: `from producer.contract import AddRequest, check_user_id`.
"""

from producer.contract.metadata import (
    FILTER_OPERATORS as FILTER_OPERATORS,
)
from producer.contract.metadata import (
    LOGICAL_OPERATORS as LOGICAL_OPERATORS,
)
from producer.contract.metadata import (
    METADATA_KEY_PATTERN as METADATA_KEY_PATTERN,
)
from producer.contract.metadata import (
    Filters as Filters,
)
from producer.contract.metadata import (
    Metadata as Metadata,
)
from producer.contract.metadata import (
    check_filters as check_filters,
)
from producer.contract.metadata import (
    check_metadata as check_metadata,
)
from producer.contract.metadata import (
    check_write_metadata as check_write_metadata,
)
from producer.contract.metadata import (
    filters_json_schema as filters_json_schema,
)
from producer.contract.metadata import (
    metadata_bytes as metadata_bytes,
)
from producer.contract.metadata import (
    metadata_json_schema as metadata_json_schema,
)
from producer.contract.reads import (
    ExportPage as ExportPage,
)
from producer.contract.reads import (
    ExportRequest as ExportRequest,
)
from producer.contract.reads import (
    GetRequest as GetRequest,
)
from producer.contract.reads import (
    HistoryRequest as HistoryRequest,
)
from producer.contract.reads import (
    ListRequest as ListRequest,
)
from producer.contract.reads import (
    OwnersRequest as OwnersRequest,
)
from producer.contract.reads import (
    SearchRequest as SearchRequest,
)
from producer.contract.records import (
    HistoryEvent as HistoryEvent,
)
from producer.contract.records import (
    MemoryPage as MemoryPage,
)
from producer.contract.records import (
    MemoryRecord as MemoryRecord,
)
from producer.contract.rules import (
    CURSOR_PATTERN as CURSOR_PATTERN,
)
from producer.contract.rules import (
    JSON_INTEGER as JSON_INTEGER,
)
from producer.contract.rules import (
    MAX_CONTENT_CHARS as MAX_CONTENT_CHARS,
)
from producer.contract.rules import (
    MAX_CURSOR_CHARS as MAX_CURSOR_CHARS,
)
from producer.contract.rules import (
    MAX_FILTER_CONDITIONS as MAX_FILTER_CONDITIONS,
)
from producer.contract.rules import (
    MAX_FILTER_VALUE_CHARS as MAX_FILTER_VALUE_CHARS,
)
from producer.contract.rules import (
    MAX_FILTER_VALUES as MAX_FILTER_VALUES,
)
from producer.contract.rules import (
    MAX_HISTORY_EVENTS as MAX_HISTORY_EVENTS,
)
from producer.contract.rules import (
    MAX_IDS_PER_WRITE as MAX_IDS_PER_WRITE,
)
from producer.contract.rules import (
    MAX_MESSAGE_ID_CHARS as MAX_MESSAGE_ID_CHARS,
)
from producer.contract.rules import (
    MAX_MESSAGES_PER_JOB as MAX_MESSAGES_PER_JOB,
)
from producer.contract.rules import (
    MAX_METADATA_KEY_CHARS as MAX_METADATA_KEY_CHARS,
)
from producer.contract.rules import (
    MAX_METADATA_KEYS as MAX_METADATA_KEYS,
)
from producer.contract.rules import (
    MAX_METADATA_VALUE_CHARS as MAX_METADATA_VALUE_CHARS,
)
from producer.contract.rules import (
    MAX_NAME_CHARS as MAX_NAME_CHARS,
)
from producer.contract.rules import (
    MAX_PAGE_SIZE as MAX_PAGE_SIZE,
)
from producer.contract.rules import (
    MAX_QUERY_CHARS as MAX_QUERY_CHARS,
)
from producer.contract.rules import (
    MAX_ROW_METADATA_BYTES as MAX_ROW_METADATA_BYTES,
)
from producer.contract.rules import (
    MAX_SEARCH_LIMIT as MAX_SEARCH_LIMIT,
)
from producer.contract.rules import (
    MAX_TIMESTAMP_CHARS as MAX_TIMESTAMP_CHARS,
)
from producer.contract.rules import (
    MAX_USER_ID_CHARS as MAX_USER_ID_CHARS,
)
from producer.contract.rules import (
    MAX_WRITE_METADATA_BYTES as MAX_WRITE_METADATA_BYTES,
)
from producer.contract.rules import (
    MEMORY_ID_PATTERN as MEMORY_ID_PATTERN,
)
from producer.contract.rules import (
    MEMORY_ID_RULE as MEMORY_ID_RULE,
)
from producer.contract.rules import (
    RESERVED_PAYLOAD_KEYS as RESERVED_PAYLOAD_KEYS,
)
from producer.contract.rules import (
    SAFE_TEXT as SAFE_TEXT,
)
from producer.contract.rules import (
    SCOPE_KEYS as SCOPE_KEYS,
)
from producer.contract.rules import (
    SOME_TEXT as SOME_TEXT,
)
from producer.contract.rules import (
    SOME_TEXT_IN_SCHEMA as SOME_TEXT_IN_SCHEMA,
)
from producer.contract.rules import (
    TEXT_IN_SCHEMA as TEXT_IN_SCHEMA,
)
from producer.contract.rules import (
    TEXT_PATTERN as TEXT_PATTERN,
)
from producer.contract.rules import (
    TIMESTAMP_PATTERN as TIMESTAMP_PATTERN,
)
from producer.contract.rules import (
    USER_ID_PATTERN as USER_ID_PATTERN,
)
from producer.contract.rules import (
    USER_ID_RULE as USER_ID_RULE,
)
from producer.contract.rules import (
    USER_ID_SCHEMA as USER_ID_SCHEMA,
)
from producer.contract.rules import (
    Content as Content,
)
from producer.contract.rules import (
    ContractModel as ContractModel,
)
from producer.contract.rules import (
    Cursor as Cursor,
)
from producer.contract.rules import (
    Expiry as Expiry,
)
from producer.contract.rules import (
    MemoryId as MemoryId,
)
from producer.contract.rules import (
    MemoryIds as MemoryIds,
)
from producer.contract.rules import (
    MessageId as MessageId,
)
from producer.contract.rules import (
    Name as Name,
)
from producer.contract.rules import (
    NamedUserId as NamedUserId,
)
from producer.contract.rules import (
    QueryText as QueryText,
)
from producer.contract.rules import (
    Scalar as Scalar,
)
from producer.contract.rules import (
    Scoped as Scoped,
)
from producer.contract.rules import (
    StoredText as StoredText,
)
from producer.contract.rules import (
    Text as Text,
)
from producer.contract.rules import (
    Timestamp as Timestamp,
)
from producer.contract.rules import (
    UserId as UserId,
)
from producer.contract.rules import (
    at_least_one_of as at_least_one_of,
)
from producer.contract.rules import (
    check_expiry as check_expiry,
)
from producer.contract.rules import (
    check_future as check_future,
)
from producer.contract.rules import (
    check_memory_id as check_memory_id,
)
from producer.contract.rules import (
    check_memory_ids as check_memory_ids,
)
from producer.contract.rules import (
    check_some_text as check_some_text,
)
from producer.contract.rules import (
    check_text as check_text,
)
from producer.contract.rules import (
    check_timestamp as check_timestamp,
)
from producer.contract.rules import (
    check_user_id as check_user_id,
)
from producer.contract.rules import (
    describe as describe,
)
from producer.contract.rules import (
    parse as parse,
)
from producer.contract.rules import (
    shown_name as shown_name,
)
from producer.contract.writes import (
    WRITE_KINDS as WRITE_KINDS,
)
from producer.contract.writes import (
    AddRequest as AddRequest,
)
from producer.contract.writes import (
    DeadLetter as DeadLetter,
)
from producer.contract.writes import (
    DeleteRequest as DeleteRequest,
)
from producer.contract.writes import (
    EncodedMessage as EncodedMessage,
)
from producer.contract.writes import (
    ExportedMemory as ExportedMemory,
)
from producer.contract.writes import (
    ForgetRequest as ForgetRequest,
)
from producer.contract.writes import (
    ImportRequest as ImportRequest,
)
from producer.contract.writes import (
    MemoryChange as MemoryChange,
)
from producer.contract.writes import (
    Message as Message,
)
from producer.contract.writes import (
    UpdateRequest as UpdateRequest,
)
from producer.contract.writes import (
    WriteKind as WriteKind,
)
from producer.contract.writes import (
    WriteOp as WriteOp,
)
from producer.contract.writes import (
    WriteOutcome as WriteOutcome,
)
from producer.contract.writes import (
    WriteRequest as WriteRequest,
)
from producer.contract.writes import (
    encode_message as encode_message,
)
from producer.contract.writes import (
    new_op_ids as new_op_ids,
)
from producer.errors import InvalidUserId as InvalidUserId  # raised by check_user_id; its callers catch it here
