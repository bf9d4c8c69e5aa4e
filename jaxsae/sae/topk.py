"""TopK SAE (Gao et al. 2024), as EleutherAI's sparsify trains it; the paper's main architecture.

  latents = TopK(ReLU((x - b_dec) W_enc + b_enc))      exactly k per token
  x_hat   = latents W_dec + b_dec                        decoded from the k selected rows
  loss    = FVU + auxk_alpha * AuxK                      AuxK: dead latents model the residual
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae.sae import common
from jaxsae.sae.common import Params, SaeConfig


def init(key: jax.Array, d_in: int, num_latents: int, cfg: SaeConfig) -> Params:
  del cfg
  w_enc = common.kaiming_uniform(key, d_in, num_latents)
  return {
      "W_enc": w_enc,
      "b_enc": jnp.zeros(num_latents, jnp.float32),
      # sparsify: the decoder starts as the encoder's transpose, rows at unit norm.
      "W_dec": common.unit_norm_rows(w_enc.T),
      "b_dec": jnp.zeros(d_in, jnp.float32),
  }


def pre_acts(params: Params, x: jax.Array, cfg: SaeConfig) -> jax.Array:
  return jax.nn.relu(common.matmul(x - params["b_dec"], params["W_enc"], cfg) + params["b_enc"])


def encode_topk(params: Params, x: jax.Array, cfg: SaeConfig):
  """(values [B, k], indices [B, k], ReLU pre-activations [B, n])."""
  pre = pre_acts(params, x, cfg)
  vals, idx = common.top_k(pre, cfg.k)
  return vals, idx, pre


def encode(params: Params, x: jax.Array, cfg: SaeConfig) -> jax.Array:
  vals, idx, pre = encode_topk(params, x, cfg)
  return jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], idx].set(vals)


def decode(params: Params, z: jax.Array, cfg: SaeConfig) -> jax.Array:
  return common.matmul(z, params["W_dec"], cfg) + params["b_dec"]


def auxk_loss(params: Params, pre: jax.Array, e: jax.Array, var: jax.Array,
              dead_mask: jax.Array, cfg: SaeConfig) -> jax.Array:
  """The top k_aux dead latents reconstruct the residual `e` of the live ones (sparsify's AuxK)."""
  k_aux = min(cfg.k_aux or e.shape[-1] // 2, pre.shape[-1])
  num_dead = jnp.sum(dead_mask)
  # Few dead latents: scale the loss down rather than let them reconstruct everything.
  scale = jnp.minimum(num_dead / k_aux, 1.0)
  vals, idx = jax.lax.top_k(jnp.where(dead_mask, pre, -1.0), k_aux)
  vals = jnp.where(dead_mask[idx], vals, 0.0)  # fewer dead than k_aux: the rest contribute 0
  e_hat = common.sparse_decode(vals, idx, params["W_dec"], cfg)
  return scale * jnp.sum(jnp.square(e_hat - jax.lax.stop_gradient(e))) / var


def loss(params: Params, x: jax.Array, cfg: SaeConfig, dead_mask: jax.Array,
         penalty_scale: jax.Array):
  del penalty_scale
  if cfg.auxk_alpha:
    # AuxK reads every dead latent's pre-activation, so the dense encoder stays.
    vals, idx, pre = encode_topk(params, x, cfg)
  else:
    # (x - b_dec) W_enc = x W_enc - b_dec W_enc: folding b_dec into the bias keeps the
    # encoder's input a constant, so no gradient ever flows back through the [B, n] product.
    b = params["b_enc"] - common.matmul(params["b_dec"][None], params["W_enc"], cfg)[0]
    vals, idx = common.topk_encoder(x, params["W_enc"], b, cfg)
  x_hat = common.sparse_decode(vals, idx, params["W_dec"], cfg) + params["b_dec"]
  var = common.total_variance(x)
  e = x - x_hat
  fvu = jnp.sum(jnp.square(e)) / var
  aux = auxk_loss(params, pre, e, var, dead_mask, cfg) if cfg.auxk_alpha else jnp.zeros(())
  n = params["W_enc"].shape[-1]
  fired = jnp.zeros(n, bool).at[idx.reshape(-1)].max(vals.reshape(-1) > 0)
  out = {"fvu": fvu, "aux": aux, "fired": fired,
         "l0": jnp.mean(jnp.sum(vals > 0, axis=-1).astype(jnp.float32))}
  return fvu + cfg.auxk_alpha * aux, out


ARCH = common.Architecture(init=init, encode=encode, decode=decode, loss=loss,
                           unit_norm_decoder=True, sparsify_activation="topk")
