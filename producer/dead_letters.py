"""The dead-letter list (`keys.DEAD_LETTERS`), bounded in count and in age.

A letter holds the whole write it could not apply (so that `memfleet dlq retry` can put it back),
up to a megabyte or so: a list that only grew would take Redis down with a store that fails for a
while. So every push first drops the letters older than `max_age` from the head of the list
(letters are pushed in the order they fail), then keeps the newest `max_count`, and sets the
list's expiry to `max_age`, so that a list nobody pushes to goes as a whole. Readers drop the
expired letters before they read. Letters are dropped without a trace but a count
(`memfleet_jobs_total{outcome}` has counted each failure already).

Defaults (`MEMFLEET_DEAD_LETTER_MAX`, `MEMFLEET_DEAD_LETTER_MAX_AGE`): `keys.DEAD_LETTERS_MAX`
letters (1,000), `keys.DEAD_LETTERS_MAX_AGE` seconds (7 days).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from producer import keys

# `prune(list, oldest)`: drop letters that failed before `oldest` (Unix time) from the head. A
# letter's `failed_at` is read with a pattern rather than by decoding it: a letter may be a
# megabyte, and `failed_at` comes before the write it holds (`DeadLetter`'s field order). A head
# that has none is not a letter of ours, and goes too.
PRUNE_LUA = """
local function prune(list, oldest)
  while true do
    local head = redis.call('LINDEX', list, 0)
    if not head then return end
    local at = tonumber(string.match(head, '"failed_at":(%-?[%d%.eE%+%-]+)'))
    if at and at >= oldest then return end
    redis.call('LPOP', list)
  end
end
local function push_dead_letter(list, letter, now, max_count, max_age)
  prune(list, now - max_age)
  redis.call('RPUSH', list, letter)
  redis.call('LTRIM', list, -max_count, -1)
  redis.call('EXPIRE', list, max_age)
end
"""
# KEYS[1]: the list. ARGV: the letter (JSON), now, max count, max age (seconds).
_PUSH = PRUNE_LUA + """
push_dead_letter(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"""
# KEYS[1]: the list. ARGV: now, max age (seconds).
_PRUNE = PRUNE_LUA + """
prune(KEYS[1], tonumber(ARGV[1]) - tonumber(ARGV[2]))
return redis.call('LLEN', KEYS[1])
"""


@dataclass(frozen=True)
class DeadLetterLimits:
    max_count: int = keys.DEAD_LETTERS_MAX
    max_age: int = keys.DEAD_LETTERS_MAX_AGE  # seconds

    def push(self, redis: Any, letter_json: str | bytes, now: float | None = None) -> Any:
        """Push a letter through `redis` (a client, or a pipeline whose transaction it joins)."""
        return redis.eval(_PUSH, 1, keys.DEAD_LETTERS, letter_json, time.time() if now is None else now,
                          self.max_count, self.max_age)

    def prune(self, redis: Any, now: float | None = None) -> Any:
        """Drop the expired letters through `redis`; the number left is the command's reply."""
        return redis.eval(_PRUNE, 1, keys.DEAD_LETTERS, time.time() if now is None else now, self.max_age)
