"""The SAE architectures alone: shapes, sparsity, decoder norms, gradients, recovery, export."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import planted_sparse

from jaxsae.sae import ARCHITECTURES, batchtopk, common, io, jumprelu, topk

D_IN, N = 32, 96


def planted(n_rows=40000, d=D_IN, n_feat=48, k=3, seed=0):
  """The planted dictionary, scaled to mean norm sqrt(d)."""
  x, dirs = planted_sparse(n_rows, d, n_feat, k, seed)
  x *= np.sqrt(d) / np.linalg.norm(x, axis=1).mean()
  return x.astype(np.float32), dirs


# Per-architecture settings for the tiny planted problem (the defaults are for LM activations).
TRAIN_CFG = {
    "topk": common.SaeConfig(k=3),
    "batchtopk": common.SaeConfig(k=3),
    "relu_l1": common.SaeConfig(l1_coeff=1.0),
    "relu_l1_unitnorm": common.SaeConfig(l1_coeff=1.0),
    "gated": common.SaeConfig(l1_coeff=5.0),
    "jumprelu": common.SaeConfig(l0_coeff=0.03, jumprelu_threshold=0.1, jumprelu_bandwidth=0.05),
}


def train(name, x_all, steps=500, batch=512, lr=3e-3):
  """The trainer's per-seed update, written out plainly for one SAE."""
  arch, cfg = ARCHITECTURES[name], TRAIN_CFG[name]
  params = arch.init(jax.random.key(0), D_IN, N, cfg)
  params["b_dec"] = jnp.asarray(x_all[:batch].mean(0))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, i):
    scale = jnp.minimum(i / (0.05 * steps), 1.0)
    (loss, out), g = jax.value_and_grad(arch.loss, has_aux=True)(
        params, x, cfg, jnp.zeros(N, bool), scale)
    if arch.unit_norm_decoder:
      g["W_dec"] = common.remove_parallel_grad(g["W_dec"], params["W_dec"])
    updates, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, updates)
    if arch.unit_norm_decoder:
      params["W_dec"] = common.unit_norm_rows(params["W_dec"])
    if arch.after_step is not None:
      params = arch.after_step(params, out, cfg)
    return params, opt, out["fvu"]

  fvus = []
  rows = len(x_all) // batch * batch
  for i in range(steps):
    lo = i * batch % rows
    params, opt, fvu = step(params, opt, x_all[lo:lo + batch], i)
    fvus.append(float(fvu))
  return params, fvus


@pytest.fixture(scope="module")
def data():
  return planted()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shapes_and_finite_loss(name):
  arch = ARCHITECTURES[name]
  cfg = common.SaeConfig(k=4)
  params = arch.init(jax.random.key(1), D_IN, N, cfg)
  assert params["W_enc"].shape == (D_IN, N) and params["b_enc"].shape == (N,)
  assert params["W_dec"].shape == (N, D_IN) and params["b_dec"].shape == (D_IN,)
  assert set(params) == {"W_enc", "b_enc", "W_dec", "b_dec", *arch.extras}
  x = jax.random.normal(jax.random.key(2), (64, D_IN))
  z = arch.encode(params, x, cfg)
  assert z.shape == (64, N) and bool((z >= 0).all())
  assert arch.decode(params, z, cfg).shape == (64, D_IN)
  loss, out = arch.loss(params, x, cfg, jnp.zeros(N, bool), jnp.ones(()))
  assert loss.shape == () and np.isfinite(float(loss))
  assert out["fired"].shape == (N,) and out["fired"].dtype == bool
  for key in ("fvu", "l0", "aux"):
    assert out[key].shape == ()
  if arch.unit_norm_decoder:
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-5)


