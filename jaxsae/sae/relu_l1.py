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
from flax import nnx

from jaxsae.sae import common
from jaxsae.sae.common import SaeConfig

# Anthropic (April 2024): decoder rows start as random directions of norm 0.1, W_enc = W_dec^T.
INIT_DECODER_NORM = 0.1


class ReluL1(common.SAE):
  """The April 2024 recipe; `ReluL1UnitNorm` is the 2023 one."""

  name, family = "relu_l1", "relu"
  # SAELens's and dictionary_learning's plain ReLU SAEs encode alike; whether the encoder
  # subtracts b_dec comes from the file.
  other_names = ("standard", "vanilla")
  penalty = "l1_coeff"
  normalize_by_default = True
  unit_norm_decoder = False

  def __init__(self, d_in: int, num_latents: int, cfg: SaeConfig, *, rngs: nnx.Rngs):
    w_dec = common.random_unit_rows(rngs.params(), num_latents, d_in)
    if not self.unit_norm_decoder:
      w_dec = w_dec * INIT_DECODER_NORM
    self.init_dictionary(w_dec.T, w_dec, cfg)
    self.subtracts_b_dec = self.unit_norm_decoder

  def encode(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.pre_acts(x))

  def loss(self, x: jax.Array, dead_mask: jax.Array, penalty_scale: jax.Array):
    del dead_mask
    z = self.encode(x)
    x_hat = self.decode(z)
    var = common.total_variance(x)
    weights = 1.0 if self.unit_norm_decoder else jnp.linalg.norm(self.W_dec[...], axis=-1)
    l1 = jnp.sum(z * weights) / var
    out = common.loss_out(x, x_hat, z, l1)
    return out.fvu + self.cfg.l1_coeff * penalty_scale * l1, out


class ReluL1UnitNorm(ReluL1):
  """Bricken et al. 2023: unit-norm decoder rows, b_dec subtracted before encoding, plain L1."""

  name, other_names = "relu_l1_unitnorm", ()
  unit_norm_decoder = True
