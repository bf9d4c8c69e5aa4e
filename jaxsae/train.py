"""Train S sparse autoencoders that differ only in their seed, on one stream of batches, at once.

  jaxsae train --store=DIR --arch=topk --num_latents=N --k=K --seeds=0,1,2,3 --out=RUN

Read top to bottom: config, mesh, state, the jitted step, the loop, export. The S seeds are one
Flax ensemble (`TrainState`: `nnx.vmap` over per-seed rngs), so every variable carries a leading
seed axis [S, ...]; one functional jitted step merges the modules, runs every seed's loss,
gradient and optax update under `vmap` (so gradient clipping and Adam are per seed: no seed's
gradient rescales another's) and splits them again, on a Mesh with axes ("seed", "data") that
spreads seeds over one axis and the batch over the other. Defaults follow the recipe of the
paper's SAEs (EleutherAI sparsify, December 2024).

Outputs under RUN/: run.json (what the run is; a rerun must agree), checkpoints/ (orbax; rerunning
the same command resumes from the newest complete one), metrics.jsonl, and at the end
seed{N}/cfg.json + seed{N}/sae.safetensors for every seed (plus tokens{T}/seed{N}/ for each
--keep_at_tokens), in the layout EleutherAI's sparsify loads. With --data_seeds each seed reads
its own batch order and exports to seed{N}_data{D}/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsae import files
from jaxsae import optim
from jaxsae import store as store_lib
from jaxsae.config import field
from jaxsae.errors import JaxsaeError
from jaxsae.sae import ARCHITECTURES, SAE, SaeConfig, Statistic, common, io, matryoshka

# Where each checkpoint records the digest of its values (orbax custom metadata).
DIGEST_KEY = "jaxsae_digest"
SKIPPED_KEY = "non_finite_skipped"
# Tokens-since-fired saturates here so the int32 counter can never wrap.
COUNTER_CAP = 2**30
# Architectures whose sparsity a penalty coefficient sets (--target_l0 adapts it); TopK's and
# BatchTopK's L0 is k.
PENALIZED = ("relu_l1", "relu_l1_unitnorm", "gated", "jumprelu")
# Those penalties assume inputs scaled to mean norm sqrt(d_in) (see --normalize).
NORMALIZED_BY_DEFAULT = PENALIZED
# What the checkpoints hold: the nnx.State of `TrainState`. jaxsae 0.1 wrote no format (a dict).
STATE_FORMAT = "nnx-1"
# What makes a run what it is: a rerun into the same --out must agree on these.
IDENTITY = ("arch", "d_in", "num_latents", "k", "seeds", "batch_size", "data_seed", "site",
            "normalize", "data_seeds", "target_l0", "matryoshka_widths")
# What a run.json written before a field existed meant by its absence.
IDENTITY_DEFAULTS = {"data_seeds": [], "matryoshka_widths": []}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Flags of `jaxsae train` (cli.py makes one absl flag per field)."""

  store: str = field("", "Activation store directory (from `jaxsae extract`), local or gs://.")
  out: str = field("", "Run directory: checkpoints, metrics and the exported SAEs go here; "
                   "rerunning the same command resumes the run.")
  arch: str = field("topk", "SAE architecture: " + "|".join(ARCHITECTURES) + ".")
  num_latents: int | None = field(None, "Latents per SAE; default 32 * d_in (sparsify's "
                                  "expansion factor).")
  k: int = field(32, "Active latents per token for topk (per token on average for batchtopk).")
  seeds: tuple[int, ...] = field((0, 1, 2, 3), "SAE seeds; each changes only the parameter "
                                 "initialisation. All seeds see the identical batches unless "
                                 "--data_seeds is given.")
  num_seeds: int | None = field(None, "Shorthand for --seeds=0,1,...,num_seeds-1.")
  data_seed: int = field(0, "Seed of the batch order, shared by all SAE seeds.")
  data_seeds: tuple[int, ...] = field((), "One batch-order seed per SAE seed (as many as "
                                      "--seeds), so each member trains on its own stream; seeds "
                                      "may then repeat (--seeds=0,0 --data_seeds=0,1: one "
                                      "initialisation, two data orders). Exports go to "
                                      "seed{S}_data{D}/. Default: one stream (--data_seed) for "
                                      "all.")
  site: str | None = field(None, "Which of the store's sites to train on; default the first.")
  skip_non_finite: bool = field(False, "Skip store rows holding NaN/Inf (each gives its place in "
                                "the batch to a finite row of the same batch) and count them in "
                                "metrics.jsonl, instead of stopping with an error naming the row.")
  num_tokens: int | None = field(None, "Training tokens per seed; default one pass over the store.")
  batch_size: int = field(16384, "Tokens per batch (global, over all hosts and devices).")
  lr: float | None = field(None, "Adam learning rate; default 2e-4 / sqrt(num_latents / 2**14) "
                           "(sparsify).")
  lr_warmup_steps: int = field(1000, "Linear learning-rate warmup steps, then linear decay to 0.")
  adam_b1: float = field(0.9, "Adam beta1.")
  adam_b2: float = field(0.999, "Adam beta2.")
  max_grad_norm: float = field(1.0, "Gradient-norm clip, applied to each seed separately; 0 = off.")
  auxk_alpha: float = field(0.0, "Weight of the AuxK dead-latent loss (topk, batchtopk); 1/32 = "
                            "0.03125 turns it on as in Gao et al.; 0 = off as in the paper's runs.")
  dead_tokens: int = field(10_000_000, "A latent is dead after not firing for this many tokens.")
  matryoshka_widths: tuple[int, ...] = field((), "matryoshka: widths of the nested prefixes "
                                             "whose reconstruction losses are summed, strictly "
                                             "increasing, num_latents last (appended if left "
                                             "out); default the doubling n/16,n/8,n/4,n/2,n.")
  l1_coeff: float = field(5.0, "L1 coefficient (relu_l1, relu_l1_unitnorm, gated), for inputs "
                          "normalised to mean norm sqrt(d_in).")
  l0_coeff: float = field(1e-3, "L0 coefficient of jumprelu, in FVU per active latent per token.")
  penalty_warmup: float = field(0.05, "Fraction of the steps over which the L1/L0 coefficient "
                                "warms up linearly from 0.")
  target_l0: float | None = field(None, "Adapt each seed's L1/L0 coefficient during training so "
                                  "its L0 (active latents per token) ends near this (relu_l1, "
                                  "relu_l1_unitnorm, gated, jumprelu); the multiplier is logged "
                                  "as penalty_mult. Default off: the fixed --l1_coeff/--l0_coeff.")
  target_l0_gain: float = field(0.02, "With --target_l0: the controller's integral gain: per "
                                "step, the coefficient's log moves by this times the step's "
                                "log((L0 + 1) / (target + 1)).")
  target_l0_prop: float | None = field(None, "With --target_l0: the controller's proportional "
                                       "gain: the coefficient's log also follows this times "
                                       "that error (averaged over ~10 steps). Default 1, and 5 "
                                       "for jumprelu, whose L0 follows the coefficient more "
                                       "slowly.")
  target_l0_freeze: float = field(0.1, "With --target_l0: fraction of the steps at the end "
                                  "that train at the coefficient then reached, held fixed (the "
                                  "L0 drifts as the learning rate decays: over the last 20% the "
                                  "demo's relu_l1 went from 32 to 36).")
  jumprelu_bandwidth: float = field(1e-3, "JumpReLU pseudo-derivative bandwidth (as published; "
                                    "scaled by sqrt(d_in) for jaxsae's normalisation).")
  jumprelu_threshold: float | None = field(None, "JumpReLU initial threshold (as published, "
                                           "1e-3; scaled by sqrt(d_in)). With --target_l0 the "
                                           "default starts each latent's threshold where it "
                                           "fires target / num_latents of the first batch.")
  normalize: bool | None = field(None, "Scale inputs to mean norm sqrt(d_in) with the store's "
                                 "recorded mean norm; default on for relu_l1/gated/jumprelu, off "
                                 "for topk/batchtopk (whose FVU loss is scale-free).")
  mesh: str = field("auto", "Device mesh SEEDSxDATA, e.g. 4x2; auto spreads seeds first.")
  seed_loop: str = field("auto", "vmap (all seeds as one batched program) or map (one seed after "
                         "another inside the step); auto: map on a single CPU device, else vmap.")
  topk_backward: str = field("auto", "TopK's top-k and sparse backward: kernel (jaxsae's C++ "
                             "CPU kernels: one CPU device, float32), dense (matrix products over "
                             "[batch, num_latents]) or scatter (XLA's scatter-adds of the k "
                             "rows); auto: kernel where it runs, else dense while batch x "
                             "num_latents <= 2^22, where it is faster (bench/bench_kernels.py). "
                             "The same numbers to float tolerance; scatter reproduces jaxsae "
                             "0.1's bit for bit.")
  compute_dtype: str = field("auto", "dtype of the matrix products (float32|bfloat16); "
                             "parameters and optimizer state stay float32. auto: float32 on "
                             "CPU, else bfloat16.")
  checkpoint_every: int = field(1000, "Save a checkpoint every this many steps (and at the end).")
  keep_checkpoints: int = field(3, "How many of the newest checkpoints to keep.")
  checkpoint_dir: str = field("", "Where checkpoints go; default RUN/checkpoints. May be gs://, so "
                              "a preempted TPU slice resumes from the bucket while --out stays "
                              "on local disk.")
  keep_at_tokens: tuple[int, ...] = field((), "Also keep checkpoints and export every seed (under "
                                          "RUN/tokens{T}/) at these token counts.")
  log_every: int = field(10, "Write metrics every this many steps.")
  progress: bool = field(True, "Show a progress bar.")
  distributed: bool = field(False, "Join the other hosts with jax.distributed.initialize() first "
                            "(multi-host TPU: every worker runs the same command).")
  coordinator_address: str = field("", "host:port of process 0, with --distributed where the "
                                   "cluster is not detected (Cloud TPU and SLURM are); also "
                                   "$JAX_COORDINATOR_ADDRESS.")
  num_processes: int | None = field(None, "Number of processes, with --coordinator_address.")
  process_id: int | None = field(None, "This process's index, with --coordinator_address.")


