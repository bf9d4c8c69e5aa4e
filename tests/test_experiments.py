"""The open-question analyses of experiments/open_questions.py, on tables whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from experiments import depth_study as ds
from experiments import open_questions as oq


def pair_rows(a: str, b: str, enc_partner, enc_cos, dec_partner, dec_cos) -> pd.DataFrame:
  n = len(enc_partner)
  return pd.DataFrame({"a": a, "b": b, "latent": np.arange(n), "enc_partner": enc_partner,
                       "enc_cos": enc_cos, "dec_partner": dec_partner, "dec_cos": dec_cos})


def three_seeds():
  """Three SAEs of 4 latents. Latent 0 of s0 is found in all three, latent 1 in s0 and s1 only,
  latents 2 and 3 in no other (one by a low cosine, one by disagreeing partners)."""
  hi, lo = 0.9, 0.3
  rows = [
      # s0 -> s1: identity partners; latents 0 and 1 shared, 2 low, 3 enc/dec disagree.
      pair_rows("s0", "s1", [0, 1, 2, 3], [hi, hi, lo, hi], [0, 1, 2, 3], [hi, hi, hi, hi]),
      # s0 -> s2: partner of 0 is 3 (shared), the rest low.
      pair_rows("s0", "s2", [3, 1, 2, 0], [hi, lo, lo, lo], [3, 1, 2, 0], [hi, lo, lo, lo]),
      # s1 -> s2: s1's latent 0 (s0's 0) shares s2's 3, so the chain closes.
      pair_rows("s1", "s2", [3, 1, 2, 0], [hi, lo, lo, lo], [3, 1, 2, 0], [hi, lo, lo, lo]),
  ]
  rows[0].loc[3, "dec_partner"] = 2  # latent 3: the two matchings name different partners
  rows[0].loc[2, "dec_partner"] = 3
  summary = {"saes": [{"name": n} for n in ("s0", "s1", "s2")], "threshold": 0.7}
  return summary, pd.concat(rows, ignore_index=True)


def test_census_counts_each_base_seed():
  summary, table = three_seeds()
  res = oq.census(summary, table, "agree")
  # Seen from s0: latent 0 in 3 SAEs, latent 1 in 2, latents 2 and 3 in 1.
  assert res["per_base"]["s0"] == [0.5, 0.25, 0.25]
  # Seen from s2 (only ever side b): its latent 3 is s0's and s1's latent 0; nothing else.
  assert res["per_base"]["s2"] == [0.75, 0.0, 0.25]
  assert res["only_one"]["mean"] == pytest.approx(np.mean(
      [v[0] for v in res["per_base"].values()]))
  # both_above ignores which partners the matchings name: s0's latent 3 counts as shared.
  assert oq.census(summary, table, "both_above")["per_base"]["s0"] == [0.25, 0.5, 0.25]


def test_shared_flags_from_side_b_inverts_the_partners():
  _, table = three_seeds()
  pair = table[(table.a == "s0") & (table.b == "s2")]
  # s2's latent 3 is matched from s0's latent 0 (cosines 0.9): shared; the rest are not.
  assert oq.shared_flags(pair, "b", "agree", 0.7).tolist() == [False, False, False, True]
  # A side-b latent no a-latent maps to (a wider b) is never shared.
  wide = oq.shared_flags(pair, "b", "both_above", 0.7, n_other=6)
  assert wide.tolist() == [False, False, False, True, False, False]


def test_pair_kinds_sorts_a_grid_by_what_differs():
  names = [f"seed{i}_data{d}" for d in range(2) for i in range(2)]
  pairs = []
  for x in range(4):
    for y in range(x + 1, 4):
      value = 0.1 * (x + 1) + 0.01 * y
      pairs.append({"a": names[x], "b": names[y], "decoder_mcc": value,
                    "rules": {"both_above": {"fraction_shared": value},
                              "decoder": {"fraction_shared": value}}})
  kinds = oq.pair_kinds({"pairs": pairs})
  # (0,1) and (2,3) share the data order; (0,2) and (1,3) the initialisation; the rest neither.
  assert {k: v["pairs"] for k, v in kinds.items()} == {"init": 2, "data": 2, "both": 2}
  assert kinds["init"]["both_above"]["mean"] == pytest.approx((0.11 + 0.33) / 2)
  assert kinds["data"]["decoder_mcc"]["mean"] == pytest.approx((0.12 + 0.23) / 2)
  with pytest.raises(ValueError, match="not of seed"):
    oq.pair_kinds({"pairs": [{"a": "seed0", "b": "seed1"}]})


def test_nested_groups_by_index_and_by_frequency():
  n = 8
  shared = [True, True, True, False, False, True, False, False]
  cos = np.where(shared, 0.9, 0.1)
  pair = pair_rows("a", "b", np.arange(n), cos, np.arange(n), cos)
  summary = {"saes": [{"name": "a"}, {"name": "b"}], "threshold": 0.7}
  bounds = oq.group_bounds([2, 4, 8])
  assert bounds == [(0, 2), (2, 4), (4, 8)]
  by_index = oq.nested(pair, summary, bounds)
  assert [r["mean"] for r in by_index] == [1.0, 0.5, 0.25]
  # Ranked by frequency the rarest latents come first here, so the groups reverse.
  freqs = np.stack([np.arange(n, dtype=float), np.ones(n)])
  by_freq = oq.nested(pair, summary, bounds, by_frequency=True, freqs=freqs)
  assert [r["mean"] for r in by_freq] == [0.0, 0.5, 0.75]


def test_l0_is_the_sum_of_firing_frequencies():
  assert oq.l0s(np.array([[0.5, 0.25], [1.0, 1.0]])) == [0.75, 2.0]
  assert oq.l0s(None) is None


def test_outliers_finds_the_rows_and_the_dimension_that_dominate():
  """One row in a hundred 300 units out along dimension 3, as a residual stream's first token
  of each window is: that dimension holds nearly all the variance, and those rows are counted."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10_000, 16))
  x[::100, 3] += 300.0
  got = ds.outliers(x)
  assert got["top_dim_variance"] > 0.95
  assert got["massive_rows"] == pytest.approx(0.01)
  assert got["max_norm_over_median"] > 20
  plain = ds.outliers(rng.normal(size=(10_000, 16)))
  assert plain["top_dim_variance"] < 0.1 and plain["massive_rows"] == 0.0


