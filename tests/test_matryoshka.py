"""Matryoshka BatchTopK: the summed prefix losses, its widths flag, and its export read back by
the matcher."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from jaxsae import cli
from jaxsae import formats
from jaxsae import match
from jaxsae import saes
from jaxsae import store as store_lib
from jaxsae import store_writer
from jaxsae import train
from jaxsae.errors import JaxsaeError
from jaxsae.sae import ARCHITECTURES, BatchTopK, Matryoshka, SaeConfig, matryoshka

D_IN, N, K, B = 16, 64, 4, 32


def make(widths=(5, 20, 40), seed=0, **kw):
  sae = Matryoshka(D_IN, N, SaeConfig(k=K, matryoshka_widths=widths, **kw), rngs=nnx.Rngs(seed))
  sae.b_enc[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (N,))
  sae.b_dec[...] = 0.2 * jax.random.normal(jax.random.key(seed + 2), (D_IN,))
  return sae


def by_hand(params, x, widths):
  """The loss written out from the weights: BatchTopK codes over the whole batch, then each
  prefix [0, m) decodes alone (with b_dec) and its FVU counts once."""
  pre = jax.nn.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
  cut = jnp.sort(pre.reshape(-1))[-K * x.shape[0]]
  z = jnp.where(pre >= cut, pre, 0.0)
  var = jnp.sum((x - x.mean(0)) ** 2)
  fvus = [jnp.sum((x - (z[:, :m] @ params["W_dec"][:m] + params["b_dec"])) ** 2) / var
          for m in widths]
  return sum(fvus), jnp.stack(fvus)


def test_loss_is_the_sum_of_the_prefixes_fvus_and_its_gradient_too():
  # Each side jitted whole: op by op, every primitive of the two losses and their gradients
  # compiled on its own (7 s of this test's 8).
  loss_of = lambda s, x: s.loss(x, jnp.zeros(N, bool), 1.0)
  loss, grad = nnx.jit(loss_of), nnx.jit(nnx.grad(lambda s, x: loss_of(s, x)[0]))
  hand = jax.jit(by_hand, static_argnums=2)
  sae = make()
  assert sae.widths == (5, 20, 40, N)
  x = jax.random.normal(jax.random.key(7), (B, D_IN)) + 0.5
  loss_value, out = loss(sae, x)
  params = {name: v[...] for name, v in nnx.state(sae, nnx.Param).items()}
  want, want_prefix = hand(params, x, sae.widths)
  np.testing.assert_allclose(out.prefix_fvu, want_prefix, rtol=1e-5)
  np.testing.assert_allclose(loss_value, want, rtol=1e-5)
  np.testing.assert_allclose(out.fvu, want_prefix[-1], rtol=1e-5)
  # Narrower prefixes reconstruct worse here: the sum is more than the full width's FVU.
  assert float(loss_value) > 3 * float(out.fvu)
  assert float(out.l0) == pytest.approx(K)

  grads = grad(sae, x)
  want_grads = jax.grad(lambda p: hand(p, x, sae.widths)[0])(params)
  for name in params:
    g = np.asarray(grads[name][...])
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, name
    np.testing.assert_allclose(g, want_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
  # Latents past the first prefix get no share of its loss: W_dec rows [5, 64) have the same
  # gradient whether or not the 5-wide prefix is in the sum.
  wider = grad(make((20, 40)), x)
  np.testing.assert_allclose(grads["W_dec"][...][5:], wider["W_dec"][...][5:], atol=1e-6)


def test_one_prefix_is_batchtopk_and_inference_is_batchtopks():
  cfg = SaeConfig(k=K, matryoshka_widths=(N,), auxk_alpha=1 / 32)
  m, b = Matryoshka(D_IN, N, cfg, rngs=nnx.Rngs(3)), BatchTopK(D_IN, N, cfg, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (B, D_IN))
  dead = jnp.arange(N) >= N // 2
  (lm, om), (lb, ob) = m.loss(x, dead, 1.0), b.loss(x, dead, 1.0)
  np.testing.assert_allclose(lm, lb, rtol=1e-6)
  assert float(om.aux) > 0 and float(om.aux) == pytest.approx(float(ob.aux))
  m.after_step(om)
  b.after_step(ob)
  np.testing.assert_array_equal(m.encode(x), b.encode(x))


def test_widths_default_and_bad_flags_are_one_clear_error(tmp_path):
  assert matryoshka.prefix_widths((), 64) == (4, 8, 16, 32, 64)
  assert matryoshka.prefix_widths((), 4) == (1, 2, 4)
  assert matryoshka.prefix_widths((8, 32), 64) == (8, 32, 64)  # num_latents appended
  assert matryoshka.prefix_widths((8, 64), 64) == (8, 64)
  for bad in ((8, 8), (32, 16), (0, 8), (8, 65), (2.5, 8)):
    with pytest.raises(JaxsaeError, match=r"^--matryoshka_widths=.* strictly increasing whole "
                                          r"numbers from 1 to num_latents \(64\)"):
      matryoshka.prefix_widths(bad, 64)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("store") / "acts")
  rng = np.random.default_rng(0)
  dirs = rng.standard_normal((32, D_IN))
  codes = rng.exponential(size=(4096, 32)) * (rng.random((4096, 32)) < 0.1)
  store_writer.write_store(path, (codes @ dirs + 0.5).astype(np.float32), rows_per_shard=1024)
  return path


def config(store_dir, out, **kw):
  base = dict(store=store_dir, out=str(out), arch="matryoshka", num_latents=N, k=K, seeds=(0, 1),
              batch_size=128, num_tokens=128 * 30, lr=1e-2, lr_warmup_steps=5,
              checkpoint_every=100, log_every=5, progress=False)
  return train.TrainConfig(**{**base, **kw})


def test_trainer_exports_what_load_sae_and_match_read(store_dir, tmp_path):
  out = tmp_path / "run"
  train.run(config(store_dir, out, matryoshka_widths=(8, 32)))
  with open(out / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert all(f < f0 for f, f0 in zip(lines[-1]["fvu"], lines[0]["fvu"]))
  params, cfg = formats.stored(str(out / "seed1"))
  assert cfg["jaxsae"]["arch"] == "matryoshka"
  assert cfg["jaxsae"]["matryoshka_widths"] == [8, 32, N]
  assert set(params) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
  # Exported as SAELens saves a BatchTopK for inference: JumpReLU, one threshold on every latent.
  assert formats.layout_of(str(out / "seed1")) == "saelens"
  assert np.unique(params["threshold"]).size == 1 and (params["threshold"] > 0).all()
  params["threshold"] = params["threshold"][0]

  # The matcher reads it as BatchTopK, and encodes as the trained module does at inference.
  sae = saes.load_sae(str(out / "seed1"))
  assert sae.arch == "batchtopk" and sae.cfg["jaxsae"]["matryoshka_widths"] == [8, 32, N]
  trained = Matryoshka.from_weights(params, SaeConfig(k=K, matryoshka_widths=(8, 32)))
  x = store_lib.Store(store_dir).batch(0, 256)
  codes = saes.encode(*saes.encoder(sae), jnp.asarray(x), sae.input_scale)
  np.testing.assert_array_equal(codes, trained.encode(jnp.asarray(x)))
  assert 0 < float((codes > 0).sum(1).mean()) < 4 * K

  res = match.run(match.MatchConfig(inputs=(str(out),), out=str(tmp_path / "match"),
                                    freq_tokens=512, freq_batch=128))
  assert [s["arch"] for s in res["saes"]] == ["batchtopk", "batchtopk"]
  assert 0.0 <= res["fraction_shared_mean"] <= 1.0 and len(res["pairs"]) == 1
  assert os.path.isfile(tmp_path / "match" / "match.json")


def test_bad_widths_stop_the_trainer_in_one_line(store_dir, tmp_path):
  with pytest.raises(JaxsaeError, match=r"--matryoshka_widths=16,8: .* num_latents \(64\)"):
    train.run(config(store_dir, tmp_path / "a", matryoshka_widths=(16, 8)))
  with pytest.raises(JaxsaeError, match=r"--matryoshka_widths=8,100: "):
    train.run(config(store_dir, tmp_path / "b", matryoshka_widths=(8, 100)))
  # Refused before the run directory says what run it holds.
  assert not os.path.exists(tmp_path / "a" / "run.json")
  assert not os.path.exists(tmp_path / "b" / "run.json")


def test_a_resume_with_other_widths_is_refused(store_dir, tmp_path):
  """The widths are the loss: continuing a run under others would train a different SAE."""
  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    train.run(config(store_dir, out, matryoshka_widths=(8, 32), num_tokens=256), interrupt_at=1)
  with pytest.raises(JaxsaeError, match=r"matryoshka_widths=\[8, 32, 64\] there, \[16, 64\]"):
    train.run(config(store_dir, out, matryoshka_widths=(16,), num_tokens=256))


def test_arch_flag_lists_matryoshka_and_widths_flag_parses():
  assert "matryoshka" in ARCHITECTURES
  fv = flags.FlagValues()
  cli.define_flags(train.TrainConfig, fv)
  fv(["prog", "--arch=matryoshka", "--matryoshka_widths=128,512"])
  assert "matryoshka" in fv["arch"].help
  cfg = cli.config_from_flags(train.TrainConfig, [], fv)
  assert cfg.arch == "matryoshka" and cfg.matryoshka_widths == (128, 512)
  assert train.TrainConfig().matryoshka_widths == ()
