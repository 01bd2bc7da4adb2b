"""The contract's rules: user ids, messages, metadata and filters."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from producer.contract import (
    MAX_CONTENT_CHARS,
    MAX_CURSOR_CHARS,
    MAX_FILTER_CONDITIONS,
    MAX_FILTER_VALUE_CHARS,
    MAX_FILTER_VALUES,
    MAX_MESSAGE_ID_CHARS,
    MAX_MESSAGES_PER_JOB,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_VALUE_CHARS,
    MAX_NAME_CHARS,
    MAX_QUERY_CHARS,
    MAX_TIMESTAMP_CHARS,
    MAX_USER_ID_CHARS,
    MAX_WRITE_METADATA_BYTES,
    AddRequest,
    ForgetRequest,
    InvalidUserId,
    ListRequest,
    Message,
    SearchRequest,
    WriteOp,
    check_filters,
    check_user_id,
    encode_message,
    metadata_bytes,
    new_op_ids,
    parse,
)
from producer.errors import InvalidRequest
from tests.support import add_request

VALID_IDS = ["alice", "Alice", "u-1", "user_42", "a.b@example.com", "tenant:7:user:9", "x" * MAX_USER_ID_CHARS]

# Every class of id that aliases or widens a scope somewhere in mem0 or a backend (see docs/isolation.md).
REJECTED_IDS: dict[str, Any] = {
    "empty": "",
    "leading space (mem0 trims it to 'alice')": " alice",
    "trailing space": "alice ",
    "tab": "alice\t",
    "newline": "alice\n",
    "inner space": "al ice",
    "wildcard (pgvector and hosted filters: every user)": "*",
    "wildcard suffix": "alice*",
    "sql like wildcard": "al%",
    "session scope delimiters": "alice&agent_id=x",
    "equals sign": "user_id=alice",
    "operator prefix": "$or",
    "json object text": '{"ne": "x"}',
    "unicode look-alike": "\u0430lice",
    "fullwidth letters": "\uff41lice",
    "zero-width joiner": "ali\u200dce",
    "nul byte": "alice\x00",
    "too long": "x" * (MAX_USER_ID_CHARS + 1),
    "leading dot": ".alice",
    "leading dash (option-like)": "-alice",
    "path": "../alice",
    "integer (mem0 coerces 7 to '7')": 7,
    "bool (coerced to 'True')": True,
    "none": None,
    "list (pgvector: ANY of several users)": ["alice", "bob"],
    "dict (pgvector: operator)": {"ne": "alice"},
}


@pytest.mark.parametrize("user_id", VALID_IDS)
def test_valid_user_ids_pass_unchanged(user_id: str) -> None:
    assert check_user_id(user_id) == user_id


@pytest.mark.parametrize("user_id", REJECTED_IDS.values(), ids=list(REJECTED_IDS))
def test_rejected_user_ids_raise_a_clear_error(user_id: Any) -> None:
    with pytest.raises(InvalidUserId, match="user_id"):
        check_user_id(user_id)


@pytest.mark.parametrize("user_id", REJECTED_IDS.values(), ids=list(REJECTED_IDS))
def test_requests_refuse_bad_user_ids(user_id: Any) -> None:
    with pytest.raises(ValidationError, match="user_id"):
        add_request(user_id=user_id, messages=[{"content": "hi"}])


def test_message_rules_name_the_field() -> None:
    with pytest.raises(ValidationError, match="content"):
        add_request(user_id="a", messages=[{"content": "x" * (MAX_CONTENT_CHARS + 1)}])
    with pytest.raises(ValidationError, match="content"):
        add_request(user_id="a", messages=[{"content": "   "}])
    with pytest.raises(ValidationError, match="role"):
        add_request(user_id="a", messages=[{"content": "hi", "role": "system"}])
    with pytest.raises(ValidationError, match="messages"):
        add_request(user_id="a", messages=[])
    with pytest.raises(ValidationError, match="extra"):
        add_request(user_id="a", messages=[{"content": "hi"}], agent_id="x")


@pytest.mark.parametrize("key", ["user_id", "agent_id", "run_id", "actor_id", "data", "hash", "created_at"])
def test_metadata_may_not_set_scope_or_bookkeeping_keys(key: str) -> None:
    with pytest.raises(ValidationError, match="reserved"):
        add_request(user_id="a", messages=[{"content": "hi"}], metadata={key: "bob"})
    with pytest.raises(ValidationError, match="reserved"):
        add_request(user_id="a", messages=[{"content": "hi", "metadata": {key: "bob"}}])


INJECTED_FILTERS: dict[str, dict[str, Any]] = {
    "direct": {"user_id": "bob"},
    "agent": {"agent_id": "x"},
    "run": {"run_id": "x"},
    "case variant": {"User_ID": "bob"},
    "wildcard": {"user_id": "*"},
    "operator": {"user_id": {"ne": "alice"}},
    "in list": {"user_id": {"in": ["alice", "bob"]}},
    "inside OR": {"OR": [{"topic": "food"}, {"user_id": "bob"}]},
    "inside AND": {"AND": [{"user_id": "bob"}]},
    "inside NOT": {"NOT": [{"user_id": "alice"}]},
    "nested": {"AND": [{"OR": [{"NOT": [{"run_id": "r"}]}]}]},
    "raw $or": {"$or": [{"user_id": "bob"}]},
    "raw $not": {"$not": [{"topic": "x"}]},
    "wildcard in operator": {"topic": {"eq": "*"}},
    "wildcard in list": {"topic": {"in": ["food", "*"]}},
    "nested logic": {"OR": [{"AND": [{"topic": "a"}]}]},
}


@pytest.mark.parametrize("filters", INJECTED_FILTERS.values(), ids=list(INJECTED_FILTERS))
def test_filters_cannot_name_scope(filters: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"not allowed|reserved"):
        check_filters(filters)
    with pytest.raises(ValidationError):
        SearchRequest(user_id="alice", query="q", filters=filters)


def test_metadata_filters_are_allowed() -> None:
    filters = {"topic": "food", "session": {"gte": 2}, "OR": [{"tag": {"in": ["a", "b"]}}, {"x": {"ne": 1}}]}
    assert SearchRequest(user_id="alice", query="q", filters=filters).filters == filters


def test_idempotency_keys_prefer_message_ids_and_are_stable() -> None:
    a = add_request(user_id="u", messages=[{"content": "hi", "id": "m1"}, {"content": "hi"}])
    b = add_request(user_id="u", messages=[{"content": "hi", "id": "m1"}, {"content": "hi"}])
    other_user = add_request(user_id="v", messages=[{"content": "hi", "id": "m1"}, {"content": "hi"}])
    assert a.idempotency_keys() == b.idempotency_keys()
    assert a.idempotency_keys()[0] == "id:m1"
    assert a.idempotency_keys()[1] != other_user.idempotency_keys()[1]


def test_an_add_put_together_from_encoded_messages_is_the_write_the_models_make() -> None:
    messages = [
        Message(content="I was born in Lisbon", timestamp="2023-05-18T13:47:00", metadata={"session": 1, "x": None}),
        Message(role="assistant", content='quotes " and \\ and \u00fcn\u00efcode \u2028 \n', name="bot", id="m-2"),
    ]
    (op_id,) = new_op_ids(1)
    encoded = WriteOp.encode_add(op_id, "tenant:7:user_9", [encode_message(m) for m in messages])
    op = WriteOp(op_id=op_id, request=AddRequest(user_id="tenant:7:user_9", messages=messages))
    assert encoded.decode() == op.model_dump_json()
    assert WriteOp.model_validate_json(encoded) == op
    forget = WriteOp.new(ForgetRequest(user_id="alice"))
    assert WriteOp.model_validate_json(forget.model_dump_json()) == forget


@pytest.mark.parametrize("user_id", ['a","kind":"forget', "*", ""])
def test_an_encoded_add_takes_only_a_valid_user_id(user_id: str) -> None:
    with pytest.raises(InvalidUserId):
        WriteOp.encode_add(new_op_ids(1)[0], user_id, [encode_message(Message(content="hi"))])


@pytest.mark.parametrize("count", [0, MAX_MESSAGES_PER_JOB + 1])
def test_an_encoded_add_takes_as_many_messages_as_an_add_request(count: int) -> None:
    with pytest.raises(InvalidRequest, match="1 to 256 messages"):
        WriteOp.encode_add(new_op_ids(1)[0], "alice", [encode_message(Message(content="hi"))] * count)


def test_write_ids_are_fresh_and_opaque() -> None:
    ids = new_op_ids(1_000) + new_op_ids(1_000)
    assert len(set(ids)) == 2_000
    assert all(re.fullmatch(r"w-[0-9a-f]{32}", i) for i in ids)


# -- text every store can hold, and limits on everything a request carries (issue #22) ------------

NUL, SURROGATE = "a\x00b", "a\ud800b"
SECRET = "Zorblax-4921"


def _add(**fields: Any) -> dict[str, Any]:
    return {"user_id": "alice", "messages": [{"content": "hi"}], **fields}


# Every string a request carries, each with a bad character put in it.
UNSAFE_TEXT: dict[str, Callable[[str], tuple[type[Any], dict[str, Any]]]] = {
    "content": lambda bad: (AddRequest, _add(messages=[{"content": bad}])),
    "name": lambda bad: (AddRequest, _add(messages=[{"content": "hi", "name": bad}])),
    "message id": lambda bad: (AddRequest, _add(messages=[{"content": "hi", "id": bad}])),
    "timestamp": lambda bad: (AddRequest, _add(messages=[{"content": "hi", "timestamp": "2023-05-18" + bad}])),
    "message metadata value": lambda bad: (AddRequest, _add(messages=[{"content": "hi", "metadata": {"k": bad}}])),
    "write metadata value": lambda bad: (AddRequest, _add(metadata={"k": bad})),
    "metadata key": lambda bad: (AddRequest, _add(metadata={bad: 1})),
    "query": lambda bad: (SearchRequest, {"user_id": "alice", "query": bad}),
    "filter value": lambda bad: (SearchRequest, {"user_id": "alice", "query": "q", "filters": {"k": bad}}),
    "filter operand": lambda bad: (SearchRequest, {"user_id": "alice", "query": "q", "filters": {"k": {"eq": bad}}}),
    "filter list value": lambda bad: (SearchRequest, {"user_id": "alice", "query": "q",
                                                      "filters": {"OR": [{"k": {"in": ["x", bad]}}]}}),
    "filter key": lambda bad: (SearchRequest, {"user_id": "alice", "query": "q", "filters": {bad: 1}}),
    "user id": lambda bad: (ListRequest, {"user_id": bad}),
    "cursor": lambda bad: (ListRequest, {"user_id": "alice", "cursor": bad}),
}


@pytest.mark.parametrize("bad", [NUL, SURROGATE, "\udcff", "\x00"], ids=["nul", "surrogate", "argv-byte", "only-nul"])
@pytest.mark.parametrize("where", list(UNSAFE_TEXT))
def test_nul_and_lone_surrogates_are_refused_everywhere(where: str, bad: str) -> None:
    model, payload = UNSAFE_TEXT[where](bad + SECRET)
    with pytest.raises(InvalidRequest) as refused:
        parse(model, payload)
    assert SECRET not in str(refused.value), "an error must not quote what was sent"
    str(refused.value).encode()  # the message itself is valid text, fit for any answer or log


def test_the_refusal_says_what_is_wrong() -> None:
    with pytest.raises(InvalidRequest, match=r"messages\.0\.content.*NUL"):
        parse(AddRequest, _add(messages=[{"content": NUL}]))
    with pytest.raises(InvalidRequest, match=r"metadata.*surrogate"):
        parse(AddRequest, _add(metadata={"k": SURROGATE}))
    with pytest.raises(InvalidRequest, match=r"query.*NUL"):
        parse(SearchRequest, {"user_id": "alice", "query": NUL})
    with pytest.raises(InvalidRequest, match=r"messages\.0\.name.*surrogate"):
        parse(AddRequest, _add(messages=[{"content": "hi", "name": SURROGATE}]))


def test_every_string_field_has_a_limit() -> None:
    limits = [
        ("content", _add(messages=[{"content": "x" * (MAX_CONTENT_CHARS + 1)}])),
        ("name", _add(messages=[{"content": "hi", "name": "x" * (MAX_NAME_CHARS + 1)}])),
        ("id", _add(messages=[{"content": "hi", "id": "x" * (MAX_MESSAGE_ID_CHARS + 1)}])),
        ("timestamp", _add(messages=[{"content": "hi", "timestamp": "x" * (MAX_TIMESTAMP_CHARS + 1)}])),
        ("metadata", _add(metadata={"k": "x" * (MAX_METADATA_VALUE_CHARS + 1)})),
        ("metadata", _add(metadata={"k" * (MAX_METADATA_KEY_CHARS + 1): 1})),
    ]
    for field, payload in limits:
        with pytest.raises(InvalidRequest, match=field):
            parse(AddRequest, payload)
    with pytest.raises(InvalidRequest, match="query"):
        parse(SearchRequest, {"user_id": "a", "query": "x" * (MAX_QUERY_CHARS + 1)})
    with pytest.raises(InvalidRequest, match="filter"):
        parse(SearchRequest, {"user_id": "a", "query": "q", "filters": {"k": "x" * (MAX_FILTER_VALUE_CHARS + 1)}})
    with pytest.raises(InvalidRequest, match="cursor"):
        parse(ListRequest, {"user_id": "a", "cursor": "x" * (MAX_CURSOR_CHARS + 1)})


def test_metadata_is_charged_per_stored_row() -> None:
    """The amplification of issue #22: a write's metadata is copied into each message's row."""
    note = {"note": "x" * (MAX_METADATA_VALUE_CHARS - 20)}
    one_row = metadata_bytes(note)
    rows = MAX_WRITE_METADATA_BYTES // one_row
    parse(AddRequest, _add(messages=[{"content": "hi"}] * rows, metadata=note))  # exactly within the budget
    with pytest.raises(InvalidRequest, match="bytes of metadata"):
        parse(AddRequest, _add(messages=[{"content": "hi"}] * (rows + 1), metadata=note))
    # The same budget for metadata carried by each message...
    with pytest.raises(InvalidRequest, match="bytes of metadata"):
        parse(AddRequest, _add(messages=[{"content": "hi", "metadata": note}] * (rows + 1)))
    # ...and one row may not carry more than the row limit, the write's and its own together.
    five = {f"k{i}": "x" * (MAX_METADATA_VALUE_CHARS - 10) for i in range(5)}
    with pytest.raises(InvalidRequest, match=r"metadata is .* bytes"):
        parse(AddRequest, _add(metadata=five))
    three, two = dict(list(five.items())[:3]), dict(list(five.items())[3:])
    with pytest.raises(InvalidRequest, match=r"messages\.0 would be stored with"):
        parse(AddRequest, _add(metadata=three, messages=[{"content": "hi", "metadata": two}]))


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_numbers_must_be_finite(number: float) -> None:
    with pytest.raises(InvalidRequest, match="finite"):
        parse(AddRequest, _add(metadata={"k": number}))
    with pytest.raises(InvalidRequest, match="finite"):
        parse(SearchRequest, {"user_id": "a", "query": "q", "filters": {"k": {"gt": number}}})


