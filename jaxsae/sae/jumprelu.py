"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

Each latent has a threshold theta_i; below it the latent is zero, above it passes unchanged:

  z     = JumpReLU_theta((x - b_dec) W_enc + b_enc) = pre * H(pre - theta)
  x_hat = z W_dec + b_dec
  loss  = FVU + l0_coeff * s * mean_tokens ||z||_0

H and the L0 have zero gradient almost everywhere, so theta learns through the paper's
straight-through pseudo-derivatives: a rectangle kernel of width `bandwidth` around the threshold.
The paper's bandwidth and initial threshold (both 0.001) are for inputs of unit mean squared
norm; jaxsae normalises to mean norm sqrt(d_in), so both are scaled by sqrt(d_in) here. The L0
is weighed against the FVU (not the raw squared error), which makes l0_coeff scale-free: one more
active latent per token must buy l0_coeff of explained variance.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsae.sae import common
from jaxsae.sae.common import SaeConfig


def _rect(u: jax.Array) -> jax.Array:
  return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
  return pre * (pre > theta)


def _jumprelu_fwd(pre, theta, bandwidth):
  return jumprelu(pre, theta, bandwidth), (pre, theta)


def _jumprelu_bwd(bandwidth, res, g):
  pre, theta = res
  d_theta = -(theta / bandwidth) * _rect((pre - theta) / bandwidth) * g
  return g * (pre > theta), d_theta.sum(0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(pre: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
  return (pre > theta).astype(pre.dtype)


def _step_fwd(pre, theta, bandwidth):
  return step(pre, theta, bandwidth), (pre, theta)


def _step_bwd(bandwidth, res, g):
  pre, theta = res
  d_theta = -(1.0 / bandwidth) * _rect((pre - theta) / bandwidth) * g
  return jnp.zeros_like(pre), d_theta.sum(0)


step.defvjp(_step_fwd, _step_bwd)


def _scale(d_in: int) -> float:
  return math.sqrt(d_in)


class JumpReLU(common.SAE):

  def __init__(self, d_in: int, num_latents: int, cfg: SaeConfig, *, rngs: nnx.Rngs):
    w_dec = common.random_unit_rows(rngs.params(), num_latents, d_in)
    self.init_dictionary(w_dec.T, w_dec, cfg)
    theta = cfg.jumprelu_threshold * _scale(d_in)
    # Trained in log space, as in the paper, so the threshold stays positive.
    self.log_threshold = common.variable(jnp.full(num_latents, math.log(theta), jnp.float32))

  def encode(self, x: jax.Array) -> jax.Array:
    pre = self.pre_acts(x)
    return jnp.where(pre > jnp.exp(self.log_threshold[...]), pre, 0.0)

  def loss(self, x: jax.Array, dead_mask: jax.Array, penalty_scale: jax.Array):
    del dead_mask
    bandwidth = self.cfg.jumprelu_bandwidth * _scale(x.shape[-1])
    pre = self.pre_acts(x)
    theta = jnp.exp(self.log_threshold[...])
    z = jumprelu(pre, theta, bandwidth)
    x_hat = self.decode(z)
    l0 = jnp.mean(jnp.sum(step(pre, theta, bandwidth), axis=-1))
    out = {**common.base_metrics(x, x_hat, z), "aux": l0}
    return out["fvu"] + self.cfg.l0_coeff * penalty_scale * l0, out

  def export(self) -> dict[str, jax.Array]:
    """Thresholds themselves, as SAELens and jaxsae's matcher read them, not their logs."""
    out = super().export()
    out["threshold"] = jnp.exp(out.pop("log_threshold"))
    return out

  def import_weights(self, weights: dict) -> dict:
    weights["log_threshold"] = jnp.log(jnp.asarray(weights.pop("threshold")))
    return weights
