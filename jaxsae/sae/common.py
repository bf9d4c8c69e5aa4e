"""Math shared by the SAE architectures: the config they read, FVU, decoder norms, sparse decode.

Every architecture module (topk.py, relu_l1.py, ...) is a handful of pure functions over a params
dict {W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in], + extras}; the trainer adds the
seed axis with `vmap`, so nothing here knows about seeds or devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SaeConfig:
  """What the architectures read. Frozen and hashable, so jit can treat it as static."""

  k: int = 32
  k_aux: int | None = None  # AuxK latents; None means d_in // 2 (Gao et al. 2024, App. B.1)
  auxk_alpha: float = 0.0
  l1_coeff: float = 5.0
  l0_coeff: float = 1e-3
  jumprelu_bandwidth: float = 1e-3
  jumprelu_threshold: float = 1e-3
  threshold_decay: float = 0.99
  compute_dtype: str = "float32"


class Architecture(NamedTuple):
  """One SAE architecture as plain functions; the mapping in `jaxsae.sae` holds one per name.

  Attributes:
    init: (key, d_in, num_latents, cfg) -> params.
    encode: (params, x [B, d_in], cfg) -> dense latents [B, n].
    decode: (params, z [B, n], cfg) -> reconstruction [B, d_in].
    loss: (params, x, cfg, dead_mask [n] bool, penalty_scale scalar) -> (loss, out), where
      out holds scalars "fvu", "l0", "aux" and "fired" [n] bool (any token used the latent).
    unit_norm_decoder: decoder rows are kept at unit norm and the gradient along them removed.
    after_step: optional (params, out, cfg) -> params, for state that is not trained by
      gradient (e.g. BatchTopK's inference threshold).
    extras: names of the parameters beyond the four shared ones.
    export: optional params -> tensors to export, where an extra is better shared in another
      form than it is trained in (JumpReLU trains log thresholds, readers expect thresholds).
    subtracts_b_dec: the encoder sees x - b_dec (recorded as apply_b_dec_to_input on export).
    sparsify_activation: the `activation` sparsify's loader needs to reproduce this SAE, or None
      where sparsify cannot (the export is then still readable by jaxsae's own loaders).
  """

  init: Callable[..., Params]
  encode: Callable[..., jax.Array]
  decode: Callable[..., jax.Array]
  loss: Callable[..., tuple[jax.Array, dict[str, Any]]]
  unit_norm_decoder: bool = True
  after_step: Callable[..., Params] | None = None
  extras: tuple[str, ...] = ()
  sparsify_activation: str | None = None
  export: Callable[[Params], Params] | None = None
  subtracts_b_dec: bool = True


def matmul(a: jax.Array, b: jax.Array, cfg: SaeConfig) -> jax.Array:
  """a @ b with operands in the compute dtype and a float32 result (bf16 on TPU, f32 on CPU)."""
  dt = jnp.dtype(cfg.compute_dtype)
  return jnp.matmul(a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32)


def total_variance(x: jax.Array) -> jax.Array:
  """sum((x - mean_batch(x))**2): the denominator of the fraction of variance unexplained."""
  return jnp.sum(jnp.square(x - x.mean(0)))


def fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Fraction of variance unexplained, over the whole batch as sparsify computes it."""
  return jnp.sum(jnp.square(x - x_hat)) / total_variance(x)


def unit_norm_rows(w: jax.Array) -> jax.Array:
  # eps as in sparsify's set_decoder_norm_to_unit_norm: a dead zero row stays finite.
  eps = jnp.finfo(w.dtype).eps
  return w / (jnp.linalg.norm(w, axis=-1, keepdims=True) + eps)


def remove_parallel_grad(grad: jax.Array, w: jax.Array) -> jax.Array:
  """Drops the part of each decoder row's gradient along that row.

  With unit-norm rows that component only changes the norm, which the renormalisation after the
  step undoes; left in, it would still feed Adam's moments (sparsify does the same).
  """
  parallel = jnp.einsum("nd,nd->n", grad, w)
  return grad - parallel[:, None] * w


def sparse_decode(acts: jax.Array, idx: jax.Array, w_dec: jax.Array, cfg: SaeConfig) -> jax.Array:
  """sum_j acts[b, j] * W_dec[idx[b, j]]: a decode from k rows instead of a mostly-zero matmul.

  The gather's transpose is a scatter-add, so W_dec's gradient lands on the selected rows only,
  as with sparsify's embedding-bag decoder. (A sorted segment sum, as the encoder's backward
  uses, is faster for one seed on an H100 but 2x slower under the seed vmap, where the rows
  it gathers carry the seed axis: BENCHMARKS.md.)
  """
  dt = jnp.dtype(cfg.compute_dtype)
  rows = w_dec.astype(dt)[idx]  # [B, k, d_in]
  return jnp.einsum("bk,bkd->bd", acts.astype(dt), rows, preferred_element_type=jnp.float32)


def sorted_row_sum(coef: jax.Array, idx: jax.Array, rows: jax.Array, n: int) -> jax.Array:
  """out[i] = sum over (b, j) with idx[b, j] == i of coef[b, j] * rows[b]; out is [n, d].

  The encoder weights' gradient. The B * k updates are sorted by latent first, so the scatter
  writes contiguous segments (H100, [16384 * 32, 768] into 32768 rows: 0.6 ms sorted, 1.2 ms
  unsorted).
  """
  flat = idx.reshape(-1)
  order = jnp.argsort(flat)
  updates = coef.reshape(-1)[order][:, None] * rows[order // idx.shape[-1]].astype(coef.dtype)
  return jax.ops.segment_sum(updates, flat[order], num_segments=n, indices_are_sorted=True)


def top_k(x: jax.Array, k: int, group: int = 32) -> tuple[jax.Array, jax.Array]:
  """Exact top-k along the last axis, as jax.lax.top_k, in two cheap stages.

  Split the row into groups of `group` and keep the k groups with the largest maxima: every
  one of the row's k largest values lies in one of them (a value outside them would have k
  larger group maxima above it). So the k largest of those k * group candidates are the row's
  k largest. XLA's top_k costs about k passes over its input on GPUs (H100: 30 ms for
  [16384, 32768], k=32); this costs one max-reduce, a top_k over n / group maxima and one over
  k * group candidates (bench/bench_train.py). Ties may resolve to other indices of equal value.
  """
  n = x.shape[-1]
  if n <= 4 * k * group:
    return jax.lax.top_k(x, k)
  pad = (-n) % group
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
  groups = x.reshape(*x.shape[:-1], -1, group)
  _, gi = jax.lax.top_k(groups.max(-1), k)  # [..., k] groups
  cand = jnp.take_along_axis(groups, gi[..., None], axis=-2)  # [..., k, group]
  vals, j = jax.lax.top_k(cand.reshape(*cand.shape[:-2], k * group), k)
  idx = jnp.take_along_axis(gi, j // group, axis=-1) * group + j % group
  return vals, idx


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def topk_encoder(x: jax.Array, w_enc: jax.Array, b: jax.Array, cfg: SaeConfig):
  """TopK(ReLU(x @ W_enc + b)) as (values [B, k], indices [B, k]), with a sparse backward.

  Only the k selected pre-activations per token get a gradient, so W_enc's gradient has B * k
  non-zero rows' worth of outer products, not a dense [d_in, B] @ [B, n] product: the backward
  is a segment sum, as in sparsify's fused encoder. Autodiff of the dense form cannot know
  that the cotangent is k-sparse and spends a second (and, for x, a third) full matmul on it.
  """
  return top_k(jax.nn.relu(matmul(x, w_enc, cfg) + b), cfg.k)


def _topk_encoder_fwd(x, w_enc, b, cfg):
  vals, idx = topk_encoder(x, w_enc, b, cfg)
  return (vals, idx), (x, w_enc, vals, idx)


def _topk_encoder_bwd(cfg, res, cts):
  x, w_enc, vals, idx = res
  g = jnp.where(vals > 0, cts[0], 0.0)  # ReLU: a selected zero passes no gradient
  n = w_enc.shape[1]
  # Summed by XLA beside the row sum, an unsorted scalar scatter-add for the bias became
  # contended atomics (H100: 21 ms); a plain segment sum over the same sorted order is cheap.
  flat = idx.reshape(-1)
  order = jnp.argsort(flat)
  db = jax.ops.segment_sum(g.reshape(-1)[order], flat[order], num_segments=n,
                           indices_are_sorted=True)
  # The barrier keeps XLA from fusing the transpose into the scatter (strided column writes).
  dw = jax.lax.optimization_barrier(sorted_row_sum(g, idx, x, n)).T
  dx = sparse_decode(g, idx, w_enc.T, cfg)  # dead code unless someone differentiates x
  return dx.astype(x.dtype), dw.astype(w_enc.dtype), db.astype(w_enc.dtype)


topk_encoder.defvjp(_topk_encoder_fwd, _topk_encoder_bwd)


def kaiming_uniform(key: jax.Array, d_in: int, num_latents: int) -> jax.Array:
  """W_enc [d_in, n] as torch.nn.Linear(d_in, n) draws it, which is what sparsify starts from."""
  bound = 1.0 / jnp.sqrt(d_in)
  return jax.random.uniform(key, (d_in, num_latents), jnp.float32, -bound, bound)


def base_metrics(x: jax.Array, x_hat: jax.Array, z: jax.Array) -> dict[str, jax.Array]:
  return {
      "fvu": fvu(x, x_hat),
      "l0": jnp.mean(jnp.sum(z > 0, axis=-1).astype(jnp.float32)),
      "fired": jnp.any(z > 0, axis=0),
  }