# ---------------------------------------------------------------------------------------------
# Configuration checks and derived settings.


def resolve(cfg: TrainConfig, d_in: int, num_store_tokens: int) -> dict[str, Any]:
  """Derived settings, with one clear error for each bad combination of flags."""
  if cfg.arch not in ARCHITECTURES:
    raise JaxsaeError(f"--arch={cfg.arch} is unknown; use one of {', '.join(ARCHITECTURES)}")
  seeds = tuple(range(cfg.num_seeds)) if cfg.num_seeds is not None else tuple(cfg.seeds)
  data_seeds = tuple(cfg.data_seeds)
  if data_seeds and len(data_seeds) != len(seeds):
    raise JaxsaeError(f"--data_seeds={','.join(map(str, data_seeds))} gives {len(data_seeds)} "
                      f"data seeds for {len(seeds)} SAE seeds; give one per seed")
  members = list(zip(seeds, data_seeds)) if data_seeds else seeds
  if not seeds or len(set(members)) != len(members):
    raise JaxsaeError(f"--seeds={','.join(map(str, seeds))}: give one or more distinct seeds"
                      + (" (or distinct pairs of seed and data seed)" if data_seeds else ""))
  n = cfg.num_latents or 32 * d_in
  if n < 2:
    raise JaxsaeError(f"--num_latents={n} must be at least 2")
  if cfg.arch in ("topk", "batchtopk", "matryoshka") and not 0 < cfg.k < n:
    raise JaxsaeError(f"--k={cfg.k} must be between 1 and num_latents-1 ({n - 1})")
  # Checked here, before run.json is written, and resolved so a resume with other widths (a
  # different loss) is refused like any other change of identity.
  widths = (list(matryoshka.prefix_widths(cfg.matryoshka_widths, n))
            if cfg.arch == "matryoshka" else [])
  for name in ("batch_size", "checkpoint_every", "log_every"):
    if getattr(cfg, name) <= 0:
      raise JaxsaeError(f"--{name}={getattr(cfg, name)} must be positive")
  if cfg.lr is not None and not cfg.lr > 0:
    raise JaxsaeError(f"--lr={cfg.lr} must be positive (or left out for sparsify's default)")
  num_tokens = cfg.num_tokens if cfg.num_tokens is not None else num_store_tokens
  num_steps = num_tokens // cfg.batch_size
  if num_steps < 1:
    raise JaxsaeError(f"--num_tokens={num_tokens} is less than one batch of {cfg.batch_size}")
  dtype = cfg.compute_dtype
  if dtype == "auto":
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if dtype not in ("float32", "bfloat16"):
    raise JaxsaeError(f"--compute_dtype={cfg.compute_dtype}: use float32, bfloat16 or auto")
  if cfg.topk_backward not in common.BACKWARDS:
    raise JaxsaeError(f"--topk_backward={cfg.topk_backward}: use auto, kernel, dense or scatter")
  if cfg.topk_backward == "kernel" and not common.kernels_usable(
      SaeConfig(compute_dtype=dtype)):
    raise JaxsaeError("--topk_backward=kernel needs jaxsae's CPU kernels: one CPU device, "
                      "--compute_dtype=float32 and a C++ compiler (see the warning above, if "
                      "any); use auto")
  if cfg.seed_loop not in ("auto", "vmap", "map"):
    raise JaxsaeError(f"--seed_loop={cfg.seed_loop}: use auto, vmap or map")
  if cfg.target_l0 is not None:
    if cfg.arch not in PENALIZED:
      raise JaxsaeError(f"--target_l0 adapts an L1/L0 penalty, which --arch={cfg.arch} does not "
                        f"have (its L0 is set by --k); use it with {', '.join(PENALIZED)}")
    if not 0 < cfg.target_l0 < n:
      raise JaxsaeError(f"--target_l0={cfg.target_l0} must be between 0 and num_latents ({n})")
    prop = target_l0_prop(cfg)
    if not 0 <= cfg.target_l0_freeze < 1 or not cfg.target_l0_gain > 0 or prop < 0:
      raise JaxsaeError(f"--target_l0_freeze={cfg.target_l0_freeze} must be in [0, 1), "
                        f"--target_l0_gain={cfg.target_l0_gain} positive and "
                        f"--target_l0_prop={prop} not negative")
  normalize = cfg.normalize if cfg.normalize is not None else cfg.arch in NORMALIZED_BY_DEFAULT
  return {
      "arch": cfg.arch, "d_in": d_in, "num_latents": n, "k": cfg.k, "seeds": list(seeds),
      "batch_size": cfg.batch_size, "data_seed": cfg.data_seed, "site": cfg.site,
      "data_seeds": list(data_seeds), "target_l0": cfg.target_l0, "matryoshka_widths": widths,
      **({"target_l0_gain": cfg.target_l0_gain, "target_l0_prop": target_l0_prop(cfg),
          "target_l0_freeze": cfg.target_l0_freeze} if cfg.target_l0 is not None else {}),
      "normalize": normalize, "num_steps": num_steps, "compute_dtype": dtype,
      "lr": cfg.lr or 2e-4 / math.sqrt(n / 2**14),
      "keep_steps": sorted({t // cfg.batch_size for t in cfg.keep_at_tokens
                            if 0 < t // cfg.batch_size <= num_steps}),
  }


def target_l0_prop(cfg: TrainConfig) -> float:
  if cfg.target_l0_prop is not None:
    return cfg.target_l0_prop
  return PROP_DEFAULT.get(cfg.arch, 1.0)


def check_identity(out: str, spec: dict, store_dir: str) -> None:
  """Writes RUN/run.json, or checks that a resumed run is the same run."""
  path = os.path.join(out, "run.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("state_format") != STATE_FORMAT:
      raise JaxsaeError(
          f"{out} was written by jaxsae 0.1's dict-based trainer (checkpoint format "
          f"{old.get('state_format', 'dict')!r}; this trainer reads {STATE_FORMAT!r}): its "
          "exported seed*/ SAEs stay readable by `jaxsae match`, but it cannot be resumed; "
          "train into a new --out")
    if old.get("d_in") != spec["d_in"]:
      raise JaxsaeError(f"store {store_dir} has d_in={spec['d_in']} but the run in {out} was "
                        f"trained on d_in={old.get('d_in')}; use the same store or a new --out")
    diff = [k for k in IDENTITY if old.get(k, IDENTITY_DEFAULTS.get(k)) != spec[k]]
    if diff:
      said = "; ".join(f"--{k}={old.get(k, IDENTITY_DEFAULTS.get(k))} there, {spec[k]} now"
                       for k in diff)
      raise JaxsaeError(f"{out} holds a different run ({said}); rerun with its flags to resume, "
                        "or choose a new --out")
  elif jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    files.atomic_write_json(path, {**spec, "store": store_dir,
                                       "state_format": STATE_FORMAT})


def make_mesh(spec: str, num_seeds: int, batch_size: int) -> Mesh:
  """A ("seed", "data") mesh over all devices; `spec` is SEEDSxDATA or auto."""
  n = jax.device_count()
  if spec == "auto":
    s = math.gcd(num_seeds, n)
    shape = (s, n // s)
  else:
    try:
      shape = tuple(int(v) for v in spec.lower().split("x"))
      assert len(shape) == 2
    except (ValueError, AssertionError):
      raise JaxsaeError(f"--mesh={spec}: write it as SEEDSxDATA, e.g. 4x2, or auto")
  if shape[0] * shape[1] != n:
    raise JaxsaeError(f"--mesh={spec} has {shape[0] * shape[1]} devices but there are {n}")
  if num_seeds % shape[0]:
    raise JaxsaeError(f"mesh seed axis {shape[0]} does not divide the {num_seeds} seeds; "
                      "change --mesh or the number of seeds")
  if batch_size % shape[1]:
    raise JaxsaeError(f"--batch_size={batch_size} does not split over the mesh data axis "
                      f"{shape[1]}; change --mesh or the batch")
  return jax.make_mesh(shape, ("seed", "data"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def make_optimizer(lr: float, warmup: int, num_steps: int, cfg: TrainConfig):
  """Adam with sparsify's schedule: linear warmup from 0, then linear decay to 0 at the end."""

  def schedule(count):
    warm = count / max(warmup, 1)
    decay = (num_steps - count) / max(num_steps - warmup, 1)
    return lr * jnp.clip(jnp.where(count < warmup, warm, decay), 0.0, 1.0)

  return optim.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2,
                    max_grad_norm=cfg.max_grad_norm), schedule


# ---------------------------------------------------------------------------------------------
# State: one seed's training state as a module, the S seeds as one Flax ensemble.


class Member(nnx.Module):
  """One seed's training state: its SAE, its optimizer and its bookkeeping."""

  def __init__(self, arch: type[SAE], d_in: int, n: int, sae_cfg: SaeConfig, tx, *,
               rngs: nnx.Rngs, adapt_penalty: bool = False):
    self.sae = arch(d_in, n, sae_cfg, rngs=rngs)
    # Adam moments for the nnx.Params only: a Statistic (BatchTopK's threshold) gets none.
    self.opt = nnx.Optimizer(self.sae, tx, wrt=nnx.Param)
    # Tokens since each latent last fired: its dead-latent clock (AuxK, the `dead` metric).
    self.since_fired = common.variable(jnp.zeros(n, jnp.int32), Statistic)
    # First step whose loss was non-finite, -1 while all is well.
    self.bad_step = common.variable(jnp.full((), -1, jnp.int32), Statistic)
    if adapt_penalty:  # --target_l0 only, so a run without it holds the state it always did
      # What this seed's L1/L0 coefficient is multiplied by, and the smoothed log L0 error
      # (the controller's proportional part needs the last one), set by `adapt_penalty`.
      self.penalty_mult = common.variable(jnp.ones((), jnp.float32), Statistic)
      self.l0_error = common.variable(jnp.zeros((), jnp.float32), Statistic)


class TrainState(nnx.Module):
  """Everything a checkpoint holds: the ensemble of S members and the step of the shared stream."""

  def __init__(self, arch: type[SAE], seeds, d_in: int, n: int, sae_cfg: SaeConfig, tx, *,
               adapt_penalty: bool = False):
    # Flax's ensemble: `nnx.vmap` over per-seed streams puts a leading seed axis on every
    # variable and names it "seed" in its sharding metadata. nnx.Rngs(seed) draws its first
    # key as jax.random.split(key(seed))[0], so a seed starts where it would alone.
    rngs = nnx.Rngs(jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)))
    build = nnx.vmap(lambda r: Member(arch, d_in, n, sae_cfg, tx, rngs=r,
                                      adapt_penalty=adapt_penalty),
                     transform_metadata={nnx.PARTITION_NAME: "seed"})
    self.seeds = build(rngs)
    self.step = nnx.Variable(jnp.zeros((), jnp.int32))


def state_shardings(abstract_state: nnx.State, mesh: Mesh):
  """Each variable's NamedSharding, from the `out_sharding` names its module gave it.

  Flax's vmap extends only a non-empty `out_sharding`, so a per-seed scalar (bad_step, optax's
  counts) comes out with its seed axis unnamed; that axis is always the first.
  """
  def one(v: nnx.Variable):
    names = tuple(v.get_metadata().get("out_sharding") or ())
    if len(names) < v.ndim:
      names = ("seed",) + names
    return v.replace(NamedSharding(mesh, P(*names)))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# The architectures that select latents by top-k (and so gather and scatter k rows a token).
SELECTS_TOP_K = ("topk", "batchtopk", "matryoshka")
# Above this batch x latents the kernel path's seeds run in turn: batched, the encoder product is
# one [S]-batched product, which XLA's CPU runs slower than S plain ones, and at these sizes
# that outweighs what batching saves (bench_seed_loop.py: BENCHMARKS.md).
KERNEL_VMAP_MAX = 1 << 23


def seed_loop(cfg: TrainConfig, compute_dtype: str = "float32",
              num_latents: int | None = None, num_seeds: int | None = None) -> str:
  """How the step runs the seeds: "vmap" (one batched program), or "map" (one after another).

  The same numbers either way, to float rounding. Measured on one CPU device, 4 seeds a step
  (`python bench/bench_seed_loop.py --arch=A --batch_size=B --num_latents=N`, BENCHMARKS.md):
  XLA's own k-sparse gathers, scatter-adds and top-k are slower batched than run in turn
  (TopK at 256 x 1024, dense backward: 81 ms under vmap, 62 ms unrolled; BatchTopK 213 and
  149 ms), so there the seeds run in turn. jaxsae's CPU kernels take the seed axis as one more
  batch dimension and gain from the batch (TopK 30 ms under vmap, 55 ms unrolled; 1024 x 4096:
  275 and 356 ms), up to KERNEL_VMAP_MAX (4096 x 4096: 859 and 808 ms; one seed, which has
  nothing to run in turn, 196 and 206-210 ms in bench_train.py); so does every architecture
  without a top-k (ReLU+L1: 44 and 58 ms). Elsewhere, and whenever the seeds are spread over
  devices, vmap.
  """
  if cfg.seed_loop != "auto":
    return cfg.seed_loop
  if jax.default_backend() != "cpu" or jax.device_count() > 1:
    return "vmap"
  if cfg.arch not in SELECTS_TOP_K:
    return "vmap"
  on_kernels = (common.kernels_usable(SaeConfig(compute_dtype=compute_dtype))
                and cfg.topk_backward in ("auto", "kernel"))
  size = cfg.batch_size * (num_latents or cfg.num_latents or 0)
  return "vmap" if on_kernels and (size <= KERNEL_VMAP_MAX or num_seeds == 1) else "map"


# ---------------------------------------------------------------------------------------------
# The jitted step: pure over the state's arrays; modules are merged and split inside.


class L0Target(NamedTuple):
  """--target_l0's controller: it acts on steps [start, stop)."""
  target: float
  gain: float
  prop: float
  start: int  # the coefficient's warmup ends here: until then a high L0 is by design
  stop: int  # from here on the coefficient is held, so the final weights train at one value


def update(m: Member, x: jax.Array, step: jax.Array, cfg: TrainConfig, penalty_steps: int,
           l0_target: L0Target | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
  """One seed's training step on batch x, in place on `m`; returns its metrics and whether the
  step is ok (a finite loss on a seed not yet frozen). The optimizer leaves its moments as they
  were where it is not (`make_step` restores the rest)."""
  sae = m.sae
  dead = m.since_fired[...] > cfg.dead_tokens
  penalty_scale = jnp.minimum(step / max(penalty_steps, 1), 1.0)
  if l0_target is not None:
    penalty_scale = penalty_scale * m.penalty_mult[...]
  (loss, out), grads = nnx.value_and_grad(
      lambda s: s.loss(x, dead, penalty_scale), has_aux=True)(sae)
  if sae.unit_norm_decoder:
    grads["W_dec"][...] = common.remove_parallel_grad(grads["W_dec"][...], sae.W_dec[...])
  ok = jnp.isfinite(loss) & (m.bad_step[...] < 0)
  m.opt.update(sae, grads, ok=ok)  # clip + Adam: this seed's alone
  if sae.unit_norm_decoder:
    sae.W_dec[...] = common.unit_norm_rows(sae.W_dec[...])
  sae.after_step(out)
  since = m.since_fired[...]
  m.since_fired[...] = jnp.where(out["fired"], 0, jnp.minimum(since + x.shape[0], COUNTER_CAP))
  metrics = {"loss": loss, "fvu": out["fvu"], "l0": out["l0"], "aux": out["aux"]}
  if l0_target is not None:
    metrics["penalty_mult"] = m.penalty_mult[...]  # the value this step trained at
    adapt_penalty(m, out["l0"], step, l0_target)
  return metrics, ok


# --target_l0_prop's default: JumpReLU's L0 integrates the coefficient's error (`adapt_penalty`),
# and at 1 it ran to 25.5 for a target of 16 on the demo (5: 16.5); at 5 a ReLU's coefficient
# overshot a hundredfold in the first steps on the tests' planted store (1: within 10%).
PROP_DEFAULT = {"jumprelu": 5.0}

# The multiplier stays within e^+-LOG_MULT_MAX of the flag's coefficient; a batch's error counts
# at most LOG_ERROR_MAX, so one far off target (the first steps) cannot fling it.
LOG_MULT_MAX = math.log(1e4)
LOG_ERROR_MAX = 1.0
# The error is averaged over about 1 / (1 - ERROR_DECAY) steps, so the coefficient the last
# steps are held at is not one batch's noise times the proportional gain.
ERROR_DECAY = 0.9


def adapt_penalty(m: Member, l0: jax.Array, step: jax.Array, t: L0Target) -> None:
  """PI control of the penalty coefficient in log space on the step's batch L0.

  With e the moving average of log((L0 + 1) / (target + 1)), log(mult) = gain * sum(e) +
  prop * e, taken one step at a time: too many active latents raise the coefficient, too few
  lower it, by the same factor for the same ratio at any target (the +1 keeps a batch with
  L0 = 0 finite). The integral finds the coefficient; the proportional part damps its
  overshoot, since the L0 follows a new coefficient only as fast as Adam moves the weights
  (JumpReLU's thresholds move by about lr a step whatever the coefficient, so there the L0
  itself integrates the coefficient's error, and the proportional part does the steering).
  """
  now = jnp.clip(jnp.log((l0 + 1.0) / (t.target + 1.0)), -LOG_ERROR_MAX, LOG_ERROR_MAX)
  last = m.l0_error[...]
  error = ERROR_DECAY * last + (1 - ERROR_DECAY) * now
  active = (step >= t.start) & (step < t.stop)
  change = t.gain * error + t.prop * (error - last)
  log_mult = jnp.log(m.penalty_mult[...]) + jnp.where(active, change, 0.0)
  m.penalty_mult[...] = jnp.exp(jnp.clip(log_mult, -LOG_MULT_MAX, LOG_MULT_MAX))
  m.l0_error[...] = jnp.where(active, error, m.l0_error[...])


def over_seeds(fn: Callable, members, loop: str, unroll: bool):
  """fn applied to every seed's slice of `members`: under vmap (one batched program), or one
  seed after another ("map"), unrolled in the program or as a lax.map.

  Measured on this CPU, 4 seeds a step (bench/bench_train.py shapes, B x n): at 256 x 1024
  74 ms as a lax.map, 63 ms unrolled; at 1024 x 4096 596 and 550 ms; at 4096 x 4096 1.82 s
  and 2.94 s. A lax.map's while loop copies each seed's state into and out of its carry,
  which small steps feel; unrolled, XLA interleaves the seeds' large steps and their
  [B, n] intermediates crowd each other out. `unroll` is set where the TopK kernels take their
  dense backward, the same small shapes. (Even one seed at 4096 x 4096 ran slower without
  the loop than inside it: 0.53 s against 0.47 s.)
  """
  if loop == "vmap":
    return jax.vmap(fn)(members)
  if not unroll:
    return jax.lax.map(fn, members)
  num_seeds = jax.tree.leaves(members)[0].shape[0]
  outs = [fn(jax.tree.map(lambda a: a[i], members)) for i in range(num_seeds)]
  return jax.tree.map(lambda *a: jnp.stack(a), *outs)


def make_step(graphdef: nnx.GraphDef, cfg: TrainConfig, penalty_steps: int, loop: str,
              l0_target: L0Target | None = None):
  """(state, x) -> (state, per-seed metrics): every seed's update, on the shared batch x
  [B, d_in], or with per-seed data (--data_seeds) each on its own x[i] of x [S, B, d_in]."""

  # All but what the optimizer guards itself (optim.adam): its moments.
  rest = nnx.Not(nnx.OptVariable)

  def one_seed(member_def, member_state, x, step):
    m = nnx.merge(member_def, member_state)
    before = jax.tree.leaves(nnx.state(m, rest))  # arrays are immutable: these stay the old values
    bad = m.bad_step[...]
    # A non-finite loss freezes the seed where it was, so no NaN can reach a checkpoint; the
    # loop sees bad_step and stops the run.
    metrics, ok = update(m, x, step, cfg, penalty_steps, l0_target)
    after, treedef = jax.tree.flatten(nnx.state(m, rest))
    nnx.update(m, treedef.unflatten([jnp.where(ok, a, b) for a, b in zip(after, before)]))
    m.bad_step[...] = jnp.where((bad < 0) & ~ok, step, bad)
    metrics["dead"] = jnp.mean(m.since_fired[...] > cfg.dead_tokens)
    return nnx.state(m), metrics

  def train_step(state: nnx.State, x: jax.Array):
    ts = nnx.merge(graphdef, state)
    member_def, members = nnx.split(ts.seeds)
    step = ts.step[...]
    sae = ts.seeds.sae
    unroll = common.topk_path(x.shape[-2], sae.num_latents, sae.cfg) != "scatter"
    if x.ndim == 3:  # per-seed data: the seeds' loop carries each member with its own batch
      fn = lambda mx: one_seed(member_def, mx[0], mx[1], step)
      members, metrics = over_seeds(fn, (members, x), loop, unroll)
    else:
      fn = lambda s: one_seed(member_def, s, x, step)
      members, metrics = over_seeds(fn, members, loop, unroll)
    nnx.update(ts.seeds, members)
    ts.step[...] = step + 1
    return nnx.state(ts), metrics

  return train_step


def init_b_dec(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> nnx.State:
  """sparsify: b_dec starts at the mean of the first batch, so pre-activations start centred
  (with per-seed data, each member's own first batch)."""
  ts = nnx.merge(graphdef, state)
  b_dec = ts.seeds.sae.b_dec
  b_dec[...] = jnp.broadcast_to(x.mean(-2), b_dec.shape)
  return nnx.state(ts)


def init_thresholds(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array,
                    fires: float) -> nnx.State:
  """JumpReLU with --target_l0: each latent's threshold starts where it fires on `fires` of the
  first batch's tokens (never below the published one), so the L0 starts at the target.

  Adam moves a log-threshold by about lr per step, so over a run by about the sum of the
  learning rates (2 for 1,024 steps at lr 0.004): from the published threshold no coefficient
  brings the demo's L0 to 32 in that time (measured: 430 of 1,024 latents at the end, the
  coefficient at 10^4 times --l0_coeff).
  """
  ts = nnx.merge(graphdef, state)
  sae_def, saes = nnx.split(ts.seeds.sae)

  def one(s, x):
    sae = nnx.merge(sae_def, s)
    theta = jnp.quantile(sae.pre_acts(x), 1 - fires, axis=0)
    sae.log_threshold[...] = jnp.maximum(jnp.log(jnp.maximum(theta, 1e-30)),
                                         sae.log_threshold[...])
    return nnx.state(sae)

  nnx.update(ts.seeds.sae, jax.vmap(one, in_axes=(0, 0 if x.ndim == 3 else None))(saes, x))
  return nnx.state(ts)


# ---------------------------------------------------------------------------------------------
# Host-side helpers: checkpoints, metrics, export.


def member_names(spec: dict) -> list[str]:
  """Each member's export directory: seed{S}, or seed{S}_data{D} with per-seed data (where one
  seed may train on several data orders)."""
  if spec["data_seeds"]:
    return [f"seed{s}_data{d}" for s, d in zip(spec["seeds"], spec["data_seeds"])]
  return [f"seed{s}" for s in spec["seeds"]]


def member_batches(store_dir: str, data_seeds, batch_size: int, sharding, *, start_step: int,
                   num_steps: int, **kwargs):
  """Per-seed data: each step's x [S, B, d_in] stacks member i's batch of data_seeds[i], the
  very batch a lone run with --data_seed=data_seeds[i] reads at that step.

  Each host reads only the members and rows its own devices hold. Every member's stream has
  its own Store (and prefetch thread): a Store caches one buffer's row order at a time, which
  streams of different data seeds would take from each other.
  """
  d_in = store_lib.Store(store_dir).d_in
  shape = (len(data_seeds), batch_size, d_in)
  held = list(sharding.addressable_devices_indices_map(shape).values())

  def span(axis: int) -> tuple[int, int]:
    ranges = [index[axis].indices(shape[axis])[:2] for index in held]
    return min(a for a, _ in ranges), max(b for _, b in ranges)

  (m0, m1), (lo, hi) = span(0), span(1)
  streams = [store_lib.Store(store_dir).batches(batch_size, start_step=start_step,
                                                num_steps=num_steps, data_seed=d, rows=(lo, hi),
                                                **kwargs)
             for d in data_seeds[m0:m1]]

  def local(index):
    s, r = index[0].indices(shape[0]), index[1].indices(batch_size)
    return slice(s[0] - m0, s[1] - m0), slice(r[0] - lo, r[1] - lo)

  for parts in zip(*streams):
    x = np.stack([b.x for b in parts])
    yield store_lib.Batch(jax.make_array_from_callback(shape, sharding, lambda i: x[local(i)]),
                          parts[0].step, sum(b.skipped for b in parts),
                          next((b.where for b in parts if b.where), ""))


def to_host(tree):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


def checkpoint_manager(out: str, cfg: TrainConfig, keep_steps):
  import orbax.checkpoint as ocp
  from orbax.checkpoint import checkpoint_managers as policies

  directory = cfg.checkpoint_dir or os.path.join(out, "checkpoints")
  if "://" not in directory:
    directory = os.path.abspath(directory)
  keep = [policies.LatestN(max(cfg.keep_checkpoints, 1))]
  if keep_steps:
    keep.append(policies.CustomSteps(keep_steps))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep),
      enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True)
  return ocp.CheckpointManager(directory, options=options)


def restore_latest(mngr, abstract_state):
  """The newest checkpoint that restores intact, skipping any that does not; None if none."""
  import orbax.checkpoint as ocp

  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
      recorded = saved_metadata(mngr, step).get(DIGEST_KEY)
      # Checkpoints written before digests were recorded have none; they restore unchecked.
      if recorded is not None and recorded != digest(state):
        raise ValueError("its values differ from the digest recorded when it was saved "
                         "(flipped bytes on disk)")
      return state
    except Exception as e:  # cut short by a kill, or corrupted: fall back to an older one
      # Moved aside, not deleted (a person may want to look), so that its step can be saved
      # again; the new name is no step number, so orbax never lists it.
      aside = f"unreadable-{step}-{int(time.time())}"
      logging.warning("checkpoint %d in %s is unusable (%s); moved it to %s and resuming from "
                      "the previous one", step, mngr.directory, str(e)[:200], aside)
      if jax.process_index() == 0:
        (mngr.directory / str(step)).rename(mngr.directory / aside)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxsae_restore_skip")
      mngr.reload()
  return None


@jax.jit
def _checksums(state):
  def one(a):
    a = a.reshape(-1)
    if a.dtype.itemsize == 4:
      u = jax.lax.bitcast_convert_type(a, jnp.uint32)
    elif a.dtype.itemsize == 2:
      u = jax.lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32)
    else:
      u = a.astype(jnp.uint32)
    # Odd weights: any change to any one word changes the sum (odd numbers are invertible
    # mod 2**32), and so does moving a value to another position.
    return jnp.sum(u * (2 * jnp.arange(u.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)
  return jnp.stack([one(a) for a in jax.tree.leaves(state)])


def digest(state) -> str:
  """A checksum of every value of the state, computed where the state lives.

  Orbax stores no checksum of array data: a flipped bit inside a complete checkpoint restores
  silently as a different number. So every save records this digest, and a restore must
  reproduce it. Integer sums are exact, so the digest does not depend on the device layout.
  """
  sums = _checksums(state)
  return "".join(f"{int(v):08x}" for v in np.asarray(sums.addressable_data(0)))


def save(mngr, state, skipped: int = 0) -> None:
  import orbax.checkpoint as ocp
  with _writing_checkpoints(mngr):
    mngr.save(int(state["step"].get_value()), args=ocp.args.StandardSave(state), force=True,
              custom_metadata={DIGEST_KEY: digest(state), SKIPPED_KEY: skipped})


def saved_metadata(mngr, step: int) -> dict:
  """What jaxsae recorded beside checkpoint `step` (empty for checkpoints of older versions)."""
  return mngr.metadata(step).custom_metadata or {}


@contextlib.contextmanager
def _writing_checkpoints(mngr):
  """Turns a failed checkpoint write (a full disk, a quota) into one clear error."""
  try:
    yield
  except (JaxsaeError, KeyboardInterrupt):
    raise
  except Exception as e:  # tensorstore reports write failures as ValueError, orbax re-raises
    last = mngr.latest_step()
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    code = re.search(r"os_error_code='(\d+)'", text)  # tensorstore's long message hides it
    raise JaxsaeError(
        f"writing a checkpoint to {mngr.directory} failed "
        f"({os.strerror(int(code.group(1))) if code else text[:300]}); "
        + (f"the last complete one is step {last}" if last is not None else "none is complete")
        + ": free space and rerun the same command to resume") from e


def _logged_step(line: str) -> float:
  """The step of a metrics.jsonl line; infinite for the partial line a kill can leave last."""
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return math.inf


class MetricsWriter:
  """metrics.jsonl (one line per logged step, per-seed lists) and TensorBoard when available."""

  def __init__(self, out: str, names, start_step: int):
    self.names, self.path = list(names), os.path.join(out, "metrics.jsonl")
    self.active = jax.process_index() == 0
    self.tb = None
    if not self.active:
      return
    if os.path.exists(self.path):  # drop lines a killed run logged after its last checkpoint
      with open(self.path) as f:
        kept = [line.rstrip("\n") + "\n" for line in f if _logged_step(line) <= start_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    try:
      from tensorboardX import SummaryWriter  # optional; never a reason to fail a run
      self.tb = SummaryWriter(os.path.join(out, "tensorboard"))
    except ImportError:
      pass

  def write(self, record: dict) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for name, values in record.items():
        if isinstance(values, list):
          for member, v in zip(self.names, values):
            self.tb.add_scalar(f"{member}/{name}", v, record["step"])
      self.tb.add_scalar("lr", record["lr"], record["step"])

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def export(directory: str, saes: dict[str, np.ndarray], sae: SAE, spec: dict, step: int,
           input_scale: float, store_dir: str, extras: list[dict] | None = None) -> None:
  """Every seed to directory/seed{N}/ (`member_names`) in sparsify's layout (process 0 writes).

  `saes` holds the seeds' exported tensors [S, ...] (`exported`), `sae` the architecture,
  `extras` what else each member's cfg records (--target_l0's coefficient).
  """
  if jax.process_index() != 0:
    return
  data_seeds = spec["data_seeds"] or [spec["data_seed"]] * len(spec["seeds"])
  for i, (seed, member) in enumerate(zip(spec["seeds"], member_names(spec))):
    cfg = {"arch": spec["arch"], "seed": seed, "k": spec["k"], "step": step,
           "num_tokens": step * spec["batch_size"], "store": store_dir, "site": spec["site"],
           "data_seed": data_seeds[i], **(extras[i] if extras else {}),
           "input_scale": input_scale,
           "normalize_decoder": sae.unit_norm_decoder,
           "apply_b_dec_to_input": sae.subtracts_b_dec,
           "activation": sae.sparsify_activation or "topk", **sae.export_cfg()}
    io.save_sparsify(os.path.join(directory, member),
                     {name: v[i] for name, v in saes.items()}, cfg)


def stop_if_bad(state: nnx.State, spec: dict, mngr) -> None:
  bad = to_host(state["seeds"]["bad_step"].get_value())
  if (bad >= 0).any():
    i = int(np.argmax(bad >= 0))
    with _writing_checkpoints(mngr):
      mngr.wait_until_finished()
    last = mngr.latest_step()
    who = f"seed {spec['seeds'][i]}" + (
        f" (data seed {spec['data_seeds'][i]})" if spec["data_seeds"] else "")
    raise JaxsaeError(
        f"{who}: non-finite loss at step {int(bad[i])}; stopped without "
        f"saving it. The last good checkpoint is step {last}: lower --lr or check the store "
        "for extreme activations, then rerun to resume from there")


class Tick(NamedTuple):
  """Where the loop is after a step: what every hook is given."""
  step: int
  state: nnx.State
  metrics: dict[str, jax.Array]  # per seed, from the step just taken
  skipped: int  # non-finite store rows skipped so far (--skip_non_finite)


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(tick)` after every `every`-th step and after the steps in `at` (levanter's hooks)."""
  fn: Callable[[Tick], None]
  every: int = 0
  at: frozenset[int] = frozenset()

  def __call__(self, tick: Tick) -> None:
    if (self.every and tick.step % self.every == 0) or tick.step in self.at:
      self.fn(tick)


class Throughput:
  """Tokens per second since this process's first step (its compilation is not throughput)."""

  def __init__(self, batch_size: int, num_seeds: int, num_streams: int = 1):
    self.batch_size, self.num_seeds, self.num_streams = batch_size, num_seeds, num_streams
    self.t0, self.first = 0.0, None

  def tick(self, tick: Tick) -> None:
    if self.first is None:
      jax.block_until_ready(tick.state)
      self.t0, self.first = time.perf_counter(), tick.step

  def rates(self, step: int) -> dict[str, float]:
    """Per seed: tokens each seed trains on; stream: tokens read from the store (one shared
    stream, or with --data_seeds one per distinct data order); all seeds: S times per seed."""
    per_seed = self.batch_size * (step - self.first) / max(time.perf_counter() - self.t0, 1e-9)
    return {"tokens_per_s_per_seed": per_seed, "tokens_per_s_stream": per_seed * self.num_streams,
            "tokens_per_s_all_seeds": per_seed * self.num_seeds}


@functools.partial(jax.jit, static_argnums=0)
def exported(graphdef: nnx.GraphDef, state: nnx.State) -> dict[str, jax.Array]:
  """Every seed's `export()` tensors, stacked [S, ...]."""
  sae_def, saes = nnx.split(nnx.merge(graphdef, state).seeds.sae)
  return jax.vmap(lambda s: nnx.merge(sae_def, s).export())(saes)


# ---------------------------------------------------------------------------------------------
# The run.


def run(cfg: TrainConfig, *, interrupt_at: int | None = None) -> None:
  """Trains (or resumes) the run; `interrupt_at` stops after that step as a kill would (tests)."""
  if cfg.distributed:
    jax.distributed.initialize(cfg.coordinator_address or None, cfg.num_processes,
                               cfg.process_id)
  if not cfg.store or not cfg.out:
    raise JaxsaeError("--store and --out are required")
  store = store_lib.Store(cfg.store)
  site_index = store.site_index(cfg.site)
  spec = resolve(cfg, store.d_in, store.num_tokens)
  check_identity(cfg.out, spec, cfg.store)
  seeds, d_in, n, num_steps = spec["seeds"], store.d_in, spec["num_latents"], spec["num_steps"]
  input_scale = store.normalizer(store.sites[site_index]) if spec["normalize"] else 1.0
  mesh = make_mesh(cfg.mesh, len(seeds), cfg.batch_size)
  loop = seed_loop(cfg, spec["compute_dtype"], n, len(seeds))
  if loop == "map" and mesh.size > 1:
    raise JaxsaeError(f"--seed_loop=map runs the seeds one after another on one device, but the "
                      f"mesh has {mesh.size}: it would gather every seed's state; use "
                      "--seed_loop=vmap (or auto)")
  sae_cfg = SaeConfig(
      k=cfg.k, auxk_alpha=cfg.auxk_alpha, l1_coeff=cfg.l1_coeff, l0_coeff=cfg.l0_coeff,
      jumprelu_bandwidth=cfg.jumprelu_bandwidth,
      jumprelu_threshold=1e-3 if cfg.jumprelu_threshold is None else cfg.jumprelu_threshold,
      compute_dtype=spec["compute_dtype"], topk_backward=cfg.topk_backward,
      matryoshka_widths=cfg.matryoshka_widths)
  tx, schedule = make_optimizer(spec["lr"], cfg.lr_warmup_steps, num_steps, cfg)

  # State: built directly into its sharding, or restored from the newest checkpoint. Past
  # this point the loop holds only the state's arrays (nnx.State); modules live inside jit.
  adapt = spec["target_l0"] is not None
  make_state = lambda: TrainState(ARCHITECTURES[cfg.arch], seeds, d_in, n, sae_cfg, tx,
                                  adapt_penalty=adapt)
  graphdef, abstract = nnx.split(nnx.eval_shape(make_state))
  shardings = state_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  mngr = checkpoint_manager(cfg.out, cfg, spec["keep_steps"])
  state = restore_latest(mngr, abstract)
  fresh = state is None
  if fresh:
    state = jax.jit(lambda: nnx.state(make_state()), out_shardings=shardings)()
  start = int(state["step"].get_value())

  penalty_steps = round(cfg.penalty_warmup * num_steps)
  l0_target = L0Target(cfg.target_l0, cfg.target_l0_gain, target_l0_prop(cfg), penalty_steps,
                       num_steps - round(cfg.target_l0_freeze * num_steps)) if adapt else None
  data_seeds, names = spec["data_seeds"], member_names(spec)
  # Per-seed data: x [S, B, d_in], each member's batch on the devices of its seed.
  batch_sharding = NamedSharding(mesh, P("seed", "data", None) if data_seeds else
                                 P("data", None))
  step_fn = jax.jit(make_step(graphdef, cfg, penalty_steps, loop, l0_target),
                    in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, NamedSharding(mesh, P("seed"))),
                    donate_argnums=0)
  read = dict(start_step=start, num_steps=num_steps - start, site=cfg.site,
              normalize=spec["normalize"], skip_non_finite=cfg.skip_non_finite)
  if data_seeds:
    batches = member_batches(cfg.store, data_seeds, cfg.batch_size, batch_sharding, **read)
  else:
    batches = store.batches(cfg.batch_size, sharding=batch_sharding, data_seed=cfg.data_seed,
                            **read)
  sae = nnx.merge(graphdef, abstract).seeds.sae  # the architecture's static facts, for export
  writer = MetricsWriter(cfg.out, names, start)
  bar = None
  if cfg.progress and jax.process_index() == 0:
    from tqdm import tqdm
    bar = tqdm(total=num_steps, initial=start, unit="step", dynamic_ncols=True,
               desc=f"train {cfg.arch} x{len(seeds)}")
  clock = Throughput(cfg.batch_size, len(seeds), len(set(data_seeds)) if data_seeds else 1)

  def log(t: Tick) -> None:
    m = to_host(t.metrics)
    stop_if_bad(t.state, spec, mngr)
    rates = clock.rates(t.step)
    writer.write({"step": t.step, "tokens_per_seed": t.step * cfg.batch_size,
                  "non_finite_skipped": t.skipped, "lr": float(schedule(t.step - 1)), **rates,
                  "seeds": seeds, **({"data_seeds": data_seeds} if data_seeds else {}),
                  **{k: v.tolist() for k, v in m.items()}})
    if bar is not None:
      bar.set_postfix({"stream tok/s": f"{rates['tokens_per_s_stream']:,.0f}",
                       "per seed": f"{rates['tokens_per_s_per_seed']:,.0f}",
                       "fvu": f"{m['fvu'].mean():.4f}", "l0": f"{m['l0'].mean():.1f}"},
                      refresh=False)

  def checkpoint(t: Tick) -> None:
    stop_if_bad(t.state, spec, mngr)
    save(mngr, t.state, t.skipped)

  def export_to(directory: str, step: int, state: nnx.State) -> None:
    extras = None
    if adapt:  # the coefficient each seed ended at, and what it was asked for
      coeff = cfg.l0_coeff if cfg.arch == "jumprelu" else cfg.l1_coeff
      mult = to_host(state["seeds"]["penalty_mult"].get_value())
      extras = [{"target_l0": cfg.target_l0, "penalty_mult": float(v),
                 "penalty_coeff": float(coeff * v)} for v in mult]
    export(directory, to_host(exported(graphdef, state)), sae, spec, step, input_scale,
           cfg.store, extras)

  keep = frozenset(spec["keep_steps"])
  hooks = [
      clock.tick,
      Hook(log, every=cfg.log_every, at=frozenset({num_steps})),
      Hook(checkpoint, every=cfg.checkpoint_every, at=keep | {num_steps}),
      Hook(lambda t: export_to(os.path.join(cfg.out, f"tokens{t.step * cfg.batch_size}"),
                               t.step, t.state), at=keep),
  ]
  skipped = 0 if fresh else saved_metadata(mngr, start).get(SKIPPED_KEY, 0)
  failed = True
  try:
    for step, batch in enumerate(batches, start + 1):
      if fresh and step == 1:
        state = jax.jit(init_b_dec, static_argnums=0, out_shardings=shardings)(
            graphdef, state, batch.x)
        if adapt and cfg.arch == "jumprelu" and cfg.jumprelu_threshold is None:
          state = jax.jit(init_thresholds, static_argnums=(0, 3), out_shardings=shardings)(
              graphdef, state, batch.x, cfg.target_l0 / n)
      state, metrics = step_fn(state, batch.x)
      if batch.skipped and not skipped:
        logging.warning("skipping rows with NaN/Inf (--skip_non_finite); the first: %s",
                        batch.where)
      skipped += batch.skipped
      tick = Tick(step, state, metrics, skipped)
      for hook in hooks:
        hook(tick)
      if bar is not None:
        bar.update(1)
      if interrupt_at is not None and step >= interrupt_at:
        raise KeyboardInterrupt
    with _writing_checkpoints(mngr):
      mngr.wait_until_finished()
    export_to(cfg.out, num_steps, state)
    if jax.process_index() == 0:
      where = ("{" + ",".join(names) + "}" if data_seeds else
               "seed{" + ",".join(map(str, seeds)) + "}")
      print(f"jaxsae train: {len(seeds)} seeds x {num_steps * cfg.batch_size:,} tokens; SAEs in "
            f"{os.path.join(cfg.out, where)}/, metrics in "
            f"{os.path.join(cfg.out, 'metrics.jsonl')}"
            + (f"; skipped {skipped} rows with NaN/Inf" if skipped else ""))
    failed = False
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    try:
      with _writing_checkpoints(mngr):
        mngr.wait_until_finished()  # never leave an async save half-written on the way out
    except JaxsaeError:
      if not failed:  # else the error already on its way out is the one to tell
        raise
    finally:
      mngr.close()
