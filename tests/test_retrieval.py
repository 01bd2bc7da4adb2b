"""Retrieval: what a memory is indexed with, how a user's memories are ranked, and whether the
answers to real questions are found (LoCoMo evidence recall, through the queue)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb

from producer.client import Memfleet
from producer.contract import AddRequest, Message
from producer.ingest import group, read_messages
from tests.support import locomo_file, scratch_database, uid
from workers.backends import pg_search, pg_store, search_index
from workers.backends.embedded import EmbeddedBackend
from workers.backends.indexing import Said, dense_text, in_context, keyword_text
from workers.backends.memories import memory_id
from workers.backends.pg_pool import register_vector_dumper
from workers.backends.pg_server import prepare_database
from workers.scoped import AsyncScopedMemory

RECALL_FLOOR = 0.60  # recall@10 on one shared conversation; the benchmark's goal is 0.70 on all seven


def test_a_memory_is_indexed_with_its_speaker_date_and_the_messages_before_it() -> None:
    asked = Said("What did you do last weekend?", "Melanie", "2023-05-18T13:47:00")
    answer = Said("I went to a LGBTQ support group", "Caroline", "2023-05-18T13:48:00")
    assert dense_text(answer) == "Caroline: I went to a LGBTQ support group"
    assert keyword_text(answer, [asked]) == (
        "[18 May 2023] Melanie: What did you do last weekend?\n[18 May 2023] Caroline: I went to a LGBTQ support group"
    )
    assert dense_text(Said("plain")) == "plain" == keyword_text(Said("plain"))
    indexed = in_context([Said(f"m{i}") for i in range(4)])
    assert [ix.own for ix in indexed] == ["m0", "m1", "m2", "m3"]  # each line is stored once ...
    assert [ix.context for ix in indexed] == ["", "m0", "m0\nm1", "m1\nm2"]  # ... and counts for the next two
    assert [ix.followers for ix in indexed] == [(1, 2), (2, 3), (3,), ()]
    assert [f"{ix.context}\n{ix.own}".strip() for ix in indexed] == [
        keyword_text(Said(f"m{i}"), [Said(f"m{j}") for j in range(i)]) for i in range(4)]


async def test_records_keep_the_message_as_written_with_name_and_timestamp(backend: EmbeddedBackend) -> None:
    user = uid("said")
    await AsyncScopedMemory(user, backend).add([
        {"content": "I adopted a greyhound", "name": "Ana", "timestamp": "2023-05-18T13:47:00+00:00",
         "metadata": {"topic": "pets"}},
    ])
    (record,) = await AsyncScopedMemory(user, backend).search("Which dog did Ana adopt?")
    assert (record.text, record.name, record.timestamp, record.role) == (
        "I adopted a greyhound", "Ana", "2023-05-18T13:47:00+00:00", "user")
    assert record.metadata == {"topic": "pets"}


async def test_any_word_of_a_question_can_match_and_rare_words_weigh_most(backend: EmbeddedBackend) -> None:
    user = uid("bm25")
    texts = ["we talked about the weather", "the weather was nice", "my cousin plays the theremin",
             "the weather again", "I bought groceries"]
    await AsyncScopedMemory(user, backend).add(texts)
    # plainto_tsquery would need every word; BM25 over OR-matched terms ranks the rare one first.
    found = await AsyncScopedMemory(user, backend).search("what instrument is a theremin, and how is the weather?")
    assert found[0].text == "my cousin plays the theremin"


async def test_an_answer_is_found_by_the_words_of_the_question_it_answers(backend: EmbeddedBackend) -> None:
    user = uid("context")
    messages = [{"content": "Where did you go on your honeymoon?", "name": "Jon"},
                {"content": "Somewhere warm, we loved every minute of it", "name": "Gina"},
                *({"content": f"filler message number {i} about work", "name": "Jon"} for i in range(20))]
    await AsyncScopedMemory(user, backend).add(messages)
    found = await AsyncScopedMemory(user, backend).search("Where did Gina go on her honeymoon?", limit=2)
    assert "Somewhere warm, we loved every minute of it" in [r.text for r in found]


def test_a_line_stored_once_scores_as_if_every_context_held_a_copy(backend: EmbeddedBackend) -> None:
    """Postings hold each message's own line once, and count it for the memories after it: the scores
    are those of BM25 over each memory's whole keyword text, stored with every context line."""
    split, whole = uid("split"), uid("whole")
    said = [Said(text, name, f"2023-05-{day:02d}T10:00:00") for text, name, day in [
        ("Where did you go on your honeymoon?", "Jon", 8), ("Somewhere warm, to Lisbon", "Gina", 8),
        ("We loved the food there", "Gina", 8), ("My sister opened a dance studio", "Jon", 9),
        ("Which dance does she teach?", "Gina", 9), ("Tango, and the studio is in Lisbon too", "Jon", 9)]]
    vector = np.full(384, 0.05, dtype=np.float32)
    split_ids = [memory_id(split, str(i)) for i in range(len(said))]
    with psycopg.connect(str(backend.pool.conninfo)) as conn:
        register_vector_dumper(conn)
        pg_store.insert(conn, split, [
            pg_store.NewMemory(split_ids[i], vector, {"data": s.content}, ix.own, ix.context,
                               tuple(split_ids[f] for f in ix.followers))
            for i, (s, ix) in enumerate(zip(said, in_context(said), strict=True))])
        pg_store.insert(conn, whole, [
            pg_store.NewMemory(memory_id(whole, str(i)), vector, {"data": s.content}, keyword_text(s, said[:i]))
            for i, s in enumerate(said)])
        for query in ("Where is the dance studio?", "Gina Lisbon honeymoon", "What happened on 9 May 2023?"):
            found = {user: {r.payload["data"]: r.score for r in pg_search.search(conn, user, query, vector, 6, {})}
                     for user in (split, whole)}  # by text: equal scores are ordered by id, which differ
            assert found[split] == pytest.approx(found[whole])
            assert len(set(found[split].values())) > 2  # the query tells the memories apart
        with conn.transaction():
            for user in (split, whole):
                pg_store.delete_user(conn, user)


