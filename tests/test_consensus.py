"""Stability across seeds (jaxsae/stability.py, written by match) and `jaxsae consensus`."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import rand, random_sae_weights, save_sae

from jaxsae import consensus
from jaxsae import match
from jaxsae import saes
from jaxsae import stability
from jaxsae import store as store_lib
from jaxsae import store_writer
from jaxsae.errors import JaxsaeError

D, N, K = 32, 16, 4


def unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write(path, w, k=K, **kw):
  return save_sae(str(path), w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], k=k, **kw)


def planted_triple(tmp_path, rng):
  """Three SAEs a, b, c with known groups; rows are unit vectors, encoder = decoder.

  f: one feature in all three; g: in a and b only. The conflicting triple: a0 ~ b0
  (cos 0.894), b0 ~ c0 (0.949) and a0 ~ c1 (0.876), while a0 and c0 are 0.707 apart, so the
  optimal bijections pair a0 with c1 but b0 with c0. Every other latent is random: an orphan.
  """
  w = [random_sae_weights(rng, N, D) for _ in range(3)]
  for x in w:
    x["W_dec"] = unit(x["W_dec"])
    x["W_enc"] = x["W_dec"].copy()
  u, p = unit(rand(rng, D)), rand(rng, D)
  p = unit(p - (p @ u) * u)
  f, g = unit(rand(rng, D)), unit(rand(rng, D))
  rows = {(0, 0): u, (1, 0): unit(u + 0.5 * p), (2, 0): unit(u + 1.0 * p),
          (2, 1): unit(u - 0.55 * p), (0, 5): f, (1, 9): f, (2, 7): f, (0, 3): g, (1, 4): g}
  for (s, lat), v in rows.items():
    w[s]["W_dec"][lat] = w[s]["W_enc"][lat] = v
  paths = [write(tmp_path / name, x) for name, x in zip("abc", w)]
  return paths


def test_planted_groups_stability_and_the_conflicting_triple(tmp_path):
  paths = planted_triple(tmp_path, np.random.default_rng(0))
  res = match.run(match.MatchConfig(inputs=tuple(paths), out=str(tmp_path / "m"),
                                    threshold=0.8, freq_tokens=0))
  table = pd.read_csv(tmp_path / "m" / stability.STABILITY_FILE)
  assert len(table) == 3 * N and list(table.columns) == list(stability.COLUMNS)
  at = table.set_index(["sae", "latent"])
  group = lambda s, lat: at.loc[(s, lat), "group"]
  # The triple keeps its two strongest edges (b0-c0, a0-b0); a0-c1 is refused.
  assert group(0, 0) == group(1, 0) == group(2, 0) != group(2, 1)
  assert group(0, 5) == group(1, 9) == group(2, 7)
  assert group(0, 3) == group(1, 4)
  planted = {(0, 0), (1, 0), (2, 0), (2, 1), (0, 5), (1, 9), (2, 7), (0, 3), (1, 4)}
  size = {(0, 0): 3, (1, 0): 3, (2, 0): 3, (2, 1): 1, (0, 5): 3, (1, 9): 3, (2, 7): 3,
          (0, 3): 2, (1, 4): 2}
  found = {(0, 0): 3, (1, 0): 3, (2, 0): 2, (2, 1): 2, (0, 5): 3, (1, 9): 3, (2, 7): 3,
           (0, 3): 2, (1, 4): 2}
  for (s, lat), row in at.iterrows():
    assert row.group_size == size.get((s, lat), 1), (s, lat)
    assert row.found_in == found.get((s, lat), 1), (s, lat)
    assert row.shared_with == row.found_in - 1
    assert bool(row.group_conflict) == ((s, lat) in {(0, 0), (1, 0), (2, 0), (2, 1)})
  # Mean matched decoder cosine of a0: to b0 and to c1, its two bijection partners.
  assert at.loc[(0, 0), "dec_cos_mean"] == pytest.approx((0.8944 + 0.8763) / 2, abs=1e-3)
  assert at.loc[(0, 5), "dec_cos_mean"] == pytest.approx(1.0, abs=1e-5)
  st = res["stability"]
  assert st["conflicts"] == 1 and st["groups_with_conflict"] == 2
  assert st["groups_by_size"] == {"1": 3 * N - 8, "2": 1, "3": 2}
  assert st["num_groups"] == 3 * N - 8 + 1 + 2 == table.group.nunique()
  assert st["distinct_per_width"] == pytest.approx(st["num_groups"] / N)
  assert st["found_in_counts"]["c"] == {"1": N - 3, "2": 2, "3": 1}
  assert set(planted) <= set(at.index)


def test_groups_never_hold_two_latents_of_one_sae():
  rng = np.random.default_rng(1)
  n, s_total = 12, 4
  pairs = []
  for i in range(s_total):
    for j in range(i + 1, s_total):
      perm = rng.permutation(n)
      cos = rng.uniform(0.5, 1.0, n)
      pairs.append((i, j, {"enc_partner": perm, "enc_cos": cos, "dec_partner": perm,
                           "dec_cos": cos, "shared": cos >= 0.6}))
  res = stability.stability([n] * s_total, pairs)
  groups = np.concatenate([p["group"] for p in res["per_sae"]])
  sae = np.repeat(np.arange(s_total), n)
  assert all(len(set(sae[groups == g])) == (groups == g).sum() for g in np.unique(groups))
  assert res["num_groups"] == len(np.unique(groups))
  sizes = np.concatenate([p["group_size"] for p in res["per_sae"]])
  assert (sizes == np.bincount(groups)[groups]).all()


def make_store(tmp_path, rng, rows=1024):
  store_writer.write_store(str(tmp_path / "store"), rand(rng, rows, D) * 2, ids=np.arange(rows),
                           rows_per_shard=256)
  return str(tmp_path / "store")


def test_consensus_of_permuted_copies_is_that_sae(tmp_path):
  rng = np.random.default_rng(2)
  store = make_store(tmp_path, rng)
  w = random_sae_weights(rng, N, D)
  # Every pre-activation positive, so k latents fire on every token: k is recovered exactly.
  w["W_enc"] *= 0.05
  w["b_enc"] = 3 + np.abs(w["b_enc"])
  w["W_dec"] = unit(w["W_dec"])
  perms = [np.arange(N)] + [rng.permutation(N) for _ in range(2)]
  paths = [write(tmp_path / f"seed{s}", {**w, "W_enc": w["W_enc"][p], "b_enc": w["b_enc"][p],
                                         "W_dec": w["W_dec"][p]}, cfg={"jaxsae": {"store": store}})
           for s, p in enumerate(perms)]
  match.run(match.MatchConfig(inputs=tuple(paths), out=str(tmp_path / "m"), freq_tokens=512))
  out = tmp_path / "c"
  res = consensus.run(consensus.ConsensusConfig(inputs=(str(tmp_path / "m"),), out=str(out),
                                                min_seeds=3, eval_tokens=256, eval_batch=128))
  assert res["width"] == N and res["k"] == K and res["distinct_features"] == N
  assert res["eval"]["held_out"] and res["eval"]["after_tokens"] == 512
  seed_fvu = [s["fvu"] for s in res["eval"]["seeds"]]
  assert res["eval"]["consensus"]["fvu"] == pytest.approx(seed_fvu[0], rel=1e-5)
  assert res["eval"]["consensus"]["l0"] == pytest.approx(K)
  # Same codes: each consensus latent is one latent of seed0, in the group order.
  got = json.loads((out / consensus.GROUPS_FILE).read_text())
  order = np.array([m[0] for m in got["members"]])
  assert sorted(order) == list(range(N)) and got["num_seeds"] == [3] * N
  np.testing.assert_allclose(got["member_decoder_cos"], 1.0, atol=1e-6)
  x = store_lib.Store(store).batch(0, 128)
  codes = lambda s: np.asarray(saes.encode(*saes.encoder(s), x, s.input_scale))
  c, s0 = saes.load_sae(str(out)), saes.load_sae(paths[0])
  np.testing.assert_allclose(codes(c), codes(s0)[:, order], atol=1e-5)
  # The export reads back through the matcher: fully shared with every seed.
  back = match.run(match.MatchConfig(inputs=(str(out), paths[1]), out=str(tmp_path / "m2"),
                                     freq_tokens=0))
  assert back["pairs"][0]["n_shared"] == N


@pytest.mark.xdist_group("peers")  # where sparsify is imported already (tests/test_peers.py)
def test_sparsify_loads_the_consensus_and_encodes_alike(tmp_path):
  pytest.importorskip("sparsify")
  import torch
  from sparsify import SparseCoder
  rng = np.random.default_rng(3)
  store = make_store(tmp_path, rng, rows=512)
  base = random_sae_weights(rng, N, D)
  base["W_dec"] = unit(base["W_dec"])
  paths = []
  for s in range(2):
    w = {k: v.copy() for k, v in base.items()}
    if s:  # half the latents shared, the rest new
      fresh = random_sae_weights(rng, N, D)
      w["W_enc"][N // 2:], w["W_dec"][N // 2:] = fresh["W_enc"][N // 2:], unit(
          fresh["W_dec"][N // 2:])
    paths.append(write(tmp_path / f"seed{s}", w, cfg={"jaxsae": {"store": store}}))
  match.run(match.MatchConfig(inputs=tuple(paths), out=str(tmp_path / "m"), freq_tokens=256))
  out = tmp_path / "c"
  res = consensus.run(consensus.ConsensusConfig(inputs=(str(tmp_path / "m"),), out=str(out),
                                                min_seeds=2, eval_tokens=0))
  assert res["width"] == N // 2 and res["eval"] is None
  coder = SparseCoder.load_from_disk(out)
  assert coder.num_latents == N // 2 and coder.cfg.k == res["k"]
  x = store_lib.Store(store).batch(0, 64)
  with torch.no_grad():
    theirs = coder(torch.from_numpy(x)).sae_out.numpy()
  c = saes.load_sae(str(out))
  graphdef, state = saes.encoder(c)
  from flax import nnx
  ours = np.asarray(nnx.merge(graphdef, state).decode(saes.encode(graphdef, state, x, 1.0)))
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  # The SAELens layout beside it is the same SAE.
  lens = saes.load_sae(str(out / consensus.SAELENS_DIR))
  assert lens.layout == "saelens" and lens.k == c.k
  np.testing.assert_allclose(np.asarray(saes.encode(*saes.encoder(lens), x, 1.0)),
                             np.asarray(saes.encode(graphdef, state, x, 1.0)), atol=1e-5)


def test_union_of_two_saes_that_share_nothing_adds_both_widths(forks, tmp_path):
  rng = np.random.default_rng(4)
  a = write(tmp_path / "a", random_sae_weights(rng, N, D))
  b = write(tmp_path / "b", random_sae_weights(rng, N + 8, D))
  m = tmp_path / "m"
  res = match.run(match.MatchConfig(inputs=(a, b), out=str(m), freq_tokens=0))
  assert res["pairs"][0]["n_shared"] == 0
  out = tmp_path / "u"
  proc = forks.run("consensus", str(m), "--min_seeds=1", f"--out={out}", "--eval_tokens=0",
                   timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2.00 x one SAE's width" in proc.stdout
  got = json.loads((out / consensus.RESULT_FILE).read_text())
  assert got["width"] == 2 * N + 8 == got["distinct_features"] and got["k"] == K
  u = saes.load_sae(str(out))
  # Every row of both SAEs is in the union once.
  rows = np.concatenate([saes.load_sae(b).W_enc, saes.load_sae(a).W_enc])
  assert sorted(map(tuple, np.round(u.W_enc, 5))) == sorted(map(tuple, np.round(rows, 5)))
  with pytest.raises(JaxsaeError, match=r"--min_seeds=3: use 1 \(the union\) to 2"):
    consensus.run(consensus.ConsensusConfig(inputs=(str(m),), out=str(out), min_seeds=3,
                                            eval_tokens=0))
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  with pytest.raises(JaxsaeError, match="is not a consensus directory"):
    consensus.run(consensus.ConsensusConfig(inputs=(str(m),), out=str(tmp_path / "busy"),
                                            min_seeds=1, eval_tokens=0))
  os.remove(m / stability.STABILITY_FILE)
  with pytest.raises(JaxsaeError, match="rerun `jaxsae match"):
    consensus.run(consensus.ConsensusConfig(inputs=(str(m),), out=str(out), min_seeds=1,
                                            eval_tokens=0))


def test_a_seed_that_normalises_each_row_is_refused(tmp_path):
  """A consensus exports no per-row normalisation (SAELens's layer_norm): such seeds are one
  clear error, not a dictionary that encodes differently from them."""
  rng = np.random.default_rng(4)
  paths = [write(tmp_path / f"s{i}", random_sae_weights(rng, N, D), layout="saelens",
                 arch="topk", cfg={"normalize_activations": "layer_norm" if i else "none"})
           for i in range(2)]
  summary = {"saes": [{"path": p, "name": os.path.basename(p)} for p in paths]}
  with pytest.raises(JaxsaeError, match="layer_norm"):
    consensus.load_members(summary)
