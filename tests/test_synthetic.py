"""jaxsae synth: a store of known features that every command reads, and matching against it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from jaxsae import saes
from jaxsae import store as store_lib
from jaxsae import synthetic
from jaxsae import truth as truth_lib
from jaxsae.errors import JaxsaeError


def _synth(out, **kw):
  base = dict(out=str(out), d_in=48, num_features=40, num_tokens=40_000, l0=4.0,
              rows_per_shard=8192)
  return synthetic.run(synthetic.SynthConfig(**{**base, **kw}))


def _file_bytes(directory) -> dict[str, bytes]:
  return {f: p.read_bytes() for f, p in ((p.name, p) for p in directory.iterdir()) if p.is_file()}


def _measured(directory) -> tuple[np.ndarray, float]:
  """Per-feature firing frequency and L0 read back from the store through the true dictionary.

  With N <= d the features are orthonormal and there is no noise, so a feature's projection is
  its magnitude: positive exactly where it fires.
  """
  st = store_lib.Store(str(directory))
  t = saes.load_sae(os.path.join(str(directory), synthetic.TRUTH_DIR))
  x = st.rows(np.arange(st.num_tokens))
  on = x @ t.W_dec.T > 1e-4
  return on.mean(axis=0), float(on.sum(axis=1).mean())


@pytest.mark.parametrize("structure", [{}, {"hierarchy": 2, "branching": 3, "correlation": 0.5}])
def test_store_l0_and_frequencies_match_parameters(tmp_path, structure):
  st = _synth(tmp_path / "s", **structure)
  m = st.manifest
  assert m["model"] == "synthetic" and m["synthetic"]["seed"] == 0
  assert m["synthetic"]["num_features"] == 40 and m["num_tokens"] == 40_000
  p = synthetic.load_arrays(str(tmp_path / "s"))["probability"]
  freq, l0 = _measured(tmp_path / "s")
  sigma = np.sqrt(p * (1 - p) / 40_000)
  assert np.all(np.abs(freq - p) < 5 * sigma + 1e-4)
  assert l0 == pytest.approx(m["synthetic"]["true_l0"], rel=0.03)
  if not structure:
    assert m["synthetic"]["true_l0"] == pytest.approx(4.0)
    # Zipf: p_i (i + 1)^0.5 is one constant.
    assert np.allclose(p * np.sqrt(np.arange(1, 41)), p[0])


def test_hierarchy_children_fire_only_with_their_parent_one_at_a_time(tmp_path):
  cfg = synthetic.SynthConfig(out="x", d_in=48, num_features=40, hierarchy=2, branching=3,
                              l0=4.0)
  t = synthetic.draw_truth(cfg)
  _, on = synthetic.chunk(cfg, t, 0, 20_000)
  for h in (0, 1):
    kids = np.nonzero(t.parent == h)[0]
    assert len(kids) == 3
    assert not (on[:, kids].any(axis=1) & ~on[:, h]).any()
    assert on[:, kids].sum(axis=1).max() <= 1


def test_generator_is_deterministic_in_its_seed(tmp_path):
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    _synth(tmp_path / name, seed=seed, num_tokens=10_000, correlation=0.3)
  a, b, c = (_file_bytes(tmp_path / n) for n in "abc")
  shards = [f for f in a if f.endswith(".bin")]
  assert shards and all(a[f] == b[f] for f in shards) and a["manifest.json"] == b["manifest.json"]
  assert _file_bytes(tmp_path / "a" / "truth")["sae.safetensors"] == \
      _file_bytes(tmp_path / "b" / "truth")["sae.safetensors"]
  assert any(a[f] != c[f] for f in shards)


def test_rerun_keeps_the_store_and_other_parameters_are_refused(tmp_path):
  _synth(tmp_path / "s", num_tokens=10_000)
  before = _file_bytes(tmp_path / "s")
  _synth(tmp_path / "s", num_tokens=10_000)
  assert _file_bytes(tmp_path / "s") == before
  with pytest.raises(JaxsaeError, match="different store"):
    _synth(tmp_path / "s", num_tokens=10_000, l0=5.0)


def test_bad_parameters_name_the_flag(tmp_path):
  with pytest.raises(JaxsaeError, match="--l0"):
    _synth(tmp_path / "s", num_features=4, l0=3.9)
  with pytest.raises(JaxsaeError, match="--hierarchy"):
    _synth(tmp_path / "s", hierarchy=10, branching=4)


def test_truth_against_a_permuted_noised_copy_and_an_unrelated_dictionary():
  rng = np.random.default_rng(0)
  t = synthetic.features(64, 512, rng)
  copy = t[rng.permutation(512)] + 0.01 * rng.standard_normal(t.shape)
  r = truth_lib.recovery(copy, t)
  assert r["recovered_0.7"] == 1.0 and r["recovered_0.9"] == 1.0 and r["mcc"] > 0.99
  other = truth_lib.recovery(synthetic.features(64, 512, np.random.default_rng(1)), t)
  assert other["recovered_0.7"] == 0.0 and other["recovered_0.9"] == 0.0
  assert other["mcc"] < 0.5


def test_classify_names_aligned_merged_and_split_rows():
  t = np.eye(8, 16)
  rows = np.stack([t[0] + 0.05 * t[5],  # aligned with feature 0
                   t[1] + t[2] + t[4],  # a merge of 1, 2 and 4
                   t[3] + 1.2 * np.eye(16)[12], t[3] + 1.2 * np.eye(16)[13],  # 3, split in two
                   np.eye(16)[15]])  # nothing true
  c = truth_lib.classify(rows, t)
  assert [truth_lib.KINDS[k] for k in c["kind"]] == ["aligned", "merged", "split", "split",
                                                     "other"]


def test_truth_dir_is_an_sae_that_match_and_truth_read(tmp_path):
  from jaxsae import match
  _synth(tmp_path / "s", num_tokens=10_000)
  truth = str(tmp_path / "s" / "truth")
  res = truth_lib.run(truth_lib.TruthConfig(inputs=(truth,), truth=truth, out=str(tmp_path / "t")))
  assert res["saes"][0]["recovered_0.9"] == 1.0
  with open(tmp_path / "t" / "truth.json") as f:
    assert json.load(f)["saes"][0]["mcc"] == pytest.approx(1.0, abs=1e-5)
  shutil.copytree(truth, tmp_path / "copy")
  m = match.run(match.MatchConfig(inputs=(truth, str(tmp_path / "copy")), out=str(tmp_path / "m"),
                                  freq_tokens=2048, scan_tokens=0, importance_tokens=0))
  assert m["decoder_mcc_mean"] == pytest.approx(1.0, abs=1e-5)
