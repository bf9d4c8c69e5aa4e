"""BatchTopK SAE (Bussmann et al. 2024): the top k * B activations across the whole batch.

Tokens that need more latents get more, as long as the batch averages k per token:

  pre   = ReLU((x - b_dec) W_enc + b_enc)                  [B, n]
  z     = pre where pre is among the k*B largest of the batch, else 0
  x_hat = z W_dec + b_dec;   loss = FVU + auxk_alpha * AuxK

At inference there is no batch, so a single threshold replaces the selection: z = pre * 1[pre >
threshold], with the threshold an exponential moving average of the smallest selected activation
of each training batch. It is a `common.Statistic`, set in `after_step`: no gradient, no
optimizer state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsae.sae import common
from jaxsae.sae import topk
from jaxsae.sae.common import SaeConfig


def batch_topk(pre: jax.Array, k: int, kernel: bool) -> tuple[jax.Array, jax.Array]:
  """(z with all but the batch's k * B largest zeroed, the smallest kept value)."""
  vals, _ = common.exact_top_k(pre.reshape(-1), k * pre.shape[0], kernel)
  cut = vals[-1]
  # Ties at the cut may keep a few extra entries; harmless, and cheaper than a scatter.
  return jnp.where(pre >= cut, pre, 0.0), cut


class BatchTopK(common.SAE):
  name = family = "batchtopk"
  # SAELens saves BatchTopK (and its Matryoshka) for inference as JumpReLU, one threshold per
  # latent; its training checkpoints keep the names below and a scalar topk_threshold.
  other_names = ("batch_topk", "matryoshka_batchtopk")
  saelens_architecture = "jumprelu"
  selects_top_k = True

  def __init__(self, d_in: int, num_latents: int, cfg: SaeConfig, *, rngs: nnx.Rngs):
    self.init_dictionary(*topk.init_weights(rngs.params(), d_in, num_latents), cfg)
    # 0 marks "not yet estimated": the first batch sets it outright instead of decaying from 0.
    self.threshold = common.variable(jnp.zeros((), jnp.float32), common.Statistic)

  def encode(self, x: jax.Array) -> jax.Array:
    pre = jax.nn.relu(self.pre_acts(x))
    return jnp.where(pre > self.threshold[...], pre, 0.0)

  def loss(self, x: jax.Array, dead_mask: jax.Array, penalty_scale: jax.Array):
    del penalty_scale
    pre = jax.nn.relu(self.pre_acts(x))
    z, cut = batch_topk(pre, self.cfg.k, self.cfg.cpu_kernels)
    z = jnp.where(z > 0, z, 0.0)
    x_hat = self.decode(z)
    var = common.total_variance(x)
    e = x - x_hat
    aux = (topk.auxk_loss(self.W_dec[...], pre, e, var, dead_mask, self.cfg)
           if self.cfg.auxk_alpha else jnp.zeros(()))
    out = common.loss_out(x, x_hat, z, aux, min_act=jax.lax.stop_gradient(cut))
    return out.fvu + self.cfg.auxk_alpha * aux, out

  def after_step(self, out: common.LossOut) -> None:
    thr, cut, decay = self.threshold[...], out.min_act, self.cfg.threshold_decay
    self.threshold[...] = jnp.where(thr == 0, cut, decay * thr + (1 - decay) * cut)
