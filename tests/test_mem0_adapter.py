"""The contract between memfleet and mem0's insides (`workers.mem0_adapter`): mem0's extraction
prompt and its reading of an answer, the payload a memory is stored with, and the history file an
older memfleet kept through mem0."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import psycopg
import pytest

from producer.contract import RESERVED_PAYLOAD_KEYS, Message
from tests.support import uid
from tests.test_isolation import _tables_containing
from workers import mem0_adapter
from workers.backends import pg_history
from workers.backends.embedded import EmbeddedBackend
from workers.backends.memories import memory_id
from workers.backends.migrations import import_history
from workers.scoped import AsyncScopedMemory

# sha256 of mem0ai 2.2.1's `AsyncMemory._create_memory` source, whose payload `new_payload` writes.
CREATE_MEMORY_SHA256 = "62cc0aae6d0e7179a251f6f710427dae292319a4c05a5bcf75e37baad2ca6083"


def test_another_mem0_is_refused_by_name() -> None:
    mem0_adapter.check_version(mem0_adapter.MEM0_VERSION)
    with pytest.raises(ImportError, match=r"mem0ai 2\.2\.1; found 2\.3\.0"):
        mem0_adapter.check_version("2.3.0")


def test_the_payload_is_the_one_mem0_writes() -> None:
    from mem0.memory.main import AsyncMemory

    source = inspect.getsource(AsyncMemory._create_memory)
    assert hashlib.sha256(source.encode()).hexdigest() == CREATE_MEMORY_SHA256, (
        "mem0's _create_memory changed: bring mem0_adapter.new_payload in line with it, then update the hash"
    )


def test_no_key_of_the_payload_can_be_set_by_a_caller() -> None:
    """The contract keeps caller metadata off every key the payload format uses, or a caller could
    name another user, or pass one text off as another."""
    payload = mem0_adapter.new_payload("u", "I keep bees", metadata={"colour": "blue"}, created_at="2023-05-18",
                                       role="user", name="Ana", timestamp="2023-05-18T10:00:00",
                                       attributed_to="user")
    assert set(payload) - {"colour"} <= RESERVED_PAYLOAD_KEYS
    assert mem0_adapter.kept_payload({**payload, "text_lemmatized": "keep bee"}) == payload
    assert mem0_adapter.caller_metadata(payload) == {"colour": "blue"}
    fields = mem0_adapter.read_payload(payload)
    assert (fields.text, fields.name, fields.role, fields.timestamp) == (
        "I keep bees", "Ana", "user", "2023-05-18T10:00:00")
    changed = mem0_adapter.changed_payload(payload, "2023-05-19", text="I keep wasps", metadata={"size": 3})
    assert mem0_adapter.caller_metadata(changed) == {"size": 3}
    assert mem0_adapter.read_payload(changed).text_hash == mem0_adapter.text_hash("I keep wasps") != fields.text_hash


def test_the_prompt_is_mem0s_with_the_users_context_in_its_sections() -> None:
    new = mem0_adapter.conversation([{"role": "user", "content": "Ana: I keep bees"},
                                     {"role": "assistant", "content": "Lovely"}])
    assert new == "user: Ana: I keep bees\nassistant: Lovely\n"
    system, prompt = mem0_adapter.extraction_prompt(["Ana lives in Lisbon"], new,
                                                    [{"role": "user", "content": "hello"}], "2023-05-18")
    assert system.lstrip().startswith("# ROLE") and '"memory"' in system
    sections = {part.split("\n", 1)[0]: part.split("\n", 1)[1].strip() for part in prompt.split("## ")[1:]}
    assert sections["Existing Memories"] == '[{"id": "0", "text": "Ana lives in Lisbon"}]'
    assert sections["New Messages"] == new.strip()
    assert sections["Last k Messages"] == "user: hello"
    assert sections["Observation Date"] == "2023-05-18"


@pytest.mark.parametrize(("answer", "facts"), [
    ('{"memory": [{"id": "0", "text": "Ana keeps bees", "attributed_to": "user"}]}',
     [{"id": "0", "text": "Ana keeps bees", "attributed_to": "user"}]),
    ('```json\n{"memory": [{"id": "0", "text": "fenced"}]}\n```', [{"id": "0", "text": "fenced"}]),
    ('<think>hmm</think>{"memory": []}', []),
    ('Here you go: {"memory": [{"text": "around text"}, "not a dict"]} hope it helps', [{"text": "around text"}]),
    ("", []),  # mem0: an empty answer extracts nothing
    ("I cannot help with that", None),
    ('{"facts": ["an older format"]}', None),
    ('{"memory": "not a list"}', None),
])
def test_answers_are_read_as_mem0_reads_them(answer: str, facts: list[dict[str, str]] | None) -> None:
    assert mem0_adapter.extracted(answer) == facts


def test_sampling_is_what_mem0s_openai_llm_sends() -> None:
    assert mem0_adapter.sampling("gpt-4.1-nano") == {"temperature": 0.1, "top_p": 0.1, "max_tokens": 2000}
    assert mem0_adapter.sampling("o3-mini") == {}  # reasoning models refuse sampling parameters


async def test_an_old_history_db_is_imported_once_without_orphans_and_then_removed(
    backend: EmbeddedBackend, tmp_path: Path
) -> None:
    from mem0.memory.storage import SQLiteManager

    user = uid("upgrade")
    kept, gone = memory_id(user, "id:kept"), memory_id(user, "id:gone")  # ids from idempotency keys
    await AsyncScopedMemory(user, backend).add([Message(content="I moved to Porto", id="kept")])
    path = tmp_path / "history.db"
    old = SQLiteManager(str(path))  # what an older memfleet's workers wrote, through mem0
    old.add_history(kept, None, "I moved to Porto", "ADD")
    old.add_history(kept, "I moved to Porto", "I moved to Porto in 2021", "UPDATE")
    old.add_history(gone, None, "a memory deleted long ago", "ADD")  # its memory no longer exists
    old.save_messages([{"role": "user", "content": "where do I live?"}], f"user_id={user}")
    old.close()

    assert import_history(backend.pool, path) == 2 + 1  # both rows of the kept memory, one message
    assert not path.exists()
    assert import_history(backend.pool, path) == 0
    with psycopg.connect(str(backend.pool.conninfo)) as conn:
        events = [(h["event"], h["new_memory"]) for h in pg_history.history(conn, user, kept)]
        messages = pg_history.last_messages(conn, user, f"user_id={user}", 10)
        # The ADD row memfleet wrote with the memory stands; the old file's ADD duplicate is skipped.
        assert events == [("ADD", "I moved to Porto"), ("UPDATE", "I moved to Porto in 2021")]
        assert [m["content"] for m in messages] == ["where do I live?"]
        assert _tables_containing(conn, ["a memory deleted long ago"]) == []
