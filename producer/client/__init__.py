"""The API an app server calls (`Memfleet`): enqueue memory jobs for a user and, for reads, wait
for the answer."""

from producer.client.fleet import EncoderCounts, EncoderUse, FleetStats, SearchIndexUse
from producer.client.memfleet import Memfleet
from producer.client.outcomes import WriteHandle

__all__ = ["EncoderCounts", "EncoderUse", "FleetStats", "Memfleet", "SearchIndexUse", "WriteHandle"]
