"""The ensemble's state: one seed's training state as a module, the S seeds as one Flax
ensemble, and where each of its arrays lives on the mesh.

Every variable carries a leading seed axis [S, ...] (`nnx.vmap` over per-seed rngs), named
"seed" in its sharding metadata; `state_shardings` turns those names into NamedShardings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsae import optim
from jaxsae.sae import SAE, SaeConfig, Statistic, common
from jaxsae.train.plan import RunPlan


def make_optimizer(plan: RunPlan):
  """(tx, schedule): Adam with sparsify's schedule, a linear warmup from 0 and then a linear
  decay to 0 at the end."""
  o = plan.optimizer
  lr, warmup, num_steps = o.lr, o.warmup_steps, o.num_steps

  def schedule(count):
    warm = count / max(warmup, 1)
    decay = (num_steps - count) / max(num_steps - warmup, 1)
    return lr * jnp.clip(jnp.where(count < warmup, warm, decay), 0.0, 1.0)

  return optim.adam(schedule, b1=o.b1, b2=o.b2, max_grad_norm=o.max_grad_norm), schedule


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
      # (the controller's proportional part needs the last one), set by `step.adapt_penalty`.
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
    # The ensemble of members, though named `seeds`: the name is in every checkpoint's tree
    # paths (orbax restores by them), so renaming it would leave existing runs unresumable.
    self.seeds = build(rngs)
    self.step = nnx.Variable(jnp.zeros((), jnp.int32))

  @classmethod
  def of(cls, plan: RunPlan, tx) -> TrainState:
    """The state `plan` trains."""
    i = plan.identity
    return cls(plan.arch, i.seeds, i.d_in, i.num_latents, plan.sae, tx,
               adapt_penalty=plan.l0_target is not None)


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


def batch_sharding(plan: RunPlan, mesh: Mesh) -> NamedSharding:
  """The batch on the mesh: x [B, d_in] over the data axis, or with per-seed data (--data_seeds)
  x [S, B, d_in], each member's batch on the devices of its seed."""
  return NamedSharding(mesh, P("seed", "data", None) if plan.identity.data_seeds else
                       P("data", None))


def init_from_first_batch(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> nnx.State:
  """Every member's SAE initialised from the first batch (`SAE.init_from_batch`: b_dec at its
  mean, and what else the architecture sets there); with per-seed data, each from its own."""
  ts = nnx.merge(graphdef, state)
  sae_def, saes = nnx.split(ts.seeds.sae)

  def one(s, x):
    sae = nnx.merge(sae_def, s)
    sae.init_from_batch(x)
    return nnx.state(sae)

  nnx.update(ts.seeds.sae, jax.vmap(one, in_axes=(0, 0 if x.ndim == 3 else None))(saes, x))
  return nnx.state(ts)


@functools.partial(jax.jit, static_argnums=0)
def exported(graphdef: nnx.GraphDef, state: nnx.State) -> dict[str, jax.Array]:
  """Every seed's `export()` tensors, stacked [S, ...]."""
  sae_def, saes = nnx.split(nnx.merge(graphdef, state).seeds.sae)
  return jax.vmap(lambda s: nnx.merge(sae_def, s).export())(saes)
