"""The store: manifest discipline, validation, and the deterministic batch stream."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import edit_manifest

from jaxsae import files
from jaxsae import store
from jaxsae import store_writer
from jaxsae.errors import JaxsaeError


@pytest.fixture
def acts():
  return np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)


@pytest.fixture
def st(tmp_path, acts):
  return store_writer.write_store(str(tmp_path / "s"), acts, rows_per_shard=96, dtype="float32")


def test_rows_round_trip_in_every_dtype(tmp_path, acts):
  for dtype in ("float32", "bfloat16", "float16"):
    s = store_writer.write_store(str(tmp_path / dtype), acts, rows_per_shard=128, dtype=dtype)
    idx = np.array([999, 0, 500, 127, 128])
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    np.testing.assert_allclose(s.rows(idx), acts[idx], rtol=tol, atol=tol)


def test_order_is_a_pure_function_of_seed_and_step(st, tmp_path):
  other = store.Store(st.directory)  # a second reader, e.g. another process or a resumed run
  for step in (0, 3, 11, 25):
    np.testing.assert_array_equal(st.batch(step, 64, data_seed=5),
                                  other.batch(step, 64, data_seed=5))
  assert not np.array_equal(st.batch_indices(0, 64, 5), st.batch_indices(0, 64, 6))


def test_each_epoch_visits_every_row_once_and_shuffles_across_shards(st):
  # 1000 rows, batch 40: 25 batches per epoch, with epochs joined seamlessly.
  first = np.concatenate([st.batch_indices(i, 40, 1) for i in range(25)])
  second = np.concatenate([st.batch_indices(i, 40, 1) for i in range(25, 50)])
  assert sorted(first) == list(range(1000)) and sorted(second) == list(range(1000))
  assert not np.array_equal(first, second)
  shard_of = np.searchsorted(st.offsets, first[:40], side="right") - 1
  assert len(set(shard_of)) > 1  # one batch mixes the shards of its buffer


def test_resumed_stream_reads_exactly_batch_n_next(st):
  uninterrupted = [b for b in st.batches(32, num_steps=10, data_seed=2)]
  resumed = list(store.Store(st.directory).batches(32, start_step=6, num_steps=4, data_seed=2))
  assert [b.step for b in resumed] == [6, 7, 8, 9]
  for a, b in zip(uninterrupted[6:], resumed):
    assert a.step == b.step and (a.skipped, a.where) == (b.skipped, b.where) == (0, "")
    np.testing.assert_array_equal(a.x, b.x)


def test_hosts_read_disjoint_slices_of_the_global_batch(st):
  whole = st.batch(4, 64)
  parts = [st.batch(4, 64, process_index=i, process_count=4) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_normalize_scales_to_sqrt_d_in(st):
  x = st.batch(0, 1000, normalize=True)
  assert abs(np.linalg.norm(x, axis=1).mean() / np.sqrt(8) - 1) < 0.05


def test_batches_placed_with_a_sharding(st):
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, P("data", None))
  x = next(st.batches(16, sharding=sharding)).x
  assert isinstance(x, jax.Array) and x.sharding == sharding
  np.testing.assert_array_equal(np.asarray(x), st.batch(0, 16))


def test_wrong_d_in_dtype_and_not_a_store(st, tmp_path):
  with pytest.raises(JaxsaeError, match="d_in=8, expected 16"):
    store.Store(st.directory, expect_d_in=16)
  with pytest.raises(JaxsaeError, match="holds float32, expected bfloat16"):
    store.Store(st.directory, expect_dtype="bfloat16")
  with pytest.raises(JaxsaeError, match="not an activation store"):
    store.Store(str(tmp_path))
  edit_manifest(st.directory, lambda m: m.__setitem__("num_tokens", 5))
  with pytest.raises(JaxsaeError, match="add up to 1000"):
    store.Store(st.directory)


def poisoned(directory, rows) -> store.Store:
  """A store of 50 rows of ones whose `rows` hold Inf."""
  s = store_writer.write_store(directory, np.ones((50, 4), np.float32), rows_per_shard=50)
  # Bytes edited on disk after the fact, and the checksum updated to match: only the value
  # check can catch it.
  path = os.path.join(s.directory, "shard_00000.bin")
  x = np.fromfile(path, np.float32).reshape(50, 4)
  x[rows, 1] = np.inf
  x.tofile(path)
  edit_manifest(s.directory, lambda m: m["shards"][0].update(sha256=files.sha256_file(path)))
  return store.Store(s.directory)


def test_non_finite_rows_are_named_at_read_time(tmp_path):
  with pytest.raises(JaxsaeError, match="shard_00000.bin at row 17"):
    poisoned(str(tmp_path / "s"), [17]).batch(0, 50)


def test_the_stream_says_which_batches_had_non_finite_rows_skipped(tmp_path):
  s = poisoned(str(tmp_path / "s"), [17, 30, 31])
  batches = list(s.batches(10, num_steps=5, skip_non_finite=True))
  bad = [np.isin(s.batch_indices(b.step, 10), [17, 30, 31]) for b in batches]
  assert [b.skipped for b in batches] == [int(m.sum()) for m in bad]
  for b, m in zip(batches, bad):
    first = s.batch_indices(b.step, 10)[m][:1]
    assert b.where == (f"shard shard_00000.bin at row {first[0]}" if m.any() else "")
    assert np.isfinite(b.x).all()
  assert sum(b.skipped for b in batches) == 3


def test_a_reader_error_surfaces_from_the_prefetch_thread(st):
  os.remove(os.path.join(st.directory, "shard_00004.bin"))
  s = store.Store.__new__(store.Store)
  s.__dict__.update(st.__dict__, _maps={}, _verified=set())
  with pytest.raises(FileNotFoundError, match="shard_00004.bin"):
    for _ in s.batches(64, num_steps=30, verify_on_read=False):
      pass


def test_remote_path_layer_reads_the_same_batches(st, monkeypatch):
  # gs:// stores go through etils.epath (as orbax does) instead of memory maps. The same epath
  # code reads a local path, so treating this one as remote runs that branch here.
  monkeypatch.setattr(files, "is_remote", lambda path: True)
  remote = store.Store(st.directory, verify="sha256")
  assert not isinstance(remote.shard(0), np.memmap)
  np.testing.assert_array_equal(remote.batch(7, 64, data_seed=3), st.batch(7, 64, data_seed=3))
  ids, at = remote.context(123)
  assert ids == st.context(123)[0]


_KEYS = ["format_version", "sites", "d_in", "dtype", "ctx_len", "num_tokens", "shards",
         "mean_norm"]


def test_any_damaged_manifest_is_a_clear_error_or_a_valid_store(tmp_path_factory, ledger):
  """Generated manifests: every one opens as a store whose reads work, or fails as JaxsaeError."""
  from hypothesis import HealthCheck, given, settings, strategies as st
  base = tmp_path_factory.mktemp("fuzz")
  good = store_writer.write_store(str(base / "s"), np.ones((300, 4), np.float32),
                                  rows_per_shard=100)
  original = json.load(open(os.path.join(good.directory, store.MANIFEST)))
  junk = st.one_of(st.none(), st.integers(-5, 10**6), st.text(max_size=5), st.floats(),
                   st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                             st.integers()))

  @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
  @given(edits=st.lists(st.tuples(st.sampled_from(_KEYS), junk), max_size=3),
         shard_edits=st.lists(st.tuples(st.integers(0, 2),
                                        st.sampled_from(["file", "num_tokens", "sha256"]),
                                        junk), max_size=2),
         drop=st.lists(st.sampled_from(_KEYS), max_size=2))
  def check(edits, shard_edits, drop):
    m = json.loads(json.dumps(original))
    for key, value in edits:
      m[key] = value
    for i, key, value in shard_edits:
      if isinstance(m.get("shards"), list) and i < len(m["shards"]) and \
          isinstance(m["shards"][i], dict):
        m["shards"][i][key] = value
    for key in drop:
      m.pop(key, None)
    with open(os.path.join(good.directory, store.MANIFEST), "w") as f:
      json.dump(m, f)
    ledger.add("bad_input")
    try:
      s = store.Store(good.directory)
      x = s.batch(0, 64)
      assert x.shape == (64, s.d_in)
    except JaxsaeError:
      ledger.add("clear_error")

  check()
