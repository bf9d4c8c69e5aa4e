"""Train S sparse autoencoders that differ only in their seed, on one stream of batches, at once.

  jaxsae train --store=DIR --arch=topk --num_latents=N --k=K --seeds=0,1,2,3 --out=RUN

Read top to bottom: config, mesh, state, the jitted step, the loop, export. Parameters carry a
leading seed axis [S, ...]: one jitted step runs every seed's loss, gradient and optax update
under `vmap` (so gradient clipping and Adam are per seed: no seed's gradient rescales another's),
on a Mesh with axes ("seed", "data") that spreads seeds over one axis and the batch over the
other. Defaults follow the recipe of the paper's SAEs (EleutherAI sparsify, December 2024).

Outputs under RUN/: run.json (what the run is; a rerun must agree), checkpoints/ (orbax; rerunning
the same command resumes from the newest complete one), metrics.jsonl, and at the end
seed{N}/cfg.json + seed{N}/sae.safetensors for every seed (plus tokens{T}/seed{N}/ for each
--keep_at_tokens), in the layout EleutherAI's sparsify loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsae import store as store_lib
from jaxsae.cli import flag as _f
from jaxsae.errors import JaxsaeError
from jaxsae.sae import ARCHITECTURES, common, io

# Where each checkpoint records the digest of its values (orbax custom metadata).
DIGEST_KEY = "jaxsae_digest"
SKIPPED_KEY = "non_finite_skipped"
# Tokens-since-fired saturates here so the int32 counter can never wrap.
COUNTER_CAP = 2**30
# Architectures whose penalties assume inputs scaled to mean norm sqrt(d_in) (see --normalize).
NORMALIZED_BY_DEFAULT = ("relu_l1", "relu_l1_unitnorm", "gated", "jumprelu")
# What makes a run what it is: a rerun into the same --out must agree on these.
IDENTITY = ("arch", "d_in", "num_latents", "k", "seeds", "batch_size", "data_seed", "site",
            "normalize")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Flags of `jaxsae train` (cli.py makes one absl flag per field)."""

  store: str = _f("", "Activation store directory (from `jaxsae extract`), local or gs://.")
  out: str = _f("", "Run directory: checkpoints, metrics and the exported SAEs go here; "
                "rerunning the same command resumes the run.")
  arch: str = _f("topk", "SAE architecture: " + "|".join(ARCHITECTURES) + ".")
  num_latents: int | None = _f(None, "Latents per SAE; default 32 * d_in (sparsify's "
                               "expansion factor).")
  k: int = _f(32, "Active latents per token for topk (per token on average for batchtopk).")
  seeds: tuple[int, ...] = _f((0, 1, 2, 3), "SAE seeds; each changes only the parameter "
                              "initialisation. All seeds see the identical batches.")
  num_seeds: int | None = _f(None, "Shorthand for --seeds=0,1,...,num_seeds-1.")
  data_seed: int = _f(0, "Seed of the batch order, shared by all SAE seeds.")
  site: str | None = _f(None, "Which of the store's sites to train on; default the first.")
  skip_non_finite: bool = _f(False, "Skip store rows holding NaN/Inf (each gives its place in "
                             "the batch to a finite row of the same batch) and count them in "
                             "metrics.jsonl, instead of stopping with an error naming the row.")
  num_tokens: int | None = _f(None, "Training tokens per seed; default one pass over the store.")
  batch_size: int = _f(16384, "Tokens per batch (global, over all hosts and devices).")
  lr: float | None = _f(None, "Adam learning rate; default 2e-4 / sqrt(num_latents / 2**14) "
                        "(sparsify).")
  lr_warmup_steps: int = _f(1000, "Linear learning-rate warmup steps, then linear decay to 0.")
  adam_b1: float = _f(0.9, "Adam beta1.")
  adam_b2: float = _f(0.999, "Adam beta2.")
  max_grad_norm: float = _f(1.0, "Gradient-norm clip, applied to each seed separately; 0 = off.")
  auxk_alpha: float = _f(0.0, "Weight of the AuxK dead-latent loss (topk, batchtopk); 1/32 = "
                         "0.03125 turns it on as in Gao et al.; 0 = off as in the paper's runs.")
  dead_tokens: int = _f(10_000_000, "A latent is dead after not firing for this many tokens.")
  l1_coeff: float = _f(5.0, "L1 coefficient (relu_l1, relu_l1_unitnorm, gated), for inputs "
                       "normalised to mean norm sqrt(d_in).")
  l0_coeff: float = _f(1e-3, "L0 coefficient of jumprelu, in FVU per active latent per token.")
  penalty_warmup: float = _f(0.05, "Fraction of the steps over which the L1/L0 coefficient "
                             "warms up linearly from 0.")
  jumprelu_bandwidth: float = _f(1e-3, "JumpReLU pseudo-derivative bandwidth (as published; "
                                 "scaled by sqrt(d_in) for jaxsae's normalisation).")
  jumprelu_threshold: float = _f(1e-3, "JumpReLU initial threshold (as published; scaled by "
                                 "sqrt(d_in)).")
  normalize: bool | None = _f(None, "Scale inputs to mean norm sqrt(d_in) with the store's "
                              "recorded mean norm; default on for relu_l1/gated/jumprelu, off "
                              "for topk/batchtopk (whose FVU loss is scale-free).")
  mesh: str = _f("auto", "Device mesh SEEDSxDATA, e.g. 4x2; auto spreads seeds first.")
  seed_loop: str = _f("auto", "vmap (all seeds as one batched program) or map (one seed after "
                      "another inside the step); auto: map on a single CPU device, else vmap.")
  compute_dtype: str = _f("auto", "dtype of the matrix products (float32|bfloat16); parameters "
                          "and optimizer state stay float32. auto: float32 on CPU, else bfloat16.")
  checkpoint_every: int = _f(1000, "Save a checkpoint every this many steps (and at the end).")
  keep_checkpoints: int = _f(3, "How many of the newest checkpoints to keep.")
  checkpoint_dir: str = _f("", "Where checkpoints go; default RUN/checkpoints. May be gs://, so "
                           "a preempted TPU slice resumes from the bucket while --out stays "
                           "on local disk.")
  keep_at_tokens: tuple[int, ...] = _f((), "Also keep checkpoints and export every seed (under "
                                       "RUN/tokens{T}/) at these token counts.")
  log_every: int = _f(10, "Write metrics every this many steps.")
  progress: bool = _f(True, "Show a progress bar.")
  distributed: bool = _f(False, "Join the other hosts with jax.distributed.initialize() first "
                         "(multi-host TPU: every worker runs the same command).")
  coordinator_address: str = _f("", "host:port of process 0, with --distributed where the "
                                "cluster is not detected (Cloud TPU and SLURM are); also "
                                "$JAX_COORDINATOR_ADDRESS.")
  num_processes: int | None = _f(None, "Number of processes, with --coordinator_address.")
  process_id: int | None = _f(None, "This process's index, with --coordinator_address.")


