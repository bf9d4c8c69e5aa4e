"""Files every stage writes or reads: atomic writes, checksums, local or gs:// paths.

A file written here appears under its final name only once complete (written to a temporary
name, fsynced, renamed), so a reader never takes a half-written file for a whole one. On gs://
an object is uploaded in one request, which GCS makes visible whole or not at all, so no
temporary is needed there. A gs:// "directory" is the prefix DIRECTORY/ of its objects: it
exists once something is written under it, and it needs no creating.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from jaxsae import gcs
from jaxsae.errors import JaxsaeError


def is_remote(path: str) -> bool:
  return "://" in str(path)


def as_path(path: str):
  """A pathlib-like object for local paths and for gs:// (etils.epath, as orbax uses)."""
  if is_remote(path):
    from etils import epath  # imported lazily: local runs never need the gcs layer
    return epath.Path(path)
  import pathlib
  return pathlib.Path(path)


def join(directory: str, name: str) -> str:
  return os.path.join(directory, name)  # gs://b/d + name is gs://b/d/name too


def makedirs(directory: str) -> None:
  if not is_remote(directory):
    os.makedirs(directory, exist_ok=True)


def listdir(directory: str) -> list[str]:
  """The names directly in `directory` (a subdirectory once, by its name), as os.listdir;
  [] for a gs:// directory that holds nothing yet."""
  if not is_remote(directory):
    return os.listdir(directory)
  return sorted({name.split("/", 1)[0] for name in gcs.list_names(directory)})


def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  return gcs.exists(path)


def read_bytes(path: str) -> bytes:
  """The file's bytes; FileNotFoundError when it does not exist, local or gs://."""
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  try:
    return gcs.read_bytes(path)
  except JaxsaeError as e:
    if gcs.exists(path):  # another failure, already told in one line
      raise
    raise FileNotFoundError(path) from e


def remove(path: str) -> None:
  """Removes the file: locally FileNotFoundError when it is not there, on gs:// no error."""
  if not is_remote(path):
    os.remove(path)
    return
  gcs.delete(path)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see either nothing or the whole file."""
  if is_remote(path):
    gcs.write_bytes(path, data)
    return
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
