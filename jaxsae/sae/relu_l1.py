"""ReLU SAE with an L1 penalty: the paper's other main architecture.

Default ("relu_l1"): Anthropic's April 2024 recipe update. The decoder is free (not unit norm);
the penalty weighs each latent by its decoder row's norm, so shrinking rows cannot cheat it.

  z     = ReLU(x W_enc + b_enc)
  x_hat = z W_dec + b_dec
  loss  = (||x - x_hat||^2 + l1_coeff * s * sum_i z_i ||W_dec[i]||) / total variance

`s` is the trainer's linear warmup of the coefficient (first 5% of steps). Dividing both terms by
the batch variance changes nothing about the optimum and keeps the loss on the FVU scale;
l1_coeff=5 is Anthropic's value for inputs normalised to mean norm sqrt(d_in) (`--normalize`).

"relu_l1_unitnorm": the older recipe (Bricken et al. 2023): b_dec subtracted before encoding,
decoder rows held at unit norm, plain L1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae.sae import common
from jaxsae.sae.common import Params, SaeConfig

# Anthropic (April 2024): decoder rows start as random directions of norm 0.1, W_enc = W_dec^T.
INIT_DECODER_NORM = 0.1


def make(unit_norm: bool) -> common.Architecture:
  """The architecture; `unit_norm` picks the 2023 variant."""

  def init(key: jax.Array, d_in: int, num_latents: int, cfg: SaeConfig) -> Params:
    del cfg
    w_dec = common.unit_norm_rows(jax.random.normal(key, (num_latents, d_in), jnp.float32))
    if not unit_norm:
      w_dec = w_dec * INIT_DECODER_NORM
    return {
        "W_enc": w_dec.T,
        "b_enc": jnp.zeros(num_latents, jnp.float32),
        "W_dec": w_dec,
        "b_dec": jnp.zeros(d_in, jnp.float32),
    }

  def encode(params: Params, x: jax.Array, cfg: SaeConfig) -> jax.Array:
    if unit_norm:
      x = x - params["b_dec"]
    return jax.nn.relu(common.matmul(x, params["W_enc"], cfg) + params["b_enc"])

  def decode(params: Params, z: jax.Array, cfg: SaeConfig) -> jax.Array:
    return common.matmul(z, params["W_dec"], cfg) + params["b_dec"]

  def loss(params: Params, x: jax.Array, cfg: SaeConfig, dead_mask: jax.Array,
           penalty_scale: jax.Array):
    del dead_mask
    z = encode(params, x, cfg)
    x_hat = decode(params, z, cfg)
    var = common.total_variance(x)
    weights = 1.0 if unit_norm else jnp.linalg.norm(params["W_dec"], axis=-1)
    l1 = jnp.sum(z * weights) / var
    out = {**common.base_metrics(x, x_hat, z), "aux": l1}
    return out["fvu"] + cfg.l1_coeff * penalty_scale * l1, out

  return common.Architecture(init=init, encode=encode, decode=decode, loss=loss,
                             unit_norm_decoder=unit_norm, subtracts_b_dec=unit_norm)


ARCH = make(unit_norm=False)
ARCH_UNIT_NORM = make(unit_norm=True)