def test_topk_has_exactly_k_active_and_sparse_decode_matches_dense():
  cfg = common.SaeConfig(k=5)
  params = topk.init(jax.random.key(0), D_IN, N, cfg)
  x = jax.random.normal(jax.random.key(1), (128, D_IN))
  z = topk.encode(params, x, cfg)
  np.testing.assert_array_equal(np.asarray((z > 0).sum(1)), 5)
  # W_dec starts as the normalised transpose of W_enc (sparsify's init).
  np.testing.assert_allclose(params["W_dec"], common.unit_norm_rows(params["W_enc"].T), rtol=1e-6)

  def sparse(w_dec):
    vals, idx, _ = topk.encode_topk(params, x, cfg)
    return common.sparse_decode(vals, idx, w_dec, cfg)

  def dense(w_dec):
    return topk.encode(params, x, cfg) @ w_dec

  np.testing.assert_allclose(sparse(params["W_dec"]), dense(params["W_dec"]), atol=1e-5)
  target = jax.random.normal(jax.random.key(3), (128, D_IN))
  g_sparse = jax.grad(lambda w: jnp.sum((sparse(w) - target) ** 2))(params["W_dec"])
  g_dense = jax.grad(lambda w: jnp.sum((dense(w) - target) ** 2))(params["W_dec"])
  np.testing.assert_allclose(g_sparse, g_dense, atol=1e-4)


def test_remove_parallel_grad_leaves_only_orthogonal_part():
  w = common.unit_norm_rows(jax.random.normal(jax.random.key(0), (N, D_IN)))
  g = jax.random.normal(jax.random.key(1), (N, D_IN))
  out = common.remove_parallel_grad(g, w)
  np.testing.assert_allclose(jnp.sum(out * w, axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(out + jnp.sum(g * w, 1, keepdims=True) * w, g, atol=1e-5)


def test_auxk_only_with_dead_latents_and_trains_them():
  cfg = common.SaeConfig(k=4, auxk_alpha=1 / 32)
  params = topk.init(jax.random.key(0), D_IN, N, cfg)
  x = jax.random.normal(jax.random.key(1), (64, D_IN))
  _, out = topk.loss(params, x, cfg, jnp.zeros(N, bool), 1.0)
  assert float(out["aux"]) == 0.0
  dead = jnp.arange(N) >= N // 2
  grads, out = jax.grad(topk.loss, has_aux=True)(params, x, cfg, dead, 1.0)
  assert float(out["aux"]) > 0
  # With AuxK on, dead latents get decoder gradient even though TopK never selects them.
  live_only = jax.grad(topk.loss, has_aux=True)(params, x, cfg, jnp.zeros(N, bool), 1.0)[0]
  assert float(jnp.abs(grads["W_dec"][dead]).sum()) > float(
      jnp.abs(live_only["W_dec"][dead]).sum())


def test_batchtopk_keeps_k_per_token_on_average_and_sets_threshold():
  cfg = common.SaeConfig(k=4)
  params = batchtopk.init(jax.random.key(0), D_IN, N, cfg)
  x = jax.random.normal(jax.random.key(1), (64, D_IN))
  _, out = batchtopk.loss(params, x, cfg, jnp.zeros(N, bool), 1.0)
  assert float(out["l0"]) == pytest.approx(4.0)
  assert float(params["threshold"]) == 0.0
  params = batchtopk.after_step(params, out, cfg)
  assert float(params["threshold"]) == pytest.approx(float(out["min_act"]))
  z = batchtopk.encode(params, x, cfg)  # inference by threshold: about k per token
  assert 2.0 < float((z > 0).sum(1).mean()) < 8.0


def test_jumprelu_threshold_gets_pseudo_gradients():
  pre = jnp.array([[0.97, 1.02, 3.0, -1.0]])
  theta = jnp.ones(4)
  g = jax.grad(lambda t: jumprelu.step(pre, t, 0.1).sum())(theta)
  # Only entries within bandwidth/2 of the threshold pass gradient: -(1/eps) there.
  np.testing.assert_allclose(g, [-10.0, -10.0, 0.0, 0.0], rtol=1e-6)
  g = jax.grad(lambda t: jumprelu.jumprelu(pre, t, 0.1).sum())(theta)
  np.testing.assert_allclose(g, [-10.0, -10.0, 0.0, 0.0], rtol=1e-6)
  gz = jax.grad(lambda p: jumprelu.jumprelu(p, theta, 0.1).sum())(pre)
  np.testing.assert_array_equal(gz, [[0.0, 1.0, 1.0, 0.0]])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_learns_planted_dictionary(name, data):
  x, dirs = data
  params, fvus = train(name, x)
  assert np.mean(fvus[-20:]) < 0.5 * np.mean(fvus[:5]), (fvus[:5], fvus[-20:])
  assert np.mean(fvus[-20:]) < 0.2
  w = np.asarray(common.unit_norm_rows(params["W_dec"]))
  best = (dirs @ w.T).max(axis=1)
  assert np.mean(best > 0.9) >= 0.8, np.sort(best)
  if ARCHITECTURES[name].unit_norm_decoder:
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-5)
  if name == "topk":
    z = topk.encode(params, jnp.asarray(x[:256]), TRAIN_CFG[name])
    np.testing.assert_array_equal(np.asarray((z > 0).sum(1)), 3)


def test_save_sparsify_layout_and_round_trip(tmp_path):
  params = jumprelu.init(jax.random.key(0), D_IN, N, common.SaeConfig())
  params = {k: np.asarray(v) for k, v in jumprelu.export(params).items()}
  out = str(tmp_path / "run" / "seed3")
  io.save_sparsify(out, params, {"arch": "jumprelu", "seed": 3, "k": 0, "num_tokens": 123})
  assert sorted(os.listdir(out)) == ["cfg.json", "sae.safetensors"]
  with open(os.path.join(out, "cfg.json")) as f:
    cfg = json.load(f)
  assert cfg["d_in"] == D_IN and cfg["num_latents"] == N and cfg["activation"] == "topk"
  assert cfg["jaxsae"]["seed"] == 3 and cfg["jaxsae"]["num_tokens"] == 123
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(out, "sae.safetensors"))
  assert set(tensors) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "threshold"}
  np.testing.assert_array_equal(tensors["encoder.weight"], params["W_enc"].T)
  back, _ = io.load_sparsify(out)
  for name, value in params.items():
    np.testing.assert_array_equal(back[name], value)
  # Overwriting is atomic and leaves no temporary directories beside the export.
  params["b_dec"] = params["b_dec"] + 1
  io.save_sparsify(out, params, {"arch": "jumprelu", "seed": 3})
  np.testing.assert_array_equal(io.load_sparsify(out)[0]["b_dec"], params["b_dec"])
  assert os.listdir(tmp_path / "run") == ["seed3"]


