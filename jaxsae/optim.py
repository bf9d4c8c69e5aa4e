"""The trainer's optimizer: optax's global-norm clip and Adam, with the non-finite guard inside.

A seed whose loss is not finite is frozen where it was (train.make_step). Guarded after the
fact, with a select between optax's new moments and the old ones, the step kept a copy of
every moment: the select needs the old moment after the update has written the new one over it
in place (4 seeds at 256 x 1,024 on a CPU: 48 ms a step, 33 ms with the guard here;
BENCHMARKS.md). Here each moment is selected where it is made, and the update is zero where
the step is not ok, so nothing needs the old values afterwards.

The state is optax.chain(clip_by_global_norm, adam(schedule))'s, leaf for leaf, so checkpoints
are unchanged, and so are the numbers: optax's own functions compute every step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics


def adam(schedule: Callable, *, b1: float, b2: float, eps: float = 1e-8,
         max_grad_norm: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """Adam with a learning-rate schedule after clipping the gradient's global norm (if > 0).

  `update(grads, state, params, ok=...)`: where `ok` is false the updates are zero and the
  state comes back unchanged (count and schedule included).
  """
  clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity()
  reference = optax.chain(clip, optax.adam(schedule, b1=b1, b2=b2, eps=eps))

  def update(grads, state, params=None, *, ok=True):
    del params
    clip_state, (adam_state, schedule_state) = state
    grads, clip_state = clip.update(grads, clip_state)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    mu = keep(optax.tree.update_moment(grads, adam_state.mu, b1, 1), adam_state.mu)
    nu = keep(optax.tree.update_moment_per_elem_norm(grads, adam_state.nu, b2, 2), adam_state.nu)
    count = numerics.safe_increment(adam_state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    step_size = -1 * schedule(schedule_state.count)  # optax.scale_by_learning_rate's sign flip
    updates = jax.tree.map(
        lambda m, v: jnp.where(ok, jnp.array(step_size, m.dtype) * (m / (jnp.sqrt(v + 0.0) + eps)),
                               0.0), mu_hat, nu_hat)
    adam_state = adam_state._replace(count=jnp.where(ok, count, adam_state.count), mu=mu, nu=nu)
    schedule_state = schedule_state._replace(count=jnp.where(
        ok, numerics.safe_increment(schedule_state.count), schedule_state.count))
    return updates, (clip_state, (adam_state, schedule_state))

  return optax.GradientTransformationExtraArgs(reference.init, update)
