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


def test_member_batches_reads_what_each_data_seed_reads(st):
  """Per-seed data: each step stacks every member's batch of its own data seed, placed with the
  members' sharding, as a lone stream of that data seed reads it."""
  import jax
  mesh = jax.make_mesh((1, jax.device_count()), ("seed", "data"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed", "data", None))
  got = list(store.member_batches(st.directory, [3, 5], 64, sharding, start_step=2,
                                  num_steps=2))
  assert [b.step for b in got] == [2, 3]
  for b in got:
    assert b.x.shape == (2, 64, st.d_in) and b.x.sharding == sharding
    for i, d in enumerate((3, 5)):
      np.testing.assert_array_equal(np.asarray(b.x[i]), st.batch(b.step, 64, data_seed=d))


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


# ---------------------------------------------------------------------------------------------
# 8-bit stores: codes plus one float32 scale per row, dequantized on every read.


@pytest.fixture
def wide(tmp_path):
  """Rows with the spread of real activations: row norms over two decades, one outlier each."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 2, 64)) * np.exp(rng.uniform(-2, 3, size=(300, 2, 1)))
  x[:, :, 5] *= 8
  x[7] = 0  # an all-zero row: scale 0, decoded to zeros
  return x.astype(np.float32)


def _store8(path, x, dtype):
  return store_writer.write_store(str(path), x, rows_per_shard=128, dtype=dtype,
                                  sites=("a", "b"))


def test_int8_round_trip_is_within_half_a_step_of_each_rows_scale(tmp_path, wide):
  s = _store8(tmp_path / "s", wide, "int8")
  for j, site in enumerate(("a", "b")):
    got = s.rows(np.arange(300), site=site)
    assert got.dtype == np.float32
    scale = np.abs(wide[:, j]).max(axis=1, keepdims=True)
    err = np.abs(got - wide[:, j])
    assert (err <= scale / 254 * (1 + 1e-5) + 1e-30).all()  # |x - x^| <= s / 254 per element
    np.testing.assert_array_equal(got[7], 0)
  assert (np.abs(s.shard(1)) <= np.abs(wide).max()).all() and s.shard(1).dtype == np.float32


def test_float8_round_trip_keeps_each_element_within_its_e4m3_rounding(tmp_path, wide):
  s = _store8(tmp_path / "s", wide * 1e3, "float8_e4m3fn")  # past e4m3's +-448 unscaled
  got = s.rows(np.arange(300), site="b")
  x = wide[:, 1] * 1e3
  scale = np.abs(x).max(axis=1, keepdims=True)
  # 3 mantissa bits: half a step is 1/16 of the value; below e4m3's normals (2^-6 of 448 / s),
  # half a subnormal step (2^-10 of s / 448).
  bound = np.maximum(np.abs(x) / 16, scale / 448 * 2.0**-10) * (1 + 1e-5)
  assert np.isfinite(got).all() and (np.abs(got - x) <= bound).all()
  rel = np.linalg.norm(got - x, axis=1)[x.any(1)] / np.linalg.norm(x, axis=1)[x.any(1)]
  assert rel.max() < 0.05


def test_8bit_stores_record_their_scales_and_old_stores_keep_their_spec(tmp_path, wide, st):
  s = _store8(tmp_path / "i8", wide, "int8")
  m = json.load(open(os.path.join(s.directory, store.MANIFEST)))
  assert m["dtype"] == "int8"
  assert m["row_scale"] == {"dtype": "float32", "per": "row and site", "value": "max |x|",
                            "code_of_max": 127.0}
  sh = m["shards"][0]
  assert sh["scales_file"] == "shard_00000.scales.bin"
  assert sh["scales_sha256"] == files.sha256_file(os.path.join(s.directory, sh["scales_file"]))
  assert os.path.getsize(os.path.join(s.directory, sh["file"])) == 128 * 2 * 64  # one byte each
  assert os.path.getsize(os.path.join(s.directory, sh["scales_file"])) == 128 * 2 * 4
  old = json.load(open(os.path.join(st.directory, store.MANIFEST)))
  assert "row_scale" not in old and "scales_file" not in old["shards"][0]
  edit_manifest(s.directory, lambda m: m.pop("row_scale"))  # an 8-bit store must say how
  with pytest.raises(JaxsaeError, match="row_scale=None"):
    store.Store(s.directory)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_the_trainers_stream_reads_float32_rows_of_an_8bit_store(tmp_path, wide, dtype):
  s = _store8(tmp_path / "s", wide, dtype)
  ref = _store8(tmp_path / "f32", wide, "float32")
  b = next(s.batches(64, data_seed=3, site="b", normalize=True))
  assert b.x.dtype == np.float32 and b.x.shape == (64, 64)
  want = next(ref.batches(64, data_seed=3, site="b", normalize=True)).x
  np.testing.assert_allclose(b.x, want, rtol=0.07, atol=0.02 * np.abs(want).max())
  assert abs(s.normalizer("b") / ref.normalizer("b") - 1) < 0.01


def test_a_damaged_scale_file_is_caught_like_a_damaged_shard(tmp_path, wide):
  s = _store8(tmp_path / "s", wide, "int8")
  path = os.path.join(s.directory, "shard_00001.scales.bin")
  data = open(path, "rb").read()
  with open(path, "wb") as f:  # truncated: refused on open
    f.write(data[:-4])
  with pytest.raises(JaxsaeError, match="shard_00001.scales.bin has 1020 bytes.*truncated"):
    store.Store(s.directory)
  with open(path, "wb") as f:  # same size, one scale changed: refused by its checksum
    f.write(data[:8] + np.float32(3.0).tobytes() + data[12:])
  with pytest.raises(JaxsaeError, match="shard_00001.scales.bin fails its checksum"):
    store.Store(s.directory).batch(0, 300)
  os.remove(path)
  with pytest.raises(JaxsaeError, match="shard_00001.scales.bin listed in .* is missing"):
    store.Store(s.directory)


def test_an_8bit_shard_refuses_non_finite_rows_and_leaves_no_files(tmp_path):
  store_writer.init_store(str(tmp_path), {"sites": ["s"], "d_in": 4, "dtype": "int8",
                                          "ctx_len": 1, "num_shards": 1})
  acts = np.ones((10, 1, 4), np.float32)
  acts[6, 0, 1] = np.inf
  with pytest.raises(JaxsaeError, match="shard 0 at row 6"):
    store_writer.write_shard(str(tmp_path), 0, acts, np.zeros((10, 1), np.int32), np.arange(10))
  assert sorted(os.listdir(tmp_path)) == [store.SPEC]


def test_quantize_dequantize_are_the_one_codec(wide):
  for dtype in store.DTYPES:
    codes, scales = store.quantize(wide, dtype)
    assert codes.dtype == store.np_dtype(dtype) and (scales is None) == (dtype not in
                                                                         store.CODE_MAX)
    assert store.dequantize(codes, scales).dtype == np.float32


def test_float8_table_dequantizes_every_code_as_ml_dtypes_casts_it():
  codes = np.arange(256, dtype=np.uint8).view(store.np_dtype("float8_e4m3fn")).reshape(16, 16)
  np.testing.assert_array_equal(store.dequantize(codes, None), codes.astype(np.float32))
  np.testing.assert_array_equal(store.dequantize(codes[:, ::3], None),
                                codes[:, ::3].astype(np.float32))  # a strided view too


def test_an_8bit_extraction_resumes_and_splits_into_the_same_bytes(tiny_model_dir, text_dir,
                                                                   tmp_path):
  from jaxsae import extract
  cfg = dict(model=tiny_model_dir, dataset=text_dir, sites=("model.layers.1.mlp",),
             num_tokens=2048, ctx_len=64, shard_tokens=512, batch_size=4, dtype="int8")
  whole = extract.run(extract.ExtractConfig(**cfg, out=str(tmp_path / "whole")))
  ref = extract.run(extract.ExtractConfig(**{**cfg, "dtype": "float32"},
                                          out=str(tmp_path / "f32")))
  # Split over two workers, the second finding a killed writer's half-written scales.
  parts = str(tmp_path / "parts")
  extract.run(extract.ExtractConfig(**cfg, out=parts, shard_range="2:4"))
  open(os.path.join(parts, "shard_00001.scales.bin.tmp-99999"), "wb").write(b"\0" * 7)
  split = extract.run(extract.ExtractConfig(**cfg, out=parts, shard_range="0:2"))
  assert not [f for f in os.listdir(parts) if ".tmp-" in f]
  key = lambda m: [(s["sha256"], s["scales_sha256"], s["tokens_sha256"]) for s in m["shards"]]
  assert key(split) == key(whole)
  x = store.Store(str(tmp_path / "whole"), verify="sha256").batch(0, 256, data_seed=1)
  want = store.Store(str(tmp_path / "f32")).batch(0, 256, data_seed=1)
  bound = np.abs(want).max(axis=1, keepdims=True) / 254 * (1 + 1e-5)
  assert x.dtype == np.float32 and (np.abs(x - want) <= bound).all()
  assert ref["num_tokens"] == whole["num_tokens"]


# ---------------------------------------------------------------------------------------------
# The trainer's path: rows as stored, decoded on the devices.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8", "float8_e4m3fn"])
def test_rows_decoded_in_a_jitted_program_equal_the_hosts_bit_for_bit(tmp_path, dtype):
  import jax
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(400, 2, 24)) * np.exp(rng.uniform(-3, 3, (400, 2, 1)))).astype(np.float32)
  s = store_writer.write_store(str(tmp_path / dtype), x, rows_per_shard=150, dtype=dtype,
                               sites=["a", "b"])
  mesh = jax.make_mesh((1, jax.device_count()), ("seed", "data"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  scale = s.normalizer("b")
  decode = jax.jit(store.decode, static_argnums=1)
  for b in s.batches(64, num_steps=3, data_seed=4, site="b", sharding=sharding, stored=True):
    assert b.x.codes.dtype == store.np_dtype(dtype)  # travelled as stored
    want = s.batch(b.step, 64, data_seed=4, site="b", normalize=True)
    assert np.asarray(decode(b.x, scale)).tobytes() == want.tobytes()
    assert np.asarray(decode(b.x, 1.0)).tobytes() == s.batch(b.step, 64, data_seed=4,
                                                              site="b").tobytes()


def test_many_reader_threads_deliver_the_one_threads_batches_in_order(st):
  one = list(st.batches(40, num_steps=30, data_seed=7, workers=1, prefetch=1))
  many = list(store.Store(st.directory).batches(40, num_steps=30, data_seed=7, workers=4,
                                                 prefetch=6))
  assert [b.step for b in many] == list(range(30))
  for a, b in zip(one, many):
    np.testing.assert_array_equal(a.x, b.x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float8_e4m3fn"])
def test_non_finite_rows_are_found_from_their_bits_in_every_float_dtype(dtype):
  codes = np.ones((6, 3, 5), np.float32)
  codes[1, 0, 2], codes[2, 2, 4], codes[4, 1, 0] = np.nan, np.inf, -np.inf
  stored = codes.astype(store.np_dtype(dtype))  # float8 has no Inf: both become its NaN
  want = ~np.isfinite(stored.astype(np.float32)).all(axis=-1)
  np.testing.assert_array_equal(store._non_finite_rows(stored), want)
  assert want.sum() == 3


def test_an_8bit_row_with_a_non_finite_scale_is_named(tmp_path):
  s = store_writer.write_store(str(tmp_path / "s"), np.ones((50, 4), np.float32),
                               rows_per_shard=50, dtype="int8")
  path = os.path.join(s.directory, "shard_00000.scales.bin")
  scales = np.fromfile(path, np.float32)
  scales[23] = np.nan
  scales.tofile(path)
  edit_manifest(s.directory, lambda m: m["shards"][0].update(scales_sha256=files.sha256_file(path)))
  with pytest.raises(JaxsaeError, match="shard_00000.bin at row 23"):
    next(store.Store(s.directory).batches(50, stored=True))
  b = next(store.Store(s.directory).batches(50, stored=True, skip_non_finite=True))
  assert b.skipped == 1 and np.isfinite(b.x.factor).all()


# ---------------------------------------------------------------------------------------------
# Massive activations: measured when the manifest is written, said by the writer and the
# trainer.


def _windowed_store(path, big: float, windows: int = 64, ctx: int = 16, d: int = 16):
  """A store of `windows` windows of `ctx` positions whose position 0 carries `big` along
  dimension 3 (SmolLM2's residual stream, in miniature); the manifest it was finished with."""
  rng = np.random.default_rng(0)
  acts = rng.normal(size=(windows, ctx, d)).astype(np.float32)
  acts[:, 0, 3] += big
  ids = rng.integers(0, 100, (windows, ctx)).astype(np.int32)
  half = windows // 2
  store_writer.init_store(str(path), {"model": "test", "sites": ["site"], "d_in": d,
                                      "dtype": "float32", "ctx_len": ctx, "num_shards": 2,
                                      "windows_per_shard": half, "excluded_tokens": []})
  for i in range(2):
    w = acts[i * half:(i + 1) * half].reshape(-1, 1, d)
    store_writer.write_shard(str(path), i, w, ids[i * half:(i + 1) * half], np.arange(len(w)))
  return store_writer.finalize(str(path))


def test_massive_first_positions_are_measured_and_said_once_the_store_is_written(tmp_path,
                                                                                  capsys):
  m = _windowed_store(tmp_path / "s", big=100.0)
  o = m["outliers"]["site"]
  assert o["top_dim"] == 3 and o["top_dim_variance"] > 0.9
  assert o["massive_rows"] == 1 / 16 and o["massive_variance"] > store.MASSIVE_VARIANCE_SHARE
  assert o["positions"] == [{"position": 0, "share": 1.0, "massive": 1.0}]
  assert o["sample_rows"] == o["positions_sampled"] == 1024
  said = capsys.readouterr().out.strip()
  assert said.count("\n") == 0 and said.startswith("warning: site: 6.2% of rows")
  assert "window position 0" in said and "--skip_first=1" in said
  assert store.Store(str(tmp_path / "s")).massive_warning("site") == said

  calm = _windowed_store(tmp_path / "calm", big=0.0)
  assert capsys.readouterr().out == ""
  assert calm["outliers"]["site"]["massive_rows"] == 0.0
  assert calm["outliers"]["site"]["positions"] == []
  assert store.Store(str(tmp_path / "calm")).massive_warning() is None


def test_outlier_figures_are_the_sites_studys():
  """What the manifest records is what experiments/depth_study measured by hand."""
  from experiments import depth_study
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3000, 12)).astype(np.float32)
  x[::50, 5] += 40.0
  o = store_writer.outlier_stats(x, np.linalg.norm(x, axis=1))
  want = depth_study.outliers(x)
  for key in ("top_dim_variance", "massive_rows", "max_norm_over_median"):
    assert o[key] == pytest.approx(want[key], rel=1e-5), key
  assert "positions" not in o  # no positions known: none claimed


def test_a_store_without_outlier_figures_reads_and_warns_of_nothing(st, capsys):
  assert st.outliers() is not None  # rows with no massive ones: measured, nothing said
  assert st.massive_warning() is None and capsys.readouterr().out == ""
  o = st.outliers()
  for damaged in (None, "junk", {"site": {**o, "massive_rows": "x"}},
                  {"site": {**o, "over_median": "5"}}):
    edit_manifest(st.directory, lambda m: m.update(outliers=damaged))
    s = store.Store(st.directory)
    assert s.outliers() is None and s.massive_warning() is None
  edit_manifest(st.directory, lambda m: m.pop("outliers"))
  assert store.Store(st.directory).massive_warning() is None
  # Positions past reading are left unsaid, not an error.
  loud = {**o, "massive_variance": 0.9, "positions": 7}
  edit_manifest(st.directory, lambda m: m.update(outliers={"site": loud}))
  assert store.Store(st.directory).massive_warning().endswith("no window positions for them")


def test_the_suggested_skip_first_starts_at_the_stores_own_first_position():
  o = {"massive_rows": 0.01, "massive_variance": 0.9, "top_dim_variance": 0.95,
       "max_norm_over_median": 150.0,
       "positions": [{"position": 1, "share": 0.7, "massive": 1.0},
                     {"position": 2, "share": 0.25, "massive": 0.6},
                     {"position": 40, "share": 0.05, "massive": 0.01}]}
  said = store.massive_warning({"skip_first": 1, "outliers": {"a": o}}, "a")
  assert "95% of them at window position 1-2" in said and "--skip_first=3" in said
  later = store.massive_warning({"outliers": {"a": o}}, "a")  # position 0 is not among them
  assert "not at a window's start" in later and "1 (70%), 2 (25%), 40 (5%)" in later
  assert store.massive_warning({"outliers": {"a": {**o, "massive_variance": 0.4}}}, "a") is None
  unplaced = store.massive_warning({"outliers": {"a": {**o, "positions": []}}}, "a")
  assert unplaced.endswith("the store records no window positions for them")


def test_train_says_it_before_anything_else(tmp_path, capsys):
  """Before the plan is even checked, so a run refused by it (here: too few latents, which
  spares the test a compile) has said it too."""
  from conftest import train_config
  from jaxsae import train
  _windowed_store(tmp_path / "s", big=100.0)
  said = capsys.readouterr().out.strip()
  with pytest.raises(JaxsaeError, match="num_latents=1"):
    train.run(train_config(tmp_path / "s", tmp_path / "run", num_latents=1))
  assert capsys.readouterr().out.strip() == said
