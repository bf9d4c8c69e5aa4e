"""The first-letter absorption metric on hand-built cases, no model needed."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsae import absorption


def _unit(*idx, d=6):
  v = np.zeros(d)
  v[list(idx)] = 1.0
  return v / np.linalg.norm(v)


def test_absorption_returns_the_known_fraction():
  # Letter direction e0 (the probe); latent 0 is the letter's main latent (decoder e0); latent
  # 1 takes the letter's direction over on known tokens (decoder (e0 + e1) / sqrt 2).
  w_dec = np.stack([_unit(0), _unit(0, 1), _unit(3)])
  u = w_dec[1]
  x, z = [], []
  for _ in range(6):  # the latent of the letter fires: no absorption
    x.append(2 * _unit(0) + 0.5 * _unit(4))
    z.append([2.0, 0.0, 0.0])
  for _ in range(3):  # fully absorbed: the main latent is off, latent 1 carries it all
    x.append(2.0 * u)
    z.append([0.0, 2.0, 0.0])
  x.append(_unit(0) + u)  # partly: main 1, absorber 1 -> 0.707 / 1.707 of the projection
  z.append([1.0, 1.0, 0.0])
  s = absorption.absorption_scores(np.array(x), np.array(z), 3 * _unit(0), w_dec, [0])
  partial = np.sqrt(0.5) / (1 + np.sqrt(0.5))
  assert s["fraction"][:6] == pytest.approx(0)
  assert s["fraction"][6:9] == pytest.approx(1)
  assert s["fraction"][9] == pytest.approx(partial)
  assert s["fraction"].mean() == pytest.approx((3 + partial) / 10)
  assert s["full"].tolist() == [False] * 6 + [True] * 3 + [False]
  assert set(s["absorbers"][6:, 0]) == {1} and (s["absorbers"][:6] == -1).all()


def test_weak_or_unaligned_takers_are_not_absorption():
  w_dec = np.stack([_unit(0), _unit(1), _unit(0, 1, 2, 3, 4, 5)])
  x = np.stack([_unit(0), _unit(0)])
  # Row 0: latent 1 is orthogonal to the probe. Row 1: latent 2's projection is 0.41 of the
  # probe's but it is the only candidate, so it counts, while the main latent is off.
  z = np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
  s = absorption.absorption_scores(x, z, _unit(0), w_dec, [0])
  assert s["fraction"][0] == 0 and not s["full"][0]
  assert s["fraction"][1] == 1 and s["full"][1]


def test_k_sparse_probing_finds_the_main_latent_and_stops_at_no_f1_gain():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 26, 2000)
  # Latent c fires for letter c; latents 26.. are noise.
  z = np.zeros((2000, 40))
  z[np.arange(2000), y] = rng.uniform(1, 2, 2000)
  z[:, 26:] = rng.uniform(0, 1, (2000, 14))
  ranking = np.zeros((26, 40))
  ranking[np.arange(26), np.arange(26)] = 1.0
  ranking[:, 26:] = rng.uniform(0, 0.5, (26, 14))
  mains, f1 = absorption.main_latents(z[:1600], y[:1600], z[1600:], y[1600:], ranking, max_k=3)
  assert mains == [[c] for c in range(26)]
  assert (f1[:, 0] > 0.99).all()


def test_logistic_matches_the_balanced_optimum():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((300, 3))
  y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.standard_normal(300) > 0.8
  w, b = absorption.fit_balanced_logistic(x, y)
  s = np.where(y, 300 / (2 * y.sum()), 300 / (2 * (~y).sum()))
  sig = 1 / (1 + np.exp(-(x @ w + b)))
  assert np.allclose(x.T @ (s * (sig - y)) + w, 0, atol=1e-6)  # the gradient vanishes
  assert abs((s * (sig - y)).sum()) < 1e-6


def test_probe_learns_letters_and_prompts_hold_the_word():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 26, 1000)
  x = np.eye(32)[y] * 3 + 0.1 * rng.standard_normal((1000, 32))
  w, b = absorption.train_probe(x, y, steps=100)
  assert ((x @ w.T + b).argmax(1) == y).mean() > 0.99
  p = absorption.prompts([" cat", "Dog", " egg"], np.random.default_rng(0), num_examples=2)
  assert all(q.endswith(w + " has the first letter:") for q, w in zip(p, [" cat", "Dog", " egg"]))
  assert "Dog has the first letter: D" in p[0] + p[2]
  assert absorption.letter_of(" Cat") == 2


def test_evaluate_one_sae_end_to_end(tmp_path):
  """The whole metric on activations whose letters are directions and an SAE that reads them:
  every letter's probe is perfect, its main latent is its own, and the a-words whose direction
  one of ten token-specific latents carries instead are the absorbed ones (each absorber too
  rare to pass the k-sparse probe's F1 rule, as in Chanin et al.)."""
  from conftest import save_sae
  from jaxsae import saes
  rng = np.random.default_rng(0)
  y = np.r_[np.zeros(400, int), np.repeat(np.arange(1, 26), 40)]
  m, d, n = len(y), 40, 36
  x = 3 * np.eye(d)[y] + 0.05 * rng.standard_normal((m, d))
  taker = np.full(m, -1)
  taker[np.arange(0, 400, 10)] = np.arange(40) % 10  # a tenth of the a-words, 4 per absorber
  w_enc = np.zeros((n, d))
  w_enc[:26, :26] = np.eye(26)
  w_dec = w_enc.copy()
  for j in range(10):
    u = (np.eye(d)[0] + np.eye(d)[26 + j]) / np.sqrt(2)
    x[taker == j] = 3 * u
    w_enc[0, 26 + j] = -10.0  # the a-latent is silent where an absorber's direction is
    w_enc[26 + j, 26 + j] = np.sqrt(2)
    w_dec[26 + j] = u
  path = save_sae(str(tmp_path / "sae"), w_enc, np.zeros(n), w_dec, np.zeros(d), arch="relu")
  train = rng.random(m) < 0.8
  data = absorption.ProbeData(words=[f"w{i}" for i in range(m)], token_ids=np.arange(m),
                              labels=y, acts={"s": x.astype(np.float32)}, train=train)
  r = absorption.evaluate(saes.load_sae(path), data, "s")
  a = r["per_letter"][0]
  assert r["letters_counted"] == 26 and min(r["probe_f1"]) > 0.9
  assert a["main_latents"] == [0]
  absorbed = (taker >= 0)[(y == 0) & ~train]
  assert a["mean_absorption_fraction"] == pytest.approx(absorbed.mean())
  assert a["full_absorption_rate"] == pytest.approx(absorbed.mean())
  assert r["absorbing"][26:].sum() == absorbed.sum() and r["main_letter"][0] == 0
