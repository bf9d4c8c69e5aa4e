"""A run's programs, built once from its plan: the abstract state, where its arrays live, and the
jitted init and step. The loop and the benchmarks all take them from `build`, so what a
benchmark times or compiles is the program training runs (donation, shardings, the batch's
decode included)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsae import store as store_lib
from jaxsae.train.plan import RunPlan
from jaxsae.train.state import TrainState, batch_sharding, init_from_first_batch, state_shardings
from jaxsae.train.step import make_step


class Programs(NamedTuple):
  graphdef: nnx.GraphDef
  # ShapeDtypeStructs carrying their shardings: what a checkpoint restores into, what a
  # compile-only report lowers with; it holds no arrays.
  abstract_state: nnx.State
  state_shardings: nnx.State
  batch_sharding: store_lib.Rows  # of NamedShardings: the codes', and the factors' if scaled
  init: Callable[[], nnx.State]  # a fresh state, built directly into its sharding
  init_from_first_batch: Callable[[nnx.State, store_lib.Rows], nnx.State]  # state donated
  step: Callable[[nnx.State, store_lib.Rows], tuple[nnx.State, Any]]  # state donated


def build(plan: RunPlan, mesh: Mesh, tx, *, scaled: bool = False,
          input_scale: float = 1.0) -> Programs:
  """The programs of `plan` on `mesh` with optimizer `tx`. Batches are `store.Rows` as the store
  holds them (`scaled`: 8-bit codes with a per-row factor), decoded and multiplied by
  `input_scale` on the devices, so the hosts move a half or a quarter of float32's bytes."""
  make_state = lambda: TrainState.of(plan, tx)
  graphdef, abstract = nnx.split(nnx.eval_shape(make_state))
  shardings = state_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  xs = store_lib.rows_sharding(batch_sharding(plan, mesh), scaled)
  train_step = make_step(graphdef, plan)
  decode = lambda rows: store_lib.decode(rows, input_scale)
  # Donated, so step 1 never holds two copies of the state.
  first = jax.jit(lambda s, rows: init_from_first_batch(graphdef, s, decode(rows)),
                  in_shardings=(shardings, xs), out_shardings=shardings, donate_argnums=0)
  step = jax.jit(lambda s, rows: train_step(s, decode(rows)), in_shardings=(shardings, xs),
                 out_shardings=(shardings, NamedSharding(mesh, P("seed"))), donate_argnums=0)
  init = jax.jit(lambda: nnx.state(make_state()), out_shardings=shardings)
  return Programs(graphdef, abstract, shardings, xs, init, first, step)
