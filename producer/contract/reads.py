"""Reads: search, a page of the list, one memory, its history, a page of the export, and owners.

Each is a job on the interactive queue; none changes anything.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from producer.contract.metadata import Filters
from producer.contract.rules import (
    MAX_IDS_PER_WRITE,
    MAX_PAGE_SIZE,
    MAX_SEARCH_LIMIT,
    ContractModel,
    Cursor,
    MemoryId,
    MemoryIds,
    QueryText,
    Scoped,
)
from producer.contract.writes import ExportedMemory


class SearchRequest(Scoped):
    kind: Literal["search"] = "search"
    query: QueryText
    limit: Annotated[int, Field(ge=1, le=MAX_SEARCH_LIMIT)] = 10
    filters: Filters = Field(default_factory=dict)


class ListRequest(Scoped):
    kind: Literal["list"] = "list"
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)] = 100
    cursor: Cursor | None = None  # opaque: the `next_cursor` of the previous page


class GetRequest(Scoped):
    kind: Literal["get"] = "get"
    memory_id: MemoryId


class HistoryRequest(Scoped):
    kind: Literal["history"] = "history"
    memory_id: MemoryId


class ExportRequest(Scoped):
    """A page of the user's whole record (`ExportedMemory`), in id order."""

    kind: Literal["export"] = "export"
    limit: Annotated[int, Field(ge=1, le=MAX_IDS_PER_WRITE)] = MAX_IDS_PER_WRITE
    cursor: Cursor | None = None


class ExportPage(ContractModel):
    memories: list[ExportedMemory]
    next_cursor: str | None = None


class OwnersRequest(ContractModel):
    """Which users hold these memory ids. The one read not scoped to a user: an app key, which may
    act for any user, names a memory by id alone on mem0's routes, and this finds whose it is."""

    kind: Literal["owners"] = "owners"
    memory_ids: MemoryIds
