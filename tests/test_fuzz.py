"""schemathesis against the live `/openapi.json` of `memfleet serve`, with an app key and a user key.

It fuzzes whatever the schema lists, so a route added later is covered without a change here. The
checks: no 5xx, and every answer is one the schema documents (status, content type, body). Both
runs fail on the warnings that say the keys did not get through; the app key's run also on the one
that says the schema does not state what the server enforces ("mostly rejected generated data").
The user key's run does not: its user's memories go with the first fuzzed forget, after which
every case about a memory is a 404, and schemathesis then reads any one refusal of a rule no schema
can carry (an expiry already past, an id named twice in a batch) as "mostly rejected". The seed is
fixed, and the number of cases per operation bounded, so a run is reproducible and takes a minute.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.http_support import ApiServer, create_key, token
from tests.support import uid

SEED = 7
MAX_EXAMPLES = 15  # per operation and phase; the coverage phase adds its own boundary cases
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
FAIL_ON = ["missing_auth", "rate_limited"]
# The routes whose body is a list of up to 100 distinct records (batches, import). The coverage
# phase builds a largest-possible list of distinct UUID-patterned items for each, which takes
# schemathesis minutes per route; the fuzzing and stateful phases still cover them.
LIST_BODIES = "batch|/api/import"
# An expiry must be to come (`check_future`), which a schema cannot say: most drawn from the
# pattern are past, so the fuzzer draws these most of the time. The coverage phase draws from no
# dictionary: its boundary cases of an expiry (the year 1) are all refused, so it skips the one
# route where an expiry is a top-level field of the body.
FUTURE = ["2099-01-31T00:00:00+00:00", "9999-12-30", "3000-06-01 12:00"]

pytestmark = pytest.mark.slow


def _config(key: str, *, user_ids: list[str] | None, op_id: str, op_user: str) -> str:
    """A schemathesis.toml: the key, and ids that exist for what cannot be guessed.

    `GET /api/ops/{op_id}` answers only for a write of the user named; a dictionary gives it one
    half of the time (`op_user` is a user no other operation names, so no fuzzed forget removes
    it). With a user key (`user_ids`), every user id the fuzzer sends is the key's own: another
    would be refused with 403, and nothing behind it would be reached. An expiry is mostly one to
    come (`FUTURE`). The coverage phase does not draw from dictionaries, so it runs with the app key
    only (its cases differ by key only in that 403).
    """
    own = "" if user_ids is None else '''
"query.user_id" = { dictionary = "own" }
"body.user_id" = { dictionary = "own" }
"body.filters.user_id" = { dictionary = "own" }
"body.filters.AND[*].user_id" = { dictionary = "own" }
[phases.coverage]
enabled = false
'''
    return f'''seed = {SEED}
[warnings]
fail-on = {json.dumps(FAIL_ON + (["validation_mismatch"] if user_ids is None else []))}
[auth.openapi.key]
api_key = "Token {key}"
[generation]
max-examples = {MAX_EXAMPLES}
database = "none"
[dictionaries.ops]
values = ["{op_id}"]
[dictionaries.op_users]
values = ["{op_user}"]
[dictionaries.own]
values = {json.dumps(user_ids or [op_user])}
[dictionaries.future_days]
values = {json.dumps([day[:10] for day in FUTURE])}
[dictionaries.future]
values = {json.dumps(FUTURE)}
[parameters]
"body.expires_at" = {{ dictionary = "future", probability = 0.8 }}
"body.changes[*].expires_at" = {{ dictionary = "future", probability = 0.9 }}
"body.expiration_date" = {{ dictionary = "future_days", probability = 0.8 }}
{own}
[[operations]]
include-operation-id = "get_op"
[operations.parameters]
"path.op_id" = {{ dictionary = "ops", probability = 0.5 }}
"query.user_id" = {{ dictionary = "op_users" }}
[[operations]]
include-path-regex = "{LIST_BODIES}"
[operations.phases.coverage]
enabled = false
[[operations]]
include-method = "PATCH"
include-path = "/api/memories/{{memory_id}}"
[operations.phases.coverage]
enabled = false
'''


def _schemathesis(api_server: ApiServer, config: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
         f"{api_server.url}/openapi.json", "--checks", CHECKS, "--workers", "1", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=600, cwd=config.parent,  # its cache and reports go there
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


@pytest.mark.parametrize("kind", ["app", "user"])
def test_schemathesis_finds_no_5xx_and_every_answer_matches_the_schema(
    api_server: ApiServer, tmp_path: Path, kind: str
) -> None:
    app_key = create_key(api_server.redis_url, uid("fuzz-app"), "--rate", "1000000")
    if kind == "app":
        key, user_ids, op_user = app_key, None, uid("fuzz-ops")
    else:
        # A user key looks up its own writes only, and its own forgets (which the run makes) remove
        # their ids: past the first, the stateful phase's links are what give it writes to look up.
        op_user = uid("fuzz-user")
        key = create_key(api_server.redis_url, uid("fuzz-key"), "--user", op_user, "--rate", "1000000")
        user_ids = [op_user]
    with httpx.Client(base_url=api_server.url, headers=token(app_key), timeout=60) as http:
        written = http.post("/api/memories", json={"user_id": op_user, "messages": [{"content": "an op to look up"}]})
    assert written.status_code == 200, written.text
    config = tmp_path / "schemathesis.toml"
    config.write_text(_config(key, user_ids=user_ids, op_id=written.json()["op_id"], op_user=op_user))
    code, output, seconds = _schemathesis(api_server, config)
    cases = re.search(r"(\d+) generated", output)
    print(f"schemathesis ({kind} key): seed {SEED}, {cases.group(1) if cases else '?'} cases, {seconds:.0f}s")
    tail = output[-6000:]
    assert code == 0, tail
    assert kind == "user" or "mostly rejected" not in output, tail
    # Every operation the schema lists was tested, the lead's new routes as much as the old.
    operations = sum(len(methods) for methods in httpx.get(f"{api_server.url}/openapi.json").json()["paths"].values())
    tested = re.search(r"Tested: (\d+)", output)
    assert tested is not None and int(tested.group(1)) == operations, tail