def test_drop_massive_rows_keeps_all_but_each_windows_first_row(tiny_model_dir, text_dir,
                                                                tmp_path):
  from experiments import drop_massive_rows as dm
  from jaxsae import extract
  from jaxsae import store as store_lib
  extract.run(extract.ExtractConfig(model=tiny_model_dir, dataset=text_dir,
                                    sites=("model.layers.1",), num_tokens=2048, ctx_len=64,
                                    dtype="float32", out=str(tmp_path / "s"), shard_tokens=512,
                                    batch_size=4))
  st = store_lib.Store(str(tmp_path / "s"))
  rows, ids = dm.kept_rows(st)
  windows = set()
  for i in range(len(st.shards)):
    w_ids, pos = st.tokens(i)
    windows |= {(i, int(w)) for w in pos // w_ids.shape[1]}
  assert len(rows) == st.num_tokens - len(windows)  # one row less per window with rows
  for i in range(len(st.shards)):  # no kept row is its window's first, every other one is kept
    w_ids, pos = st.tokens(i)
    local = rows[(rows >= st.offsets[i]) & (rows < st.offsets[i] + len(pos))] - st.offsets[i]
    window = pos // w_ids.shape[1]
    firsts = np.r_[0, np.flatnonzero(window[1:] != window[:-1]) + 1]
    assert set(local.tolist()) == set(range(len(pos))) - set(firsts.tolist())
    assert (ids[np.searchsorted(rows, local + st.offsets[i])] ==
            w_ids.reshape(-1)[pos[local]]).all()
