"""The jitted step: pure over the state's arrays; modules are merged and split inside.

`make_step(graphdef, plan)` is (state, x) -> (state, per-seed metrics): every seed's loss,
gradient, clip and Adam update under `vmap` (so gradient clipping and Adam are per seed: no
seed's gradient rescales another's), or one seed after another where the plan says so.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsae.sae import common
from jaxsae.train.plan import L0Target, RunPlan
from jaxsae.train.state import Member

# Tokens-since-fired saturates here so the int32 counter can never wrap.
COUNTER_CAP = 2**30


def update(m: Member, x: jax.Array, step: jax.Array, plan: RunPlan
           ) -> tuple[dict[str, jax.Array], jax.Array]:
  """One seed's training step on batch x, in place on `m`; returns its metrics and whether the
  step is ok (a finite loss on a seed not yet frozen). The optimizer leaves its moments as they
  were where it is not (`make_step` restores the rest)."""
  sae, l0_target = m.sae, plan.l0_target
  dead = m.since_fired[...] > plan.dead_tokens
  penalty_scale = jnp.minimum(step / max(plan.penalty_steps, 1), 1.0)
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
  m.since_fired[...] = jnp.where(out.fired, 0, jnp.minimum(since + x.shape[0], COUNTER_CAP))
  metrics = {"loss": loss, "fvu": out.fvu, "l0": out.l0, "aux": out.aux}
  if l0_target is not None:
    metrics["penalty_mult"] = m.penalty_mult[...]  # the value this step trained at
    adapt_penalty(m, out.l0, step, l0_target)
  return metrics, ok


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
  [B, n] intermediates crowd each other out. The plan unrolls where the TopK kernels take
  their dense backward, the same small shapes. (Even one seed at 4096 x 4096 ran slower
  without the loop than inside it: 0.53 s against 0.47 s.)
  """
  if loop == "vmap":
    return jax.vmap(fn)(members)
  if not unroll:
    return jax.lax.map(fn, members)
  num_seeds = jax.tree.leaves(members)[0].shape[0]
  outs = [fn(jax.tree.map(lambda a: a[i], members)) for i in range(num_seeds)]
  return jax.tree.map(lambda *a: jnp.stack(a), *outs)


def make_step(graphdef: nnx.GraphDef, plan: RunPlan):
  """(state, x) -> (state, per-seed metrics): every seed's update, on the shared batch x
  [B, d_in], or with per-seed data (--data_seeds) each on its own x[i] of x [S, B, d_in]."""

  # All but what the optimizer guards itself (optim.adam): its moments.
  rest = nnx.Not(nnx.OptVariable)
  loop, unroll = plan.execution.seed_loop, plan.execution.unroll_seeds

  def one_seed(member_def, member_state, x, step):
    m = nnx.merge(member_def, member_state)
    before = jax.tree.leaves(nnx.state(m, rest))  # arrays are immutable: these stay the old values
    bad = m.bad_step[...]
    # A non-finite loss freezes the seed where it was, so no NaN can reach a checkpoint; the
    # loop sees bad_step and stops the run.
    metrics, ok = update(m, x, step, plan)
    after, treedef = jax.tree.flatten(nnx.state(m, rest))
    nnx.update(m, treedef.unflatten([jnp.where(ok, a, b) for a, b in zip(after, before)]))
    m.bad_step[...] = jnp.where((bad < 0) & ~ok, step, bad)
    metrics["dead"] = jnp.mean(m.since_fired[...] > plan.dead_tokens)
    return nnx.state(m), metrics

  def train_step(state: nnx.State, x: jax.Array):
    ts = nnx.merge(graphdef, state)
    member_def, members = nnx.split(ts.seeds)
    step = ts.step[...]
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
