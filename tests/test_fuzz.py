"""schemathesis against the live `/openapi.json` of `memfleet serve`, with an app key and a user key.

It fuzzes whatever the schema lists, so a route added later is covered without a change here. The
checks: no 5xx, and every answer is one the schema documents (status, content type, body). The
run fails on the warnings that say the schema does not state what the server enforces
("mostly rejected generated data"), or that the keys did not get through. The seed is fixed, and
the number of cases per operation bounded, so a run is reproducible and takes a minute or two.
"""

from __future__ import annotations

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
FAIL_ON = '["validation_mismatch", "missing_auth", "rate_limited"]'

pytestmark = pytest.mark.slow


def _config(key: str, *, user_ids: list[str] | None, op_id: str, op_user: str) -> str:
    """A schemathesis.toml: the key, and ids that exist for what cannot be guessed.

    `GET /api/ops/{op_id}` answers only for a write of the user named; a dictionary gives it one
    half of the time (`op_user` is a user no other operation names, so no fuzzed forget removes
    it). With a user key (`user_ids`), every user id the fuzzer sends is the key's own: another
    would be refused with 403, and nothing behind it would be reached. The coverage phase does not
    draw from dictionaries, so it runs with the app key only (its cases differ by key only in that
    403).
    """
    own = "" if user_ids is None else f'''
[dictionaries.own]
values = {user_ids!r}
[parameters]
"query.user_id" = {{ dictionary = "own" }}
"body.user_id" = {{ dictionary = "own" }}
"body.filters.user_id" = {{ dictionary = "own" }}
"body.filters.AND[*].user_id" = {{ dictionary = "own" }}
[phases.coverage]
enabled = false
'''.replace("'", '"')
    return f'''seed = {SEED}
[warnings]
fail-on = {FAIL_ON}
[auth.openapi.key]
api_key = "Token {key}"
[generation]
max-examples = {MAX_EXAMPLES}
database = "none"
[dictionaries.ops]
values = ["{op_id}"]
[dictionaries.op_users]
values = ["{op_user}"]
{own}
[[operations]]
include-operation-id = "get_op"
[operations.parameters]
"path.op_id" = {{ dictionary = "ops", probability = 0.5 }}
"query.user_id" = {{ dictionary = "op_users" }}
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
    assert "mostly rejected" not in output, tail
    # Every operation the schema lists was tested, the lead's new routes as much as the old.
    operations = sum(len(methods) for methods in httpx.get(f"{api_server.url}/openapi.json").json()["paths"].values())
    tested = re.search(r"Tested: (\d+)", output)
    assert tested is not None and int(tested.group(1)) == operations, tail
