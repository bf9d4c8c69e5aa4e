"""gs:// objects for the store's reader and writer: ranged reads, create-only writes, retries.

The client is TensorStore's gcs kvstore: installed already (orbax's array I/O), C++ I/O outside
the GIL, generation preconditions. 8 MiB ranged reads from tests/gcs_server.py on 2 busy cores
(tests/gcs_clients_bench.py, 1-8 threads): TensorStore 182-269 MiB/s, gcsfs 169-264,
google-cloud-storage 108-159; the Python emulator is the ceiling, so the one that adds no
dependency wins. Only `size` calls the JSON API itself: TensorStore's Python API gives no length.

Every call retries transient failures (connection refused or reset, timeouts, HTTP 429/5xx, short
reads) with exponential backoff under `RETRY`, then raises one JaxsaeError naming the object.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, TypeVar

from jaxsae.errors import JaxsaeError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Retry:
  """How long a gs:// call keeps trying before it gives up."""
  attempts: int = 6  # tries in all, the first included
  initial_delay: float = 1.0  # seconds before the second try; doubles after each failure
  max_delay: float = 30.0


# The policy every call uses unless given one; tests and impatient runs replace it.
RETRY = Retry()

# TensorStore's status codes (the first word of its errors) that a later try may not meet.
# ABORTED is what it answers once its own retries of a 429/5xx or a refused connection run out;
# OUT_OF_RANGE and FAILED_PRECONDITION are a ranged read that got fewer bytes than asked.
_TRANSIENT = ("UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL",
              "UNKNOWN", "CANCELLED", "OUT_OF_RANGE", "FAILED_PRECONDITION")
_TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)


class _Transient(Exception):
  """A failure worth another try."""


def split(url: str) -> tuple[str, str]:
  """('bucket', 'path/to/object') of gs://bucket/path/to/object."""
  if not url.startswith("gs://") or len(url) <= 5 or url[5] == "/":
    raise JaxsaeError(f"{url!r} is not a gs:// URL; write it as gs://BUCKET/PATH")
  bucket, _, path = url[5:].partition("/")
  return bucket, path


def _endpoint() -> str:
  # The variable TensorStore reads, so both halves of this module reach the same server.
  return os.environ.get("TENSORSTORE_GCS_HTTP_URL", "https://storage.googleapis.com").rstrip("/")


_stores: dict = {}  # (bucket, endpoint) -> KvStore
_creds: list = []  # google-auth's credentials, once found
_lock = threading.Lock()


def _kvstore(bucket: str):
  import tensorstore as ts  # imported lazily: local runs never need it
  key = (bucket, _endpoint())
  with _lock:
    if key not in _stores:
      # One try per call inside TensorStore (max_retries 0): the backoff is ours, `RETRY`.
      _stores[key] = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "context": {
          "gcs_request_retries": {"max_retries": 0}}}).result()
    return _stores[key]


@functools.cache
def _no_value() -> bytes:
  """TensorStore's generation of an absent key: a write conditioned on it is create-only."""
  import tensorstore as ts
  return ts.KvStore.open({"driver": "memory"}).result().read("x").result().stamp.generation


def _ts_call(fn: Callable[[], T]) -> T:
  try:
    return fn()
  except ValueError as e:  # TensorStore's errors: "CODE: message"
    message = " ".join(str(e).split())
    if message.split(":", 1)[0] in _TRANSIENT:
      raise _Transient(message) from e
    raise ValueError(message) from e


def _retrying(url: str, fn: Callable[[], T], retry: Retry | None) -> T:
  retry = retry or RETRY
  delay = retry.initial_delay
  for attempt in range(1, retry.attempts + 1):
    try:
      return fn()
    except _Transient as e:
      if attempt == retry.attempts:
        raise JaxsaeError(
            f"{url}: the server did not answer after {retry.attempts} tries ({e}); check the "
            "network and the credentials (gcloud auth application-default login), then rerun: "
            "the run resumes from its last checkpoint") from e
      time.sleep(delay)
      delay = min(2 * delay, retry.max_delay)
    except ValueError as e:
      raise JaxsaeError(f"{url}: {e}; check that the bucket exists and that these credentials "
                        "may use it") from e
  raise AssertionError("unreachable")


def read_range(url: str, start: int, stop: int, *, retry: Retry | None = None) -> bytes:
  """Bytes [start, stop) of the object; never fewer: a short read is retried, then an error."""
  bucket, path = split(url)
  if not 0 <= start <= stop:
    raise JaxsaeError(f"{url}: byte range [{start}, {stop}) is not a range of an object")

  def read():
    r = _ts_call(lambda: _kvstore(bucket).read(path, byte_range=slice(start, stop)).result())
    if r.state != "value":
      raise JaxsaeError(f"{url} does not exist; check the path, or rewrite the object")
    if len(r.value) != stop - start:
      raise _Transient(f"read {len(r.value)} of bytes [{start}, {stop})")
    return r.value
  return _retrying(url, read, retry)


