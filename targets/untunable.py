"""Tasks whose every tuning candidate failed, remembered beside the tuning database.

MetaSchedule stores a record only for a candidate that ran. A task none of
whose candidates can run under the measuring harness (an embedding lookup fed
random out-of-range indices, for one) has no record, so without this list
every later compile would tune it again and a cached recompile would not be
cached. A task is tried again only when asked for more trials than it was
given before.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE = "untunable.json"


def task_key(mod: Any, target: Any) -> str:
    """Structural hash of the task's function and the target: what the database keys records on."""
    from tvm_ffi import structural_hash

    return f"{structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}:{target}"


class UntunableTasks:
    def __init__(self, db_dir: Path):
        self.path = db_dir / FILE
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            entries = {}
        self.entries: dict[str, dict[str, Any]] = entries if isinstance(entries, dict) else {}

    def covers(self, key: str, trials: int) -> bool:
        """True when the task already failed with at least ``trials`` candidates."""
        entry = self.entries.get(key)
        return entry is not None and int(entry.get("trials", 0)) >= trials

    def add(self, key: str, task: str, trials: int) -> None:
        self.entries[key] = {"task": task, "trials": trials}

    def save(self) -> None:
        """Merge with what other compiles saved since this list was read (call under the database's lock)."""
        try:
            on_disk = json.loads(self.path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        if isinstance(on_disk, dict):
            for key, entry in on_disk.items():
                mine = self.entries.get(key)
                if isinstance(entry, dict) and (mine is None or int(entry.get("trials", 0)) > int(mine.get("trials", 0))):
                    self.entries[key] = entry
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)
