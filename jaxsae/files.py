"""Files every stage writes or reads: atomic writes, checksums, local or gs:// paths.

A file written here appears under its final name only once complete (written to a temporary
name, fsynced, renamed), so a reader never takes a half-written file for a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def is_remote(path: str) -> bool:
  return "://" in str(path)


def as_path(path: str):
  """A pathlib-like object for local paths and for gs:// (etils.epath, as orbax uses)."""
  if is_remote(path):
    from etils import epath  # imported lazily: local runs never need the gcs layer
    return epath.Path(path)
  import pathlib
  return pathlib.Path(path)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see either nothing or the whole file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_file(path, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with as_path(str(path)).open("rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()