def read_bytes(url: str, *, retry: Retry | None = None) -> bytes:
  bucket, path = split(url)

  def read():
    r = _ts_call(lambda: _kvstore(bucket).read(path).result())
    if r.state != "value":
      raise JaxsaeError(f"{url} does not exist; check the path, or rewrite the object")
    return r.value
  return _retrying(url, read, retry)


def exists(url: str, *, retry: Retry | None = None) -> bool:
  bucket, path = split(url)
  # An empty range asks for the object's metadata only.
  return _retrying(url, lambda: _ts_call(
      lambda: _kvstore(bucket).read(path, byte_range=slice(0, 0)).result()).state == "value",
      retry)


def list_names(prefix_url: str, *, retry: Retry | None = None) -> list[str]:
  """Sorted names of the objects under the 'directory' prefix_url, relative to it."""
  import tensorstore as ts
  bucket, path = split(prefix_url)
  prefix = path if not path or path.endswith("/") else path + "/"
  # The smallest key after every key that starts with `prefix`: its last byte plus one.
  upper = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""
  keys = _retrying(prefix_url, lambda: _ts_call(lambda: _kvstore(bucket).list(
      ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=upper)).result()), retry)
  # Filtered again here: against the emulator the range's bounds reach GCS as a prefix only
  # partly, and keys outside it came back.
  return sorted(k[len(prefix):] for k in (k.decode() for k in keys) if k.startswith(prefix))


def write_bytes(url: str, data: bytes, *, if_absent: bool = False,
                retry: Retry | None = None) -> bool:
  """Writes the whole object at once (readers see the old object or the new one, never part).

  if_absent: create only (GCS's ifGenerationMatch=0), so of several writers one wins: returns
  False, writing nothing, when the object already exists. A create retried after a lost answer
  may find its own first try there and answer False too: a claimer that must tell writes its
  own id in `data` and reads the object back.
  """
  bucket, path = split(url)
  cond = _no_value() if if_absent else None
  stamp = _retrying(url, lambda: _ts_call(
      lambda: _kvstore(bucket).write(path, bytes(data), if_equal=cond).result()), retry)
  return bool(stamp.generation)  # an empty generation: the condition did not hold


def delete(url: str, *, retry: Retry | None = None) -> None:
  """Deletes the object; one that is already gone is no error."""
  bucket, path = split(url)
  _retrying(url, lambda: _ts_call(lambda: _kvstore(bucket).write(path, None).result()), retry)


def size(url: str, *, retry: Retry | None = None) -> int | None:
  """The object's length in bytes, or None when it does not exist."""
  bucket, path = split(url)
  req = urllib.request.Request(
      f"{_endpoint()}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/"
      f"{urllib.parse.quote(path, safe='')}?fields=size",
      headers={"Authorization": f"Bearer {_token()}"})

  def get():
    try:
      with urllib.request.urlopen(req, timeout=60) as r:
        return int(json.load(r)["size"])
    except urllib.error.HTTPError as e:
      if e.code == 404:
        return None
      if e.code in _TRANSIENT_HTTP:
        raise _Transient(f"HTTP {e.code}") from e
      raise JaxsaeError(f"{url}: HTTP {e.code} {e.reason}; check that the bucket exists and "
                        "that these credentials may read it") from e
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
      raise _Transient(str(getattr(e, "reason", e))) from e
  return _retrying(url, get, retry)


def _token() -> str:
  """A bearer token from the sources TensorStore reads first: the test variable, then ADC."""
  if "GOOGLE_AUTH_TOKEN_FOR_TESTING" in os.environ:
    return os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"]
  try:
    import google.auth
    import google.auth.exceptions
    import google.auth.transport.requests
  except ImportError as e:
    raise JaxsaeError("reading gs:// needs google-auth; install jaxsae with `pip install "
                      "-e .[gcs]`") from e
  with _lock:
    if not _creds:
      try:
        _creds.append(google.auth.default(
            scopes=["https://www.googleapis.com/auth/devstorage.read_write"])[0])
      except google.auth.exceptions.DefaultCredentialsError as e:
        raise JaxsaeError("no Google credentials for gs://; run `gcloud auth application-"
                          "default login` (on a Cloud VM its service account is used)") from e
    creds = _creds[0]
    if not creds.valid:  # a token lasts about an hour
      creds.refresh(google.auth.transport.requests.Request())
    return creds.token
