"""What a run does, decided once from the flags, the store and the machine: the RunPlan.

`resolve` checks every flag (one clear error for each bad combination, before anything is
written) and turns a TrainConfig into a frozen RunPlan. Its `identity` is what makes the run
what it is: run.json stores it and a resumed run must agree with it. Its `execution` is how this
machine runs it (the TopK path, the seeds' loop, the compute dtype, whether jaxsae's CPU kernels
run, the mesh): decided here on the host, from the backend, the devices and the shapes, printed
when the run starts, recorded in run.json, and handed to the modules as static settings, so
nothing traced probes its environment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxsae import cpu_kernels
from jaxsae import files
from jaxsae.errors import JaxsaeError
from jaxsae.sae import ARCHITECTURES, SAE, SaeConfig, common
from jaxsae.train.config import TrainConfig

# What the checkpoints hold: the nnx.State of `TrainState`. jaxsae 0.1 wrote no format (a dict).
STATE_FORMAT = "nnx-1"
RUN_FILE = "run.json"
# Above this batch x latents the kernel path's seeds run in turn: batched, the encoder product is
# one [S]-batched product, which XLA's CPU runs slower than S plain ones, and at these sizes
# that outweighs what batching saves (bench_seed_loop.py: BENCHMARKS.md).
KERNEL_VMAP_MAX = 1 << 23


@dataclasses.dataclass(frozen=True)
class Identity:
  """What makes a run what it is: a rerun into the same --out must agree on every field."""
  arch: str
  d_in: int
  num_latents: int
  k: int
  seeds: tuple[int, ...]
  batch_size: int
  data_seed: int
  site: str | None
  normalize: bool
  data_seeds: tuple[int, ...]  # () where all seeds share the stream of data_seed
  target_l0: float | None
  matryoshka_widths: tuple[int, ...]  # resolved; () for every other architecture

  def to_json(self) -> dict[str, Any]:
    return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)}


# What a run.json written before a field existed meant by its absence.
IDENTITY_DEFAULTS = {"data_seeds": [], "matryoshka_widths": []}


@dataclasses.dataclass(frozen=True)
class Execution:
  """How this machine runs the plan; the same numbers whichever is chosen, to float rounding."""
  backend: str
  mesh: tuple[int, int]  # devices on the ("seed", "data") axes
  compute_dtype: str  # of the matrix products; parameters and Adam stay float32
  cpu_kernels: bool  # jaxsae's CPU kernels may run (their top-k wherever a top-k runs)
  topk_path: str  # TopK's selection and sparse backward: kernel, dense, scatter or mxu
  seed_loop: str  # vmap (one batched program) or map (one seed after another)
  unroll_seeds: bool  # a map's seeds unrolled in the program rather than a lax.map
  topk_rule: str = "exact"  # exact, or approx (TPU's approx_max_k): which top-k selects

  def describe(self) -> str:
    loop = self.seed_loop + (" unrolled" if self.seed_loop == "map" and self.unroll_seeds else "")
    return (f"{self.backend}, mesh {self.mesh[0]}x{self.mesh[1]} (seed x data), "
            f"{self.compute_dtype} products, TopK path {self.topk_path} "
            f"({self.topk_rule} top-k), seeds by {loop}, "
            f"CPU kernels {'on' if self.cpu_kernels else 'off'}")


class L0Target(NamedTuple):
  """--target_l0's controller: it acts on steps [start, stop)."""
  target: float
  gain: float
  prop: float
  start: int  # the coefficient's warmup ends here: until then a high L0 is by design
  stop: int  # from here on the coefficient is held, so the final weights train at one value


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam with sparsify's schedule, as settings (`state.make_optimizer` builds the optax one;
  nnx.Optimizer holds its state)."""
  lr: float
  warmup_steps: int
  num_steps: int
  b1: float
  b2: float
  max_grad_norm: float


@dataclasses.dataclass(frozen=True)
class Checkpoints:
  directory: str  # RUN/checkpoints unless --checkpoint_dir; may be gs://
  every: int
  keep: int
  keep_steps: tuple[int, ...]  # also kept, and exported under RUN/tokens{T}/ (--keep_at_tokens)


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """Everything the run does; frozen, so the jitted step may close over it."""
  identity: Identity
  execution: Execution
  sae: SaeConfig  # what the modules read, the execution's choices among it
  optimizer: OptimizerConfig
  checkpoints: Checkpoints
  num_steps: int
  penalty_steps: int  # the L1/L0 coefficient warms up over these
  l0_target: L0Target | None
  dead_tokens: int
  store_path: str  # the flag as given (local or gs://), which run.json and cfg.json record
  out: str
  skip_non_finite: bool
  log_every: int
  progress: bool
  # The exports' layouts (jaxsae.formats.WRITERS), the first at RUN/seed{N}/: an export's
  # concern, not the checkpoints'.
  layouts: tuple[str, ...]
  store_window: int = 8  # gs:// stores: shards held in memory (Store's `window`)

  @property
  def arch(self) -> type[SAE]:
    return ARCHITECTURES[self.identity.arch]

  @property
  def seeds(self) -> tuple[int, ...]:
    return self.identity.seeds

  @property
  def member_data_seeds(self) -> tuple[int, ...]:
    """Each member's batch order: one per seed, or the shared --data_seed for all."""
    return self.identity.data_seeds or (self.identity.data_seed,) * len(self.seeds)

  @property
  def num_streams(self) -> int:
    """How many batch orders are read from the store: one shared, or one per distinct order."""
    return len(set(self.identity.data_seeds)) if self.identity.data_seeds else 1

  @property
  def member_names(self) -> list[str]:
    return member_names(self.seeds, self.identity.data_seeds)

  @property
  def penalty_coeff(self) -> float | None:
    """The flag's coefficient that --target_l0 multiplies, None for architectures without one."""
    return getattr(self.sae, self.arch.penalty) if self.arch.penalty else None