async def test_another_users_memories_do_not_move_a_users_scores(backend: EmbeddedBackend) -> None:
    """BM25's document frequencies and lengths are the user's own (invariant 8)."""
    alice, mallory = uid("alice"), uid("mallory")
    texts = ["I grow tomatoes on my balcony", "tomatoes and basil go well together", "I run every morning"]
    await AsyncScopedMemory(alice, backend).add(texts)
    before = [(r.id, r.score) for r in await AsyncScopedMemory(alice, backend).search("tomatoes balcony")]
    flood = [{"content": f"tomatoes tomatoes balcony {i}"} for i in range(200)]
    await AsyncScopedMemory(mallory, backend).add(flood)
    after = [(r.id, r.score) for r in await AsyncScopedMemory(alice, backend).search("tomatoes balcony")]
    assert after == before


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"n": 2}, {"two"}),
        ({"n": {"ne": 2}}, {"one", "three"}),
        ({"n": {"gte": 2}}, {"two", "three"}),
        ({"n": {"in": [1, 3]}}, {"one", "three"}),
        ({"n": {"nin": [1, 3]}}, {"two"}),
        ({"tag": {"contains": "ee"}}, {"three"}),
        ({"tag": {"contains": "%"}}, set()),  # no wildcard: a percent sign is a percent sign
        ({"tag": "50% off"}, set()),
        ({"tag": {"icontains": "ON"}}, {"one"}),
        ({"OR": [{"n": 1}, {"tag": "three"}]}, {"one", "three"}),
        ({"AND": [{"n": {"gt": 1}}, {"tag": {"ne": "three"}}]}, {"two"}),
        ({"NOT": [{"n": 1}]}, {"two", "three"}),
        ({"n": "2"}, set()),  # the string "2" is not the number 2
        ({"missing": {"ne": 1}}, set()),  # a condition on a key a memory lacks is false
    ],
)
async def test_filters_select_on_the_callers_metadata(
    backend: EmbeddedBackend, filters: dict[str, Any], expected: set[str]
) -> None:
    user = uid("filters")
    messages = [Message(content=f"memory {name}", metadata={"n": n, "tag": name})
                for n, name in ((1, "one"), (2, "two"), (3, "three"))]
    await AsyncScopedMemory(user, backend).add(messages)
    found = await AsyncScopedMemory(user, backend).search("memory", limit=10, filters=filters)
    assert {r.metadata["tag"] for r in found} == expected


