"""The store read from gs:// on a real GCS server: the local store's batches, in bounded memory,
and one clear error for every way the bytes can fail to arrive."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
import types

import numpy as np
import pytest

from jaxsae import gcs
from jaxsae import store
from jaxsae import store_writer
from jaxsae.errors import JaxsaeError

QUICK = gcs.Retry(attempts=3, initial_delay=0.05, max_delay=0.05)


def upload(local: str, url: str) -> str:
  for name in sorted(os.listdir(local)):
    with open(os.path.join(local, name), "rb") as f:
      gcs.write_bytes(f"{url}/{name}", f.read())
  return url


@pytest.fixture
def root(gcs_emulator, request):
  return f"{gcs_emulator.bucket_url}/{request.node.name}"


def rows(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)) * np.exp(rng.uniform(-2, 2, (n, 1)))).astype(np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_gs_store_reads_the_local_stores_batches_bit_for_bit(tmp_path, root, dtype):
  import jax
  local = store_writer.write_store(str(tmp_path / "s"), rows(900), rows_per_shard=100,
                                   dtype=dtype)
  remote = store.Store(upload(local.directory, f"{root}/s"))
  assert remote.remote and remote.num_tokens == 900
  mesh = jax.make_mesh((1, jax.device_count()), ("seed", "data"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  # Two epochs and more, through a window of 8 shards of the store's 9.
  got = list(remote.batches(64, num_steps=30, data_seed=3, sharding=sharding, stored=True))
  want = list(local.batches(64, num_steps=30, data_seed=3, sharding=sharding, stored=True))
  for a, b in zip(got, want):
    assert a.step == b.step
    for x, y in zip(a.x, b.x):
      if y is not None:
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  idx = np.array([899, 0, 450, 99, 100])
  np.testing.assert_array_equal(remote.rows(idx), local.rows(idx))
  np.testing.assert_array_equal(remote.batch(5, 128, normalize=True),
                                local.batch(5, 128, normalize=True))
  assert remote.context(123) == local.context(123)


def test_streaming_a_gs_store_holds_no_more_than_its_window(tmp_path, root):
  """32 shards of 128 KiB streamed twice through a window of 8: the reader's own allocations
  (traced: numpy's buffers, the bytes read) peak within twice the window, never near the
  store's 4 MiB."""
  local = store_writer.write_store(str(tmp_path / "s"), rows(32 * 1024, 64), rows_per_shard=1024,
                                   dtype="bfloat16")
  remote = store.Store(upload(local.directory, f"{root}/s"), window=8)
  shard_bytes, window_bytes = 1024 * 64 * 2, 8 * 1024 * 64 * 2
  held = []
  tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    for b in remote.batches(256, num_steps=2 * 32 * 1024 // 256, stored=True, prefetch=2):
      held.append(remote._window.bytes_held())
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert max(held) <= window_bytes
  batches = 2 * 256 * 64 * 2
  assert peak < 2 * window_bytes + batches + shard_bytes, (peak, window_bytes)
  assert peak < 32 * shard_bytes / 2  # the store itself would not fit


def test_a_window_that_cannot_hold_two_buffers_is_refused(tmp_path, root):
  local = store_writer.write_store(str(tmp_path / "s"), rows(400), rows_per_shard=100)
  remote = store.Store(upload(local.directory, f"{root}/s"), window=7)
  with pytest.raises(JaxsaeError, match="raise --store_window to at least 8"):
    next(remote.batches(64))


def _one_line(e: pytest.ExceptionInfo) -> str:
  message = str(e.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("damage", ["missing", "truncated", "checksum"])
def test_a_damaged_gs_shard_is_named_and_never_read(tmp_path, root, damage, monkeypatch):
  monkeypatch.setattr(gcs, "RETRY", QUICK)
  local = store_writer.write_store(str(tmp_path / "s"), rows(400), rows_per_shard=100,
                                   dtype="bfloat16")
  url = upload(local.directory, f"{root}/s")
  shard = f"{url}/shard_00002.bin"
  data = gcs.read_bytes(shard)
  if damage == "missing":
    gcs.delete(shard)
  elif damage == "truncated":
    gcs.write_bytes(shard, data[:-32])
  else:
    gcs.write_bytes(shard, data[:-2] + bytes([data[-2] ^ 1, data[-1]]))
  remote = store.Store(url)
  with pytest.raises(JaxsaeError) as e:
    for _ in remote.batches(100, num_steps=8):
      pass
  message = _one_line(e)
  assert shard in message and "rerun `jaxsae extract`" in message
  assert {"missing": "is missing", "truncated": f"has {len(data) - 32} bytes",
          "checksum": "fails its checksum"}[damage] in message
  assert 2 not in remote._window.held  # nothing of it was kept to be read


def test_a_server_gone_ends_in_one_error_naming_the_shard(tmp_path, root, gcs_emulator,
                                                          monkeypatch):
  monkeypatch.setattr(gcs, "RETRY", QUICK)
  local = store_writer.write_store(str(tmp_path / "s"), rows(400), rows_per_shard=100)
  remote = store.Store(upload(local.directory, f"{root}/s"))
  gcs_emulator.stop()
  with pytest.raises(JaxsaeError) as e:
    next(remote.batches(100))
  message = _one_line(e)
  assert f"{root}/s/shard_0000" in message and "did not answer after 3 tries" in message
  assert not remote._window.held


def test_a_server_restarted_during_a_read_is_survived(tmp_path, root, gcs_emulator,
                                                      monkeypatch):
  """The server goes away once the stream has begun and comes back during the first retry's
  wait (the wait itself restarts it: no race with a clock): the stream reads on, unchanged."""
  local = store_writer.write_store(str(tmp_path / "s"), rows(800), rows_per_shard=100)
  remote = store.Store(upload(local.directory, f"{root}/s"))
  restarts, lock, stopped = [], threading.Lock(), threading.Event()

  def sleep(seconds):
    stopped.wait(60)  # a reader can meet the dying server before stop() has returned
    with lock:  # every reader waiting to retry waits for the one restart
      if not restarts:
        restarts.append(seconds)
        gcs_emulator.start()

  # gcs's own clock only: the server's start polls with the real one.
  monkeypatch.setattr(gcs, "time", types.SimpleNamespace(sleep=sleep))
  stream = remote.batches(100, num_steps=16, data_seed=1, prefetch=1, workers=1)
  got = [next(stream)]
  gcs_emulator.stop()  # the next epoch's shards are still to be read
  stopped.set()
  got += list(stream)
  assert restarts, "the stream never met the stopped server"
  want = list(local.batches(100, num_steps=16, data_seed=1))
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a.x, b.x)


@pytest.mark.slow
def test_train_and_match_read_a_gs_store_as_they_read_the_local_one(tmp_path, root):
  """`jaxsae train --store=gs://...` trains the very SAEs the local store gives, bit for bit, and
  `jaxsae match --store=gs://...` writes the same numbers."""
  from conftest import files as tree, planted_sparse, train_config
  from jaxsae import match
  from jaxsae import train
  from jaxsae import formats
  x, _ = planted_sparse(4096, 16, 32, 3)
  local = store_writer.write_store(str(tmp_path / "s"), (x + 0.5).astype(np.float32),
                                   rows_per_shard=512, dtype="bfloat16")
  url = upload(local.directory, f"{root}/s")
  for name, path in (("local", local.directory), ("gs", url)):
    train.run(train_config(path, tmp_path / name, num_tokens=128 * 20, checkpoint_every=20))
  for seed in (0, 1):
    a, _ = formats.stored(str(tmp_path / "local" / f"seed{seed}"))
    b, _ = formats.stored(str(tmp_path / "gs" / f"seed{seed}"))
    for k in a:
      assert a[k].tobytes() == b[k].tobytes(), (seed, k)
  results = {}
  for name, path in (("local", local.directory), ("gs", url)):
    out = tmp_path / f"match_{name}"
    match.run(match.MatchConfig(inputs=(str(tmp_path / "local"),), out=str(out), store=path,
                                freq_tokens=1024, importance_tokens=512, scan_tokens=1024))
    results[name] = tree(out)
  assert results["local"].keys() == results["gs"].keys()
  for f in results["local"]:
    a, b = results["local"][f], results["gs"][f]
    if f == "match.json":  # the same but for where each read from and how long it took
      a, b = (json.loads(v) for v in (a, b))
      for m in (a, b):
        for key in ("store", "seconds"):
          m.pop(key)
        for key in ("store", "out"):
          m["config"].pop(key)
        for p in m["pairs"]:
          p.pop("encoder_seconds"), p.pop("decoder_seconds")
    assert a == b, f