# ---------------------------------------------------------------------------------------------
# Configuration checks and derived settings.


def resolve(cfg: TrainConfig, d_in: int, num_store_tokens: int) -> dict[str, Any]:
  """Derived settings, with one clear error for each bad combination of flags."""
  if cfg.arch not in ARCHITECTURES:
    raise JaxsaeError(f"--arch={cfg.arch} is unknown; use one of {', '.join(ARCHITECTURES)}")
  seeds = tuple(range(cfg.num_seeds)) if cfg.num_seeds is not None else tuple(cfg.seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise JaxsaeError(f"--seeds={','.join(map(str, seeds))}: give one or more distinct seeds")
  n = cfg.num_latents or 32 * d_in
  if n < 2:
    raise JaxsaeError(f"--num_latents={n} must be at least 2")
  if cfg.arch in ("topk", "batchtopk") and not 0 < cfg.k < n:
    raise JaxsaeError(f"--k={cfg.k} must be between 1 and num_latents-1 ({n - 1})")
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
  if cfg.seed_loop not in ("auto", "vmap", "map"):
    raise JaxsaeError(f"--seed_loop={cfg.seed_loop}: use auto, vmap or map")
  normalize = cfg.normalize if cfg.normalize is not None else cfg.arch in NORMALIZED_BY_DEFAULT
  return {
      "arch": cfg.arch, "d_in": d_in, "num_latents": n, "k": cfg.k, "seeds": list(seeds),
      "batch_size": cfg.batch_size, "data_seed": cfg.data_seed, "site": cfg.site,
      "normalize": normalize, "num_steps": num_steps, "compute_dtype": dtype,
      "lr": cfg.lr or 2e-4 / math.sqrt(n / 2**14),
      "keep_steps": sorted({t // cfg.batch_size for t in cfg.keep_at_tokens
                            if 0 < t // cfg.batch_size <= num_steps}),
  }


def check_identity(out: str, spec: dict, store_dir: str) -> None:
  """Writes RUN/run.json, or checks that a resumed run is the same run."""
  path = os.path.join(out, "run.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("d_in") != spec["d_in"]:
      raise JaxsaeError(f"store {store_dir} has d_in={spec['d_in']} but the run in {out} was "
                        f"trained on d_in={old.get('d_in')}; use the same store or a new --out")
    diff = [k for k in IDENTITY if old.get(k) != spec[k]]
    if diff:
      said = "; ".join(f"--{k}={old.get(k)} there, {spec[k]} now" for k in diff)
      raise JaxsaeError(f"{out} holds a different run ({said}); rerun with its flags to resume, "
                        "or choose a new --out")
  elif jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    store_lib.atomic_write_json(path, {**spec, "store": store_dir})


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

  clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity()
  return optax.chain(clip, optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2)), schedule


# ---------------------------------------------------------------------------------------------
# State and the jitted step. Every leaf except "step" has the seed axis first.


def init_state(arch: common.Architecture, tx, seeds, d_in: int, n: int, sae_cfg) -> dict:
  def one(seed):
    init_key, rng = jax.random.split(jax.random.key(seed))
    params = arch.init(init_key, d_in, n, sae_cfg)
    return {"params": params, "opt": tx.init(params),
            "since_fired": jnp.zeros(n, jnp.int32),
            # First step whose loss was non-finite, -1 while all is well.
            "bad_step": jnp.full((), -1, jnp.int32),
            # Per-seed RNG for stochastic parts of an architecture; checkpointed with the rest.
            "rng": jax.random.key_data(rng)}
  state = jax.vmap(one)(jnp.asarray(seeds, jnp.uint32))
  return {**state, "step": jnp.zeros((), jnp.int32)}


def state_shardings(abstract_state, mesh: Mesh):
  seeded = NamedSharding(mesh, P("seed"))
  return jax.tree.map(lambda a: seeded if a.ndim else NamedSharding(mesh, P()), abstract_state)


def seed_loop(cfg: TrainConfig) -> str:
  """How the step runs the seeds: "vmap" (one batched program), or "map" (one after another).

  The same numbers either way. On a lone CPU device the k-sparse gathers and scatter-adds are
  slower batched over seeds than run in turn (bench/bench_seed_loop.py: 4 seeds' gradients
  2.0 s under vmap, 1.25 s as a map), and a CPU gains nothing from batching them; elsewhere,
  and whenever the seeds are spread over devices, vmap.
  """
  if cfg.seed_loop != "auto":
    return cfg.seed_loop
  return "map" if jax.default_backend() == "cpu" and jax.device_count() == 1 else "vmap"


def make_step(arch: common.Architecture, tx, sae_cfg, cfg: TrainConfig, penalty_steps: int):
  def one_seed(params, opt, since, bad, x, step):
    dead = since > cfg.dead_tokens
    penalty_scale = jnp.minimum(step / max(penalty_steps, 1), 1.0)
    (loss, out), grads = jax.value_and_grad(arch.loss, has_aux=True)(
        params, x, sae_cfg, dead, penalty_scale)
    if arch.unit_norm_decoder:
      grads["W_dec"] = common.remove_parallel_grad(grads["W_dec"], params["W_dec"])
    updates, new_opt = tx.update(grads, opt, params)  # clip + Adam: this seed's alone
    new = optax.apply_updates(params, updates)
    if arch.unit_norm_decoder:
      new["W_dec"] = common.unit_norm_rows(new["W_dec"])
    if arch.after_step is not None:
      new = arch.after_step(new, out, sae_cfg)
    # A non-finite loss freezes the seed where it was, so no NaN can reach a checkpoint; the
    # loop sees bad_step and stops the run.
    ok = jnp.isfinite(loss) & (bad < 0)
    new, new_opt = jax.tree.map(lambda a, b: jnp.where(ok, a, b), (new, new_opt), (params, opt))
    fired_since = jnp.where(out["fired"], 0, jnp.minimum(since + x.shape[0], COUNTER_CAP))
    since = jnp.where(ok, fired_since, since)
    bad = jnp.where((bad < 0) & ~ok, step, bad)
    metrics = {"loss": loss, "fvu": out["fvu"], "l0": out["l0"], "aux": out["aux"],
               "dead": jnp.mean(since > cfg.dead_tokens)}
    return new, new_opt, since, bad, metrics

  def train_step(state, x):
    seeded = (state["params"], state["opt"], state["since_fired"], state["bad_step"])
    if seed_loop(cfg) == "map":
      params, opt, since, bad, metrics = jax.lax.map(
          lambda a: one_seed(*a, x, state["step"]), seeded)
    else:
      params, opt, since, bad, metrics = jax.vmap(one_seed, in_axes=(0, 0, 0, 0, None, None))(
          *seeded, x, state["step"])
    return {**state, "params": params, "opt": opt, "since_fired": since, "bad_step": bad,
            "step": state["step"] + 1}, metrics

  return train_step


def init_b_dec(state, x):
  """sparsify: b_dec starts at the mean of the first batch, so pre-activations start centred."""
  b = jnp.broadcast_to(x.mean(0), state["params"]["b_dec"].shape)
  return {**state, "params": {**state["params"], "b_dec": b}}


# ---------------------------------------------------------------------------------------------
# Host-side helpers: checkpoints, metrics, export.


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
    mngr.save(int(state["step"]), args=ocp.args.StandardSave(state), force=True,
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

  def __init__(self, out: str, seeds, start_step: int):
    self.seeds, self.path = list(seeds), os.path.join(out, "metrics.jsonl")
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
          for seed, v in zip(self.seeds, values):
            self.tb.add_scalar(f"seed{seed}/{name}", v, record["step"])
      self.tb.add_scalar("lr", record["lr"], record["step"])

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def export(directory: str, params, spec: dict, arch: common.Architecture, step: int,
           input_scale: float, store_dir: str) -> None:
  """Every seed to directory/seed{N}/ in sparsify's layout (process 0 writes)."""
  if arch.export is not None:
    params = jax.jit(jax.vmap(arch.export))(params)
  params = to_host(params)
  if jax.process_index() != 0:
    return
  for i, seed in enumerate(spec["seeds"]):
    cfg = {"arch": spec["arch"], "seed": seed, "k": spec["k"], "step": step,
           "num_tokens": step * spec["batch_size"], "store": store_dir, "site": spec["site"],
           "data_seed": spec["data_seed"], "input_scale": input_scale,
           "normalize_decoder": arch.unit_norm_decoder,
           "apply_b_dec_to_input": arch.subtracts_b_dec,
           "activation": arch.sparsify_activation or "topk"}
    io.save_sparsify(os.path.join(directory, f"seed{seed}"),
                     {name: v[i] for name, v in params.items()}, cfg)


def stop_if_bad(state, spec: dict, mngr) -> None:
  bad = to_host(state["bad_step"])
  if (bad >= 0).any():
    i = int(np.argmax(bad >= 0))
    with _writing_checkpoints(mngr):
      mngr.wait_until_finished()
    last = mngr.latest_step()
    raise JaxsaeError(
        f"seed {spec['seeds'][i]}: non-finite loss at step {int(bad[i])}; stopped without "
        f"saving it. The last good checkpoint is step {last}: lower --lr or check the store "
        "for extreme activations, then rerun to resume from there")


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
  arch = ARCHITECTURES[cfg.arch]
  seeds, d_in, n, num_steps = spec["seeds"], store.d_in, spec["num_latents"], spec["num_steps"]
  input_scale = store.normalizer(store.sites[site_index]) if spec["normalize"] else 1.0

  mesh = make_mesh(cfg.mesh, len(seeds), cfg.batch_size)
  sae_cfg = common.SaeConfig(
      k=cfg.k, auxk_alpha=cfg.auxk_alpha, l1_coeff=cfg.l1_coeff, l0_coeff=cfg.l0_coeff,
      jumprelu_bandwidth=cfg.jumprelu_bandwidth, jumprelu_threshold=cfg.jumprelu_threshold,
      compute_dtype=spec["compute_dtype"])
  tx, schedule = make_optimizer(spec["lr"], cfg.lr_warmup_steps, num_steps, cfg)

  # State: initialised directly into its sharding, or restored from the newest checkpoint.
  make_state = lambda: init_state(arch, tx, seeds, d_in, n, sae_cfg)
  abstract = jax.eval_shape(make_state)
  shardings = state_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  mngr = checkpoint_manager(cfg.out, cfg, spec["keep_steps"])
  state = restore_latest(mngr, abstract)
  fresh = state is None
  if fresh:
    state = jax.jit(make_state, out_shardings=shardings)()
  start = int(state["step"])

  batch_sharding = NamedSharding(mesh, P("data", None))
  seed_sharding = NamedSharding(mesh, P("seed"))
  step_fn = jax.jit(make_step(arch, tx, sae_cfg, cfg, round(cfg.penalty_warmup * num_steps)),
                    in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, seed_sharding), donate_argnums=0)
  batches = store.batches(cfg.batch_size, start_step=start, num_steps=num_steps - start,
                          sharding=batch_sharding, data_seed=cfg.data_seed, site=cfg.site,
                          normalize=spec["normalize"], skip_non_finite=cfg.skip_non_finite)
  writer = MetricsWriter(cfg.out, seeds, start)
  bar = None
  if cfg.progress and jax.process_index() == 0:
    from tqdm import tqdm
    bar = tqdm(total=num_steps, initial=start, unit="step", dynamic_ncols=True,
               desc=f"train {cfg.arch} x{len(seeds)}")
  tokens_per_step = cfg.batch_size * len(seeds)
  t0, step, timed_from = time.perf_counter(), start, start
  # Non-finite store rows skipped so far (--skip_non_finite); checkpoints carry the count.
  skipped = 0 if fresh else saved_metadata(mngr, start).get(SKIPPED_KEY, 0)
  failed = True
  try:
    for x in batches:
      if fresh and step == 0:
        state = jax.jit(init_b_dec, out_shardings=shardings)(state, x)
      state, metrics = step_fn(state, x)
      n, where = store.skipped.pop(step, (0, ""))
      if n and not skipped:
        logging.warning("skipping rows with NaN/Inf (--skip_non_finite); the first: %s", where)
      skipped += n
      step += 1
      if step == start + 1:  # time from here: compilation is not throughput
        jax.block_until_ready(state)
        t0, timed_from = time.perf_counter(), step
      if step % cfg.log_every == 0 or step == num_steps:
        m = to_host(metrics)
        stop_if_bad(state, spec, mngr)
        rate = tokens_per_step * (step - timed_from) / max(time.perf_counter() - t0, 1e-9)
        writer.write({"step": step, "tokens": step * cfg.batch_size,
                      "non_finite_skipped": skipped,
                      "lr": float(schedule(step - 1)), "tokens_per_s": rate,
                      "seeds": seeds, **{k: v.tolist() for k, v in m.items()}})
        if bar is not None:
          bar.set_postfix({"tok/s": f"{rate:,.0f}", "fvu": f"{m['fvu'].mean():.4f}",
                           "l0": f"{m['l0'].mean():.1f}"}, refresh=False)
      if bar is not None:
        bar.update(1)
      if step % cfg.checkpoint_every == 0 or step in spec["keep_steps"] or step == num_steps:
        stop_if_bad(state, spec, mngr)
        save(mngr, state, skipped)
      if step in spec["keep_steps"]:
        export(os.path.join(cfg.out, f"tokens{step * cfg.batch_size}"), state["params"], spec,
               arch, step, input_scale, cfg.store)
      if interrupt_at is not None and step >= interrupt_at:
        raise KeyboardInterrupt
    with _writing_checkpoints(mngr):
      mngr.wait_until_finished()
    export(cfg.out, state["params"], spec, arch, num_steps, input_scale, cfg.store)
    if jax.process_index() == 0:
      print(f"jaxsae train: {len(seeds)} seeds x {num_steps * cfg.batch_size:,} tokens; SAEs in "
            f"{os.path.join(cfg.out, 'seed{' + ','.join(map(str, seeds)) + '}')}/, metrics in "
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
