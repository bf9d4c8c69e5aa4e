"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

A gate decides which latents fire, a magnitude path how strongly; both share W_enc, the
magnitude path rescaled per latent by exp(r_mag):

  pi_gate = (x - b_dec) W_enc + b_enc
  pi_mag  = exp(r_mag) * ((x - b_dec) W_enc) + b_mag
  z       = 1[pi_gate > 0] * ReLU(pi_mag);   x_hat = z W_dec + b_dec
  loss    = (||x - x_hat||^2 + l1_coeff * s * ||ReLU(pi_gate)||_1
             + ||x - ReLU(pi_gate) sg(W_dec) - sg(b_dec)||^2) / total variance

The step function 1[.] passes no gradient, so the gate learns only from the L1 term and the
auxiliary reconstruction through a frozen (stop-gradient) decoder. Decoder rows stay at unit norm
so the L1 cannot be evaded by shrinking W_enc against W_dec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsae.sae import common
from jaxsae.sae.common import SaeConfig


class Gated(common.SAE):
  name = family = "gated"
  saelens_architecture = "gated"
  saelens_names = {"b_enc": "b_gate"}
  penalty = "l1_coeff"
  normalize_by_default = True

  def __init__(self, d_in: int, num_latents: int, cfg: SaeConfig, *, rngs: nnx.Rngs):
    w_dec = common.random_unit_rows(rngs.params(), num_latents, d_in)
    self.init_dictionary(w_dec.T, w_dec, cfg)
    self.r_mag = common.variable(jnp.zeros(num_latents, jnp.float32))
    self.b_mag = common.variable(jnp.zeros(num_latents, jnp.float32))

  def paths(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pi_gate, pi_mag), both [B, n]."""
    proj = common.matmul(self.encoder_input(x), self.W_enc[...], self.cfg)
    return proj + self.b_enc[...], proj * jnp.exp(self.r_mag[...]) + self.b_mag[...]

  def encode(self, x: jax.Array) -> jax.Array:
    pi_gate, pi_mag = self.paths(x)
    return jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)

  def loss(self, x: jax.Array, dead_mask: jax.Array, penalty_scale: jax.Array):
    del dead_mask
    pi_gate, pi_mag = self.paths(x)
    z = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
    x_hat = self.decode(z)
    var = common.total_variance(x)
    gate = jax.nn.relu(pi_gate)
    aux = jnp.sum(jnp.square(x - self.decode(gate, frozen=True))) / var
    l1 = jnp.sum(gate) / var
    out = common.loss_out(x, x_hat, z, aux)
    return out.fvu + self.cfg.l1_coeff * penalty_scale * l1 + aux, out
