"""Atomic file writes: a reader (or a crashed run) never sees half a file."""

from __future__ import annotations

import json
import os
import uuid


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes to a temporary file beside `path`, fsyncs, then renames it into place."""
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb" if isinstance(data, bytes) else "w",
              **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj) -> None:
  atomic_write(path, json.dumps(obj, indent=2))
