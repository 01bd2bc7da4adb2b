"""Properties of the contract, checked by Hypothesis against the real fleet (issue #22):

- any string the user-id rule accepts is a user the whole path keeps as it is: through Redis
  (key names, job arguments, outcomes) and PostgreSQL (the rows' user_id) and back;
- any message the contract accepts is stored, as it was sent, and no worker refuses it;
- any time the schema's pattern admits, the contract's checks accept.

Few examples each (the fleet is real: every example is a write and a read through the queue), with a
fixed derandomized seed, so a run is reproducible and takes seconds.
"""

from __future__ import annotations

import math
import string
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from producer import keys
from producer.client import Memfleet
from producer.contract import (
    MAX_CONTENT_CHARS,
    MAX_METADATA_KEYS,
    METADATA_KEY_PATTERN,
    TIMESTAMP_PATTERN,
    USER_ID_PATTERN,
    AddRequest,
    check_expiry,
    check_timestamp,
    check_user_id,
)
from producer.errors import InvalidRequest
from tests.support import uid

EXAMPLES = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

user_ids = st.from_regex(USER_ID_PATTERN, fullmatch=True)


@EXAMPLES
@given(user_id=user_ids)
async def test_any_user_id_the_rule_accepts_round_trips_through_redis_and_postgresql(
    fleet: Memfleet, user_id: str
) -> None:
    assert check_user_id(user_id) == user_id
    await (await fleet.forget(user_id)).outcome()  # short ids ("0") are other tests' users too
    text = f"a note of {user_id}"
    handle = await fleet.add(user_id, [text])
    outcome = await handle.outcome()
    assert outcome.error is None and outcome.stored + outcome.duplicates == 1
    # Redis: the user's keys are found under the id as it was given.
    assert await fleet.redis.zscore(keys.user_jobs(user_id), handle.op_id) is not None
    # PostgreSQL: the row is found by the id, and gives it back unchanged.
    records = (await fleet.list(user_id)).memories
    assert [(r.user_id, r.text) for r in records] == [(user_id, text)]
    found = await fleet.search(user_id, "note")
    assert {r.user_id for r in found} == {user_id}
    assert (await (await fleet.forget(user_id)).outcome()).deleted == 1


def _said_at() -> st.SearchStrategy[str]:
    moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31),
                           timezones=st.sampled_from([None, UTC]))
    return st.one_of(moments.map(datetime.isoformat), st.dates().map(lambda d: d.isoformat()))


scalars = st.one_of(
    st.text(max_size=40), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
)
messages = st.fixed_dictionaries(
    {"content": st.text(min_size=1, max_size=400)},
    optional={
        "role": st.sampled_from(["user", "assistant"]),
        "name": st.text(min_size=1, max_size=30),
        "timestamp": _said_at(),
        "metadata": st.dictionaries(st.from_regex(METADATA_KEY_PATTERN, fullmatch=True), scalars,
                                    max_size=MAX_METADATA_KEYS // 4),
    },
)


def _same(sent: Any, stored: Any) -> bool:
    """A value as the store gives it back: a number may come back as the other kind of number
    (PostgreSQL's jsonb keeps 1e300 as the integer it is), and is the same number."""
    if isinstance(sent, float) and isinstance(stored, int | float) and not isinstance(stored, bool):
        return math.isclose(sent, float(stored), rel_tol=1e-15, abs_tol=0.0) or sent == stored
    return bool(type(sent) is type(stored) and sent == stored)


@EXAMPLES
@given(message=messages, shared=st.dictionaries(st.sampled_from(string.ascii_lowercase), scalars, max_size=3))
async def test_any_message_the_contract_accepts_is_stored_as_it_was_sent(
    fleet: Memfleet, message: dict[str, Any], shared: dict[str, Any]
) -> None:
    assume(len(message["content"]) <= MAX_CONTENT_CHARS)
    user = uid("prop")
    try:
        request = AddRequest.model_validate({"user_id": user, "messages": [message], "metadata": shared})
    except ValueError:
        assume(False)  # the contract refuses it: other tests hold it to why
        return
    try:
        handle = await fleet.add(user, request.messages, metadata=request.metadata)
    except InvalidRequest as exc:  # the same rules on the way in: they must agree
        raise AssertionError(f"the contract accepted a message that the client refused: {exc}") from None
    outcome = await handle.outcome()  # raises WriteDeadLettered if a worker refused it
    assert outcome.error is None and outcome.stored == 1
    (record,) = (await fleet.list(user)).memories
    sent = request.messages[0]
    assert record.text == sent.content
    assert (record.name, record.timestamp, record.role) == (sent.name, sent.timestamp, sent.role)
    expected = {**request.metadata, **sent.metadata}
    assert set(record.metadata) == set(expected)
    assert all(_same(expected[k], record.metadata[k]) for k in expected), (expected, record.metadata)
    await (await fleet.forget(user)).outcome()


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(when=st.from_regex(TIMESTAMP_PATTERN, fullmatch=True))
def test_any_time_the_schema_admits_the_contract_accepts(when: str) -> None:
    """The OpenAPI schema's pattern for times and the checks behind it agree: a client (or the
    fuzzer) that follows the schema is not refused. An expiry may still fall outside the years 1
    to 9999 once moved to UTC; that is refused by name, never a 500."""
    assert check_timestamp(when)
    try:
        check_expiry(when)
    except ValueError as exc:
        assert "out of range" in str(exc), exc
