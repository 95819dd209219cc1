"""Live migration of in-flight generations: the activator's side (docs/migration.md).

The activator holds the client connections, so it coordinates:

    config.py       MigrationConfig (the --migration-* knobs)
    planning.py     pure decisions: next_action, follow_done, pick_destination
    frames.py       the function's SSE frames: split, classify, count, trim
    tracked.py      Tracked (one client stream a migration may switch), StreamTable
    client.py       InstanceClient: export, detach, prefill, resume on an instance's internal API
    splice.py       the relay once a stream is migrating; resume_whole for non-streaming requests
    coordinator.py  migrate_generation (rounds, follow, detach), migrate_instance (all in parallel)
"""

from activator.migration.client import InstanceClient, state_of
from activator.migration.config import MigrationConfig
from activator.migration.coordinator import MigrationResult, migrate_generation, migrate_instance
from activator.migration.frames import Frame, classify, frame_content, split_frames, trim_frame
from activator.migration.planning import MigrationPhase, follow_done, next_action, pick_destination
from activator.migration.splice import Candidates, resume_whole, splice
from activator.migration.tracked import StreamTable, Tracked

__all__ = [
    "Candidates", "Frame", "InstanceClient", "MigrationConfig", "MigrationPhase", "MigrationResult", "StreamTable",
    "Tracked", "classify", "follow_done", "frame_content", "migrate_generation", "migrate_instance", "next_action",
    "pick_destination", "resume_whole", "splice", "split_frames", "state_of", "trim_frame",
]
