"""Each user's memory history (mem0's history rows) and session messages (the context of
`infer=True` extraction), in memfleet's tables."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import psycopg

from workers.backends.pg_schema import HISTORY, MESSAGES


def add_history(conn: psycopg.Connection[Any], user_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """History rows of one user's memories, as mem0's `batch_add_history` takes them. An ADD row for a
    memory that has one already is skipped: `insert` wrote it, in the memory's own statement. A
    DELETE row carries no text, and strips the memory's earlier rows of theirs (mem0 would keep them)."""
    rows = [{**r, "old_memory": None, "new_memory": None, "actor_id": None} if r["event"] == "DELETE" else r
            for r in rows]
    deleted = [r["memory_id"] for r in rows if r["event"] == "DELETE"]
    if deleted:
        conn.execute(f"UPDATE {HISTORY} SET old_memory = NULL, new_memory = NULL, actor_id = NULL "
                     "WHERE user_id = %s AND memory_id = ANY(%s::uuid[])", (user_id, deleted))
    with conn.cursor() as cur:
        cur.executemany(
            f"""INSERT INTO {HISTORY} (user_id, id, memory_id, old_memory, new_memory, event, created_at, updated_at,
                                       is_deleted, actor_id, role)
                SELECT %(user_id)s, coalesce(%(id)s::uuid, gen_random_uuid()), %(memory_id)s, %(old_memory)s,
                       %(new_memory)s, %(event)s, %(created_at)s, %(updated_at)s, %(is_deleted)s, %(actor_id)s,
                       %(role)s
                WHERE %(event)s <> 'ADD' OR NOT EXISTS (SELECT 1 FROM {HISTORY} h WHERE h.user_id = %(user_id)s
                                                         AND h.memory_id = %(memory_id)s AND h.event = 'ADD')
                ON CONFLICT DO NOTHING""",
            [{"user_id": user_id, "id": r.get("id"), "memory_id": r["memory_id"], "old_memory": r.get("old_memory"),
              "new_memory": r.get("new_memory"), "event": r["event"], "created_at": r.get("created_at"),
              "updated_at": r.get("updated_at"), "is_deleted": bool(r.get("is_deleted")),
              "actor_id": r.get("actor_id"), "role": r.get("role")} for r in rows],
        )


def history(conn: psycopg.Connection[Any], user_id: str, memory_id: str) -> builtins.list[dict[str, Any]]:
    cur = conn.execute(
        f"""SELECT id::text, memory_id::text, old_memory, new_memory, event, created_at, updated_at, is_deleted,
                   actor_id, role
            FROM {HISTORY} WHERE user_id = %s AND memory_id = %s ORDER BY created_at, updated_at""",
        (user_id, memory_id),
    )
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def save_messages(conn: psycopg.Connection[Any], user_id: str, session_scope: str,
                  messages: Sequence[dict[str, Any]], keep: int, now: str) -> None:
    """Append a session's messages and keep only its last `keep` (mem0's `save_messages`). A message
    with an `id` that is there already is not added again; `created_at` defaults to `now`."""
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {MESSAGES} (user_id, id, session_scope, role, content, name, created_at) "
            "VALUES (%s, coalesce(%s::uuid, gen_random_uuid()), %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [(user_id, m.get("id"), session_scope, m.get("role"), m.get("content"), m.get("name"),
              m.get("created_at") or now) for m in messages],
        )
    conn.execute(
        f"""DELETE FROM {MESSAGES} WHERE user_id = %(u)s AND session_scope = %(s)s AND id NOT IN (
                SELECT id FROM {MESSAGES} WHERE user_id = %(u)s AND session_scope = %(s)s
                ORDER BY created_at DESC LIMIT %(keep)s)""",
        {"u": user_id, "s": session_scope, "keep": keep},
    )


def last_messages(conn: psycopg.Connection[Any], user_id: str, session_scope: str,
                  limit: int) -> builtins.list[dict[str, Any]]:
    rows = conn.execute(
        f"""SELECT role, content, name, created_at FROM (
                SELECT role, content, name, created_at FROM {MESSAGES}
                WHERE user_id = %s AND session_scope = %s ORDER BY created_at DESC LIMIT %s
            ) AS last ORDER BY created_at""",
        (user_id, session_scope, limit),
    ).fetchall()
    return [{"role": r[0], "content": r[1], "name": r[2], "created_at": r[3]} for r in rows]
