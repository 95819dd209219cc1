"""The outcome of one generation's migration, as the activator reports it (docs/migration.md,
"Abort rules") and the autoscaler reads it. The values are the strings on the wire
(`POST /admin/v1/migrate` and `/admin/v1/drain` answer `{"generations": [{"outcome": ...}]}`)."""

from __future__ import annotations

from enum import Enum


class MigrationOutcome(str, Enum):
    MIGRATED = "migrated"  # detached on the source, resumed on the destination
    RECOVERED = "recovered"  # the source died mid-migration; resumed from its last exported state
    FINISHED_ON_SOURCE = "finished_on_source"  # ended before it could move; nothing moved
    STAYED_ON_SOURCE = "stayed_on_source"  # the destination or the source refused; it still runs on the source
    FAILED = "failed"  # lost: nothing exported before the source died, or no destination could resume it

    def __str__(self) -> str:
        return self.value

    @property
    def moved(self) -> bool:
        """The generation now runs on the destination."""
        return self in (MigrationOutcome.MIGRATED, MigrationOutcome.RECOVERED)
