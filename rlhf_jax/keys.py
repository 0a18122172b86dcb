"""Unknown-key errors that suggest the closest valid key (a typo must never be ignored)."""

from __future__ import annotations

import difflib
from typing import Iterable


def check_known_keys(section: str, given: Iterable[str], known: Iterable[str]) -> None:
  known = sorted(known)
  problems = []
  for key in sorted(set(given) - set(known)):
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    problems.append(f"{key!r}{hint}")
  if problems:
    raise ValueError(f"{section} config: unknown key(s) {', '.join(problems)}; valid keys: {known}.")
