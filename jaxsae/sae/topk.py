"""TopK SAE (Gao et al. 2024), as EleutherAI's sparsify trains it; the paper's main architecture.

  latents = TopK(ReLU((x - b_dec) W_enc + b_enc))      exactly k per token
  x_hat   = latents W_dec + b_dec                        decoded from the k selected rows
  loss    = FVU + auxk_alpha * AuxK                      AuxK: dead latents model the residual
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsae.sae import common
from jaxsae.sae.common import SaeConfig


def init_weights(key: jax.Array, d_in: int, num_latents: int) -> tuple[jax.Array, jax.Array]:
  """(W_enc, W_dec) as sparsify starts them: W_enc as torch.nn.Linear draws it, the decoder as
  its transpose with rows at unit norm."""
  w_enc = common.kaiming_uniform(key, d_in, num_latents)
  return w_enc, common.unit_norm_rows(w_enc.T)


def auxk_loss(w_dec: jax.Array, pre: jax.Array, e: jax.Array, var: jax.Array,
              dead_mask: jax.Array, cfg: SaeConfig) -> jax.Array:
  """The top k_aux dead latents reconstruct the residual `e` of the live ones (sparsify's AuxK)."""
  k_aux = min(cfg.k_aux or e.shape[-1] // 2, pre.shape[-1])
  num_dead = jnp.sum(dead_mask)
  # Few dead latents: scale the loss down rather than let them reconstruct everything.
  scale = jnp.minimum(num_dead / k_aux, 1.0)
  vals, idx = common.exact_top_k(jnp.where(dead_mask, pre, -1.0), k_aux, cfg.cpu_kernels)
  vals = jnp.where(dead_mask[idx], vals, 0.0)  # fewer dead than k_aux: the rest contribute 0
  e_hat = common.sparse_decode(vals, idx, w_dec, cfg)
  return scale * jnp.sum(jnp.square(e_hat - jax.lax.stop_gradient(e))) / var


class TopK(common.SAE):
  name = family = "topk"
  saelens_architecture = "topk"
  selects_top_k = encodes_with_k = True
  sparsify_activation = "topk"

  def __init__(self, d_in: int, num_latents: int, cfg: SaeConfig, *, rngs: nnx.Rngs):
    self.init_dictionary(*init_weights(rngs.params(), d_in, num_latents), cfg)

  def encode_topk(self, x: jax.Array):
    """(values [B, k], indices [B, k], ReLU pre-activations [B, n])."""
    pre = jax.nn.relu(self.pre_acts(x))
    vals, idx = common.select_top_k(pre, self.cfg)
    return vals, idx, pre

  def encode(self, x: jax.Array) -> jax.Array:
    vals, idx, pre = self.encode_topk(x)
    return jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], idx].set(vals)

  def loss(self, x: jax.Array, dead_mask: jax.Array, penalty_scale: jax.Array):
    del penalty_scale
    cfg = self.cfg
    w_enc, w_dec, b_dec = self.W_enc[...], self.W_dec[...], self.b_dec[...]
    path = cfg.topk_path
    # (x - b_dec) W_enc = x W_enc - b_dec W_enc: folding b_dec into the bias keeps the
    # encoder's input a constant, so no gradient ever flows back through the [B, n] product.
    b = self.b_enc[...] - common.matmul(b_dec[None], w_enc, cfg)[0]
    if cfg.auxk_alpha:
      # AuxK reads every dead latent's pre-activation, so the dense encoder stays.
      vals, idx, pre = self.encode_topk(x)
      if path in ("dense", "mxu"):
        path = "scatter"  # the dense decode needs top_k's barrier, which encode_topk has not
      x_hat = common.sparse_decode(vals, idx, w_dec, cfg, path) + b_dec
    elif path == "mxu":
      decoded, vals, idx = common.mxu_topk(x, w_enc, b, w_dec, cfg)
      x_hat = decoded + b_dec
    else:
      vals, idx = common.topk_encoder(x, w_enc, b, cfg)
      x_hat = common.sparse_decode(vals, idx, w_dec, cfg, path) + b_dec
    var = common.total_variance(x)
    e = x - x_hat
    fvu = jnp.sum(jnp.square(e)) / var
    aux = auxk_loss(w_dec, pre, e, var, dead_mask, cfg) if cfg.auxk_alpha else jnp.zeros(())
    n = w_enc.shape[-1]
    fired = jnp.zeros(n, bool).at[idx.reshape(-1)].max(vals.reshape(-1) > 0)
    out = common.LossOut(fvu=fvu, aux=aux, fired=fired,
                         l0=jnp.mean(jnp.sum(vals > 0, axis=-1).astype(jnp.float32)))
    return fvu + cfg.auxk_alpha * aux, out
