"""Text records from local JSONL files, one JSON object a line, checked as they are read.

Three schemas, one per stage:
  sft         {"prompt": ..., "completion": ...}
  preference  {"prompt": ..., "chosen": ..., "rejected": ...}
  prompt      {"prompt": ...}
Every required field must be a non-empty string. A bad record is an error that names the
file, the 1-based line and the field; nothing is skipped except blank lines. Preference
records may carry a numeric `margin` (a Bradley-Terry margin, kept). Other fields (ids,
sources, ...) are allowed and left out of the returned records.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

from rlhf_jax.fileio import atomic_write

SCHEMAS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}


# Optional numeric fields that are kept when present.
OPTIONAL_NUMBERS: dict[str, tuple[str, ...]] = {"preference": ("margin",)}


def schema_fields(schema: str) -> tuple[str, ...]:
  if schema not in SCHEMAS:
    raise ValueError(f"schema is {schema!r}; choose one of {sorted(SCHEMAS)}.")
  return SCHEMAS[schema]


def check_record(record: Any, schema: str, where: str) -> dict[str, str]:
  """The schema's fields of `record`, or a ValueError that starts with `where`."""
  fields = schema_fields(schema)
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object with fields {list(fields)}, got "
                     f"{type(record).__name__}.")
  out = {}
  for field in fields:
    if field not in record:
      raise ValueError(f"{where}: missing field {field!r}; every {schema!r} record needs "
                       f"{list(fields)}.")
    value = record[field]
    if not isinstance(value, str):
      raise ValueError(f"{where}: field {field!r} must be a string, got "
                       f"{type(value).__name__} {value!r:.80}.")
    if not value:
      raise ValueError(f"{where}: field {field!r} is an empty string; remove the record or "
                       "fill the field in.")
    out[field] = value
  for field in OPTIONAL_NUMBERS.get(schema, ()):
    if field in record:
      value = record[field]
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: field {field!r} must be a number, got {value!r:.80}.")
      out[field] = float(value)
  return out


def read_jsonl(path: str, schema: str) -> list[dict[str, str]]:
  """All records of a JSONL file, in file order, each with exactly the schema's fields."""
  schema_fields(schema)
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory; give a JSONL file (one JSON object a line).")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"JSONL file {path} does not exist.")
  records = []
  # Binary lines: a bad byte is reported with its line number like any other error.
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e}).") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line "
                         "must be one complete JSON object.") from None
      records.append(check_record(record, schema, where))
  if not records:
    raise ValueError(f"{path}: no records (the file is empty or only blank lines).")
  return records


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]], schema: str | None = None
                ) -> int:
  """Writes one JSON object a line; returns the number of records written.

  With `schema`, every record is checked first, so a bad one (named by its 1-based number)
  leaves no file behind. The file appears whole or not at all: it is written under a
  temporary name and renamed; a full disk is one OSError naming `path`.
  """
  lines = []
  for i, record in enumerate(records, start=1):
    if schema is not None:
      check_record(record, schema, f"{path}: record {i}")
    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
  atomic_write(path, "".join(lines))
  return len(lines)
