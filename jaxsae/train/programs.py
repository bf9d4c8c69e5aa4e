"""A run's programs, built once from its plan: the abstract state, where its arrays live, and the
jitted init and step. The loop and the benchmarks all take them from `build`, so what a
benchmark times or compiles is the program training runs (donation, shardings, the batch's
decode included). `of_plan` keeps a process's programs for its next run of the same shape."""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Callable, NamedTuple

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsae import store as store_lib
from jaxsae.train.plan import RunPlan
from jaxsae.train.state import (TrainState, batch_sharding, init_from_first_batch,
                                make_optimizer, state_shardings)
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


# The plan's fields that only the host reads: where the run reads and writes, how often it
# logs and checkpoints, what its exports look like. The jitted programs read none of them
# (tests/test_train.py builds and lowers them with each one poisoned), so two plans that differ
# only here run the same programs.
HOST_FIELDS = dict(store_path="", out="", checkpoints=None, log_every=0, progress=False,
                   layouts=(), store_window=0)
_KEEP = 8  # programs of this many shapes stay built (jitted functions; they hold no arrays)
_built: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def of_plan(plan: RunPlan, mesh: Mesh, *, scaled: bool = False,
            input_scale: float = 1.0) -> Programs:
  """`build`'s programs for `plan` with its own optimizer, the same ones again for a later run
  in this process that computes the same thing (a resume, a study's or a notebook's rerun, a
  run into another --out): jax then neither traces, lowers nor compiles them again, 1-2 s of
  CPU at the tests' tiny size and the whole compile at a large one."""
  key = (dataclasses.replace(plan, **HOST_FIELDS), mesh, scaled, input_scale)
  with _lock:
    if key in _built:
      _built.move_to_end(key)
      return _built[key]
  p = build(plan, mesh, make_optimizer(plan)[0], scaled=scaled, input_scale=input_scale)
  with _lock:
    _built[key] = p
    while len(_built) > _KEEP:
      _built.popitem(last=False)
  return p
