"""What the SAE architectures share: their config, the module they build on, and the kernels.

Each architecture (topk.py, relu_l1.py, ...) is one `nnx.Module` over the dictionary every SAE
has, W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in] (+ its extras), with methods
`encode` (its firing rule at inference), `decode`, `loss` and `export`. The hot kernels below
are pure functions the modules call. Nothing here knows about seeds or devices: the trainer
builds the seeds as one Flax ensemble (`nnx.vmap`), which puts a `seed` axis in front of every
variable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsae import cpu_kernels
from jaxsae.errors import JaxsaeError


@dataclasses.dataclass(frozen=True)
class SaeConfig:
  """What the architectures read. Frozen and hashable: a static attribute of the modules."""

  k: int = 32
  k_aux: int | None = None  # AuxK latents; None means d_in // 2 (Gao et al. 2024, App. B.1)
  auxk_alpha: float = 0.0
  l1_coeff: float = 5.0
  l0_coeff: float = 1e-3
  jumprelu_bandwidth: float = 1e-3
  # JumpReLU's initial threshold; None: the published 1e-3, or with `target_l0` where each
  # latent fires target_l0 / num_latents of the first batch (`JumpReLU.init_from_batch`).
  jumprelu_threshold: float | None = None
  # The L0 the trainer steers a penalised SAE to (--target_l0), None when off.
  target_l0: float | None = None
  threshold_decay: float = 0.99
  compute_dtype: str = "float32"
  # How the TopK kernels select and differentiate: jaxsae's CPU "kernel"s, "dense" products or
  # "scatter"-adds of the k rows (`choose_topk_path` decides on the host). All give the same
  # numbers to float tolerance.
  topk_path: str = "scatter"
  # Which top-k selects: "exact" (jax.lax.top_k's set), "approx" (jax.lax.approx_max_k at
  # APPROX_RECALL: on a TPU its fused partial reduction, elsewhere XLA's exact fallback) or
  # "approx_cpu" (the TPU's algorithm emulated, to measure what it changes off a TPU).
  topk_rule: str = "exact"
  # Whether jitted code may call jaxsae's CPU kernels (`cpu_kernels.available()`, asked once on
  # the host: nothing traced probes its environment). Their top-k replaces lax.top_k to the bit.
  cpu_kernels: bool = False
  # Matryoshka's prefix widths as --matryoshka_widths gives them; () for its default
  # (`matryoshka.prefix_widths`).
  matryoshka_widths: tuple[int, ...] = ()


class LossOut(NamedTuple):
  """What `loss` hands back beside the loss: scalars but `fired` [n] (any token used the latent).
  The architecture's own extras are None where it has none."""
  fvu: jax.Array
  l0: jax.Array
  aux: jax.Array  # its auxiliary term: AuxK, the L1 or L0 penalty, Gated's frozen reconstruction
  fired: jax.Array
  min_act: jax.Array | None = None  # BatchTopK: the batch's smallest kept activation
  prefix_fvu: jax.Array | None = None  # Matryoshka: each nested prefix's FVU [G]


class Statistic(nnx.Variable):
  """State a training step sets but no gradient trains (BatchTopK's inference threshold, the
  tokens-since-fired counters). Not an `nnx.Param`, so `nnx.Optimizer(..., wrt=nnx.Param)`
  keeps no Adam moments for it."""


