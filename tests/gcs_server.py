"""A real GCS JSON-API server for tests: gcp-storage-emulator in a subprocess of its own.

Run as a script it serves one bucket from a data directory; `GcsServer` starts and stops that
process and points every client at it. Objects live on disk, so a stopped server restarted on
the same port still has them, as a real bucket would after a network outage.

What the emulator (2026.7) lacks is added in the subprocess, not in jaxsae:
  * generation preconditions on upload (`ifGenerationMatch`, answered 412 as GCS does), which
    a create-only write relies on;
  * concurrent requests: its HTTPServer serves one request at a time, which would measure the
    server, not the client; reads run in parallel here, each write alone, with no read beside
    it (its metadata is one JSON file rewritten on every change);
  * empty objects uploaded as media (it fails on the empty body);
  * a read's generation (`x-goog-generation`) and its generation conditions, which TensorStore
    relies on to cache OCDBT manifests: without them every read looked like generation 0;
  * objects.move (POST .../o/SRC/moveTo/o/DST), which gcsfs tries first for every rename
    (orbax moving a checkpoint aside): the emulator's 501 is retried for seconds per object
    before gcsfs falls back to copy and delete.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

# Every client's variable for "talk to this endpoint instead of storage.googleapis.com".
# TensorStore sends GOOGLE_AUTH_TOKEN_FOR_TESTING as its bearer token instead of looking up
# credentials; google-cloud-storage and gcsfs read STORAGE_EMULATOR_HOST.
ENV_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
            "GOOGLE_CLOUD_PROJECT")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """One emulator process serving `bucket` on 127.0.0.1:`port` from `data_dir`."""

  def __init__(self, data_dir: str, bucket: str = "jaxsae-test", port: int | None = None):
    self.data_dir = str(data_dir)
    self.bucket = bucket
    self.port = port or free_port()
    self.proc: subprocess.Popen | None = None

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  @property
  def bucket_url(self) -> str:
    return f"gs://{self.bucket}"

  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "GOOGLE_CLOUD_PROJECT": "test"}

  def start(self, timeout: float = 20.0) -> None:
    """Starts the server (again, on the same port and data) and waits until it answers."""
    if self.proc is not None:
      return
    os.makedirs(self.data_dir, exist_ok=True)
    log = open(os.path.join(self.data_dir, "server.log"), "ab")
    self.proc = subprocess.Popen(
        [sys.executable, __file__, "--port", str(self.port), "--data_dir", self.data_dir,
         "--bucket", self.bucket], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + timeout
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}", timeout=1).read()
        return
      except OSError:
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"the GCS emulator did not start; see {self.data_dir}/server.log")
        time.sleep(0.05)

  def stop(self) -> None:
    """Kills the server; its objects stay on disk for `start`."""
    if self.proc is None:
      return
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait()
    self.proc = None


def _patched_emulator():
  """The emulator's server module with upload preconditions and concurrent reads added."""
  import http.server
  import threading
  from http import HTTPStatus

  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def condition_not_met(response):
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "conditionNotMet"}})

  def precondition(upload):
    def checked(request, response, storage):
      want = request.query.get("ifGenerationMatch")
      if want:
        name = request.query.get("name", [None])[0] or request.data["meta"].get("name")
        try:
          have = storage.get_file_obj(request.params["bucket_name"], name)["generation"]
        except NotFound:
          have = "0"
        if want[0] != str(have):
          return condition_not_met(response)
      return upload(request, response, storage)
    return checked

  def empty_body(upload):
    def media(request, response, storage):
      if request.data is None:  # the emulator reads an empty upload as no body at all
        request._data = b""
      return upload(request, response, storage)
    return media

  objects._media_upload = precondition(empty_body(objects._media_upload))
  objects._multipart_upload = precondition(objects._multipart_upload)

  def conditional(read):
    """A read as GCS answers it: the object's generation in `x-goog-generation` (TensorStore
    stamps what it reads with it, and caches by it), 304 where `ifGenerationNotMatch` names
    the current generation, 412 where `ifGenerationMatch` does not."""
    def checked(request, response, storage, *args, **kwargs):
      try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      except NotFound:
        return read(request, response, storage, *args, **kwargs)
      have = str(obj["generation"])
      match, not_match = (request.query.get("ifGenerationMatch"),
                          request.query.get("ifGenerationNotMatch"))
      if match and match[0] != have:
        return condition_not_met(response)
      if not_match and not_match[0] == have:
        response.status = HTTPStatus.NOT_MODIFIED
        return
      response["x-goog-generation"] = have
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
      return read(request, response, storage, *args, **kwargs)
    return checked

  # The routes that read an object, its metadata or its bytes (`get` serves `alt=media` by
  # calling `download` itself, so a read is checked once, on its route).
  reads = {objects.get: conditional(objects.get), objects.download: conditional(objects.download)}

  def move(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    try:
      moved = objects._copy(request.base_url, storage, bucket, name, bucket,
                            request.params["dest_object_id"])
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    objects._delete(storage, bucket, name)
    response.json(moved)

  api = server.settings.API_ENDPOINT
  server.HANDLERS = tuple((rf"^{root}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                           rf"(?P<dest_object_id>.*[^/]+)$", {server.POST: move})
                          for root in (api, "")) + tuple(
      (route, {method: reads.get(fn, fn) for method, fn in methods.items()})
      for route, methods in server.HANDLERS)

  # Reads share the storage, a write has it alone: the emulator reads an object's bytes and
  # its metadata in two steps and rewrites both (and its one metadata file) in several, so a
  # read beside a write could pair one version's bytes with another's generation, which a real
  # bucket never serves.
  lock, state = threading.Condition(), {"readers": 0, "writing": False}

  def shared(method):
    def locked(self):
      with lock:
        lock.wait_for(lambda: not state["writing"])
        state["readers"] += 1
      try:
        method(self)
      finally:
        with lock:
          state["readers"] -= 1
          lock.notify_all()
    return locked

  def alone(method):
    def locked(self):
      with lock:
        lock.wait_for(lambda: not state["writing"] and not state["readers"])
        state["writing"] = True
      try:
        method(self)
      finally:
        with lock:
          state["writing"] = False
          lock.notify_all()
    return locked

  class Handler(server.RequestHandler):
    do_GET = shared(server.RequestHandler.do_GET)
    do_POST = alone(server.RequestHandler.do_POST)
    do_PUT = alone(server.RequestHandler.do_PUT)
    do_PATCH = alone(server.RequestHandler.do_PATCH)
    do_DELETE = alone(server.RequestHandler.do_DELETE)

  class Api(server.APIThread):
    def run(self):
      import functools
      self._httpd = http.server.ThreadingHTTPServer(
          (self._host, self._port), functools.partial(Handler, self._storage))
      self._httpd.daemon_threads = True
      self.is_running.set()
      self._httpd.serve_forever()

  server.APIThread = Api
  return server


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--bucket", required=True)
  args = p.parse_args()
  server = _patched_emulator()
  from gcp_storage_emulator.handlers import buckets
  s = server.create_server("127.0.0.1", args.port, in_memory=False, data_dir=args.data_dir)
  buckets.create_bucket(args.bucket, s._storage)  # a no-op on restart: the data dir has it
  s.run()


if __name__ == "__main__":
  main()
