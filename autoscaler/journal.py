"""What was applied to a local cluster, kept on disk so that a restarted autoscaler has it again.

In local mode the autoscaler is the only store of the applied Services, ScalingPolicies and
`config-autoscaler` (on Kubernetes that store is the API server). The journal keeps, in order,
every applied document (its YAML and source) and every deleted service, in one JSON file
written whole to a temporary name and renamed (sllm_knative.atomic), so a crash leaves the old
journal or the new one, never half of one. A restarted autoscaler replays it: the same
documents applied in the same order give the same services.

A document applied again replaces its earlier entry (the same source and text is the same
change); a deleted service's entries stay, as a document may hold other objects; the replay
applies them and then deletes it again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sllm_knative import atomic

VERSION = 1


class JournalError(ValueError):
    """A journal file that cannot be read back: the path and what is wrong."""


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = load(path)

    def applied(self, text: str, source: str) -> None:
        entry = {"op": "apply", "text": text, "source": source}
        self.entries = [e for e in self.entries if e != entry] + [entry]
        self._save()

    def deleted(self, key: str) -> None:
        self.entries.append({"op": "delete", "key": key})
        self._save()

    def _save(self) -> None:
        atomic.write_json(self.path, {"version": VERSION, "entries": self.entries}, durable=True, indent=1)


def load(path: Path) -> list[dict[str, Any]]:
    """The journal's entries ([] when there is none yet); JournalError naming the file and the entry."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise JournalError(f"{path}: not a readable journal: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("entries"), list):
        raise JournalError(f"{path}: not a version {VERSION} journal (an object with 'version' and 'entries')")
    for i, e in enumerate(doc["entries"]):
        ok = isinstance(e, dict) and (
            (e.get("op") == "apply" and isinstance(e.get("text"), str) and isinstance(e.get("source"), str))
            or (e.get("op") == "delete" and isinstance(e.get("key"), str)))
        if not ok:
            raise JournalError(f"{path}: entries[{i}] is neither an apply (text, source) nor a delete (key)")
    return list(doc["entries"])


async def replay(journal: Journal, scaler: Any) -> int:
    """Apply the journal's entries to a fresh autoscaler, in order; how many were applied. An
    entry that no longer parses is logged and skipped (the rest still apply)."""
    from sllm_knative.config import ConfigError, parse_manifest
    from sllm_knative.log import get_logger

    done = 0
    for i, e in enumerate(journal.entries):
        if e["op"] == "delete":
            await scaler.delete(e["key"])
        else:
            try:
                manifest = parse_manifest(e["text"], source=e["source"])
            except ConfigError as exc:
                get_logger("autoscaler").error("journal entry no longer applies", path=str(journal.path),
                                               entry=i, error=str(exc))
                continue
            await scaler.apply(manifest)
        done += 1
    return done
