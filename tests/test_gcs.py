"""jaxsae.gcs against a real GCS server: whole and ranged reads, claims, and failures."""

from __future__ import annotations

import os
import threading

import pytest

from jaxsae import gcs
from jaxsae.errors import JaxsaeError

# Tries every 50 ms: a dead server is given up on within a fraction of a second.
QUICK = gcs.Retry(attempts=3, initial_delay=0.05, max_delay=0.05)


@pytest.fixture
def root(gcs_emulator, request):
  return f"{gcs_emulator.bucket_url}/{request.node.name}"


def test_round_trip(root):
  data = os.urandom(3 << 20)
  assert gcs.write_bytes(f"{root}/a.bin", data)
  gcs.write_bytes(f"{root}/sub/b.bin", b"")
  assert gcs.read_bytes(f"{root}/a.bin") == data
  assert gcs.read_bytes(f"{root}/sub/b.bin") == b""
  assert gcs.size(f"{root}/a.bin") == len(data) and gcs.size(f"{root}/sub/b.bin") == 0
  assert gcs.exists(f"{root}/a.bin") and not gcs.exists(f"{root}/c.bin")
  assert gcs.size(f"{root}/c.bin") is None
  assert gcs.list_names(root) == ["a.bin", "sub/b.bin"] == gcs.list_names(root + "/")
  assert gcs.list_names(f"{root}/sub") == ["b.bin"]
  gcs.delete(f"{root}/a.bin")
  gcs.delete(f"{root}/a.bin")  # already gone: no error
  assert not gcs.exists(f"{root}/a.bin") and gcs.list_names(root) == ["sub/b.bin"]


def test_ranged_reads_are_slices(root):
  data = os.urandom(1 << 20)
  gcs.write_bytes(f"{root}/a.bin", data)
  for start, stop in [(0, 1), (5, 5), (1000, 70000), (len(data) - 3, len(data)), (0, len(data))]:
    assert gcs.read_range(f"{root}/a.bin", start, stop) == data[start:stop]
  # Concurrent readers, as the store reads shards, each get exactly their bytes.
  out = {}
  threads = [threading.Thread(target=lambda i=i: out.__setitem__(
      i, gcs.read_range(f"{root}/a.bin", i << 16, (i + 1) << 16))) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert b"".join(out[i] for i in range(16)) == data


def test_create_only_write_is_refused_the_second_time(root):
  assert gcs.write_bytes(f"{root}/claim", b"worker 1", if_absent=True)
  assert not gcs.write_bytes(f"{root}/claim", b"worker 2", if_absent=True)
  assert gcs.read_bytes(f"{root}/claim") == b"worker 1"
  gcs.write_bytes(f"{root}/claim", b"overwritten")  # without the condition a write replaces
  assert gcs.read_bytes(f"{root}/claim") == b"overwritten"


def test_missing_object_is_one_line_naming_it(root):
  for read in (lambda u: gcs.read_bytes(u), lambda u: gcs.read_range(u, 0, 4)):
    with pytest.raises(JaxsaeError, match="does not exist") as e:
      read(f"{root}/nope.bin")
    assert f"{root}/nope.bin" in str(e.value) and "\n" not in str(e.value)


def test_not_a_gs_url_is_refused():
  for url in ("/tmp/x", "gs://", "gs:///x", "s3://b/x"):
    with pytest.raises(JaxsaeError, match="gs://BUCKET/PATH"):
      gcs.read_bytes(url)


def test_short_read_is_an_error(root):
  gcs.write_bytes(f"{root}/short.bin", b"0123456789")
  with pytest.raises(JaxsaeError, match="after 3 tries") as e:
    gcs.read_range(f"{root}/short.bin", 4, 20, retry=QUICK)
  assert f"{root}/short.bin" in str(e.value)


def test_dead_server_is_one_error_naming_the_object(gcs_emulator, root):
  url = f"{root}/a.bin"
  gcs.write_bytes(url, b"abc")
  gcs_emulator.stop()
  for call in (lambda: gcs.read_bytes(url, retry=QUICK),
               lambda: gcs.read_range(url, 0, 2, retry=QUICK),
               lambda: gcs.size(url, retry=QUICK), lambda: gcs.exists(url, retry=QUICK),
               lambda: gcs.write_bytes(url, b"x", retry=QUICK),
               lambda: gcs.list_names(root, retry=QUICK)):
    with pytest.raises(JaxsaeError) as e:
      call()
    message = str(e.value)
    assert url in message or root in message
    assert "after 3 tries" in message and "resumes from its last checkpoint" in message
    assert "\n" not in message


def test_server_back_within_the_backoff_window(gcs_emulator, root):
  url = f"{root}/a.bin"
  gcs.write_bytes(url, b"abcdef")
  gcs_emulator.stop()
  # The read's first try fails; the server is back before the tries run out.
  patient = gcs.Retry(attempts=50, initial_delay=0.1, max_delay=0.1)
  restart = threading.Timer(0.3, gcs_emulator.start)
  restart.start()
  try:
    assert gcs.read_range(url, 1, 4, retry=patient) == b"bcd"
  finally:
    restart.join()


def test_epath_and_orbax_reach_the_same_server(root):
  """What the store's epath reads and the trainer's orbax checkpoints use for gs://."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from jaxsae import files

  p = files.as_path(f"{root}/epath/x.txt")
  p.write_text("hello")  # gcsfs, pointed here by STORAGE_EMULATOR_HOST
  assert gcs.read_bytes(f"{root}/epath/x.txt") == b"hello" and p.stat().length == 5
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
  with ocp.CheckpointManager(f"{root}/ckpt") as mngr:  # arrays through TensorStore
    mngr.save(3, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
  with ocp.CheckpointManager(f"{root}/ckpt") as mngr:
    assert mngr.all_steps() == [3]
    back = mngr.restore(3, args=ocp.args.StandardRestore(state))
  assert (back["w"] == state["w"]).all() and int(back["step"]) == 3