def test_fused_topk_encoder_gradients_equal_autodiff_of_the_dense_form():
  cfg = common.SaeConfig(k=4)
  key = jax.random.key(3)
  x = jax.random.normal(key, (64, D_IN))
  params = topk.init(jax.random.key(4), D_IN, N, cfg)
  params["b_dec"] = 0.3 * jax.random.normal(jax.random.key(5), (D_IN,))
  params["b_enc"] = 0.1 * jax.random.normal(jax.random.key(6), (N,))

  def dense_loss(p):
    vals, idx, _ = topk.encode_topk(p, x, cfg)
    x_hat = common.sparse_decode(vals, idx, p["W_dec"], cfg) + p["b_dec"]
    return jnp.sum(jnp.square(x - x_hat)) / common.total_variance(x)

  fused = jax.grad(lambda p: topk.loss(p, x, cfg, jnp.zeros(N, bool), 1.0)[0])(params)
  dense = jax.grad(dense_loss)(params)
  for name in params:
    np.testing.assert_allclose(fused[name], dense[name], rtol=1e-4, atol=1e-6)
  # The custom rule for the input too (dead code in training, but it must be right).
  gx = jax.grad(lambda x: common.topk_encoder(x, params["W_enc"], params["b_enc"], cfg)[0].sum())
  gx_dense = jax.grad(lambda x: jax.lax.top_k(
      jax.nn.relu(x @ params["W_enc"] + params["b_enc"]), cfg.k)[0].sum())
  np.testing.assert_allclose(gx(x), gx_dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k,group", [(8192, 32, 32), (1000, 8, 16), (777, 5, 8)])
def test_two_stage_top_k_equals_lax_top_k(n, k, group):
  x = jax.nn.relu(jax.random.normal(jax.random.key(n), (3, 64, n)))  # leading axes, zeros too
  vals, idx = common.top_k(x, k, group)
  ref_vals, _ = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(vals, ref_vals)
  np.testing.assert_array_equal(jnp.take_along_axis(x, idx, -1), vals)
  assert (np.sort(np.asarray(idx), -1)[..., 1:] != np.sort(np.asarray(idx), -1)[..., :-1]).all()
