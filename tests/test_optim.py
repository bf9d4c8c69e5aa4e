"""The trainer's Adam against optax's clip + Adam, and its guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsae import optim


def schedule(count):
  return 1e-2 * jnp.minimum(count / 3.0, 1.0)


def params_and_grads(step):
  key = jax.random.key(step)
  shapes = {"W": (12, 5), "b": (5,)}
  return ({k: jnp.full(s, 0.5) for k, s in shapes.items()},
          {k: jax.random.normal(jax.random.fold_in(key, i), s) * (1 + step)
           for i, (k, s) in enumerate(shapes.items())})


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_equals_optax_clip_and_adam_to_the_bit_step_for_step(max_grad_norm):
  clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else optax.identity()
  reference = optax.chain(clip, optax.adam(schedule, b1=0.9, b2=0.99))
  ours = optim.adam(schedule, b1=0.9, b2=0.99, max_grad_norm=max_grad_norm)
  params, _ = params_and_grads(0)
  s_ref, s_ours = reference.init(params), ours.init(params)
  assert jax.tree.structure(s_ref) == jax.tree.structure(s_ours)  # checkpoints read the same
  step_ref = jax.jit(reference.update)
  step_ours = jax.jit(lambda g, s, p: ours.update(g, s, p, ok=jnp.array(True)))
  for step in range(6):
    _, grads = params_and_grads(step)
    u_ref, s_ref = step_ref(grads, s_ref, params)
    u_ours, s_ours = step_ours(grads, s_ours, params)
    for a, b in zip(jax.tree.leaves((u_ref, s_ref)), jax.tree.leaves((u_ours, s_ours))):
      np.testing.assert_array_equal(a, b)
    params = optax.apply_updates(params, u_ours)


def test_a_step_that_is_not_ok_changes_nothing():
  tx = optim.adam(schedule, b1=0.9, b2=0.99, max_grad_norm=1.0)
  params, grads = params_and_grads(1)
  # Jitted whole: op by op, each primitive of the update would compile on its own.
  _, state = jax.jit(lambda g, s: tx.update(g, s, params, ok=True))(grads, tx.init(params))
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  updates, after = jax.jit(lambda g, s: tx.update(g, s, params, ok=jnp.array(False)))(bad, state)
  assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
