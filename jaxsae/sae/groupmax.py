"""sparsify's groupmax activation, read from sparsify's files (jaxsae does not train it).

  latents = in each of k contiguous groups of n / k latents, the largest of
            ReLU((x - b_dec) W_enc + b_enc), the others 0      (k per token, one per group)
  x_hat   = latents W_dec + b_dec

sparsify's `fused_encoder` takes the first maximum of each group (torch.max); so does argmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsae.sae import common
from jaxsae.sae.common import SaeConfig


class GroupMax(common.SAE):
  name = family = "groupmax"
  encodes_with_k = True
  sparsify_activation = "groupmax"
  saelens_architecture = None  # SAELens has no groupmax

  def __init__(self, d_in: int, num_latents: int, cfg: SaeConfig, *, rngs: nnx.Rngs):
    w_enc = common.kaiming_uniform(rngs.params(), d_in, num_latents)
    self.init_dictionary(w_enc, common.unit_norm_rows(w_enc.T), cfg)

  def encode(self, x: jax.Array) -> jax.Array:
    pre = jax.nn.relu(self.pre_acts(x))
    b, n = pre.shape
    groups = pre.reshape(b, self.cfg.k, n // self.cfg.k)
    first = jax.nn.one_hot(jnp.argmax(groups, -1), n // self.cfg.k, dtype=bool)
    return jnp.where(first, groups, 0.0).reshape(b, n)

  def loss(self, x, dead_mask, penalty_scale):
    raise NotImplementedError("jaxsae reads groupmax SAEs but does not train them")
