"""Which gs:// client jaxsae.gcs uses: 8 MiB ranged reads against tests/gcs_server.py.

Run: THREADS=4 .venv/bin/python tests/gcs_clients_bench.py (gcsfs, and google-cloud-storage
under it, come with the test extra). The emulator is Python: on a small machine it is the ceiling.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
import gcs_server  # noqa: E402

MiB = 1 << 20
CHUNK, OBJECTS, OBJECT_SIZE = 8 * MiB, 4, 32 * MiB
THREADS = int(os.environ.get("THREADS", 4))


def measure(name, read, data):
  jobs = [(i, s) for i in range(OBJECTS) for s in range(0, OBJECT_SIZE, CHUNK)]
  best = 0.0
  for _ in range(3):
    t = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as ex:
      outs = list(ex.map(lambda j: read(*j), jobs))
    dt = time.perf_counter() - t
    assert all(o == data[s:s + CHUNK] for o, (_, s) in zip(outs, jobs))
    best = max(best, len(jobs) * CHUNK / MiB / dt)
  print(f"{name:22s} {best:5.0f} MiB/s  ({len(jobs)} x 8 MiB, {THREADS} threads, best of 3)")


def main():
  server = gcs_server.GcsServer(tempfile.mkdtemp())
  server.start()
  os.environ.update(server.env(), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  try:
    import tensorstore as ts
    kv = ts.KvStore.open({"driver": "gcs", "bucket": server.bucket}).result()
    data = os.urandom(OBJECT_SIZE)
    for i in range(OBJECTS):
      kv.write(f"bench/o{i}", data).result()
    measure("tensorstore", lambda i, s: kv.read(
        f"bench/o{i}", byte_range=slice(s, s + CHUNK)).result().value, data)

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    bucket = storage.Client(project="test", credentials=AnonymousCredentials()).bucket(
        server.bucket)
    measure("google-cloud-storage", lambda i, s: bucket.blob(f"bench/o{i}").download_as_bytes(
        start=s, end=s + CHUNK - 1, checksum=None), data)

    import gcsfs
    fs = gcsfs.GCSFileSystem(endpoint_url=server.url, token="anon")
    measure("gcsfs", lambda i, s: fs.cat_file(
        f"{server.bucket}/bench/o{i}", start=s, end=s + CHUNK), data)
  finally:
    server.stop()


if __name__ == "__main__":
  main()
