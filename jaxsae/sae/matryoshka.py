"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, arXiv 2503.17547): a BatchTopK SAE whose
every nested prefix of the dictionary must also reconstruct the input on its own.

With prefix widths m_1 < m_2 < ... < m_G = n (`--matryoshka_widths`):

  z        = BatchTopK codes over all n latents, as batchtopk.py selects them      [B, n]
  x_hat_i  = z[:, :m_i] W_dec[:m_i] + b_dec          prefix i decodes with latents [0, m_i)
  loss     = sum_i FVU(x, x_hat_i) + auxk_alpha * AuxK(x - x_hat_G)

The first latents have to carry the input without the later ones, so broad features settle
there instead of being split up and absorbed by narrower ones.

The prefix losses combine as in SAELens's MatryoshkaBatchTopKTrainingSAE
(sae_lens/saes/matryoshka_batchtopk_sae.py): the full width's BatchTopK loss plus one
reconstruction loss per inner prefix, summed with equal weights, every prefix decoding with
b_dec, and AuxK on the full width's residual only (its default use_matryoshka_aux_loss=False).
SAELens's per-prefix loss is the squared error summed over d_in and averaged over the batch;
jaxsae's BatchTopK uses FVU, the same up to a factor all prefixes share (B / the batch's total
variance), so each prefix's loss is its FVU here. (dictionary_learning's
MatryoshkaBatchTopKTrainer instead scales each prefix's loss by a group weight, 1/G by default,
and averages them.)

At inference it is a BatchTopK SAE: the learned threshold over all n latents. It exports with
BatchTopK's tensors (threshold []) and arch "matryoshka"; readers encode it as batchtopk, and
cfg.json records the prefix widths as jaxsae.matryoshka_widths, so the sharing of seeds can be
studied per nesting group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsae.errors import JaxsaeError
from jaxsae.sae import common
from jaxsae.sae import topk
from jaxsae.sae.batchtopk import BatchTopK, batch_topk
from jaxsae.sae.common import SaeConfig

# Bussmann et al.'s Matryoshka run (github.com/bartbussmann/matryoshka_sae, main.py) has group
# sizes n/16, n/16, n/8, n/4, n/2: prefixes that double, n/16 up to n.
DEFAULT_DIVISORS = (16, 8, 4, 2, 1)


def prefix_widths(widths: tuple[int, ...], num_latents: int) -> tuple[int, ...]:
  """The prefixes' widths, the last one num_latents.

  `widths` as the flag gives them: strictly increasing, from 1 up to num_latents, which is
  appended when they stop short of it (as SAELens does); () gives the doubling prefixes.
  """
  n = num_latents
  default = tuple(sorted({max(n // d, 1) for d in DEFAULT_DIVISORS}))
  if not widths:
    return default
  given = tuple(widths)
  if (any(int(w) != w for w in given) or given[0] < 1 or given[-1] > n
      or any(a >= b for a, b in zip(given, given[1:]))):
    raise JaxsaeError(
        f"--matryoshka_widths={','.join(map(str, given))}: the prefix widths must be strictly "
        f"increasing whole numbers from 1 to num_latents ({n}), e.g. "
        f"{','.join(map(str, default))} (the default)")
  given = tuple(int(w) for w in given)
  return given if given[-1] == n else given + (n,)


class Matryoshka(BatchTopK):
  # Encodes as BatchTopK once trained (one threshold over all latents).
  name, other_names = "matryoshka", ()

  @classmethod
  def check_config(cls, cfg: SaeConfig, num_latents: int) -> SaeConfig:
    # Resolved here, so a resume under other widths (a different loss) is refused like any
    # other change of the run's identity.
    cfg = super().check_config(cfg, num_latents)
    return dataclasses.replace(cfg, matryoshka_widths=prefix_widths(cfg.matryoshka_widths,
                                                                    num_latents))

  def __init__(self, d_in: int, num_latents: int, cfg: SaeConfig, *, rngs: nnx.Rngs):
    super().__init__(d_in, num_latents, cfg, rngs=rngs)
    self.widths = prefix_widths(cfg.matryoshka_widths, num_latents)

  def loss(self, x: jax.Array, dead_mask: jax.Array, penalty_scale: jax.Array):
    del penalty_scale
    cfg = self.cfg
    pre = jax.nn.relu(self.pre_acts(x))
    z, cut = batch_topk(pre, cfg.k, cfg.cpu_kernels)
    w_dec = self.W_dec[...]
    var = common.total_variance(x)
    x_hat, fvus, start = self.b_dec[...], [], 0
    for end in self.widths:
      # Each group adds its latents to the previous prefix's reconstruction, so all G
      # reconstructions together cost one decode.
      x_hat = x_hat + common.matmul(z[:, start:end], w_dec[start:end], cfg)
      fvus.append(jnp.sum(jnp.square(x - x_hat)) / var)
      start = end
    e = x - x_hat
    aux = (topk.auxk_loss(w_dec, pre, e, var, dead_mask, cfg)
           if cfg.auxk_alpha else jnp.zeros(()))
    out = common.loss_out(x, x_hat, z, aux, min_act=jax.lax.stop_gradient(cut),
                          prefix_fvu=jnp.stack(fvus))
    return sum(fvus) + cfg.auxk_alpha * aux, out

  def export_cfg(self) -> dict[str, Any]:
    return {"matryoshka_widths": list(self.widths)}