def test_a_filters_cost_is_bounded() -> None:
    many = {f"k{i}": i for i in range(MAX_FILTER_CONDITIONS + 1)}
    with pytest.raises(ValueError, match="conditions"):
        check_filters(many)
    spread = {"AND": [{f"a{i}": i} for i in range(MAX_FILTER_CONDITIONS)], "OR": [{"b": 1}]}
    with pytest.raises(ValueError, match="conditions"):
        check_filters(spread)
    with pytest.raises(ValueError, match="values"):
        check_filters({"k": {"in": list(range(MAX_FILTER_VALUES + 1))}})
    with pytest.raises(ValueError, match="values"):
        check_filters({"k": {"in": []}})
    check_filters({"AND": [{f"a{i}": i} for i in range(MAX_FILTER_CONDITIONS)]})


@pytest.mark.parametrize("shape", [5, None, True, "x", [1], [None], {"k": 1}])
def test_logical_filters_take_lists_of_conditions(shape: Any) -> None:
    for op in ("AND", "OR", "NOT"):
        with pytest.raises(ValueError, match=f"filter {op} takes a non-empty list"):
            check_filters({op: shape})


def test_errors_quote_only_plain_names_never_text() -> None:
    """A short plain key may be named (`'colour' is not allowed`); anything that could be text is not."""
    for filters in ({f"{SECRET} and more": 1}, {"k": {f"my {SECRET}": 1}}, {"$" + SECRET * 10: 1}):
        with pytest.raises(ValueError) as refused:
            check_filters(filters)
        assert SECRET not in str(refused.value)
    with pytest.raises(InvalidRequest) as bad_key:
        parse(AddRequest, _add(metadata={f"my {SECRET}": 1}))
    assert SECRET not in str(bad_key.value)
