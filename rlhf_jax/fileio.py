"""Atomic file writes: a reader (or a crashed run) never sees half a file, and a full disk
is one error naming the file."""

from __future__ import annotations

import errno
import json
import os
import uuid


NO_SPACE = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))


def no_space(path: str, code: int = errno.ENOSPC, fix: str = "free space there or write "
             "elsewhere (--workdir)") -> OSError:
  """The one-line OSError of a full disk / quota / file-size limit while writing `path`;
  `str()` is the message alone, `.errno` the cause."""
  err = OSError(f"no space left on device / file too large: {path}; {fix}.")
  err.errno = code
  return err


def no_space_error(e: OSError, path: str) -> OSError:
  """`no_space(path)` for a full disk / quota / file-size limit, else `e` itself."""
  return no_space(path, e.errno) if e.errno in NO_SPACE else e


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
  except OSError as e:
    err = no_space_error(e, path)
    if err is e:
      raise
    raise err from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj) -> None:
  atomic_write(path, json.dumps(obj, indent=2))