async def test_memories_in_mem0s_older_table_are_reindexed_once(backend: EmbeddedBackend) -> None:
    user = uid("legacy")
    ids = [memory_id(user, f"old-{i}") for i in range(3)]
    texts = ["I was born in Lisbon", "my sister is a pilot", "I play chess on Sundays"]
    with psycopg.connect(str(backend.pool.conninfo), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS memories (id UUID PRIMARY KEY, vector vector(384), payload JSONB)")
        for mid, text in zip(ids, texts, strict=True):
            payload = {"user_id": user, "data": text, "actor_id": "Rui", "text_lemmatized": text.lower()}
            conn.execute("INSERT INTO memories (id, vector, payload) VALUES (%s, %s, %s)",
                         (mid, "[" + ",".join(["0.05"] * 384) + "]", Jsonb(payload)))
    memory = AsyncScopedMemory(user, backend)
    assert await backend.reindex() >= 3
    assert await backend.reindex() == 0
    assert sorted(r.id for r in (await memory.get_all()).memories) == sorted(ids)
    (found,) = await memory.search("Where was Rui born?", limit=1)
    assert (found.text, found.name) == ("I was born in Lisbon", "Rui")
    with psycopg.connect(str(backend.pool.conninfo)) as conn:
        assert conn.execute("SELECT count(*) FROM memories WHERE payload->>'user_id' = %s", (user,)).fetchone() == (0,)
    assert await memory.delete_all() == 3
    with psycopg.connect(str(backend.pool.conninfo)) as conn:
        assert pg_store.remaining(conn, user) == 0


def test_a_table_made_before_vectors_were_halved_is_converted_once_in_place(backend: EmbeddedBackend) -> None:
    """Start-up turns an older table's fp32 vectors into half precision, kept in the row, rows intact."""
    with scratch_database(str(backend.pool.conninfo), "olddb") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
            conn.execute("""CREATE TABLE memfleet_memories (user_id text NOT NULL, id uuid NOT NULL,
                            vector vector(384) NOT NULL, payload jsonb NOT NULL, keyword_count integer NOT NULL,
                            PRIMARY KEY (user_id, id)) WITH (toast_tuple_target = 128)""")
            conn.execute("ALTER TABLE memfleet_memories ALTER COLUMN vector SET STORAGE PLAIN")
            vector = "[" + ",".join(["0.05"] * 384) + "]"
            conn.execute("INSERT INTO memfleet_memories VALUES ('u', gen_random_uuid(), %s, '{\"data\": \"x\"}', 1)",
                         (vector,))
        for _ in range(2):  # idempotent: a second start-up changes nothing
            prepare_database(url)
        with psycopg.connect(url) as conn:
            column = conn.execute("""SELECT atttypid::regtype::text, attstorage FROM pg_attribute
                                     WHERE attrelid = 'memfleet_memories'::regclass AND attname = 'vector'""")
            assert column.fetchone() == ("halfvec", "p")
            # In the row, not moved out of line by the rewrite: a search reads every vector of the user.
            (toasted,) = conn.execute("""SELECT pg_relation_size(reltoastrelid) FROM pg_class
                                         WHERE relname = 'memfleet_memories'""").fetchone() or (None,)
            assert toasted == 0
            register_vector_dumper(conn)
            found = pg_search.search(conn, "u", "x", np.full(384, 0.05, dtype=np.float32), 10, {})
            assert [r.payload for r in found] == [{"data": "x"}]
            assert found[0].score == pytest.approx(pg_search.DENSE_WEIGHT)  # written without postings: dense only


@pytest.fixture(scope="module")
async def locomo_user(fleet: Memfleet) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A user holding one real LoCoMo conversation, written through the queue; and its questions."""
    path = locomo_file("conv-30.json")
    user = uid("recall")
    requests = [AddRequest(user_id=user, messages=r.messages) for r in group(read_messages([path], "locomo"))]
    await fleet.wait(await fleet.submit(requests), timeout=600)
    try:
        yield user, [qa for qa in json.loads(path.read_text())["qa"] if qa.get("category") in (1, 2, 3, 4)]
    finally:
        await (await fleet.forget(user)).outcome()


async def test_locomo_evidence_recall_through_the_queue(
        fleet: Memfleet, locomo_user: tuple[str, list[dict[str, Any]]]) -> None:
    """Real questions about a real chat log: the turns that answer them come back in the top 10."""
    user, questions = locomo_user
    recalls = []
    for qa in questions:
        found = await fleet.search(user, qa["question"], limit=10)
        assert all(r.user_id == user for r in found)
        turns = {r.metadata.get("dia_id") for r in found}
        recalls.append(len(set(qa["evidence"]) & turns) / len(qa["evidence"]))
    recall = sum(recalls) / len(recalls)
    assert recall >= RECALL_FLOOR, f"recall@10 {recall:.3f} on conv-30.json is under {RECALL_FLOOR}"


async def test_an_index_in_memory_ranks_as_the_table_does(
        backend: EmbeddedBackend, locomo_user: tuple[str, list[dict[str, Any]]]) -> None:
    """workers.backends.search_index computes pg_search's ranking: the same memories, the same
    scores (to rounding), for every question of a real conversation."""
    user, questions = locomo_user
    with backend.pool.connection() as conn, conn.transaction():
        index = search_index.load(conn, user, "")
    assert len(index.ids) == await backend.count(user)
    texts = [qa["question"] for qa in questions]
    vectors = await backend.embedder.embed(texts, query=True)
    compared = 0
    for text, encoded in zip(texts, vectors, strict=True):
        vector = np.asarray(encoded, dtype=np.float32)
        with backend.pool.connection() as conn:
            table = pg_search.search(conn, user, text, vector, 11, {})
            lexemes = conn.execute("SELECT ARRAY(SELECT DISTINCT lexeme FROM unnest(to_tsvector('english', %s)))",
                                   (text,)).fetchone()
        assert lexemes is not None
        ranked = search_index.rank(index, lexemes[0], vector, 11)
        assert [s for _, s in ranked] == pytest.approx([r.score for r in table], abs=1e-6)
        if float(table[9].score or 0) - float(table[10].score or 0) > 1e-6:  # no tie across the cut: same top 10
            assert {str(index.ids[n]) for n, _ in ranked[:10]} == {r.id for r in table[:10]}
            compared += 1
    assert compared >= len(texts) * 0.9
