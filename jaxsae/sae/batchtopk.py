"""BatchTopK SAE (Bussmann et al. 2024): the top k * B activations across the whole batch.

Tokens that need more latents get more, as long as the batch averages k per token:

  pre   = ReLU((x - b_dec) W_enc + b_enc)                  [B, n]
  z     = pre where pre is among the k*B largest of the batch, else 0
  x_hat = z W_dec + b_dec;   loss = FVU + auxk_alpha * AuxK

At inference there is no batch, so a single threshold replaces the selection: z = pre * 1[pre >
threshold], with the threshold an exponential moving average of the smallest selected activation
of each training batch. It is a parameter the optimizer never moves (zero gradient), updated in
`after_step`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae.sae import common
from jaxsae.sae.common import Params, SaeConfig
from jaxsae.sae.topk import auxk_loss
from jaxsae.sae.topk import init as topk_init
from jaxsae.sae.topk import pre_acts


def init(key: jax.Array, d_in: int, num_latents: int, cfg: SaeConfig) -> Params:
  # 0 marks "not yet estimated": the first batch sets it outright instead of decaying from 0.
  return {**topk_init(key, d_in, num_latents, cfg), "threshold": jnp.zeros((), jnp.float32)}


def encode(params: Params, x: jax.Array, cfg: SaeConfig) -> jax.Array:
  pre = pre_acts(params, x, cfg)
  return jnp.where(pre > params["threshold"], pre, 0.0)


def decode(params: Params, z: jax.Array, cfg: SaeConfig) -> jax.Array:
  return common.matmul(z, params["W_dec"], cfg) + params["b_dec"]


def batch_topk(pre: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(z with all but the batch's k * B largest zeroed, the smallest kept value)."""
  vals, _ = jax.lax.top_k(pre.reshape(-1), k * pre.shape[0])
  cut = vals[-1]
  # Ties at the cut may keep a few extra entries; harmless, and cheaper than a scatter.
  return jnp.where(pre >= cut, pre, 0.0), cut


def loss(params: Params, x: jax.Array, cfg: SaeConfig, dead_mask: jax.Array,
         penalty_scale: jax.Array):
  del penalty_scale
  pre = pre_acts(params, x, cfg)
  z, cut = batch_topk(pre, cfg.k)
  z = jnp.where(z > 0, z, 0.0)
  x_hat = decode(params, z, cfg)
  var = common.total_variance(x)
  e = x - x_hat
  aux = auxk_loss(params, pre, e, var, dead_mask, cfg) if cfg.auxk_alpha else jnp.zeros(())
  out = {**common.base_metrics(x, x_hat, z), "aux": aux,
         "min_act": jax.lax.stop_gradient(cut)}
  return out["fvu"] + cfg.auxk_alpha * aux, out


def after_step(params: Params, out: dict, cfg: SaeConfig) -> Params:
  thr, cut = params["threshold"], out["min_act"]
  new = jnp.where(thr == 0, cut, cfg.threshold_decay * thr + (1 - cfg.threshold_decay) * cut)
  return {**params, "threshold": new}


ARCH = common.Architecture(init=init, encode=encode, decode=decode, loss=loss,
                           unit_norm_decoder=True, after_step=after_step,
                           extras=("threshold",))