def member_names(seeds, data_seeds=()) -> list[str]:
  """Each member's export directory: seed{S}, or seed{S}_data{D} with per-seed data (where one
  seed may train on several data orders)."""
  if data_seeds:
    return [f"seed{s}_data{d}" for s, d in zip(seeds, data_seeds)]
  return [f"seed{s}" for s in seeds]


def resolve(cfg: TrainConfig, d_in: int, num_store_tokens: int, devices=None) -> RunPlan:
  """The plan for `cfg` on a store of `d_in` and `num_store_tokens`, on this machine's devices
  or on `devices` (a TPU topology's, for a compile-only report: the execution is then decided
  exactly as it will be on those chips)."""
  if cfg.arch not in ARCHITECTURES:
    raise JaxsaeError(f"--arch={cfg.arch} is unknown; use one of {', '.join(ARCHITECTURES)}")
  arch = ARCHITECTURES[cfg.arch]
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
  sae = arch.check_config(SaeConfig(
      k=cfg.k, auxk_alpha=cfg.auxk_alpha, l1_coeff=cfg.l1_coeff, l0_coeff=cfg.l0_coeff,
      jumprelu_bandwidth=cfg.jumprelu_bandwidth, jumprelu_threshold=cfg.jumprelu_threshold,
      target_l0=cfg.target_l0, matryoshka_widths=tuple(cfg.matryoshka_widths)), n)
  for name in ("batch_size", "checkpoint_every", "log_every"):
    if getattr(cfg, name) <= 0:
      raise JaxsaeError(f"--{name}={getattr(cfg, name)} must be positive")
  if cfg.lr is not None and not cfg.lr > 0:
    raise JaxsaeError(f"--lr={cfg.lr} must be positive (or left out for sparsify's default)")
  num_tokens = cfg.num_tokens if cfg.num_tokens is not None else num_store_tokens
  num_steps = num_tokens // cfg.batch_size
  if num_steps < 1:
    raise JaxsaeError(f"--num_tokens={num_tokens} is less than one batch of {cfg.batch_size}")
  execution = _execution(cfg, arch, n, len(seeds), devices or jax.devices())
  penalty_steps = round(cfg.penalty_warmup * num_steps)
  l0_target = _l0_target(cfg, arch, n, num_steps, penalty_steps)
  sae = dataclasses.replace(sae, compute_dtype=execution.compute_dtype,
                            topk_path=execution.topk_path, cpu_kernels=execution.cpu_kernels,
                            topk_rule=execution.topk_rule)
  identity = Identity(
      arch=cfg.arch, d_in=d_in, num_latents=n, k=cfg.k, seeds=seeds, batch_size=cfg.batch_size,
      data_seed=cfg.data_seed, site=cfg.site,
      normalize=cfg.normalize if cfg.normalize is not None else arch.normalize_by_default,
      data_seeds=data_seeds, target_l0=cfg.target_l0,
      matryoshka_widths=sae.matryoshka_widths)
  directory = cfg.checkpoint_dir or os.path.join(cfg.out, "checkpoints")
  return RunPlan(
      identity=identity, execution=execution, sae=sae,
      optimizer=OptimizerConfig(lr=cfg.lr or 2e-4 / math.sqrt(n / 2**14),
                                warmup_steps=cfg.lr_warmup_steps, num_steps=num_steps,
                                b1=cfg.adam_b1, b2=cfg.adam_b2, max_grad_norm=cfg.max_grad_norm),
      checkpoints=Checkpoints(
          directory=directory if files.is_remote(directory) else os.path.abspath(directory),
          every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
          keep_steps=tuple(sorted({t // cfg.batch_size for t in cfg.keep_at_tokens
                                   if 0 < t // cfg.batch_size <= num_steps}))),
      num_steps=num_steps, penalty_steps=penalty_steps,
      l0_target=l0_target, dead_tokens=cfg.dead_tokens, store_path=cfg.store, out=cfg.out,
      skip_non_finite=cfg.skip_non_finite, log_every=cfg.log_every, progress=cfg.progress,
      store_window=cfg.store_window, layouts=_layouts(cfg, arch))


def _layouts(cfg: TrainConfig, arch: type[SAE]) -> tuple[str, ...]:
  from jaxsae import formats
  if not cfg.layouts:
    return ("sparsify",) if formats.writes("sparsify", arch.name) else ("saelens",)
  for layout in cfg.layouts:
    if layout not in formats.WRITERS:
      raise JaxsaeError(f"--layouts={','.join(cfg.layouts)}: {layout!r} is not one of "
                        f"{', '.join(formats.WRITERS)}")
    if not formats.writes(layout, arch.name):
      raise JaxsaeError(f"--layouts={','.join(cfg.layouts)}: sparsify encodes TopK only, so a "
                        f"{arch.name} SAE in its layout would load there as something else; "
                        "use --layouts=saelens")
  if len(set(cfg.layouts)) != len(cfg.layouts):
    raise JaxsaeError(f"--layouts={','.join(cfg.layouts)} names a layout twice")
  return tuple(cfg.layouts)


def _l0_target(cfg: TrainConfig, arch: type[SAE], n: int, num_steps: int,
               penalty_steps: int) -> L0Target | None:
  if cfg.target_l0 is None:
    return None
  if arch.penalty is None:
    penalized = [name for name, a in ARCHITECTURES.items() if a.penalty]
    raise JaxsaeError(f"--target_l0 adapts an L1/L0 penalty, which --arch={cfg.arch} does not "
                      f"have (its L0 is set by --k); use it with {', '.join(penalized)}")
  if not 0 < cfg.target_l0 < n:
    raise JaxsaeError(f"--target_l0={cfg.target_l0} must be between 0 and num_latents ({n})")
  prop = arch.target_l0_prop if cfg.target_l0_prop is None else cfg.target_l0_prop
  if not 0 <= cfg.target_l0_freeze < 1 or not cfg.target_l0_gain > 0 or prop < 0:
    raise JaxsaeError(f"--target_l0_freeze={cfg.target_l0_freeze} must be in [0, 1), "
                      f"--target_l0_gain={cfg.target_l0_gain} positive and "
                      f"--target_l0_prop={prop} not negative")
  return L0Target(cfg.target_l0, cfg.target_l0_gain, prop, penalty_steps,
                  num_steps - round(cfg.target_l0_freeze * num_steps))


def _execution(cfg: TrainConfig, arch: type[SAE], n: int, num_seeds: int,
               devices) -> Execution:
  backend, num_devices = devices[0].platform, len(devices)
  dtype = cfg.compute_dtype
  if dtype == "auto":
    dtype = "float32" if backend == "cpu" else "bfloat16"
  if dtype not in ("float32", "bfloat16"):
    raise JaxsaeError(f"--compute_dtype={cfg.compute_dtype}: use float32, bfloat16 or auto")
  if cfg.topk_backward not in common.BACKWARDS:
    raise JaxsaeError(f"--topk_backward={cfg.topk_backward}: use "
                      f"{', '.join(common.BACKWARDS)}")
  if cfg.topk_rule not in common.RULES:
    raise JaxsaeError(f"--topk_rule={cfg.topk_rule}: use {', '.join(common.RULES)}")
  # Asked of this process's backend, so only where the plan is for it (not a topology's chips).
  kernels = backend == "cpu" and num_devices == 1 and cpu_kernels.available()
  if cfg.topk_backward == "kernel" and not common.kernels_usable(dtype, kernels):
    raise JaxsaeError("--topk_backward=kernel needs jaxsae's CPU kernels: one CPU device, "
                      "--compute_dtype=float32 and a C++ compiler (see the warning above, if "
                      "any); use auto")
  if cfg.seed_loop not in ("auto", "vmap", "map"):
    raise JaxsaeError(f"--seed_loop={cfg.seed_loop}: use auto, vmap or map")
  mesh = mesh_shape(cfg.mesh, num_seeds, cfg.batch_size, num_devices)
  path = common.choose_topk_path(cfg.topk_backward, cfg.batch_size, n, dtype, kernels, backend)
  rule = common.choose_topk_rule(cfg.topk_rule, backend) if arch.selects_top_k else "exact"
  if rule != "exact" and path == "kernel" and cfg.topk_backward == "kernel":
    raise JaxsaeError(f"--topk_rule={rule} selects by another top-k than jaxsae's CPU kernel's; "
                      "use --topk_backward=auto (or dense/scatter)")
  loop = cfg.seed_loop if cfg.seed_loop != "auto" else seed_loop(
      arch, backend, cfg.batch_size * n, num_seeds, num_devices, on_kernels=(
          common.kernels_usable(dtype, kernels) and cfg.topk_backward in ("auto", "kernel")))
  if loop == "map" and mesh[0] * mesh[1] > 1:
    raise JaxsaeError(f"--seed_loop=map runs the seeds one after another on one device, but the "
                      f"mesh has {mesh[0] * mesh[1]}: it would gather every seed's state; use "
                      "--seed_loop=vmap (or auto)")
  return Execution(backend=backend, mesh=mesh, compute_dtype=dtype, cpu_kernels=kernels,
                   topk_path=path, seed_loop=loop, unroll_seeds=path != "scatter",
                   topk_rule=rule)


def seed_loop(arch: type[SAE], backend: str, size: int, num_seeds: int, num_devices: int,
              on_kernels: bool) -> str:
  """How the step runs the seeds: "vmap" (one batched program), or "map" (one after another),
  for batch x latents `size` on one device of `backend`.

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
  if backend != "cpu" or num_devices > 1 or not arch.selects_top_k:
    return "vmap"
  return "vmap" if on_kernels and (size <= KERNEL_VMAP_MAX or num_seeds == 1) else "map"


def mesh_shape(spec: str, num_seeds: int, batch_size: int, n: int) -> tuple[int, int]:
  """The ("seed", "data") mesh over `n` devices; `spec` is SEEDSxDATA or auto (seeds first)."""
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
  return shape


def make_mesh(plan: RunPlan, devices=None) -> jax.sharding.Mesh:
  """The plan's mesh over this machine's devices, or `devices` (a TPU topology's)."""
  types = (jax.sharding.AxisType.Auto,) * 2
  if devices is not None and len({(d.process_index, tuple(getattr(d, "coords", ())))
                                   for d in devices}) < len(devices):
    # libtpu's v4 topologies give each TensorCore as a device; jax.make_mesh places devices by
    # chip ("megacore") only, so these go in their given order.
    return jax.sharding.Mesh(np.array(devices).reshape(plan.execution.mesh), ("seed", "data"),
                             axis_types=types)
  return jax.make_mesh(plan.execution.mesh, ("seed", "data"), axis_types=types, devices=devices)


def check_run_dir(plan: RunPlan) -> None:
  """Writes RUN/run.json (the identity, the store, the state format and this start's execution),
  or checks that a resumed run is the same run. run.json of the trainer before the RunPlan held
  the same identity keys at its top level, among others, so such runs resume as they are."""
  out, path = plan.out, os.path.join(plan.out, RUN_FILE)
  spec = plan.identity.to_json()
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
      raise JaxsaeError(f"store {plan.store_path} has d_in={spec['d_in']} but the run in {out} "
                        f"was trained on d_in={old.get('d_in')}; use the same store or a new "
                        "--out")
    was = {k: old.get(k, IDENTITY_DEFAULTS.get(k)) for k in spec}
    diff = [k for k in spec if was[k] != spec[k]]
    if diff:
      said = "; ".join(f"--{k}={was[k]} there, {spec[k]} now" for k in diff)
      raise JaxsaeError(f"{out} holds a different run ({said}); rerun with its flags to resume, "
                        "or choose a new --out")
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    record = {**spec, "store": plan.store_path, "state_format": STATE_FORMAT,
              "execution": dataclasses.asdict(plan.execution)}
    if plan.l0_target is not None:  # recorded, not compared: a resume may retune the controller
      record["l0_target"] = plan.l0_target._asdict()
    files.atomic_write_json(path, record)
