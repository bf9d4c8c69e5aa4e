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


# The paper's initial threshold, for inputs of unit mean squared norm.
PUBLISHED_THRESHOLD = 1e-3


class JumpReLU(common.SAE):
  name = family = "jumprelu"
  other_names = ("jump_relu",)
  saelens_architecture = "jumprelu"
  penalty = "l0_coeff"
  normalize_by_default = True
  # JumpReLU's L0 integrates the coefficient's error (`train.step.adapt_penalty`), and at a
  # proportional gain of 1 it ran to 25.5 for a target of 16 on the demo (5: 16.5); at 5 a
  # ReLU's coefficient overshot a hundredfold in the first steps on the tests' planted store
  # (1: within 10%).
  target_l0_prop = 5.0

  def __init__(self, d_in: int, num_latents: int, cfg: SaeConfig, *, rngs: nnx.Rngs):
    w_dec = common.random_unit_rows(rngs.params(), num_latents, d_in)
    self.init_dictionary(w_dec.T, w_dec, cfg)
    published = PUBLISHED_THRESHOLD if cfg.jumprelu_threshold is None else cfg.jumprelu_threshold
    theta = published * _scale(d_in)
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
    out = common.loss_out(x, x_hat, z, l0)
    return out.fvu + self.cfg.l0_coeff * penalty_scale * l0, out

  def init_from_batch(self, x: jax.Array) -> None:
    """With --target_l0 (and no --jumprelu_threshold), each latent's threshold also starts where
    it fires on target / num_latents of the first batch's tokens (never below the published
    one), so the L0 starts at the target.

    Adam moves a log-threshold by about lr per step, so over a run by about the sum of the
    learning rates (2 for 1,024 steps at lr 0.004): from the published threshold no coefficient
    brings the demo's L0 to 32 in that time (measured: 430 of 1,024 latents at the end, the
    coefficient at 10^4 times --l0_coeff).
    """
    super().init_from_batch(x)
    if self.cfg.target_l0 is None or self.cfg.jumprelu_threshold is not None:
      return
    theta = jnp.quantile(self.pre_acts(x), 1 - self.cfg.target_l0 / self.num_latents, axis=0)
    self.log_threshold[...] = jnp.maximum(jnp.log(jnp.maximum(theta, 1e-30)),
                                          self.log_threshold[...])

  def export(self) -> dict[str, jax.Array]:
    """Thresholds themselves, as SAELens and jaxsae's matcher read them, not their logs."""
    out = super().export()
    out["threshold"] = jnp.exp(out.pop("log_threshold"))
    return out

  def import_weights(self, weights: dict) -> dict:
    weights["log_threshold"] = jnp.log(jnp.asarray(weights.pop("threshold")))
    return weights