def variable(value: jax.Array, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
  """A variable with no sharded axis inside one SAE. The ensemble's `nnx.vmap` puts the `seed`
  mesh axis in front of this `out_sharding`; the trainer places the whole state at once from
  those names (its jit's out_shardings), so nothing is sharded eagerly here."""
  return kind(value, out_sharding=(None,) * jnp.ndim(value), eager_sharding=False)


class SAE(nnx.Module):
  """The dictionary every architecture has, and what follows from it alone.

  Subclasses set the class attributes and define `__init__(d_in, num_latents, cfg, *, rngs)`,
  `encode(x) -> z [B, n]` and `loss(x, dead_mask, penalty_scale) -> (loss, LossOut)`. The class
  attributes are everything the trainer and the readers know of an architecture: no code
  outside its own file compares its name.
  """

  # --arch, and the "arch" its exported cfg.json records.
  name: ClassVar[str]
  # The firing rule a reader encodes its files by (match.json's "arch"): topk, batchtopk,
  # relu, jumprelu or gated. Architectures that train alike-encoding SAEs share one.
  family: ClassVar[str]
  # What other libraries' files call this family (SAELens's "standard" for ReLU, ...).
  other_names: ClassVar[tuple[str, ...]] = ()
  # It selects latents by a top-k (k active per token): --k applies and is checked, and the
  # seeds' loop is chosen by what the top-k costs.
  selects_top_k: ClassVar[bool] = False
  # Its `encode` keeps k latents per token, so a file must say k (BatchTopK's uses a threshold).
  encodes_with_k: ClassVar[bool] = False
  # The SaeConfig field of the coefficient that sets its sparsity (what --target_l0 adapts);
  # None where k sets it.
  penalty: ClassVar[str | None] = None
  # --normalize's default: the penalties' coefficients assume inputs at mean norm sqrt(d_in).
  normalize_by_default: ClassVar[bool] = False
  # --target_l0_prop's default (jumprelu.py says why it differs there).
  target_l0_prop: ClassVar[float] = 1.0
  # Decoder rows are kept at unit norm, and the gradient along them removed, by the trainer.
  unit_norm_decoder: ClassVar[bool] = True
  # The activation sparsify's loader needs to reproduce this SAE, or None where it cannot.
  sparsify_activation: ClassVar[str | None] = None
  # The SAELens class (its cfg.json "architecture") that encodes this SAE exactly, and what
  # SAELens calls those of its tensors it names differently (Gated's gate bias is b_gate).
  saelens_architecture: ClassVar[str | None] = "standard"
  saelens_names: ClassVar[dict[str, str]] = {}

  cfg: SaeConfig
  # The encoder sees x - b_dec (exported as apply_b_dec_to_input).
  subtracts_b_dec: bool = True
  # How a file's SAE normalises each input row before encoding (SAELens's
  # normalize_activations): "none", "layer_norm" or "constant_norm_rescale". The trainer's own
  # input scale is a constant, folded into the weights on export; these are per-row.
  input_norm: str = "none"

  def init_dictionary(self, w_enc: jax.Array, w_dec: jax.Array, cfg: SaeConfig) -> None:
    d_in, n = w_enc.shape
    self.cfg = cfg
    self.W_enc = variable(w_enc)
    self.b_enc = variable(jnp.zeros(n, jnp.float32))
    self.W_dec = variable(w_dec)
    self.b_dec = variable(jnp.zeros(d_in, jnp.float32))

  @property
  def num_latents(self) -> int:
    return self.W_enc.shape[-1]

  def encoder_input(self, x: jax.Array) -> jax.Array:
    return x - self.b_dec[...] if self.subtracts_b_dec else x

  def pre_acts(self, x: jax.Array) -> jax.Array:
    """The encoder's pre-activations [B, n], before the architecture's firing rule."""
    return matmul(self.encoder_input(x), self.W_enc[...], self.cfg) + self.b_enc[...]

  def decode(self, z: jax.Array, frozen: bool = False) -> jax.Array:
    """x_hat = z W_dec + b_dec, the decoder of every architecture; `frozen` passes no gradient
    to the decoder (Gated's auxiliary loss)."""
    w_dec, b_dec = self.W_dec[...], self.b_dec[...]
    if frozen:
      w_dec, b_dec = jax.lax.stop_gradient((w_dec, b_dec))
    return matmul(z, w_dec, self.cfg) + b_dec

  @classmethod
  def check_config(cls, cfg: SaeConfig, num_latents: int) -> SaeConfig:
    """`cfg` checked for this architecture (a JaxsaeError naming the flag) and with its own
    settings resolved, before anything is written; k's bounds where it selects a top-k."""
    if cls.selects_top_k and not 0 < cfg.k < num_latents:
      raise JaxsaeError(f"--k={cfg.k} must be between 1 and num_latents-1 ({num_latents - 1})")
    return cfg

  def init_from_batch(self, x: jax.Array) -> None:
    """sparsify: b_dec starts at the mean of the first batch x [B, d_in], so pre-activations
    start centred."""
    self.b_dec[...] = jnp.broadcast_to(x.mean(-2), self.b_dec.shape)

  def after_step(self, out: LossOut) -> None:
    """Updates state that is not trained by gradient, from the step's `out` (none by default)."""

  def export_cfg(self) -> dict[str, Any]:
    """What the architecture adds to its exported cfg.json, under "jaxsae" (none by default)."""
    return {}

  def export(self) -> dict[str, jax.Array]:
    """The tensors readers expect (sparsify's names, W_enc as [d_in, n]) and their extras."""
    return {name: v[...] for name, v in nnx.state(self).items()}

  @classmethod
  def extra_tensors(cls) -> tuple[str, ...]:
    """The tensors its export holds beside the dictionary's four (what a file must have)."""
    shapes = jax.eval_shape(lambda: cls(2, 4, SaeConfig(k=1), rngs=nnx.Rngs(0)).export())
    return tuple(name for name in shapes if name not in ("W_enc", "b_enc", "W_dec", "b_dec"))

  @classmethod
  def from_weights(cls, weights: dict[str, Any], cfg: SaeConfig, **kwargs) -> SAE:
    """The module holding exported weights (`export`'s inverse), e.g. to encode with an SAE read
    from disk: the same firing rule the trainer used."""
    d_in, n = np.shape(weights["W_enc"])
    sae = nnx.eval_shape(lambda: cls(d_in, n, cfg, rngs=nnx.Rngs(0), **kwargs))
    for name, value in sae.import_weights(dict(weights)).items():
      getattr(sae, name).set_value(jnp.asarray(value, jnp.float32))
    return sae

  def import_weights(self, weights: dict[str, Any]) -> dict[str, Any]:
    """Exported tensors back into this module's variables (the identity unless overridden)."""
    return weights


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


# The k-sparse products' gradients (W_enc's and W_dec's: B * k rows' worth of outer products)
# are scatter-adds of those rows, dense [B, n] matrices holding the k values per token
# multiplied out, or, on a CPU, jaxsae's own kernels (cpu_kernels.py). The scatter does
# B * k * d_in work, the product B * n * d_in, but XLA's CPU scatters write one element at a
# time, so the product wins while the [B, n] matrices are small (bench/bench_kernels.py
# measures the crossover; every path is tested equal to the others). The kernels do the
# scatter's work at memory speed and replace XLA's top-k too; they run wherever they can: XLA's
# CPU backend on one device, float32.
DENSE_BACKWARD_MAX = 1 << 22
BACKWARDS = ("auto", "kernel", "dense", "scatter", "mxu")
RULES = ("auto", "exact", "approx", "approx_cpu")
# approx_max_k's recall target where the TopK rule is "approx": at 32K latents and k = 32 it
# keeps the largest of each bin of 32 (1,024 bins), so a row loses one of its k when two of
# them share a bin (docs/sizing.md and BENCHMARKS.md measure what that changes).
APPROX_RECALL = 0.95


def choose_topk_path(requested: str, batch: int, num_latents: int, compute_dtype: str,
                     cpu_kernels_run: bool, backend: str = "cpu") -> str:
  """How the TopK kernels select and differentiate at this shape, decided on the host:
  `requested` ("kernel", "dense", "scatter" or "mxu") unless it is "auto".

  On a TPU every k-sparse product is a dense one on the MXU ("mxu"): XLA's TPU gathers and
  scatter-adds of 768-wide rows move whole (8, 128) tiles, so by its cost model a gather of
  the B * k decoder rows costs 11.6 GB and 14 ms on a v5e where the [B, n] product costs
  4.2 ms (B 16,384, n 32,768; BENCHMARKS.md's TPU table)."""
  if requested != "auto":
    return requested
  if backend == "tpu":
    return "mxu"
  if kernels_usable(compute_dtype, cpu_kernels_run):
    return "kernel"
  return "dense" if batch * num_latents <= DENSE_BACKWARD_MAX else "scatter"


def choose_topk_rule(requested: str, backend: str) -> str:
  """The top-k's rule: `requested` unless "auto", which is TPU's approx_max_k on a TPU (whose
  exact top_k lowers to sorts: 60 GB of HBM traffic a step at the paper's shape against 1 GB
  fused into the encoder product) and the exact top-k everywhere else."""
  if requested != "auto":
    return requested
  return "approx" if backend == "tpu" else "exact"


def approx_bins(n: int, k: int, recall: float = APPROX_RECALL) -> int:
  """How many bins approx_max_k reduces a row of `n` to (its own size computation, through
  its output shape): n itself where it does no reduction, which makes it exact."""
  out = jax.eval_shape(lambda a: jax.lax.approx_max_k(a, k, recall_target=recall,
                                                      aggregate_to_topk=False),
                       jax.ShapeDtypeStruct((1, n), jnp.float32))
  return out[0].shape[-1]


def approx_top_k_cpu(x: jax.Array, k: int, recall: float = APPROX_RECALL
                     ) -> tuple[jax.Array, jax.Array]:
  """TPU's approx_max_k emulated (XLA's ApproxTopK: a PartialReduce keeping the largest of each
  of L bins, then the exact top k of those L). Bins here are strided, {j, j + L, j + 2L, ...};
  the TPU's own assignment of elements to bins is not published, but a latent's index carries
  no meaning (the initialisation is random), so any fixed partition into bins of equal size
  loses the same share of the top k on average."""
  n = x.shape[-1]
  bins = approx_bins(n, k, recall)
  if bins >= n:
    return jax.lax.top_k(x, k)
  grouped = x.reshape(*x.shape[:-1], n // bins, bins)
  best = jnp.argmax(grouped, axis=-2)  # [..., bins]: which member of each bin
  vals, b = jax.lax.top_k(jnp.max(grouped, axis=-2), k)
  return vals, jnp.take_along_axis(best, b, axis=-1) * bins + b


def select_top_k(x: jax.Array, cfg: SaeConfig) -> tuple[jax.Array, jax.Array]:
  """The k largest along the last axis by the config's rule (`SaeConfig.topk_rule`)."""
  if cfg.topk_rule == "approx":
    return jax.lax.approx_max_k(x, cfg.k, recall_target=APPROX_RECALL)
  if cfg.topk_rule == "approx_cpu":
    return approx_top_k_cpu(x, cfg.k)
  return grouped_top_k(x, cfg.k, cfg.cpu_kernels)


def kernels_usable(compute_dtype: str, cpu_kernels_run: bool) -> bool:
  """Whether the TopK step's products can be jaxsae's kernels (which compute in float32)."""
  return jnp.dtype(compute_dtype) == jnp.float32 and cpu_kernels_run


def densify(coef: jax.Array, idx: jax.Array, n: int, lanes: int | None = None) -> jax.Array:
  """[B, n] holding coef[b, j] at (b, idx[b, j]) and zeros elsewhere (idx distinct per row);
  with `lanes` (dividing n), the same codes as [B, n // lanes, lanes]."""
  rows = jnp.arange(idx.shape[0])[:, None]
  if lanes is None:
    return jnp.zeros((idx.shape[0], n), coef.dtype).at[rows, idx].set(coef, unique_indices=True)
  # Each row's k indices in order make the scatter's (row, index) pairs sorted, which XLA may
  # then assume (indices_are_sorted): its TPU lowering otherwise sorts all B * k of them first.
  # By XLA's TPU cost model the paper's step moved 13.08 -> 12.69 GB on v5e and 11.60 -> 11.46
  # GB on v6e, and compiled in 10% less time (BENCHMARKS.md, the TPU compile).
  idx, coef = jax.lax.sort((idx, coef), dimension=idx.ndim - 1, num_keys=1)
  return jnp.zeros((idx.shape[0], n // lanes, lanes), coef.dtype).at[
      rows, idx // lanes, idx % lanes].set(coef, unique_indices=True, indices_are_sorted=True)


def sparse_decode(acts: jax.Array, idx: jax.Array, w_dec: jax.Array, cfg: SaeConfig,
                  path: str = "scatter") -> jax.Array:
  """sum_j acts[b, j] * W_dec[idx[b, j]]: a decode from k rows instead of a mostly-zero matmul.

  `path` as `SaeConfig.topk_path` names it. "scatter": the gather's transpose is a
  scatter-add, so W_dec's gradient lands on the selected rows only, as with sparsify's
  embedding-bag decoder. (A sorted segment sum, as the encoder's backward uses, is faster for one seed on an H100 but
  2x slower under the seed vmap, where the rows it gathers carry the seed axis:
  BENCHMARKS.md.) "dense": the same forward as k row gathers XLA fuses into one loop, and the
  backward as dense products (`_dense_decode`). "kernel": the forward and both gradients as
  jaxsae's CPU kernels (`_kernel_decode`).
  """
  if path in ("dense", "mxu"):
    return _dense_decode(acts, idx, w_dec, cfg)
  if path == "kernel":
    return _kernel_decode(acts, idx, w_dec)
  dt = jnp.dtype(cfg.compute_dtype)
  rows = w_dec.astype(dt)[idx]  # [B, k, d_in]
  return jnp.einsum("bk,bkd->bd", acts.astype(dt), rows, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense_decode(acts: jax.Array, idx: jax.Array, w_dec: jax.Array, cfg: SaeConfig):
  dt = jnp.dtype(cfg.compute_dtype)
  w = w_dec.astype(dt)
  # One fused loop of row gathers; the einsum over W_dec[idx] first writes [B, k, d_in] out.
  out = jnp.zeros((idx.shape[0], w.shape[-1]), jnp.float32)
  for j in range(idx.shape[-1]):
    out = out + (acts[:, j, None].astype(dt) * w[idx[:, j]]).astype(jnp.float32)
  return out


def _dense_decode_fwd(acts, idx, w_dec, cfg):
  return _dense_decode(acts, idx, w_dec, cfg), (acts, idx, w_dec)


def _dense_decode_bwd(cfg, res, ct):
  acts, idx, w_dec = res
  n = w_dec.shape[0]
  # d acts[b, j] = <ct[b], W_dec[idx[b, j]]>: one [B, d] @ [d, n] product, then the k taken.
  d_acts = jnp.take_along_axis(matmul(ct, w_dec.T, cfg), idx, axis=-1)
  d_w = matmul(densify(acts, idx, n).T, ct, cfg)
  return d_acts.astype(acts.dtype), None, d_w.astype(w_dec.dtype)


_dense_decode.defvjp(_dense_decode_fwd, _dense_decode_bwd)


@jax.custom_vjp
def _kernel_decode(acts: jax.Array, idx: jax.Array, w_dec: jax.Array):
  return cpu_kernels.gather_sum(acts, idx, w_dec)


def _kernel_decode_fwd(acts, idx, w_dec):
  return _kernel_decode(acts, idx, w_dec), (acts, idx, w_dec)


def _kernel_decode_bwd(res, ct):
  acts, idx, w_dec = res
  d_w, _ = cpu_kernels.scatter_rows(acts, idx, ct, w_dec.shape[0])
  return cpu_kernels.gather_dot(ct, idx, w_dec), None, d_w


_kernel_decode.defvjp(_kernel_decode_fwd, _kernel_decode_bwd)


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


def exact_top_k(x: jax.Array, k: int, kernel: bool) -> tuple[jax.Array, jax.Array]:
  """jax.lax.top_k, from jaxsae's CPU kernel where `kernel` (SaeConfig.cpu_kernels) lets it run
  (the same result, 2-5x faster)."""
  if kernel and x.dtype == jnp.float32:
    return cpu_kernels.top_k(x, k)
  return jax.lax.top_k(x, k)


def grouped_top_k(x: jax.Array, k: int, kernel: bool, group: int = 32
                  ) -> tuple[jax.Array, jax.Array]:
  """Exact top-k along the last axis, as jax.lax.top_k, in two cheap stages.

  Split the row into groups of `group` and keep the k groups with the largest maxima: every
  one of the row's k largest values lies in one of them (a value outside them would have k
  larger group maxima above it). So the k largest of those k * group candidates are the row's
  k largest. XLA's top_k costs about k passes over its input on GPUs (H100: 30 ms for
  [16384, 32768], k=32); this costs one max-reduce, a top_k over n / group maxima and one over
  k * group candidates (bench/bench_train.py). Ties may resolve to other indices of equal value.
  Where jaxsae's CPU kernels run, their top-k instead (`exact_top_k`).
  """
  n = x.shape[-1]
  if n <= 4 * k * group or (kernel and x.dtype == jnp.float32):
    return exact_top_k(x, k, kernel)
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
  pre = jax.nn.relu(matmul(x, w_enc, cfg) + b)
  path = cfg.topk_path
  if path == "kernel" and cfg.topk_rule == "exact":
    return cpu_kernels.top_k(pre, cfg.k)
  vals, idx = select_top_k(pre, cfg)
  if path == "dense":
    # The dense decode slices idx by column; without the barrier XLA merges those slices into
    # the sort that top_k lowers to, and a full [B, n] sort runs instead of its TopK kernel
    # (10x slower on CPU).
    vals, idx = jax.lax.optimization_barrier((vals, idx))
  return vals, idx


def _topk_encoder_fwd(x, w_enc, b, cfg):
  vals, idx = topk_encoder(x, w_enc, b, cfg)
  return (vals, idx), (x, w_enc, vals, idx)


def _topk_encoder_bwd(cfg, res, cts):
  x, w_enc, vals, idx = res
  g = jnp.where(vals > 0, cts[0], 0.0)  # ReLU: a selected zero passes no gradient
  n = w_enc.shape[1]
  path = cfg.topk_path
  dx = sparse_decode(g, idx, w_enc.T, cfg, path)  # dead code unless someone differentiates x
  if path == "kernel":
    dw_t, db = cpu_kernels.scatter_rows(g, idx, x.astype(jnp.float32), n)
    return dx.astype(x.dtype), dw_t.T.astype(w_enc.dtype), db.astype(w_enc.dtype)
  if path == "dense":
    dense = densify(g, idx, n)  # [B, n]
    dw, db = matmul(x.T, dense, cfg), dense.sum(0)
    return dx.astype(x.dtype), dw.astype(w_enc.dtype), db.astype(w_enc.dtype)
  # Summed by XLA beside the row sum, an unsorted scalar scatter-add for the bias became
  # contended atomics (H100: 21 ms); a plain segment sum over the same sorted order is cheap.
  flat = idx.reshape(-1)
  order = jnp.argsort(flat)
  db = jax.ops.segment_sum(g.reshape(-1)[order], flat[order], num_segments=n,
                           indices_are_sorted=True)
  # The barrier keeps XLA from fusing the transpose into the scatter (strided column writes).
  dw = jax.lax.optimization_barrier(sorted_row_sum(g, idx, x, n)).T
  return dx.astype(x.dtype), dw.astype(w_enc.dtype), db.astype(w_enc.dtype)


topk_encoder.defvjp(_topk_encoder_fwd, _topk_encoder_bwd)


# The dense codes of the MXU path are [B, n / LANES, LANES]: a TPU scatter writes its output
# flat, in tiles of 8 x 128 consecutive elements, which is exactly this shape's tiling, so the
# products read the scatter's output where a [B, n] view of it would first be relaid out.
LANES = 128


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def mxu_topk(x: jax.Array, w_enc: jax.Array, b: jax.Array, w_dec: jax.Array, cfg: SaeConfig):
  """TopK's encode and decode with every k-sparse product a dense one on the MXU: (z W_dec
  [B, d_in], values [B, k], indices [B, k]) for z = TopK(ReLU(x W_enc + b)).

  The selected codes are scattered once into a dense z in the compute dtype, which the decode
  and W_dec's gradient read as a product's operand; the backward's [B, n] gradient (e W_dec^T,
  kept where z fired) feeds W_enc's. Five [B, n]-sized products in all, against gathers and
  scatter-adds of B * k rows that XLA's TPU lowering makes dearer (BENCHMARKS.md, the TPU
  table): compute-bound on a v5e. z is [B, n / LANES, LANES] (n not a multiple of LANES:
  [B, 1, n]), contracted over both latent axes, and held behind an optimization barrier for
  the backward, so XLA's TPU compiler neither relays it out for each product nor rebuilds the
  fired mask from the scatter's flat output: by its cost model 12.7 GB a step per device at the
  paper's shape on v5e, not 19.7 (BENCHMARKS.md). The same numbers as the other paths, to
  rounding.
  """
  out, _ = _mxu_topk_fwd(x, w_enc, b, w_dec, cfg)
  return out


def _lanes(n: int) -> int:
  return LANES if n % LANES == 0 else n


def _mxu_einsum(spec: str, a: jax.Array, b: jax.Array, cfg: SaeConfig) -> jax.Array:
  dt = jnp.dtype(cfg.compute_dtype)
  return jnp.einsum(spec, a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32)


def _mxu_topk_fwd(x, w_enc, b, w_dec, cfg):
  n, d = w_dec.shape
  vals, idx = select_top_k(jax.nn.relu(matmul(x, w_enc, cfg) + b), cfg)
  z = densify(vals.astype(cfg.compute_dtype), idx, n, lanes=_lanes(n))
  decoded = _mxu_einsum("bij,ijd->bd", z, w_dec.reshape(z.shape[1:] + (d,)), cfg)
  return (decoded, vals, idx), (x, jax.lax.optimization_barrier(z), w_dec)


def _mxu_topk_bwd(cfg, res, cts):
  x, z, w_dec = res
  (n, d), (_, i, j) = w_dec.shape, z.shape
  ct = cts[0]  # the selection's values and indices pass nothing back (as a top_k's do not)
  # ReLU and the selection in one mask: z is non-zero exactly where a code fired.
  dpre = jnp.where(z > 0, _mxu_einsum("bd,ijd->bij", ct, w_dec.reshape(i, j, d), cfg),
                   0.0).astype(z.dtype)
  d_w_enc = _mxu_einsum("bk,bij->kij", x, dpre, cfg).reshape(x.shape[-1], n)
  d_b = jnp.sum(dpre, axis=0, dtype=jnp.float32).reshape(n)
  d_w_dec = _mxu_einsum("bij,bd->ijd", z, ct, cfg).reshape(n, d)
  # The products return float32, the parameters' dtype; x is data and gets no gradient.
  return jnp.zeros_like(x), d_w_enc, d_b, d_w_dec


mxu_topk.defvjp(_mxu_topk_fwd, _mxu_topk_bwd)


def random_unit_rows(key: jax.Array, num_latents: int, d_in: int) -> jax.Array:
  """[num_latents, d_in] random directions: the decoder the ReLU, Gated and JumpReLU recipes
  start from."""
  return unit_norm_rows(jax.random.normal(key, (num_latents, d_in), jnp.float32))


def kaiming_uniform(key: jax.Array, d_in: int, num_latents: int) -> jax.Array:
  """W_enc [d_in, n] as torch.nn.Linear(d_in, n) draws it, which is what sparsify starts from."""
  bound = 1.0 / jnp.sqrt(d_in)
  return jax.random.uniform(key, (d_in, num_latents), jnp.float32, -bound, bound)


def loss_out(x: jax.Array, x_hat: jax.Array, z: jax.Array, aux: jax.Array,
             **extras: jax.Array) -> LossOut:
  """The LossOut of codes z [B, n] and their reconstruction x_hat of x."""
  return LossOut(fvu=fvu(x, x_hat), l0=jnp.mean(jnp.sum(z > 0, axis=-1).astype(jnp.float32)),
                 aux=aux, fired=jnp.any(z > 0, axis=0), **extras)
