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

from jaxsae.sae import common
from jaxsae.sae.common import Params, SaeConfig


def init(key: jax.Array, d_in: int, num_latents: int, cfg: SaeConfig) -> Params:
  del cfg
  w_dec = common.unit_norm_rows(jax.random.normal(key, (num_latents, d_in), jnp.float32))
  return {
      "W_enc": w_dec.T,
      "b_enc": jnp.zeros(num_latents, jnp.float32),
      "r_mag": jnp.zeros(num_latents, jnp.float32),
      "b_mag": jnp.zeros(num_latents, jnp.float32),
      "W_dec": w_dec,
      "b_dec": jnp.zeros(d_in, jnp.float32),
  }


def _paths(params: Params, x: jax.Array, cfg: SaeConfig) -> tuple[jax.Array, jax.Array]:
  proj = common.matmul(x - params["b_dec"], params["W_enc"], cfg)
  return proj + params["b_enc"], proj * jnp.exp(params["r_mag"]) + params["b_mag"]


def encode(params: Params, x: jax.Array, cfg: SaeConfig) -> jax.Array:
  pi_gate, pi_mag = _paths(params, x, cfg)
  return jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)


def decode(params: Params, z: jax.Array, cfg: SaeConfig) -> jax.Array:
  return common.matmul(z, params["W_dec"], cfg) + params["b_dec"]


def loss(params: Params, x: jax.Array, cfg: SaeConfig, dead_mask: jax.Array,
         penalty_scale: jax.Array):
  del dead_mask
  pi_gate, pi_mag = _paths(params, x, cfg)
  z = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
  x_hat = decode(params, z, cfg)
  var = common.total_variance(x)
  gate = jax.nn.relu(pi_gate)
  frozen = jax.lax.stop_gradient(params)
  aux = jnp.sum(jnp.square(x - decode(frozen, gate, cfg))) / var
  l1 = jnp.sum(gate) / var
  out = {**common.base_metrics(x, x_hat, z), "aux": aux}
  return out["fvu"] + cfg.l1_coeff * penalty_scale * l1 + aux, out


ARCH = common.Architecture(init=init, encode=encode, decode=decode, loss=loss,
                           unit_norm_decoder=True, extras=("r_mag", "b_mag"))
